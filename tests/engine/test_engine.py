"""The ask/tell engine: order guard, dedup, operator failures, resume."""
import sqlite3
import statistics

import pytest

from archives.store import RunStore
from engine.config import RunConfig
from engine.engine import Engine
from engine.executor import SerialExecutor
from engine.plugins import load_fitness, load_operator
from tests.conftest import EXAMPLE_SPEC, FIXTURES, JITTER_SPEC


def make_engine(tmp_path, operator=JITTER_SPEC, name="run", **settings):
    config = RunConfig(fitness=EXAMPLE_SPEC, operator=operator, executor="serial", out=str(tmp_path / name),
                       **{"pop": 4, "gens": 2, **settings})
    store = RunStore.create(config.out, config.to_dict())
    fitness = load_fitness(config.fitness)
    return Engine(config, fitness, [load_operator(operator)], store), store


def test_tell_without_ask_raises(tmp_path):
    engine, _ = make_engine(tmp_path)
    with pytest.raises(RuntimeError, match="tell\\(\\) was called without calling ask\\(\\)"):
        engine.tell([])


def test_ask_twice_without_tell_raises(tmp_path):
    engine, _ = make_engine(tmp_path)
    engine.ask()
    with pytest.raises(RuntimeError, match="ask\\(\\) was called twice"):
        engine.ask()


def test_first_population_is_seeds_plus_offspring(tmp_path):
    engine, _ = make_engine(tmp_path, pop=5)
    batch = engine.ask()
    assert [c.operator for c in batch[:2]] == ["seed", "seed"]
    assert [c.name for c in batch[:2]] == ["mse", "mae"]
    assert len(batch) == 5 and all(c.label == "jitter:mutate" for c in batch[2:])
    assert all(c.parents and c.parents[0] in (0, 1) for c in batch[2:])


def test_run_fills_archive_and_store(tmp_path):
    engine, store = make_engine(tmp_path)
    engine.run(SerialExecutor(EXAMPLE_SPEC))
    assert engine.generation == 3
    assert len(store.generations()) == 3
    evaluations = list(store.evaluations())
    assert len(evaluations) == len(store.candidates()) == 2 + 2 + 4 + 4
    assert engine.archive.stats()["elites"] >= 1
    assert (tmp_path / "run" / "archive.json").exists()
    later = [c for c in store.candidates() if c.generation > 0]
    assert all(c.parents or c.variation == "propose" for c in later)


def test_known_genome_is_never_evaluated_twice(tmp_path):
    engine, store = make_engine(tmp_path, operator=f"{FIXTURES / 'jitter.py'}:ConstantOperator", max_attempts=3)
    with pytest.warns(RuntimeWarning, match="no new valid genome"):
        engine.run(SerialExecutor(EXAMPLE_SPEC))
    codes = [c.code for c in store.candidates()]
    assert len(codes) == 3  # two seeds and one offspring, whatever the operator repeats
    assert engine.counters["hash_duplicates"] >= 3
    assert len(list(store.evaluations())) == 3


def test_operator_failures_and_invalid_offspring_are_recorded(tmp_path):
    engine, store = make_engine(tmp_path, operator=f"{FIXTURES / 'jitter.py'}:FlakyOperator")
    engine.run(SerialExecutor(EXAMPLE_SPEC))
    statuses = [r.status for _, r in store.evaluations()]
    assert "invalid" in statuses and "ok" in statuses
    assert engine.counters["operator_failures"] >= 1
    assert any("operator backend unavailable" in message for _, message in engine.errors) or engine.counters[
        "operator_failures"]


class StopAfter:
    """An executor that is 'killed' (KeyboardInterrupt) after n results."""

    def __init__(self, inner, n):
        self.inner, self.n, self.seen = inner, n, 0

    def run(self, tasks, seed, decide, on_result):
        def counted(result):
            on_result(result)
            self.seen += 1
            if self.seen >= self.n:
                raise KeyboardInterrupt

        self.inner.run(tasks, seed, decide, counted)


@pytest.mark.parametrize("stop_after", [7, 12, 17, 22])
def test_resume_continues_exactly_where_the_run_stopped(tmp_path, stop_after):
    # Killed in generation 0, and in later generations, each first scored on a seed of its own
    # (the baseline measured on it after the generation's first scores).
    reference, reference_store = make_engine(tmp_path, name="straight", gens=3)
    reference.run(SerialExecutor(EXAMPLE_SPEC))

    interrupted, store = make_engine(tmp_path, name="killed", gens=3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(StopAfter(SerialExecutor(EXAMPLE_SPEC), stop_after))
    store.close()

    config = RunConfig(**RunStore.open(tmp_path / "killed").meta("config"))
    store = RunStore.open(tmp_path / "killed")
    resumed = Engine(config, load_fitness(EXAMPLE_SPEC), [load_operator(JITTER_SPEC)], store)
    resumed.restore()
    assert len(resumed.results) + len(store.seed_evaluations()) == stop_after  # first scores and re-measurements
    resumed.run(SerialExecutor(EXAMPLE_SPEC))
    assert resumed.racing.samples == reference.racing.samples  # every (candidate, seed) score, as straight

    rows = sqlite3.connect(tmp_path / "killed" / "run.sqlite").execute(
        "SELECT candidate_id, count(*) FROM evaluations GROUP BY candidate_id, fitness_name, eval_seed HAVING count(*) > 1").fetchall()
    assert rows == []  # nothing evaluated twice
    straight = [(c.code_hash, c.generation) for c in reference_store.candidates()]
    assert [(c.code_hash, c.generation) for c in store.candidates()] == straight
    assert resumed.best()[1] == reference.best()[1]


def test_offspring_and_parents_scored_on_other_seeds_are_compared_through_the_baseline(tmp_path):
    engine, _ = make_engine(tmp_path, gens=2)
    engine.run(SerialExecutor(EXAMPLE_SPEC))
    base = engine.racing.samples[engine._baseline_seed()]
    children = [c for c in engine.candidates.values() if c.generation == 2 and engine.results[c.id].ok
                and engine.racing.seeds_of(c.id) == 1]
    assert children
    for child in children:
        (seed, score), = engine.racing.samples[child.id].items()
        assert seed != engine.config.eval_seed and seed in base  # its generation's seed, the baseline on it
        assert engine._paired_score(child.id) == pytest.approx(statistics.fmean(base.values()) + score - base[seed])
        parents = [engine._paired_score(p) for p in child.parents]
        credit = engine.breeder.reward(child, engine.results[child.id], None, engine._paired_score)
        assert credit == (1.0 if engine._paired_score(child.id) > max(parents) else 0.5)
