"""The ask/tell engine: one loop for the CLI, the tests and any executor.

``ask()`` returns the next generation's candidates (the fitness plug-in's seeds plus operator
offspring first, then offspring of parents drawn from the MAP-Elites archive); ``tell()``
takes their results, updates the archive, hall of fame and logbook, and saves a checkpoint.
``run()`` is a short loop over the two. Every candidate and every evaluation is written to
the run store as it happens, so a run can be resumed from the store alone.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
import statistics
import threading
import warnings
from collections import Counter, deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
from deap import base, tools

from archives.elites import write_elites
from archives.grid import MapElitesArchive
from archives.store import RunStore
from engine.candidate import Candidate, EvalResult
from engine.config import RunConfig
from engine.genome import GenomeError, check_genome, code_hash, code_size
from fitness.base import Descriptor
from operators.bandit import make_chooser
from operators.base import BudgetExhausted, Context, Elite, Offspring, Operator, OperatorExhausted

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


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One offspring slot's plan, drawn from the run's generator before any operator runs."""

    operator: Operator
    kind: str  # mutate, crossover or propose
    parents: tuple[Candidate, ...]
    seed: int  # seeds the slot's own generator

    @property
    def label(self) -> str:
        return f"{self.operator.name}:{self.kind}"


def _run_in_threads(jobs: list[Callable[[], Any]], limit: int) -> tuple[list[threading.Thread], list[Any]]:
    """Start ``jobs`` on at most ``limit`` daemon threads; the results list fills in job order.
    Daemon threads, so that Ctrl-C is not held up by a request in flight (its timeout ends it)."""
    results: list[Any] = [None] * len(jobs)
    todo = deque(range(len(jobs)))

    def work() -> None:
        while True:
            try:
                index = todo.popleft()
            except IndexError:
                return
            results[index] = jobs[index]()

    threads = [threading.Thread(target=work, daemon=True, name=f"evoloss-operator-{i}")
               for i in range(min(limit, len(jobs)))]
    for thread in threads:
        thread.start()
    return threads, results


def _identifier(name: str, fallback: str = "loss") -> str:
    name = re.sub(r"\W+", "_", str(name)).strip("_")[:48] or fallback
    return f"l_{name}" if name[0].isdigit() else name


