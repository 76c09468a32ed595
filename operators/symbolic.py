"""The symbolic operator: AST-level variation of loss functions, offline and model-free.

Genomes are parsed with :mod:`ast`, transformed and written back with :func:`ast.unparse`, so
offspring stay readable Python. The operator knows nothing about a particular fitness plug-in:
from the interface it reads only ``arg_counts``, ``example`` (for :meth:`propose`), which of
its sample inputs carry a gradient (so offspring keep depending on them) and ``beta`` if it
exposes one.

Mutations (one per call, drawn with the context's seeded RNG):

- ``constant``: scale one numeric constant by a log-uniform factor (3 significant digits);
  integer exponents, indices and ``dim``-like arguments are left alone.
- ``swap``: replace one elementwise primitive by another from
  ``{F.logsigmoid, F.softplus, torch.exp, torch.sigmoid, torch.tanh, F.relu, torch.square,
  torch.abs}`` (``torch.x``, ``F.x``, ``torch.nn.functional.x``, ``tensor.x()`` and ``x ** 2``
  are recognised). ``-F.logsigmoid(z)`` is read as a penalty of ``-z`` so it becomes, e.g.,
  ``F.relu(-z)`` rather than ``-F.relu(z)``.
- ``add_term``: add ``c * prim(+-beta * v)`` to the returned loss, ``v`` a margin-like tensor in
  scope (a local such as ``logits``, a primitive's argument, or a combination of the inputs).
- ``drop_term``: remove one term of a sum in the loss or in an assignment feeding it.
- ``reweight``: multiply one term of such a sum by a constant.

Crossovers inline the second parent's body into the first (parameters renamed positionally to
the first parent's, locals suffixed ``_b``) and return ``blend`` (a convex combination),
``gate`` (the DiscoPOP/LRML idea of Lu et al. 2024, arXiv:2406.08414: a sigmoid of the margin
switches between the two losses) or ``splice`` (one subexpression of the first parent replaced
by one of the second that the first lacks, with the statements it needs).

Every offspring is tidied (duplicate and dead assignments removed, ``--x`` and ``a + -b``
simplified, ``_b`` suffixes renumbered), must pass :func:`engine.genome.check_genome`, stay under
``max_nodes`` syntax nodes, differ from its parents by :func:`engine.genome.code_hash`, and keep
a gradient path to the inputs that carry one (a static check that also spots linear
cancellations such as ``(pc - pr) - (pc - pr)``, comparisons and ``.detach()``). The driver never
runs genome code; runtime failures (overflow, say) are left to the interface's checks.
"""
from __future__ import annotations

import ast
import copy
import keyword
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from engine.candidate import Candidate
from engine.genome import (
    FORBIDDEN_NAMES, SAFE_BUILTINS, GenomeError, check_genome, code_hash, parse_genome,
)
from operators.base import Context, Offspring, Operator, OperatorError

#: Mutation kinds, in the order their weights are listed.
MUTATIONS = ("constant", "swap", "add_term", "drop_term", "reweight")
#: Crossover kinds.
CROSSOVERS = ("blend", "gate", "splice")

#: The swappable primitives: canonical module and what the primitive does to a penalty.
PRIMITIVES: dict[str, tuple[str, str]] = {
    "logsigmoid": ("F", "the logistic (DPO-like) shape"),
    "softplus": ("F", "a smooth hinge"),
    "exp": ("torch", "an exponential penalty on wrong margins, as in LRML/DiscoPOP"),
    "sigmoid": ("torch", "a bounded, noise-robust penalty (a smoothed 0-1 loss)"),
    "tanh": ("torch", "a bounded penalty that saturates for large margins"),
    "relu": ("F", "a hard hinge that ignores satisfied pairs"),
    "square": ("torch", "a quadratic (IPO-like) penalty"),
    "abs": ("torch", "a penalty that grows linearly in both directions"),
}

#: ``module.attr`` spellings of the primitives (``torch.nn.functional`` is read as ``F``).
_FUNCTION_SPELLINGS = {
    ("F", "logsigmoid"): "logsigmoid", ("F", "softplus"): "softplus",
    ("torch", "exp"): "exp", ("torch", "sigmoid"): "sigmoid", ("F", "sigmoid"): "sigmoid",
    ("torch", "tanh"): "tanh", ("F", "tanh"): "tanh", ("torch", "relu"): "relu",
    ("F", "relu"): "relu", ("torch", "square"): "square", ("torch", "abs"): "abs",
    ("torch", "absolute"): "abs",
}
#: Tensor methods that are primitives (``x.exp()``).
_METHOD_SPELLINGS = {"exp": "exp", "sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu",
                     "abs": "abs", "square": "square"}

#: Increasing primitives penalise wrong (negative) margins when applied to ``-v``; logsigmoid
#: does so as ``-logsigmoid(v)``; square and abs are symmetric.
_INCREASING = {"softplus", "exp", "sigmoid", "tanh", "relu"}

#: Keyword arguments whose integer values are structure, not weights.
_STRUCTURAL_KEYWORDS = {"dim", "axis", "keepdim", "dtype", "diagonal", "p", "correction", "unbiased"}
#: Method calls that reduce over the batch: never a per-example margin or a splice partner.
_REDUCTIONS = {"mean", "sum", "std", "var", "max", "min", "norm", "median", "logsumexp", "numel",
               "item", "amax", "amin", "prod", "size", "quantile", "nanmean", "count_nonzero"}

#: Methods whose result carries no gradient.
_DETACHING = {"detach", "item", "sign", "round", "floor", "ceil", "bool", "long", "int", "numel", "size"}
_PREFERRED_MARGINS = {"logits", "margin", "margins", "rho", "z"}
_MARGIN_NAME = re.compile(r"logit|margin|rho|ratio|diff|delta|adv|reward|score|^[zuxdh]$")
_NOT_MARGIN_NAME = re.compile(r"loss|gate|weight|blend|modulation|mask|mismatch|correct|^is_|^g$|^w$")
#: Trailing name tokens this operator adds; stripped before a new tag is appended.
_TAG = re.compile(
    r"^(c\d[\dpem]*|w\d[\dpem]*|p?(logsigmoid|softplus|exp|sigmoid|tanh|relu|square|abs)"
    r"|drop|blend|gate|splice)$"
)
_BETA_SUFFIX = re.compile(r"_b\d*$")

_DEFAULTS: dict[str, Any] = {
    "mutations": MUTATIONS,
    "crossovers": CROSSOVERS,
    "max_nodes": 250,
    "max_attempts": 16,
    "constant_factor": (0.5, 2.0),
    "term_weight": (0.05, 0.5),
    "reweight_factor": (0.25, 4.0),
    "blend_weight": (0.2, 0.8),
    "gate_temperature": (0.05, 2.0),
    "propose_steps": (1, 3),
    "max_name_length": 40,
}


