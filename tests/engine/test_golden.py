"""The default run's outcome, with the parent selection it was recorded with (the MAP-Elites
tournament), is fixed for a seed: reorganising the code must not change which candidates are
made, their code, lineage, statuses or fitness values."""
import json

import pytest

from engine.cli import main
from tests.fixtures.golden import GOLDEN, digest


@pytest.mark.slow
def test_default_run_matches_the_golden_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--pop", "8", "--gens", "3", "--seed", "0", "--race-seeds", "0", "--selection", "archive", "--fitness", "synthetic-pref", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    expected = json.loads(GOLDEN.read_text())
    found = digest(out)
    assert sorted(found, key=int) == sorted(expected, key=int)
    for cid, record in expected.items():
        assert found[cid] == record, f"candidate {cid} differs from the golden run"