class Engine:
    """Evolves loss functions with ask/tell.

    Args:
        config: The run's settings.
        fitness: The fitness plug-in (its seeds, interface and descriptor space are used here).
        operators: Operators making offspring; one is chosen per offspring (``--operator-choice``).
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
        self._by_name: dict[str, Operator] = {}
        for operator in self.operators:
            if operator.name in self._by_name:
                raise ValueError(f"operator {operator.name!r} is given twice in --operator")
            self._by_name[operator.name] = operator
        self.chooser = make_chooser(config.operator_choice, config.bandit_window)
        #: Why the run stops before ``config.gens`` (a spent LLM budget), or None.
        self.stop_reason: str | None = None
        self._llm_links: dict[int, tuple[int, ...]] = {}
        for operator in self.operators:
            # Operators that keep records in the run store (LLM calls) get it here.
            attach = getattr(operator, "attach", None)
            if callable(attach):
                attach(store)
        store.set_meta("stopped", None)
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
            self.chooser.restore(state.get("chooser"))
        asked = self.store.meta("rng_after_ask")
        if asked and asked["generation"] == self.generation and any(
            c.generation == self.generation for c in candidates
        ):
            self.rng.setstate(_tuple_state(asked["rng"]))
            self.chooser.restore(asked.get("chooser"))
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
        if self.config.strategy == "sequential":
            # The DiscoPOP loop: one proposal per generation (the seeds alone in generation 0).
            slots = 1 if generation > 0 or not batch else 0
        else:
            slots = self.config.pop if generation > 0 else max(0, self.config.pop - len(batch))
        self._fill(slots, self._context(), generation == 0, batch, invalid)
        self.store.add_candidates(batch)
        for candidate in batch:
            self.store.link_llm_calls(self._llm_links.pop(candidate.id, ()), candidate.id)
        for result in invalid:
            self._record(result)
        self.store.set_meta("rng_after_ask", {"generation": generation, "rng": self.rng.getstate(),
                                              "chooser": self.chooser.state()})
        self.pending = batch
        totals = self.store.llm_totals()
        if totals["calls"]:
            self.on_event("llm", totals)
        return list(batch)

    def _fill(self, slots: int, context: Context, seeds_only: bool, batch: list[Candidate],
              invalid: list[EvalResult]) -> None:
        """Make ``slots`` offspring in rounds. Each round plans every open slot (operator,
        variation, parents, drawn in slot order from the run's generator), lets the operators
        make them (concurrently where an operator allows it, up to ``llm_concurrency``), then
        admits them in slot order, so a run is reproducible whatever order concurrent calls
        finish in. A slot whose operator failed tries another operator next round; an operator
        that fails ``operator_failure_limit`` times in a row (in slot order), or says it is
        exhausted, sits out the rest of the generation; a spent budget stops filling and ends
        the run after this generation."""
        attempts = [0] * slots
        failed_in_slot: list[set[str]] = [set() for _ in range(slots)]
        streak: Counter[str] = Counter()  # consecutive failures per operator
        benched: set[str] = set()
        open_slots, unfilled = list(range(slots)), []
        while open_slots and self.stop_reason is None:
            usable = [op for op in self.operators if op.name not in benched]
            if not usable:
                break
            plans = [self._plan([op for op in usable if op.name not in failed_in_slot[slot]] or usable,
                                context, seeds_only) for slot in open_slots]
            outcomes = self._make(plans, context)
            retry = []
            for slot, plan, outcome in zip(open_slots, plans, outcomes):
                attempts[slot] += 1
                name = plan.operator.name
                if isinstance(outcome, Exception):  # an operator failure costs one attempt, never the run
                    self.counters["operator_failures"] += 1
                    self.errors.append((name, f"{type(outcome).__name__}: {outcome}"))
                    self.chooser.update(name, 0.0)
                    failed_in_slot[slot].add(name)
                    streak[name] += 1
                    if isinstance(outcome, BudgetExhausted):
                        if self.stop_reason is None:
                            self.stop_reason = str(outcome)
                            self.store.set_meta("stopped", {"generation": self.generation, "reason": str(outcome)})
                    elif isinstance(outcome, OperatorExhausted) or streak[name] >= self.config.operator_failure_limit:
                        benched.add(name)
                    admitted = False
                else:
                    streak[name] = 0
                    admitted = self._admit(outcome, tuple(p.id for p in plan.parents), plan.label, batch, invalid)
                    if not admitted:
                        self.chooser.update(name, 0.0)  # a known genome: wasted effort
                if not admitted:
                    (retry if attempts[slot] < self.config.max_attempts else unfilled).append(slot)
            open_slots = retry
        if self.stop_reason is None:
            unfilled.extend(open_slots)
        for slot in sorted(unfilled):
            self.counters["unfilled_slots"] += 1
            reason = (f"no new valid genome after {attempts[slot]} attempts" if attempts[slot] >= self.config.max_attempts
                      else f"no new valid genome (operators sat out after failing: {', '.join(sorted(benched))})")
            warnings.warn(f"generation {self.generation}: {reason}; the slot stays empty", RuntimeWarning, stacklevel=3)

    def _plan(self, operators: list[Operator], context: Context, seeds_only: bool) -> _Plan:
        operator = self._by_name[self.chooser.choose([op.name for op in operators], self.rng)]
        roll = self.rng.random()
        kind, parents = "propose", ()
        if self.config.strategy == "sequential":
            pass
        elif seeds_only:
            seeds = [c for c in self.candidates.values() if c.operator == "seed"]
            parent = self.rng.choice(seeds or [None])
            if parent is not None:
                kind, parents = "mutate", (parent,)
        else:
            elites = self._elite_individuals()
            if roll < self.config.cxpb and len(elites) >= 2:
                kind, parents = "crossover", tuple(self._select(elites, 2))
            elif roll < self.config.cxpb + self.config.mutpb and elites:
                kind, parents = "mutate", tuple(self._select(elites, 1))
        return _Plan(operator, kind, parents, self.rng.getrandbits(64))

    def _make(self, plans: list[_Plan], context: Context) -> list[Offspring | Exception]:
        """Run the plans; each slot gets its own generator derived from the plan. Returns the
        offspring, or the exception an operator raised, in plan order."""

        def make(plan: _Plan) -> Offspring | Exception:
            slot_context = dataclasses.replace(context, rng=random.Random(plan.seed))
            operator = plan.operator
            try:
                if plan.kind == "crossover":
                    return operator.crossover(plan.parents[0], plan.parents[1], slot_context)
                if plan.kind == "mutate":
                    return operator.mutate(plan.parents[0], slot_context)
                return operator.propose(slot_context)
            except Exception as exc:  # noqa: BLE001 - recorded by the caller
                return exc

        threaded = [i for i, plan in enumerate(plans) if getattr(plan.operator, "concurrent", False)]
        if len(threaded) < 2 or self.config.llm_concurrency < 2:
            threaded = []
        threads, threaded_results = _run_in_threads([lambda p=plans[i]: make(p) for i in threaded],
                                                    self.config.llm_concurrency)
        outcomes: list[Any] = [None] * len(plans)
        for i, plan in enumerate(plans):
            if i not in threaded:
                outcomes[i] = make(plan)
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)  # a timed join keeps Ctrl-C working
        for i, result in zip(threaded, threaded_results):
            outcomes[i] = result
        return outcomes

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
        if getattr(offspring, "llm_calls", ()):
            self._llm_links[candidate.id] = tuple(offspring.llm_calls)
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
        elite_scores = [e.fitness for e in self.archive.elites()]
        reference = statistics.median(elite_scores) if elite_scores else None
        for candidate in sorted(members, key=lambda c: c.id):
            if candidate.operator != "seed":
                self.chooser.update(candidate.operator.rpartition(":")[0],
                                    self._reward(candidate, by_id[candidate.id], reference))
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
        self.store.finish_generation(self.generation, record, {"rng": self.rng.getstate(), "counters": self.counters,
                                                               "chooser": self.chooser.state()})
        self._write_elites()
        self.on_event("generation", record)
        self.generation += 1
        self.pending = None
        return record

    def _reward(self, candidate: Candidate, result: EvalResult, reference: float | None) -> float:
        """The bandit's reward for one offspring: 0 unless scored; 0.5 when scored; 1 when it
        also beats its best parent (a fresh proposal: the median elite before this generation)."""
        if not result.ok:
            return 0.0
        parents = [self.results[p].fitness for p in candidate.parents if p in self.results and self.results[p].ok]
        bar = max(parents) if parents else reference
        return 1.0 if bar is None or result.fitness > bar else 0.5

    def _absorb(self, members: list[Candidate]) -> None:
        """Put a finished generation's successful candidates into the archive and hall of fame."""
        scored, entries = [], []
        for candidate in sorted(members, key=lambda c: c.id):
            result = self.results.get(candidate.id)
            if result is None or not result.ok:
                continue
            descriptors = {**result.descriptors, CODE_SIZE: float(code_size(candidate.code))}
            entries.append((candidate.id, result.fitness, descriptors))
            scored.append(Individual(candidate, result.fitness))
        # In id order within one batch: pyribs keeps the first of equal objectives in a cell,
        # as adding them one by one would.
        self.archive.add_many(entries)
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

    def _context(self, n_best: int | None = None, n_diverse: int | None = None) -> Context:
        n_best = self.config.context_best if n_best is None else n_best
        n_diverse = self.config.context_diverse if n_diverse is None else n_diverse
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
        history = []
        if self.config.strategy == "sequential":
            history = [(self.candidates[cid], self.results[cid]) for cid in sorted(self.candidates)
                       if cid in self.results]
        scores = {cid: r.fitness for cid, r in self.results.items() if r.ok}
        return Context(interface=self.fitness.interface, rng=self.rng, best=best, diverse=diverse,
                       errors=list(self.errors), generation=self.generation, history=history, scores=scores)

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
        """Ask, evaluate, tell, until generation ``config.gens`` is done, or until a budget is
        spent (``stop_reason`` says which): the generation in progress is then finished with the
        offspring already made, saved, and the loop ends."""
        while self.generation <= self.config.gens:
            batch = self.ask()
            if not batch and self.stop_reason is not None:
                self.pending = None  # nothing was made: --resume redoes this generation
                break
            todo = [(c.id, c.code) for c in batch if c.id not in self.results]
            self.on_event("ask", {"generation": self.generation, "candidates": len(batch), "todo": len(todo)})
            executor.run(todo, self.config.eval_seed, self.claim, self.record)
            self.tell([self.results[c.id] for c in batch])
            if self.stop_reason is not None:
                break  # a spent budget: this generation is finished and saved


def _tuple_state(state: Any) -> Any:
    """``random.Random.setstate`` needs tuples; JSON gives lists."""
    return tuple(_tuple_state(s) for s in state) if isinstance(state, list) else state