class _Skip(Exception):
    """One attempt of one kind failed; the reason is kept for the final error message."""


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
        function = _parse(parent.code, parent.name)
        forbidden = {_safe_hash(parent.code)}
        work, tag, thought = self._mutate_once(function, context, forbidden)
        name = self._mutation_name(parent.name or function.name, [tag])
        return Offspring(name=name, code=_render(work, name), thought=thought)

    def crossover(self, first: Candidate, second: Candidate, context: Context) -> Offspring:
        """Combine two parents into one function (``blend``, ``gate`` or ``splice``).

        Raises:
            OperatorError: the parents cannot be parsed, are identical, have different
                parameter counts, or no crossover kind yields a valid offspring.
        """
        fa = _parse(first.code, first.name)
        fb = _parse(second.code, second.name)
        hashes = {_safe_hash(first.code), _safe_hash(second.code)}
        if len(hashes) == 1:
            raise OperatorError(f"crossover of {first.name!r} with an identical genome adds nothing")
        if len(_params(fa)) != len(_params(fb)):
            raise OperatorError(
                f"cannot cross {first.name!r} ({len(_params(fa))} parameters) with {second.name!r} "
                f"({len(_params(fb))} parameters): the parameter lists must have the same length"
            )
        name_a, name_b = first.name or fa.name, second.name or fb.name
        rng = context.rng
        grad = self._gradient_params(fa, context)
        reasons: dict[str, str] = {}
        remaining = list(self.crossovers)
        attempts = 0
        while remaining and attempts < self.max_attempts:
            attempts += 1
            kind = _weighted_pick(rng, remaining)
            work_a, work_b = _strip_docstring(copy.deepcopy(fa)), _strip_docstring(copy.deepcopy(fb))
            _rename_second(work_a, work_b)
            try:
                method = {"blend": self._blend, "gate": self._gate, "splice": self._splice}[kind]
                work, thought = method(work_a, work_b, name_a, name_b, rng, grad)
                self._validate(work, context.interface, grad, hashes, _size(fa))
            except _Skip as exc:
                reasons[kind] = str(exc)
                continue
            except _NotApplicable as exc:
                reasons[kind] = str(exc)
                remaining = [(k, w) for k, w in remaining if k != kind]
                continue
            name = self._crossover_name(name_a, name_b, kind)
            return Offspring(name=name, code=_render(work, name), thought=thought)
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
            function = _parse(code, elite.candidate.name)
            base_name = elite.candidate.name or function.name
            origin = f"elite {base_name} (fitness {elite.fitness:.4g})"
        else:
            code = getattr(context.interface, "example", "") or ""
            if not code.strip():
                raise OperatorError("nothing to propose from: the archive is empty and the interface has no example")
            function = _parse(code, "the interface's example")
            base_name = function.name
            origin = f"the interface's example {base_name}"
        steps = rng.randint(*self.propose_steps)
        forbidden = {_safe_hash(code)}
        tags: list[str] = []
        thoughts: list[str] = []
        work = function
        for step in range(steps):
            try:
                work, tag, thought = self._mutate_once(work, context, forbidden)
            except OperatorError:
                if step == 0:
                    raise
                break
            forbidden.add(_safe_hash(_render(work, "genome")))
            tags.append(tag)
            thoughts.append(thought[0].lower() + thought[1:].rstrip("."))
        count = "one mutation" if len(tags) == 1 else f"{len(tags)} mutations"
        thought = f"Proposed from {origin} by {count}: " + "; then ".join(thoughts) + "."
        name = self._mutation_name(base_name, tags)
        return Offspring(name=name, code=_render(work, name), thought=thought)

    # -- mutation ----------------------------------------------------------------------------
    def _mutate_once(self, function: ast.FunctionDef, context: Context,
                     forbidden: set[str]) -> tuple[ast.FunctionDef, str, str]:
        rng = context.rng
        grad = self._gradient_params(function, context)
        kinds: dict[str, Callable[[ast.FunctionDef, random.Random, set[str]], tuple[str, str]]] = {
            "constant": self._perturb_constant, "swap": self._swap_primitive,
            "add_term": self._add_term, "drop_term": self._drop_term, "reweight": self._reweight,
        }
        reasons: dict[str, str] = {}
        remaining = list(self.mutations)
        attempts = 0
        while remaining and attempts < self.max_attempts:
            attempts += 1
            kind = _weighted_pick(rng, remaining)
            work = _strip_docstring(copy.deepcopy(function))
            try:
                tag, thought = kinds[kind](work, rng, grad)
                self._validate(work, context.interface, grad, forbidden, _size(function))
            except _NotApplicable as exc:
                reasons[kind] = str(exc)
                remaining = [(k, w) for k, w in remaining if k != kind]
                continue
            except _Skip as exc:
                reasons[kind] = str(exc)
                continue
            return work, tag, thought
        detail = "; ".join(f"{k}: {r}" for k, r in reasons.items()) or "no mutation kinds enabled"
        raise OperatorError(
            f"no symbolic mutation of {function.name!r} succeeded in {attempts} attempts ({detail})"
        )

    def _perturb_constant(self, work: ast.FunctionDef, rng: random.Random, grad: set[str]) -> tuple[str, str]:
        sites = _constant_sites(work)
        if not sites:
            raise _NotApplicable("no numeric constant that is a weight (exponents and indices are kept)")
        node, holder = rng.choice(sites)
        old = node.value
        low, high = self.constant_factor
        for _ in range(10):
            new = _round_significant(old * _log_uniform(rng, low, high), 3)
            if new != old and new != 0:
                break
        else:
            raise _Skip(f"the constant {old!r} did not change after rounding")
        node.value = float(new)
        direction = "larger" if abs(new) > abs(old) else "smaller"
        thought = (
            f"Changed the constant {old:g} to {new:g} in `{_snippet(holder)}` to test whether a "
            f"{direction} value works better."
        )
        return f"c{_tag_number(new)}", thought

    def _swap_primitive(self, work: ast.FunctionDef, rng: random.Random, grad: set[str]) -> tuple[str, str]:
        sites = [(node, *_primitive(node)) for node in _walk_body(work) if _primitive(node) is not None]
        if not sites:
            raise _NotApplicable("no call of " + ", ".join(_spelling(k) for k in PRIMITIVES))
        node, key, argument = rng.choice(sites)
        spelled = "x ** 2" if isinstance(node, ast.BinOp) else _spelling(key)
        # Read the site as a penalty of a violation y: -logsigmoid(x) is softplus(-x), so its
        # violation is -x; an increasing primitive's violation is its argument. Rewriting the
        # penalty (not just the name) keeps the loss pointing the same way: -logsigmoid(z)
        # becomes relu(-z), not -relu(z).
        parent = _parents(work).get(id(node))
        site: ast.AST = node
        violation = argument
        if key == "logsigmoid" and isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.USub):
            site, violation = parent, _negate(argument)
        elif key == "logsigmoid":
            violation = None  # a bare logsigmoid: swap literally
        targets = [k for k in PRIMITIVES if k != key]
        exp_argument = violation if violation is not None else argument
        if "exp" in targets and (_beta_expression(work) is not None and not _mentions_beta(exp_argument, work)
                                 or _reaches_reduction(exp_argument, work)):
            targets.remove("exp")  # exp of an unscaled log-ratio or a batch variance overflows
        new_key = rng.choice(targets)
        before = _snippet(site)
        if violation is None:
            replacement: ast.expr = _primitive_call(new_key, copy.deepcopy(argument))
        elif new_key == "logsigmoid":
            replacement = ast.UnaryOp(ast.USub(), _primitive_call("logsigmoid", _negate(copy.deepcopy(violation))))
        else:
            replacement = _primitive_call(new_key, copy.deepcopy(violation))
        _replace(work, site, replacement)
        thought = (
            f"Swapped {spelled} for {_spelling(new_key)} in `{before}` to get "
            f"{PRIMITIVES[new_key][1]}."
        )
        return new_key, thought

    def _add_term(self, work: ast.FunctionDef, rng: random.Random, grad: set[str]) -> tuple[str, str]:
        site = _loss_site(work)
        if site is None:
            raise _NotApplicable("the function does not end with 'return <loss>'")
        candidates = _margin_candidates(work, site.stmt_index, grad)
        if not candidates:
            raise _NotApplicable("no tensor in scope to build a term from")
        margin = copy.deepcopy(_weighted_pick(rng, candidates))
        beta = _beta_expression(work)
        scaled = beta is not None and not _mentions_beta(margin, work)
        choices = list(PRIMITIVES) if (beta is not None) else [k for k in PRIMITIVES if k != "exp"]
        key = rng.choice(choices)
        # Penalise wrong margins most of the time, explore the other direction sometimes.
        negate = (key in _INCREASING) == (rng.random() < 0.75)
        if key in ("square", "abs"):
            negate = False
        argument = _scaled_margin(margin, beta if scaled else None, negate)
        weight = _round_significant(_log_uniform(rng, *self.term_weight), 2)
        call = _primitive_call(key, argument)
        if any(ast.dump(n) == ast.dump(call) for n in _walk_body(work) if isinstance(n, ast.Call)):
            raise _Skip(f"`{ast.unparse(call)}` is already part of the loss")
        term = ast.BinOp(ast.Constant(weight), ast.Mult(), call)
        operation: ast.operator = ast.Sub() if key == "logsigmoid" else ast.Add()
        if site.name is not None:
            # `return losses` without a simple assignment to extend: append one.
            statement = ast.Assign(
                targets=[ast.Name(site.name, ast.Store())],
                value=ast.BinOp(ast.Name(site.name, ast.Load()), operation, term),
            )
            work.body.insert(len(work.body) - 1, statement)
        else:
            site.set(ast.BinOp(site.get(), operation, term))
        sign = "-" if isinstance(operation, ast.Sub) else "+"
        thought = (
            f"Added `{sign} {ast.unparse(term)}` to the loss: a small extra term with "
            f"{PRIMITIVES[key][1]}."
        )
        return f"p{key}", thought

    def _drop_term(self, work: ast.FunctionDef, rng: random.Random, grad: set[str]) -> tuple[str, str]:
        chains = _loss_chains(work)
        if not chains:
            raise _NotApplicable("no sum or difference in the loss or the assignments feeding it")
        root = rng.choice(chains)
        terms = _flatten(root)
        # Keep a sum that varied with the inputs varying: relu(1 - z) must not become relu(1).
        varying = _varying(_assigned_values(work), set(_data_params(work)))
        varies = [bool(set(_loaded(term)) & varying) for _, term in terms]
        choices = [i for i in range(len(terms)) if not any(varies) or any(varies[:i] + varies[i + 1:])]
        if not choices:
            raise _Skip(f"every term of `{_snippet(root)}` but one is constant")
        index = rng.choice(choices)
        dropped = terms[index][1]
        text, dropped_text = _snippet(root), _snippet(dropped)
        _replace(work, root, _rebuild(terms[:index] + terms[index + 1:]))
        thought = (
            f"Dropped `{dropped_text}` from `{text}` to test whether the loss works without it "
            "(a simpler loss is often more robust)."
        )
        return "drop", thought

    def _reweight(self, work: ast.FunctionDef, rng: random.Random, grad: set[str]) -> tuple[str, str]:
        chains = _loss_chains(work)
        if not chains:
            raise _NotApplicable("no sum or difference in the loss or the assignments feeding it")
        root = rng.choice(chains)
        terms = _flatten(root)
        index = rng.randrange(len(terms))
        sign, term = terms[index]
        low, high = self.reweight_factor
        for _ in range(10):
            factor = _round_significant(_log_uniform(rng, low, high), 2)
            if abs(math.log(factor)) >= math.log(1.15):
                break
        else:
            raise _Skip("reweight_factor range is too narrow to change a term noticeably")
        text, term_text = _snippet(root), _snippet(term)
        constant = _weight_constant(term)
        if constant is not None:
            constant.value = float(_round_significant(constant.value * factor, 3))
            new_term = term
        elif isinstance(term, ast.UnaryOp) and isinstance(term.op, ast.USub):
            new_term = ast.BinOp(ast.UnaryOp(ast.USub(), ast.Constant(factor)), ast.Mult(), term.operand)
        else:
            new_term = ast.BinOp(ast.Constant(factor), ast.Mult(), term)
        terms[index] = (sign, new_term)
        _replace(work, root, _rebuild(terms))
        thought = (
            f"Re-weighted `{term_text}` by {factor:g} in `{text}`, shifting the balance between "
            "the terms of the sum."
        )
        return f"w{_tag_number(factor)}", thought

    # -- crossover ---------------------------------------------------------------------------
    def _blend(self, fa: ast.FunctionDef, fb: ast.FunctionDef, name_a: str, name_b: str,
               rng: random.Random, grad: set[str]) -> tuple[ast.FunctionDef, str]:
        self._check_room(fa, fb)
        work, loss_a, loss_b = _inline_second(fa, fb)
        weight = round(rng.uniform(*self.blend_weight), 2)
        combined = ast.BinOp(
            ast.BinOp(ast.Constant(weight), ast.Mult(), ast.Name(loss_a, ast.Load())), ast.Add(),
            ast.BinOp(ast.Constant(round(1 - weight, 2)), ast.Mult(), ast.Name(loss_b, ast.Load())),
        )
        _set_return(work, combined)
        thought = (
            f"Blended {name_a} and {name_b} as {weight:g} * {name_a} + {round(1 - weight, 2):g} * "
            f"{name_b}, mixing the shapes of the two losses."
        )
        return work, thought

    def _gate(self, fa: ast.FunctionDef, fb: ast.FunctionDef, name_a: str, name_b: str,
              rng: random.Random, grad: set[str]) -> tuple[ast.FunctionDef, str]:
        self._check_room(fa, fb)
        work, loss_a, loss_b = _inline_second(fa, fb)
        candidates = _margin_candidates(work, len(work.body) - 1, grad)
        if not candidates:
            raise _NotApplicable("no margin-like tensor in scope to gate on")
        margin = copy.deepcopy(_weighted_pick(rng, candidates))
        temperature = _round_significant(_log_uniform(rng, *self.gate_temperature), 2)
        gate = _fresh_name("gate", _all_names(work))
        work.body.insert(len(work.body) - 1, ast.Assign(
            targets=[ast.Name(gate, ast.Store())],
            value=_primitive_call("sigmoid", ast.BinOp(margin, ast.Div(), ast.Constant(temperature))),
        ))
        high, low = (loss_a, loss_b) if rng.random() < 0.5 else (loss_b, loss_a)
        combined = ast.BinOp(
            ast.BinOp(ast.Name(gate, ast.Load()), ast.Mult(), ast.Name(high, ast.Load())), ast.Add(),
            ast.BinOp(ast.BinOp(ast.Constant(1), ast.Sub(), ast.Name(gate, ast.Load())), ast.Mult(),
                      ast.Name(low, ast.Load())),
        )
        _set_return(work, combined)
        names = {loss_a: name_a, loss_b: name_b}
        thought = (
            f"Gated {name_a} and {name_b} with sigmoid({ast.unparse(margin)} / {temperature:g}), as in "
            f"DiscoPOP, so {names[high]} dominates for large margins and {names[low]} for small ones."
        )
        return work, thought

    def _check_room(self, fa: ast.FunctionDef, fb: ast.FunctionDef) -> None:
        size = _size(fa) + _size(fb)
        if size > self.max_nodes:
            raise _NotApplicable(f"both parents together have {size} syntax nodes (max_nodes={self.max_nodes})")

    def _splice(self, fa: ast.FunctionDef, fb: ast.FunctionDef, name_a: str, name_b: str,
                rng: random.Random, grad: set[str]) -> tuple[ast.FunctionDef, str]:
        sites = _splice_nodes(fa, exclude_loss=True)
        donors = _splice_nodes(fb, exclude_loss=False)
        if not sites or not donors:
            raise _NotApplicable("no tensor subexpression to exchange")
        calls = [s for s in sites if isinstance(s[0], ast.Call)]
        others = [s for s in sites if not isinstance(s[0], ast.Call)]
        group = calls if calls and (not others or rng.random() < 0.5) else others
        site, site_index = rng.choice(group)
        want_call = isinstance(site, ast.Call)
        # Only material the first parent lacks (compared with locals expanded) is worth taking.
        canonical = _Canonical()
        key_a, key_b = canonical.keyer(fa), canonical.keyer(fb)
        known = {key_a(node) for node, _ in _splice_nodes(fa, exclude_loss=False)}
        fitting = [d for d, _ in donors if isinstance(d, ast.Call) == want_call]
        if _is_batched(site, _batched_names(fa)):
            # a batch statistic in place of a per-example term can leave a scalar loss
            batched_b = _batched_names(fb)
            fitting = [d for d in fitting if _is_batched(d, batched_b)]
        donor = next((d for d in rng.sample(fitting, len(fitting)) if key_b(d) not in known), None)
        if donor is None:
            raise _Skip(f"{name_b} has no part that {name_a} lacks to put in place of `{_snippet(site)}`")
        _reuse_first_definitions(fa.body[:site_index], fb)  # renames inside the donor too
        donor = copy.deepcopy(donor)
        needed = _statements_needed(fb, donor)
        site_text, donor_text = _snippet(site), _snippet(donor)
        _replace(fa, site, donor)
        fa.body[site_index:site_index] = [copy.deepcopy(s) for s in needed]
        thought = (
            f"Replaced `{site_text}` in {name_a} with `{donor_text}` from {name_b}, keeping "
            f"{name_a}'s structure around a part of {name_b}."
        )
        return fa, thought

    # -- shared checks and names ---------------------------------------------------------------
    def _validate(self, work: ast.FunctionDef, interface: Any, grad: set[str],
                  forbidden: set[str], parent_size: int) -> None:
        """Tidy ``work`` in place and check it; raises :class:`_Skip` with the reason."""
        arg_counts = getattr(interface, "arg_counts", None)
        _merge_duplicates(work)
        _prune_dead_assignments(work)
        work.body = [_Simplifier().visit(statement) for statement in work.body]
        _tidy_names(work)
        code = _render(work, work.name)
        try:
            check_genome(code, arg_counts)
        except GenomeError as exc:
            raise _Skip(f"offspring failed the static check: {exc}") from exc
        size = _size(work)
        if size > self.max_nodes and size >= parent_size:
            raise _Skip(f"offspring has {size} syntax nodes (max_nodes={self.max_nodes})")
        beta = getattr(interface, "beta", None)  # the value genomes see as self.beta, if exposed
        beta = float(beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else None
        if not _loss_depends_on(work, grad, beta):
            raise _Skip("the loss would no longer depend on " + ", ".join(sorted(grad)))
        if code_hash(code) in forbidden:
            raise _Skip("offspring is the same genome as a parent")

    def _gradient_params(self, function: ast.FunctionDef, context: Context) -> set[str]:
        """The parameters that receive a gradient, read from the interface's sample inputs
        (matched by position, after a leading ``self``); all data parameters if unknown."""
        data = _data_params(function)
        interface = context.interface
        key = type(interface)
        if key not in self._gradient_flags:
            flags = None
            try:
                import torch

                inputs = interface.sample_inputs(2, torch.Generator().manual_seed(0))
                flags = [bool(getattr(t, "requires_grad", False)) for t in inputs.values()]
            except Exception:  # an interface without samples: fall back to all inputs
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
        return _identifier(f"{root}_{suffix}" if suffix else root, self.max_name_length)

    def _crossover_name(self, name_a: str, name_b: str, tag: str) -> str:
        root_a = _root(name_a).split("_x_")[0]
        root_b = _root(name_b).split("_x_")[0]
        budget = self.max_name_length - len(tag) - 4
        if len(root_a) + len(root_b) > budget:
            half = max(budget // 2, 2)
            root_a, root_b = root_a[:half].rstrip("_"), root_b[:half].rstrip("_")
        return _identifier(f"{root_a}_x_{root_b}_{tag}", self.max_name_length)


class _NotApplicable(Exception):
    """A kind has nothing to act on in this genome; other kinds are tried."""


# -- options ------------------------------------------------------------------------------------
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


# -- randomness and numbers ---------------------------------------------------------------------
def _weighted_pick(rng: random.Random, items: list[tuple[Any, float]]) -> Any:
    total = sum(weight for _, weight in items)
    point = rng.random() * total
    for item, weight in items:
        point -= weight
        if point < 0:
            return item
    return items[-1][0]


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _round_significant(value: float, digits: int) -> float:
    if value == 0 or not math.isfinite(value):
        return float(value)
    return float(f"{value:.{digits}g}")


def _tag_number(value: float) -> str:
    return f"{abs(value):g}".replace(".", "p").replace("-", "m").replace("+", "")


# -- parsing and rendering ----------------------------------------------------------------------
def _parse(code: str, label: str) -> ast.FunctionDef:
    try:
        _, function = parse_genome(code)
    except GenomeError as exc:
        raise OperatorError(f"cannot parse genome {label!r}: {exc}") from exc
    return function


def _safe_hash(code: str) -> str:
    try:
        return code_hash(code)
    except GenomeError:
        return ""


def _render(function: ast.FunctionDef, name: str) -> str:
    original, function.name = function.name, name
    ast.fix_missing_locations(function)  # unparse reads the line numbers of assignments
    try:
        return ast.unparse(ast.Module(body=[function], type_ignores=[])) + "\n"
    finally:
        function.name = original


def _strip_docstring(function: ast.FunctionDef) -> ast.FunctionDef:
    # A parent's docstring no longer describes its offspring.
    body = function.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        function.body = body[1:]
    return function


def _size(node: ast.AST) -> int:
    skip = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
    return sum(1 for n in ast.walk(node) if not isinstance(n, skip))


def _snippet(node: ast.AST, limit: int = 60) -> str:
    text = ast.unparse(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _identifier(text: str, limit: int) -> str:
    text = re.sub(r"\W+", "_", text).strip("_")
    text = re.sub(r"_{2,}", "_", text)[:limit].rstrip("_") or "loss"
    if text[0].isdigit():
        text = ("f_" + text)[:limit].rstrip("_")
    if keyword.iskeyword(text) or text in SAFE_BUILTINS or text in FORBIDDEN_NAMES or text in ("torch", "F", "math"):
        text = text + "_loss"
    return text


def _root(name: str) -> str:
    tokens = [t for t in re.sub(r"\W+", "_", name or "").split("_") if t]
    while len(tokens) > 1 and _TAG.match(tokens[-1]):
        tokens.pop()
    return "_".join(tokens) or "loss"


# -- tree helpers -------------------------------------------------------------------------------
def _walk_body(function: ast.FunctionDef):
    for statement in function.body:
        yield from ast.walk(statement)


def _parents(root: ast.AST) -> dict[int, ast.AST]:
    return {id(child): parent for parent in ast.walk(root) for child in ast.iter_child_nodes(parent)}


def _replace(root: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(root):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list):
                for index, item in enumerate(value):
                    if item is old:
                        value[index] = new
                        return
    raise ValueError("node to replace not found")  # an internal error, not a genome's fault


def _params(function: ast.FunctionDef) -> list[str]:
    return [a.arg for a in function.args.posonlyargs + function.args.args]


def _data_params(function: ast.FunctionDef) -> list[str]:
    params = _params(function)
    return params[1:] if params and params[0] == "self" else params


def _loaded(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]


def _stored(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))]


def _all_names(function: ast.FunctionDef) -> set[str]:
    names = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
    return names | {a.arg for a in ast.walk(function) if isinstance(a, ast.arg)} | {function.name}


def _fresh_name(base: str, used: set[str]) -> str:
    if base not in used:
        return base
    index = 2
    while f"{base}{index}" in used:
        index += 1
    return f"{base}{index}"


def _assigned_values(function: ast.FunctionDef) -> dict[str, list[ast.AST]]:
    """Every expression each local is assigned from (anywhere in the function)."""
    values: dict[str, list[ast.AST]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)):
            targets, value = [node.target], node.value
        elif isinstance(node, (ast.For, ast.comprehension)):
            targets, value = [node.target], node.iter
        else:
            continue
        if value is None:
            continue
        for target in targets:
            for name in _stored(target):
                values.setdefault(name, []).append(value)
    return values


