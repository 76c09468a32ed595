"""The MAP-Elites grid (Mouret & Clune, 2015) over behaviour descriptors: each cell keeps the
best candidate whose descriptors fall in it. The one home of the grid's knowledge: the axes'
binning, the generic code-size axis, and the grid itself, used while a run goes and when a run
is read back (``replay --at-gen`` rebuilds the grid through the same class).

The binning and the acceptance rule are pyribs' ``GridArchive`` (with its default settings:
a value lands in bin ``floor((bins * (v - low) + 1e-6) / (high - low))``, clipped to the axis;
a candidate enters a cell that is empty or whose elite it beats strictly); a test checks that
both agree on random data. The grid is written here rather than taken from pyribs because
importing pyribs costs the driver several seconds and a few hundred MB (numba, scipy,
scikit-learn, pandas), more than the whole rest of a run's start-up, for a structure of a few
dozen lines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

#: The generic code-size axis every run adds to the plug-in's descriptors (syntax nodes of the
#: normalised code). Not stored with the evaluations: a rebuilt grid recomputes it.
CODE_SIZE = "code_size"
CODE_SIZE_RANGE = (0.0, 240.0)
#: Added before truncating to a bin index, as pyribs does (float rounding at bin edges).
EPSILON = 1e-6


@dataclass(frozen=True)
class GridAxis:
    """One axis of a grid; values outside ``[low, high]`` fall in the edge bins. Any object with
    these attributes (``fitness.Descriptor``) serves as an axis."""

    name: str
    low: float
    high: float
    bins: int
    help: str = ""


def code_size_axis(bins: int) -> GridAxis:
    low, high = CODE_SIZE_RANGE
    return GridAxis(CODE_SIZE, low, high, bins, "syntax nodes of the normalised code")


def _field(axis: Any, key: str) -> Any:
    return axis[key] if isinstance(axis, dict) else getattr(axis, key)


def axis_value(axis: Any, value: Any) -> float:
    """A descriptor value as the grid stores it: missing or non-finite at the low end, clipped.
    ``axis`` is an axis object or its dict (``name``, ``low``, ``high``, ``bins``)."""
    low, high = float(_field(axis, "low")), float(_field(axis, "high"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        value = low
    return min(max(float(value), low), high)


def axis_bin(axis: Any, value: float) -> int:
    """The bin of a stored value along one axis."""
    low, high, bins = float(_field(axis, "low")), float(_field(axis, "high")), int(_field(axis, "bins"))
    index = int((bins * (value - low) + EPSILON) / (high - low))
    return min(max(index, 0), bins - 1)


def bin_range(axis: Any, index: int) -> tuple[float, float]:
    """The values a bin covers, ``[start, end)``."""
    low, high, bins = float(_field(axis, "low")), float(_field(axis, "high")), int(_field(axis, "bins"))
    width = (high - low) / bins
    return low + index * width, low + (index + 1) * width


@dataclass(frozen=True)
class ArchiveElite:
    """The best candidate of one cell."""

    candidate_id: int
    fitness: float
    cell: tuple[int, ...]
    descriptors: tuple[float, ...]


class MapElitesArchive:
    """A grid archive; ``add`` is called once per successful evaluation.

    Args:
        space: The axes (``fitness.Descriptor``, :class:`GridAxis`, or their dicts), in order.
        fitness_floor: The QD score counts fitness above this value.
    """

    def __init__(self, space: Sequence, fitness_floor: float = 0.0) -> None:
        if not space:
            raise ValueError("a MAP-Elites archive needs at least one descriptor axis")
        self.space = tuple(space)
        for axis in self.space:
            if not float(_field(axis, "high")) > float(_field(axis, "low")) or int(_field(axis, "bins")) < 1:
                raise ValueError(f"grid axis {_field(axis, 'name')!r} needs high > low and bins >= 1")
        self.names = tuple(_field(axis, "name") for axis in self.space)
        self.fitness_floor = fitness_floor
        self._cells: dict[tuple[int, ...], ArchiveElite] = {}
        self._elites: list[ArchiveElite] | None = None

    def vector(self, descriptors: dict[str, float]) -> tuple[float, ...]:
        """Descriptor values in axis order; missing or non-finite values sit at an axis' low end."""
        return tuple(axis_value(axis, descriptors.get(name)) for axis, name in zip(self.space, self.names))

    def cell_of(self, vector: Sequence[float]) -> tuple[int, ...]:
        return tuple(axis_bin(axis, value) for axis, value in zip(self.space, vector))

    def add(self, candidate_id: int, fitness: float, descriptors: dict[str, float]) -> str:
        """Offer a candidate; returns ``new`` (empty cell), ``improved`` or ``not_added``."""
        vector = self.vector(descriptors)
        cell = self.cell_of(vector)
        current = self._cells.get(cell)
        if current is not None and not fitness > current.fitness:
            return "not_added"
        self._cells[cell] = ArchiveElite(int(candidate_id), float(fitness), cell, vector)
        self._elites = None
        return "new" if current is None else "improved"

    def add_many(self, entries: list[tuple[int, float, dict[str, float]]]) -> None:
        """Offer several candidates in order (of equal fitness in one cell, the first stays)."""
        for candidate_id, fitness, descriptors in entries:
            self.add(candidate_id, fitness, descriptors)

    def elites(self) -> list[ArchiveElite]:
        """All elites, best first (cached until the archive changes: operators ask often)."""
        if self._elites is None:
            self._elites = sorted(self._cells.values(), key=lambda e: (-e.fitness, e.candidate_id))
        return list(self._elites)

    def __len__(self) -> int:
        return len(self._cells)

    @property
    def cells(self) -> int:
        return math.prod(int(_field(axis, "bins")) for axis in self.space)

    def stats(self) -> dict[str, float]:
        return {
            "elites": len(self._cells),
            "cells": self.cells,
            "coverage": len(self._cells) / self.cells,
            "qd_score": float(sum(e.fitness - self.fitness_floor for e in self._cells.values())),
        }
