"""Genomes that hang, allocate too much, crash or misbehave cost one candidate, never the run."""
import pytest

from engine.executor import ProcessExecutor, SerialExecutor, scrubbed_environment
from engine.plugins import PluginError


def fn(line: str) -> str:
    return f"def loss(pred, target):\n    {line}\n"


GOOD = fn("return (pred - target) ** 2")

# (id, code, expected status, fragment of the error)
RUNTIME = [
    ("good", GOOD, "ok", None),
    ("infinite_loop", fn("while True:\n        pass"), "timeout", "wall-clock"),
    ("huge_tensor", fn("x = torch.ones(50 * 1024 ** 3 // 4)\n    return pred * x[0]"), "oom", "memory"),
    ("huge_list", fn("x = [0.0] * (10 ** 10)\n    return pred"), "oom", "memory"),
    ("nan", fn("return pred * float('nan')"), "invalid", "non-finite"),
    ("scalar", fn("return ((pred - target) ** 2).mean()"), "invalid", "scalar"),
    ("wrong_shape", fn("return torch.stack([pred, target])"), "invalid", "shape"),
    ("no_gradient", fn("return ((pred - target) ** 2).detach()"), "invalid", "gradient"),
    ("raises", fn("raise ValueError('boom')"), "invalid", "boom"),
    ("zero_division", fn("return pred / 0 + 1 / 0"), "invalid", "ZeroDivisionError"),
    ("recursion", fn("def inner(n):\n        return inner(n + 1)\n    return inner(0)"), "invalid", "Recursion"),
    ("integer_output", fn("return (pred > target).long()"), "invalid", "dtype"),
    ("returns_none", fn("return None"), "invalid", "NoneType"),
    ("unsafe", fn("import os\n    return pred"), "invalid", "import of 'os'"),
]


@pytest.fixture(scope="module")
def runtime_results():
    from tests.conftest import EXAMPLE_SPEC

    results = {}
    with ProcessExecutor(EXAMPLE_SPEC, workers=2, timeout=4.0, memory_limit_gb=3.0) as executor:
        tasks = [(i, code) for i, (_, code, _, _) in enumerate(RUNTIME)]
        executor.run(tasks, seed=0, decide=None, on_result=lambda r: results.__setitem__(r.candidate_id, r))
        restarts = executor.restarts
    return results, restarts


@pytest.mark.parametrize("index", range(len(RUNTIME)), ids=[r[0] for r in RUNTIME])
def test_bad_genome_is_recorded_and_the_run_goes_on(runtime_results, index):
    results, _ = runtime_results
    _, _, status, fragment = RUNTIME[index]
    result = results[index]
    assert result.status == status, result.error
    if fragment:
        assert fragment.lower() in result.error.lower()
    if status == "ok":
        assert result.fitness > 0 and result.fingerprint


def test_a_timeout_ends_only_the_genomes_process_and_keeps_the_worker(runtime_results):
    _, restarts = runtime_results
    assert restarts == 0


def test_duplicate_behaviour_skips_training(example_spec):
    rewrite = "def other(p, t):\n    d = t - p\n    return d * d\n"
    seen = {}

    def decide(candidate_id, fingerprint):
        if fingerprint in seen:
            return seen[fingerprint]
        seen[fingerprint] = candidate_id
        return None

    results = []
    executor = SerialExecutor(example_spec)
    executor.run([(0, GOOD), (1, rewrite)], seed=0, decide=decide, on_result=results.append)
    assert [r.status for r in results] == ["ok", "duplicate"]
    assert results[1].duplicate_of == 0


