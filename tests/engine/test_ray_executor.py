"""The Ray executor: end to end on a local 2-CPU Ray instance, timeouts, workers killed
mid-evaluation (retried once, then recorded), and the message when Ray is missing."""
import builtins
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from engine.candidate import EvalResult
from tests.conftest import EXAMPLE_SPEC, JITTER_SPEC, ROOT, wait_for_evaluations

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

from engine.ray_executor import RayExecutor, local_ray_options  # noqa: E402

GOOD = "def loss(pred, target):\n    return (pred - target) ** 2\n"
HANG = "def loss(pred, target):\n    while True:\n        pass\n"

# The example plug-in, except that a genome named kill_* kills its own evaluation: the Ray actor
# (the warm worker's parent) or the warm worker itself (the parent of the genome's process, where
# evaluate() runs), the first time only (a marker file remembers) or every time.
KILLER = f'''
import importlib.util, os, signal
import psutil

_spec = importlib.util.spec_from_file_location("robust_regression_base", {str(ROOT / "examples" / "robust_regression.py")!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


class Killer(_module.RobustRegression):
    def __init__(self, markers=""):
        self.markers = markers

    def evaluate(self, fn, seed):
        name = fn.__name__
        if name.startswith("kill_"):
            marker = os.path.join(self.markers, name)
            if name.endswith("always") or not os.path.exists(marker):
                open(marker, "a").close()
                worker = os.getppid()
                os.kill(psutil.Process(worker).ppid() if "actor" in name else worker, signal.SIGKILL)
        return super().evaluate(fn, seed)
'''


def genome(name: str, body: str = "(pred - target) ** 2") -> str:
    return f"def {name}(pred, target):\n    return {body}\n"


