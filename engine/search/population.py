"""The population: every candidate of a run and every result it got, the tables that keep a
known genome from being trained twice (normalised-AST hash, behavioural fingerprint), and the
run store writes for both. It owns no policy: what is made and what is kept are decided by the
breeder and the elites."""
from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field

from engine.candidate import Candidate, EvalResult, Status
from engine.genome import GenomeError, check_genome, code_hash
from engine.helpers import identifier


@dataclass
class Tally:
    """Run-wide counters and the recent failures that operators are shown (``errors``, newest
    last). Shared by the population and the breeder; saved with every generation."""

    counters: dict[str, int] = field(default_factory=lambda: {
        "hash_duplicates": 0, "operator_failures": 0, "unfilled_slots": 0})
    errors: deque = field(default_factory=lambda: deque(maxlen=8))


class Population:
    """Candidates and results of one run, per fidelity stage.

    Args:
        store: The run store every candidate and result is written to.
        labels: What the store files each stage's results under.
        tally: The run's counters and recent failures.
    """

    def __init__(self, store, labels: list[str], tally: Tally) -> None:
        self.store = store
        self.labels = list(labels)
        self.tally = tally
        self.candidates: dict[int, Candidate] = {}
        #: Results per stage (candidate id -> result); stage 0's are :attr:`results`.
        self.stage_results: list[dict[int, EvalResult]] = [{} for _ in self.labels]
        #: Stage of each evaluation handed to an executor and not yet recorded.
        self.running: dict[int, int] = {}
        self.by_hash: dict[str, int] = {}
        self.by_fingerprint: dict[str, int] = {}
        self.next_id = 0
        self._llm_links: dict[int, tuple[int, ...]] = {}

    @property
    def results(self) -> dict[int, EvalResult]:
        """First-stage results, which every candidate gets."""
        return self.stage_results[0]

    def __len__(self) -> int:
        return len(self.candidates)

    # -- admitting ------------------------------------------------------------------------------
    def admit(self, name: str, code: str, thought: str, parents: tuple[int, ...], operator: str, variation: str,
              generation: int, arg_counts, llm_calls: tuple[int, ...] = (),
              ) -> tuple[Candidate | None, EvalResult | None]:
        """A new candidate from proposed code, unless its normalised AST is known (then None).

        A genome that fails the static check is still admitted, with an ``invalid`` result to
        record; so is one that cannot even be hashed (a recursion bomb): nothing an operator
        proposes can raise here.
        """
        error = None
        try:
            check_genome(code, arg_counts)
            digest = code_hash(code)
        except Exception as exc:  # noqa: BLE001 - GenomeError, or RecursionError/MemoryError from a hostile genome
            error = str(exc) if isinstance(exc, GenomeError) else f"cannot check the genome: {type(exc).__name__}"
            digest = "invalid-" + hashlib.sha256(str(code).encode("utf-8", "replace")).hexdigest()[:16]
        if digest in self.by_hash:
            self.tally.counters["hash_duplicates"] += 1
            return None, None
        candidate = Candidate(
            id=self.next_id, name=identifier(name), code=code, thought=thought, parents=tuple(parents),
            operator=operator, generation=generation, code_hash=digest, variation=variation,
        )
        self.next_id += 1
        self.by_hash[digest] = candidate.id
        self.candidates[candidate.id] = candidate
        if llm_calls:
            self._llm_links[candidate.id] = tuple(llm_calls)
        invalid = None
        if error is not None:
            invalid = EvalResult(candidate.id, Status.INVALID, error=error)
            self.tally.errors.append((candidate.name, error))
        return candidate, invalid

    def save(self, batch: list[Candidate]) -> None:
        """Write new candidates to the run store, linked to the LLM calls that made them."""
        self.store.add_candidates(batch)
        for candidate in batch:
            self.store.link_llm_calls(self._llm_links.pop(candidate.id, ()), candidate.id)

    # -- evaluations ----------------------------------------------------------------------------
    def start(self, candidate_id: int, stage: int) -> None:
        """Mark an evaluation as handed to an executor."""
        self.running[candidate_id] = stage

    def stage_running(self, candidate_id: int) -> int | None:
        return self.running.get(candidate_id)

    def claim(self, candidate_id: int, fingerprint: str) -> int | None:
        """Behavioural dedup: the earlier candidate with this fingerprint, or None (new)."""
        known = self.by_fingerprint.get(fingerprint)
        if known is not None and known != candidate_id:
            return known
        self.by_fingerprint[fingerprint] = candidate_id
        return None

    def record(self, result: EvalResult) -> int:
        """Save one finished evaluation (committed before anything else happens); returns its stage."""
        stage = self.running.pop(result.candidate_id, 0)
        self.store.add_evaluation(result, self.labels[stage])
        self.stage_results[stage][result.candidate_id] = result
        if result.status.failed:
            name = self.candidates[result.candidate_id].name if result.candidate_id in self.candidates else "?"
            self.tally.errors.append((name, result.error or str(result.status)))
        return stage

    # -- views ----------------------------------------------------------------------------------
    def top(self, candidate_id: int) -> tuple[int, EvalResult] | None:
        """The highest stage on which the candidate was scored successfully, and that result."""
        for stage in reversed(range(len(self.stage_results))):
            result = self.stage_results[stage].get(candidate_id)
            if result is not None and result.ok:
                return stage, result
        return None

    def seeds(self) -> list[Candidate]:
        return [c for c in self.candidates.values() if c.is_seed]

    def seed_named(self, name: str) -> int | None:
        """The id of the seed called ``name`` (made safe as candidate names are), or None."""
        wanted = identifier(name)
        return next((c.id for c in self.candidates.values() if c.is_seed and c.name == wanted), None)

    def unscored(self) -> list[Candidate]:
        """Candidates without a first-stage result, in id order."""
        return [c for cid, c in sorted(self.candidates.items()) if cid not in self.results]

    # -- resuming -------------------------------------------------------------------------------
    def restore(self) -> list[Candidate]:
        """Reload candidates, results and the dedup tables from the store; returns the candidates."""
        candidates = self.store.candidates()
        for stage, label in enumerate(self.labels):
            self.stage_results[stage].update((r.candidate_id, r) for _, r in self.store.evaluations(label))
        for candidate in candidates:
            self.candidates[candidate.id] = candidate
            self.by_hash.setdefault(candidate.code_hash, candidate.id)
        self.next_id = max(self.candidates, default=-1) + 1
        for result in self.results.values():
            if result.fingerprint and result.status != Status.DUPLICATE:
                self.by_fingerprint.setdefault(result.fingerprint, result.candidate_id)
        return candidates
