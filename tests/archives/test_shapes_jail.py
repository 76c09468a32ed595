"""Loss shapes (the dashboard's candidate page, ``replay --plots``) run stored genome code and
import the fitness plug-in a run's settings name: both are untrusted when the run folder came
from someone else. They run in a jailed child, like an evaluation worker.

Before, a run folder whose settings named ``/some/where/evil.py:Nope`` as its plug-in had that
file imported, unjailed, as soon as a candidate page was opened; it read a file in the home folder.
"""
from __future__ import annotations

import os
import secrets

import pytest

from archives.shapes import loss_shapes
from fitness.preference import PREFERENCE_SEEDS
from tests.conftest import available_sandboxes

DPO = next(seed.code for seed in PREFERENCE_SEEDS if seed.name == "dpo")


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_run_folders_plugin_and_genomes_are_drawn_in_the_jail(tmp_path, monkeypatch, sandbox):
    home = tmp_path / "home"
    home.mkdir()
    secret = "sk-home-" + secrets.token_hex(8)
    (home / "credentials").write_text(secret)
    monkeypatch.setenv("HOME", str(home))
    marker = tmp_path / "evil-ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                    f"raise RuntimeError(open({str(home / 'credentials')!r}).read())\n")
    config = {"fitness": f"{evil}:Nope", "fitness_options": {"beta": 0.1}}
    answer = loss_shapes(config, "evil", DPO, [{"label": "dpo", "code": DPO, "role": "dpo"}], sandbox=sandbox)
    assert answer["sandbox"] == sandbox
    assert secret not in repr(answer) and not marker.exists()
    assert any("not loadable" in note for note in answer["notes"])  # judged by parameter names instead
    assert answer["applicable"] and answer["beta"] == 0.1
    curve = answer["curves"][0]
    assert "error" not in curve and len(curve["values"]) == len(answer["z"])
    # DPO: -log sigmoid(z), falling, with slope -1/2 at z = 0.
    middle = len(answer["z"]) // 2
    assert answer["z"][middle] == 0.0 and curve["gradient"][middle] == pytest.approx(-0.5, abs=1e-4)


def test_the_grid_is_the_one_asked_for(tmp_path):
    answer = loss_shapes({"fitness": "synthetic-pref"}, "synthetic-pref", DPO,
                         [{"label": "dpo", "code": DPO, "role": "dpo"}], z_range=(-2.0, 2.0), points=5)
    assert answer["z"] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert os.path.basename(answer["sandbox"]) in ("bwrap", "unshare", "none")
