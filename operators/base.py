"""The operator contract: how new genomes are made from parents and archive context.

An operator returns an :class:`Offspring` (name, code, thought); the engine validates it,
deduplicates it, gives it an id and records which operator and parents made it.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.candidate import Candidate


@dataclass(frozen=True)
class Elite:
    """A scored candidate as operators see it (the in-context history)."""

    candidate: Candidate
    fitness: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What an operator may use besides its parents.

    Attributes:
        interface: The fitness plug-in's function contract (signature, description, example).
        rng: The run's seeded random generator; operators draw all randomness from it.
        best: The archive's best elites, best first.
        diverse: Elites from distinct archive cells, for variety.
        errors: Recent failures as ``(name, message)``, newest last.
        generation: The generation being asked.
    """

    interface: Any
    rng: random.Random
    best: list[Elite] = field(default_factory=list)
    diverse: list[Elite] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    generation: int = 0


@dataclass(frozen=True)
class Offspring:
    """A proposed genome before the engine turns it into a :class:`Candidate`."""

    name: str
    code: str
    thought: str = ""


class OperatorError(Exception):
    """An operator could not produce an offspring (the slot falls back or is retried)."""


class Operator(ABC):
    """Makes genomes. ``name`` is how the CLI names it (``symbolic``)."""

    name: ClassVar[str] = ""

    @abstractmethod
    def mutate(self, parent: Candidate, context: Context) -> Offspring:
        """One parent -> one offspring."""

    @abstractmethod
    def crossover(self, first: Candidate, second: Candidate, context: Context) -> Offspring:
        """Two parents -> one offspring that combines them."""

    @abstractmethod
    def propose(self, context: Context) -> Offspring:
        """A fresh proposal from the context alone (no explicit parent)."""
