"""The fitness plug-in contract: an :class:`Interface` (the loss function's contract, checked
before any training) and a :class:`Fitness` (seeds, cheap descriptors, scoring).

A plug-in is one class; the engine builds it with the user's ``fitness_options`` as keyword
arguments, in the driver (for seeds, interface and descriptor space) and again in each
evaluation worker (for ``descriptors`` and ``evaluate``). Keep ``__init__`` cheap.
"""
from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from engine.genome import GenomeError, is_out_of_memory


@dataclass(frozen=True)
class Seed:
    """A known loss that starts the search.

    Attributes:
        name: Short name (``dpo``, ``ipo``...). Also used as the candidate's name.
        code: Source of one function with the interface's signature.
        thought: Where it comes from (paper, formula).
    """

    name: str
    code: str
    thought: str = ""


@dataclass(frozen=True)
class Descriptor:
    """One axis of the MAP-Elites grid: values outside ``[low, high]`` fall in the edge bins."""

    name: str
    low: float
    high: float
    bins: int
    help: str = ""

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"descriptor {self.name!r}: high ({self.high}) must exceed low ({self.low})")
        if self.bins < 1:
            raise ValueError(f"descriptor {self.name!r}: bins must be >= 1, got {self.bins}")


@dataclass
class Score:
    """What :meth:`Fitness.evaluate` returns: ``fitness`` (higher is better) and metrics."""

    fitness: float
    metrics: dict[str, Any] = field(default_factory=dict)


