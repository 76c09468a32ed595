"""The fitness plug-in contract: an :class:`Interface` (the loss function's contract, checked
before any training) and a :class:`Fitness` (seeds, cheap descriptors, training and scoring).

A plug-in is one class; the engine builds it with the user's ``fitness_options`` as keyword
arguments, in the driver (for seeds, interface and descriptor space) and again in each
evaluation worker. Keep ``__init__`` cheap.

No genome reports its own score. Scoring is split in two phases:

* :meth:`Fitness.train` (untrusted) runs in a fresh process forked for one genome: it trains
  with the genome as the loss and returns :class:`Artefacts`, named tensors such as the trained
  parameters. Nothing it returns is a score.
* :meth:`Fitness.score` (trusted) runs after that process has exited, in the warm worker where
  no genome code ever ran: it loads the validated artefacts (no pickle: safetensors) and
  computes the score on data the genome's process never held (held-out pairs, the true reward,
  the test split). Keep that data in :attr:`Fitness.held_out`: the engine wipes it in the
  genome's process before any genome code runs.
* :meth:`Fitness.judge` (optional, trusted, outside every jail) runs in the driver when
  ``score`` returns :attr:`Score.to_judge` (e.g. answers the trained model generated): it may
  call a network service (an LLM judge's API, with a key only the driver holds) that no
  jailed process can reach, and returns the final :class:`Score`.

A plug-in written for the first contract (only ``evaluate(fn, seed)``) still works: its
``evaluate`` runs in the genome's process and the result is marked ``unprotected``.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar
from collections.abc import Callable

import torch

from engine.genome import GenomeError, is_out_of_memory
from engine.helpers import round_significant


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


@dataclass(frozen=True)
class SandboxNeeds:
    """What a plug-in's evaluations need from the OS jail (:meth:`Fitness.sandbox_needs`):
    paths shown read-only, paths shown writable, and the host's network.

    ``hidden_from_genome``: paths only the trusted phase reads (the test split, a judge's
    questions, a reward model). They are shown read-only in the worker's jail and covered (an
    empty folder or file) in each genome's process before any genome code runs
    (:mod:`engine.confine`); they are added to ``read_only`` here.

    ``trusted_writable``: folders only trusted code writes (``prepare``, ``score``: a cache
    filled before any genome runs). Writable in the worker's jail, read-only in each genome's
    process, so no genome can plant an entry that later evaluations would trust; they are
    added to ``writable`` here."""

    read_only: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    host_network: bool = False
    hidden_from_genome: tuple[str, ...] = ()
    trusted_writable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        hidden = tuple(str(path) for path in self.hidden_from_genome)
        trusted = tuple(str(path) for path in self.trusted_writable)
        object.__setattr__(self, "hidden_from_genome", hidden)
        object.__setattr__(self, "trusted_writable", trusted)
        object.__setattr__(self, "read_only", tuple(dict.fromkeys((*map(str, self.read_only), *hidden))))
        object.__setattr__(self, "writable", tuple(dict.fromkeys((*map(str, self.writable), *trusted))))


@dataclass
class Score:
    """What :meth:`Fitness.score` returns: ``fitness`` (higher is better) and metrics.

    ``to_judge`` (JSON: strings, numbers, lists, dicts) is for a plug-in with a judge phase:
    when set, the driver calls :meth:`Fitness.judge` with this score and stores what that
    returns; ``to_judge`` itself is never stored."""

    fitness: float
    metrics: dict[str, Any] = field(default_factory=dict)
    to_judge: Any = None


@dataclass(frozen=True)
class TensorSpec:
    """What one artefact must be: its exact shape and dtype, and whether every value must be
    finite (floating dtypes only)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    finite: bool = True

    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


#: What :meth:`Fitness.train` returns: named CPU tensors (the trained parameters, a model's
#: state dict). They leave the genome's process as safetensors bytes, never pickled.
Artefacts = dict[str, torch.Tensor]


class ArtefactError(ValueError):
    """Artefacts that do not match the plug-in's :meth:`Fitness.artefact_spec`."""