def test_worker_environment_has_no_secrets(write_plugin, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "t0ken")
    assert "OPENAI_API_KEY" not in scrubbed_environment()
    spec = write_plugin(PLUGIN_HEADER + '''
    def evaluate(self, fn, seed):
        import os
        leaked = sorted(k for k, v in os.environ.items() if v in ("sk-test-secret", "t0ken"))
        return Score(1.0, {"leaked": leaked, "threads": os.environ.get("OMP_NUM_THREADS")})
''')
    results = []
    with ProcessExecutor(spec, workers=1, timeout=30) as executor:
        executor.run([(0, GOOD)], seed=0, decide=None, on_result=results.append)
    assert results[0].status == "ok", results[0].error
    assert results[0].metrics == {"leaked": [], "threads": "1", "unprotected": True}


PLUGIN_HEADER = '''
import torch
from fitness import Fitness, Interface, Score, Seed

class Pair(Interface):
    arg_counts = (2,)
    def sample_inputs(self, batch_size, generator):
        return {"pred": torch.randn(batch_size, generator=generator).requires_grad_(),
                "target": torch.randn(batch_size, generator=generator)}

class Plugin(Fitness):
    name = "probe"
    interface = Pair()
    def seeds(self):
        return [Seed("sq", "def sq(pred, target):\\n    return (pred - target) ** 2\\n")]
'''


def test_a_plugin_crashing_in_the_genomes_process_is_recorded_and_the_worker_goes_on(write_plugin):
    spec = write_plugin(PLUGIN_HEADER + '''
    def evaluate(self, fn, seed):
        import ctypes
        ctypes.string_at(0)  # segfault
''')
    results = []
    with ProcessExecutor(spec, workers=1, timeout=30) as executor:
        executor.run([(0, GOOD), (1, GOOD)], seed=0, decide=None, on_result=results.append)
        assert executor.restarts == 0
    assert [r.status for r in results] == ["error", "error"]
    assert "crashed with SIGSEGV" in results[0].error


def test_plugin_with_wrong_return_type_is_an_error(write_plugin):
    spec = write_plugin(PLUGIN_HEADER + '''
    def evaluate(self, fn, seed):
        return 0.5
''')
    results = []
    SerialExecutor(spec).run([(0, GOOD)], seed=0, decide=None, on_result=results.append)
    assert results[0].status == "error"
    assert "expected fitness.Score" in results[0].error


def test_plugin_that_fails_to_import_stops_the_executor_with_its_file_named(write_plugin):
    spec = write_plugin("import not_a_module_anywhere\n", name="broken_plugin.py")
    with pytest.raises(PluginError, match="broken_plugin.py.*ModuleNotFoundError"):
        with ProcessExecutor(spec, workers=1, timeout=30):
            pass


@pytest.mark.parametrize("kind", ["serial", "process"])
def test_a_re_measurement_skips_the_checks_and_scores_the_same(example_spec, kind):
    """A task marked checked (a re-measurement: the driver has the candidate's fingerprint and
    descriptors from its first evaluation) goes straight to training: no fingerprint, no
    descriptors, no dedup question, and the same score as a full evaluation on that seed."""
    asked = []

    def decide(candidate_id, fingerprint):
        asked.append(candidate_id)
        return None

    results = {}
    executor = SerialExecutor(example_spec) if kind == "serial" else ProcessExecutor(example_spec, workers=1, timeout=30)
    with executor:
        executor.run([(0, GOOD, 0, 7), (1, GOOD, 0, 7, True)], seed=0, decide=decide,
                     on_result=lambda r: results.__setitem__(r.candidate_id, r))
    full, again = results[0], results[1]
    assert full.status == again.status == "ok"
    assert full.fingerprint and full.descriptors
    assert again.fingerprint is None and again.descriptors == {}
    assert again.fitness == full.fitness
    assert asked == [0]


def test_a_process_executor_used_without_start_starts_its_workers(example_spec):
    results = []
    executor = ProcessExecutor(example_spec, workers=1, timeout=30)
    try:
        executor.run([(0, GOOD)], seed=0, decide=None, on_result=results.append)
    finally:
        executor.close()
    assert [r.status for r in results] == ["ok"]
