"""Steady-state (asynchronous) search: ``python -m engine run --async``.

The generational loop waits for a whole generation before making the next, so one slow
evaluation idles every other worker. Here the engine is a task source for the executor
(:class:`engine.executor.TaskSource`): the moment a worker frees up it takes the next task,
which is, in order,

1. a promotion to the next fidelity stage (:func:`engine.ladder.promote_asha`), most
   expensive stage first;
2. a candidate of the initial population, or one that was running when the driver died;
3. a new offspring whose parents are drawn from the archive as it stands.

Operators that may run concurrently (LLM calls) are started ahead, up to one per worker, in
background threads, so their latency overlaps evaluations; planning (the random draws, parent
selection) and admitting (static check, dedup, the run store) stay in the driver thread. Each
result goes into the archive as it arrives. Every ``--pop`` first-stage results close a
logbook generation, saved with the ids it covers, so ``replay`` and ``--resume`` read a
steady-state run like a generational one. The run ends after as many candidates as the
generational mode would make (``--pop`` and ``--gens``) or ``--max-evals``, whichever is
fewer, once every promotion they earned has been scored.
"""
from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from engine.candidate import Candidate, EvalResult
from engine.executor import Task, TaskSource
from engine.ladder import promote_asha
from engine.search.breeder import Attempts


