"""Where parents come from: archive (the default) draws from the MAP-Elites elites, truncation
from the --pop best by the run's objective (with racing, a lower confidence bound), random from
every scored candidate."""
import random
from types import SimpleNamespace

from archives.grid import GridAxis
from engine.candidate import Candidate, EvalResult
from engine.config import RunConfig
from engine.search.elites import ElitePool, EliteSettings


def _code(i: int) -> str:
    return f"def loss_{i}(self, x):\n    return x.mean() * {i + 1}\n"


class _Population:
    """The part of the population the elites read: candidates and first-stage results."""

    def __init__(self, n: int, scores, descriptors):
        self.candidates = {i: Candidate(i, f"loss_{i}", _code(i), generation=0) for i in range(n)}
        self.stage_results = [{i: EvalResult(i, "ok", fitness=scores(i), descriptors=descriptors(i)) for i in range(n)}]
        self.stage_results[0][n - 1] = EvalResult(n - 1, "error", error="raised")  # never a parent

    def top(self, cid):
        result = self.stage_results[0].get(cid)
        return (0, result) if result is not None and result.ok else None


def _pool(selection: str, pop: int = 4, n: int = 20):
    stage = SimpleNamespace(descriptor_space=[GridAxis("d", 0.0, 1.0, 2)], fitness_floor=-1.0)
    # Raw scores rise with the id; the objective (a bound) ranks the other way round, so a pool
    # built on raw scores would be told apart from one built on the objective.
    population = _Population(n, scores=lambda i: i / n, descriptors=lambda i: {"d": (i % 2) * 0.9})
    pool = ElitePool(EliteSettings(selection=selection, pop=pop, code_size_bins=0), [stage], population,
                     ["synthetic-pref"], objective=lambda cid, stage: -cid)
    pool.absorb(list(population.candidates.values()))
    return pool


def test_truncation_draws_from_the_pop_best_by_the_objective():
    pool = _pool("truncation")
    parents = pool.parents()
    assert [ind.candidate.id for ind in parents] == [0, 1, 2, 3]
    rng = random.Random(0)
    drawn = {c.id for _ in range(200) for c in pool.select(parents, 2, rng)}
    assert drawn == {0, 1, 2, 3}
    pair = pool.select(parents, 2, rng)
    assert pair[0].id != pair[1].id  # a crossover gets two distinct parents


def test_archive_selection_is_the_default_and_draws_from_the_grid_elites_only():
    assert RunConfig().selection == "archive" and EliteSettings().selection == "archive"
    pool = _pool("archive")
    # Two cells (even and odd ids); the objective puts the lowest id of each first.
    assert sorted(ind.candidate.id for ind in pool.parents()) == [0, 1]


def test_random_selection_draws_from_every_scored_candidate():
    pool = _pool("random")
    ids = {ind.candidate.id for ind in pool.parents()}
    assert ids == set(range(19))  # not the one that failed
    drawn = {c.id for _ in range(400) for c in pool.select(pool.parents(), 1, random.Random(_))}
    assert len(drawn) > 12  # spread over the pool, not the best few
