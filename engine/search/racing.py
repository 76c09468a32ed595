"""Noise-aware ranking: candidates that could reach the top are re-measured on fresh evaluation
seeds before they are trusted (racing, in the manner of successive halving over seeds), every
score is paired with the baseline's on the same seed, and what ranks elites, parents and the
reported best is a lower confidence bound of that paired difference, not one draw.

A fitness measured once is a draw from a distribution over evaluation seeds (problem
instances, initialisations). When its spread is the size of the gains the search reports,
selecting on single draws climbs the noise: the winners are the lucky draws. Pairing with the
baseline on the same seed removes the part of the noise both share (an easy instance is easy
for every loss); the lower bound makes a candidate with one lucky seed rank below one that
gained on four.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from collections.abc import Callable

#: Fresh evaluation seeds for re-measurements are ``eval_seed + SEED_STRIDE * k`` (k = 1, 2, ...),
#: far from the consecutive seeds a plug-in may use inside one evaluation.
SEED_STRIDE = 7919
#: Confirmation seeds are ``eval_seed + CONFIRM_SEEDS + k``: apart from racing's seeds and from
#: the end-of-run validation's (``eval_seed + 1_000_003 + k``).
CONFIRM_SEEDS = 500_009


@dataclass(frozen=True)
class RacingSettings:
    """What racing reads of the run's settings (fields of :class:`engine.config.RunConfig`)."""

    race_seeds: int = 3
    race_budget: int = 6
    race_top: int = 5
    confidence: float = 1.0
    confirm_seeds: int = 4


@dataclass(frozen=True)
class Estimate:
    """What the run knows of a candidate's fitness.

    Attributes:
        mean: Mean fitness over its evaluation seeds.
        gain: Mean paired difference to the baseline on the seeds both were scored on.
        se: Standard error of ``gain`` (with one seed: the run's pooled spread of paired
            differences, or 0 before any candidate has two).
        seeds: Evaluation seeds it was scored on.
        lower: ``baseline mean + gain - confidence * se``: a conservative fitness on the
            plug-in's own scale, what elites, parents and the best are ranked by.
        upper: The same with ``+ confidence * se``.
    """

    mean: float
    gain: float
    se: float
    seeds: int
    lower: float
    upper: float


