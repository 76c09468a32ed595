"""The records that flow through the engine: candidates (genomes) and their evaluations."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """How an evaluation ended. ``ok`` is the only status with a fitness. Members are strings,
    so they are stored, printed and compared as their values (``Status.OK == "ok"``)."""

    OK = "ok"
    INVALID = "invalid"  # failed a static check or the interface's unit tests
    ERROR = "error"  # raised, or broke training (NaN, divergence)
    TIMEOUT = "timeout"  # ran past a deadline; its worker was killed
    OOM = "oom"  # ran out of memory
    DUPLICATE = "duplicate"  # behaves like an earlier candidate: not trained again

    @property
    def failed(self) -> bool:
        return self in FAILED


#: Every status an evaluation can end with.
STATUSES = tuple(Status)
#: The statuses of a failed evaluation (neither scored nor a duplicate).
FAILED = (Status.INVALID, Status.ERROR, Status.TIMEOUT, Status.OOM)


class Variation(StrEnum):
    """How an offspring was made from its parents."""

    SEED = "seed"  # a known loss the plug-in starts from (no operator, no parents)
    MUTATE = "mutate"  # one parent
    CROSSOVER = "crossover"  # two parents
    PROPOSE = "propose"  # no explicit parent


@dataclass(frozen=True)
class Candidate:
    """One genome: the source of exactly one loss function and where it came from.

    Attributes:
        id: Run-unique integer, assigned by the engine in creation order.
        name: Short descriptive name (also the function's name in ``code``).
        code: Python source of one function with the fitness plug-in's signature.
        thought: The operator's rationale for this genome.
        parents: Ids of the parent candidates (empty for seeds and fresh proposals).
        operator: The operator that made it (``symbolic``, ``openai:gpt-4o``), or ``seed``.
        generation: Generation in which it was asked.
        code_hash: Hash of the normalised AST (see :func:`engine.genome.code_hash`).
        variation: How it was made (a :class:`Variation`: ``mutate``, ``crossover``,
            ``propose``, ``seed``). A combined ``operator`` such as ``symbolic:mutate`` (how
            older runs stored it) is split into the two fields.
    """

    id: int
    name: str
    code: str
    thought: str = ""
    parents: tuple[int, ...] = ()
    operator: str = "seed"
    generation: int = 0
    code_hash: str = ""
    variation: str = ""

    def __post_init__(self) -> None:
        operator, variation = self.operator, self.variation
        if not variation:
            head, _, tail = operator.rpartition(":")
            if head and tail in Variation.__members__.values():
                operator, variation = head, tail
            elif operator == Variation.SEED:
                variation = Variation.SEED
        if variation:
            try:
                variation = Variation(variation)
            except ValueError:
                raise ValueError(f"unknown variation {variation!r} of candidate {self.id}; expected one of "
                                 f"{[v.value for v in Variation]}") from None
        object.__setattr__(self, "operator", operator)
        object.__setattr__(self, "variation", variation)

    @property
    def is_seed(self) -> bool:
        return self.variation is Variation.SEED or self.operator == "seed"

    @property
    def label(self) -> str:
        """``operator:variation`` (``symbolic:mutate``), or ``seed``: how summaries group candidates."""
        return "seed" if self.is_seed else (f"{self.operator}:{self.variation}" if self.variation else self.operator)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["parents"] = list(self.parents)
        return data


@dataclass
class EvalResult:
    """The outcome of scoring one candidate on one fitness plug-in.

    Attributes:
        candidate_id: Which candidate.
        status: A :class:`Status` (a plain string is converted).
        fitness: Higher is better; ``None`` unless the status is ``ok``.
        metrics: Plug-in specific numbers (JSON-serialisable).
        descriptors: Behaviour descriptors for the archive (name -> value).
        fingerprint: Behavioural fingerprint (rounded loss and gradient on fixed inputs).
        error: Readable message for every status but ``ok``.
        seconds: Wall-clock seconds spent in the worker.
        duplicate_of: For ``duplicate``: the candidate with the same behaviour.
        judge: While the driver's judge phase is pending: ``{"seed", "stage", "payload"}``
            (:func:`engine.evaluation.judged`); None once judged, and never stored.
    """

    candidate_id: int
    status: str
    fitness: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    descriptors: dict[str, float] = field(default_factory=dict)
    fingerprint: str | None = None
    error: str | None = None
    seconds: float = 0.0
    duplicate_of: int | None = None
    judge: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        try:
            self.status = Status(self.status)
        except ValueError:
            raise ValueError(f"unknown evaluation status {self.status!r}; expected one of "
                             f"{[s.value for s in Status]}") from None

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def is_fingerprint(value: Any) -> bool:
    """Whether ``value`` is a behavioural fingerprint as the engine makes them: 1 to 64 lowercase
    hex digits (what a worker or a genome's process reports is checked against this)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and all(c in "0123456789abcdef" for c in value)


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or None: not a number, a bool, not finite, or an integer too
    large for a float (a process that is not trusted may send any JSON number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