TASKS = {
    0: genome("good"),
    1: "def other(p, t):\n    d = t - p\n    return d * d\n",  # same behaviour as 0
    2: HANG,
    3: genome("kill_actor_once", "(pred - target).abs() ** 1.5"),
    4: genome("kill_worker_once", "(pred - target).abs() ** 1.2"),
    5: genome("kill_actor_always", "(pred - target).abs() ** 1.7"),
    6: genome("after", "(pred - target).abs()"),
}


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance (2 CPUs) for the module: starting Ray takes seconds."""
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="evoloss-ray-test-")
    ray.init(num_cpus=2, **local_ray_options(temp_dir))
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _run(executor, tasks, decide=None) -> dict[int, EvalResult]:
    results: dict[int, EvalResult] = {}
    executor.run(tasks, seed=0, decide=decide, on_result=lambda r: results.__setitem__(r.candidate_id, r))
    return results


def test_cli_run_with_ray_executor(ray_session, tmp_path):
    from engine.cli import main

    out = tmp_path / "run"
    code = main(["run", "--fitness", EXAMPLE_SPEC, "--operator", JITTER_SPEC, "--executor", "ray", "--quiet",
                 "--pop", "4", "--gens", "1", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"] == 8
    with sqlite3.connect(out / "run.sqlite") as db:
        statuses = [row[0] for row in db.execute("select status from evaluations")]
    assert statuses.count("ok") >= 6, statuses
    assert ray.is_initialized()  # a session the executor did not start is left running


def test_async_ladder_run_on_ray_with_resources_from_the_plugin(ray_session, tmp_path):
    from archives.store import RunStore
    from engine.cli import main

    timed = f"{ROOT / 'tests' / 'fixtures' / 'timed.py'}:TimedRegression"
    out = tmp_path / "run"
    code = main(["run", "--fitness", f"{timed}>{timed}", "--fitness-opt", "offset=3.0", "--operator", JITTER_SPEC,
                 "--executor", "ray", "--async", "--pop", "4", "--gens", "2", "--promote", "0.5", "--quiet",
                 "--out", str(out)])
    assert code == 0
    store = RunStore.open(out)
    cheap = {r.candidate_id: r for _, r in store.evaluations("timed-regression@0")}
    dear = {r.candidate_id: r for _, r in store.evaluations("timed-regression@1")}
    assert len(cheap) == len(store.candidates()) == 4 + 4 * 2
    assert dear and set(dear) <= {cid for cid, r in cheap.items() if r.ok}
    assert all(dear[cid].fitness == pytest.approx(cheap[cid].fitness + 3.0) for cid in dear)


def test_resources_come_from_the_plugin_unless_flags_say_otherwise():
    from engine.config import RunConfig
    from engine.executor import plugin_resources
    from engine.executors import make_executor

    class Big:
        name = "big"

        def resources(self):
            return {"cpus": 2, "gpus": 1}

    class Small:
        name = "small"

        def resources(self):
            return {"cpus": 1}

    needs = plugin_resources([Small(), Big()])
    assert needs == {"cpus": 2.0, "gpus": 1.0}
    executor = make_executor(RunConfig(executor="ray"), resources=needs)
    assert (executor.cpus_per_eval, executor.gpus_per_eval) == (2.0, 1.0)
    executor = make_executor(RunConfig(executor="ray", gpus_per_eval=0.5), resources=needs)
    assert (executor.cpus_per_eval, executor.gpus_per_eval) == (2.0, 0.5)


@pytest.fixture(scope="module")
def batch(ray_session, tmp_path_factory):
    """One batch through one executor (2 slots, 5 s timeout): duplicates, a hang, kills."""
    folder = tmp_path_factory.mktemp("killer")
    (folder / "killer.py").write_text(KILLER)
    markers = folder / "markers"
    markers.mkdir()
    seen: dict[str, int] = {}

    def decide(candidate_id, fingerprint):  # as Engine.claim: a retried evaluation probes again
        known = seen.setdefault(fingerprint, candidate_id)
        return known if known != candidate_id else None

    # No jail: these genomes must reach their actor (a jailed genome sees no process outside its jail).
    with RayExecutor(f"{folder / 'killer.py'}:Killer", {"markers": str(markers)}, workers=2, timeout=5.0,
                     sandbox="none") as executor:
        results = _run(executor, list(TASKS.items()), decide)
        restarts = executor.restarts
    return results, restarts, markers


def test_behavioural_duplicates_are_decided_by_the_driver(batch):
    results, _, _ = batch
    statuses = sorted([results[0].status, results[1].status])
    assert statuses == ["duplicate", "ok"]
    duplicate = results[0] if results[0].status == "duplicate" else results[1]
    assert duplicate.duplicate_of in (0, 1) and duplicate.duplicate_of != duplicate.candidate_id


def test_timeout_kills_the_evaluation_and_the_run_goes_on(batch):
    results, _, _ = batch
    assert results[2].status == "timeout" and "wall-clock" in results[2].error
    assert results[6].status == "ok"


@pytest.mark.parametrize("index", [3, 4], ids=["ray-actor-killed", "worker-process-killed"])
def test_worker_killed_mid_evaluation_is_retried(batch, index):
    results, restarts, markers = batch
    assert (markers / TASKS[index].split("(")[0][4:]).exists()  # it was killed once
    assert results[index].status == "ok", results[index].error
    assert restarts >= 2


def test_worker_killed_twice_is_recorded_as_error(batch):
    results, _, _ = batch
    assert results[5].status == "error"
    assert "lost twice" in results[5].error


def test_killed_actor_leaves_no_orphan_worker(ray_session):
    import psutil

    with RayExecutor(EXAMPLE_SPEC, workers=1, timeout=60) as executor:
        pids = ray.get(executor.slots[0].actor.ping.remote())
    # close() killed the actor; its worker subprocess ends itself within about a second.
    process = psutil.Process(pids["worker_pid"]) if psutil.pid_exists(pids["worker_pid"]) else None
    if process is not None:
        try:
            process.wait(timeout=10)
        except psutil.NoSuchProcess:
            pass
    assert not psutil.pid_exists(pids["worker_pid"]) or psutil.Process(pids["worker_pid"]).status() == "zombie"


def test_plugin_that_fails_to_load_in_a_slot_is_reported(ray_session, write_plugin):
    from engine.plugins import PluginError

    spec = write_plugin("raise RuntimeError('no such data folder')\n", "Plugin", name="broken.py")
    with pytest.raises(PluginError, match="no such data folder"):
        with RayExecutor(spec, workers=1, timeout=60):
            pass


def test_missing_ray_says_how_to_install(monkeypatch, tmp_path, capsys):
    from engine.cli import main

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    out = tmp_path / "run"
    code = main(["run", "--fitness", EXAMPLE_SPEC, "--operator", JITTER_SPEC, "--executor", "ray", "--quiet",
                 "--pop", "4", "--gens", "1", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert "pip install 'evoloss[ray]'" in error
    assert not out.exists()  # reported before the run folder is made


def test_ray_flags_are_validated():
    from engine.config import RunConfig

    config = RunConfig(executor="ray", ray_address="auto", gpus_per_eval=0.5, cpus_per_eval=2)
    assert config.gpus_per_eval == 0.5
    with pytest.raises(ValueError, match="gpus_per_eval"):
        RunConfig(executor="ray", gpus_per_eval=-1)
    with pytest.raises(ValueError, match="both be 0"):
        RunConfig(executor="ray", cpus_per_eval=0, gpus_per_eval=0)


def test_local_instance_keeps_its_state_out_of_home(tmp_path, monkeypatch):
    """The executor's own local instance: temp folder removed, nothing written to ~/.ray."""
    if ray.is_initialized():
        ray.shutdown()  # the module's shared session (this test runs last)
    monkeypatch.setenv("HOME", str(tmp_path))
    executor = RayExecutor(EXAMPLE_SPEC, workers=1, timeout=60)
    with executor:
        temp_dir = executor._temp_dir
        assert temp_dir and os.path.isdir(temp_dir)
        results = _run(executor, [(0, GOOD)])
    assert results[0].status == "ok"
    assert not os.path.exists(temp_dir)
    assert not (tmp_path / ".ray").exists()
    assert not ray.is_initialized()


