"""The MAP-Elites grid (Mouret & Clune, 2015) over behaviour descriptors, on pyribs'
GridArchive with object solutions: each cell keeps the best candidate whose descriptors
fall in it. Descriptors outside an axis' range land in its edge bins."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


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
        space: The axes (``fitness.Descriptor``), in order.
        fitness_floor: The QD score counts fitness above this value.
    """

    def __init__(self, space: Sequence, fitness_floor: float = 0.0) -> None:
        from ribs.archives import GridArchive

        if not space:
            raise ValueError("a MAP-Elites archive needs at least one descriptor axis")
        self.space = tuple(space)
        self.names = tuple(d.name for d in self.space)
        self.fitness_floor = fitness_floor
        self._grid = GridArchive(
            solution_dim=(), dims=[d.bins for d in self.space], ranges=[(d.low, d.high) for d in self.space],
            solution_dtype=object, qd_score_offset=fitness_floor,
        )
        self._elites: list[ArchiveElite] | None = None

    def vector(self, descriptors: dict[str, float]) -> np.ndarray:
        """Descriptor values in axis order; missing or non-finite values sit at an axis' low end."""
        values = []
        for axis in self.space:
            value = descriptors.get(axis.name, axis.low)
            values.append(value if isinstance(value, (int, float)) and math.isfinite(value) else axis.low)
        return np.clip(np.array(values, dtype=float), [d.low for d in self.space], [d.high for d in self.space])

    def add(self, candidate_id: int, fitness: float, descriptors: dict[str, float]) -> str:
        """Offer a candidate; returns ``new`` (empty cell), ``improved`` or ``not_added``."""
        status = self._grid.add(
            np.array([candidate_id], dtype=object), np.array([fitness], dtype=float),
            self.vector(descriptors)[None, :],
        )["status"][0]
        if status:
            self._elites = None
        return {0: "not_added", 1: "improved", 2: "new"}[int(status)]

    def add_many(self, entries: list[tuple[int, float, dict[str, float]]]) -> None:
        """Offer several candidates at once (one pyribs call per generation instead of one each)."""
        if not entries:
            return
        status = self._grid.add(
            np.array([e[0] for e in entries] + [None], dtype=object)[:-1],
            np.array([e[1] for e in entries], dtype=float),
            np.stack([self.vector(e[2]) for e in entries]),
        )["status"]
        if np.any(status):
            self._elites = None

    def elites(self) -> list[ArchiveElite]:
        """All elites, best first (cached until the archive changes: operators ask often)."""
        if self._elites is None:
            data = self._grid.data(["solution", "objective", "measures", "index"])
            cells = self._grid.int_to_grid_index(data["index"]) if len(data["index"]) else []
            elites = [
                ArchiveElite(int(solution), float(objective), tuple(int(i) for i in cell),
                             tuple(float(m) for m in measures))
                for solution, objective, measures, cell in zip(data["solution"], data["objective"], data["measures"], cells)
            ]
            self._elites = sorted(elites, key=lambda e: (-e.fitness, e.candidate_id))
        return list(self._elites)

    @property
    def cells(self) -> int:
        return int(np.prod([d.bins for d in self.space]))

    def stats(self) -> dict[str, float]:
        stats = self._grid.stats
        return {
            "elites": int(stats.num_elites),
            "cells": self.cells,
            "coverage": float(stats.coverage),
            "qd_score": float(stats.qd_score),
        }
