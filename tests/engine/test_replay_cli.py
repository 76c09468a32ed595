"""``replay``, ``show`` and ``reevaluate`` on a real run (made once) and on stores built directly."""
import json
import shutil
import sqlite3

import pytest

from archives.reading import read_run, rebuild_elites
from engine.search.racing import run_estimates
from archives.store import RunStore
from engine.cli import main
from tests.conftest import EXAMPLE_SPEC, JITTER_SPEC
from tests.fixtures.runs import build_run

FAST = ["--fitness", EXAMPLE_SPEC, "--operator", JITTER_SPEC, "--quiet"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real two-generation run of the regression example (never modified by the tests)."""
    out = tmp_path_factory.mktemp("replay") / "run"
    assert main(["run", *FAST, "--pop", "4", "--gens", "2", "--executor", "serial", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pref_run(tmp_path_factory):
    """A synthetic-pref run written directly into a store, with LLM calls and failures."""
    return build_run(tmp_path_factory.mktemp("replay") / "pref")


def replay_json(capsys, *argv):
    capsys.readouterr()
    assert main(["replay", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_replay_prints_every_section(real_run, capsys):
    summary = replay_json(capsys, real_run)
    assert main(["replay", str(real_run), "--rows", "50"]) == 0
    text = capsys.readouterr().out
    for heading in ("Best losses", "Operators", "Archive elites by region", "Fitness per generation"):
        assert heading in text
    assert summary["best_name"] in text and f"{summary['best_fitness']:.4f}" in text
    assert "weight_error" in summary["key_metrics"] and "weight_error" in text
    for cell in summary["elite_cells"]:
        assert cell["name"] in text and "growth [" in cell["region"]
    assert [g["gen"] for g in summary["history"]] == [0, 1, 2]


def test_replay_json_keeps_its_keys(real_run, capsys):
    summary = replay_json(capsys, real_run)
    for key in ("evaluations", "unique_genomes", "invalid", "generations", "best_fitness", "best_name",
                "baseline_fitness", "coverage", "qd_score", "dedup_saved", "top", "operators", "history",
                "elite_cells", "failure_kinds", "llm", "transfer"):
        assert key in summary
    assert summary["evaluations"] == 12 and summary["generations"] == 3
    assert len(summary["elite_cells"]) == summary["elites"]


def test_rebuilt_archive_matches_the_engines(real_run):
    data = read_run(RunStore.open(real_run, readonly=True))
    saved = data._saved_elites()
    assert saved is not None  # archive.json is current
    estimates = run_estimates(data)  # the run ranked re-measured candidates by their lower bound
    rebuilt = rebuild_elites(data.space, data.candidates, data.results, {cid: e.lower for cid, e in estimates.items()})
    assert sorted((e["id"], tuple(e["cell"])) for e in rebuilt) == sorted((e["id"], tuple(e["cell"])) for e in saved)


def test_replay_at_gen_shows_the_state_after_that_generation(real_run, capsys):
    summary = replay_json(capsys, real_run, "--at-gen", "0")
    assert summary["at_gen"] == 0 and summary["generations"] == 1
    assert summary["unique_genomes"] == summary["evaluations"] == 4
    assert all(row["generation"] == 0 for row in summary["top"])
    assert summary["elites"] == len(summary["elite_cells"])  # the grid rebuilt for generation 0
    assert main(["replay", str(real_run), "--at-gen", "0"]) == 0
    assert "state after generation 0 of 2" in capsys.readouterr().out
    assert main(["replay", str(real_run), "--at-gen", "9"]) == 2
    assert "--at-gen 9: the run has generations 0..2" in capsys.readouterr().err


def test_replay_writes_valid_plots(pref_run, real_run, tmp_path, capsys):
    image = pytest.importorskip("matplotlib.image")
    assert main(["replay", str(pref_run), "--plots", str(tmp_path / "pref"), "--json"]) == 0
    json.loads(capsys.readouterr().out)  # stdout stays JSON
    for name in ("fitness", "archive", "lineage", "loss_shape"):
        pixels = image.imread(tmp_path / "pref" / f"{name}.png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels[..., :3].var() > 0
    assert main(["replay", str(real_run), "--plots", str(tmp_path / "real")]) == 0
    # The plug-in, a file the run's settings name, is not imported here (nor found in the jail
    # where the shapes are drawn): the losses are judged by their parameter names.
    err = capsys.readouterr().err
    assert "loss_shape.png skipped: the fitness plug-in 'robust-regression' does not score preference losses" in err
    assert "fitness plug-in not loadable" in err
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["archive.png", "fitness.png", "lineage.png"]


def test_replay_shows_failures_and_llm_usage(pref_run, capsys):
    capsys.readouterr()
    assert main(["replay", str(pref_run)]) == 0
    text = capsys.readouterr().out
    assert "Invalid and failed losses by kind" in text and "name '…' is not allowed" in text
    assert "LLM calls" in text and "gpt-test" in text and "0.0400" in text


def test_replay_export(pref_run, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    assert main(["replay", str(pref_run), "--export", "parquet", str(tmp_path / "pq")]) == 0
    assert (tmp_path / "pq" / "candidates.parquet").exists() and (tmp_path / "pq" / "llm_calls.parquet").exists()
    assert main(["replay", str(pref_run), "--export", "csv", str(tmp_path / "csv")]) == 0
    assert "sharp" in (tmp_path / "csv" / "archive.csv").read_text()
    assert main(["replay", str(pref_run), "--export", "xlsx", str(tmp_path / "x")]) == 2
    assert "--export: format must be csv or parquet" in capsys.readouterr().err


def test_show_prints_lineage_and_the_llm_exchange(pref_run, capsys):
    capsys.readouterr()
    assert main(["show", str(pref_run), "7"]) == 0
    text = capsys.readouterr().out
    assert "sharp" in text and "lineage" in text
    assert text.index("4 tempered") < text.index("3 smooth_dpo") < text.index("0 dpo")
    assert "PROMPT for sharp" in text and "REPLY with sharp" in text
    assert main(["show", str(pref_run), "7", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in report["lineage"]] == ["tempered", "smooth_dpo", "dpo"]
    assert report["llm_calls"][0]["reply"] == "REPLY with sharp"
    assert main(["show", str(pref_run), "99"]) == 2


def test_show_prints_no_control_character_an_llm_or_a_genome_wrote():
    from rich.console import Console

    from archives.replay import render_candidate

    hostile = "\x1b[2J\x1b]0;retitled\x07\x9b31m"
    report = {"id": 3, "name": "n", "generation": 1, "operator": "openai", "parents": [1],
              "thought": "clear the screen " + hostile, "code": f"def n(a, b, c, d):\n    return a  # {hostile}\n",
              "evaluations": [{"fitness_name": "x", "status": "error", "fitness": None, "error": hostile,
                               "seconds": 1.0}],
              "lineage": [], "llm_calls": [{"prompt": hostile, "reply": hostile, "error": hostile}]}
    console = Console(record=True, width=200, force_terminal=True, color_system=None)
    render_candidate(report, console)
    text = console.export_text()
    assert not any(ch in text for ch in "\x1b\x07\x9b") and "clear the screen ?[2J?]0;retitled??31m" in text


def test_reevaluate_stores_scores_that_replay_shows(real_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    argv = ["reevaluate", str(run), "--fitness", EXAMPLE_SPEC, "--seed", "5", "--top", "2", "--executor", "serial"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["label"] == "robust-regression[seed=5]" and report["scored"] == 2
    stored = sqlite3.connect(run / "run.sqlite").execute(
        "SELECT candidate_id, fitness FROM evaluations WHERE fitness_name = 'robust-regression[seed=5]'").fetchall()
    assert len(stored) == 2 and all(f is not None for _, f in stored)
    summary = replay_json(capsys, run)
    assert summary["extra_fitness"] == ["robust-regression[seed=5]"]
    assert summary["evaluations"] == 12  # re-evaluations are not the run's own evaluations
    scores = {row["id"]: row["extra"]["robust-regression[seed=5]"] for row in summary["top"][:2]}
    assert scores == dict(stored)
    assert main(["replay", str(run)]) == 0
    assert "robust-regression[seed=5]" in capsys.readouterr().out
    assert main([*argv, "--json"]) == 0  # nothing left to score
    assert json.loads(capsys.readouterr().out)["scored"] == 0


@pytest.mark.parametrize("argv,fragment", [
    (["--fitness", EXAMPLE_SPEC], "say which losses to re-score"),
    (["--fitness", EXAMPLE_SPEC, "--top", "2"], "is the fitness the run was scored on"),
    (["--fitness", "no-such-task", "--top", "2"], "unknown fitness 'no-such-task'"),
    (["--fitness", EXAMPLE_SPEC, "--ids", "1,99", "--seed", "3"], "the run has no candidate [99]"),
])
def test_reevaluate_bad_input(real_run, argv, fragment, capsys):
    assert main(["reevaluate", str(real_run), *argv]) == 2
    assert fragment in capsys.readouterr().err


def _damage(path, how):
    db = sqlite3.connect(path / "run.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if how == "old version":
        db.execute("UPDATE meta SET value = '0' WHERE key = 'version'")
    elif how == "missing table":
        db.execute("DROP TABLE generations")
    db.commit()
    db.close()
    if how == "corrupt pages":
        data = bytearray((path / "run.sqlite").read_bytes())
        for i in range(8192, len(data), 997):
            data[i] = (data[i] + 77) % 256
        (path / "run.sqlite").write_bytes(bytes(data))


@pytest.mark.parametrize("how,fragment", [
    ("old version", "has run-store format version 0; this evoloss reads version 2"),
    ("missing table", "is damaged or incomplete (no such table: generations)"),
    ("corrupt pages", "malformed"),
])
@pytest.mark.parametrize("command", [
    ["replay"], ["show", "1"], ["reevaluate", "--fitness", EXAMPLE_SPEC, "--top", "1"],
])
def test_damaged_or_old_store_is_a_clear_error(tmp_path, how, fragment, command, capsys):
    run = build_run(tmp_path / "run", llm=False)
    _damage(run, how)
    argv = [command[0], str(run), *command[1:]]
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
