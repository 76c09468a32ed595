"""The engine: one evolutionary run, composed the way pyribs composes a scheduler from an
archive and emitters.

- :class:`engine.search.population.Population`: every candidate and result, dedup, the store;
- :class:`engine.search.elites.ElitePool`: per-stage MAP-Elites grids, hall of fame, parents,
  the archive context operators see;
- :class:`engine.search.breeder.Breeder`: planning and making offspring, admitting them,
  crediting operators;
- two peer drivers over them, :class:`engine.search.generational.Generational` (``ask`` /
  ``tell``) and :class:`engine.search.steady.SteadyState` (``--async``), which use only public
  methods.

The engine itself keeps what a run has as a whole: the logbook, each generation's record and
random state in the store, the elite archive file, and resuming from the store.
"""
from __future__ import annotations

import dataclasses
import math
import random
import warnings
from typing import Any
from collections.abc import Callable

import numpy as np
from deap import tools

from archives.store import RunStore
from engine.candidate import Candidate, EvalResult, Status
from engine.config import RunConfig
from engine.helpers import first_seed
from engine.ladder import check_compatible, stage_labels
from engine.search.breeder import BreedingSettings, Breeder
from engine.search.elites import ElitePool, EliteSettings, Individual
from engine.search.generational import Generational
from engine.search.population import Population, Tally
from engine.search.racing import Racing, RacingSettings
from operators.base import Context, Operator