def _reachable(expr: ast.AST, values: dict[str, list[ast.AST]]) -> set[str]:
    """Names ``expr`` reads, directly or through the locals it reads."""
    seen: set[str] = set()
    stack = _loaded(expr)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for value in values.get(name, []):
            stack.extend(_loaded(value))
    return seen


def _varying(values: dict[str, list[ast.AST]], roots: set[str]) -> set[str]:
    """``roots`` and every local whose value depends on them."""
    varying = set(roots)
    changed = True
    while changed:
        changed = False
        for name, assigned in values.items():
            if name not in varying and any(set(_loaded(v)) & varying for v in assigned):
                varying.add(name)
                changed = True
    return varying


def _loss_depends_on(function: ast.FunctionDef, grad: set[str], beta: float | None = None) -> bool:
    """Whether a returned loss can carry a gradient to ``grad``: it reads them, and not only
    through linear combinations in which they cancel (``(pc - pr) - (pc - pr)``). ``beta``,
    when known, is the value of ``self.beta`` (cancellations such as ``pc - z / 0.05`` with
    ``z = beta * pc`` depend on it)."""
    values = _assigned_values(function)
    returns = [n for n in _walk_body(function) if isinstance(n, ast.Return) and n.value is not None]
    live = _Liveness(function, grad, values, beta)
    for node in returns:
        value = node.value
        if isinstance(value, ast.Tuple) and value.elts:
            value = value.elts[0]
        if _reachable(value, values) & grad and live.live(value):
            return True
    return False


