"""The default run's outcome, with the parent selection it was recorded with (the MAP-Elites
tournament), is fixed for a seed: reorganising the code must not change which candidates are
made, their code, lineage, statuses or fitness values. It was recorded on public problems
(``--truth-key public``: drawn from the seed alone, the same on every machine)."""
import json

import pytest

from engine.cli import main
from tests.fixtures.golden import GOLDEN, digest


@pytest.mark.slow
def test_default_run_matches_the_golden_run(tmp_path, capsys):
    out = tmp_path / "run"
    # The digest holds first scores only, so the end-of-run validation is left out.
    assert main(["run", "--pop", "8", "--gens", "3", "--seed", "0", "--race-seeds", "0", "--selection", "archive",
                 "--fitness", "synthetic-pref", "--truth-key", "public", "--validate-top", "0", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    expected = json.loads(GOLDEN.read_text())
    found = digest(out)
    assert sorted(found, key=int) == sorted(expected, key=int)
    for cid, record in expected.items():
        assert found[cid] == record, f"candidate {cid} differs from the golden run"


@pytest.mark.slow
def test_a_run_with_a_truth_key_keeps_it_and_scores_other_problems(tmp_path, capsys):
    """With a key (the default: one made for the user) the same run draws other problems, keeps
    a copy of the key in its folder, and resumes with that copy whatever key is in effect."""
    from archives.store import RunStore
    from fitness import truth

    out = tmp_path / "run"
    assert main(["run", "--pop", "2", "--gens", "1", "--seed", "0", "--race-seeds", "0", "--fitness", "synthetic-pref",
                 "--validate-top", "0", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    machine = truth.machine_key_file(create=False)
    copy = out / truth.RUN_KEY_NAME
    assert copy.read_bytes() == machine.read_bytes()
    store = RunStore.open(out)
    try:
        assert store.meta("truth_key") == truth.key_id(machine) != "public"
        assert store.meta("config")["truth_key"] == "machine"
    finally:
        store.close()
    found, expected = digest(out), json.loads(GOLDEN.read_text())
    assert found["0"]["name"] == expected["0"]["name"] == "dpo"
    assert found["0"]["fitness"] != expected["0"]["fitness"]  # DPO on a keyed problem of seed 0
    machine.write_bytes(b"another key, made after the run")  # the machine's key changed: the run keeps its own
    assert main(["run", "--resume", str(out), "--gens", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert digest(out)["0"] == found["0"]
    assert main(["run", "--resume", str(out), "--gens", "3", "--truth-key", "public", "--quiet"]) == 2
    assert "--truth-key cannot change" in capsys.readouterr().err
