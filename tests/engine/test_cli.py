"""The command line, called as main([...]) and, for the kill test, as a real process."""
import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from engine.cli import main
from tests.conftest import EXAMPLE_SPEC, JITTER_SPEC, ROOT, wait_for_evaluations

FAST = ["--fitness", EXAMPLE_SPEC, "--operator", JITTER_SPEC, "--quiet"]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_run_then_replay_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--pop", "4", "--gens", "2", "--executor", "serial", "--out", str(out)]) == 0
    capsys.readouterr()
    summary = run_json(capsys, ["replay", str(out), "--json"])
    for key in ("evaluations", "unique_genomes", "invalid", "generations", "best_fitness", "best_name",
                "baseline_fitness", "coverage", "qd_score", "dedup_saved"):
        assert key in summary
    assert summary["generations"] == 3
    assert summary["evaluations"] == summary["unique_genomes"] == 2 + 2 + 4 + 4
    assert summary["best_fitness"] >= summary["baseline_fitness"]
    assert 0 < summary["coverage"] <= 1
    assert (out / "archive.json").exists() and (out / "summary.json").exists()


def test_show_prints_a_candidate(tmp_path, capsys):
    out = tmp_path / "run"
    main(["run", *FAST, "--pop", "2", "--gens", "0", "--executor", "serial", "--out", str(out)])
    capsys.readouterr()
    assert main(["show", str(out), "1"]) == 0
    text = capsys.readouterr().out
    assert "mae" in text and "abs()" in text and "fitness" in text


def test_evaluate_json(tmp_path, capsys):
    code = tmp_path / "loss.py"
    code.write_text("def huber(pred, target):\n    return F.smooth_l1_loss(pred, target, reduction='none')\n")
    result = run_json(capsys, ["evaluate", "--fitness", EXAMPLE_SPEC, "--code", str(code), "--json"])
    assert result["status"] == "ok" and result["fitness"] > 0 and result["error"] is None
    assert "weight_error" in result["metrics"]


def test_evaluate_json_reports_an_invalid_loss(tmp_path, capsys):
    code = tmp_path / "loss.py"
    code.write_text("import os\ndef bad(pred, target):\n    return pred\n")
    assert main(["evaluate", "--fitness", EXAMPLE_SPEC, "--code", str(code), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "invalid" and "os" in result["error"] and result["fitness"] is None


def test_list_names_builtins(capsys):
    names = run_json(capsys, ["list", "--json"])
    assert "synthetic-pref" in names["fitness"] and "symbolic" in names["operators"]


def test_list_says_one_line_about_each_plugin_and_operator(capsys):
    from engine.plugins import available
    from fitness.synthetic_pref import SyntheticPreference as SyntheticPref
    from operators.llm import LLMOperator
    from operators.symbolic import SymbolicOperator

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = available()
    for name in names["fitness"] + ["symbolic"]:
        line = next(line for line in lines if line.startswith(f"  {name} "))
        assert len(line.split(None, 1)) == 2, f"no description for {name}: {line!r}"
    first = {cls: cls.__doc__.strip().splitlines()[0] for cls in (SyntheticPref, SymbolicOperator, LLMOperator)}
    assert f"  {'synthetic-pref':<16}  {first[SyntheticPref]}" in lines
    assert f"  {'symbolic':<16}  {first[SymbolicOperator]}" in lines
    forms = lines.index("  " + ", ".join(LLMOperator.spec_forms))
    assert lines[forms + 1].strip() == first[LLMOperator] and "openai:MODEL" in names["operators"]


@pytest.mark.parametrize("argv,fragment", [
    (["run", "--pop", "0"], "pop must be positive, got 0"),
    (["run", "--cxpb", "0.8", "--mutpb", "0.5"], "cxpb + mutpb must be at most 1"),
    (["run", "--fitness", "no-such-task"], "unknown fitness 'no-such-task'"),
    (["run", "--fitness", "missing.py:Task"], "plug-in file 'missing.py' not found"),
    (["run", "--operator", "no-such-operator"], "unknown operator 'no-such-operator'"),
    (["run", "--resume", "/nonexistent/run"], "no run found at /nonexistent/run"),
    (["run", "--config", "/nonexistent.toml"], "--config: file '/nonexistent.toml' not found"),
    (["replay", "/nonexistent/run"], "no run found"),
    (["evaluate", "--code", "/nonexistent.py"], "--code: cannot read /nonexistent.py"),
])
def test_bad_input_gets_a_clear_error(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_corrupt_store_is_reported_and_left_alone(tmp_path, capsys):
    (tmp_path / "run.sqlite").write_bytes(b"this is not a database" * 100)
    assert main(["replay", str(tmp_path)]) == 2
    assert "not a readable evoloss run store" in capsys.readouterr().err
    assert (tmp_path / "run.sqlite").read_bytes().startswith(b"this is not")
    assert main(["run", "--resume", str(tmp_path)]) == 2


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    main(["run", *FAST, "--pop", "2", "--gens", "0", "--executor", "serial", "--out", str(out)])
    capsys.readouterr()
    assert main(["run", *FAST, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_toml_config_with_flag_override(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'fitness = "{EXAMPLE_SPEC}"\noperator = "{JITTER_SPEC}"\npop = 3\ngens = 1\n'
                      'executor = "serial"\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--gens", "0", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    summary = run_json(capsys, ["replay", str(out), "--json"])
    assert summary["generations"] == 1 and summary["unique_genomes"] == 3
    config.write_text("popsize = 3\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "unknown setting(s) ['popsize']" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_sigkill_evaluates_nothing_twice(tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "engine", "run", *FAST, "--pop", "4", "--gens", "4", "--workers", "2",
               "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    finished = wait_for_evaluations(out, 9)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert finished >= 9
    before = sqlite3.connect(out / "run.sqlite").execute("SELECT candidate_id, fitness FROM evaluations WHERE eval_seed IS NULL").fetchall()

    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    db = sqlite3.connect(out / "run.sqlite")
    twice = db.execute("SELECT candidate_id FROM evaluations GROUP BY candidate_id, fitness_name, eval_seed HAVING count(*) > 1").fetchall()
    assert twice == []
    after = dict(db.execute("SELECT candidate_id, fitness FROM evaluations WHERE eval_seed IS NULL").fetchall())
    assert all(after[cid] == fitness for cid, fitness in before)
    summary = run_json(capsys, ["replay", str(out), "--json"])
    assert summary["generations"] == 5


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "engine", "run", *FAST, "--pop", "4", "--gens", "3", "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_evaluations(out, 3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "continue with python -m engine run --resume" in err
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    summary = run_json(capsys, ["replay", str(out), "--json"])
    assert summary["generations"] == 4
