"""The run store (SQLite): a round trip, and stores of another version or format refused."""
import pytest

from archives.store import RunStore, StoreError
from engine.candidate import Candidate, EvalResult


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
