"""Run store, MAP-Elites grid and the atomic elite archive."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from archives.elites import read_elites, write_elites
from archives.grid import MapElitesArchive
from archives.store import RunStore, StoreError
from engine.candidate import Candidate, EvalResult
from fitness.base import Descriptor
from tests.conftest import ROOT

SPACE = [Descriptor("a", 0.0, 1.0, 4), Descriptor("b", -1.0, 1.0, 2)]


def test_grid_keeps_the_best_per_cell():
    archive = MapElitesArchive(SPACE, fitness_floor=-1.0)
    assert archive.add(0, 0.5, {"a": 0.1, "b": -0.5}) == "new"
    assert archive.add(1, 0.4, {"a": 0.12, "b": -0.6}) == "not_added"
    assert archive.add(2, 0.7, {"a": 0.05, "b": -0.9}) == "improved"
    assert archive.add(3, 0.1, {"a": 0.9, "b": 0.9}) == "new"
    elites = archive.elites()
    assert [e.candidate_id for e in elites] == [2, 3]
    stats = archive.stats()
    assert stats["elites"] == 2 and stats["cells"] == 8
    assert stats["coverage"] == pytest.approx(2 / 8)
    assert stats["qd_score"] == pytest.approx((0.7 + 1) + (0.1 + 1))


def test_grid_clips_out_of_range_and_non_finite_descriptors():
    archive = MapElitesArchive(SPACE)
    archive.add(0, 1.0, {"a": 99.0, "b": math.nan})
    (elite,) = archive.elites()
    assert elite.cell == (3, 0)
    assert elite.descriptors == (1.0, -1.0)


def test_store_round_trip(tmp_path):
    store = RunStore.create(tmp_path, {"pop": 2})
    candidate = Candidate(0, "dpo", "def dpo(a, b):\n    return a\n", "seed", (), "seed", 0, "abc")
    store.add_candidates([candidate])
    store.add_evaluation(EvalResult(0, "ok", 0.5, {"kl": 0.1}, {"a": 0.2}, "fp", None, 1.5), "task")
    store.finish_generation(0, {"gen": 0}, {"rng": [1, 2]})
    store.close()
    reopened = RunStore.open(tmp_path, readonly=True)
    assert reopened.candidates() == [candidate]
    ((name, result),) = list(reopened.evaluations())
    assert name == "task" and result.fitness == 0.5 and result.metrics == {"kl": 0.1}
    assert reopened.meta("config") == {"pop": 2}
    assert reopened.generations()[0]["state"] == {"rng": [1, 2]}


def test_store_from_another_version_is_refused(tmp_path):
    store = RunStore.create(tmp_path, {})
    store.set_meta("version", 99)
    store.close()
    with pytest.raises(StoreError, match="format version 99"):
        RunStore.open(tmp_path)


def test_store_of_another_format_is_refused(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "run.sqlite")
    db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('format', '\"other\"')")
    db.commit()
    with pytest.raises(StoreError, match="not an evoloss run store"):
        RunStore.open(tmp_path)


def test_elite_archive_round_trip(tmp_path):
    write_elites(tmp_path, [{"id": 1, "fitness": 0.2}, {"id": 2, "fitness": 0.9}], {"generation": 3})
    assert [e["id"] for e in read_elites(tmp_path)] == [2, 1]
    data = json.loads((tmp_path / "archive.json").read_text())
    assert data["summary"]["1"]["generation"] == 3


WRITER = """
import sys
from archives.elites import write_elites
elites = [{"id": i, "fitness": i / 100, "code": "x" * 4000} for i in range(300)]
print("ready", flush=True)
while True:
    write_elites(sys.argv[1], elites, {"generation": 1})
"""


@pytest.mark.slow
def test_elite_archive_survives_sigkill_mid_write(tmp_path):
    write_elites(tmp_path, [{"id": 0, "fitness": 0.0}], {"generation": 0})
    for attempt in range(8):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE)
        process.stdout.readline()
        time.sleep(0.05 + 0.037 * attempt)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        elites = read_elites(tmp_path)  # parses: never a half-written file
        assert len(elites) in (1, 300)
