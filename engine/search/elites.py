"""The elites: one MAP-Elites grid per fidelity stage, the hall of fame, parent selection (DEAP
tournaments over the elites) and the archive context operators are shown (the best and the
most diverse elites, the paper's in-context history)."""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator

from deap import base, tools

from archives.elites import write_elites
from archives.grid import CODE_SIZE, MapElitesArchive, code_size_axis
from engine.candidate import Candidate
from engine.genome import code_size
from operators.base import Context, Elite


class _MaxFitness(base.Fitness):
    # (fidelity level, score): DEAP compares fitness values lexicographically, so a candidate
    # scored on a more expensive stage of a fidelity ladder ranks above any scored only on a
    # cheaper one, and scores are compared within a stage. Without a ladder the level is 0.
    weights = (1.0, 1.0)


class Individual:
    """A scored candidate in DEAP's terms (selection, hall of fame, statistics)."""

    __slots__ = ("candidate", "fitness")

    def __init__(self, candidate: Candidate, value: float, level: int = 0) -> None:
        self.candidate = candidate
        self.fitness = _MaxFitness((float(level), value))

    @property
    def score(self) -> float:
        return self.fitness.values[1]

    @property
    def level(self) -> int:
        return int(self.fitness.values[0])


@contextmanager
def seeded_global_random(rng: random.Random) -> Iterator[None]:
    """DEAP's selection functions draw from the global ``random`` module. Run them on a state
    derived from the run's own generator, then restore the global state, so a run is
    reproducible and touches no one else's randomness."""
    saved = random.getstate()
    random.seed(rng.getrandbits(64))
    try:
        yield
    finally:
        random.setstate(saved)


@dataclass(frozen=True)
class EliteSettings:
    """What the elites read of the run's settings (fields of :class:`engine.config.RunConfig`)."""

    hof_size: int = 10
    tournament_size: int = 3
    context_best: int = 5
    context_diverse: int = 3
    code_size_bins: int = 4
    selection: str = "archive"
    pop: int = 8