class _Liveness:
    """A static test for gradients cancelled by linear algebra. Locals assigned exactly once
    at the top level are expanded; anything else counts as live when it reads ``grad``."""

    def __init__(self, function: ast.FunctionDef, grad: set[str], values: dict[str, list[ast.AST]],
                 beta: float | None = None) -> None:
        self.grad = grad
        self.beta = beta
        self.params = set(_data_params(function))
        self.values = values
        self.definitions: dict[str, ast.expr] = {}
        for statement in function.body:
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                    and isinstance(statement.targets[0], ast.Name) and len(values.get(statement.targets[0].id, [])) == 1:
                self.definitions[statement.targets[0].id] = statement.value
        self.expanding: set[str] = set()
        # Names whose value depends on a parameter (the rest are constants such as tau).
        self.varying = _varying(values, self.params)
        self._read_cache: dict[int, set[str]] = {}

    def _reads(self, node: ast.AST) -> set[str]:
        """Names ``node`` reads, memoised: the walk is repeated for every sub-expression."""
        # Keyed by id(): every node stays alive (held by the function) while this object is used.
        key = id(node)
        if key not in self._read_cache:
            self._read_cache[key] = set(_loaded(node))
        return self._read_cache[key]

    def live(self, node: ast.AST) -> bool:
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            return False  # comparisons pass no gradient: `(logits < 0).float()`, where-conditions
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in _DETACHING and not node.args:
            return False
        form = self.linear(node)
        if form is not None:
            return any(abs(form.get(p, 0.0)) > 1e-12 for p in self.grad)
        if isinstance(node, ast.Name):
            if node.id in self.definitions and node.id not in self.expanding:
                self.expanding.add(node.id)
                try:
                    return self.live(self.definitions[node.id])
                finally:
                    self.expanding.discard(node.id)
            if node.id in self.values:
                if node.id in self.expanding:
                    return False  # `q = q + ...`: the other assignments decide
                self.expanding.add(node.id)
                try:
                    return any(self.live(value) for value in self.values[node.id])
                finally:
                    self.expanding.discard(node.id)
            return node.id in self.grad
        return any(self.live(child) for child in ast.iter_child_nodes(node))

    def linear(self, node: ast.AST) -> dict[str, float] | None:
        """``{param: coefficient, "": constant}`` if ``node`` is linear in the parameters.
        A parameter-free expression (``self.beta``) is an opaque constant ``{"~": 1}`` that
        scales like 1: exact enough to spot ``b * x - b * x``."""
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return {"": float(node.value)}
        if self.beta is not None and _is_beta(node):
            return {"": self.beta}
        if isinstance(node, ast.expr) and not self._reads(node) & self.varying:
            return {"~": 1.0}
        if isinstance(node, ast.Name):
            if node.id in self.params:
                return {node.id: 1.0}
            if node.id in self.definitions and node.id not in self.expanding:
                self.expanding.add(node.id)
                try:
                    return self.linear(self.definitions[node.id])
                finally:
                    self.expanding.discard(node.id)
            return None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = self.linear(node.operand)
            if inner is None:
                return None
            return {k: -v for k, v in inner.items()} if isinstance(node.op, ast.USub) else inner
        if not isinstance(node, ast.BinOp):
            return None
        left, right = self.linear(node.left), self.linear(node.right)
        if left is None or right is None:
            return None
        if isinstance(node.op, (ast.Add, ast.Sub)):
            sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
            out = dict(left)
            for k, v in right.items():
                out[k] = out.get(k, 0.0) + sign * v
            return out
        if isinstance(node.op, ast.Mult):
            if set(left) <= {"", "~"}:
                return {k: v * _scale(left) for k, v in right.items()}
            if set(right) <= {"", "~"}:
                return {k: v * _scale(right) for k, v in left.items()}
            return None
        if isinstance(node.op, ast.Div) and set(right) <= {"", "~"} and _scale(right) != 0:
            return {k: v / _scale(right) for k, v in left.items()}
        return None


