"""``cls-suite``: small classification tasks and the digits data, with a meta-train / meta-test split."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.genome import GenomeError, compile_genome
from engine.plugins import PluginError, load_fitness
from fitness.cifar10 import ClassificationInterface, classification_seeds
from fitness.suites.cls_suite import ClassificationSuite, balanced_score, class_sizes
from tests.fitness.suite_contract import check_suite_contract

torch.set_num_threads(1)

SEEDS = {seed.name: compile_genome(seed.code, ClassificationInterface.arg_counts) for seed in classification_seeds()}


def constant(logits, targets):
    return 0.0 * logits.sum(dim=1) + 1.0


def anti(logits, targets):
    """Minimises the probability of the labelled class: learns to be wrong (and stays bounded)."""
    return F.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)


def sign_flipped(logits, targets):
    return -F.cross_entropy(logits, targets, reduction="none")


@pytest.fixture(scope="module")
def suite():
    return ClassificationSuite()


@pytest.fixture(scope="module")
def ranking(suite):
    return {name: suite.evaluate(fn, 0) for name, fn in
            {"cross_entropy": SEEDS["cross_entropy"], "constant": constant, "anti": anti}.items()}


def test_meta_train_and_meta_test_are_disjoint_and_deterministic_for_a_suite_seed():
    first, again = ClassificationSuite(), ClassificationSuite()
    train, test = first.split_tasks("train"), first.split_tasks("test")
    assert len(train) == 6 and len(test) == 8
    assert not {t.name for t in train} & {t.name for t in test}
    assert not {t.spec for t in train} & {t.spec for t in test}
    assert [t.spec for t in train] == [t.spec for t in again.split_tasks("train")]
    assert [t.spec for t in test] != [t.spec for t in ClassificationSuite(suite_seed=3).split_tasks("test")]
    for tasks in (train, test):
        assert [t.spec.data for t in tasks].count("digits") == 1
        assert {t.spec.model for t in tasks} == {"linear", "mlp"}


def test_the_digits_halves_are_disjoint_and_fixed():
    suite = ClassificationSuite()
    (train_x, _), (test_x, _) = suite.digits_half("train"), suite.digits_half("test")
    assert len(train_x) + len(test_x) == 1797
    # The data set holds a few duplicate images; almost none of the held-out half is in the other.
    shared = (test_x[:, None, :] == train_x[None, :, :]).all(dim=-1).any(dim=1)
    assert int(shared.sum()) < 10
    assert torch.equal(ClassificationSuite().digits_half("test")[0], test_x)


def test_imbalance_and_balanced_score():
    sizes = class_sizes(600, 4, 8.0)
    assert sizes[0] == pytest.approx(8 * sizes[-1], rel=0.05) and sorted(sizes, reverse=True) == sizes
    labels = torch.tensor([0] * 90 + [1] * 10)
    majority = torch.zeros(100, 2)
    majority[:, 0] = 1.0
    assert balanced_score(majority, labels, 2) == pytest.approx(0.0)  # chance, though 90% accurate
    assert balanced_score(F.one_hot(labels, 2).float(), labels, 2) == pytest.approx(1.0)


@pytest.mark.slow
def test_cross_entropy_ranks_well_above_constant_and_wrong_way_losses(ranking):
    ce = ranking["cross_entropy"]
    assert ce.fitness == 0.0
    assert 0.3 < ce.metrics["mean_score"] < 0.95
    assert ranking["constant"].fitness < -0.2
    assert ranking["anti"].fitness < ranking["constant"].fitness
    assert ranking["anti"].metrics["mean_score"] < 0.0  # worse than chance


def test_sign_flipped_cross_entropy_diverges_and_fails():
    with pytest.raises(GenomeError, match="non-finite"):
        ClassificationSuite(tasks=[1]).evaluate(sign_flipped, 0)


@pytest.mark.slow
def test_a_loss_that_wins_one_task_and_collapses_on_another_does_not_beat_cross_entropy(ranking):
    # Squared error on 7-class tasks, the wrong-way loss on 4-class ones, cross-entropy
    # elsewhere: the loss reads the class count to tell the tasks apart.
    def gaming(logits, targets):
        if logits.shape[1] == 4:
            return anti(logits, targets)
        if logits.shape[1] == 7:
            return SEEDS["squared_error"](logits, targets)
        return SEEDS["cross_entropy"](logits, targets)

    score = ClassificationSuite().evaluate(gaming, 0)
    gains = [entry["gain"] for entry in score.metrics["per_task"].values()]
    assert max(gains) > 0.05 and min(gains) < -0.3
    assert score.fitness < ranking["cross_entropy"].fitness


def test_evaluation_is_deterministic_for_a_seed():
    first = ClassificationSuite(tasks=[3]).evaluate(SEEDS["focal"], 2)
    again = ClassificationSuite(tasks=[3]).evaluate(SEEDS["focal"], 2)
    assert first.fitness == again.fitness
    assert [r["score"] for r in first.metrics["results"]] == [r["score"] for r in again.metrics["results"]]
    assert ClassificationSuite(tasks=[3]).evaluate(SEEDS["focal"], 3).metrics["results"][0]["score"] != \
        first.metrics["results"][0]["score"]


def test_a_non_finite_loss_fails_naming_the_task():
    def explodes(logits, targets):
        return torch.exp(1e4 * logits).sum(dim=1)

    with pytest.raises(GenomeError, match="task train-0:synthetic"):
        ClassificationSuite(tasks=[0]).evaluate(explodes, 0)


def test_plugin_contract_through_the_registry():
    score = check_suite_contract("cls-suite", {"tasks": [0, 7], "split": "test"})
    assert any("digits" in name for name in score.metrics["per_task"])


@pytest.mark.parametrize("options,fragment", [
    ({"split": "val"}, "split must be train or test"),
    ({"tasks": [6]}, r"indices in \[0, 6\)"),
    ({"train_tasks": 0}, "train_tasks must be an integer >= 1"),
])
def test_bad_options_are_named(options, fragment):
    with pytest.raises(PluginError, match=fragment):
        load_fitness("cls-suite", options)