class Racing:
    """Per-seed scores of the run's candidates and the estimates made from them.

    Args:
        settings: Seeds per candidate, re-measurements per generation, confidence.
        eval_seed: The run's own evaluation seed (every candidate's first score).
        baseline: Returns the baseline seed's candidate id (None: no pairing).
        floor: The score a failed re-measurement counts as (the plug-in's fitness floor).
    """

    def __init__(self, settings: RacingSettings, eval_seed: int, baseline: Callable[[], int | None],
                 floor: float) -> None:
        self.settings = settings
        self.eval_seed = eval_seed
        self.baseline = baseline
        self.floor = floor
        self.samples: dict[int, dict[int, float]] = {}
        self._pooled: float | None = None
        self._memo: dict[tuple, Estimate | None] = {}  # estimates since the last score came in

    @property
    def enabled(self) -> bool:
        return self.settings.race_seeds > 0

    def fresh_seed(self, k: int) -> int:
        return self.eval_seed + SEED_STRIDE * k

    def confirmation_seeds(self) -> list[int]:
        return [self.eval_seed + CONFIRM_SEEDS + k for k in range(self.settings.confirm_seeds)]

    def confirmation(self, eligible: set[int]) -> list[tuple[int, int]]:
        """The last re-measurements of a run, ``(candidate id, seed)`` not yet scored: the
        ``race_top`` best of ``eligible`` by lower bound and the baseline, each on
        ``confirm_seeds`` fresh seeds.

        Racing chooses whom to re-measure on the seeds it measures on, and every candidate is
        raced on the same few seeds, so the best bounds among many candidates are partly luck on
        those seeds (the winner's curse; with a suite that draws tasks by seed, luck on those
        tasks). Seeds that chose nothing make the final ranking less lucky. The best are picked
        on the other seeds only, so a resumed run confirms the same ones."""
        if not self.enabled or self.settings.confirm_seeds < 1:
            return []
        seeds = self.confirmation_seeds()
        chosen_on = Racing(self.settings, self.eval_seed, self.baseline, self.floor)
        chosen_on.samples = {cid: {s: v for s, v in by_seed.items() if s not in seeds}
                             for cid, by_seed in self.samples.items()}
        base_id = self.baseline()
        estimates = {cid: e for cid, e in chosen_on.estimates().items()
                     if cid in eligible and cid != base_id and e is not None}
        top = sorted(estimates, key=lambda cid: (-estimates[cid].lower, cid))[:self.settings.race_top]
        if not top:
            return []
        everyone = top + ([base_id] if base_id is not None else [])
        return [(cid, seed) for seed in seeds for cid in everyone if seed not in self.samples.get(cid, {})]

    def add(self, candidate_id: int, seed: int, fitness: float | None) -> None:
        """One score (None: the evaluation failed on that seed and counts as the floor)."""
        value = self.floor if fitness is None or not math.isfinite(fitness) else float(fitness)
        self.samples.setdefault(candidate_id, {})[int(seed)] = value
        self._pooled = None
        self._memo.clear()

    def seeds_of(self, candidate_id: int) -> int:
        return len(self.samples.get(candidate_id, {}))

    # -- estimates ------------------------------------------------------------------------------
    def _differences(self, candidate_id: int) -> list[float]:
        own = self.samples.get(candidate_id, {})
        base_id = self.baseline()
        base = self.samples.get(base_id, {}) if base_id is not None else {}
        if base_id is None or not base:
            return list(own.values())
        return [own[s] - base[s] for s in sorted(own) if s in base]

    def pooled_sd(self) -> float:
        """The spread of paired differences, pooled over candidates scored on two seeds or more."""
        if self._pooled is not None:
            return self._pooled
        squares, dof = 0.0, 0
        base_id = self.baseline()
        for cid in self.samples:
            if cid == base_id:
                continue  # its differences to itself are zero: they say nothing of the noise
            diffs = self._differences(cid)
            if len(diffs) >= 2:
                mean = statistics.fmean(diffs)
                squares += sum((d - mean) ** 2 for d in diffs)
                dof += len(diffs) - 1
        self._pooled = math.sqrt(squares / dof) if dof else 0.0
        return self._pooled

    def estimate(self, candidate_id: int, pooled: float | None = None) -> Estimate | None:
        base_id = self.baseline()
        key = (candidate_id, base_id, pooled)
        if key not in self._memo:  # ranking asks for every candidate's estimate many times per score
            self._memo[key] = self._estimate(candidate_id, base_id, pooled)
        return self._memo[key]

    def _estimate(self, candidate_id: int, base_id: int | None, pooled: float | None) -> Estimate | None:
        own = self.samples.get(candidate_id)
        if not own:
            return None
        base = self.samples.get(base_id, {}) if base_id is not None else {}
        diffs = self._differences(candidate_id)
        paired = base_id is not None and bool(base) and bool(diffs)
        if not diffs:  # no seed in common with the baseline yet: its first seed stands alone
            diffs = [own[s] - base.get(s, own[s]) for s in own] if paired else list(own.values())
        gain = statistics.fmean(diffs)
        if len(diffs) >= 2:
            se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        else:
            se = self.pooled_sd() if pooled is None else pooled
        centre = (statistics.fmean(base.values()) + gain) if paired else gain
        z = self.settings.confidence
        return Estimate(mean=statistics.fmean(own.values()), gain=gain if paired else math.nan, se=se,
                        seeds=len(own), lower=centre - z * se, upper=centre + z * se)

    def estimates(self) -> dict[int, Estimate]:
        pooled = self.pooled_sd()
        return {cid: self.estimate(cid, pooled) for cid in self.samples}

    # -- what to measure next -------------------------------------------------------------------
    def due(self, eligible: set[int]) -> list[tuple[int, int]]:
        """The re-measurements of the next round, ``(candidate id, seed)``: candidates of
        ``eligible`` (scored successfully on the first stage) whose upper bound reaches the lower
        bound of the ``race_top``-th best, fewest seeds first among equals, each taken to twice
        its seeds (successive halving over seeds), within ``race_budget`` evaluations; the
        baseline is measured on every seed a contender gets, so each score stays paired."""
        if not self.enabled:
            return []
        most = 1 + self.settings.race_seeds
        estimates = {cid: e for cid, e in self.estimates().items() if cid in eligible and e is not None}
        if not estimates:
            return []
        ranked = sorted(estimates.values(), key=lambda e: e.lower, reverse=True)
        bar = ranked[min(self.settings.race_top, len(ranked)) - 1].lower
        base_id = self.baseline()
        contenders = sorted(
            (cid for cid, e in estimates.items() if e.seeds < most and e.upper >= bar and cid != base_id),
            key=lambda cid: (-estimates[cid].upper, cid),
        )
        budget = self.settings.race_budget
        plan: list[tuple[int, int]] = []
        base_seeds = set(self.samples.get(base_id, {})) if base_id is not None else set()
        for cid in contenders:
            have = self.samples[cid]
            want = min(2 * len(have), most) - len(have)
            new = []
            k = 1
            while len(new) < want:
                seed = self.fresh_seed(k)
                if seed not in have:
                    new.append(seed)
                k += 1
            extra_base = [s for s in new if base_id is not None and s not in base_seeds]
            if len(plan) + len(new) + len(extra_base) > budget:
                break
            plan.extend((cid, s) for s in new)
            plan.extend((base_id, s) for s in extra_base)
            base_seeds.update(extra_base)
        return plan


def run_estimates(data) -> dict[int, Estimate]:
    """Per-candidate estimates of a run read back (:class:`archives.reading.RunData`: its
    ``seed_scores``, baseline and settings), when it re-measured anything; else empty."""
    if not any(len(scores) > 1 for scores in data.seed_scores.values()):
        return {}
    baseline = next((c.id for c in data.candidates.values() if data.baseline and c.is_seed
                     and c.name == data.baseline), None)
    scores = [r.fitness for r in data.results.values() if r.ok]
    racing = Racing(RacingSettings(confidence=float(data.config.get("confidence", 1.0))),
                    int(data.config.get("eval_seed", 0) or 0), lambda: baseline, min(scores) if scores else 0.0)
    for cid, by_seed in data.seed_scores.items():
        for seed, value in by_seed.items():
            racing.add(cid, seed, value)
    return {cid: e for cid, e in racing.estimates().items() if e is not None}


def ranked(data) -> list:
    """A run's successfully scored candidates with their first results, in the run's own order:
    by the lower confidence bound where it re-measured (:func:`run_estimates`), else by score."""
    estimates = run_estimates(data)
    scored = data.scored()
    if estimates:
        scored.sort(key=lambda pair: (-estimates[pair[0].id].lower if pair[0].id in estimates else math.inf,
                                      pair[0].id))
    return scored
