"""Validation: the run's top losses re-scored where selection never looked.

A run's best is chosen on the meta-train tasks and the run's own evaluation seeds; its score
there is biased upwards by the choosing. At the end of every run, the top ``--validate-top``
distinct losses (by the run's ranking) and the baseline seed are scored again on the plug-in's
held-out tasks (a task suite's meta-test split; for a plug-in without one, the same task) on
``--validate-seeds`` fresh evaluation seeds that neither selection nor racing used. Each loss's
held-out gain over the baseline is the mean of its per-seed differences to the baseline on the
same seeds, with the standard error of that mean; a loss that falls well below the baseline on
any held-out task is flagged.

The validated best is the highest gain minus one standard error among those losses, so its gain
on those seeds is the best of several draws and biased upwards in turn. When there was a choice
(more than one loss), the validated best and the baseline are scored on as many fresh seeds
again (the confirmation seeds), and the validated best's reported gain, standard error and
verdict are those of the confirmation alone; the gain on the choosing seeds stays beside them.

Scores are stored in the run store (``fitness_name`` ``validation:<plug-in>``, with their
seed), so ``python -m engine validate RUN`` re-scores only what is missing, and can validate a
run again on another fitness plug-in.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from archives.store import RunStore
from engine.candidate import Candidate, EvalResult
from engine.helpers import fitness_label
from engine.search.racing import ranked

#: Validation seeds are ``eval_seed + VALIDATION_SEEDS + k``: apart from the run's own seed and
#: from the seeds racing re-measures on (``eval_seed + 7919 k`` for small k).
VALIDATION_SEEDS = 1_000_003
#: The validated best's confirmation seeds are ``eval_seed + CONFIRMATION_SEEDS + k``.
CONFIRMATION_SEEDS = 1_500_007
#: A held-out task on which a loss's mean gain is below this (in the suite's normalised units),
#: or below three standard errors, is flagged as a collapse.
COLLAPSE = -0.05


@dataclass(frozen=True)
class ValidationSettings:
    """What validation reads of the run's settings (fields of :class:`engine.config.RunConfig`)."""

    validate_top: int = 5
    validate_seeds: int = 4
    validate_confirm_seeds: int = 8
    eval_seed: int = 0


def held_out_options(fitness, options: dict[str, Any]) -> dict[str, Any]:
    """The plug-in's options for validation: its own held-out part where it declares one
    (``validation_options()``, e.g. a suite's meta-test split), else the same options."""
    declared = getattr(fitness, "validation_options", None)
    return {**options, **(declared() if callable(declared) else {})}


