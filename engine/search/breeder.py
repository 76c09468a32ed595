"""The breeder: plans offspring (which operator, which variation, which parents, all drawn from
the run's generator in slot order), has the operators make them (concurrently where an
operator allows it), admits what they made into the population, and credits the operators
(the bandit of :mod:`operators.bandit`) by how their offspring did."""
from __future__ import annotations

import dataclasses
import random
import statistics
import threading
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from engine.candidate import Candidate, EvalResult, Variation
from operators.bandit import make_chooser
from operators.base import BudgetExhausted, Context, Offspring, Operator, OperatorExhausted


@dataclass(frozen=True)
class BreedingSettings:
    """What the breeder reads of the run's settings (fields of :class:`engine.config.RunConfig`)."""

    strategy: str = "population"
    cxpb: float = 0.3
    mutpb: float = 0.6
    max_attempts: int = 10
    operator_failure_limit: int = 3
    llm_concurrency: int = 8
    operator_choice: str = "bandit"
    bandit_window: int = 50


@dataclass(frozen=True)
class Plan:
    """One offspring slot's plan, drawn from the run's generator before any operator runs."""

    operator: Operator
    variation: Variation
    parents: tuple[Candidate, ...]
    seed: int  # seeds the slot's own generator

    @property
    def label(self) -> str:
        return f"{self.operator.name}:{self.variation}"


@dataclass
class Attempts:
    """How the operators fared while filling one batch: consecutive failures per operator, and
    those that sit out the rest of it."""

    streak: Counter = dataclasses.field(default_factory=Counter)
    benched: set = dataclasses.field(default_factory=set)


def run_in_threads(jobs: list[Callable[[], Any]], limit: int) -> tuple[list[threading.Thread], list[Any]]:
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


