"""``pref-suite``: synthetic DPO settings with a meta-train / meta-test split."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine.genome import GenomeError, compile_genome
from engine.plugins import PluginError, load_fitness
from fitness.base import validate_artefacts
from fitness.preference import SHAPE_PROFILE, PreferenceInterface, preference_seeds
from fitness.suites import TaskResult, aggregate
from fitness.suites.base import results_from_metrics
from fitness.suites.pref_suite import POLICIES, REFERENCES, PreferenceData, PreferenceSuite
from tests.fitness.suite_contract import check_suite_contract

torch.set_num_threads(1)

SEEDS = {seed.name: compile_genome(seed.code, PreferenceInterface.arg_counts) for seed in preference_seeds()}


def _logits(pc, pr, rc, rr):
    return (pc - pr) - (rc - rr)


def constant(self, pc, pr, rc, rr):
    return 0.0 * _logits(pc, pr, rc, rr) + 1.0


def sign_flipped(self, pc, pr, rc, rr):
    return -F.logsigmoid(-self.beta * _logits(pc, pr, rc, rr))


@pytest.fixture(scope="module")
def suite():
    return PreferenceSuite()


@pytest.fixture(scope="module")
def ranking(suite):
    """Scores of DPO and broken losses on the whole meta-train split, seed 0."""
    return {name: suite.evaluate(fn, 0) for name, fn in
            {"dpo": SEEDS["dpo"], "constant": constant, "sign_flipped": sign_flipped}.items()}


# -- the split -----------------------------------------------------------------------------
def test_meta_train_and_meta_test_are_disjoint_and_deterministic_for_a_suite_seed():
    first, again, other = PreferenceSuite(), PreferenceSuite(), PreferenceSuite(suite_seed=3)
    train, test = first.split_tasks("train"), first.split_tasks("test")
    assert len(train) == 32 and len(test) == 12
    assert not {t.name for t in train} & {t.name for t in test}
    assert not {t.key for t in train} & {t.key for t in test}
    assert not {t.spec for t in train} & {t.spec for t in test}
    assert [t.spec for t in train] == [t.spec for t in again.split_tasks("train")]
    assert [t.spec for t in test] == [t.spec for t in again.split_tasks("test")]
    assert [t.spec for t in train] != [t.spec for t in other.split_tasks("train")]
    assert first.tasks == train and PreferenceSuite(split="test").tasks == test


@pytest.mark.parametrize("suite_seed", [0, 1, 2])
@pytest.mark.parametrize("split", ["train", "test"])
def test_each_split_covers_every_policy_reference_and_the_beta_range(suite_seed, split):
    specs = [t.spec for t in PreferenceSuite(suite_seed=suite_seed).split_tasks(split)]
    assert {s.policy for s in specs} == set(POLICIES)
    assert {s.reference for s in specs} == set(REFERENCES)
    assert min(s.beta for s in specs) < 0.02  # the small beta that trapped LRML on IMDb
    assert max(s.beta for s in specs) > 0.25
    assert all(0 <= s.label_noise <= 0.3 and 0 <= s.misspecification <= 0.5 for s in specs)
    assert all(128 <= s.pairs <= 1024 and 2 <= s.positions <= 24 for s in specs)


def test_each_seed_scores_its_own_fresh_draw_of_meta_train_tasks_and_meta_test_scores_all():
    suite = PreferenceSuite()
    first, again, other = suite.tasks_for(0), PreferenceSuite().tasks_for(0), suite.tasks_for(7919)
    assert len(first) == 8 and [t.spec for t in first] == [t.spec for t in again]
    assert not {t.spec for t in first} & {t.spec for t in other}
    assert not {t.key for t in first} & {t.key for t in other}
    pool = {t.spec for t in suite.tasks}
    assert not {t.spec for t in first} & pool  # drawn from the generator, not from the pool
    # The fixed pool of meta-train tasks, as before, when asked for.
    fixed = PreferenceSuite(fresh_tasks=False)
    assert len({t.name for s in range(40) for t in fixed.tasks_for(s)}) == 32  # every task gets its turn
    assert PreferenceSuite(split="test").tasks_for(3) == PreferenceSuite(split="test").tasks
    assert PreferenceSuite(tasks=[0, 1, 2]).tasks_for(3) == PreferenceSuite(tasks=[0, 1, 2]).tasks
    assert load_fitness("pref-suite", PreferenceSuite().validation_options()).tasks_for(3) == \
        PreferenceSuite(split="test").tasks
    # Two seeds of one evaluation: each seed's own tasks, paired with DPO on that seed.
    score = PreferenceSuite(seeds=2).evaluate(SEEDS["dpo"], 0)
    assert {(r["task"], r["seed"]) for r in score.metrics["results"]} == \
        {(t.name, s) for s in (0, 1) for t in suite.tasks_for(s)}
    assert score.fitness == 0.0 and score.metrics["gain_se"] == 0.0


def test_a_fresh_draw_replaces_tasks_where_normalised_scores_are_noise():
    suite = PreferenceSuite()
    kept = [task for seed in range(12) for task in suite.tasks_for(seed)]
    assert all(-1.0 < suite.baseline_score(task, int(task.name.split("@")[1].split(".")[0])) < 1.0
               for task in kept)
    # Some draws were rejected (an index skipped), and a suite that keeps nothing says so.
    assert any(task.index >= 8 for task in kept)

    class Picky(PreferenceSuite):
        def usable(self, task, seed):
            return False

    with pytest.raises(RuntimeError, match="usable"):
        Picky().tasks_for(0)


def test_fresh_tasks_are_drawn_in_the_trusted_process_and_inherited_by_the_genome_process():
    suite = PreferenceSuite()
    suite.prepare(5)
    drawn = suite.tasks_for(5)
    suite.held_out.wipe()  # the genome's process
    assert suite.tasks_for(5) == drawn and set(suite.train(SEEDS["dpo"], 5)) == set(suite.artefact_spec(5))
    with pytest.raises(RuntimeError, match="trusted process"):
        suite.tasks_for(6)


def test_the_default_meta_test_draw_has_no_task_where_normalised_scores_are_noise():
    # (Meta-train tasks are drawn per evaluation seed and checked one by one.)
    suite = PreferenceSuite(split="test")
    scores = {task.name: suite.baseline_score(task, 0) for task in suite.tasks}
    assert all(-1.0 < value < 1.0 for value in scores.values()), scores


def test_training_sees_pairs_and_reference_but_no_reward_and_scoring_needs_held_out_data():
    fields = {f.name for f in dataclasses.fields(PreferenceData)}
    assert fields == {"policy", "beta", "steps", "learning_rate", "reference_logits", "context", "chosen",
                      "rejected", "inputs"}
    suite = PreferenceSuite(tasks=[0, 1])
    suite.held_out.wipe()  # what the engine does in a genome's process
    artefacts = suite.train(SEEDS["dpo"], 0)  # training still works from the seed alone
    assert artefacts
    with pytest.raises(RuntimeError, match="held-out data is not available"):
        suite.score(artefacts, 0)
    fresh = PreferenceSuite(tasks=[0, 1])
    assert fresh.score(validate_artefacts(artefacts, fresh.artefact_spec(0), fresh.max_artefact_bytes), 0).fitness == 0.0


# -- ranking ---------------------------------------------------------------------------------
def test_dpo_ranks_well_above_constant_and_sign_flipped_losses(ranking):
    dpo = ranking["dpo"]
    assert dpo.fitness == 0.0
    assert "clipped_mean_gain" in dpo.metrics["fitness_rule"] and "limited to +-0.06" in dpo.metrics["fitness_rule"]
    dpo_scores = [r["score"] for r in dpo.metrics["results"]]
    assert max(dpo_scores) > 0.5 and all(score < 1.0 for score in dpo_scores)  # DPO gains, and leaves room
    # Each task's gain counts up to 0.06 either way in the fitness: the order is what it shows.
    assert ranking["constant"].fitness < -0.01 and ranking["constant"].metrics["worst_gain"] < -0.3
    assert all(r["score"] == pytest.approx(0.0, abs=1e-9) for r in ranking["constant"].metrics["results"])
    assert ranking["sign_flipped"].fitness <= ranking["constant"].fitness
    assert ranking["sign_flipped"].metrics["mean_gain"] < ranking["constant"].metrics["mean_gain"] - 0.3
    assert ranking["sign_flipped"].metrics["mean_score"] < -0.3


def test_a_loss_that_wins_one_task_and_collapses_on_another_does_not_beat_dpo(suite, ranking):
    # IPO on the meta-train task where it beats DPO most, sign-flipped DPO on the task with the
    # smallest beta of the others, DPO elsewhere: the loss reads beta to tell the tasks apart.
    for seed in range(8):  # the first evaluation seed with a task where IPO clearly beats DPO
        ipo_gains = {task.spec.beta: suite.evaluate_task(SEEDS["ipo"], task, seed).gain
                     for task in suite.tasks_for(seed)}
        if max(ipo_gains.values()) > 0.05:
            break
    win_beta = max(ipo_gains, key=ipo_gains.get)
    lose_beta = min(beta for beta in ipo_gains if beta != win_beta)
    assert ipo_gains[win_beta] > 0.05 and win_beta != lose_beta

    def gaming(self, pc, pr, rc, rr):
        if self.beta == win_beta:
            return SEEDS["ipo"](self, pc, pr, rc, rr)
        if self.beta == lose_beta:
            return sign_flipped(self, pc, pr, rc, rr)
        return SEEDS["dpo"](self, pc, pr, rc, rr)

    score = suite.evaluate(gaming, seed)
    gains = {name: entry["gain"] for name, entry in score.metrics["per_task"].items()}
    assert max(gains.values()) == pytest.approx(ipo_gains[win_beta], abs=1e-9)
    assert score.metrics["worst_gain"] < -0.1
    assert score.fitness < suite.evaluate(SEEDS["dpo"], seed).fitness == 0.0


def test_aggregate_ranks_a_collapse_below_the_baseline_even_with_a_higher_mean():
    results = [TaskResult("a", 0, 0.9, 0.5), TaskResult("b", 0, 0.5, 0.5), TaskResult("c", 0, 0.1, 0.3)]
    summary = aggregate(results)
    assert summary["mean_gain"] == pytest.approx((0.4 + 0.0 - 0.2) / 3)
    assert summary["worst_task"] == "c" and summary["worst_gain"] == pytest.approx(-0.2)
    # The worst task falls 0.15 beyond the tolerated 0.05.
    assert summary["fitness"] == pytest.approx(0.5 * summary["mean_gain"] + 0.5 * (-0.2 + 0.05))
    assert summary["fitness"] < 0.0  # the baseline scores 0
    assert aggregate(results, worst_weight=0.0)["fitness"] > 0.0
    assert aggregate(results, worst_tolerance=0.0)["fitness"] == pytest.approx(0.5 * summary["mean_gain"] - 0.1)
    # With gains limited to +-0.06, the win counts 0.06 and the collapse -0.06: still below the baseline.
    clipped = aggregate(results, gain_clip=0.06)
    assert clipped["clipped_mean_gain"] == pytest.approx(0.0) and clipped["mean_gain"] == summary["mean_gain"]
    assert clipped["fitness"] == pytest.approx(0.5 * (-0.06 + 0.05)) and clipped["fitness"] < 0.0
    with pytest.raises(ValueError, match="gain_clip"):
        aggregate(results, gain_clip=0.0)
    with pytest.raises(ValueError, match="worst_weight"):
        aggregate(results, worst_weight=2)
    with pytest.raises(ValueError, match="worst_tolerance"):
        aggregate(results, worst_tolerance=-0.1)


def test_aggregate_scores_a_small_shortfall_within_the_tolerance_as_the_mean_gain():
    # Within the tolerance on every task: the mean gain, whatever the worst task.
    small = [TaskResult("a", 0, 0.53, 0.5), TaskResult("b", 0, 0.49, 0.5), TaskResult("c", 0, 0.5, 0.5)]
    assert aggregate(small)["fitness"] == pytest.approx((0.03 - 0.01) / 3)
    # The same mean bought with a collapse scores below the baseline.
    collapsed = [TaskResult("a", 0, 0.7, 0.5), TaskResult("b", 0, 0.4, 0.5), TaskResult("c", 0, 0.5, 0.5)]
    assert aggregate(collapsed)["mean_gain"] > aggregate(small)["mean_gain"]
    assert aggregate(collapsed)["fitness"] < 0.0 < aggregate(small)["fitness"]
    # The baseline itself scores exactly 0.
    assert aggregate([TaskResult("a", 0, 0.5, 0.5), TaskResult("b", 0, 0.3, 0.3)])["fitness"] == 0.0
    # Clipped, the same: within the limit nothing changes, and the collapse still costs.
    assert aggregate(small, gain_clip=0.06)["fitness"] == aggregate(small)["fitness"]
    assert aggregate(collapsed, gain_clip=0.06)["fitness"] < 0.0


def test_a_clipped_gain_keeps_one_task_from_deciding_the_rank():
    # One large win (a task where the baseline overfits) against small wins on every task.
    lucky = [TaskResult("a", 0, 0.9, 0.3), TaskResult("b", 0, 0.49, 0.5), TaskResult("c", 0, 0.5, 0.5)]
    steady = [TaskResult("a", 0, 0.32, 0.3), TaskResult("b", 0, 0.52, 0.5), TaskResult("c", 0, 0.52, 0.5)]
    assert aggregate(lucky)["fitness"] > aggregate(steady)["fitness"]  # unclipped, the one task decides
    assert aggregate(lucky, gain_clip=0.06)["fitness"] < aggregate(steady, gain_clip=0.06)["fitness"]
    assert PreferenceSuite().gain_clip == 0.06 and PreferenceSuite(gain_clip=0.1).gain_clip == 0.1


def test_standard_error_is_over_seeds_of_the_paired_mean_gain():
    results = [TaskResult(t, s, 0.5 + g, 0.5) for s, g in ((0, 0.1), (1, 0.3)) for t in ("a", "b")]
    summary = aggregate(results)
    assert summary["seeds"] == [0, 1]
    assert summary["gain_se"] == pytest.approx(0.1)
    assert summary["per_task"]["a"]["seeds"] == 2
    assert aggregate(results[:2])["gain_se"] is None


# -- determinism, metrics, failures ------------------------------------------------------------
def test_evaluation_is_deterministic_for_a_seed_and_records_every_task_and_seed():
    options = {"tasks": [5, 7], "seeds": 2}
    first = PreferenceSuite(**options).evaluate(SEEDS["slic"], 4)
    again = PreferenceSuite(**options).evaluate(SEEDS["slic"], 4)
    assert first.fitness == again.fitness
    assert first.metrics["results"] == again.metrics["results"]
    assert [(r["task"][:7], r["seed"]) for r in first.metrics["results"]] == [
        ("train-5", 4), ("train-7", 4), ("train-5", 5), ("train-7", 5)]
    assert first.metrics["gain_se"] is not None
    assert PreferenceSuite(**options).evaluate(SEEDS["slic"], 6).fitness != first.fitness
    # Stored results re-aggregate to the same fitness (no task is re-run).
    suite = PreferenceSuite(**options)
    assert aggregate(results_from_metrics(first.metrics), suite.worst_weight, suite.worst_tolerance,
                     suite.gain_clip)["fitness"] == pytest.approx(first.fitness)


def test_metrics_carry_the_loss_shape_profile(ranking):
    metrics = ranking["dpo"].metrics
    assert set(SHAPE_PROFILE) <= set(metrics)
    assert metrics["shape_slope_sign_at_zero"] == -1.0
    lrml = PreferenceSuite(tasks=[0]).evaluate(SEEDS["lrml"], 0).metrics
    assert lrml["shape_slope_sign_at_zero"] == 1.0 and lrml["shape_slope_at_zero"] > 1.0


def test_a_non_finite_loss_fails_naming_the_task():
    def explodes(self, pc, pr, rc, rr):
        return torch.exp(-1000.0 * self.beta * _logits(pc, pr, rc, rr)) * 1e300

    with pytest.raises(GenomeError, match="task train-0:"):
        PreferenceSuite(tasks=[0]).evaluate(explodes, 0)


def test_plugin_contract_through_the_registry():
    score = check_suite_contract("pref-suite", {"tasks": [0, 2], "split": "test"})
    assert all(name.startswith("test-") for name in score.metrics["per_task"])


@pytest.mark.parametrize("options,fragment", [
    ({"split": "val"}, "split must be train or test"),
    ({"tasks": [32]}, r"indices in \[0, 32\)"),
    ({"tasks_per_seed": 0}, "tasks_per_seed must be an integer >= 1"),
    ({"fresh_tasks": "yes"}, "fresh_tasks must be true or false"),
    ({"gain_clip": 0}, "gain_clip must be a number > 0"),
    ({"seeds": 0}, "seeds must be an integer >= 1"),
    ({"worst_weight": 1.5}, "worst_weight"),
    ({"worst_tolerance": -1}, "worst_tolerance"),
    ({"nonsense": 1}, "nonsense"),
])
def test_bad_options_are_named(options, fragment):
    with pytest.raises(PluginError, match=fragment):
        load_fitness("pref-suite", options)


def test_prepare_builds_every_problem_before_a_genome_process_is_forked():
    suite = PreferenceSuite(tasks=[3, 5], seeds=2)
    suite.prepare(10)
    keys = [(task.name, seed) for seed in (10, 11) for task in suite.tasks]
    assert all(key in suite.held_out for key in keys)
    data = {key: suite.training_data(suite.task(key[0]), key[1]) for key in keys}
    suite.held_out.wipe()  # the genome's process: training uses the inherited data, not new copies
    artefacts = suite.train(SEEDS["dpo"], 10)
    assert all(suite.training_data(suite.task(name), seed) is data[(name, seed)] for name, seed in keys)
    assert set(artefacts) == set(suite.artefact_spec(10))


def test_loss_shape_profile_tells_known_failure_shapes_apart_and_ignores_scale():
    from fitness.preference import loss_shape_profile

    interface = PreferenceInterface()
    profile = {name: loss_shape_profile(interface, fn) for name, fn in SEEDS.items()}
    assert set(profile["dpo"]) == set(SHAPE_PROFILE)
    assert profile["dpo"]["shape_slope_at_zero"] == pytest.approx(-1.0, abs=0.02)
    assert profile["dpo"]["shape_right_behaviour"] == 0.0 and profile["dpo"]["shape_left_bounded"] == 0.0
    assert profile["lrml"]["shape_slope_sign_at_zero"] == 1.0  # DiscoPOP's bump at zero margin
    assert profile["ipo"]["shape_right_behaviour"] == 1.0  # penalises large margins
    assert profile["ipo"]["shape_left_tail_exponent"] == pytest.approx(1.0, abs=0.05)
    assert profile["kto_pair"]["shape_left_bounded"] == 1.0  # gives up on badly ordered pairs
    assert profile["cell"]["shape_left_tail_exponent"] > 10  # exponential tail
    flipped = loss_shape_profile(interface, sign_flipped)
    assert flipped["shape_increasing_share"] > 0.8 and flipped["shape_left_slope"] > 0

    def scaled_dpo(self, pc, pr, rc, rr):
        return 7.0 * SEEDS["dpo"](self, pc, pr, rc, rr) + 3.0

    for key, value in loss_shape_profile(interface, scaled_dpo).items():
        assert value == pytest.approx(profile["dpo"][key], abs=1e-6), key

    def unbounded_below(self, pc, pr, rc, rr):
        return -self.beta * _logits(pc, pr, rc, rr)

    assert loss_shape_profile(interface, unbounded_below)["shape_right_behaviour"] == -1.0
    assert loss_shape_profile(interface, constant) == {}  # flat: nothing is claimed
