"""Steady-state search (--async), --max-evals, and resuming runs killed in either mode."""
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from archives.store import RunStore
from engine.cli import main
from engine.config import RunConfig
from engine.engine import Engine
from engine.executor import SerialExecutor
from engine.plugins import load_fitness, load_operator
from tests.conftest import FIXTURES, JITTER_SPEC, ROOT, evaluations_so_far, wait_for_evaluations

TIMED = f"{FIXTURES / 'timed.py'}:TimedRegression"


def evaluation_windows(store, log_path):
    """candidate id -> (start, end) of its first-stage evaluation, from the plug-in's log."""
    by_value = {r.metrics["value"]: r.candidate_id for _, r in store.evaluations("timed-regression") if r.ok}
    windows = {}
    for line in log_path.read_text().splitlines():
        entry = json.loads(line)
        windows[by_value[entry["value"]]] = (entry["start"], entry["end"])
    return windows


@pytest.mark.parametrize("asynchronous", [True, False])
def test_async_starts_new_offspring_while_slow_evaluations_run(tmp_path, asynchronous):
    out, log = tmp_path / "run", tmp_path / "evaluations.jsonl"
    argv = ["run", "--fitness", TIMED, "--fitness-opt", "low=0.02", "--fitness-opt", "high=0.4",
            "--fitness-opt", f"log={str(log)!r}", "--operator", JITTER_SPEC, "--pop", "4", "--gens", "3",
            "--workers", "2", "--out", str(out), "--quiet", "--race-seeds", "0", "--validate-top", "0"]
    assert main(argv + (["--async"] if asynchronous else [])) == 0
    store = RunStore.open(out)
    candidates = {c.id: c for c in store.candidates()}
    assert len(candidates) == 4 + 4 * 3
    rows = sqlite3.connect(out / "run.sqlite").execute(
        "SELECT candidate_id, count(*) FROM evaluations WHERE eval_seed IS NULL GROUP BY candidate_id").fetchall()
    assert len(rows) == len(candidates) and all(n == 1 for _, n in rows)
    generations = store.generations()
    assert [g["generation"] for g in generations] == [0, 1, 2, 3]
    windows = evaluation_windows(store, log)
    # A later generation's candidate started while an earlier one was still being evaluated:
    # impossible with a barrier between generations.
    overlaps = [(a, b) for a in windows for b in windows
                if candidates[b].generation > candidates[a].generation and windows[b][0] < windows[a][1] - 0.01]
    assert bool(overlaps) is asynchronous
    if asynchronous:
        members = [set(g["state"]["members"]) for g in generations]
        assert set().union(*members) == set(candidates) and sum(map(len, members)) == len(candidates)
        assert [len(m) for m in members] == [4, 4, 4, 4]


@pytest.mark.parametrize("asynchronous", [True, False])
def test_max_evals_caps_the_candidates_made(tmp_path, asynchronous):
    out = tmp_path / "run"
    argv = ["run", "--fitness", TIMED, "--operator", JITTER_SPEC, "--pop", "4", "--gens", "10", "--max-evals", "7",
            "--executor", "serial", "--out", str(out), "--quiet"] + (["--async"] if asynchronous else [])
    assert main(argv) == 0
    store = RunStore.open(out)
    assert len(store.candidates()) == 7
    assert len(list(store.evaluations())) == 7