def held_out_stage(fitness, spec: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where a run on ``fitness`` (built from ``spec`` and ``options``) is validated: held-out tasks
    of another plug-in with the same function contract when the plug-in names one
    (``validation_fitness() -> (spec, options)``: synthetic-pref names pref-suite's meta-test
    split), else its own held-out part (:func:`held_out_options`)."""
    other = getattr(fitness, "validation_fitness", None)
    if callable(other):
        other_spec, other_options = other()
        return other_spec, dict(other_options)
    return spec, held_out_options(fitness, options)


def validation_label(fitness_name: str, options: dict[str, Any]) -> str:
    return f"validation:{fitness_label(fitness_name, options)}"


def choose(data, top: int) -> tuple[list[Candidate], Candidate | None]:
    """The ``top`` best distinct losses of a run by its own ranking (the lower confidence bound
    where it re-measured, else the first score), the baseline seed left out; and the baseline."""
    scored = ranked(data)
    baseline = next((c for c in data.candidates.values() if data.baseline and c.is_seed and c.name == data.baseline),
                    None)
    chosen = [c for c, _ in scored if baseline is None or c.id != baseline.id][:top]
    return chosen, baseline


def validate(store: RunStore, data, executor, settings: ValidationSettings, fitness_name: str,
             options: dict[str, Any], floor: float,
             on_result: Callable[[EvalResult, int], None] | None = None, stage: int = 0) -> dict[str, Any] | None:
    """Score the run's top losses and its baseline on fresh seeds with ``executor`` (whose
    plug-in is the validation fitness), store every score as it finishes, and return (and store
    as the run's ``validation`` meta) the summary. Scores already stored are not run again.
    ``stage`` is the executor's stage that serves the validation fitness."""
    if settings.validate_top < 1 or settings.validate_seeds < 1:
        return None
    chosen, baseline = choose(data, settings.validate_top)
    if not chosen:
        return None
    label = validation_label(fitness_name, options)
    seeds = [settings.eval_seed + VALIDATION_SEEDS + k for k in range(settings.validate_seeds)]
    scores: dict[tuple[int, int], EvalResult] = {
        (r.candidate_id, seed): r for _, seed, r in store.seed_evaluations(label)}
    everyone = chosen + ([baseline] if baseline is not None else [])

    def scored_all(candidates: list[Candidate], on_seeds: list[int]) -> None:
        for seed in on_seeds:
            todo = [c for c in candidates if (c.id, seed) not in scores]
            if not todo:
                continue

            def record(result: EvalResult, seed: int = seed) -> None:
                store.add_evaluation(result, label, eval_seed=seed)
                scores[(result.candidate_id, seed)] = result
                if on_result is not None:
                    on_result(result, seed)

            # One candidate at most once per call: a result names its candidate, not its seed.
            executor.run([(c.id, c.code, stage, seed) for c in todo], seed, None, record)

    scored_all(everyone, seeds)
    summary = summarise(label, chosen, baseline, seeds, scores, floor)
    best = summary["best"]
    if (best is not None and baseline is not None and settings.validate_confirm_seeds > 0
            and sum(r["gain"] is not None for r in summary["losses"]) > 1):
        confirmation = [settings.eval_seed + CONFIRMATION_SEEDS + k for k in range(settings.validate_confirm_seeds)]
        scored_all([c for c in chosen if c.id == best["id"]] + [baseline], confirmation)
        summary = summarise(label, chosen, baseline, seeds, scores, floor, confirmation)
    store.set_meta("validation", summary)
    history = store.meta("validations", {}) or {}
    history[label] = summary
    store.set_meta("validations", history)
    return summary


def summarise(label: str, chosen: list[Candidate], baseline: Candidate | None, seeds: list[int],
              scores: dict[tuple[int, int], EvalResult], floor: float,
              confirmation: list[int] | None = None) -> dict[str, Any]:
    """Held-out gains over the baseline, paired by seed, with standard errors and flags; with
    ``confirmation`` seeds, the validated best's gain is the one on those seeds alone."""

    def value(cid: int, seed: int) -> float | None:
        result = scores.get((cid, seed))
        if result is None:
            return None  # not scored (an interrupted validation)
        return result.fitness if result.ok else floor

    def gains(candidate: Candidate, on_seeds: list[int]) -> dict[str, Any]:
        base = {s: value(baseline.id, s) for s in on_seeds} if baseline is not None else {}
        own = {s: value(candidate.id, s) for s in on_seeds}
        paired = [s for s in on_seeds if own[s] is not None and (baseline is None or base.get(s) is not None)]
        diffs = [own[s] - (base[s] if baseline is not None else 0.0) for s in paired]
        failed = sum(1 for s in on_seeds if (candidate.id, s) in scores and not scores[(candidate.id, s)].ok)
        return {
            "seeds": len(diffs), "failed_seeds": failed,
            "mean": statistics.fmean(own[s] for s in paired) if paired else None,
            "gain": statistics.fmean(diffs) if diffs else None,
            "gain_se": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) >= 2 else None,
        }

    base = {s: value(baseline.id, s) for s in seeds} if baseline is not None else {}
    rows = []
    for candidate in chosen:
        row: dict[str, Any] = {"id": candidate.id, "name": candidate.name, **gains(candidate, seeds)}
        per_task = _per_task(candidate.id, seeds, scores)
        if per_task:
            worst = min(per_task, key=per_task.__getitem__)
            row["per_task"] = per_task
            row["worst_task"], row["worst_task_gain"] = worst, per_task[worst]
        row["flag"] = _flag(row)
        rows.append(row)
    usable = [r for r in rows if r["gain"] is not None]
    best = max(usable, key=lambda r: r["gain"] - (r["gain_se"] or 0.0)) if usable else None
    if best is not None and confirmation:
        candidate = next(c for c in chosen if c.id == best["id"])
        confirmed = gains(candidate, confirmation)
        if confirmed["gain"] is not None:
            best = {**best, **confirmed, "confirmed": True, "confirmation_seed_values": list(confirmation),
                    "chosen_among": len(usable), "chosen_gain": best["gain"], "chosen_gain_se": best["gain_se"],
                    "chosen_seeds": best["seeds"], "flag": _flag({**best, **confirmed})}
    base_name = baseline.name if baseline is not None else None
    return {
        "fitness": label, "seeds": len(seeds), "seed_values": seeds, "baseline": base_name,
        "baseline_mean": statistics.fmean(v for v in base.values() if v is not None)
        if any(v is not None for v in base.values()) else None,
        "losses": rows, "best": best, "verdict": _verdict(best, base_name, label),
        "chosen_by": "the run's ranking (top distinct losses); the best here is the highest gain minus one "
                     "standard error among them, and its gain (with more than one loss) is measured again on "
                     "fresh confirmation seeds that chose nothing",
    }


