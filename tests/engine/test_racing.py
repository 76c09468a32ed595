"""Noise-aware ranking: estimates paired with the baseline, the lower bound that ranks, and the
re-measurements racing asks for."""
import math

import pytest

from engine.search.racing import CONFIRM_SEEDS, SEED_STRIDE, Racing, RacingSettings


def racing(**settings):
    return Racing(RacingSettings(**{"race_seeds": 3, "race_budget": 100, "race_top": 2, **settings}),
                  eval_seed=0, baseline=lambda: 0, floor=-1.0)


def test_a_paired_gain_removes_the_noise_both_share():
    race = racing()
    for seed, shared in zip(range(4), [0.0, 0.3, -0.2, 0.5]):  # easy and hard problem instances
        race.add(0, seed, 0.5 + shared)
        race.add(1, seed, 0.6 + shared + (0.01 if seed % 2 else -0.01))
    estimate = race.estimate(1)
    assert estimate.seeds == 4 and estimate.gain == pytest.approx(0.1)
    assert estimate.se == pytest.approx(0.01 / math.sqrt(4) * math.sqrt(4 / 3))  # only the unshared part
    baseline_mean = sum(0.5 + s for s in [0.0, 0.3, -0.2, 0.5]) / 4
    assert estimate.lower == pytest.approx(baseline_mean + 0.1 - estimate.se)


def test_one_lucky_draw_ranks_below_a_gain_measured_on_several_seeds():
    race = racing()
    for seed in range(4):
        race.add(0, seed, 0.5)
        race.add(1, seed, 0.55 + (0.04 if seed % 2 else -0.04))  # noisy but steady gain
    race.add(2, 0, 0.565)  # one draw, above the steady mean
    lucky, steady = race.estimate(2), race.estimate(1)
    assert lucky.mean > steady.mean
    assert lucky.se == pytest.approx(race.pooled_sd()) and lucky.lower < steady.lower


def test_contenders_get_twice_their_seeds_and_the_baseline_follows_each_new_seed():
    race = racing(race_top=1)
    race.add(0, 0, 0.5)
    race.add(1, 0, 0.7)
    race.add(2, 0, 0.1)  # cannot reach the top
    plan = race.due({0, 1, 2})
    assert plan == [(1, SEED_STRIDE), (0, SEED_STRIDE)]
    for cid, seed in plan:
        race.add(cid, seed, 0.7 if cid == 1 else 0.5)
    plan = race.due({0, 1, 2})
    assert sorted(plan) == sorted([(1, 2 * SEED_STRIDE), (1, 3 * SEED_STRIDE), (0, 2 * SEED_STRIDE),
                                   (0, 3 * SEED_STRIDE)])
    for cid, seed in plan:
        race.add(cid, seed, 0.7 if cid == 1 else 0.5)
    assert race.due({0, 1, 2}) == []  # 1 + race_seeds seeds: trusted, nothing more to measure


def test_the_budget_bounds_a_round_and_failures_count_as_the_floor():
    race = racing(race_budget=3, race_top=5)
    for cid in range(5):
        race.add(cid, 0, 0.5 + cid / 100)
    plan = race.due(set(range(5)))
    assert len(plan) <= 3 and all(seed == SEED_STRIDE for _, seed in plan)
    race.add(4, SEED_STRIDE, None)
    assert race.samples[4][SEED_STRIDE] == -1.0


def test_racing_off_asks_for_nothing():
    race = racing(race_seeds=0)
    race.add(0, 0, 0.5)
    race.add(1, 0, 0.9)
    assert race.due({0, 1}) == []


def test_confirmation_measures_the_best_and_the_baseline_on_seeds_that_chose_nothing():
    race = racing(race_top=2, confirm_seeds=3)
    for cid, value in ((0, 0.5), (1, 0.7), (2, 0.6), (3, 0.1)):
        race.add(cid, 0, value)
    plan = race.confirmation({0, 1, 2, 3})
    seeds = [CONFIRM_SEEDS + k for k in range(3)]
    assert race.confirmation_seeds() == seeds
    assert sorted(plan) == sorted((cid, seed) for cid in (1, 2, 0) for seed in seeds)
    # Confirmation scores do not change whom it confirms (a resumed run confirms the same ones),
    # and nothing already measured is measured again.
    race.add(3, seeds[0], 5.0)
    for cid, seed in plan[:4]:
        race.add(cid, seed, 0.0)
    rest = race.confirmation({0, 1, 2, 3})
    assert rest == plan[4:]
    for cid, seed in rest:
        race.add(cid, seed, 0.0)
    assert race.confirmation({0, 1, 2, 3}) == []
    # The confirmed scores count in the final ranking: the lucky first draw of 1 falls behind 2.
    race2 = racing(race_top=2, confirm_seeds=2)
    for cid, value in ((0, 0.5), (1, 0.7), (2, 0.6)):
        race2.add(cid, 0, value)
    for cid, seed in race2.confirmation({0, 1, 2}):
        race2.add(cid, seed, {0: 0.5, 1: 0.5, 2: 0.6}[cid])
    assert race2.estimate(2).lower > race2.estimate(1).lower


def test_no_confirmation_without_racing_or_with_zero_seeds():
    for settings in ({"race_seeds": 0}, {"confirm_seeds": 0}):
        race = racing(**settings)
        race.add(0, 0, 0.5)
        race.add(1, 0, 0.9)
        assert race.confirmation({0, 1}) == []