def _scale(constant: dict[str, float]) -> float:
    return 1.0 if "~" in constant else constant.get("", 0.0)


def _beta_expression(function: ast.FunctionDef) -> ast.expr | None:
    for node in _walk_body(function):
        if isinstance(node, ast.Attribute) and node.attr == "beta" and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            return ast.Attribute(ast.Name("self", ast.Load()), "beta", ast.Load())
    if "beta" in _params(function):
        return ast.Name("beta", ast.Load())
    return None


def _is_beta(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "beta" and isinstance(node.value, ast.Name)
            and node.value.id == "self") or (isinstance(node, ast.Name) and node.id == "beta")


def _mentions_beta(expr: ast.AST, function: ast.FunctionDef) -> bool:
    """Whether ``expr`` is already scaled by beta, directly or through the locals it reads."""
    if any(_is_beta(n) for n in ast.walk(expr)):
        return True
    values = _assigned_values(function)
    for name in _reachable(expr, values):
        for value in values.get(name, []):
            if any(_is_beta(n) for n in ast.walk(value)):
                return True
    return False


# -- primitives ---------------------------------------------------------------------------------
def _module_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name) and node.id in ("torch", "F"):
        return node.id
    if isinstance(node, ast.Attribute) and node.attr == "functional" and isinstance(node.value, ast.Attribute) \
            and node.value.attr == "nn" and isinstance(node.value.value, ast.Name) \
            and node.value.value.id == "torch":
        return "F"
    return None


