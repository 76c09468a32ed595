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
from engine.executor import ListSource
from engine.genome import GenomeError, check_genome, code_hash, code_size
from engine.ladder import check_compatible, promote_generation, stage_labels
from fitness.base import Descriptor
from operators.bandit import make_chooser
from operators.base import BudgetExhausted, Context, Elite, Offspring, Operator, OperatorExhausted

CODE_SIZE = "code_size"


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
        fitness: The fitness plug-in (its seeds, interface and descriptor space are used here),
            or the stages of a fidelity ladder, cheapest first (:mod:`engine.ladder`).
        operators: Operators making offspring; one is chosen per offspring (``--operator-choice``).
        store: The run log; the engine writes every candidate and evaluation to it.
        on_event: Optional callback ``(kind, payload)`` for progress displays.
    """

    def __init__(self, config: RunConfig, fitness, operators: list[Operator], store: RunStore,
                 on_event: Callable[[str, Any], None] | None = None) -> None:
        if not operators:
            raise ValueError("the engine needs at least one operator")
        self.config = config
        self.stages = list(fitness) if isinstance(fitness, (list, tuple)) else [fitness]
        if not self.stages:
            raise ValueError("the engine needs at least one fitness plug-in")
        check_compatible(self.stages)
        #: What the run store files each stage's scores under.
        self.labels = stage_labels(s.name for s in self.stages)
        self.fitness = self.stages[0]  # seeds and the function contract come from the first stage
        self.operators = list(operators)
        self.store = store
        self.run_dir = store.path.parent
        self.on_event = on_event or (lambda kind, payload: None)
        self.rng = random.Random(config.seed)
        spaces = [self._space(stage) for stage in self.stages]
        space = spaces[0]
        #: One MAP-Elites grid per fidelity stage; ``archive`` is the most expensive stage's.
        self.archives = [MapElitesArchive(sp, fitness_floor=stage.fitness_floor)
                         for sp, stage in zip(spaces, self.stages)]
        self.archive = self.archives[-1]
        self.candidates: dict[int, Candidate] = {}
        #: Results per stage (candidate id -> result); ``results`` is stage 0's, which every
        #: candidate gets.
        self.stage_results: list[dict[int, EvalResult]] = [{} for _ in self.stages]
        self.results = self.stage_results[0]
        #: Stage of each evaluation handed to the executor and not yet recorded.
        self.running: dict[int, int] = {}
        self._baseline: int | None = None
        self.by_hash: dict[str, int] = {}
        self.by_fingerprint: dict[str, int] = {}
        self.generation = 0
        self.next_id = 0
        self.pending: list[Candidate] | None = None
        self._resumed_batch = False
        self.hall_of_fame = tools.HallOfFame(config.hof_size, similar=lambda a, b: a.candidate.id == b.candidate.id)
        self.statistics = tools.Statistics(key=lambda ind: ind.score)
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
        #: Set (by a Ctrl-C handler) to start no new evaluation and stop once running ones end.
        self.draining = False
        self._llm_links: dict[int, tuple[int, ...]] = {}
        for operator in self.operators:
            # Operators that keep records in the run store (LLM calls) get it here.
            attach = getattr(operator, "attach", None)
            if callable(attach):
                attach(store)
        store.set_meta("stopped", None)
        store.set_meta("fitness_name", self.labels[0])
        store.set_meta("baseline", self.fitness.baseline)
        store.set_meta("descriptor_space", [dataclasses.asdict(d) for d in space])
        store.set_meta("fidelity_ladder", self.labels if len(self.stages) > 1 else None)

    def _space(self, stage) -> list[Descriptor]:
        space = list(stage.descriptor_space)
        if self.config.code_size_bins:
            space.append(Descriptor(CODE_SIZE, 0, 240, self.config.code_size_bins, "syntax nodes of the normalised code"))
        if not space:
            space.append(Descriptor(CODE_SIZE, 0, 240, 1, "syntax nodes of the normalised code"))
        return space

    @property
    def ladder(self) -> bool:
        return len(self.stages) > 1

    # -- restoring ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Rebuild the evolving state from the store (``--resume``): candidates, results,
        dedup tables, archive, hall of fame, logbook, counters and the random state."""
        candidates = self.store.candidates()
        for stage, label in enumerate(self.labels):
            self.stage_results[stage].update((r.candidate_id, r) for _, r in self.store.evaluations(label))
        results = self.results
        generations = self.store.generations()
        for candidate in candidates:
            self.candidates[candidate.id] = candidate
            self.by_hash.setdefault(candidate.code_hash, candidate.id)
        self.next_id = max(self.candidates, default=-1) + 1
        for result in results.values():
            if result.fingerprint and result.status != "duplicate":
                self.by_fingerprint.setdefault(result.fingerprint, result.candidate_id)
        if self.config.asynchronous:
            # Steady state: results arrive in any order, so everything scored goes back into the
            # archive at once; what was running when the driver died is run again first
            # (engine.steady).
            self._absorb([c for c in candidates if c.id in results])
            for entry in generations:
                self.logbook.record(**entry["record"])
                self.generation = entry["generation"] + 1
        else:
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
        if self.config.asynchronous:
            # Proposals in steady state depend on the order results arrived in, which no run
            # repeats; a resumed run draws from a generator seeded by where it stands.
            self.rng.seed(f"{self.config.seed}/resume/{len(candidates)}")
        elif asked and asked["generation"] == self.generation and any(
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
                if len(self.candidates) < self.eval_budget:
                    self._admit(Offspring(seed.name, seed.code, seed.thought), (), "seed", batch, invalid)
        if self.config.strategy == "sequential":
            # The DiscoPOP loop: one proposal per generation (the seeds alone in generation 0).
            slots = 1 if generation > 0 or not batch else 0
        else:
            slots = self.config.pop if generation > 0 else max(0, self.config.pop - len(batch))
        slots = min(slots, self.eval_budget - len(self.candidates))
        self._fill(slots, self._context(), generation == 0, batch, invalid)
        self._save_candidates(batch)
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
                if isinstance(outcome, Exception):
                    failed_in_slot[slot].add(plan.operator.name)
                admitted = self._take_outcome(plan, outcome, streak, benched, batch, invalid)
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

    def _take_outcome(self, plan: _Plan, outcome: Offspring | Exception, streak: Counter[str], benched: set[str],
                      batch: list[Candidate], invalid: list[EvalResult]) -> bool:
        """Admit what an operator made (into ``batch``, statically invalid ones also into
        ``invalid``) or record its failure: an operator failure costs one attempt, never the run;
        one that fails ``operator_failure_limit`` times in a row, or says it is exhausted, joins
        ``benched``; a spent budget sets ``stop_reason``. Returns whether a candidate was added."""
        name = plan.operator.name
        if not isinstance(outcome, Exception):
            streak[name] = 0
            admitted = self._admit(outcome, tuple(p.id for p in plan.parents), plan.label, batch, invalid)
            if not admitted:
                self.chooser.update(name, 0.0)  # a known genome: wasted effort
            return admitted
        self.counters["operator_failures"] += 1
        self.errors.append((name, f"{type(outcome).__name__}: {outcome}"))
        self.chooser.update(name, 0.0)
        streak[name] += 1
        if isinstance(outcome, BudgetExhausted):
            if self.stop_reason is None:
                self.stop_reason = str(outcome)
                self.store.set_meta("stopped", {"generation": self.generation, "reason": str(outcome)})
        elif isinstance(outcome, OperatorExhausted) or streak[name] >= self.config.operator_failure_limit:
            benched.add(name)
        return False

    def _save_candidates(self, batch: list[Candidate]) -> None:
        """Write new candidates to the run store, linked to the LLM calls that made them."""
        self.store.add_candidates(batch)
        for candidate in batch:
            self.store.link_llm_calls(self._llm_links.pop(candidate.id, ()), candidate.id)

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
        stage = self.running.pop(result.candidate_id, 0)
        self.store.add_evaluation(result, self.labels[stage])
        self.stage_results[stage][result.candidate_id] = result
        if result.status in ("invalid", "error", "timeout", "oom"):
            name = self.candidates[result.candidate_id].name if result.candidate_id in self.candidates else "?"
            self.errors.append((name, result.error or result.status))
        self.on_event("result" if stage == 0 else "stage_result", result)

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
        self._credit_operators(members)
        self._absorb(members)
        record = self.finish_generation(members)
        self.pending = None
        return record

    def finish_generation(self, members: list[Candidate], state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Close a generation over ``members`` (already scored and absorbed): its logbook record,
        saved with the random state, the elite archive rewritten. Returns the record."""
        by_id = {c.id: self.results[c.id] for c in members}
        ok = [Individual(c, by_id[c.id].fitness) for c in members if by_id[c.id].ok]
        ladder: dict[str, Any] = {}
        for stage in range(1, len(self.stages)):
            scored = [self.stage_results[stage][c.id] for c in members if c.id in self.stage_results[stage]]
            good = [r.fitness for r in scored if r.ok]
            ladder[self.labels[stage]] = {"evals": len(scored), "ok": len(good),
                                          "max": max(good) if good else math.nan}
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
                              "successfully; see their errors with 'replay' or 'show'", RuntimeWarning, stacklevel=3)
            else:
                warnings.warn(f"generation {self.generation}: the operators produced no new genome",
                              RuntimeWarning, stacklevel=3)
        best = self.best()
        record["best"] = best[1] if best else math.nan
        if ladder:
            record["stages"] = ladder
            record["best_fidelity"] = self.labels[self._top(best[0].id)[0]] if best else None
        record.update(self.archive.stats())
        self.logbook.record(**record)
        self.store.finish_generation(self.generation, record, {
            "rng": self.rng.getstate(), "counters": self.counters, "chooser": self.chooser.state(), **(state or {})})
        self._write_elites()
        self.on_event("generation", record)
        self.generation += 1
        return record

    def _credit_operators(self, members: list[Candidate]) -> None:
        """Tell the operator chooser how the operators' offspring among ``members`` did, before
        they enter the archive (their first-stage results against their parents, or against the
        median elite of the first stage for fresh proposals)."""
        elite_scores = [e.fitness for e in self.archives[0].elites()]  # on the scale of stage-0 results
        reference = statistics.median(elite_scores) if elite_scores else None
        for candidate in sorted(members, key=lambda c: c.id):
            if candidate.operator != "seed":
                self.chooser.update(candidate.operator.rpartition(":")[0],
                                    self._reward(candidate, self.results[candidate.id], reference))

    def _reward(self, candidate: Candidate, result: EvalResult, reference: float | None) -> float:
        """The bandit's reward for one offspring: 0 unless scored; 0.5 when scored; 1 when it
        also beats its best parent (a fresh proposal: the median elite before this generation)."""
        if not result.ok:
            return 0.0
        parents = [self.results[p].fitness for p in candidate.parents if p in self.results and self.results[p].ok]
        bar = max(parents) if parents else reference
        return 1.0 if bar is None or result.fitness > bar else 0.5

    def _absorb(self, members: list[Candidate]) -> None:
        """Put finished candidates' successful results into each stage's archive, and each
        candidate, at the highest stage it reached, into the hall of fame."""
        members = sorted(members, key=lambda c: c.id)
        for stage, archive in enumerate(self.archives):
            entries = []
            for candidate in members:
                result = self.stage_results[stage].get(candidate.id)
                if result is not None and result.ok:
                    descriptors = {**result.descriptors, CODE_SIZE: float(code_size(candidate.code))}
                    entries.append((candidate.id, result.fitness, descriptors))
            # In id order within one batch: pyribs keeps the first of equal objectives in a cell,
            # as adding them one by one would.
            archive.add_many(entries)
        scored = []
        for candidate in members:
            top = self._top(candidate.id)
            if top is not None:
                scored.append(Individual(candidate, top[1].fitness, top[0]))
        if scored:
            known = {ind.candidate.id for ind in scored}
            # A candidate promoted since it entered keeps one entry, at its new level.
            for index in reversed(range(len(self.hall_of_fame))):
                if self.hall_of_fame[index].candidate.id in known:
                    self.hall_of_fame.remove(index)
            self.hall_of_fame.update(scored)

    def _top(self, candidate_id: int) -> tuple[int, EvalResult] | None:
        """The highest stage on which the candidate was scored successfully, and that result."""
        for stage in reversed(range(len(self.stages))):
            result = self.stage_results[stage].get(candidate_id)
            if result is not None and result.ok:
                return stage, result
        return None

    # -- views ----------------------------------------------------------------------------------
    def _elite_individuals(self) -> list[Individual]:
        """The parent pool: every stage's elites, each candidate once, at the highest stage it
        reached (a candidate promoted but beaten in its cell there is no longer a parent)."""
        pool, seen = [], set()
        for level in reversed(range(len(self.archives))):
            for elite in self.archives[level].elites():
                cid = elite.candidate_id
                if cid in seen or (level < len(self.archives) - 1 and self._top(cid)[0] > level):
                    continue
                seen.add(cid)
                pool.append(Individual(self.candidates[cid], elite.fitness, level))
        return pool

    def _parent_archive(self) -> tuple[int, MapElitesArchive]:
        """The most expensive stage whose archive holds anything (stage 0 when none does)."""
        for level in reversed(range(len(self.archives))):
            if len(self.archives[level].elites()):
                return level, self.archives[level]
        return 0, self.archives[0]

    def best(self) -> tuple[Candidate, float] | None:
        if not len(self.hall_of_fame):
            return None
        top = self.hall_of_fame[0]
        return top.candidate, top.score

    def _context(self, n_best: int | None = None, n_diverse: int | None = None) -> Context:
        n_best = self.config.context_best if n_best is None else n_best
        n_diverse = self.config.context_diverse if n_diverse is None else n_diverse
        level, archive = self._parent_archive()
        elites = archive.elites()
        best = [self._elite(ind.candidate.id, ind.score, ind.level) for ind in self._elite_individuals()[:n_best]]
        diverse: list[Elite] = []
        chosen = list(elites[:1])
        rest = list(elites[1:])
        while rest and len(diverse) < n_diverse:
            # Greedy farthest-point choice over grid cells: elites unlike those already shown.
            far = max(rest, key=lambda e: min(sum((a - b) ** 2 for a, b in zip(e.cell, c.cell)) for c in chosen))
            rest.remove(far)
            chosen.append(far)
            diverse.append(self._elite(far.candidate_id, far.fitness, level))
        history = []
        if self.config.strategy == "sequential":
            history = [(self.candidates[cid], self.results[cid]) for cid in sorted(self.candidates)
                       if cid in self.results]
        scores = {cid: r.fitness for cid, r in self.results.items() if r.ok}
        return Context(interface=self.fitness.interface, rng=self.rng, best=best, diverse=diverse,
                       errors=list(self.errors), generation=self.generation, history=history, scores=scores)

    def _elite(self, candidate_id: int, fitness: float, level: int = 0) -> Elite:
        metrics = self.stage_results[level][candidate_id].metrics
        if self.ladder:
            metrics = {**metrics, "fidelity": self.labels[level]}
        return Elite(self.candidates[candidate_id], fitness, metrics)

    def elite_records(self) -> list[dict[str, Any]]:
        """The elites of the most expensive stage reached (with a ladder, ``fidelity`` names it)."""
        level, archive = self._parent_archive()
        records = []
        for elite in archive.elites():
            candidate = self.candidates[elite.candidate_id]
            records.append({
                "id": candidate.id, "name": candidate.name, "fitness": elite.fitness, "cell": list(elite.cell),
                "descriptors": dict(zip(archive.names, elite.descriptors)), "operator": candidate.label,
                "generation": candidate.generation, "parents": list(candidate.parents), "thought": candidate.thought,
                "code": candidate.code, **({"fidelity": self.labels[level]} if self.ladder else {}),
            })
        return records

    def _write_elites(self) -> None:
        best = self.best()
        level, archive = self._parent_archive()
        write_elites(self.run_dir, self.elite_records(), {
            "generation": self.generation, "fitness": self.labels[level],
            "best_id": best[0].id if best else None, "best_fitness": best[1] if best else None,
            **({"fidelity_ladder": self.labels} if self.ladder else {}),
            **archive.stats(),
        })

    # -- the loop -------------------------------------------------------------------------------
    @property
    def eval_budget(self) -> float:
        """How many candidates the run may create in all (``--max-evals``; unlimited when 0)."""
        return self.config.max_evals or math.inf

    def run(self, executor) -> None:
        """Ask, evaluate, tell, until generation ``config.gens`` is done, or until a budget is
        spent (``stop_reason`` says which): the generation in progress is then finished with the
        offspring already made, saved, and the loop ends. With ``--async`` the steady-state loop
        (:mod:`engine.steady`) runs instead."""
        if self.config.asynchronous:
            from engine.steady import SteadyState

            SteadyState(self).run(executor)
            return
        while self.generation <= self.config.gens and not self.draining:
            if len(self.candidates) >= self.eval_budget and self.pending is None:
                break  # --max-evals reached
            batch = self.ask()
            if not batch and self.stop_reason is not None:
                self.pending = None  # nothing was made: --resume redoes this generation
                break
            for stage in range(len(self.stages)):
                if self.draining:
                    return  # the generation is finished by --resume
                todo = self.stage_todo(batch, stage)
                if stage == 0:
                    self.on_event("ask", {"generation": self.generation, "candidates": len(batch), "todo": len(todo)})
                elif todo:
                    self.on_event("promote", {"generation": self.generation, "stage": self.labels[stage],
                                              "candidates": [c.id for c in todo]})
                self.running.update((c.id, stage) for c in todo)
                executor.run(_UnlessDraining(self, [(c.id, c.code, stage) for c in todo]), self.config.eval_seed,
                             self.claim, self.record)
            if self.draining:
                return
            self.tell([self.results[c.id] for c in batch])
            if self.stop_reason is not None:
                break  # a spent budget: this generation is finished and saved

    def stage_todo(self, batch: list[Candidate], stage: int) -> list[Candidate]:
        """The candidates of ``batch`` still to be scored on ``stage``: on stage 0 all of them;
        on a later stage those promoted from the one before (:func:`engine.ladder.promote_generation`),
        decided from the stored results alone so that a resumed run promotes the same ones."""
        done = self.stage_results[stage]
        if stage == 0:
            return [c for c in batch if c.id not in done]
        below = self.stage_results[stage - 1]
        scores = {c.id: below[c.id].fitness for c in batch if c.id in below and below[c.id].ok}
        chosen = set(promote_generation(scores, self.config.promote, self.config.promote_above))
        baseline = self.baseline_id()
        if baseline in scores:
            chosen.add(baseline)
        return [c for c in batch if c.id in chosen and c.id not in done]

    def baseline_id(self) -> int | None:
        """The baseline seed's candidate id when ``--promote-baseline`` takes it up a ladder."""
        if not (self.ladder and self.config.promote_baseline and self.fitness.baseline):
            return None
        if self._baseline is None:  # seeds never change once made: look once
            self._baseline = next((c.id for c in self.candidates.values()
                                   if c.operator == "seed" and c.name == _identifier(self.fitness.baseline)), None)
        return self._baseline


class _UnlessDraining(ListSource):
    """A generation's tasks, of which none starts once the engine is draining."""

    def __init__(self, engine: Engine, tasks: list[tuple]) -> None:
        super().__init__(tasks)
        self.engine = engine

    def take(self):
        return None if self.engine.draining else super().take()

    def exhausted(self) -> bool:
        return self.engine.draining or super().exhausted()


def _tuple_state(state: Any) -> Any:
    """``random.Random.setstate`` needs tuples; JSON gives lists."""
    return tuple(_tuple_state(s) for s in state) if isinstance(state, list) else state
