"""Reading runs back: the pandas API, the rebuilt MAP-Elites grid, failure kinds, loss shapes."""
import ast
import math
import random

import pytest

from archives import load_run
from archives.analysis import ARCHIVE_COLUMNS, CANDIDATE_COLUMNS, EVALUATION_COLUMNS, GENERATION_COLUMNS
from archives.reading import LLM_CALL_COLUMNS, code_size, error_kind, read_run, rebuild_elites, spearman
from archives.store import RunStore, StoreError
from engine.candidate import Candidate, EvalResult
from engine.genome import normalise
from fitness.preference import PREFERENCE_SEEDS
from tests.fixtures.runs import OFFSPRING, build_run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("analysis") / "run")


def test_load_run_frames_have_the_documented_columns(built):
    run = load_run(built)
    for frame, columns in ((run.candidates, CANDIDATE_COLUMNS), (run.evaluations, EVALUATION_COLUMNS),
                           (run.generations, GENERATION_COLUMNS), (run.llm_calls, LLM_CALL_COLUMNS),
                           (run.archive, ARCHIVE_COLUMNS)):
        assert list(frame.columns[: len(columns)]) == list(columns)
    assert len(run.candidates) == 3 + len(OFFSPRING)
    assert list(run.generations["generation"]) == [0, 1, 2]
    assert {"metric_kl", "descriptor_slope_at_zero"} <= set(run.evaluations.columns)
    assert len(run.llm_calls) == 5 and run.llm_calls["cost_usd"].sum() == pytest.approx(0.04)
    assert set(run.candidates.loc[[5, 8], "error_kind"]) == {"invalid: name '…' is not allowed in a loss function"}


def test_llm_calls_frame_is_empty_with_columns_for_a_run_without_llm(tmp_path):
    run = load_run(build_run(tmp_path / "run", llm=False))
    assert run.llm_calls.empty and list(run.llm_calls.columns[: len(LLM_CALL_COLUMNS)]) == list(LLM_CALL_COLUMNS)
    assert run.summary()["llm"] is None


def test_best_lineage_and_at_gen(built):
    run = load_run(built)
    best = run.best(3)
    assert list(best["name"]) == ["sharp", "tempered", "smooth_dpo"]
    assert list(run.lineage(best.index[0])["name"]) == ["sharp", "tempered", "smooth_dpo", "dpo"]
    assert list(run.lineage(best.index[0])["depth"]) == [0, 1, 2, 3]
    early = load_run(built, at_gen=1)
    assert early.at_gen == 1 and early.candidates["generation"].max() == 1
    assert early.best(1)["name"].iloc[0] == "tempered"
    assert len(early.llm_calls) == 2  # the calls of generation 2 came later
    with pytest.raises(ValueError, match="generations 0..2"):
        load_run(built, at_gen=7)


def test_summary_groups_failures_by_kind_and_counts_operators(built):
    summary = load_run(built).summary()
    kinds = {f["kind"]: f["count"] for f in summary["failure_kinds"]}
    assert kinds == {"invalid: name '…' is not allowed in a loss function": 2,
                     "error: the loss became non-finite (nan or inf) at training step N": 1}
    assert summary["operators"]["llm:mutate"]["made"] == 3
    assert summary["operators"]["llm:mutate"]["valid_share"] == pytest.approx(2 / 3)
    assert summary["llm"]["calls"] == 5 and summary["llm"]["failed_calls"] == 1
    assert summary["best_name"] == "sharp" and summary["baseline_fitness"] == 0.5
    assert [s["name"] for s in summary["seeds"]] == ["dpo", "slic", "ipo"]


def test_extra_fitness_scores_appear_as_columns(tmp_path):
    path = build_run(tmp_path / "run", llm=False)
    store = RunStore.open(path)
    store.add_evaluation(EvalResult(7, "ok", 0.9), "other-task")
    store.add_evaluation(EvalResult(4, "invalid", error="wrong arity"), "other-task")
    store.close()
    run = load_run(path)
    assert run.extra_fitness == ["other-task"]
    assert run.candidates.loc[7, "fitness:other-task"] == 0.9
    assert math.isnan(run.candidates.loc[4, "fitness:other-task"])
    assert list(run.best(1, fitness="other-task")["name"]) == ["sharp"]
    transfer = run.summary()["transfer"]
    assert [row["id"] for row in transfer["rows"]] == [7, 4]
    assert transfer["rows"][1]["extra"]["other-task"] == "invalid"