def _primitive(node: ast.AST) -> tuple[str, ast.expr] | None:
    """``(key, argument)`` if ``node`` is a one-argument call of a swappable primitive (or
    ``x ** 2``, read as ``torch.square(x)``)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and isinstance(node.right, ast.Constant) \
            and node.right.value == 2 and type(node.right.value) in (int, float):
        return "square", node.left
    if not isinstance(node, ast.Call) or node.keywords or not isinstance(node.func, ast.Attribute):
        return None
    func = node.func
    module = _module_of(func.value)
    if module is not None:
        key = _FUNCTION_SPELLINGS.get((module, func.attr))
        if key is not None and len(node.args) == 1 and not isinstance(node.args[0], ast.Starred):
            return key, node.args[0]
        return None
    if not node.args and func.attr in _METHOD_SPELLINGS and not (
        isinstance(func.value, ast.Name) and func.value.id in ("torch", "F", "math")
    ):
        return _METHOD_SPELLINGS[func.attr], func.value
    return None


def _spelling(key: str) -> str:
    return f"{PRIMITIVES[key][0]}.{key}"


def _primitive_call(key: str, argument: ast.expr) -> ast.Call:
    module = PRIMITIVES[key][0]
    return ast.Call(ast.Attribute(ast.Name(module, ast.Load()), key, ast.Load()), [argument], [])


def _negate(expr: ast.expr) -> ast.expr:
    """``-expr``, written the way a person would: ``-(-x)`` -> ``x``, ``1 - z`` -> ``z - 1``,
    ``b * x`` -> ``-b * x``."""
    expr = copy.deepcopy(expr)
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.USub):
        return expr.operand
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Sub):
        return ast.BinOp(expr.right, ast.Sub(), expr.left)
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Div)):
        if isinstance(expr.left, ast.UnaryOp) and isinstance(expr.left.op, ast.USub):
            return ast.BinOp(expr.left.operand, expr.op, expr.right)
        if not isinstance(expr.left, ast.BinOp):
            return ast.BinOp(ast.UnaryOp(ast.USub(), expr.left), expr.op, expr.right)
    return ast.UnaryOp(ast.USub(), expr)


def _scaled_margin(margin: ast.expr, beta: ast.expr | None, negate: bool) -> ast.expr:
    if beta is None:
        return ast.UnaryOp(ast.USub(), margin) if negate else margin
    factor = ast.UnaryOp(ast.USub(), copy.deepcopy(beta)) if negate else copy.deepcopy(beta)
    return ast.BinOp(factor, ast.Mult(), margin)


# -- constants ----------------------------------------------------------------------------------
def _constant_sites(function: ast.FunctionDef) -> list[tuple[ast.Constant, ast.AST]]:
    """Numeric constants that act as weights, with the node to quote in the thought."""
    parents = _parents(function)
    in_slices = {id(n) for s in _walk_body(function) if isinstance(s, ast.Subscript) for n in ast.walk(s.slice)}
    sites = []
    for node in _walk_body(function):
        if not isinstance(node, ast.Constant) or type(node.value) not in (int, float):
            continue
        if node.value == 0 or not math.isfinite(node.value) or id(node) in in_slices:
            continue
        child, parent = node, parents.get(id(node))
        if isinstance(parent, ast.UnaryOp) and isinstance(parent.op, (ast.USub, ast.UAdd)):
            child, parent = parent, parents.get(id(parent))
        if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Pow) and parent.right is child:
            continue  # exponents are structure (x ** 2), and fractional ones risk nan
        if isinstance(parent, ast.keyword) and parent.arg in _STRUCTURAL_KEYWORDS:
            continue
        arithmetic = isinstance(parent, ast.BinOp) and isinstance(parent.op, (ast.Add, ast.Sub, ast.Mult, ast.Div))
        if isinstance(node.value, int) and not arithmetic:
            continue  # integers elsewhere are dims, counts or thresholds
        if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute) \
                and parent.func.attr in _REDUCTIONS:
            continue
        sites.append((node, parent if parent is not None else node))
    return sites


# -- the loss expression ------------------------------------------------------------------------
class _Site:
    """Where the returned loss is built: the expression and how to replace it."""

    def __init__(self, stmt_index: int, get: Callable[[], ast.expr], set_: Callable[[ast.expr], None],
                 name: str | None) -> None:
        self.stmt_index = stmt_index
        self.get = get
        self.set = set_
        #: The returned name when there is no simple assignment to extend.
        self.name = name


def _return_holder(function: ast.FunctionDef) -> tuple[Any, Any] | None:
    body = function.body
    if not body or not isinstance(body[-1], ast.Return) or body[-1].value is None:
        return None
    ret = body[-1]
    if isinstance(ret.value, ast.Tuple) and ret.value.elts:
        return ret.value.elts, 0
    return ret, "value"


def _loss_site(function: ast.FunctionDef) -> _Site | None:
    holder = _return_holder(function)
    if holder is None:
        return None
    container, key = holder

    def get_return() -> ast.expr:
        return container[key] if isinstance(key, int) else getattr(container, key)

    def set_return(value: ast.expr) -> None:
        if isinstance(key, int):
            container[key] = value
        else:
            setattr(container, key, value)

    body = function.body
    expr = get_return()
    if isinstance(expr, ast.Name):
        for index in range(len(body) - 2, -1, -1):
            statement = body[index]
            if expr.id not in _stored(statement):
                continue
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                    and isinstance(statement.targets[0], ast.Name):
                return _Site(index, lambda: statement.value, lambda v: setattr(statement, "value", v), None)
            break
        return _Site(len(body) - 1, get_return, set_return, expr.id)
    return _Site(len(body) - 1, get_return, set_return, None)


def _set_return(function: ast.FunctionDef, value: ast.expr) -> None:
    holder = _return_holder(function)
    container, key = holder  # the inlining step guarantees a final return
    if isinstance(key, int):
        container[key] = value
    else:
        setattr(container, key, value)


def _margin_candidates(function: ast.FunctionDef, before: int, grad: set[str]) -> list[tuple[ast.expr, float]]:
    """Margin-like tensors available before statement ``before``, with preference weights:
    locals named like ``logits`` first, then primitive arguments, then the inputs' combination."""
    params = _params(function)
    data = _data_params(function)
    values = _assigned_values(function)
    defined = set(params) | {"torch", "F", "math"}
    out: list[tuple[ast.expr, float]] = []
    seen: set[int] = set()
    key = _Canonical().keyer(function)

    def add(expr: ast.expr, weight: float) -> None:
        # Compared with locals expanded: `logits` and the inputs' combination are one margin.
        text = key(expr)
        if text in seen or not (_reachable(expr, values) & grad):
            return
        if any(isinstance(n, ast.Compare) for n in ast.walk(expr)):
            return  # booleans are not margins
        seen.add(text)
        out.append((expr, weight))

    for statement in function.body[:before]:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                and isinstance(statement.targets[0], ast.Name):
            name = statement.targets[0].id
            defined.add(name)
            if _NOT_MARGIN_NAME.search(name) or _has_reduction(statement.value) \
                    or any(isinstance(n, ast.Compare) for n in ast.walk(statement.value)):
                continue
            weight = 4.0 if name in _PREFERRED_MARGINS else 2.0 if _MARGIN_NAME.search(name) else 0.5
            add(ast.Name(name, ast.Load()), weight)
        else:
            defined.update(_stored(statement))
    for statement in function.body[: before + 1]:
        for node in ast.walk(statement):
            found = _primitive(node)
            if found is None:
                continue
            argument = found[1]
            if _size(argument) <= 12 and set(_loaded(argument)) <= defined and not _has_reduction(argument):
                add(copy.deepcopy(argument), 2.0)
    if len(data) >= 4:
        combination: ast.expr = ast.BinOp(
            ast.BinOp(ast.Name(data[0], ast.Load()), ast.Sub(), ast.Name(data[1], ast.Load())), ast.Sub(),
            ast.BinOp(ast.Name(data[2], ast.Load()), ast.Sub(), ast.Name(data[3], ast.Load())),
        )
    elif len(data) >= 2:
        combination = ast.BinOp(ast.Name(data[0], ast.Load()), ast.Sub(), ast.Name(data[1], ast.Load()))
    elif data:
        combination = ast.Name(data[0], ast.Load())
    else:
        return out
    add(combination, 1.0)
    return out


def _reaches_reduction(expr: ast.AST, function: ast.FunctionDef) -> bool:
    values = _assigned_values(function)
    return _has_reduction(expr) or any(
        _has_reduction(value) for name in _reachable(expr, values) for value in values.get(name, []))


