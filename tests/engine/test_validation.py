"""A run re-measures its promising candidates on fresh seeds, ranks by the lower bound, ends
with a held-out validation paired with the baseline, and a resumed run or a later `validate`
re-runs nothing already stored."""
import json
import sqlite3

import pytest

from archives.reading import read_run
from archives.store import RunStore
from engine.cli import main
from engine.helpers import GENERATION_SEEDS, GENERATION_STRIDE, first_seed
from engine.search.racing import CONFIRM_SEEDS, SEED_STRIDE
from engine.validation import CONFIRMATION_SEEDS, VALIDATION_SEEDS, summarise
from engine.candidate import Candidate, EvalResult
from tests.conftest import EXAMPLE_SPEC, JITTER_SPEC

RUN = ["--fitness", EXAMPLE_SPEC, "--operator", JITTER_SPEC, "--pop", "4", "--gens", "2", "--executor", "serial",
       "--race-seeds", "3", "--race-budget", "6", "--validate-top", "3", "--validate-seeds", "3",
       "--validate-confirm-seeds", "5", "--quiet"]


def rows(run, where=""):
    db = sqlite3.connect(run / "run.sqlite")
    try:
        return db.execute(f"SELECT candidate_id, fitness_name, eval_seed FROM evaluations {where}").fetchall()
    finally:
        db.close()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("validated") / "run"
    assert main(["run", *RUN, "--out", str(run)]) == 0
    return run


def test_a_run_re_measures_on_fresh_seeds_paired_with_the_baseline(finished_run):
    store = RunStore.open(finished_run, readonly=True)
    data = read_run(store)
    store.close()
    baseline = next(c.id for c in data.candidates.values() if c.is_seed and c.name == data.baseline)
    # Each generation is first scored on a seed of its own (the seeds and generation 0 on the run's).
    first = {cid: first_seed(data.config, c.generation) for cid, c in data.candidates.items()}
    assert {first[cid] for cid in data.results} == {0} | {GENERATION_SEEDS + GENERATION_STRIDE * g for g in (1, 2)}
    assert all(first[cid] in scores for cid, scores in data.seed_scores.items())
    # ... and the baseline on every one of them, so every first score is paired.
    assert set(first.values()) <= set(data.seed_scores[baseline])
    reseeded = {cid: set(scores) - {first[cid]} for cid, scores in data.seed_scores.items() if len(scores) > 1}
    assert reseeded, "racing re-measured nothing"
    confirmation = {CONFIRM_SEEDS + k for k in range(4)}
    generations = set(first.values())
    assert all(seed % SEED_STRIDE == 0 or seed in confirmation or (cid == baseline and seed in generations)
               for cid, seeds in reseeded.items() for seed in seeds)
    # At the end, the race_top best (5) and the baseline on the 4 confirmation seeds.
    confirmed = {cid for cid, seeds in reseeded.items() if confirmation <= seeds}
    assert baseline in confirmed and 2 <= len(confirmed) <= 6
    # Every seed a contender got, the baseline got too: the scores stay paired.
    assert set().union(*reseeded.values()) <= set(data.seed_scores[baseline])
    # No (candidate, seed) was measured twice.
    pairs = rows(finished_run, "WHERE eval_seed IS NOT NULL AND fitness_name NOT LIKE 'validation:%'")
    assert len(pairs) == len(set(pairs))
    # A re-measurement skips the checks its candidate passed on the run's own seed.
    db = sqlite3.connect(finished_run / "run.sqlite")
    try:
        checks = db.execute("SELECT eval_seed IS NULL, fingerprint IS NULL, descriptors FROM evaluations "
                            "WHERE status = 'ok' AND fitness_name NOT LIKE 'validation:%'").fetchall()
    finally:
        db.close()
    assert all(not no_print for own, no_print, _ in checks if own)
    assert all(no_print and descriptors == "{}" for own, no_print, descriptors in checks if not own)


