"""The generational driver: ask a whole generation, have the executor score it (stage by stage
up a fidelity ladder), tell the results, repeat (DEAP's ``eaGenerateUpdate`` shape, pyribs'
ask/tell guard)."""
from __future__ import annotations

from engine.candidate import Candidate, EvalResult
from engine.executor import ListSource
from engine.ladder import promote_generation


class Generational:
    """Drives an :class:`engine.engine.Engine` one generation at a time."""

    def __init__(self, engine) -> None:
        self.engine = engine
        #: The generation asked and not yet told.
        self.pending: list[Candidate] | None = None

    def ask(self) -> list[Candidate]:
        """The next generation's candidates. Statically invalid offspring are recorded (with
        their error) and included; genomes already seen are never returned."""
        engine = self.engine
        if self.pending is not None:
            raise RuntimeError("ask() was called twice without tell()")
        resumed = engine.take_resumed_batch()
        if resumed is not None:
            # A resumed run first finishes the generation it was killed in.
            self.pending = resumed
            return list(resumed)
        batch = engine.make_batch()
        self.pending = batch
        return list(batch)

    def tell(self, results: list[EvalResult]) -> dict:
        """Take the results of the last ``ask()``; returns the generation's logbook record."""
        engine = self.engine
        if self.pending is None:
            raise RuntimeError("tell() was called without calling ask()")
        by_id = {r.candidate_id: r for r in results}
        missing = [c.id for c in self.pending if c.id not in by_id]
        if missing:
            raise ValueError(f"tell() is missing results for candidates {missing}")
        for result in results:
            if result.candidate_id not in engine.results:
                engine.record(result)
        members = self.pending
        engine.credit(members)
        engine.absorb(members)
        record = engine.finish_generation(members)
        self.pending = None
        return record

    def run(self, executor) -> None:
        """Ask, evaluate, tell, until generation ``gens`` is done, or until a budget is spent
        (the generation in progress is then finished with the offspring already made, saved, and
        the loop ends), or until the engine drains (Ctrl-C: ``--resume`` finishes the generation)."""
        engine = self.engine
        config = engine.config
        while engine.generation <= config.gens and not engine.draining:
            if len(engine.candidates) >= engine.eval_budget and self.pending is None and not engine.resuming:
                break  # --max-evals reached
            batch = self.ask()
            if not batch and engine.stop_reason is not None:
                self.pending = None  # nothing was made: --resume redoes this generation
                break
            for stage in range(len(engine.stages)):
                if engine.draining:
                    return  # the generation is finished by --resume
                todo = self.stage_todo(batch, stage)
                if stage == 0:
                    engine.on_event("ask", {"generation": engine.generation, "candidates": len(batch),
                                            "todo": len(todo)})
                elif todo:
                    engine.on_event("promote", {"generation": engine.generation, "stage": engine.labels[stage],
                                                "candidates": [c.id for c in todo]})
                for candidate in todo:
                    engine.population.start(candidate.id, stage)
                # The first stage scores each generation on its own seed (--first-seeds), the rest on the run's.
                seed = engine.first_seed(engine.generation) if stage == 0 else config.eval_seed
                executor.run(UnlessDraining(engine, [(c.id, c.code, stage) for c in todo]), seed,
                             engine.claim, engine.record)
                if stage == 0:
                    engine.race(executor)  # re-measure what could reach the top before it is trusted
            if engine.draining:
                return
            self.tell([engine.results[c.id] for c in batch])
            if engine.stop_reason is not None:
                break  # a spent budget: this generation is finished and saved

    def stage_todo(self, batch: list[Candidate], stage: int) -> list[Candidate]:
        """The candidates of ``batch`` still to be scored on ``stage``: on stage 0 all of them;
        on a later stage those promoted from the one before (:func:`engine.ladder.promote_generation`),
        decided from the stored results alone so that a resumed run promotes the same ones."""
        engine = self.engine
        done = engine.stage_results[stage]
        if stage == 0:
            return [c for c in batch if c.id not in done]
        below = engine.stage_results[stage - 1]
        scores = {c.id: below[c.id].fitness for c in batch if c.id in below and below[c.id].ok}
        chosen = set(promote_generation(scores, engine.config.promote, engine.config.promote_above))
        baseline = engine.baseline_id()
        if baseline in scores:
            chosen.add(baseline)
        return [c for c in batch if c.id in chosen and c.id not in done]


class UnlessDraining(ListSource):
    """A generation's tasks, of which none starts once the engine is draining."""

    def __init__(self, engine, tasks: list[tuple]) -> None:
        super().__init__(tasks)
        self.engine = engine

    def take(self):
        return None if self.engine.draining else super().take()

    def exhausted(self) -> bool:
        return self.engine.draining or super().exhausted()
