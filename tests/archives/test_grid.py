"""The run's MAP-Elites grid agrees with pyribs' GridArchive (cells, elites, ties, edge
values, QD score, coverage) on random data."""
import math
import random

import numpy as np
import pytest

from archives.grid import CODE_SIZE, MapElitesArchive, axis_bin, bin_range, code_size_axis
from fitness.base import Descriptor

SPACE = [Descriptor("a", 0.0, 1.0, 4), Descriptor("b", -1.0, 1.0, 2)]


def random_entries(rng, n, names):
    entries = []
    for cid in range(n):
        descriptors = {}
        for name in names:
            descriptors[name] = rng.choice([rng.uniform(-1.5, 1.5), 0.0, 0.5, -1.0, 1.0, 1 / 3, math.nan, math.inf])
        fitness = rng.choice([round(rng.uniform(-1, 1), 1), 0.25])  # many ties
        entries.append((cid, fitness, descriptors))
    return entries


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_grid_agrees_with_pyribs(seed):
    ribs = pytest.importorskip("ribs.archives")
    space = [Descriptor("a", -1.0, 1.0, 4), Descriptor("b", 0.0, 1.0, 3), Descriptor("c", -1.0, 1 / 3, 7)]
    ours = MapElitesArchive(space, fitness_floor=-1.0)
    theirs = ribs.GridArchive(solution_dim=(), dims=[d.bins for d in space], ranges=[(d.low, d.high) for d in space],
                              solution_dtype=object, qd_score_offset=-1.0)
    rng = random.Random(seed)
    entries = random_entries(rng, 400, [d.name for d in space])
    for start in range(0, len(entries), 37):  # in batches, as generations add them
        batch = entries[start:start + 37]
        ours.add_many(batch)
        theirs.add(np.array([e[0] for e in batch] + [None], dtype=object)[:-1], np.array([e[1] for e in batch]),
                   np.stack([np.array(ours.vector(e[2])) for e in batch]))
    data = theirs.data(["solution", "objective", "measures", "index"])
    cells = theirs.int_to_grid_index(data["index"])
    expected = {tuple(int(i) for i in cell): (int(sol), float(obj), tuple(float(m) for m in meas))
                for sol, obj, meas, cell in zip(data["solution"], data["objective"], data["measures"], cells)}
    found = {e.cell: (e.candidate_id, e.fitness, e.descriptors) for e in ours.elites()}
    assert found == expected
    stats = ours.stats()
    assert stats["elites"] == theirs.stats.num_elites and stats["coverage"] == pytest.approx(theirs.stats.coverage)
    assert stats["qd_score"] == pytest.approx(theirs.stats.qd_score)


def test_bins_cover_the_axis_and_edges_clip():
    axis = code_size_axis(4)
    assert axis.name == CODE_SIZE and (axis.low, axis.high, axis.bins) == (0.0, 240.0, 4)
    assert [axis_bin(axis, v) for v in (0, 59.9999, 60, 120, 239.9, 240)] == [0, 0, 1, 2, 3, 3]
    assert bin_range(axis, 1) == (60.0, 120.0)
    grid = MapElitesArchive([axis])
    assert grid.add(1, 0.5, {CODE_SIZE: 1e9}) == "new" and grid.elites()[0].cell == (3,)
    assert grid.add(2, 0.5, {CODE_SIZE: 300}) == "not_added"  # equal fitness: the first stays
    assert grid.add(3, 0.6, {CODE_SIZE: math.nan, "other": 1}) == "new" and grid.elites()[0].cell == (0,)
    with pytest.raises(ValueError, match="at least one"):
        MapElitesArchive([])


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
