"""The ask/tell engine: one loop for the CLI, the tests and any executor.

``ask()`` returns the next generation's candidates (the fitness plug-in's seeds plus operator
offspring first, then offspring of parents drawn from the MAP-Elites archive); ``tell()``
takes their results, updates the archive, hall of fame and logbook, and saves a checkpoint.
``run()`` is a short loop over the two. Every candidate and every evaluation is written to
the run store as it happens, so a run can be resumed from the store alone.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import random
import re
import warnings
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
from deap import base, tools

from archives.elites import write_elites
from archives.grid import MapElitesArchive
from archives.store import RunStore
from engine.candidate import Candidate, EvalResult
from engine.config import RunConfig
from engine.genome import GenomeError, check_genome, code_hash, normalise
from fitness.base import Descriptor
from operators.base import Context, Elite, Offspring, Operator

CODE_SIZE = "code_size"


class _MaxFitness(base.Fitness):
    weights = (1.0,)


class Individual:
    """A scored candidate in DEAP's terms (selection, hall of fame, statistics)."""

    __slots__ = ("candidate", "fitness")

    def __init__(self, candidate: Candidate, value: float) -> None:
        self.candidate = candidate
        self.fitness = _MaxFitness((value,))


@contextmanager
def _seeded_global_random(rng: random.Random) -> Iterator[None]:
    """DEAP's selection functions draw from the global ``random`` module. Run them on a state
    derived from the run's own generator, then restore the global state, so a run is
    reproducible and touches no one else's randomness."""
    saved = random.getstate()
    random.seed(rng.getrandbits(64))
    try:
        yield
    finally:
        random.setstate(saved)


def code_size(code: str) -> int:
    """Number of syntax nodes of the normalised genome (a generic complexity descriptor)."""
    return sum(1 for _ in ast.walk(ast.parse(normalise(code))))


def _identifier(name: str, fallback: str = "loss") -> str:
    name = re.sub(r"\W+", "_", str(name)).strip("_")[:48] or fallback
    return f"l_{name}" if name[0].isdigit() else name