def validate_artefacts(artefacts: Any, spec: dict[str, TensorSpec], max_bytes: int) -> Artefacts:
    """Check ``artefacts`` against ``spec``: the same names, exact shapes and dtypes, finite
    values where asked, dense CPU tensors, at most ``max_bytes`` in all.

    Returns:
        The artefacts as a plain dict of contiguous, detached tensors.

    Raises:
        ArtefactError: naming the artefact and what was wrong.
    """
    if not isinstance(artefacts, dict):
        raise ArtefactError(f"artefacts must be a dict of name -> tensor, got {type(artefacts).__name__}")
    names, expected = set(artefacts), set(spec)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(map(str, names - expected))
        raise ArtefactError(
            f"artefact names differ from the plug-in's spec (missing {missing}, unexpected {extra[:5]})")
    total = 0
    checked: Artefacts = {}
    for name, want in spec.items():
        tensor = artefacts[name]
        if not isinstance(tensor, torch.Tensor):
            raise ArtefactError(f"artefact {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        # A subclass (a Parameter, or one whose __torch_function__ runs code) becomes a plain tensor.
        tensor = tensor.detach().as_subclass(torch.Tensor)
        if tensor.layout != torch.strided or tensor.device.type != "cpu":
            raise ArtefactError(f"artefact {name!r} must be a dense CPU tensor, got {tensor.layout} on {tensor.device}")
        if tensor.dtype != want.dtype or tuple(tensor.shape) != tuple(want.shape):
            raise ArtefactError(f"artefact {name!r} is {tensor.dtype} {tuple(tensor.shape)}; expected "
                                f"{want.dtype} {tuple(want.shape)}")
        total += tensor.numel() * tensor.element_size()
        if total > max_bytes:
            raise ArtefactError(f"artefacts exceed the plug-in's size cap of {max_bytes} bytes")
        floating = tensor.is_floating_point() or tensor.is_complex()
        if want.finite and floating and not bool(torch.isfinite(tensor).all()):
            raise ArtefactError(f"artefact {name!r} has non-finite values (nan or inf)")
        checked[name] = tensor.contiguous()
    return checked


def artefacts_to_bytes(artefacts: Artefacts) -> bytes:
    """The artefacts as safetensors bytes (no pickle: only a JSON header and raw values)."""
    from safetensors.torch import save

    # safetensors refuses tensors that share memory; a copy of each keeps it simple.
    return save({name: tensor.detach().cpu().contiguous().clone() for name, tensor in artefacts.items()})


def artefacts_from_bytes(data: bytes, spec: dict[str, TensorSpec], max_bytes: int) -> Artefacts:
    """Load and validate artefacts sent as safetensors bytes by an untrusted process.

    Raises:
        ArtefactError: when the bytes are not safetensors or do not match ``spec``.
    """
    from safetensors.torch import load

    if len(data) > max_bytes + (1 << 20):  # the header is small; the values are capped
        raise ArtefactError(f"artefacts exceed the plug-in's size cap of {max_bytes} bytes")
    try:
        artefacts = load(bytes(data))
    except Exception as exc:  # noqa: BLE001 - malformed input from a genome's process
        raise ArtefactError(f"artefacts are not valid safetensors data: {type(exc).__name__}") from exc
    return validate_artefacts(artefacts, spec, max_bytes)


class HeldOut:
    """What :meth:`Fitness.score` computes on, kept away from genomes: values by key (a plug-in
    caches per evaluation seed), the ``capacity`` most recent kept.

    The warm worker that scores holds it; in each genome's process (a fork of that worker) the
    engine calls :meth:`wipe` before any genome code runs: every tensor (and numpy array) in the
    values, found through dataclasses, dicts, lists and tuples, is overwritten with zeros, the
    whole storage of each tensor included, then the values are dropped. Keep held-out data in
    tensors or arrays, not in Python numbers, and never as a view of training data (clone it):
    the training data would be zeroed too.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._values: dict[Any, Any] = {}
        self.wiped = False

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The value stored under ``key``, made with ``make()`` on a miss."""
        if self.wiped:
            raise RuntimeError("held-out data is not available in a genome's process")
        if key not in self._values:
            self.put(key, make())
        return self._values[key]

    def put(self, key: Any, value: Any) -> None:
        if self.wiped:
            raise RuntimeError("held-out data is not available in a genome's process")
        self._values.pop(key, None)
        self._values[key] = value
        while len(self._values) > self.capacity:
            self._values.pop(next(iter(self._values)))

    def __contains__(self, key: Any) -> bool:
        return key in self._values

    def snapshot(self) -> dict[Any, Any]:
        """The values held, oldest first (to hand what a builder process made to the worker)."""
        return dict(self._values)

    def restore(self, values: dict[Any, Any]) -> None:
        """Hold ``values`` (a :meth:`snapshot`) instead of what is held now."""
        if self.wiped:
            raise RuntimeError("held-out data is not available in a genome's process")
        self._values = dict(values)

    def wipe(self) -> None:
        """Overwrite every tensor and array held with zeros and forget the values."""
        for value in self._values.values():
            _zero_everything(value, set())
        self._values.clear()
        self.wiped = True


def _zero_everything(value: Any, seen: set[int]) -> None:
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        # All of its storage, not only the elements it shows: a slice of a larger tensor (the
        # held-out prompts' rows of a reward over all prompts) keeps the rest of it alive.
        with torch.no_grad():
            value.detach().untyped_storage().fill_(0)
        return
    writeable = getattr(getattr(value, "flags", None), "writeable", False)
    if hasattr(value, "__array__") and hasattr(value, "fill") and writeable:
        value.fill(0)
        base = getattr(value, "base", None)  # an array that is a view: the rest of what it views too
        if base is not None and hasattr(base, "fill") and getattr(getattr(base, "flags", None), "writeable", False):
            _zero_everything(base, seen)
        return
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    elif hasattr(value, "__dataclass_fields__"):
        items = [getattr(value, name) for name in value.__dataclass_fields__]
    else:
        return
    for item in items:
        _zero_everything(item, seen)


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
        batches, total = [], None
        for batch_size in self.batch_sizes:
            inputs = self.sample_inputs(batch_size, generator)
            losses = self._call_checked(fn, inputs, batch_size)
            batches.append((batch_size, inputs))
            total = losses.sum() if total is None else total + losses.sum()
            if time.perf_counter() - start > self.check_seconds:
                raise GenomeError(f"the contract checks took over {self.check_seconds:g} s; the loss is too slow")
        try:  # one backward pass for every batch: each batch's inputs get their own gradient
            if total is not None:
                total.backward()
        except Exception as exc:
            raise GenomeError(f"backward failed: {type(exc).__name__}: {exc}") from exc
        for batch_size, inputs in batches:
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
        values = [float(v) for v in losses.detach().flatten().tolist()]
        for tensor in inputs.values():
            if tensor.requires_grad:
                grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
                values.extend(float(v) for v in grad.flatten().tolist())
        text = ",".join(format(round_significant(v, digits, zero_below=1e-9), f".{digits}g") for v in values)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def losses_of(output: Any) -> Any:
    """Per-example losses from a function's return value. TRL-style functions return
    ``(losses, chosen_rewards, rejected_rewards)``; the first element is the loss."""
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


class Fitness(ABC):
    """A fitness plug-in: how losses are scored.

    Implement :meth:`seeds`, :meth:`train`, :meth:`score` and :meth:`artefact_spec` (see the
    module docstring for why scoring is split). A plug-in that implements only
    :meth:`evaluate` (the first contract) still works, marked unprotected.

    Class attributes:
        name: Registry name (``synthetic-pref``).
        interface: The function contract.
        baseline: Name of the seed that serves as the baseline in summaries (e.g. ``dpo``).
        descriptor_space: Axes of the MAP-Elites grid computed by :meth:`descriptors`.
        extra_descriptors: Names of further values :meth:`descriptors` may return: stored with
            the evaluation and shown, not grid axes (a preference loss's shape profile).
        fitness_floor: A fitness no sensible loss goes below; the QD score counts from it.
        max_artefact_bytes: Largest total size of the artefacts :meth:`train` may return.
        max_file_bytes: Largest file the genome's process may write (``RLIMIT_FSIZE``).
        max_open_files: Open file descriptors allowed in the genome's process (``RLIMIT_NOFILE``).
    """

    name: ClassVar[str] = ""
    interface: ClassVar[Interface]
    baseline: ClassVar[str | None] = None
    descriptor_space: ClassVar[tuple[Descriptor, ...]] = ()
    extra_descriptors: ClassVar[tuple[str, ...]] = ()
    fitness_floor: ClassVar[float] = 0.0
    max_artefact_bytes: ClassVar[int] = 64 << 20
    max_file_bytes: ClassVar[int] = 1 << 30
    max_open_files: ClassVar[int] = 256

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(
                f"fitness plug-in {self.name!r} takes no options, got {sorted(options)}"
            )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not is_protected(cls) and "evaluate" in cls.__dict__:
            warnings.warn(
                f"fitness plug-in {cls.__module__}.{cls.__qualname__} implements only evaluate(fn, seed), so "
                "the process that runs a genome also computes its score: a genome that escapes the sandbox "
                "could report any score it likes. Its results are marked 'unprotected'; implement train() "
                "and score() (see docs/plugins.md).", UnprotectedFitnessWarning, stacklevel=3,
            )

    @abstractmethod
    def seeds(self) -> list[Seed]:
        """Known losses that start the search (the first one is usually the baseline)."""

    def descriptors(self, fn: Callable) -> dict[str, float]:
        """Cheap behaviour descriptors of ``fn``, computed without training. Keys are the
        names in :attr:`descriptor_space`. Runs in the genome's process."""
        return {}

    def resources(self) -> dict[str, float]:
        """What one evaluation needs: ``{"cpus": ..., "gpus": ...}``. The Ray executor reserves
        this per evaluation unless ``--cpus-per-eval`` / ``--gpus-per-eval`` say otherwise; a
        plug-in whose presets differ (a CPU toy and an 8-GPU recipe) answers per instance."""
        return {"cpus": 1.0, "gpus": 0.0}

    def sandbox_needs(self) -> SandboxNeeds:
        """What the evaluation worker's OS jail must show besides the interpreter, the project
        and this plug-in's own code: read-only data (a data set folder, a model cache), folders
        to write across evaluations (a cache), and whether the host's network is needed (given
        only with ``--allow-host-network``). Everything else stays hidden (docs/security.md)."""
        return SandboxNeeds()

    # -- the two phases -------------------------------------------------------------------------
    def prepare(self, seed: int) -> None:
        """Build or load what :meth:`train` and :meth:`score` need for ``seed`` (data, caches,
        held-out data), before a genome's process is forked: each one inherits it instead of
        building it again. Runs where no genome code runs; must not initialise CUDA."""

    def artefact_spec(self, seed: int) -> dict[str, TensorSpec]:
        """The artefacts :meth:`train` returns for ``seed``: name -> exact shape and dtype.
        Anything else a genome's process sends back is rejected."""
        raise NotImplementedError(f"fitness plug-in {self.name!r} implements train() but not artefact_spec()")

    def train(self, fn: Callable, seed: int) -> Artefacts:
        """Untrusted phase: train with ``fn`` as the loss and return the artefacts that
        :meth:`score` needs (e.g. the trained parameters); deterministic for ``seed``.

        Runs in the genome's process. Never read held-out data here: it is wiped there.
        Raise :class:`engine.genome.GenomeError` (status ``error``) when the loss breaks
        training (NaN, divergence), with a message saying what happened.
        """
        raise NotImplementedError(f"fitness plug-in {self.name!r} implements neither train() nor evaluate()")

    def score(self, artefacts: Artefacts, seed: int) -> Score:
        """Trusted phase: the score of validated ``artefacts`` (:meth:`artefact_spec`) for
        ``seed``. Runs where no genome code ran; may use :attr:`held_out` data."""
        raise NotImplementedError(f"fitness plug-in {self.name!r} implements train() but not score()")

    def judge(self, score: Score, seed: int) -> Score:
        """Judge phase (optional): called in the driver, outside every jail, with what
        :meth:`score` returned when its :attr:`Score.to_judge` is set; returns the final score.

        Use it for scoring that needs what a jail must not have: the network (an LLM judge's
        API) or secrets (its key). It sees only ``score`` (JSON that a process where no genome
        ran produced); treat ``to_judge`` as data to grade, never as code or as a score. Calls
        for different evaluations may run at once on threads: keep it thread-safe. The
        default returns ``score`` unchanged."""
        return score

    def evaluate(self, fn: Callable, seed: int) -> Score:
        """Train, score and judge in this process (tests, notebooks and the serial executor):
        the artefacts pass the same validation as those that cross a process boundary."""
        artefacts = validate_artefacts(self.train(fn, seed), self.artefact_spec(seed), self.max_artefact_bytes)
        score = self.score(artefacts, seed)
        if getattr(score, "to_judge", None) is not None:
            score = self.judge(score, seed)
            score.to_judge = None
        return score

    @property
    def held_out(self) -> HeldOut:
        """This plug-in's :class:`HeldOut` store (made on first use)."""
        store = self.__dict__.get("_held_out_store")
        if store is None:
            store = self.__dict__["_held_out_store"] = HeldOut()
        return store


class UnprotectedFitnessWarning(UserWarning):
    """A plug-in scores inside the genome's process (only ``evaluate``)."""


def _defining_class(cls: type, attribute: str) -> int:
    """Position in ``cls``'s MRO of the class that defines ``attribute`` (smaller: more derived)."""
    for position, klass in enumerate(cls.__mro__):
        if attribute in klass.__dict__:
            return position
    return len(cls.__mro__)


def is_protected(plugin: Any) -> bool:
    """Whether a plug-in (class or instance) scores in a trusted phase: it implements
    ``train`` and ``score``, and no subclass overrides ``evaluate`` below them (a subclass
    that overrides only ``evaluate`` is scored by that ``evaluate``)."""
    cls = plugin if isinstance(plugin, type) else type(plugin)
    train, score, evaluate = (_defining_class(cls, name) for name in ("train", "score", "evaluate"))
    if getattr(cls, "train", None) is Fitness.train or getattr(cls, "score", None) is Fitness.score:
        return False
    return evaluate >= max(train, score)
