"""The workers' speculative start (ProcessExecutor.launch(speculative=True), then confirm()):
workers boot in a jail view guessed from the plug-in specs while the driver imports the
plug-ins; they are kept only when the plug-ins' real view is the same, and no genome ever runs in
the guessed view when it is narrower or wider than the real one."""
import warnings

import pytest

from archives.store import RunStore
from engine import jail
from engine.cli import main
from engine.executor import ProcessExecutor
from engine.plugins import load_fitness
from tests.conftest import FIXTURES, JITTER_SPEC

PROBE = f"{FIXTURES / 'view_probe.py'}:ViewProbe"
TIMED = f"{FIXTURES / 'timed.py'}:TimedRegression"
MSE = "def loss(pred, target):\n    return (pred - target) ** 2\n"  # loss(2, 0) = 4
JAILED = pytest.mark.skipif(not jail.choose("auto").jailed, reason="no OS jail works on this machine")


def _plugin(spec, options=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TimedRegression is unprotected, and says so
        return load_fitness(spec, options)


def _data(tmp_path, offset="10"):
    data = tmp_path / "data"
    data.mkdir()
    (data / "offset.txt").write_text(offset)
    return data


# -- the guess ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["synthetic-pref", "pref-suite", PROBE, TIMED])
def test_the_guessed_view_is_the_real_one_for_plugins_that_declare_no_needs(spec, tmp_path):
    real = jail.worker_view_parts([_plugin(spec)], run_dir=tmp_path / "run")
    assert jail.same_view(jail.guessed_view_parts([spec], run_dir=tmp_path / "run"), real)


def test_the_guessed_view_is_not_the_real_one_of_a_plugin_that_declares_a_folder(tmp_path):
    data = _data(tmp_path)
    real = jail.worker_view_parts([_plugin(PROBE, {"folder": str(data)})], run_dir=tmp_path / "run")
    assert not jail.same_view(jail.guessed_view_parts([PROBE], run_dir=tmp_path / "run"), real)
    assert not jail.same_view(jail.guessed_view_parts([PROBE], run_dir=tmp_path / "run", gpus=True),
                              jail.guessed_view_parts([PROBE], run_dir=tmp_path / "run"))


# -- the executor ---------------------------------------------------------------------------------
@JAILED
def test_speculative_workers_are_kept_when_the_real_view_is_the_same_and_learn_later_stages(tmp_path):
    run = tmp_path / "run"
    executor = ProcessExecutor([(PROBE, {})], workers=1, timeout=60, log_path=run / "workers.log")
    results = []
    try:
        executor.launch(speculative=True)
        booted = [worker.process for worker in executor.workers]
        assert booted and not run.exists()  # the run folder is not needed to boot
        run.mkdir()
        # The end-of-run validation's stage is known only once the driver has the plug-ins.
        kept = executor.confirm([(PROBE, {}), (PROBE, {"probes": "/usr"})], plugins=[_plugin(PROBE)])
        assert kept and [worker.process for worker in executor.workers] == booted
        executor.start()
        executor.run([(0, MSE, 0), (1, MSE, 1)], seed=0, decide=None, on_result=results.append)
        assert [worker.process for worker in executor.workers] == booted and executor.restarts == 0
    finally:
        executor.close()
    assert {r.candidate_id: (r.status, r.fitness, r.metrics["seen"]) for r in results} == {
        0: ("ok", -4.0, []), 1: ("ok", -4.0, ["/usr"])}
    # What the workers printed while booting, before the log existed, reached it.
    assert "ViewProbe implements only evaluate" in (run / "workers.log").read_text()


@JAILED
def test_speculative_workers_are_replaced_when_a_plugin_declares_a_folder(tmp_path):
    data = _data(tmp_path)
    options = {"folder": str(data), "probes": str(data)}
    executor = ProcessExecutor([(PROBE, options)], workers=2, timeout=60)
    results = []
    try:
        executor.launch(speculative=True)
        booted = [worker.process for worker in executor.workers]
        assert booted
        assert not executor.confirm(plugins=[_plugin(PROBE, options)])
        # Every worker of the guessed view is gone before any task exists.
        assert all(process.poll() is not None for process in booted)
        assert not set(booted) & {worker.process for worker in executor.workers}
        assert len(executor.workers) == 2
        executor.start()
        executor.run([(i, MSE) for i in range(4)], seed=0, decide=None, on_result=results.append)
    finally:
        executor.close()
    # The folder the guess did not show is seen by every genome's process.
    assert [(r.status, r.fitness, r.metrics["seen"]) for r in results] == [("ok", 6.0, [str(data)])] * 4


@JAILED
def test_a_guess_wider_than_the_real_view_is_not_kept(tmp_path, write_plugin, monkeypatch):
    helper = tmp_path / "lib" / "evoloss_unused_helper"
    helper.mkdir(parents=True)
    (helper / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    spec = write_plugin(f'''
import os

import torch

try:
    import evoloss_unused_helper  # imported, yet no class of the plug-in comes from it
except ImportError:  # not shown in the worker's jail
    pass
from examples.robust_regression import RobustRegression
from fitness import Score


class Plugin(RobustRegression):
    name = "wide-guess"

    def evaluate(self, fn, seed):
        return Score(fitness=1.0, metrics={{"seen": os.path.exists({str(helper)!r})}})
''')
    plugin = _plugin(spec)
    assert not jail.same_view(jail.guessed_view_parts([spec]), jail.worker_view_parts([plugin]))
    executor = ProcessExecutor(spec, workers=1, timeout=60)
    results = []
    try:
        executor.launch(speculative=True)
        booted = [worker.process for worker in executor.workers]
        assert not executor.confirm(plugins=[plugin])
        assert all(process.poll() is not None for process in booted)
        executor.start()
        executor.run([(0, MSE)], seed=0, decide=None, on_result=results.append)
    finally:
        executor.close()
    assert results[0].status == "ok" and results[0].metrics["seen"] is False


@JAILED
def test_start_runs_a_speculative_launch_only_once_confirmed(tmp_path):
    """start() (and run()) confirm a speculative launch the caller did not: the genome then runs
    in the plug-in's real view."""
    data = _data(tmp_path, offset="3")
    options = {"folder": str(data)}
    results = []
    executor = ProcessExecutor([(PROBE, options)], workers=1, timeout=60)
    try:
        executor.launch(speculative=True)
        executor.start()
        executor.run([(0, MSE)], seed=0, decide=None, on_result=results.append)
    finally:
        executor.close()
    assert (results[0].status, results[0].fitness) == ("ok", -1.0)


# -- the command line -----------------------------------------------------------------------------
@JAILED
def test_run_serves_a_plugin_that_declares_a_folder_and_validates_on_the_same_workers(tmp_path, capsys):
    data = _data(tmp_path)
    out = tmp_path / "run"
    code = main(["run", "--fitness", PROBE, "--fitness-opt", f"folder={data}", "--operator", JITTER_SPEC,
                 "--pop", "2", "--gens", "1", "--workers", "2", "--validate-top", "1", "--validate-seeds", "1",
                 "--race-seeds", "0", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    store = RunStore.open(out)
    try:
        rows = [result for _, result in store.evaluations()]
        validations = [result for name, _, result in store.seed_evaluations() if name.startswith("validation:")]
    finally:
        store.close()
    # Every genome's process saw the folder (the score reads it), the validation's included.
    assert rows and all(r.status == "ok" and r.fitness <= 10.0 for r in rows)
    assert validations and all(r.status == "ok" and r.fitness <= 10.0 for r in validations)
