"""The judge phase: ``Fitness.judge`` runs in the driver, outside the worker's jail, on what the
trusted ``score`` handed it (``Score.to_judge``), through every executor and the command line."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine import jail
from engine.evaluation import run_candidate
from engine.executor import ProcessExecutor, SerialExecutor
from engine.judging import Judging
from tests.fitness.judge_server import JudgeServer
from tests.fixtures.judged import JudgedRegression

ROOT = Path(__file__).resolve().parents[2]
SPEC = f"{ROOT / 'tests' / 'fixtures' / 'judged.py'}:JudgedRegression"
MSE = "def mse(pred, target):\n    return (pred - target) ** 2\n"
MAE = "def mae(pred, target):\n    return (pred - target).abs()\n"


def doubled(request: dict) -> tuple[int, str]:
    """The judge: twice the trusted value, plus one."""
    payload = json.loads(request["messages"][-1]["content"])
    return 200, repr(2 * payload["value"] + 1)


def test_in_process_the_judge_finishes_the_score():
    with JudgeServer(doubled) as server:
        result = run_candidate(JudgedRegression(url=server.url), 0, MSE, seed=3)
    assert result.ok and result.judge is None
    assert result.fitness == pytest.approx(2 * result.metrics["trusted_fitness"] + 1)
    assert result.metrics["judged_seed"] == 3 and "judge_seconds" in result.metrics
    assert len(server.requests) == 1


def test_a_failing_judge_is_a_recorded_error():
    result = run_candidate(JudgedRegression(url="http://127.0.0.1:9/v1", fail=True), 0, MSE, seed=0)
    assert result.status == "error" and "the judge phase failed" in result.error and "judge is down" in result.error


def test_process_workers_score_in_the_jail_and_the_driver_judges(tmp_path):
    with JudgeServer(doubled) as server:
        options = {"url": server.url}
        executor = Judging(ProcessExecutor(SPEC, options, workers=2, timeout=60, log_path=tmp_path / "w.log"),
                           SPEC, options)
        results = []
        with executor:
            executor.run([(1, MSE), (2, MAE), (3, MSE, 0, 7)], 0, None, results.append)
        sandbox = executor.sandbox
    assert sorted(r.candidate_id for r in results) == [1, 2, 3]
    for result in results:
        assert result.ok and result.judge is None, result.error
        assert result.fitness == pytest.approx(2 * result.metrics["trusted_fitness"] + 1)
        assert result.metrics["judge_pid"] == os.getpid()  # judged here, in the driver
        assert result.metrics["score_pid"] != os.getpid()  # scored in a worker
        if sandbox.jailed:
            # The jail has no network: the trusted phase could not reach the judge, the driver could.
            assert result.metrics["score_reached_judge"] is False
    assert {r.metrics["judged_seed"] for r in results} == {0, 7}
    assert len(server.requests) == 3


def test_a_failing_judge_in_the_driver_does_not_stop_the_others(tmp_path):
    options = {"url": "http://127.0.0.1:9/v1", "fail": True}
    executor = Judging(SerialExecutor(SPEC, options), SPEC, options)
    results = []
    with executor:
        executor.run([(1, MSE), (2, MAE)], 0, None, results.append)
    assert [r.status for r in results] == ["error", "error"]
    assert all("judge is down" in r.error for r in results)


@pytest.mark.skipif(not jail.choose("auto").jailed, reason="needs an OS jail (bubblewrap or unshare)")
def test_a_run_stores_the_judged_fitness_without_the_host_network(tmp_path):
    with JudgeServer(doubled) as server:
        out = tmp_path / "run"
        command = [sys.executable, "-m", "engine", "run", "--fitness", SPEC, "--fitness-opt", f"url={server.url}",
                   "--pop", "3", "--gens", "1", "--workers", "2", "--quiet", "--out", str(out),
                   "--validate-top", "0", "--race-seeds", "0"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    rows = sqlite3.connect(out / "run.sqlite").execute(
        "SELECT fitness, metrics FROM evaluations WHERE status = 'ok'").fetchall()
    assert rows and len(server.requests) == len(rows)
    for fitness, metrics in rows:
        metrics = json.loads(metrics)
        assert fitness == pytest.approx(2 * metrics["trusted_fitness"] + 1)
        assert metrics["score_reached_judge"] is False
