"""Run stores written before the operator and its variation were separate fields still open:
read-only they are read as they are, opened for writing they are migrated in place."""
import json
import sqlite3

from archives.store import VERSION, RunStore
from engine.candidate import Candidate, EvalResult, Status, Variation


def version_one_store(run_dir):
    """A store as format version 1 wrote it: ``operator`` held ``name:variation``."""
    store = RunStore.create(run_dir, {"fitness": "x"})
    store.add_evaluation(EvalResult(1, "ok", 0.5), "x")
    store.add_candidates([
        Candidate(0, "dpo", "def dpo(a):\n    return a\n", operator="seed"),
        Candidate(1, "m", "def m(a):\n    return a * 2\n", parents=(0,), operator="symbolic:mutate"),
        Candidate(2, "p", "def p(a):\n    return a * 3\n", operator="openai:gpt@http://127.0.0.1:8000/v1:propose"),
    ])
    store.close()
    db = sqlite3.connect(run_dir / "run.sqlite")
    db.executescript("""
        CREATE TABLE old AS SELECT id, name, code, thought, parents, operator, generation, code_hash, created FROM candidates;
        UPDATE old SET operator = operator || ':' || (SELECT variation FROM candidates c WHERE c.id = old.id)
            WHERE operator != 'seed';
        DROP TABLE candidates;
        ALTER TABLE old RENAME TO candidates;
        CREATE TABLE old_evaluations AS SELECT id, candidate_id, fitness_name, status, fitness, metrics, descriptors,
            fingerprint, error, seconds, duplicate_of, finished FROM evaluations;
        DROP TABLE evaluations;
        ALTER TABLE old_evaluations RENAME TO evaluations;
    """)
    db.execute("UPDATE meta SET value = '1' WHERE key = 'version'")
    db.commit()
    db.close()


def test_a_version_one_store_reads_with_split_fields_and_migrates_when_written(tmp_path):
    run = tmp_path / "run"
    version_one_store(run)
    readonly = RunStore.open(run, readonly=True)
    read = {c.id: c for c in readonly.candidates()}
    readonly_results = list(readonly.evaluations())
    assert readonly.seed_evaluations() == []
    readonly.close()
    assert (read[1].operator, read[1].variation, read[1].label) == ("symbolic", Variation.MUTATE, "symbolic:mutate")
    assert (read[2].operator, read[2].variation) == ("openai:gpt@http://127.0.0.1:8000/v1", Variation.PROPOSE)
    assert read[0].is_seed and read[0].label == "seed"
    assert [r.fitness for _, r in readonly_results] == [0.5]

    store = RunStore.open(run)
    store.add_evaluation(EvalResult(1, "ok", 0.7), "x", eval_seed=5)
    assert [r.fitness for _, r in store.evaluations()] == [0.5]
    assert [(name, seed, r.fitness) for name, seed, r in store.seed_evaluations()] == [("x", 5, 0.7)]
    store.close()
    db = sqlite3.connect(run / "run.sqlite")
    rows = db.execute("SELECT id, operator, variation FROM candidates ORDER BY id").fetchall()
    version = json.loads(db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])
    db.close()
    assert version == VERSION
    assert rows == [(0, "seed", "seed"), (1, "symbolic", "mutate"),
                    (2, "openai:gpt@http://127.0.0.1:8000/v1", "propose")]


def test_statuses_are_an_enum_that_reads_as_strings():
    assert Status("ok") is Status.OK and Status.OK == "ok" and json.dumps(Status.OOM) == '"oom"'
    assert Status.TIMEOUT.failed and not Status.DUPLICATE.failed and not Status.OK.failed
