"""``python -m engine doctor``: the sandbox auto picks and why, every probe's verdict, and the exit
code (0 all held, 1 any not held, 2 a sandbox that cannot run here)."""
import json

import pytest

from engine import doctor, jail
from engine.cli import main

HAS_BWRAP = jail.probe("bwrap") is None


@pytest.mark.skipif(not HAS_BWRAP, reason=str(jail.probe("bwrap")))
def test_doctor_says_auto_picks_bwrap_and_every_probe_holds(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sandbox: bwrap (bubblewrap works here)")
    assert "NOT HELD" not in out
    total = len(doctor.PROBES) + 3  # and the forging, hidden-file and rebuild probes, through a real worker
    assert f"{total} of {total} probes held" in out
    assert "held      forge its own score" in out
    assert "held      read a file only the trusted phase may read" in out
    assert "held      rebuild its problem's true reward from the seed" in out


def test_doctor_without_a_jail_reports_each_probe_not_held_and_exits_1(capsys):
    assert main(["doctor", "--sandbox", "none", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["sandbox"] == "none" and report["held"] is False
    assert {p["name"] for p in report["probes"] if not p["held"]} >= {"read_home", "read_workdir", "write_outside",
                                                                      "connect", "detach", "kill_parent",
                                                                      "hidden_file", "rebuild_truth"}


def test_doctor_with_an_unavailable_sandbox_exits_2(monkeypatch, capsys):
    real_which = jail.shutil.which
    monkeypatch.setattr(jail.shutil, "which", lambda name, *a, **k: None if name == "unshare" else real_which(name))
    jail.probe.cache_clear()
    try:
        assert main(["doctor", "--sandbox", "unshare"]) == 2
    finally:
        jail.probe.cache_clear()
    assert "--sandbox unshare: unshare is not installed" in capsys.readouterr().err