class Breeder:
    """Makes offspring for a :class:`engine.search.population.Population` from the parents the
    :class:`engine.search.elites.ElitePool` offers.

    Args:
        settings: Variation probabilities, attempts, concurrency, the operator chooser.
        operators: The run's operators, by distinct names.
        population: Where offspring are admitted.
        elites: Where parents are drawn from.
        rng: The run's generator (shared with the elites' selection, in one fixed order).
        arg_counts: The interface's allowed parameter counts (the static check).
        tally: The run's counters and recent failures.
        store: The run store (a spent budget is recorded there).
    """

    def __init__(self, settings: BreedingSettings, operators: list[Operator], population, elites,
                 rng: random.Random, arg_counts, tally, store) -> None:
        if not operators:
            raise ValueError("the engine needs at least one operator")
        self.settings = settings
        self.operators = list(operators)
        self.by_name: dict[str, Operator] = {}
        for operator in self.operators:
            if operator.name in self.by_name:
                raise ValueError(f"operator {operator.name!r} is given twice in --operator")
            self.by_name[operator.name] = operator
        self.population = population
        self.elites = elites
        self.rng = rng
        self.arg_counts = arg_counts
        self.tally = tally
        self.store = store
        self.chooser = make_chooser(settings.operator_choice, settings.bandit_window)
        #: Why the run stops early (a spent LLM budget), or None.
        self.stop_reason: str | None = None

    @property
    def concurrent(self) -> bool:
        """Whether any operator may be called from several threads at once (LLM clients)."""
        return any(getattr(op, "concurrent", False) for op in self.operators)

    def usable(self, attempts: Attempts) -> list[Operator]:
        return [op for op in self.operators if op.name not in attempts.benched]

    # -- planning and making --------------------------------------------------------------------
    def plan(self, operators: list[Operator], seeds_only: bool) -> Plan:
        """The next slot's operator, variation and parents (``seeds_only``: mutations of seeds,
        for the initial population)."""
        operator = self.by_name[self.chooser.choose([op.name for op in operators], self.rng)]
        roll = self.rng.random()
        variation, parents = Variation.PROPOSE, ()
        if self.settings.strategy == "sequential":
            pass
        elif seeds_only:
            parent = self.rng.choice(self.population.seeds() or [None])
            if parent is not None:
                variation, parents = Variation.MUTATE, (parent,)
        else:
            pool = self.elites.parents()
            if roll < self.settings.cxpb and len(pool) >= 2:
                variation, parents = Variation.CROSSOVER, tuple(self.elites.select(pool, 2, self.rng))
            elif roll < self.settings.cxpb + self.settings.mutpb and pool:
                variation, parents = Variation.MUTATE, tuple(self.elites.select(pool, 1, self.rng))
        return Plan(operator, variation, parents, self.rng.getrandbits(64))

    def make(self, plans: list[Plan], context: Context) -> list[Offspring | Exception]:
        """Run the plans; each slot gets its own generator derived from the plan. Returns the
        offspring, or the exception an operator raised, in plan order."""

        def make(plan: Plan) -> Offspring | Exception:
            slot_context = dataclasses.replace(context, rng=random.Random(plan.seed))
            operator = plan.operator
            try:
                if plan.variation == Variation.CROSSOVER:
                    return operator.crossover(plan.parents[0], plan.parents[1], slot_context)
                if plan.variation == Variation.MUTATE:
                    return operator.mutate(plan.parents[0], slot_context)
                return operator.propose(slot_context)
            except Exception as exc:  # noqa: BLE001 - recorded by the caller
                return exc

        threaded = [i for i, plan in enumerate(plans) if getattr(plan.operator, "concurrent", False)]
        if len(threaded) < 2 or self.settings.llm_concurrency < 2:
            threaded = []
        threads, threaded_results = run_in_threads([lambda p=plans[i]: make(p) for i in threaded],
                                                   self.settings.llm_concurrency)
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

    # -- admitting ------------------------------------------------------------------------------
    def admit_seed(self, name: str, code: str, thought: str, generation: int, batch: list[Candidate],
                   invalid: list[EvalResult]) -> bool:
        """A plug-in's seed loss into the population."""
        return self._admit(Offspring(name, code, thought), (), "seed", Variation.SEED, generation, batch, invalid)

    def take(self, plan: Plan, outcome: Offspring | Exception, attempts: Attempts, generation: int,
             batch: list[Candidate], invalid: list[EvalResult]) -> bool:
        """Admit what an operator made (into ``batch``, statically invalid ones also into
        ``invalid``) or record its failure: an operator failure costs one attempt, never the run;
        one that fails ``operator_failure_limit`` times in a row, or says it is exhausted, is
        benched; a spent budget sets :attr:`stop_reason`. Returns whether a candidate was added."""
        name = plan.operator.name
        if not isinstance(outcome, Exception):
            attempts.streak[name] = 0
            admitted = self._admit(outcome, tuple(p.id for p in plan.parents), name, plan.variation, generation,
                                   batch, invalid)
            if not admitted:
                self.chooser.update(name, 0.0)  # a known genome: wasted effort
            return admitted
        self.tally.counters["operator_failures"] += 1
        self.tally.errors.append((name, f"{type(outcome).__name__}: {outcome}"))
        self.chooser.update(name, 0.0)
        attempts.streak[name] += 1
        if isinstance(outcome, BudgetExhausted):
            if self.stop_reason is None:
                self.stop_reason = str(outcome)
                self.store.set_meta("stopped", {"generation": generation, "reason": str(outcome)})
        elif isinstance(outcome, OperatorExhausted) or attempts.streak[name] >= self.settings.operator_failure_limit:
            attempts.benched.add(name)
        return False

    def _admit(self, offspring: Offspring, parents: tuple[int, ...], operator: str, variation: Variation,
               generation: int, batch: list[Candidate], invalid: list[EvalResult]) -> bool:
        if not isinstance(offspring, Offspring):
            self.tally.counters["operator_failures"] += 1
            self.tally.errors.append((f"{operator}:{variation}",
                                      f"returned {type(offspring).__name__}, expected operators.Offspring"))
            return False
        candidate, failed = self.population.admit(
            offspring.name, offspring.code, offspring.thought, parents, operator, variation, generation,
            self.arg_counts, tuple(getattr(offspring, "llm_calls", ()) or ()),
        )
        if candidate is None:
            return False
        batch.append(candidate)
        if failed is not None:
            invalid.append(failed)
        return True

    def fill(self, slots: int, context: Context, seeds_only: bool, generation: int, batch: list[Candidate],
             invalid: list[EvalResult]) -> None:
        """Make ``slots`` offspring in rounds. Each round plans every open slot (in slot order,
        from the run's generator), lets the operators make them (concurrently where an operator
        allows it, up to ``llm_concurrency``), then admits them in slot order, so a run is
        reproducible whatever order concurrent calls finish in. A slot whose operator failed
        tries another operator next round; an operator that fails ``operator_failure_limit``
        times in a row (in slot order), or says it is exhausted, sits out the rest of the
        batch; a spent budget stops filling and ends the run after this generation."""
        tries = [0] * slots
        failed_in_slot: list[set[str]] = [set() for _ in range(slots)]
        attempts = Attempts()
        open_slots, unfilled = list(range(slots)), []
        while open_slots and self.stop_reason is None:
            usable = self.usable(attempts)
            if not usable:
                break
            plans = [self.plan([op for op in usable if op.name not in failed_in_slot[slot]] or usable, seeds_only)
                     for slot in open_slots]
            outcomes = self.make(plans, context)
            retry = []
            for slot, plan, outcome in zip(open_slots, plans, outcomes):
                tries[slot] += 1
                if isinstance(outcome, Exception):
                    failed_in_slot[slot].add(plan.operator.name)
                if not self.take(plan, outcome, attempts, generation, batch, invalid):
                    (retry if tries[slot] < self.settings.max_attempts else unfilled).append(slot)
            open_slots = retry
        if self.stop_reason is None:
            unfilled.extend(open_slots)
        for slot in sorted(unfilled):
            self.tally.counters["unfilled_slots"] += 1
            reason = (f"no new valid genome after {tries[slot]} attempts" if tries[slot] >= self.settings.max_attempts
                      else "no new valid genome (operators sat out after failing: "
                           f"{', '.join(sorted(attempts.benched))})")
            warnings.warn(f"generation {generation}: {reason}; the slot stays empty", RuntimeWarning, stacklevel=3)

    # -- credit ---------------------------------------------------------------------------------
    def credit(self, members: list[Candidate], reference_scores: list[float],
               value: Callable[[int], float] | None = None) -> None:
        """Tell the operator chooser how the operators' offspring among ``members`` did, before
        they enter the archive (their first-stage results against their parents, or against the
        median of ``reference_scores``, the first stage's elites, for fresh proposals).
        ``value(candidate id)`` is what is compared (default: the first-stage score; a raced run
        compares scores made comparable across evaluation seeds by the baseline)."""
        reference = statistics.median(reference_scores) if reference_scores else None
        results = self.population.results
        for candidate in sorted(members, key=lambda c: c.id):
            if not candidate.is_seed:
                self.chooser.update(candidate.operator,
                                    self.reward(candidate, results[candidate.id], reference, value))

    def reward(self, candidate: Candidate, result: EvalResult, reference: float | None,
               value: Callable[[int], float] | None = None) -> float:
        """The bandit's reward for one offspring: 0 unless scored; 0.5 when scored; 1 when it
        also beats its best parent (a fresh proposal: ``reference``)."""
        if not result.ok:
            return 0.0
        results = self.population.results
        value = value or (lambda cid: results[cid].fitness)
        parents = [value(p) for p in candidate.parents if p in results and results[p].ok]
        bar = max(parents) if parents else reference
        return 1.0 if bar is None or value(candidate.id) > bar else 0.5
