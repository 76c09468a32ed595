"""Choosing operators: sliding-window Thompson sampling, UCB1 and uniform choice."""
import random
from collections import Counter

import pytest

from operators.bandit import Chooser, ThompsonChooser, UCBChooser, make_chooser


def picks(chooser, n=200, seed=0, rewards=None):
    """Choose ``n`` times; with ``rewards`` each pick's outcome is fed back before the next."""
    rng = random.Random(seed)
    counts = Counter()
    for _ in range(n):
        name = chooser.choose(["good", "bad"], rng)
        counts[name] += 1
        if rewards:
            chooser.update(name, rewards[name])
    return counts


@pytest.mark.parametrize("kind", ["bandit", "ucb"])
def test_the_operator_that_pays_off_is_chosen_more(kind):
    chooser = make_chooser(kind, window=20)
    counts = picks(chooser, rewards={"good": 1.0, "bad": 0.0})
    assert counts["good"] > 3 * counts["bad"]


def test_the_window_forgets_old_outcomes():
    chooser = ThompsonChooser(window=10)
    for _ in range(50):
        chooser.update("good", 1.0)
    for _ in range(10):
        chooser.update("good", 0.0)  # the operator broke: only these remain in the window
        chooser.update("bad", 0.5)
    assert chooser.stats()["good"] == {"n": 10, "mean": 0.0}
    assert picks(chooser, n=20)["bad"] > 15


def test_ucb_spreads_a_generations_slots_before_rewards_arrive():
    chooser = UCBChooser()
    rng = random.Random(0)
    assert {chooser.choose(["a", "b", "c"], rng) for _ in range(3)} == {"a", "b", "c"}


def test_uniform_choice_and_state_round_trip():
    chooser = Chooser(window=5)
    counts = picks(chooser)
    assert 70 < counts["good"] < 130
    chooser.update("good", 0.7)
    restored = make_chooser("uniform", window=5)
    restored.restore(chooser.state())
    assert restored.state() == chooser.state()


def test_a_single_operator_draws_no_random_numbers():
    rng = random.Random(3)
    state = rng.getstate()
    assert ThompsonChooser().choose(["only"], rng) == "only" and rng.getstate() == state


def test_unknown_choice_is_rejected():
    with pytest.raises(ValueError, match="bandit, ucb, uniform"):
        make_chooser("greedy")