class Interface:
    """The function contract a fitness plug-in declares.

    Subclasses set the class attributes and implement :meth:`sample_inputs`; override
    :meth:`call` when the function is not simply called with the inputs in order.

    Attributes:
        signature: The exact ``def`` line shown to operators.
        description: The problem statement for prompts.
        example: Source of a baseline function with the signature.
        arg_counts: Allowed numbers of positional parameters (static check).
        batch_sizes: Batch sizes :meth:`check` tries.
        check_seconds: A check slower than this fails (the worker timeout stops hangs).
    """

    signature: ClassVar[str] = ""
    description: ClassVar[str] = ""
    example: ClassVar[str] = ""
    arg_counts: ClassVar[tuple[int, ...] | None] = None
    batch_sizes: ClassVar[tuple[int, ...]] = (1, 7, 32)
    check_seconds: ClassVar[float] = 5.0

    def sample_inputs(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Inputs for one call, as ``name -> tensor``; inputs that should receive a
        gradient have ``requires_grad=True``."""
        raise NotImplementedError

    def call(self, fn: Callable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Call ``fn`` on ``inputs`` and return its per-example losses."""
        return losses_of(fn(*inputs.values()))

    # -- checks run before any training -------------------------------------------------
    def check(self, fn: Callable) -> None:
        """Unit tests of the contract: per-example output shape for several batch sizes,
        a floating dtype, finite values, and a finite gradient that reaches the inputs.

        Raises:
            GenomeError: (status ``invalid``) naming the batch size and what was wrong.
        """
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        reached = False
        for batch_size in self.batch_sizes:
            inputs = self.sample_inputs(batch_size, generator)
            losses = self._call_checked(fn, inputs, batch_size)
            try:
                losses.sum().backward()
            except Exception as exc:
                raise GenomeError(f"backward failed: {type(exc).__name__}: {exc}") from exc
            for name, tensor in inputs.items():
                if tensor.requires_grad and tensor.grad is not None:
                    if not torch.isfinite(tensor.grad).all():
                        raise GenomeError(
                            f"gradient with respect to {name!r} is not finite for batch size {batch_size}"
                        )
                    reached = reached or bool((tensor.grad != 0).any())
            if time.perf_counter() - start > self.check_seconds:
                raise GenomeError(f"the contract checks took over {self.check_seconds:g} s; the loss is too slow")
        if not reached:
            raise GenomeError(
                "no gradient reaches the inputs: the loss is constant or detached (avoid .detach(), "
                ".item(), torch.no_grad and rounding)"
            )

    def _call_checked(self, fn: Callable, inputs: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        try:
            losses = self.call(fn, inputs)
        except GenomeError:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise GenomeError(f"out of memory: {type(exc).__name__}: {str(exc)[:300]}", status="oom") from exc
            raise GenomeError(f"raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(losses, torch.Tensor):
            raise GenomeError(f"returned {type(losses).__name__}; expected a tensor of per-example losses")
        if not losses.is_floating_point():
            raise GenomeError(f"returned dtype {losses.dtype}; expected a floating-point tensor")
        if losses.dim() == 0:
            raise GenomeError(
                f"returned a scalar for a batch of {batch_size}; return per-example losses of shape "
                f"({batch_size},) and leave the reduction (mean) to the trainer"
            )
        if tuple(losses.shape) != (batch_size,):
            raise GenomeError(
                f"returned shape {tuple(losses.shape)} for a batch of {batch_size}; expected ({batch_size},)"
            )
        if not torch.isfinite(losses).all():
            raise GenomeError(f"returned non-finite values (nan or inf) for a batch of {batch_size}")
        if not losses.requires_grad:
            raise GenomeError("the losses do not depend on the inputs through autograd (no gradient)")
        return losses

    def fingerprint(self, fn: Callable, batch_size: int = 16, digits: int = 4) -> str:
        """Behavioural fingerprint: the losses and their gradients on fixed inputs, rounded to
        ``digits`` significant digits, hashed. Algebraically identical rewrites share it."""
        generator = torch.Generator().manual_seed(1234)
        inputs = self.sample_inputs(batch_size, generator)
        losses = self.call(fn, inputs)
        losses.sum().backward()
        values = [float(v) for v in losses.detach().flatten()]
        for tensor in inputs.values():
            if tensor.requires_grad:
                grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
                values.extend(float(v) for v in grad.flatten())
        text = ",".join(_round_significant(v, digits) for v in values)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _round_significant(value: float, digits: int) -> str:
    if not math.isfinite(value):
        return str(value)
    if abs(value) < 1e-9:
        return "0"
    return f"{value:.{digits}g}"


def losses_of(output: Any) -> Any:
    """Per-example losses from a function's return value. TRL-style functions return
    ``(losses, chosen_rewards, rejected_rewards)``; the first element is the loss."""
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


class Fitness(ABC):
    """A fitness plug-in: how losses are scored.

    Class attributes:
        name: Registry name (``synthetic-pref``).
        interface: The function contract.
        baseline: Name of the seed that serves as the baseline in summaries (e.g. ``dpo``).
        descriptor_space: Axes of the MAP-Elites grid computed by :meth:`descriptors`.
        fitness_floor: A fitness no sensible loss goes below; the QD score counts from it.
    """

    name: ClassVar[str] = ""
    interface: ClassVar[Interface]
    baseline: ClassVar[str | None] = None
    descriptor_space: ClassVar[tuple[Descriptor, ...]] = ()
    fitness_floor: ClassVar[float] = 0.0

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(
                f"fitness plug-in {self.name!r} takes no options, got {sorted(options)}"
            )

    @abstractmethod
    def seeds(self) -> list[Seed]:
        """Known losses that start the search (the first one is usually the baseline)."""

    def descriptors(self, fn: Callable) -> dict[str, float]:
        """Cheap behaviour descriptors of ``fn``, computed without training. Keys are the
        names in :attr:`descriptor_space`."""
        return {}

    def resources(self) -> dict[str, float]:
        """What one evaluation needs: ``{"cpus": ..., "gpus": ...}``. The Ray executor reserves
        this per evaluation unless ``--cpus-per-eval`` / ``--gpus-per-eval`` say otherwise; a
        plug-in whose presets differ (a CPU toy and an 8-GPU recipe) answers per instance."""
        return {"cpus": 1.0, "gpus": 0.0}

    @abstractmethod
    def evaluate(self, fn: Callable, seed: int) -> Score:
        """Train with ``fn`` as the loss and score the result; deterministic for ``seed``.

        Raise :class:`engine.genome.GenomeError` (status ``error``) when the loss breaks
        training (NaN, divergence), with a message saying what happened.
        """
