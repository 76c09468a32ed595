"""benchmarks/search_ablation.py: each run seed can have a suite draw of its own, shared by every
variant of that seed so that the paired differences stay on one draw."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ablation(monkeypatch):
    spec = importlib.util.spec_from_file_location("search_ablation", ROOT / "benchmarks" / "search_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_run(fitness, flags, seed, out, extra):
        calls.append((flags, seed, list(extra)))
        draw = int(extra[extra.index("--fitness-opt") + 1].split("=")[1]) if "--fitness-opt" in extra else 0
        gain = 0.001 * draw + (0.01 if "--selection" not in flags else 0.0)  # evolution 0.01 above random
        return {"seed": seed, "best_name": "x", "best_id": 1, "held_out_gain": gain, "held_out_se": 0.001,
                "held_out_mean_gain": gain, "held_out_mean_gain_se": 0.001, "made_before_best": 1,
                "evaluations": 10, "seconds": 0.1, "selection_gain": gain}

    monkeypatch.setattr(module, "run_one", fake_run)
    return module, calls


def test_each_run_seed_runs_every_variant_on_its_own_draw(ablation, tmp_path, capsys):
    module, calls = ablation
    assert module.main(["--seeds", "1", "2", "3", "--draws", "20", "21", "23", "--only", "evolution", "random",
                        "--out", str(tmp_path), "--quiet-extra-flag"]) == 0
    assert len(calls) == 6
    for _, seed, extra in calls:
        assert extra[extra.index("--fitness-opt") + 1] == f"suite_seed={ {1: 20, 2: 21, 3: 23}[seed]}"
    assert all("--quiet-extra-flag" in extra for _, _, extra in calls)  # other flags still reach every run
    out = capsys.readouterr().out
    assert "each on its own draw [20, 21, 23]" in out
    # Paired by run seed on the same draw: the draw's offset cancels, the variants' difference stays.
    assert "evolution - random, held-out gain: +0.0100 ± 0.0000" in out
    assert '"draw": 21' in out


def test_draws_must_match_the_run_seeds(ablation, tmp_path):
    module, calls = ablation
    with pytest.raises(SystemExit) as stop:
        module.main(["--seeds", "1", "2", "--draws", "20", "--out", str(tmp_path)])
    assert stop.value.code == 2 and calls == []


def test_without_draws_the_runs_use_the_plugins_default(ablation, tmp_path):
    module, calls = ablation
    assert module.main(["--seeds", "1", "--only", "evolution", "--out", str(tmp_path)]) == 0
    assert calls and all("--fitness-opt" not in extra for _, _, extra in calls)