def test_async_ladder_promotes_by_rank_among_scores_so_far(tmp_path):
    config = RunConfig(fitness=[TIMED, TIMED], operator=JITTER_SPEC, executor="serial", out=str(tmp_path / "run"),
                       pop=4, gens=4, promote=0.25, asynchronous=True, promote_baseline=False)
    store = RunStore.create(config.out, config.to_dict())
    options = [{}, {"offset": 10.0}]
    engine = Engine(config, [load_fitness(TIMED, o) for o in options], [load_operator(JITTER_SPEC)], store)
    engine.run(SerialExecutor([(TIMED, o) for o in options]))
    cheap = {r.candidate_id: r for _, r in store.evaluations(engine.labels[0])}
    dear = {r.candidate_id: r for _, r in store.evaluations(engine.labels[1])}
    ok = [cid for cid, r in cheap.items() if r.ok]
    assert len(cheap) == len(store.candidates()) == 4 + 4 * 4
    assert set(dear) <= set(ok) and dear
    # Serially, each promotion is decided from exactly the first-stage scores recorded before
    # it: the candidate ranked in their top floor(0.25 n).
    seen: dict[int, float] = {}
    for name, result in store.evaluations():
        if name == engine.labels[0]:
            if result.ok:
                seen[result.candidate_id] = result.fitness
            continue
        ranked = sorted(seen, key=lambda cid: (-seen[cid], cid))
        assert result.candidate_id in ranked[:math.floor(0.25 * len(ranked))]
    assert max(ok, key=lambda cid: (cheap[cid].fitness, -cid)) in dear  # the best is promoted by the end
    best, score = engine.best()
    assert best.id in dear and score == dear[best.id].fitness


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [False, True])
def test_driver_killed_mid_ladder_resumes_without_repeating_evaluations(tmp_path, capsys, asynchronous):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "engine", "run", "--fitness", f"{TIMED}>{TIMED}",
               "--fitness-opt", f"{TIMED}@0.low=0.1", "--fitness-opt", f"{TIMED}@0.high=0.4",
               "--fitness-opt", "offset=5.0", "--fitness-opt", "low=0.3", "--fitness-opt", "high=0.6",
               "--operator", JITTER_SPEC, "--pop", "4", "--gens", "3", "--promote", "0.5", "--workers", "2",
               "--no-promote-baseline",
               "--out", str(out), "--quiet"] + (["--async"] if asynchronous else [])
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_evaluations(out, 8)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    db = sqlite3.connect(out / "run.sqlite")
    before = db.execute("SELECT candidate_id, fitness_name, fitness FROM evaluations WHERE eval_seed IS NULL").fetchall()
    assert len(before) >= 8

    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    twice = db.execute("SELECT candidate_id, fitness_name FROM evaluations GROUP BY candidate_id, fitness_name, "
                       "eval_seed HAVING count(*) > 1").fetchall()
    assert twice == []
    after = {(cid, name): fitness for cid, name, fitness in
             db.execute("SELECT candidate_id, fitness_name, fitness FROM evaluations WHERE eval_seed IS NULL")}
    assert all(after[(cid, name)] == fitness for cid, name, fitness in before)
    store = RunStore.open(out)
    assert len(store.candidates()) == 4 + 4 * 3
    cheap = {r.candidate_id: r for _, r in store.evaluations("timed-regression@0")}
    dear = {r.candidate_id: r for _, r in store.evaluations("timed-regression@1")}
    assert len(cheap) == len(store.candidates())
    assert dear and set(dear) <= {cid for cid, r in cheap.items() if r.ok}
    if not asynchronous:  # the same candidates a run that was never killed promotes
        for generation in range(4):
            members = [c.id for c in store.candidates() if c.generation == generation]
            ranked = sorted((c for c in members if cheap[c].ok), key=lambda c: (-cheap[c].fitness, c))
            assert {c for c in members if c in dear} == set(ranked[:math.ceil(0.5 * len(ranked))])
    assert [g["generation"] for g in store.generations()] == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["drain", "cancel"])
def test_ctrl_c_drains_or_cancels_running_evaluations(tmp_path, capsys, mode):
    out, log = tmp_path / "run", tmp_path / "evaluations.jsonl"
    command = [sys.executable, "-m", "engine", "run", "--fitness", TIMED, "--fitness-opt", "low=1.5",
               "--fitness-opt", "high=2.0", "--fitness-opt", f"log={str(log)!r}", "--operator", JITTER_SPEC,
               "--pop", "4", "--gens", "3", "--workers", "2", "--async", "--interrupt", mode, "--out", str(out),
               "--race-seeds", "0", "--validate-top", "0"]  # Ctrl-C is what is tested: no re-measuring, no validation
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_evaluations(out, 2)
    time.sleep(0.3)  # both workers are busy with their next evaluations
    at_signal = evaluations_so_far(out)
    signalled = time.time()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    waited = time.time() - signalled
    assert process.returncode == 130
    assert "continue with python -m engine run --resume" in err
    saved = evaluations_so_far(out)
    finished = len(log.read_text().splitlines())
    assert saved == finished  # nothing that finished was lost, nothing was recorded unfinished
    if mode == "drain":
        assert "letting the running evaluations finish" in err
        assert saved == at_signal + 2 and waited >= 0.9
    else:
        assert saved == at_signal  # the running ones were stopped, not waited for
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert evaluations_so_far(out) == 4 + 4 * 3