def _per_task(candidate_id: int, seeds: list[int], scores: dict[tuple[int, int], EvalResult]) -> dict[str, float]:
    """Mean gain per held-out task over seeds, where the plug-in reports tasks (task suites)."""
    by_task: dict[str, list[float]] = {}
    for seed in seeds:
        result = scores.get((candidate_id, seed))
        if result is None or not result.ok:
            continue
        for task, entry in (result.metrics.get("per_task") or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("gain"), (int, float)):
                by_task.setdefault(task, []).append(float(entry["gain"]))
    return {task: statistics.fmean(values) for task, values in by_task.items()}


def _flag(row: dict[str, Any]) -> str | None:
    flags = []
    if row["failed_seeds"]:
        flags.append(f"failed on {row['failed_seeds']} seed(s)")
    worst = row.get("worst_task_gain")
    if worst is not None and worst < COLLAPSE:
        flags.append(f"collapses on {row['worst_task']} ({worst:+.3f})")
    if row["gain"] is not None and row["gain_se"] is not None and row["gain"] < -2 * row["gain_se"]:
        flags.append("worse than the baseline")
    return "; ".join(flags) or None


def _verdict(best: dict[str, Any] | None, baseline: str | None, label: str) -> str:
    if best is None:
        return "validation scored nothing"
    if baseline is None:
        return f"validated best {best['name']}: {best['gain']:+.4f} on {label} (no baseline to compare with)"
    se = best["gain_se"]
    if se is None:
        return f"validated best {best['name']}: {best['gain']:+.4f} over {baseline} on one seed (no standard error)"
    z = best["gain"] / se if se > 0 else (math.inf if best["gain"] > 0 else -math.inf)
    if z >= 2:
        verdict = f"beats {baseline} on held-out data by {z:.1f} standard errors"
    elif z > -2:
        verdict = f"is not distinguishable from {baseline} on held-out data ({z:+.1f} standard errors)"
    else:
        verdict = f"is worse than {baseline} on held-out data ({z:+.1f} standard errors)"
    if best.get("confirmed"):
        return (f"validated best {best['name']} (chosen among {best['chosen_among']} at "
                f"{best['chosen_gain']:+.4f} ± {best['chosen_gain_se'] or 0.0:.4f}): gain {best['gain']:+.4f} ± "
                f"{se:.4f} over {best['seeds']} more fresh seeds that chose nothing; it {verdict}")
    return (f"validated best {best['name']}: gain {best['gain']:+.4f} ± {se:.4f} over {best['seeds']} fresh seeds; "
            f"it {verdict}")
