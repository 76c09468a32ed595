"""Choosing an operator per offspring: a multi-armed bandit over the run's operators.

Each offspring an operator makes earns a reward in [0, 1]: 0 when the operator failed, made a
known genome or an invalid one, 0.5 when the offspring was scored, 1 when it also beat its
reference (its best parent, or the median elite for a fresh proposal). So the reward mixes the
valid rate and the fitness gain. Only the last ``window`` outcomes per operator count
(sliding-window bandits, Garivier & Moulines 2011), so an operator whose server degrades, or
that stops helping once the easy gains are made, loses its share.

- ``bandit``: Thompson sampling with a Beta posterior over the windowed rewards (fractional
  rewards are added as pseudo-counts). Random draws come from the engine's seeded generator,
  and the slots of a generation are planned before any of their rewards arrive, so the
  sampling also spreads one generation's slots over the operators.
- ``ucb``: sliding-window UCB1; picks not yet rewarded count as plays, so one generation's
  slots do not all go to the same arm.
- ``uniform``: each operator equally often (the engine's original behaviour).

Rewards are applied in a fixed order (ask-time failures in slot order, evaluations in candidate
order at ``tell``), and the state is saved with each generation, so runs and resumed runs make
the same choices.
"""
from __future__ import annotations

import math
import random
from collections import deque
from typing import Any
from collections.abc import Sequence


class Chooser:
    """Uniform choice; the base of the bandits.

    Args:
        window: Outcomes remembered per operator.
    """

    def __init__(self, window: int = 50) -> None:
        self.window = window
        self.rewards: dict[str, deque[float]] = {}
        self.pending: dict[str, int] = {}

    def _arm(self, name: str) -> deque[float]:
        if name not in self.rewards:
            self.rewards[name] = deque(maxlen=self.window)
        return self.rewards[name]

    def choose(self, names: Sequence[str], rng: random.Random) -> str:
        """One of ``names`` (never empty)."""
        if not names:
            raise ValueError("no operator to choose from")
        name = names[0] if len(names) == 1 else self._pick(list(names), rng)
        self.pending[name] = self.pending.get(name, 0) + 1
        return name

    def _pick(self, names: list[str], rng: random.Random) -> str:
        return rng.choice(names)

    def update(self, name: str, reward: float) -> None:
        """One outcome of ``name``: a reward in [0, 1]."""
        self._arm(name).append(min(1.0, max(0.0, float(reward))))
        if self.pending.get(name, 0) > 0:
            self.pending[name] -= 1

    def stats(self) -> dict[str, dict[str, float]]:
        """Per operator: outcomes in the window and their mean reward."""
        return {name: {"n": len(r), "mean": sum(r) / len(r) if r else math.nan} for name, r in self.rewards.items()}

    # -- saving with the run ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"rewards": {k: list(v) for k, v in self.rewards.items()}, "pending": dict(self.pending)}

    def restore(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.rewards = {k: deque(v, maxlen=self.window) for k, v in state.get("rewards", {}).items()}
        self.pending = {k: int(v) for k, v in state.get("pending", {}).items()}


class ThompsonChooser(Chooser):
    """Sliding-window Thompson sampling (Beta(1 + sum r, 1 + n - sum r) per operator)."""

    def _pick(self, names: list[str], rng: random.Random) -> str:
        best, best_draw = names[0], -1.0
        for name in names:
            rewards = self._arm(name)
            gained = sum(rewards)
            draw = rng.betavariate(1.0 + gained, 1.0 + len(rewards) - gained)
            if draw > best_draw:
                best, best_draw = name, draw
        return best


class UCBChooser(Chooser):
    """Sliding-window UCB1: mean reward plus ``c * sqrt(2 ln N / n)``; unrewarded picks count
    as plays with reward 0 until their outcome arrives."""

    def __init__(self, window: int = 50, c: float = 1.0) -> None:
        super().__init__(window)
        self.c = c

    def _pick(self, names: list[str], rng: random.Random) -> str:
        plays = {n: len(self._arm(n)) + self.pending.get(n, 0) for n in names}
        unplayed = [n for n in names if plays[n] == 0]
        if unplayed:
            return unplayed[0]
        total = sum(plays.values())

        def score(name: str) -> float:
            return sum(self._arm(name)) / plays[name] + self.c * math.sqrt(2.0 * math.log(total) / plays[name])

        return max(names, key=score)


CHOOSERS: dict[str, type[Chooser]] = {"bandit": ThompsonChooser, "ucb": UCBChooser, "uniform": Chooser}


def make_chooser(kind: str, window: int = 50) -> Chooser:
    """The chooser named by ``--operator-choice``."""
    try:
        return CHOOSERS[kind](window=window)
    except KeyError:
        raise ValueError(f"unknown operator choice {kind!r}; expected one of {', '.join(CHOOSERS)}") from None
