"""The ``dpo`` plug-in through a real evaluation worker (``python -m engine evaluate``): its
score is computed in the trusted phase, so it is not marked unprotected, and a genome that
runs as plain Python (``--jail-only``) cannot change it: not by forging the messages its
process sends, not by patching the scorers in its own process, and it finds no held-out pair
there."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
torch.set_num_threads(1)

pytestmark = [pytest.mark.dpo, pytest.mark.slow]

from engine.cli import main  # noqa: E402
from fitness.preference import preference_seeds  # noqa: E402
from tests.fixtures.genomes import dpo_after  # noqa: E402

DPO = next(seed.code for seed in preference_seeds() if seed.name == "dpo")
FAST = {"train_size": 64, "heldout_size": 32}


def _evaluate(tmp_path, code: str, *flags: str, capsys) -> dict:
    path = tmp_path / "loss.py"
    path.write_text(code)
    options = [item for key, value in {**FAST, "cache_dir": tmp_path / "cache"}.items()
               for item in ("--fitness-opt", f"{key}={value}")]
    main(["evaluate", "--fitness", "dpo", "--preset", "tiny", *options, "--code", str(path), "--sandbox", "none",
          "--timeout", "300", "--json", *flags])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """DPO's score with both phases in this process (the plug-in's own ``evaluate``)."""
    from engine.genome import compile_genome
    from fitness.dpo import DPOFitness
    from fitness.preference import PreferenceInterface

    cache = tmp_path_factory.mktemp("dpo-in-process")
    return DPOFitness(preset="tiny", cache_dir=str(cache), **FAST).evaluate(
        compile_genome(DPO, PreferenceInterface.arg_counts), 0)


_PATCH_THE_SCORERS = """
from fitness.base import Score
from fitness.dpo import scorers
from fitness.dpo.plugin import DPOFitness
scorers.heldout = lambda policy: (42.0, {"heldout_accuracy": 42.0})
DPOFitness.score = lambda self, artefacts, seed: Score(fitness=42.0, metrics={})
"""

_FORGE_MESSAGES = """
import pickle
import multiprocessing.connection as mpc
def forged(obj):
    if isinstance(obj, dict) and ("fitness" in obj or obj.get("type") in ("artefacts", "checked")):
        obj = dict(obj, fitness=42.0, type="unprotected", metrics={})
    return obj
real_pdumps = pickle.dumps
pickle.dumps = lambda obj, *a, **k: real_pdumps(forged(obj), *a, **k)
real_send = mpc.Connection.send
mpc.Connection.send = lambda self, obj: real_send(self, forged(obj))
"""


def _look_for_held_out_pairs(report) -> str:
    return f"""
import json, sys
found, frame = [], sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()):
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if type(item).__name__ == "DPOFitness" and all(item is not f for f in found):
                found.append(item)
    frame = frame.f_back
json.dump({{"plugins": len(found),
           "heldout_rows": sum(len(thing._data.heldout) for thing in found if thing._data is not None),
           "stored": sum(len(thing.held_out._values) for thing in found),
           "wiped": all(thing.held_out.wiped for thing in found)}}, open({str(report)!r}, "w"))
"""


def test_a_dpo_evaluation_through_a_worker_is_scored_in_the_trusted_phase(tmp_path, capsys, in_process):
    result = _evaluate(tmp_path, DPO, capsys=capsys)
    assert result["status"] == "ok", result
    assert "unprotected" not in result["metrics"]
    assert result["fitness"] == in_process.fitness == result["metrics"]["heldout_accuracy"]
    assert result["metrics"]["heldout_margin"] == in_process.metrics["heldout_margin"]
    assert result["metrics"]["train_steps"] == 8 and result["metrics"]["heldout_pairs"] == 32


@pytest.mark.parametrize("attack", [_PATCH_THE_SCORERS, _FORGE_MESSAGES], ids=["patch-scorers", "forge-messages"])
def test_a_genome_cannot_change_its_held_out_score(tmp_path, capsys, in_process, attack):
    result = _evaluate(tmp_path, dpo_after(attack), "--jail-only", capsys=capsys)
    assert result["status"] == "ok", result
    assert result["fitness"] == in_process.fitness != 42.0
    assert result["metrics"]["heldout_margin"] == in_process.metrics["heldout_margin"]
    assert "unprotected" not in result["metrics"]


def test_the_genomes_process_holds_no_held_out_pair(tmp_path, capsys):
    report = tmp_path / "found.json"
    result = _evaluate(tmp_path, dpo_after(_look_for_held_out_pairs(report)), "--jail-only", capsys=capsys)
    assert result["status"] == "ok", result
    found = json.loads(report.read_text())
    assert found["plugins"] >= 1 and found["wiped"]
    assert found["heldout_rows"] == 0 and found["stored"] == 0
    # Nor in the on-disk cache the genome's process may write: only the training pairs' reference.
    assert len(list((tmp_path / "cache" / "reference").glob("*.pt"))) == 1
