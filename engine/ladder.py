"""The fidelity ladder: score every candidate on a cheap fitness first and spend the expensive
ones only on candidates that earned them (``--fitness synthetic-pref>dpo --promote 0.25``).

A run's fitness is one plug-in or a list of stages, cheapest first. Every candidate is scored on
stage 0; after a stage, the top ``promote`` fraction of the candidates it scored (and only those
at or above ``promote_above``, when set) go on to the next. Only a candidate scored ``ok`` can be
promoted, so a loss that is invalid, crashes or times out on a cheap stage never reaches an
expensive one.

* Generational mode promotes within each generation, after the whole generation finished the
  stage: the top ``ceil(promote * n)`` of its ``n`` successful candidates (ties by age).
* Steady-state mode (``--async``) uses the asynchronous successive-halving rule (ASHA, Li et al.
  2018, "A System for Massively Parallel Hyperparameter Tuning"): whenever a worker is free, a
  candidate is promoted if it is among the top ``floor(promote * n)`` of all ``n`` scores on its
  stage so far. Early scores wait until enough others exist to rank them against.

Options reach a stage by name: ``--fitness-opt dpo.preset=tiny`` (or a ``[fitness_options.dpo]``
table in TOML); an unqualified option goes to the last (most expensive) stage, where ``--preset``
also goes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterable


@dataclass(frozen=True)
class StageSpec:
    """One rung: how to load its plug-in."""

    spec: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_fitness(fitness: str | list[str]) -> list[str]:
    """The stages named by ``--fitness`` (``a>b>c``) or a TOML list, cheapest first."""
    parts = list(fitness) if isinstance(fitness, (list, tuple)) else str(fitness).split(">")
    parts = [str(p).strip() for p in parts]
    if not parts or any(not p for p in parts):
        raise ValueError(f"fitness: expected a plug-in or a ladder such as 'synthetic-pref>dpo', got {fitness!r}")
    return parts


def split_options(specs: list[str], options: dict[str, Any]) -> list[StageSpec]:
    """Route fitness options to stages (see the module docstring): ``STAGE.KEY`` where STAGE is
    a stage's spec (every stage with that spec) or its label (``cifar10@1``: that stage alone).
    With a single stage every option is that stage's, as written."""
    if len(specs) == 1:
        return [StageSpec(specs[0], dict(options))]
    labels = stage_labels(specs)
    per_stage: list[dict[str, Any]] = [{} for _ in specs]

    def stages_named(name: str) -> list[int]:
        if name in labels:
            return [labels.index(name)]
        return [i for i, spec in enumerate(specs) if spec == name]

    for key, value in options.items():
        if isinstance(value, dict) and stages_named(key):  # a TOML table named after the stage
            for index in stages_named(key):
                per_stage[index].update(value)
            continue
        prefix, dot, rest = key.rpartition(".")
        if dot and stages_named(prefix):
            for index in stages_named(prefix):
                per_stage[index][rest] = value
        else:
            per_stage[-1][key] = value
    return [StageSpec(spec, opts) for spec, opts in zip(specs, per_stage)]


def stage_labels(names: Iterable[str]) -> list[str]:
    """Names the run store files each stage's scores under: the plug-in's name, numbered when
    the same plug-in appears on several rungs (``cifar10@0``, ``cifar10@1``)."""
    names = list(names)
    return [f"{n}@{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def promote_generation(scores: dict[int, float], fraction: float, threshold: float | None) -> list[int]:
    """Generational rule: the ids of the top ``ceil(fraction * n)`` of ``scores`` (candidate id ->
    fitness of the successful ones), best first, ties to the older candidate, at or above
    ``threshold`` when one is set."""
    ranked = sorted(scores, key=lambda cid: (-scores[cid], cid))
    chosen = ranked[:math.ceil(fraction * len(ranked) - 1e-9)]
    return [cid for cid in chosen if threshold is None or scores[cid] >= threshold]


def promote_asha(scores: dict[int, float], promoted: set[int], fraction: float,
                 threshold: float | None) -> list[int]:
    """Steady-state rule: ids not yet promoted that rank among the top ``floor(fraction * n)``
    of all ``n`` scores so far (best first)."""
    ranked = sorted(scores, key=lambda cid: (-scores[cid], cid))
    top = ranked[:math.floor(fraction * len(ranked) + 1e-9)]
    return [cid for cid in top if cid not in promoted and (threshold is None or scores[cid] >= threshold)]


def check_compatible(stages: list) -> None:
    """Every rung must score the same kind of function: a genome written for one runs on all.
    Raises ValueError naming the two plug-ins otherwise."""
    first = stages[0].interface
    for stage in stages[1:]:
        other = stage.interface
        if type(other) is not type(first) and (other.arg_counts != first.arg_counts
                                               or other.signature != first.signature):
            raise ValueError(
                f"fitness ladder: {stages[0].name!r} and {stage.name!r} score different function contracts "
                f"({first.signature!r} vs {other.signature!r}); every stage must take the same loss")
