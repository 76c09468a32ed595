"""The symbolic operator: :class:`SymbolicOperator` draws a mutation or crossover kind
(:mod:`~operators.symbolic.mutations`, :mod:`~operators.symbolic.crossovers`), applies it to a copy
of the parents' syntax trees, tidies and checks the offspring
(:mod:`~operators.symbolic.simplify`) and names it."""
from __future__ import annotations

import ast
import copy
import math
import random
import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any
from collections.abc import Callable

from engine.candidate import Candidate
from engine.genome import GenomeError, check_genome, code_hash
from engine.helpers import identifier
from operators.base import Context, Offspring, Operator, OperatorError
from operators.symbolic.ast_helpers import (
    NotApplicable, Skip, data_params, node_count, param_names, parse_function, render, safe_hash, strip_docstring,
    weighted_pick,
)
from operators.symbolic.crossovers import CROSSOVERS, blend, gate, rename_second, splice
from operators.symbolic.mutations import (
    MUTATIONS, add_term, drop_term, perturb_constant, reweight, swap_primitive, tune_argument,
)
from operators.symbolic.simplify import loss_depends_on, tidy

_DEFAULTS: dict[str, Any] = {
    "mutations": MUTATIONS,
    "crossovers": CROSSOVERS,
    "max_nodes": 250,
    "max_attempts": 16,
    "constant_factor": (0.5, 2.0),
    "term_weight": (0.05, 0.5),
    "reweight_factor": (0.25, 4.0),
    "tune_scale": (0.7, 1.4),
    "tune_shift": (0.05, 0.5),
    "blend_weight": (0.2, 0.8),
    "gate_temperature": (0.05, 2.0),
    "propose_steps": (1, 3),
    "max_name_length": 40,
}