def test_export_writes_every_frame(built, tmp_path):
    pytest.importorskip("pyarrow")
    import pandas as pd

    run = load_run(built)
    for fmt, read in (("csv", pd.read_csv), ("parquet", pd.read_parquet)):
        written = run.export(tmp_path / fmt, fmt)
        assert sorted(p.name for p in written) == sorted(
            f"{name}.{fmt}" for name in ("candidates", "evaluations", "generations", "llm_calls", "archive"))
        candidates = read(tmp_path / fmt / f"candidates.{fmt}")
        assert set(candidates["name"]) == set(run.candidates["name"])
    with pytest.raises(ValueError, match="csv"):
        run.export(tmp_path / "x", "xml")


def test_code_size_matches_the_normalised_count():
    codes = [s.code for s in PREFERENCE_SEEDS] + [
        '"""m"""\nimport torch\ndef f(self, a: torch.Tensor, b, c, d) -> torch.Tensor:\n    """doc"""\n'
        "    x = (a - b)  # note\n    return -F.logsigmoid(x)\n",
        'def g(a, b, c, d):\n    "only a docstring would be kept"\n',
    ]
    for code in codes:
        assert code_size(code) == sum(1 for _ in ast.walk(ast.parse(normalise(code))))


def test_rebuilt_grid_matches_the_grid_built_during_the_run():
    from archives.grid import MapElitesArchive
    from fitness.base import Descriptor

    space = [Descriptor("a", 0.0, 1.0, 4), Descriptor("b", -1.0, 1.0, 3)]
    archive = MapElitesArchive(space, fitness_floor=-1.0)
    rng = random.Random(3)
    candidates, results = {}, {}
    for cid in range(200):
        descriptors = {"a": rng.choice([rng.uniform(-0.5, 1.5), 0.25, 0.5, math.nan]), "b": rng.uniform(-1.2, 1.2)}
        fitness = rng.choice([round(rng.uniform(0, 1), 1), 0.5])  # many ties: the earlier candidate keeps a cell
        candidates[cid] = Candidate(cid, f"c{cid}", "def f(a, b):\n    return a\n", generation=cid // 20)
        results[cid] = EvalResult(cid, "ok", fitness, descriptors=descriptors)
        archive.add(cid, fitness, descriptors)
    rebuilt = rebuild_elites([{"name": d.name, "low": d.low, "high": d.high, "bins": d.bins} for d in space],
                             candidates, results)
    expected = {e.cell: (e.candidate_id, e.descriptors) for e in archive.elites()}
    assert {tuple(e["cell"]): (e["id"], tuple(e["descriptors"].values())) for e in rebuilt} == expected


def test_error_kinds_blank_names_and_numbers():
    assert error_kind("invalid", "line 4: name 'np' is not allowed in a loss function") == \
        error_kind("invalid", "line 2: name 'os' is not allowed in a loss function")
    assert error_kind("invalid", "returned shape (3,) for a batch of 7; expected (7,)") == \
        "invalid: returned shape (…) for a batch of N"
    assert error_kind("invalid", "raised ZeroDivisionError: division by zero") == "invalid: raised ZeroDivisionError"
    assert error_kind("timeout", None) == "timeout"


def test_spearman():
    assert spearman([(1, 10), (2, 20), (3, 30)]) == pytest.approx(1.0)
    assert spearman([(1, 3), (2, 2), (3, 1)]) == pytest.approx(-1.0)
    assert spearman([(1, 2), (2, 3)]) is None


def test_loss_shape_of_dpo_is_minus_log_sigmoid():
    import numpy as np

    from archives.shapes import loss_shape
    from fitness.preference import PreferenceInterface

    z = np.linspace(-5, 5, 11)
    values, slope = loss_shape(PreferenceInterface(beta=0.1), PREFERENCE_SEEDS[0].code, z)
    assert values == pytest.approx(np.log1p(np.exp(-z)))
    assert slope == pytest.approx(-1 / (1 + np.exp(z)))


def test_damaged_store_raises_store_error(tmp_path):
    import sqlite3

    path = build_run(tmp_path / "run", llm=False)
    db = sqlite3.connect(path / "run.sqlite")
    db.execute("DROP TABLE generations")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="damaged or incomplete"):
        read_run(RunStore.open(path, readonly=True))


def test_analyze_run_example(built, tmp_path, capsys):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("analyze_run", ROOT / "examples" / "analyze_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(built), "--top", "3", "--plot", str(tmp_path / "fitness.png")])
    text = capsys.readouterr().out
    assert "sharp" in text and "Lineage of the best loss (sharp)" in text
    assert (tmp_path / "fitness.png").stat().st_size > 1000