class ElitePool:
    """Per-stage MAP-Elites grids and the hall of fame over a :class:`Population`.

    Args:
        settings: Selection and context sizes, the code-size axis.
        stages: The fitness plug-ins, cheapest first (their descriptor spaces and floors).
        population: Where candidates and results are read.
        labels: Each stage's name in the store.
    """

    def __init__(self, settings: EliteSettings, stages: list, population, labels: list[str],
                 objective: Callable[[int, int], float] | None = None) -> None:
        self.settings = settings
        self.population = population
        self.labels = list(labels)
        self.spaces = [self.space_of(stage) for stage in stages]
        self.floors = [stage.fitness_floor for stage in stages]
        #: What a candidate is ranked by on a stage: ``objective(candidate id, stage)``; by default
        #: its score there (noise-aware runs rank by a lower confidence bound instead).
        self.objective = objective or (lambda cid, stage: self.population.stage_results[stage][cid].fitness)
        self._sizes: dict[int, float] = {}
        self._empty()

    def _empty(self) -> None:
        self.archives = [MapElitesArchive(space, fitness_floor=floor) for space, floor in zip(self.spaces, self.floors)]
        self.hall_of_fame = tools.HallOfFame(self.settings.hof_size,
                                             similar=lambda a, b: a.candidate.id == b.candidate.id)

    def space_of(self, stage) -> list:
        """A stage's grid axes: the plug-in's descriptors plus the generic code-size axis."""
        space = list(stage.descriptor_space)
        if self.settings.code_size_bins:
            space.append(code_size_axis(self.settings.code_size_bins))
        if not space:
            space.append(code_size_axis(1))
        return space

    @property
    def ladder(self) -> bool:
        return len(self.archives) > 1

    @property
    def archive(self) -> MapElitesArchive:
        """The most expensive stage's grid."""
        return self.archives[-1]

    # -- updating -------------------------------------------------------------------------------
    def absorb(self, members: list[Candidate]) -> None:
        """Put finished candidates' successful results into each stage's grid, and each
        candidate, at the highest stage it reached, into the hall of fame."""
        members = sorted(members, key=lambda c: c.id)
        for stage, archive in enumerate(self.archives):
            entries = []
            for candidate in members:
                result = self.population.stage_results[stage].get(candidate.id)
                if result is not None and result.ok:
                    descriptors = {**result.descriptors, CODE_SIZE: self._size(candidate)}
                    entries.append((candidate.id, self.objective(candidate.id, stage), descriptors))
            # In id order within one batch: pyribs keeps the first of equal objectives in a cell,
            # as adding them one by one would.
            archive.add_many(entries)
        scored = []
        for candidate in members:
            top = self.population.top(candidate.id)
            if top is not None:
                scored.append(Individual(candidate, self.objective(candidate.id, top[0]), top[0]))
        if scored:
            known = {ind.candidate.id for ind in scored}
            # A candidate promoted since it entered keeps one entry, at its new level.
            for index in reversed(range(len(self.hall_of_fame))):
                if self.hall_of_fame[index].candidate.id in known:
                    self.hall_of_fame.remove(index)
            self.hall_of_fame.update(scored)

    def rebuild(self) -> None:
        """Rebuild the grids and the hall of fame from every scored candidate (when what they are
        ranked by changed: a re-measured candidate's bound moved)."""
        self._empty()
        self.absorb(list(self.population.candidates.values()))

    def _size(self, candidate: Candidate) -> float:
        if candidate.id not in self._sizes:
            self._sizes[candidate.id] = float(code_size(candidate.code))
        return self._sizes[candidate.id]

    # -- choosing parents -----------------------------------------------------------------------
    def parents(self) -> list[Individual]:
        """The parent pool. ``archive`` (the default): every stage's elites, each candidate once,
        at the highest stage it reached (a candidate promoted but beaten in its cell there is no
        longer a parent). ``truncation``: the ``pop`` best scored candidates, the most expensive
        stage first, no grid. ``random`` (an ablation): every scored candidate, fitness unused.
        Over three draws of pref-suite the first two tie on held-out gain (docs/trust.md)."""
        if self.settings.selection != "archive":
            scored = []
            for cid, candidate in self.population.candidates.items():
                top = self.population.top(cid)
                if top is not None:
                    scored.append(Individual(candidate, self.objective(cid, top[0]), top[0]))
            if self.settings.selection == "truncation":
                scored.sort(key=lambda ind: (-ind.level, -ind.score, ind.candidate.id))
                return scored[:self.settings.pop]
            return scored
        pool, seen = [], set()
        for level in reversed(range(len(self.archives))):
            for elite in self.archives[level].elites():
                cid = elite.candidate_id
                if cid in seen or (level < len(self.archives) - 1 and self.population.top(cid)[0] > level):
                    continue
                seen.add(cid)
                pool.append(Individual(self.population.candidates[cid], elite.fitness, level))
        return pool

    def select(self, pool: list[Individual], k: int, rng: random.Random) -> list[Candidate]:
        """``k`` parents by DEAP tournament (two distinct ones for a crossover)."""
        size = self.settings.tournament_size
        if self.settings.selection != "archive":  # uniform over the pool: no fitness pressure beyond it
            chosen = rng.sample(pool, min(k, len(pool)))
            return [ind.candidate for ind in chosen]
        with seeded_global_random(rng):
            if k == 2 and len(pool) >= 2:
                first = tools.selTournament(pool, 1, tournsize=size)[0]
                rest = [e for e in pool if e is not first]
                second = tools.selTournament(rest, 1, tournsize=size)[0]
                return [first.candidate, second.candidate]
            chosen = tools.selTournament(pool, k, tournsize=size)
        return [c.candidate for c in chosen]

    # -- views ----------------------------------------------------------------------------------
    def best(self) -> tuple[Candidate, float] | None:
        if not len(self.hall_of_fame):
            return None
        top = self.hall_of_fame[0]
        return top.candidate, top.score

    def reached(self) -> tuple[int, MapElitesArchive]:
        """The most expensive stage whose grid holds anything (stage 0 when none does)."""
        for level in reversed(range(len(self.archives))):
            if len(self.archives[level].elites()):
                return level, self.archives[level]
        return 0, self.archives[0]

    def elite(self, candidate_id: int, fitness: float, level: int = 0) -> Elite:
        metrics = self.population.stage_results[level][candidate_id].metrics
        if self.ladder:
            metrics = {**metrics, "fidelity": self.labels[level]}
        return Elite(self.population.candidates[candidate_id], fitness, metrics)

    def context(self, interface, rng: random.Random, errors: list, generation: int, sequential: bool = False,
                n_best: int | None = None, n_diverse: int | None = None) -> Context:
        """What operators see: the best elites, elites from distant cells, recent failures (and,
        for the sequential strategy, the whole history)."""
        n_best = self.settings.context_best if n_best is None else n_best
        n_diverse = self.settings.context_diverse if n_diverse is None else n_diverse
        level, archive = self.reached()
        elites = archive.elites()
        best = [self.elite(ind.candidate.id, ind.score, ind.level) for ind in self.parents()[:n_best]]
        diverse: list[Elite] = []
        chosen = list(elites[:1])
        rest = list(elites[1:])
        while rest and len(diverse) < n_diverse:
            # Greedy farthest-point choice over grid cells: elites unlike those already shown.
            far = max(rest, key=lambda e: min(sum((a - b) ** 2 for a, b in zip(e.cell, c.cell)) for c in chosen))
            rest.remove(far)
            chosen.append(far)
            diverse.append(self.elite(far.candidate_id, far.fitness, level))
        population = self.population
        history = []
        if sequential:
            history = [(population.candidates[cid], population.results[cid]) for cid in sorted(population.candidates)
                       if cid in population.results]
        scores = {cid: r.fitness for cid, r in population.results.items() if r.ok}
        return Context(interface=interface, rng=rng, best=best, diverse=diverse, errors=list(errors),
                       generation=generation, history=history, scores=scores)

    def records(self) -> list[dict[str, Any]]:
        """The elites of the most expensive stage reached (with a ladder, ``fidelity`` names it)."""
        level, archive = self.reached()
        records = []
        for elite in archive.elites():
            candidate = self.population.candidates[elite.candidate_id]
            records.append({
                "id": candidate.id, "name": candidate.name, "fitness": elite.fitness, "cell": list(elite.cell),
                "descriptors": dict(zip(archive.names, elite.descriptors)), "operator": candidate.label,
                "generation": candidate.generation, "parents": list(candidate.parents), "thought": candidate.thought,
                "code": candidate.code, **({"fidelity": self.labels[level]} if self.ladder else {}),
            })
        return records

    def write(self, run_dir, generation: int, confirmed: bool = False) -> None:
        """Rewrite the elite archive (``archive.json``) atomically (``confirmed``: after the
        run's last generation, re-ranked by its confirmation seeds)."""
        best = self.best()
        level, archive = self.reached()
        write_elites(run_dir, self.records(), {
            "generation": generation, **({"confirmed": True} if confirmed else {}), "fitness": self.labels[level],
            "best_id": best[0].id if best else None, "best_fitness": best[1] if best else None,
            **({"fidelity_ladder": self.labels} if self.ladder else {}),
            **archive.stats(),
        })