class SymbolicOperator(Operator):
    """Mutates and recombines loss functions by rewriting their syntax trees.

    Works for any interface (the genome only has to be one function returning its loss), needs
    no model or network, and is deterministic for a seeded ``context.rng``.

    Args:
        mutations: Kinds to use (see :data:`MUTATIONS`), as a sequence of names or a mapping
            ``name -> weight``. Default: all, equally weighted.
        crossovers: Kinds to use (see :data:`CROSSOVERS`), same forms.
        max_nodes: Largest offspring, in syntax nodes (expressions, statements, constants); a
            larger offspring is rejected unless it is smaller than its parent.
        max_attempts: Tries per call before :class:`OperatorError`.
        constant_factor: ``(low, high)`` of the log-uniform factor applied to a constant.
        term_weight: ``(low, high)`` of the weight of an added term.
        reweight_factor: ``(low, high)`` of the factor applied to one term of a sum.
        tune_scale: ``(low, high)`` of the factor ``tune`` scales a primitive's argument by.
        tune_shift: ``(low, high)`` of the magnitude of the offset ``tune`` shifts it by.
        blend_weight: ``(low, high)`` of the first parent's weight in a blend.
        gate_temperature: ``(low, high)`` of the temperature of a gated blend.
        propose_steps: ``(low, high)`` number of chained mutations in :meth:`propose`.
        max_name_length: Longest offspring name.

    Raises:
        ValueError: for an unknown option or a bad value, naming it.
    """

    name = "symbolic"

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(_DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown option(s) for the symbolic operator: {', '.join(unknown)}; "
                f"known options: {', '.join(_DEFAULTS)}"
            )
        settings = {**_DEFAULTS, **options}
        self.mutations = _kinds(settings["mutations"], MUTATIONS, "mutations")
        self.crossovers = _kinds(settings["crossovers"], CROSSOVERS, "crossovers")
        self.max_nodes = _integer(settings["max_nodes"], "max_nodes", 20, 100_000)
        self.max_attempts = _integer(settings["max_attempts"], "max_attempts", 1, 1000)
        self.max_name_length = _integer(settings["max_name_length"], "max_name_length", 12, 200)
        self.constant_factor = _range(settings["constant_factor"], "constant_factor", positive=True)
        if self.constant_factor == (1.0, 1.0):
            raise ValueError("constant_factor must not be (1, 1): constants would never change")
        self.term_weight = _range(settings["term_weight"], "term_weight", positive=True)
        self.reweight_factor = _range(settings["reweight_factor"], "reweight_factor", positive=True)
        self.tune_scale = _range(settings["tune_scale"], "tune_scale", positive=True)
        self.tune_shift = _range(settings["tune_shift"], "tune_shift", low=0.0)
        if self.tune_shift[1] <= 0:
            raise ValueError(f"tune_shift must allow a positive offset, got {settings['tune_shift']!r}")
        self.blend_weight = _range(settings["blend_weight"], "blend_weight", low=0.0, high=1.0)
        self.gate_temperature = _range(settings["gate_temperature"], "gate_temperature", positive=True)
        steps = _range(settings["propose_steps"], "propose_steps", low=1, high=10)
        if not all(float(s).is_integer() for s in steps):
            raise ValueError(f"propose_steps must be two integers, got {settings['propose_steps']!r}")
        self.propose_steps = (int(steps[0]), int(steps[1]))
        # Which inputs carry a gradient, per interface class (asked once).
        self._gradient_flags: dict[type, list[bool] | None] = {}

    def __repr__(self) -> str:
        return f"SymbolicOperator(mutations={[k for k, _ in self.mutations]}, max_nodes={self.max_nodes})"

    # -- the operator contract ---------------------------------------------------------------
    def mutate(self, parent: Candidate, context: Context) -> Offspring:
        """One mutation of ``parent`` (a kind drawn at random; others tried if it does not apply).

        Raises:
            OperatorError: the parent cannot be parsed or no mutation applies.
        """
        function = parse_function(parent.code, parent.name)
        forbidden = {safe_hash(parent.code)}
        parent_name = parent.name or function.name
        work, tag, thought, code = self._mutate_once(
            function, context, forbidden, name_for=lambda tag: self._mutation_name(parent_name, [tag]))
        return Offspring(name=self._mutation_name(parent_name, [tag]), code=code, thought=thought)

    def crossover(self, first: Candidate, second: Candidate, context: Context) -> Offspring:
        """Combine two parents into one function (``blend``, ``gate`` or ``splice``).

        Raises:
            OperatorError: the parents cannot be parsed, are identical, have different
                parameter counts, or no crossover kind yields a valid offspring.
        """
        fa = parse_function(first.code, first.name)
        fb = parse_function(second.code, second.name)
        hashes = {safe_hash(first.code), safe_hash(second.code)}
        if len(hashes) == 1:
            raise OperatorError(f"crossover of {first.name!r} with an identical genome adds nothing")
        if len(param_names(fa)) != len(param_names(fb)):
            raise OperatorError(
                f"cannot cross {first.name!r} ({len(param_names(fa))} parameters) with {second.name!r} "
                f"({len(param_names(fb))} parameters): the parameter lists must have the same length"
            )
        name_a, name_b = first.name or fa.name, second.name or fb.name
        rng = context.rng
        grad = self._gradient_params(fa, context)
        reasons: dict[str, str] = {}
        remaining = list(self.crossovers)
        attempts = 0
        while remaining and attempts < self.max_attempts:
            attempts += 1
            kind = weighted_pick(rng, remaining)
            work_a, work_b = strip_docstring(copy.deepcopy(fa)), strip_docstring(copy.deepcopy(fb))
            rename_second(work_a, work_b)
            try:
                method = {
                    "blend": partial(blend, weight_range=self.blend_weight, max_nodes=self.max_nodes),
                    "gate": partial(gate, temperature_range=self.gate_temperature, max_nodes=self.max_nodes),
                    "splice": splice,
                }[kind]
                work, thought = method(work_a, work_b, name_a, name_b, rng, grad)
                name = self._crossover_name(name_a, name_b, kind)
                code = self._validate(work, context.interface, grad, hashes, node_count(fa), name)
            except Skip as exc:
                reasons[kind] = str(exc)
                continue
            except NotApplicable as exc:
                reasons[kind] = str(exc)
                remaining = [(k, w) for k, w in remaining if k != kind]
                continue
            return Offspring(name=name, code=code, thought=thought)
        raise OperatorError(
            f"no symbolic crossover of {name_a!r} and {name_b!r} succeeded in {attempts} attempts ("
            + "; ".join(f"{k}: {r}" for k, r in reasons.items()) + ")"
        )

    def propose(self, context: Context) -> Offspring:
        """A fresh genome: 1-3 chained mutations of a random elite (``context.best`` and
        ``context.diverse``) or, with an empty archive, of the interface's example.

        Raises:
            OperatorError: there is neither an elite nor an example, or nothing applies.
        """
        rng = context.rng
        pool: list[Any] = []
        seen: set[int] = set()
        for elite in list(context.best) + list(context.diverse):
            if elite.candidate.id not in seen:
                seen.add(elite.candidate.id)
                pool.append(elite)
        if pool:
            elite = rng.choice(pool)
            code = elite.candidate.code
            function = parse_function(code, elite.candidate.name)
            base_name = elite.candidate.name or function.name
            origin = f"elite {base_name} (fitness {elite.fitness:.4g})"
        else:
            code = getattr(context.interface, "example", "") or ""
            if not code.strip():
                raise OperatorError("nothing to propose from: the archive is empty and the interface has no example")
            function = parse_function(code, "the interface's example")
            base_name = function.name
            origin = f"the interface's example {base_name}"
        steps = rng.randint(*self.propose_steps)
        forbidden = {safe_hash(code)}
        tags: list[str] = []
        thoughts: list[str] = []
        work = function
        code = None
        for step in range(steps):
            try:
                # Each step is checked under the name the offspring gets if it is the last one.
                work, tag, thought, code = self._mutate_once(
                    work, context, forbidden, name_for=lambda tag: self._mutation_name(base_name, tags + [tag]))
            except OperatorError:
                if step == 0:
                    raise
                break
            forbidden.add(safe_hash(code))  # names do not enter the hash: the source just checked serves
            tags.append(tag)
            thoughts.append(thought[0].lower() + thought[1:].rstrip("."))
        count = "one mutation" if len(tags) == 1 else f"{len(tags)} mutations"
        thought = f"Proposed from {origin} by {count}: " + "; then ".join(thoughts) + "."
        return Offspring(name=self._mutation_name(base_name, tags), code=code, thought=thought)

    # -- mutation ----------------------------------------------------------------------------
    def _mutate_once(self, function: ast.FunctionDef, context: Context, forbidden: set[str],
                     name_for: Callable[[str], str] | None = None) -> tuple[ast.FunctionDef, str, str, str]:
        """One mutation of ``function`` that passes :meth:`_validate`: the new tree, its tag, the
        thought and its source, rendered under ``name_for(tag)`` (the offspring's own name, so
        that the engine's static check of that source is the one already made here) or, without
        ``name_for``, under the function's name."""
        rng = context.rng
        grad = self._gradient_params(function, context)
        kinds: dict[str, Callable[[ast.FunctionDef, random.Random, set[str]], tuple[str, str]]] = {
            "constant": partial(perturb_constant, factor_range=self.constant_factor), "swap": swap_primitive,
            "add_term": partial(add_term, term_weight=self.term_weight), "drop_term": drop_term,
            "reweight": partial(reweight, factor_range=self.reweight_factor),
            "tune": partial(tune_argument, scale_range=self.tune_scale, shift_range=self.tune_shift),
        }
        reasons: dict[str, str] = {}
        remaining = list(self.mutations)
        attempts = 0
        while remaining and attempts < self.max_attempts:
            attempts += 1
            kind = weighted_pick(rng, remaining)
            work = strip_docstring(copy.deepcopy(function))
            try:
                tag, thought = kinds[kind](work, rng, grad)
                code = self._validate(work, context.interface, grad, forbidden, node_count(function),
                                      name_for(tag) if name_for else work.name)
            except NotApplicable as exc:
                reasons[kind] = str(exc)
                remaining = [(k, w) for k, w in remaining if k != kind]
                continue
            except Skip as exc:
                reasons[kind] = str(exc)
                continue
            return work, tag, thought, code
        detail = "; ".join(f"{k}: {r}" for k, r in reasons.items()) or "no mutation kinds enabled"
        raise OperatorError(
            f"no symbolic mutation of {function.name!r} succeeded in {attempts} attempts ({detail})"
        )

    # -- shared checks and names ---------------------------------------------------------------
    def _validate(self, work: ast.FunctionDef, interface: Any, grad: set[str],
                  forbidden: set[str], parent_size: int, name: str) -> str:
        """Tidy ``work`` in place and check it as the source of a function called ``name``, which
        it returns; raises :class:`Skip` with the reason."""
        arg_counts = getattr(interface, "arg_counts", None)
        tidy(work)
        code = render(work, name)
        try:
            check_genome(code, arg_counts)
        except GenomeError as exc:
            raise Skip(f"offspring failed the static check: {exc}") from exc
        size = node_count(work)
        if size > self.max_nodes and size >= parent_size:
            raise Skip(f"offspring has {size} syntax nodes (max_nodes={self.max_nodes})")
        beta = getattr(interface, "beta", None)  # the value genomes see as self.beta, if exposed
        beta = float(beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else None
        if not loss_depends_on(work, grad, beta):
            raise Skip("the loss would no longer depend on " + ", ".join(sorted(grad)))
        if code_hash(code) in forbidden:
            raise Skip("offspring is the same genome as a parent")
        return code

    def _gradient_params(self, function: ast.FunctionDef, context: Context) -> set[str]:
        """The parameters that receive a gradient, read from the interface's sample inputs
        (matched by position, after a leading ``self``); all data parameters if unknown."""
        data = data_params(function)
        interface = context.interface
        key = type(interface)
        if key not in self._gradient_flags:
            flags = None
            try:
                import torch

                inputs = interface.sample_inputs(2, torch.Generator().manual_seed(0))
                flags = [bool(getattr(t, "requires_grad", False)) for t in inputs.values()]
            except Exception:  # noqa: BLE001 - an interface without samples: fall back to all inputs
                flags = None
            self._gradient_flags[key] = flags
        flags = self._gradient_flags[key]
        if flags is None:
            return set(data)
        chosen = {data[i] for i in range(min(len(data), len(flags))) if flags[i]}
        return chosen or set(data)

    def _mutation_name(self, parent_name: str, tags: list[str]) -> str:
        root = _root(parent_name)
        tags = [t for t in tags if t]
        while tags and len(root) + sum(len(t) + 1 for t in tags) > self.max_name_length and len(tags) > 1:
            tags = tags[1:]
        suffix = "_".join(tags)
        budget = self.max_name_length - len(suffix) - (1 if suffix else 0)
        root = root[:max(budget, 3)].rstrip("_") or "loss"
        return identifier(f"{root}_{suffix}" if suffix else root, self.max_name_length)

    def _crossover_name(self, name_a: str, name_b: str, tag: str) -> str:
        root_a = _root(name_a).split("_x_")[0]
        root_b = _root(name_b).split("_x_")[0]
        budget = self.max_name_length - len(tag) - 4
        if len(root_a) + len(root_b) > budget:
            half = max(budget // 2, 2)
            root_a, root_b = root_a[:half].rstrip("_"), root_b[:half].rstrip("_")
        return identifier(f"{root_a}_x_{root_b}_{tag}", self.max_name_length)


# -- options ----------------------------------------------------------------------------------
def _kinds(value: Any, known: tuple[str, ...], option: str) -> list[tuple[str, float]]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Sequence):
        items = [(kind, 1.0) for kind in value]
    else:
        raise ValueError(f"{option} must be a list of kinds or a mapping kind -> weight, got {value!r}")
    weights: dict[str, float] = {}
    for kind, weight in items:
        if kind not in known:
            raise ValueError(f"{option}: unknown kind {kind!r}; expected some of {', '.join(known)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 \
                or not math.isfinite(weight):
            raise ValueError(f"{option}: the weight of {kind!r} must be a finite number >= 0, got {weight!r}")
        weights[kind] = float(weight)
    chosen = [(kind, weights[kind]) for kind in known if weights.get(kind, 0.0) > 0]
    if not chosen:
        raise ValueError(f"{option} must enable at least one kind with a positive weight, got {value!r}")
    return chosen


def _integer(value: Any, option: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{option} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _range(value: Any, option: str, positive: bool = False, low: float | None = None,
           high: float | None = None) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2 or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value
    ):
        raise ValueError(f"{option} must be two finite numbers (low, high), got {value!r}")
    first, second = float(value[0]), float(value[1])
    if first > second:
        raise ValueError(f"{option}: low ({first:g}) must not exceed high ({second:g})")
    if positive and first <= 0:
        raise ValueError(f"{option} must be positive, got {value!r}")
    if low is not None and first < low or high is not None and second > high:
        raise ValueError(f"{option} must lie within [{low:g}, {high:g}], got {value!r}")
    return first, second


# -- names ------------------------------------------------------------------------------------
#: Trailing name tokens this operator adds; stripped before a new tag is appended.
_TAG = re.compile(
    r"^(c\d[\dpem]*|w\d[\dpem]*|s\d[\dpem]*|o\d[\dpem]*|p?(logsigmoid|softplus|exp|sigmoid|tanh|relu|square|abs)"
    r"|drop|blend|gate|splice)$"
)


def _root(name: str) -> str:
    tokens = [t for t in re.sub(r"\W+", "_", name or "").split("_") if t]
    while len(tokens) > 1 and _TAG.match(tokens[-1]):
        tokens.pop()
    return "_".join(tokens) or "loss"