def _is_reduction(node: ast.AST) -> bool:
    """``x.mean()``-style methods and ``torch.mean(x)``-style functions that reduce the batch."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _REDUCTIONS


def _batched_names(function: ast.FunctionDef) -> set[str]:
    """Inputs and the locals computed per example from them (not through a reduction)."""
    values = _assigned_values(function)
    batched = set(_data_params(function))
    changed = True
    while changed:
        changed = False
        for name, assigned in values.items():
            if name not in batched and any(_is_batched(v, batched) for v in assigned):
                batched.add(name)
                changed = True
    return batched


def _is_batched(expr: ast.AST, batched: set[str]) -> bool:
    if _is_reduction(expr):
        return False
    if isinstance(expr, ast.Name):
        return isinstance(expr.ctx, ast.Load) and expr.id in batched
    return any(_is_batched(child, batched) for child in ast.iter_child_nodes(expr))


def _has_reduction(expr: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _REDUCTIONS
               for n in ast.walk(expr))


# -- sums ---------------------------------------------------------------------------------------
def _is_additive(node: ast.AST) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub))


def _chain_roots(expr: ast.AST) -> list[ast.BinOp]:
    parents = _parents(expr)
    roots = []
    for node in ast.walk(expr):
        if _is_additive(node):
            parent = parents.get(id(node))
            if _is_additive(parent) and parent.left is node:
                continue
            roots.append(node)
    return roots


def _flatten(root: ast.BinOp) -> list[tuple[int, ast.expr]]:
    terms = []
    node: ast.expr = root
    while _is_additive(node):
        terms.append((1 if isinstance(node.op, ast.Add) else -1, node.right))
        node = node.left
    terms.append((1, node))
    terms.reverse()
    return terms


def _rebuild(terms: list[tuple[int, ast.expr]]) -> ast.expr:
    sign, first = terms[0]
    result: ast.expr = first if sign > 0 else ast.UnaryOp(ast.USub(), first)
    for sign, term in terms[1:]:
        result = ast.BinOp(result, ast.Add() if sign > 0 else ast.Sub(), term)
    return result


def _loss_chains(function: ast.FunctionDef) -> list[ast.BinOp]:
    """Sums and differences in the returned loss and in the top-level assignments it reads."""
    site = _loss_site(function)
    if site is None:
        return []
    expr = site.get()
    exprs = [expr]
    wanted = set(_loaded(expr))
    for statement in reversed(function.body[: site.stmt_index]):
        if isinstance(statement, ast.Assign) and set(_stored(statement)) & wanted:
            exprs.append(statement.value)
            wanted |= set(_loaded(statement.value))
    exprs.reverse()
    return [root for e in exprs for root in _chain_roots(e) if len(_flatten(root)) >= 2]


def _weight_constant(term: ast.expr) -> ast.Constant | None:
    """The constant that already scales ``term`` (``2 * x``, ``x * 2``, ``1 / x``, ``3``)."""
    if _is_number(term):
        return term
    if isinstance(term, ast.BinOp) and isinstance(term.op, ast.Mult):
        for side in (term.left, term.right):
            if _is_number(side):
                return side
    if isinstance(term, ast.BinOp) and isinstance(term.op, ast.Div) and _is_number(term.left):
        return term.left
    return None


def _is_number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value != 0


# -- crossover helpers ----------------------------------------------------------------------------
def _rename_second(first: ast.FunctionDef, second: ast.FunctionDef) -> None:
    """Give ``second`` the first parent's parameter names and fresh (``_b``) local names."""
    mapping = dict(zip(_params(second), _params(first)))
    used = _all_names(first) | _all_names(second)
    for name in _local_names(second):
        if name in mapping:
            continue
        fresh = _fresh_name(_BETA_SUFFIX.sub("", name) + "_b", used)
        used.add(fresh)
        mapping[name] = fresh
    for node in ast.walk(second):
        if isinstance(node, ast.Name) and node.id in mapping:
            node.id = mapping[node.id]
        elif isinstance(node, ast.arg) and node.arg in mapping:
            node.arg = mapping[node.arg]


def _local_names(function: ast.FunctionDef) -> list[str]:
    names: list[str] = []
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            candidate = node.id
        elif isinstance(node, ast.arg):
            candidate = node.arg
        else:
            continue
        if candidate not in names:
            names.append(candidate)
    return names


def _reuse_first_definitions(statements: list[ast.stmt], second: ast.FunctionDef) -> None:
    """Drop ``second``'s assignments that recompute a local of ``statements`` (the first
    parent's, already in scope) and read that local instead: ``logits_b = ...`` -> ``logits``."""
    counts_a: dict[str, int] = {}
    for statement in statements:
        for name in _stored(statement):
            counts_a[name] = counts_a.get(name, 0) + 1
    known: dict[str, str] = {}
    for statement in statements:
        target = _single_target(statement)
        if target is not None and counts_a[target] == 1:
            known.setdefault(ast.dump(statement.value), target)
    counts_b: dict[str, int] = {}
    for name in _stored(second):
        counts_b[name] = counts_b.get(name, 0) + 1
    mapping: dict[str, str] = {}
    kept = []
    for statement in second.body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in mapping:
                node.id = mapping[node.id]
        target = _single_target(statement)
        if target is not None and counts_b[target] == 1 and ast.dump(statement.value) in known:
            mapping[target] = known[ast.dump(statement.value)]
            continue
        kept.append(statement)
    second.body = kept


def _single_target(statement: ast.stmt) -> str | None:
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
        return statement.targets[0].id
    return None


def _inline_second(first: ast.FunctionDef, second: ast.FunctionDef) -> tuple[ast.FunctionDef, str, str]:
    """``first`` with ``second``'s statements inlined before its return; both losses bound to
    names, which are returned."""
    if _return_holder(first) is None:
        raise _NotApplicable("the first parent does not end with 'return <loss>'")
    holder = _return_holder(second)
    if holder is None:
        raise _NotApplicable("the second parent does not end with 'return <loss>'")
    if any(isinstance(n, ast.Return) for s in second.body[:-1] for n in ast.walk(s)):
        raise _NotApplicable("the second parent returns early, so its body cannot be inlined")
    _reuse_first_definitions(first.body[:-1], second)
    holder = _return_holder(second)
    container, key = holder
    loss_b = container[key] if isinstance(key, int) else getattr(container, key)
    site = _return_holder(first)
    loss_a = site[0][site[1]] if isinstance(site[1], int) else getattr(site[0], site[1])
    used = _all_names(first) | _all_names(second)
    body = first.body[:-1]
    if isinstance(loss_a, ast.Name):
        name_a = loss_a.id
    else:
        name_a = _fresh_name("losses", used)
        used.add(name_a)
        body.append(ast.Assign(targets=[ast.Name(name_a, ast.Store())], value=loss_a))
    body.extend(second.body[:-1])
    if isinstance(loss_b, ast.Name):
        name_b = loss_b.id
    else:
        name_b = _fresh_name("losses_b", used)
        body.append(ast.Assign(targets=[ast.Name(name_b, ast.Store())], value=loss_b))
    body.append(first.body[-1])
    first.body = body
    return first, name_a, name_b


def _splice_nodes(function: ast.FunctionDef, exclude_loss: bool) -> list[tuple[ast.expr, int]]:
    """Tensor-valued subexpressions with the index of their top-level statement."""
    data = set(_data_params(function))
    varying = _varying(_assigned_values(function), data)
    excluded: set[int] = set()
    site = _loss_site(function)
    if exclude_loss and site is not None:
        excluded.add(id(site.get()))
        excluded.add(id(function.body[-1].value))
    facts = _node_facts(function, varying)
    nodes = []
    for index, statement in enumerate(function.body):
        parents = _parents(statement)
        for node in ast.walk(statement):
            if id(node) in excluded or not isinstance(node, (ast.Call, ast.BinOp, ast.UnaryOp, ast.Name)):
                continue
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                continue
            parent = parents.get(id(node))
            if isinstance(parent, ast.Call) and parent.func is node:
                continue
            if isinstance(parent, ast.Attribute) and isinstance(node, ast.Name) and node.id in ("torch", "F", "math"):
                continue
            if isinstance(node, ast.Name) and node.id in data:
                continue  # a bare input is too small a part to exchange
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _REDUCTIONS:
                continue
            if isinstance(node, ast.BinOp) and not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
                continue
            size, varies = facts[id(node)]
            if size > 40 or not varies:
                continue
            nodes.append((node, index))
    return nodes


def _node_facts(root: ast.AST, varying: set[str]) -> dict[int, tuple[int, bool]]:
    """``id(node) -> (size, reads a name in varying)`` for every node, in one pass."""
    facts: dict[int, tuple[int, bool]] = {}
    skip = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)

    def visit(node: ast.AST) -> tuple[int, bool]:
        size = 0 if isinstance(node, skip) else 1
        varies = isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in varying
        for child in ast.iter_child_nodes(node):
            child_size, child_varies = visit(child)
            size += child_size
            varies = varies or child_varies
        facts[id(node)] = (size, varies)
        return size, varies

    visit(root)
    return facts