class Engine:
    """Evolves loss functions with ask/tell.

    Args:
        config: The run's settings.
        fitness: The fitness plug-in (its seeds, interface and descriptor space are used here),
            or the stages of a fidelity ladder, cheapest first (:mod:`engine.ladder`).
        operators: Operators making offspring; one is chosen per offspring (``--operator-choice``).
        store: The run log; every candidate and evaluation is written to it.
        on_event: Optional callback ``(kind, payload)`` for progress displays.
    """

    def __init__(self, config: RunConfig, fitness, operators: list[Operator], store: RunStore,
                 on_event: Callable[[str, Any], None] | None = None) -> None:
        if not operators:
            raise ValueError("the engine needs at least one operator")
        self.config = config
        self._settings = config.to_dict()  # as the store keeps them (engine.helpers.first_seed reads these)
        self.stages = list(fitness) if isinstance(fitness, (list, tuple)) else [fitness]
        if not self.stages:
            raise ValueError("the engine needs at least one fitness plug-in")
        check_compatible(self.stages)
        #: What the run store files each stage's scores under.
        self.labels = stage_labels(s.name for s in self.stages)
        self.fitness = self.stages[0]  # seeds and the function contract come from the first stage
        self.store = store
        self.run_dir = store.path.parent
        self.on_event = on_event or (lambda kind, payload: None)
        self.rng = random.Random(config.seed)
        self.tally = Tally()
        self.population = Population(store, self.labels, self.tally)
        self._baseline_seed_id: int | None = None
        racing = config.cut(RacingSettings)
        if config.asynchronous:
            racing = dataclasses.replace(racing, race_seeds=0)  # steady state ranks by first scores
        self.racing = Racing(racing, config.eval_seed, self._baseline_seed, self.fitness.fitness_floor)
        self.elites = ElitePool(config.cut(EliteSettings), self.stages, self.population, self.labels,
                                objective=self._objective)
        self.breeder = Breeder(config.cut(BreedingSettings), operators, self.population, self.elites, self.rng,
                               self.fitness.interface.arg_counts, self.tally, store)
        self.operators = self.breeder.operators
        self.generational = Generational(self)
        self.statistics = tools.Statistics(key=lambda ind: ind.score)
        for name, function in (("max", np.max), ("mean", np.mean), ("min", np.min), ("std", np.std)):
            self.statistics.register(name, function)
        self.logbook = tools.Logbook()
        self.logbook.header = ["gen", "evals", "ok", "invalid", "max", "mean", "coverage", "qd_score"]
        self.generation = 0
        #: Set (by a Ctrl-C handler) to start no new evaluation and stop once running ones end.
        self.draining = False
        self._resumed_batch: list[Candidate] | None = None
        self._seeds: list | None = None
        for operator in self.operators:
            # Operators that keep records in the run store (LLM calls) get it here.
            attach = getattr(operator, "attach", None)
            if callable(attach):
                attach(store)
        store.set_meta("stopped", None)
        store.set_meta("fitness_name", self.labels[0])
        store.set_meta("baseline", self.fitness.baseline)
        store.set_meta("descriptor_space", [dataclasses.asdict(d) for d in self.elites.spaces[0]])
        store.set_meta("fidelity_ladder", self.labels if len(self.stages) > 1 else None)

    # -- what the run has -----------------------------------------------------------------------
    @property
    def candidates(self) -> dict[int, Candidate]:
        return self.population.candidates

    @property
    def results(self) -> dict[int, EvalResult]:
        """First-stage results."""
        return self.population.results

    @property
    def stage_results(self) -> list[dict[int, EvalResult]]:
        return self.population.stage_results

    @property
    def counters(self) -> dict[str, int]:
        return self.tally.counters

    @property
    def errors(self):
        return self.tally.errors

    @property
    def archive(self):
        """The most expensive stage's MAP-Elites grid."""
        return self.elites.archive

    @property
    def archives(self) -> list:
        return self.elites.archives

    @property
    def hall_of_fame(self):
        return self.elites.hall_of_fame

    @property
    def ladder(self) -> bool:
        return len(self.stages) > 1

    @property
    def stop_reason(self) -> str | None:
        """Why the run stops before ``config.gens`` (a spent LLM budget), or None."""
        return self.breeder.stop_reason

    @property
    def pending(self) -> list[Candidate] | None:
        """The generation asked and not yet told (generational mode)."""
        return self.generational.pending

    @property
    def eval_budget(self) -> float:
        """How many candidates the run may create in all (``--max-evals``; unlimited when 0)."""
        return self.config.max_evals or math.inf

    def seeds(self) -> list:
        """The plug-in's seed losses (asked once)."""
        if self._seeds is None:
            self._seeds = list(self.fitness.seeds())
        return self._seeds

    def best(self) -> tuple[Candidate, float] | None:
        return self.elites.best()

    def context(self) -> Context:
        """What operators are shown for the next offspring."""
        return self.elites.context(self.fitness.interface, self.rng, list(self.tally.errors), self.generation,
                                   sequential=self.config.strategy == "sequential")

    def _baseline_seed(self) -> int | None:
        """The baseline seed's candidate id (scores are paired with it), or None."""
        if self._baseline_seed_id is None and self.fitness.baseline:  # a seed's id never changes once made
            self._baseline_seed_id = self.population.seed_named(self.fitness.baseline)
        return self._baseline_seed_id

    def _objective(self, candidate_id: int, stage: int) -> float:
        """What ranks a candidate on a stage: with racing, on the first stage, the lower
        confidence bound of its paired gain (on the fitness scale); otherwise its score."""
        if stage == 0 and self.racing.enabled:
            estimate = self.racing.estimate(candidate_id)
            if estimate is not None:
                return estimate.lower
        return self.stage_results[stage][candidate_id].fitness

    def baseline_id(self) -> int | None:
        """The baseline seed's candidate id when ``--promote-baseline`` takes it up a ladder."""
        if not (self.ladder and self.config.promote_baseline and self.fitness.baseline):
            return None
        return self._baseline_seed()

    # -- making candidates ----------------------------------------------------------------------
    def make_batch(self) -> list[Candidate]:
        """A new generation's candidates: in generation 0 the seeds, then operator offspring
        (mutations of seeds first); saved, statically invalid ones recorded as such."""
        generation = self.generation
        batch: list[Candidate] = []
        invalid: list[EvalResult] = []
        if generation == 0:
            for seed in self.seeds():
                if len(self.candidates) < self.eval_budget:
                    self.breeder.admit_seed(seed.name, seed.code, seed.thought, generation, batch, invalid)
        if self.config.strategy == "sequential":
            # The DiscoPOP loop: one proposal per generation (the seeds alone in generation 0).
            slots = 1 if generation > 0 or not batch else 0
        else:
            slots = self.config.pop if generation > 0 else max(0, self.config.pop - len(batch))
        slots = min(slots, self.eval_budget - len(self.candidates))
        self.breeder.fill(slots, self.context(), generation == 0, generation, batch, invalid)
        self.population.save(batch)
        for result in invalid:
            self.record(result)
        self.store.set_meta("rng_after_ask", {"generation": generation, "rng": self.rng.getstate(),
                                              "chooser": self.breeder.chooser.state()})
        self.report_llm_usage()
        return batch

    def report_llm_usage(self) -> None:
        totals = self.store.llm_totals()
        if totals["calls"]:
            self.on_event("llm", totals)

    # -- results --------------------------------------------------------------------------------
    def claim(self, candidate_id: int, fingerprint: str) -> int | None:
        """Behavioural dedup: the earlier candidate with this fingerprint, or None (new)."""
        return self.population.claim(candidate_id, fingerprint)

    def record(self, result: EvalResult) -> int:
        """Save one finished evaluation (committed before anything else happens); returns its stage."""
        stage = self.population.record(result)
        if stage == 0 and result.ok:
            self.racing.add(result.candidate_id, self.first_seed(self.candidates[result.candidate_id].generation),
                            result.fitness)
        self.on_event("result" if stage == 0 else "stage_result", result)
        return stage

    def record_seed(self, result: EvalResult, seed: int) -> None:
        """Save a re-measurement of a candidate on evaluation seed ``seed`` (first stage)."""
        self.store.add_evaluation(result, self.labels[0], eval_seed=seed)
        self.racing.add(result.candidate_id, seed, result.fitness if result.ok else None)
        self.on_event("reseed", {"result": result, "seed": seed})

    def first_seed(self, generation: int) -> int:
        """The evaluation seed on which the candidates of ``generation`` are first scored
        (``--first-seeds``: :func:`engine.helpers.first_seed`)."""
        return first_seed(self._settings, generation)

    def race(self, executor) -> int:
        """Measure the baseline on this generation's own seed (so its offspring's scores are
        paired), re-measure the candidates that could reach the top on fresh seeds (one round,
        within ``--race-budget``), then re-rank the elites. Returns the evaluations run."""
        if not self.racing.enabled or self.draining:
            return 0
        pairing = self._baseline_on(self.first_seed(self.generation))
        if pairing and not self._measure(executor, pairing):
            return len(pairing)
        plan = self.racing.due({cid for cid, r in self.results.items() if r.ok})
        self._measure(executor, plan)
        return len(pairing) + len(plan)

    def _baseline_on(self, seed: int) -> list[tuple[int, int]]:
        """``[(baseline id, seed)]`` when the baseline is not yet scored on ``seed`` (a
        generation's own first seed), else nothing."""
        base_id = self._baseline_seed()
        scored = self.racing.samples.get(base_id) if base_id is not None else None
        return [(base_id, seed)] if scored and seed not in scored else []

    def confirm(self, executor) -> int:
        """At the end of a raced run, measure its ``race_top`` best and the baseline once more on
        ``--confirm-seeds`` seeds no candidate was chosen on (:meth:`Racing.confirmation`), then
        re-rank the elites and rewrite the archive. Returns the evaluations run."""
        if self.draining:
            return 0
        plan = self.racing.confirmation({cid for cid, r in self.results.items() if r.ok})
        if not plan:
            return 0
        self.on_event("confirm", {"evaluations": len(plan)})
        if self._measure(executor, plan):
            self.elites.rebuild()
            self.elites.write(self.run_dir, self.generation - 1, confirmed=True)
        return len(plan)

    def _measure(self, executor, plan: list[tuple[int, int]]) -> bool:
        """Score each ``(candidate id, seed)`` of ``plan`` (first stage), one seed at a time, each
        score saved as it comes; False when the run started draining before the end."""
        by_seed: dict[int, list[int]] = {}
        for cid, seed in plan:
            by_seed.setdefault(seed, []).append(cid)
        for seed, ids in sorted(by_seed.items()):
            if self.draining:
                return False
            # One candidate at most once per executor call: a result names its candidate, not its seed.
            # Checked already (on the run's own seed): their processes go straight to training.
            tasks = [(cid, self.candidates[cid].code, 0, seed, True) for cid in ids]
            executor.run(tasks, self.config.eval_seed, None, lambda result, seed=seed: self.record_seed(result, seed))
        return True

    def credit(self, members: list[Candidate]) -> None:
        """Credit the operators with how their offspring among ``members`` did."""
        self.breeder.credit(members, [e.fitness for e in self.elites.archives[0].elites()], self._paired_score)

    def _paired_score(self, candidate_id: int) -> float:
        """A candidate's first-stage score on the fitness scale, comparable across evaluation
        seeds: with racing, the baseline's mean plus the candidate's mean paired gain (an
        offspring and its parents may have been scored on different generations' seeds);
        otherwise its score."""
        estimate = self.racing.estimate(candidate_id) if self.racing.enabled else None
        if estimate is None or math.isnan(estimate.gain):
            return self.results[candidate_id].fitness
        return (estimate.lower + estimate.upper) / 2

    def absorb(self, members: list[Candidate]) -> None:
        """Put finished candidates into the grids and the hall of fame (with racing, every scored
        candidate again: re-measurements move earlier candidates' bounds too)."""
        if self.racing.enabled:
            self.elites.rebuild()
        else:
            self.elites.absorb(members)

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
            "gen": self.generation, "evals": sum(by_id[c.id].status != Status.DUPLICATE for c in members),
            "ok": len(ok), "invalid": sum(by_id[c.id].status == Status.INVALID for c in members),
            "failed": sum(by_id[c.id].status in (Status.ERROR, Status.TIMEOUT, Status.OOM) for c in members),
            "duplicates": sum(by_id[c.id].status == Status.DUPLICATE for c in members),
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
            record["best_fidelity"] = self.labels[self.population.top(best[0].id)[0]] if best else None
        record.update(self.archive.stats())
        self.logbook.record(**record)
        self.store.finish_generation(self.generation, record, {
            "rng": self.rng.getstate(), "counters": self.counters, "chooser": self.breeder.chooser.state(),
            **(state or {})})
        self.elites.write(self.run_dir, self.generation)
        self.on_event("generation", record)
        self.generation += 1
        return record

    # -- resuming -------------------------------------------------------------------------------
    def restore(self) -> None:
        """Rebuild the evolving state from the store (``--resume``): candidates, results,
        dedup tables, archive, hall of fame, logbook, counters and the random state."""
        candidates = self.population.restore()
        results = self.results
        for cid, result in results.items():
            if result.ok:
                self.racing.add(cid, self.first_seed(self.candidates[cid].generation), result.fitness)
        for _, seed, result in self.store.seed_evaluations(self.labels[0]):
            self.racing.add(result.candidate_id, seed, result.fitness if result.ok else None)
        generations = self.store.generations()
        if self.config.asynchronous:
            # Steady state: results arrive in any order, so everything scored goes back into the
            # archive at once; what was running when the driver died is run again first
            # (engine.search.steady).
            self.absorb([c for c in candidates if c.id in results])
            for entry in generations:
                self.logbook.record(**entry["record"])
                self.generation = entry["generation"] + 1
        else:
            for entry in generations:
                self.absorb([c for c in candidates if c.generation == entry["generation"]])
                self.logbook.record(**entry["record"])
                self.generation = entry["generation"] + 1
        if generations:
            state = generations[-1]["state"]
            self.counters.update(state.get("counters", {}))
            self.rng.setstate(_tuple_state(state["rng"]))
            self.breeder.chooser.restore(state.get("chooser"))
        asked = self.store.meta("rng_after_ask")
        if self.config.asynchronous:
            # Proposals in steady state depend on the order results arrived in, which no run
            # repeats; a resumed run draws from a generator seeded by where it stands.
            self.rng.seed(f"{self.config.seed}/resume/{len(candidates)}")
        elif asked and asked["generation"] == self.generation and any(
            c.generation == self.generation for c in candidates
        ):
            self.rng.setstate(_tuple_state(asked["rng"]))
            self.breeder.chooser.restore(asked.get("chooser"))
            self._resumed_batch = [c for c in candidates if c.generation == self.generation]

    @property
    def resuming(self) -> bool:
        """Whether a killed run's unfinished generation is still to be finished."""
        return self._resumed_batch is not None

    def take_resumed_batch(self) -> list[Candidate] | None:
        """The generation a killed run was in the middle of (once), or None."""
        batch, self._resumed_batch = self._resumed_batch, None
        return batch

    # -- driving --------------------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        """The next generation's candidates (:meth:`Generational.ask`)."""
        return self.generational.ask()

    def tell(self, results: list[EvalResult]) -> dict[str, Any]:
        """Take the results of the last ``ask()`` (:meth:`Generational.tell`)."""
        return self.generational.tell(results)

    def run(self, executor) -> None:
        """Run to the end with the generational driver, or the steady-state one with ``--async``;
        a spent budget or Ctrl-C ends it early with everything finished saved."""
        if self.config.asynchronous:
            from engine.search.steady import SteadyState

            SteadyState(self).run(executor)
            return
        self.generational.run(executor)
        self.confirm(executor)


def _tuple_state(state: Any) -> Any:
    """``random.Random.setstate`` needs tuples; JSON gives lists."""
    return tuple(_tuple_state(s) for s in state) if isinstance(state, list) else state