def test_async_overlaps_slow_operator_calls_with_evaluations(tmp_path):
    log = tmp_path / "evaluations.jsonl"
    spec = f"{FIXTURES / 'jitter.py'}:SlowJitterOperator"
    config = RunConfig(fitness=TIMED, fitness_options={"low": 0.2, "high": 0.2, "log": str(log)}, operator=spec,
                       executor="serial", out=str(tmp_path / "run"), pop=4, gens=2, workers=2, asynchronous=True)
    store = RunStore.create(config.out, config.to_dict())
    operator = load_operator(spec)
    engine = Engine(config, load_fitness(TIMED, config.fitness_options), [operator], store)
    engine.run(SerialExecutor(TIMED, config.fitness_options))
    assert len(store.candidates()) == 4 + 4 * 2
    evaluations = [json.loads(line) for line in log.read_text().splitlines()]
    overlapping = [(a, b) for a, b in operator.calls for e in evaluations if a < e["end"] - 0.05 and e["start"] < b - 0.05]
    assert overlapping, "operator calls should run while evaluations do"
    assert any(b1 > a2 for (a1, b1), (a2, b2) in zip(operator.calls, operator.calls[1:]))  # calls run concurrently


def test_async_run_goes_on_through_failing_operators(tmp_path):
    spec = f"{FIXTURES / 'jitter.py'}:FlakyOperator"
    config = RunConfig(fitness=TIMED, operator=spec, executor="serial", out=str(tmp_path / "run"), pop=4, gens=3,
                       asynchronous=True)
    store = RunStore.create(config.out, config.to_dict())
    engine = Engine(config, load_fitness(TIMED), [load_operator(spec)], store)
    engine.run(SerialExecutor(TIMED))
    results = [r for _, r in store.evaluations()]
    assert len(store.candidates()) == 4 + 4 * 3 == len(results)
    assert engine.counters["operator_failures"] > 0
    assert any(r.status == "invalid" for r in results) and any(r.ok for r in results)


def test_async_run_stops_making_offspring_when_nothing_new_comes(tmp_path):
    spec = f"{FIXTURES / 'jitter.py'}:ConstantOperator"
    config = RunConfig(fitness=TIMED, operator=spec, executor="serial", out=str(tmp_path / "run"), pop=4, gens=3,
                       asynchronous=True, max_attempts=3, workers=1)
    store = RunStore.create(config.out, config.to_dict())
    engine = Engine(config, load_fitness(TIMED), [load_operator(spec)], store)
    with pytest.warns(RuntimeWarning, match="no new valid genome after 3 attempts"):
        engine.run(SerialExecutor(TIMED))
    assert len(store.candidates()) == len(list(store.evaluations())) < 4 + 4 * 3
    assert store.generations()  # what was scored is closed into a generation and saved


def test_async_ladder_takes_the_baseline_up_as_a_reference(tmp_path):
    config = RunConfig(fitness=[TIMED, TIMED], operator=JITTER_SPEC, executor="serial", out=str(tmp_path / "run"),
                       pop=4, gens=1, promote=0.25, asynchronous=True)
    store = RunStore.create(config.out, config.to_dict())
    engine = Engine(config, [load_fitness(TIMED)] * 2, [load_operator(JITTER_SPEC)], store)
    engine.run(SerialExecutor([(TIMED, {}), (TIMED, {})]))
    mse = next(c.id for c in store.candidates() if c.name == "mse")
    assert mse in {r.candidate_id for _, r in store.evaluations(engine.labels[1])}