def test_replay_ranks_by_the_lower_bound_and_reports_the_validation(finished_run, capsys):
    assert main(["replay", str(finished_run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    lowers = [row["estimate"]["lower"] for row in summary["top"] if row.get("estimate")]
    assert lowers == sorted(lowers, reverse=True) and summary["ranking"].startswith("lower confidence bound")
    validation = summary["validation"]
    assert validation["seeds"] == 3 and validation["baseline"] == "mse" and len(validation["losses"]) == 3
    assert summary["validated_best_name"] in {row["name"] for row in validation["losses"]}
    assert isinstance(summary["validated_gain"], float) and summary["validated_gain_se"] >= 0
    scored = [(cid, seed) for cid, name, seed in rows(finished_run) if name.startswith("validation:")]
    assert {seed for _, seed in scored} == {VALIDATION_SEEDS + k for k in range(3)} | {CONFIRMATION_SEEDS + k
                                                                                        for k in range(5)}
    assert "mse" not in {row["name"] for row in validation["losses"]}  # the baseline is the reference
    # The validated best was chosen among three on the validation seeds; its reported gain is its
    # gain on five more seeds (--validate-confirm-seeds), where only it and the baseline were scored.
    best = validation["best"]
    assert best["confirmed"] and best["chosen_among"] == 3 and best["seeds"] == 5
    assert {cid for cid, seed in scored if seed >= CONFIRMATION_SEEDS} == {best["id"], 0}
    chosen_row = next(row for row in validation["losses"] if row["id"] == best["id"])
    assert best["chosen_gain"] == chosen_row["gain"] and summary["validated_gain"] == best["gain"]
    assert "more fresh seeds that chose nothing" in validation["verdict"]


def test_validate_again_scores_only_what_is_missing(finished_run, capsys):
    before = len(rows(finished_run))
    assert main(["validate", str(finished_run), "--top", "3", "--seeds", "3", "--executor", "serial", "--json"]) == 0
    assert len(rows(finished_run)) == before
    listed = rows(finished_run)
    assert main(["validate", str(finished_run), "--top", "3", "--seeds", "4", "--confirm-seeds", "6",
                 "--executor", "serial", "--json"]) == 0
    added = [row for row in rows(finished_run) if row not in listed]
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["seeds"] == 4 and summary["best"]["seeds"] == 6
    # Three losses and the baseline on the one new seed; the validated best and the baseline on the
    # confirmation seeds they lack (one, unless another loss is now the best).
    assert sorted(seed for _, _, seed in added if seed < CONFIRMATION_SEEDS) == [VALIDATION_SEEDS + 3] * 4
    confirming = [(cid, seed) for cid, _, seed in added if seed >= CONFIRMATION_SEEDS]
    assert {cid for cid, _ in confirming} <= {summary["best"]["id"], 0} and (0, CONFIRMATION_SEEDS + 5) in confirming
    # Without --confirm-seeds, the run's own setting (5): nothing new to score on those.
    before = len(rows(finished_run))
    assert main(["validate", str(finished_run), "--top", "3", "--seeds", "4", "--executor", "serial", "--json"]) == 0
    assert len(rows(finished_run)) == before
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["best"]["seeds"] == 5
    assert len(added) == len(set(added))


def test_resuming_a_finished_run_repeats_no_evaluation(finished_run, tmp_path):
    before = sorted(rows(finished_run), key=repr)
    assert main(["run", "--resume", str(finished_run), "--executor", "serial", "--quiet"]) == 0
    assert sorted(rows(finished_run), key=repr) == before


def test_a_loss_that_fails_on_held_out_seeds_is_flagged_and_a_clear_gain_is_said_plainly():
    chosen = [Candidate(1, "steady", "x"), Candidate(2, "brittle", "x")]
    baseline = Candidate(0, "dpo", "x", operator="seed")
    seeds = [10, 11, 12]
    scores = {}
    for k, seed in enumerate(seeds):
        scores[(0, seed)] = EvalResult(0, "ok", 0.5 + k / 10)
        scores[(1, seed)] = EvalResult(1, "ok", 0.6 + k / 10 + (0.001 if k == 1 else 0))
        scores[(2, seed)] = EvalResult(2, "ok", 0.9) if k else EvalResult(2, "error", error="diverged")
    summary = summarise("validation:x", chosen, baseline, seeds, scores, floor=-1.0)
    steady, brittle = summary["losses"]
    assert steady["gain"] == pytest.approx(0.1, abs=1e-3) and steady["flag"] is None
    assert brittle["failed_seeds"] == 1 and "failed on 1 seed" in brittle["flag"]
    assert summary["best"]["name"] == "steady" and "beats dpo on held-out data" in summary["verdict"]


def test_the_validated_best_is_reported_on_seeds_that_did_not_choose_it():
    chosen = [Candidate(1, "lucky", "x"), Candidate(2, "steady", "x")]
    baseline = Candidate(0, "dpo", "x", operator="seed")
    seeds, confirmation = [10, 11, 12], [20, 21, 22]
    scores = {}
    for k, seed in enumerate(seeds):  # lucky's gain on these seeds is luck
        for cid, gain in ((0, 0.0), (1, 0.3 + k / 100), (2, 0.1 + k / 100)):
            scores[(cid, seed)] = EvalResult(cid, "ok", 0.5 + gain)
    for k, seed in enumerate(confirmation):
        for cid, gain in ((0, 0.0), (1, 0.01 * (k - 1))):
            scores[(cid, seed)] = EvalResult(cid, "ok", 0.5 + gain)
    summary = summarise("validation:x", chosen, baseline, seeds, scores, floor=-1.0, confirmation=confirmation)
    best = summary["best"]
    assert best["name"] == "lucky" and best["chosen_gain"] == pytest.approx(0.31)
    assert best["gain"] == pytest.approx(0.0, abs=1e-12) and best["seeds"] == 3 and best["chosen_among"] == 2
    assert "is not distinguishable from dpo" in summary["verdict"] and "chosen among 2" in summary["verdict"]
    assert summary["losses"][0]["gain"] == pytest.approx(0.31)  # the table keeps the choosing seeds' numbers


def test_show_gives_a_candidates_seeds_estimate_and_validation(finished_run, capsys):
    assert main(["replay", str(finished_run), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["validation"]["losses"][0]["id"]
    assert main(["show", str(finished_run), str(best), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["estimate"]["seeds"] == len(report["seed_scores"]) >= 1
    assert report["validation"]["id"] == best and report["validation"]["seeds"] >= 3


def test_first_seeds_run_scores_every_candidate_on_the_runs_own_seed(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", *RUN, "--first-seeds", "run", "--validate-top", "0", "--out", str(run)]) == 0
    store = RunStore.open(run, readonly=True)
    data = read_run(store)
    store.close()
    assert all(0 in scores for scores in data.seed_scores.values())
    seeds = set().union(*data.seed_scores.values())
    assert not {GENERATION_SEEDS + GENERATION_STRIDE * g for g in (1, 2)} & seeds
    # What a candidate was first scored on cannot change when the run resumes.
    assert main(["run", "--resume", str(run), "--first-seeds", "generation", "--quiet"]) == 2
    assert "--first-seeds cannot change" in capsys.readouterr().err


def test_runs_stored_before_generation_seeds_read_as_one_seed():
    old = {"eval_seed": 5, "race_seeds": 3, "strategy": "population"}  # no first_seeds: an older run
    assert [first_seed(old, g) for g in (0, 1, 7)] == [5, 5, 5]
    new = {**old, "first_seeds": "generation"}
    assert [first_seed(new, g) for g in (0, 1, 7)] == [5, 5 + GENERATION_SEEDS + GENERATION_STRIDE,
                                                       5 + GENERATION_SEEDS + 7 * GENERATION_STRIDE]
    # Without racing nothing pairs scores across seeds, and steady state has no generations to seed.
    assert first_seed({**new, "race_seeds": 0}, 3) == 5 and first_seed({**new, "asynchronous": True}, 3) == 5
    assert first_seed({**new, "strategy": "sequential"}, 3) == 5


def test_resuming_a_run_stored_before_the_confirmation_setting_adds_no_evaluation(tmp_path):
    # A run made before --validate-confirm-seeds confirmed its best on --validate-seeds seeds.
    run = tmp_path / "run"
    assert main(["run", *RUN[:-3], "--validate-confirm-seeds", "3", "--quiet", "--out", str(run)]) == 0
    store = RunStore.open(run)
    config = store.meta("config")
    del config["validate_confirm_seeds"]
    store.set_meta("config", config)
    store.close()
    before = sorted(rows(run), key=repr)
    assert main(["run", "--resume", str(run), "--executor", "serial", "--quiet"]) == 0
    assert sorted(rows(run), key=repr) == before
