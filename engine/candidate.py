"""The records that flow through the engine: candidates (genomes) and their evaluations."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: Every status an evaluation can end with. ``ok`` is the only one with a fitness.
STATUSES = ("ok", "invalid", "error", "timeout", "oom", "duplicate")
FAILED = ("invalid", "error", "timeout", "oom")


@dataclass(frozen=True)
class Candidate:
    """One genome: the source of exactly one loss function and where it came from.

    Attributes:
        id: Run-unique integer, assigned by the engine in creation order.
        name: Short descriptive name (also the function's name in ``code``).
        code: Python source of one function with the fitness plug-in's signature.
        thought: The operator's rationale for this genome.
        parents: Ids of the parent candidates (empty for seeds and fresh proposals).
        operator: What made it: ``seed``, ``symbolic:mutate``, ``symbolic:crossover``, ...
        generation: Generation in which it was asked.
        code_hash: Hash of the normalised AST (see :func:`engine.genome.code_hash`).
    """

    id: int
    name: str
    code: str
    thought: str = ""
    parents: tuple[int, ...] = ()
    operator: str = "seed"
    generation: int = 0
    code_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["parents"] = list(self.parents)
        return data


@dataclass
class EvalResult:
    """The outcome of scoring one candidate on one fitness plug-in.

    Attributes:
        candidate_id: Which candidate.
        status: One of :data:`STATUSES`.
        fitness: Higher is better; ``None`` unless ``status == "ok"``.
        metrics: Plug-in specific numbers (JSON-serialisable).
        descriptors: Behaviour descriptors for the archive (name -> value).
        fingerprint: Behavioural fingerprint (rounded loss and gradient on fixed inputs).
        error: Readable message for every status but ``ok``.
        seconds: Wall-clock seconds spent in the worker.
        duplicate_of: For ``duplicate``: the candidate with the same behaviour.
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

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown evaluation status {self.status!r}; expected one of {STATUSES}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
