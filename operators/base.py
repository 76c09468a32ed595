"""The operator contract: how new genomes are made from parents and archive context.

An operator returns an :class:`Offspring` (name, code, thought); the engine validates it,
deduplicates it, gives it an id and records which operator and parents made it.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar
from collections.abc import Callable

from engine.candidate import Candidate, EvalResult


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
        rng: A seeded random generator (the engine derives one per offspring slot from the run's,
            so slots made concurrently stay reproducible); operators draw all randomness from it.
        best: The archive's best elites, best first.
        diverse: Elites from distinct archive cells, for variety.
        errors: Recent failures as ``(name, message)``, newest last.
        generation: The generation being asked.
        history: Every finished candidate with its result, oldest first; filled only for
            ``--strategy sequential`` (the DiscoPOP single-chain loop feeds it all back).
        scores: Fitness of every successfully scored candidate by id (a parent's score).
    """

    interface: Any
    rng: random.Random
    best: list[Elite] = field(default_factory=list)
    diverse: list[Elite] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    generation: int = 0
    history: list[tuple[Candidate, EvalResult]] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Offspring:
    """A proposed genome before the engine turns it into a :class:`Candidate`.

    ``llm_calls`` are the run-store ids of the LLM calls that produced it; the engine links
    them to the candidate it admits.
    """

    name: str
    code: str
    thought: str = ""
    llm_calls: tuple[int, ...] = ()


class OperatorError(Exception):
    """An operator could not produce an offspring (the slot falls back or is retried)."""


class OperatorExhausted(OperatorError):
    """The operator can make nothing more for now (a replay ran out of recorded answers): the
    engine stops choosing it for the rest of the generation."""


class BudgetExhausted(OperatorError):
    """A run-wide budget is spent (``--max-llm-calls``, ``--max-cost-usd``): the engine keeps
    the offspring already made, finishes the generation with them and stops the run."""


#: Checks a reply's code before it becomes a candidate: the error text, or None when it passes.
ReplyCheck = Callable[[str], "str | None"]


@dataclass(frozen=True)
class RecordedRun:
    """What an earlier run recorded of its LLM operators, for ``replay:RUN``.

    Attributes:
        operator_specs: The run's ``--operator`` specs, in order.
        calls: The recorded calls of one operator (by its name), oldest first.
    """

    operator_specs: tuple[str, ...]
    calls: Callable[[str], list[dict[str, Any]]]


@dataclass(frozen=True)
class Services:
    """What the assembled run hands to operators built from a spec: operators never build
    executors or open run stores themselves.

    Attributes:
        check: Checks a reply's code (the static check and the interface's unit tests in an
            isolated worker); None checks statically only.
        recorded_run: Opens an earlier run's recorded LLM calls (``replay:RUN``).
        settings: The run's settings object; a factory cuts the fields it needs from it.
    """

    check: ReplyCheck | None = None
    recorded_run: Callable[[str], RecordedRun] | None = None
    settings: Any = None


class Operator(ABC):
    """Makes genomes. ``name`` is how the CLI names it (``symbolic``)."""

    name: ClassVar[str] = ""
    #: Whether the engine may call this operator from several threads at once (network-bound
    #: operators such as LLM clients); others are called one at a time in the driver.
    concurrent: ClassVar[bool] = False
    #: Spec prefixes this class builds operators for (``openai`` for ``openai:MODEL``); the
    #: registry matches them before ``module:Class`` and calls :meth:`from_spec`.
    spec_prefixes: ClassVar[tuple[str, ...]] = ()
    #: How those specs are written, for ``list`` (``openai:MODEL@URL``).
    spec_forms: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def factory(cls, services: Services) -> Callable[[str], list[Operator]]:
        """A builder of this family's operators from prefixed specs (one spec may give several,
        as ``replay:RUN`` does). The registry makes one builder per run, so the operators it
        builds can share what they must (an LLM budget). Only for classes with ``spec_prefixes``."""
        raise NotImplementedError(f"{cls.__qualname__} builds no operators from specs")

    @abstractmethod
    def mutate(self, parent: Candidate, context: Context) -> Offspring:
        """One parent -> one offspring."""

    @abstractmethod
    def crossover(self, first: Candidate, second: Candidate, context: Context) -> Offspring:
        """Two parents -> one offspring that combines them."""

    @abstractmethod
    def propose(self, context: Context) -> Offspring:
        """A fresh proposal from the context alone (no explicit parent)."""
