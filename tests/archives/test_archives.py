"""The run's MAP-Elites grid: the best per cell, statistics, and out-of-range or non-finite
descriptors clipped."""
import math

import pytest

from archives.grid import MapElitesArchive
from fitness.base import Descriptor

SPACE = [Descriptor("a", 0.0, 1.0, 4), Descriptor("b", -1.0, 1.0, 2)]


def test_grid_keeps_the_best_per_cell():
    archive = MapElitesArchive(SPACE, fitness_floor=-1.0)
    assert archive.add(0, 0.5, {"a": 0.1, "b": -0.5}) == "new"
    assert archive.add(1, 0.4, {"a": 0.12, "b": -0.6}) == "not_added"
    assert archive.add(2, 0.7, {"a": 0.05, "b": -0.9}) == "improved"
    assert archive.add(3, 0.1, {"a": 0.9, "b": 0.9}) == "new"
    elites = archive.elites()
    assert [e.candidate_id for e in elites] == [2, 3]
    stats = archive.stats()
    assert stats["elites"] == 2 and stats["cells"] == 8
    assert stats["coverage"] == pytest.approx(2 / 8)
    assert stats["qd_score"] == pytest.approx((0.7 + 1) + (0.1 + 1))


def test_grid_clips_out_of_range_and_non_finite_descriptors():
    archive = MapElitesArchive(SPACE)
    archive.add(0, 1.0, {"a": 99.0, "b": math.nan})
    (elite,) = archive.elites()
    assert elite.cell == (3, 0)
    assert elite.descriptors == (1.0, -1.0)