class Engine:
    """Evolves loss functions with ask/tell.

    Args:
        config: The run's settings.
        fitness: The fitness plug-in (its seeds, interface and descriptor space are used here).
        operators: Operators making offspring; one is drawn per offspring.
        store: The run log; the engine writes every candidate and evaluation to it.
        on_event: Optional callback ``(kind, payload)`` for progress displays.
    """

    def __init__(self, config: RunConfig, fitness, operators: list[Operator], store: RunStore,
                 on_event: Callable[[str, Any], None] | None = None) -> None:
        if not operators:
            raise ValueError("the engine needs at least one operator")
        self.config = config
        self.fitness = fitness
        self.operators = list(operators)
        self.store = store
        self.run_dir = store.path.parent
        self.on_event = on_event or (lambda kind, payload: None)
        self.rng = random.Random(config.seed)
        space = list(fitness.descriptor_space)
        if config.code_size_bins:
            space.append(Descriptor(CODE_SIZE, 0, 240, config.code_size_bins, "syntax nodes of the normalised code"))
        if not space:
            space.append(Descriptor(CODE_SIZE, 0, 240, 1, "syntax nodes of the normalised code"))
        self.archive = MapElitesArchive(space, fitness_floor=fitness.fitness_floor)
        self.candidates: dict[int, Candidate] = {}
        self.results: dict[int, EvalResult] = {}
        self.by_hash: dict[str, int] = {}
        self.by_fingerprint: dict[str, int] = {}
        self.generation = 0
        self.next_id = 0
        self.pending: list[Candidate] | None = None
        self._resumed_batch = False
        self.hall_of_fame = tools.HallOfFame(config.hof_size, similar=lambda a, b: a.candidate.id == b.candidate.id)
        self.statistics = tools.Statistics(key=lambda ind: ind.fitness.values[0])
        for name, function in (("max", np.max), ("mean", np.mean), ("min", np.min), ("std", np.std)):
            self.statistics.register(name, function)
        self.logbook = tools.Logbook()
        self.logbook.header = ["gen", "evals", "ok", "invalid", "max", "mean", "coverage", "qd_score"]
        self.counters = {"hash_duplicates": 0, "operator_failures": 0, "unfilled_slots": 0}
        self.errors: deque[tuple[str, str]] = deque(maxlen=8)
        store.set_meta("fitness_name", fitness.name)
        store.set_meta("baseline", fitness.baseline)
        store.set_meta("descriptor_space", [dataclasses.asdict(d) for d in space])

    # -- restoring ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Rebuild the evolving state from the store (``--resume``): candidates, results,
        dedup tables, archive, hall of fame, logbook, counters and the random state."""
        candidates = self.store.candidates()
        results = {r.candidate_id: r for name, r in self.store.evaluations(self.fitness.name)}
        generations = self.store.generations()
        for candidate in candidates:
            self.candidates[candidate.id] = candidate
            self.by_hash.setdefault(candidate.code_hash, candidate.id)
        self.next_id = max(self.candidates, default=-1) + 1
        self.results = results
        for result in results.values():
            if result.fingerprint and result.status != "duplicate":
                self.by_fingerprint.setdefault(result.fingerprint, result.candidate_id)
        for entry in generations:
            members = [c for c in candidates if c.generation == entry["generation"]]
            self._absorb(members)
            self.logbook.record(**entry["record"])
            self.generation = entry["generation"] + 1
        if generations:
            state = generations[-1]["state"]
            self.counters.update(state.get("counters", {}))
            self.rng.setstate(_tuple_state(state["rng"]))
        asked = self.store.meta("rng_after_ask")
        if asked and asked["generation"] == self.generation and any(
            c.generation == self.generation for c in candidates
        ):
            self.rng.setstate(_tuple_state(asked["rng"]))
            self.pending = [c for c in candidates if c.generation == self.generation]
            self._resumed_batch = True

    # -- ask ------------------------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        """The next generation's candidates. Statically invalid offspring are recorded (with
        their error) and included; genomes already seen are never returned."""
        if self.pending is not None:
            if self._resumed_batch:
                # A resumed run first finishes the generation it was killed in.
                self._resumed_batch = False
                return list(self.pending)
            raise RuntimeError("ask() was called twice without tell()")
        generation = self.generation
        batch: list[Candidate] = []
        invalid: list[EvalResult] = []
        if generation == 0:
            for seed in self.fitness.seeds():
                self._admit(Offspring(seed.name, seed.code, seed.thought), (), "seed", batch, invalid)
        slots = self.config.pop if generation > 0 else max(0, self.config.pop - len(batch))
        context = self._context()
        for _ in range(slots):
            for _attempt in range(self.config.max_attempts):
                made = self._offspring(context, seeds_only=generation == 0)
                if made is not None and self._admit(*made, batch, invalid):
                    break
            else:
                self.counters["unfilled_slots"] += 1
                warnings.warn(
                    f"generation {generation}: no new valid genome after {self.config.max_attempts} attempts; "
                    "the slot stays empty", RuntimeWarning, stacklevel=2,
                )
        self.store.add_candidates(batch)
        for result in invalid:
            self._record(result)
        self.store.set_meta("rng_after_ask", {"generation": generation, "rng": self.rng.getstate()})
        self.pending = batch
        return list(batch)

    def _offspring(self, context: Context, seeds_only: bool) -> tuple[Offspring, tuple[int, ...], str] | None:
        operator = self.rng.choice(self.operators)
        roll = self.rng.random()
        try:
            if seeds_only:
                seeds = [c for c in self.candidates.values() if c.operator == "seed"]
                parent = self.rng.choice(seeds or [None])
                if parent is None:
                    return operator.propose(context), (), f"{operator.name}:propose"
                return operator.mutate(parent, context), (parent.id,), f"{operator.name}:mutate"
            elites = self._elite_individuals()
            if roll < self.config.cxpb and len(elites) >= 2:
                first, second = self._select(elites, 2)
                return (operator.crossover(first, second, context), (first.id, second.id),
                        f"{operator.name}:crossover")
            if roll < self.config.cxpb + self.config.mutpb and elites:
                (parent,) = self._select(elites, 1)
                return operator.mutate(parent, context), (parent.id,), f"{operator.name}:mutate"
            return operator.propose(context), (), f"{operator.name}:propose"
        except Exception as exc:  # an operator failure costs one attempt, never the run
            self.counters["operator_failures"] += 1
            self.errors.append((operator.name, f"{type(exc).__name__}: {exc}"))
            return None

    def _select(self, elites: list[Individual], k: int) -> list[Candidate]:
        with _seeded_global_random(self.rng):
            if k == 2 and len(elites) >= 2:
                first = tools.selTournament(elites, 1, tournsize=self.config.tournament_size)[0]
                rest = [e for e in elites if e is not first]
                second = tools.selTournament(rest, 1, tournsize=self.config.tournament_size)[0]
                return [first.candidate, second.candidate]
            chosen = tools.selTournament(elites, k, tournsize=self.config.tournament_size)
        return [c.candidate for c in chosen]

    def _admit(self, offspring: Offspring, parents: tuple[int, ...], operator: str,
               batch: list[Candidate], invalid: list[EvalResult]) -> bool:
        """Turn an offspring into a candidate unless its normalised AST is known. Returns
        whether a candidate was added (valid or not)."""
        if not isinstance(offspring, Offspring):
            self.counters["operator_failures"] += 1
            self.errors.append((operator, f"returned {type(offspring).__name__}, expected operators.Offspring"))
            return False
        error = None
        try:
            check_genome(offspring.code, self.fitness.interface.arg_counts)
            digest = code_hash(offspring.code)
        except GenomeError as exc:
            error = str(exc)
            digest = "invalid-" + str(abs(hash(offspring.code)))
        if digest in self.by_hash:
            self.counters["hash_duplicates"] += 1
            return False
        candidate = Candidate(
            id=self.next_id, name=_identifier(offspring.name), code=offspring.code, thought=offspring.thought,
            parents=tuple(parents), operator=operator, generation=self.generation, code_hash=digest,
        )
        self.next_id += 1
        self.by_hash[digest] = candidate.id
        self.candidates[candidate.id] = candidate
        batch.append(candidate)
        if error is not None:
            invalid.append(EvalResult(candidate.id, "invalid", error=error))
            self.errors.append((candidate.name, error))
        return True

    # -- evaluation callbacks -------------------------------------------------------------------
    def claim(self, candidate_id: int, fingerprint: str) -> int | None:
        """Behavioural dedup: the earlier candidate with this fingerprint, or None (new)."""
        known = self.by_fingerprint.get(fingerprint)
        if known is not None and known != candidate_id:
            return known
        self.by_fingerprint[fingerprint] = candidate_id
        return None

    def record(self, result: EvalResult) -> None:
        """Save one finished evaluation (committed before anything else happens)."""
        self._record(result)

    def _record(self, result: EvalResult) -> None:
        self.store.add_evaluation(result, self.fitness.name)
        self.results[result.candidate_id] = result
        if result.status in ("invalid", "error", "timeout", "oom"):
            name = self.candidates[result.candidate_id].name if result.candidate_id in self.candidates else "?"
            self.errors.append((name, result.error or result.status))
        self.on_event("result", result)

    # -- tell -----------------------------------------------------------------------------------
    def tell(self, results: list[EvalResult]) -> dict[str, Any]:
        """Take the results of the last ``ask()``; returns the generation's logbook record."""
        if self.pending is None:
            raise RuntimeError("tell() was called without calling ask()")
        by_id = {r.candidate_id: r for r in results}
        missing = [c.id for c in self.pending if c.id not in by_id]
        if missing:
            raise ValueError(f"tell() is missing results for candidates {missing}")
        for result in results:
            if result.candidate_id not in self.results:
                self._record(result)
        members = self.pending
        self._absorb(members)
        ok = [Individual(c, by_id[c.id].fitness) for c in members if by_id[c.id].ok]
        record: dict[str, Any] = {
            "gen": self.generation, "evals": sum(by_id[c.id].status != "duplicate" for c in members),
            "ok": len(ok), "invalid": sum(by_id[c.id].status == "invalid" for c in members),
            "failed": sum(by_id[c.id].status in ("error", "timeout", "oom") for c in members),
            "duplicates": sum(by_id[c.id].status == "duplicate" for c in members),
        }
        if ok:
            record.update({k: float(v) for k, v in self.statistics.compile(ok).items()})
        else:
            record.update({"max": math.nan, "mean": math.nan, "min": math.nan, "std": math.nan})
            if members:
                warnings.warn(f"generation {self.generation}: none of its {len(members)} candidates was scored "
                              "successfully; see their errors with 'replay' or 'show'", RuntimeWarning, stacklevel=2)
            else:
                warnings.warn(f"generation {self.generation}: the operators produced no new genome",
                              RuntimeWarning, stacklevel=2)
        best = self.best()
        record["best"] = best[1] if best else math.nan
        record.update(self.archive.stats())
        self.logbook.record(**record)
        self.store.finish_generation(self.generation, record, {"rng": self.rng.getstate(), "counters": self.counters})
        self._write_elites()
        self.on_event("generation", record)
        self.generation += 1
        self.pending = None
        return record

    def _absorb(self, members: list[Candidate]) -> None:
        """Put a finished generation's successful candidates into the archive and hall of fame."""
        scored = []
        for candidate in sorted(members, key=lambda c: c.id):
            result = self.results.get(candidate.id)
            if result is None or not result.ok:
                continue
            descriptors = {**result.descriptors, CODE_SIZE: float(code_size(candidate.code))}
            self.archive.add(candidate.id, result.fitness, descriptors)
            scored.append(Individual(candidate, result.fitness))
        if scored:
            self.hall_of_fame.update(scored)

    # -- views ----------------------------------------------------------------------------------
    def _elite_individuals(self) -> list[Individual]:
        return [Individual(self.candidates[e.candidate_id], e.fitness) for e in self.archive.elites()]

    def best(self) -> tuple[Candidate, float] | None:
        if not len(self.hall_of_fame):
            return None
        top = self.hall_of_fame[0]
        return top.candidate, top.fitness.values[0]

    def _context(self, n_best: int = 5, n_diverse: int = 5) -> Context:
        elites = self.archive.elites()
        best = [self._elite(e.candidate_id, e.fitness) for e in elites[:n_best]]
        diverse: list[Elite] = []
        chosen = list(elites[:1])
        rest = list(elites[1:])
        while rest and len(diverse) < n_diverse:
            # Greedy farthest-point choice over grid cells: elites unlike those already shown.
            far = max(rest, key=lambda e: min(sum((a - b) ** 2 for a, b in zip(e.cell, c.cell)) for c in chosen))
            rest.remove(far)
            chosen.append(far)
            diverse.append(self._elite(far.candidate_id, far.fitness))
        return Context(interface=self.fitness.interface, rng=self.rng, best=best, diverse=diverse,
                       errors=list(self.errors), generation=self.generation)

    def _elite(self, candidate_id: int, fitness: float) -> Elite:
        return Elite(self.candidates[candidate_id], fitness, self.results[candidate_id].metrics)

    def elite_records(self) -> list[dict[str, Any]]:
        records = []
        for elite in self.archive.elites():
            candidate = self.candidates[elite.candidate_id]
            records.append({
                "id": candidate.id, "name": candidate.name, "fitness": elite.fitness, "cell": list(elite.cell),
                "descriptors": dict(zip(self.archive.names, elite.descriptors)), "operator": candidate.operator,
                "generation": candidate.generation, "parents": list(candidate.parents), "thought": candidate.thought,
                "code": candidate.code,
            })
        return records

    def _write_elites(self) -> None:
        best = self.best()
        write_elites(self.run_dir, self.elite_records(), {
            "generation": self.generation, "fitness": self.fitness.name,
            "best_id": best[0].id if best else None, "best_fitness": best[1] if best else None,
            **self.archive.stats(),
        })

    # -- the loop -------------------------------------------------------------------------------
    def run(self, executor) -> None:
        """Ask, evaluate, tell, until generation ``config.gens`` is done."""
        while self.generation <= self.config.gens:
            batch = self.ask()
            todo = [(c.id, c.code) for c in batch if c.id not in self.results]
            self.on_event("ask", {"generation": self.generation, "candidates": len(batch), "todo": len(todo)})
            executor.run(todo, self.config.eval_seed, self.claim, self.record)
            self.tell([self.results[c.id] for c in batch])


def _tuple_state(state: Any) -> Any:
    """``random.Random.setstate`` needs tuples; JSON gives lists."""
    return tuple(_tuple_state(s) for s in state) if isinstance(state, list) else state