def _ray_processes_under(prefix: str) -> list[str]:
    """Command lines of live processes whose command line mentions ``prefix`` (a Ray temp dir)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                line = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if prefix in line and "pytest" not in line:
            found.append(line)
    return found


@pytest.mark.slow
def test_killed_ray_driver_resumes_without_repeating_evaluations(ray_session, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from archives.store import RunStore
    from engine.cli import main

    timed = f"{ROOT / 'tests' / 'fixtures' / 'timed.py'}:TimedRegression"
    out = tmp_path / "run"
    # The driver's Ray instance lives under TMPDIR: a short path, as Unix socket paths are short.
    ray_tmp = Path(tempfile.mkdtemp(prefix="evr-", dir="/tmp"))
    command = [sys.executable, "-m", "engine", "run", "--fitness", timed, "--fitness-opt", "low=0.3",
               "--fitness-opt", "high=0.6", "--operator", JITTER_SPEC, "--executor", "ray", "--async", "--pop", "4",
               "--gens", "3", "--validate-top", "0", "--out", str(out), "--quiet"]  # resuming is tested, not validation
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "TMPDIR": str(ray_tmp)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = wait_for_evaluations(out, 5, timeout=180)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert done >= 5
    # Ray's own processes for the killed driver's instance end with it (fate sharing), and so
    # do the evaluation workers (their watchdog), within a few seconds.
    deadline = time.time() + 30
    while time.time() < deadline and _ray_processes_under(str(ray_tmp)):
        time.sleep(0.5)
    assert _ray_processes_under(str(ray_tmp)) == []
    before = sqlite3.connect(out / "run.sqlite").execute("SELECT candidate_id, fitness FROM evaluations WHERE eval_seed IS NULL").fetchall()

    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    db = sqlite3.connect(out / "run.sqlite")
    assert db.execute("SELECT candidate_id FROM evaluations GROUP BY candidate_id, fitness_name, eval_seed HAVING count(*) > 1").fetchall() == []
    after = dict(db.execute("SELECT candidate_id, fitness FROM evaluations WHERE eval_seed IS NULL").fetchall())
    assert all(after[cid] == fitness for cid, fitness in before)
    assert len(RunStore.open(out).candidates()) == len(after) == 4 + 4 * 3
    shutil.rmtree(ray_tmp, ignore_errors=True)  # what the killed driver could not remove