class SteadyState(TaskSource):
    """Drives an :class:`engine.engine.Engine` in steady state (see the module docstring), through
    its public methods and those of its population, elites and breeder."""

    poll_interval = 0.02

    def __init__(self, engine) -> None:
        self.engine = engine
        config = engine.config
        #: Candidates the run makes in all (the generational mode's count, or --max-evals).
        self.limit = config.planned_candidates(len(engine.seeds()))
        #: Stage-0 results that close generation g: initial + pop * g.
        self.initial = max(len(engine.seeds()), config.pop)
        self.queue: deque[Candidate] = deque()
        self.proposals: deque[tuple[Any, Future]] = deque()  # (plan, future) started ahead
        # Calls started ahead: enough that replies keep up when an LLM call takes longer than an
        # evaluation (two per worker), within the --llm-concurrency limit.
        self.lookahead = min(2 * config.workers, config.llm_concurrency) if engine.breeder.concurrent else 0
        self.threads = ThreadPoolExecutor(max_workers=max(1, config.llm_concurrency),
                                          thread_name_prefix="evoloss-operator") if self.lookahead else None
        self.failures = 0  # operator failures and known genomes since the last new candidate
        self.attempts = Attempts()  # operator failure streaks and benched operators, per generation
        self.stopped_proposing = False
        self.window: list[int] = []  # stage-0 results since the last closed generation
        self._ready: list[tuple[int, int]] | None = None  # promotions due, until the next result

    # -- the loop -----------------------------------------------------------------------------
    def run(self, executor) -> None:
        engine = self.engine
        if engine.generation == 0 and not engine.candidates:
            batch = engine.make_batch()  # the seeds and the initial population, as in generational mode
            self.queue.extend(c for c in batch if c.id not in engine.results)
        else:
            self._resume()
        engine.on_event("ask", {"generation": engine.generation, "candidates": len(self.queue),
                                "todo": len(self.queue)})
        try:
            executor.run(self, engine.config.eval_seed, engine.claim, self.on_result)
        finally:
            if self.threads:
                self.threads.shutdown(wait=False, cancel_futures=True)
        if not engine.draining and (self.window or engine.generation == 0):
            self._close_generation()

    def _resume(self) -> None:
        """After ``--resume``: run again what was running, and go on counting generations."""
        engine = self.engine
        closed: set[int] = set()
        for entry in engine.store.generations():
            closed.update(entry["state"].get("members", ()))
        self.window = sorted(cid for cid in engine.results if cid not in closed)
        self.queue.extend(engine.population.unscored())

    # -- TaskSource -----------------------------------------------------------------------------
    def take(self) -> Task | None:
        engine = self.engine
        if engine.draining:
            return None
        promotion = self._promotion()
        if promotion is not None:
            return promotion
        self._collect()
        if not self.queue:
            self._propose()
            self._collect()
        if not self.queue:
            return None
        candidate = self.queue.popleft()
        engine.population.start(candidate.id, 0)
        if self.lookahead:
            self._propose()  # start the next operator calls while this one is evaluated
        return Task(candidate.id, candidate.code, 0)

    def exhausted(self) -> bool:
        if self.engine.draining:
            return True
        if self.queue or self.proposals or self._promotable():
            return False
        return not self._may_propose()

    def _may_propose(self) -> bool:
        engine = self.engine
        return (not self.stopped_proposing and engine.stop_reason is None
                and len(engine.candidates) < self.limit
                and len(self.attempts.benched) < len(engine.operators))

    # -- promotions -----------------------------------------------------------------------------
    def _promotable(self) -> list[tuple[int, int]]:
        """(candidate id, stage) pairs ready for a more expensive stage, that stage first. The
        executor asks after every event; the ranking changes only when a result arrives or a
        promotion starts, so it is kept until then."""
        if self._ready is None:
            self._ready = self._rank_promotions()
        return self._ready

    def _rank_promotions(self) -> list[tuple[int, int]]:
        engine = self.engine
        ready = []
        for stage in reversed(range(1, len(engine.stages))):
            below = engine.stage_results[stage - 1]
            scores = {cid: r.fitness for cid, r in below.items() if r.ok}
            started = {cid for cid in scores if cid in engine.stage_results[stage]
                       or engine.population.stage_running(cid) == stage}
            chosen = promote_asha(scores, started, engine.config.promote, engine.config.promote_above)
            baseline = engine.baseline_id()
            if baseline in scores and baseline not in started and baseline not in chosen:
                chosen.append(baseline)
            ready += [(cid, stage) for cid in chosen]
        return ready

    def _promotion(self) -> Task | None:
        ready = self._promotable()
        if not ready:
            return None
        cid, stage = ready.pop(0)
        engine = self.engine
        engine.population.start(cid, stage)
        engine.on_event("promote", {"generation": engine.generation, "stage": engine.labels[stage],
                                    "candidates": [cid]})
        return Task(cid, engine.candidates[cid].code, stage)

    # -- offspring ------------------------------------------------------------------------------
    def _propose(self) -> None:
        """Plan offspring until one is ready or started, keeping ``lookahead`` in flight."""
        engine = self.engine
        while self._may_propose() and len(engine.candidates) + len(self.proposals) < self.limit:
            if self.queue and len(self.proposals) >= self.lookahead:
                return
            if not self.queue and self.proposals and len(self.proposals) >= max(1, self.lookahead):
                return
            usable = engine.breeder.usable(self.attempts)
            context = engine.context()
            plan = engine.breeder.plan(usable, seeds_only=False)
            if getattr(plan.operator, "concurrent", False) and self.threads:
                self.proposals.append((plan, self.threads.submit(self._make, plan, context)))
            else:
                done: Future = Future()
                done.set_result(self._make(plan, context))
                self.proposals.append((plan, done))
                self._collect()

    def _make(self, plan, context):
        return self.engine.breeder.make([plan], context)[0]

    def _collect(self) -> None:
        """Admit the offspring whose operators finished (in the order they were planned)."""
        engine = self.engine
        collected = False
        while self.proposals and self.proposals[0][1].done():
            plan, future = self.proposals.popleft()
            collected = True
            batch: list[Candidate] = []
            invalid: list[EvalResult] = []
            if engine.breeder.take(plan, future.result(), self.attempts, engine.generation, batch, invalid):
                self.failures = 0
                engine.population.save(batch)
                for result in invalid:
                    self.on_result(result)
                self.queue.extend(c for c in batch if c.id not in engine.results)
                continue
            self.failures += 1
            if self.failures >= engine.config.max_attempts * max(1, engine.config.workers):
                self.stopped_proposing = True
                engine.counters["unfilled_slots"] += 1
                warnings.warn(f"no new valid genome after {self.failures} attempts in a row; the steady-state "
                              "run stops making offspring and finishes what is running", RuntimeWarning,
                              stacklevel=2)
        if collected and self.lookahead:  # LLM operators: report the calls and their cost
            engine.report_llm_usage()

    # -- results --------------------------------------------------------------------------------
    def on_result(self, result: EvalResult) -> None:
        """One finished evaluation: saved, into the archive, and a generation closed every
        ``--pop`` first-stage results."""
        engine = self.engine
        stage = engine.record(result)
        candidate = engine.candidates[result.candidate_id]
        if stage == 0:
            engine.credit([candidate])
            self.window.append(candidate.id)
        engine.absorb([candidate])
        self._ready = None  # a new score may make promotions due
        if stage == 0 and len(engine.results) >= self.initial + engine.config.pop * engine.generation:
            self._close_generation()

    def _close_generation(self) -> None:
        engine = self.engine
        members = [engine.candidates[cid] for cid in self.window]
        self.window = []
        self.attempts.benched.clear()
        engine.finish_generation(members, state={"members": [c.id for c in members]})