class _Canonical:
    """Structural keys of subexpressions with the locals they read expanded to their
    definitions, ``_b`` suffixes removed, and sums and products ordered, so that one
    computation spelled in two parents (``exp(-z)``, ``exp(-beta * x)``) gets one key. Keys are interned integers (linear time, however deeply locals nest); keys
    from keyers of one instance are comparable."""

    def __init__(self) -> None:
        self.table: dict[tuple, int] = {}

    def keyer(self, function: ast.FunctionDef) -> Callable[[ast.AST], int]:
        counts: dict[str, int] = {}
        definitions: dict[str, ast.expr] = {}
        for statement in function.body:
            for name in _stored(statement):
                counts[name] = counts.get(name, 0) + 1
            target = _single_target(statement)
            if target is not None:
                definitions[target] = statement.value
        params = set(_params(function))
        definitions = {k: v for k, v in definitions.items()
                       if counts.get(k) == 1 and k not in params and k not in _loaded(v)}
        names: dict[str, int] = {}
        expanding: set[str] = set()
        table = self.table

        def resolve(node: ast.AST) -> ast.AST:
            """A local assigned once stands for its definition."""
            while isinstance(node, ast.Name) and node.id in definitions and node.id not in expanding:
                node = definitions[node.id]
            return node

        def factors(node: ast.AST) -> tuple[int, list[ast.AST]]:
            node = resolve(node)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                left_sign, left = factors(node.left)
                right_sign, right = factors(node.right)
                return left_sign * right_sign, left + right
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
                sign, inner = factors(node.operand)
                return -sign, inner
            return 1, [node]

        def terms(node: ast.AST, sign: int) -> list[tuple[int, ast.AST]]:
            node = resolve(node)
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
                right_sign = sign if isinstance(node.op, ast.Add) else -sign
                return terms(node.left, sign) + terms(node.right, right_sign)
            return [(sign, node)]

        def product(sign: int, node: ast.AST) -> int:
            # Products are keyed by their sign and sorted factors: -z == -b * x == x * -b.
            inner_sign, parts = factors(node)
            sign *= inner_sign
            if sign == 1 and len(parts) == 1:
                return key(parts[0])
            return table.setdefault(("Mul", sign, *sorted(key(p) for p in parts)), len(table))

        def key(node: Any) -> int:
            if isinstance(node, ast.Name):
                if node.id in definitions and node.id not in expanding:
                    if node.id not in names:
                        expanding.add(node.id)
                        names[node.id] = key(definitions[node.id])
                        expanding.discard(node.id)
                    return names[node.id]
                entry: tuple = ("Name", _BETA_SUFFIX.sub("", node.id))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
                entry = ("Add", *sorted(product(sign, term) for sign, term in terms(node, 1)))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) or \
                    isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
                return product(1, node)
            elif isinstance(node, ast.AST):
                parts: list[Any] = [type(node).__name__]
                for field, value in ast.iter_fields(node):
                    if field == "ctx":
                        continue
                    parts.append(key(value))
                entry = tuple(parts)
            elif isinstance(node, list):
                entry = ("list", *(key(item) for item in node))
            else:
                entry = ("value", type(node).__name__, repr(node))
            return table.setdefault(entry, len(table))

        return key


def _statements_needed(function: ast.FunctionDef, expr: ast.AST) -> list[ast.stmt]:
    """The top-level statements of ``function`` that compute the locals ``expr`` reads."""
    local = set(_local_names(function)) - set(_params(function))
    wanted = set(_loaded(expr)) & local
    chosen: list[int] = []
    for index in range(len(function.body) - 1, -1, -1):
        statement = function.body[index]
        if set(_stored(statement)) & wanted:
            if any(isinstance(n, ast.Return) for n in ast.walk(statement)):
                raise _Skip("the spliced part depends on a statement that returns early")
            chosen.append(index)
            wanted |= set(_loaded(statement)) & local
    return [function.body[i] for i in sorted(chosen)]


def _merge_duplicates(function: ast.FunctionDef) -> None:
    """Compute each value once: a top-level assignment that repeats an earlier one (both
    targets, and every name the value reads, assigned once) becomes a use of the earlier name.
    Crossovers otherwise pile up copies such as ``pi_logratios_b2 = <same as pi_logratios>``."""
    counts: dict[str, int] = {}
    for name in _stored(function):
        counts[name] = counts.get(name, 0) + 1
    seen: dict[str, str] = {}
    mapping: dict[str, str] = {}
    for statement in function.body[:-1]:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in mapping:
                node.id = mapping[node.id]
        target = _single_target(statement)
        if target is None or counts[target] != 1 or any(counts.get(n, 0) > 1 for n in _loaded(statement.value)):
            continue
        dump = ast.dump(statement.value)
        if dump in seen:
            mapping[target] = seen[dump]
        else:
            seen[dump] = target
    for node in ast.walk(function.body[-1]):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in mapping:
            node.id = mapping[node.id]


def _prune_dead_assignments(function: ast.FunctionDef) -> None:
    """Drop top-level assignments whose names are never read (left over after an edit), and
    aliases (``b = a``, both assigned once) in favour of the original name."""
    counts: dict[str, int] = {}
    for name in _stored(function):
        counts[name] = counts.get(name, 0) + 1
    for statement in function.body[:-1]:
        target = _single_target(statement)
        if target is None or counts[target] != 1 or not isinstance(statement.value, ast.Name):
            continue
        source = statement.value.id
        if counts.get(source, 0) > 1 or source == target:
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id == target:
                node.id = source
    changed = True
    while changed:
        changed = False
        loaded = set(_loaded(function))
        for index, statement in enumerate(function.body[:-1]):
            if isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets) \
                    and not {t.id for t in statement.targets} & loaded:
                del function.body[index]
                changed = True
                break


class _Simplifier(ast.NodeTransformer):
    """Sign clean-up left by edits: ``--x`` -> ``x``, ``a + -b`` -> ``a - b``,
    ``a - -c * d`` -> ``a + c * d``."""

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.UnaryOp) \
                and isinstance(node.operand.op, ast.USub):
            return node.operand.operand
        operand = node.operand
        if isinstance(node.op, ast.USub) and isinstance(operand, ast.BinOp) \
                and isinstance(operand.op, (ast.Mult, ast.Div)) and isinstance(operand.left, ast.UnaryOp) \
                and isinstance(operand.left.op, ast.USub):
            return ast.BinOp(operand.left.operand, operand.op, operand.right)
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, (ast.Mult, ast.Div)) and _is_one(node.right):
            return node.left
        if isinstance(node.op, ast.Mult) and _is_one(node.left):
            return node.right
        if isinstance(node.op, ast.Mult) and _is_number(node.left) and isinstance(node.right, ast.BinOp) \
                and isinstance(node.right.op, ast.Mult) and _is_number(node.right.left):
            # c1 * (c2 * x) -> c * x, at the 3 significant digits constants are kept to
            product = _round_significant(node.left.value * node.right.left.value, 3)
            if product != 0:
                return ast.BinOp(ast.Constant(product), ast.Mult(), node.right.right)
        if not isinstance(node.op, (ast.Add, ast.Sub)):
            return node
        flipped: ast.operator = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
        right = node.right
        if isinstance(right, ast.UnaryOp) and isinstance(right.op, ast.USub):
            return ast.BinOp(node.left, flipped, right.operand)
        if isinstance(right, ast.BinOp) and isinstance(right.op, (ast.Mult, ast.Div)) \
                and isinstance(right.left, ast.UnaryOp) and isinstance(right.left.op, ast.USub):
            return ast.BinOp(node.left, flipped, ast.BinOp(right.left.operand, right.op, right.right))
        return node


def _is_one(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value == 1


def _tidy_names(function: ast.FunctionDef) -> None:
    """Renumber ``_b`` suffixes so that names stay short after many crossovers
    (``logits_b7`` -> ``logits_b`` when that is free). Names only: the code hash is unchanged."""
    params = set(_params(function))
    ordered: list[str] = []
    for statement in function.body:
        for node in ast.walk(statement):
            name = node.id if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) else \
                node.arg if isinstance(node, ast.arg) else None
            if name is not None and name not in params and name not in ordered:
                ordered.append(name)
    if not any(_BETA_SUFFIX.search(name) for name in ordered):
        return
    taken = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)} - set(ordered)
    taken |= params | {function.name}
    mapping: dict[str, str] = {}
    for name in ordered:
        base = _BETA_SUFFIX.sub("", name)
        fresh = base
        index = 1
        while fresh in taken:
            fresh = f"{base}_b" if index == 1 else f"{base}_b{index}"
            index += 1
        taken.add(fresh)
        mapping[name] = fresh
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and node.id in mapping:
            node.id = mapping[node.id]
        elif isinstance(node, ast.arg) and node.arg in mapping:
            node.arg = mapping[node.arg]
