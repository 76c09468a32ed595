"""Mutations of the symbolic operator (one per call, drawn with the context's seeded RNG).

Each takes a copy of the parent's function, edits it in place and returns a name tag and a
thought; it raises :class:`~operators.symbolic.ast_helpers.NotApplicable` when the genome has
nothing it can act on and :class:`~operators.symbolic.ast_helpers.Skip` when one attempt failed.

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
- ``tune``: a small parametric move of one primitive: its argument scaled by a factor near 1
  (``prim(c * x)``) or shifted by a small offset (``prim(x - s)``: for ``-F.logsigmoid(z)`` a
  target margin, as in ODPO, Amini et al. 2024). A constant already in that place is adjusted
  instead of stacking another. Unlike ``constant`` it applies to a loss without constants
  (DPO itself), so the search can move in small steps around the baseline; on pref-suite's
  meta-train tasks DPO's best neighbours are such moves (a margin of 0.25, a scale of 0.8).
"""
from __future__ import annotations

import ast
import copy
import math
import random

from engine.helpers import round_significant
from operators.symbolic.ast_helpers import (
    NotApplicable, Skip, assigned_values, beta_expression, data_params, is_number, loaded_names, log_uniform,
    mentions_beta, parent_map, replace_node, snippet, tag_number, varying_names, walk_body, weighted_pick,
)
from operators.symbolic.sites import (
    INCREASING, PRIMITIVES, as_primitive, constant_sites, flatten_sum, loss_chains, loss_site, margin_candidates,
    negated, primitive_call, reaches_reduction, rebuild_sum, scaled_margin, spelling, weight_constant,
)

#: Mutation kinds, in the order their weights are listed.
MUTATIONS = ("constant", "swap", "add_term", "drop_term", "reweight", "tune")


def perturb_constant(work: ast.FunctionDef, rng: random.Random, grad: set[str],
                     factor_range: tuple[float, float]) -> tuple[str, str]:
    """``constant``: scale one weight constant by a log-uniform factor from ``factor_range``."""
    sites = constant_sites(work)
    if not sites:
        raise NotApplicable("no numeric constant that is a weight (exponents and indices are kept)")
    node, holder = rng.choice(sites)
    old = node.value
    low, high = factor_range
    for _ in range(10):
        new = round_significant(old * log_uniform(rng, low, high), 3)
        if new != old and new != 0:
            break
    else:
        raise Skip(f"the constant {old!r} did not change after rounding")
    node.value = float(new)
    direction = "larger" if abs(new) > abs(old) else "smaller"
    thought = (
        f"Changed the constant {old:g} to {new:g} in `{snippet(holder)}` to test whether a "
        f"{direction} value works better."
    )
    return f"c{tag_number(new)}", thought


def swap_primitive(work: ast.FunctionDef, rng: random.Random, grad: set[str]) -> tuple[str, str]:
    """``swap``: replace one elementwise primitive by another, keeping the penalty's direction."""
    sites = [(node, *as_primitive(node)) for node in walk_body(work) if as_primitive(node) is not None]
    if not sites:
        raise NotApplicable("no call of " + ", ".join(spelling(k) for k in PRIMITIVES))
    node, key, argument = rng.choice(sites)
    spelled = "x ** 2" if isinstance(node, ast.BinOp) else spelling(key)
    # Read the site as a penalty of a violation y: -logsigmoid(x) is softplus(-x), so its
    # violation is -x; an increasing primitive's violation is its argument. Rewriting the
    # penalty (not just the name) keeps the loss pointing the same way: -logsigmoid(z)
    # becomes relu(-z), not -relu(z).
    parent = parent_map(work).get(id(node))
    site: ast.AST = node
    violation = argument
    if key == "logsigmoid" and isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.USub):
        site, violation = parent, negated(argument)
    elif key == "logsigmoid":
        violation = None  # a bare logsigmoid: swap literally
    targets = [k for k in PRIMITIVES if k != key]
    exp_argument = violation if violation is not None else argument
    if "exp" in targets and (beta_expression(work) is not None and not mentions_beta(exp_argument, work)
                             or reaches_reduction(exp_argument, work)):
        targets.remove("exp")  # exp of an unscaled log-ratio or a batch variance overflows
    new_key = rng.choice(targets)
    before = snippet(site)
    if violation is None:
        replacement: ast.expr = primitive_call(new_key, copy.deepcopy(argument))
    elif new_key == "logsigmoid":
        replacement = ast.UnaryOp(ast.USub(), primitive_call("logsigmoid", negated(copy.deepcopy(violation))))
    else:
        replacement = primitive_call(new_key, copy.deepcopy(violation))
    replace_node(work, site, replacement)
    thought = (
        f"Swapped {spelled} for {spelling(new_key)} in `{before}` to get "
        f"{PRIMITIVES[new_key][1]}."
    )
    return new_key, thought


def add_term(work: ast.FunctionDef, rng: random.Random, grad: set[str],
             term_weight: tuple[float, float]) -> tuple[str, str]:
    """``add_term``: add ``c * prim(+-beta * v)`` to the loss, ``c`` log-uniform in ``term_weight``."""
    site = loss_site(work)
    if site is None:
        raise NotApplicable("the function does not end with 'return <loss>'")
    candidates = margin_candidates(work, site.stmt_index, grad)
    if not candidates:
        raise NotApplicable("no tensor in scope to build a term from")
    margin = copy.deepcopy(weighted_pick(rng, candidates))
    beta = beta_expression(work)
    scaled = beta is not None and not mentions_beta(margin, work)
    choices = list(PRIMITIVES) if (beta is not None) else [k for k in PRIMITIVES if k != "exp"]
    key = rng.choice(choices)
    # Penalise wrong margins most of the time, explore the other direction sometimes.
    negate = (key in INCREASING) == (rng.random() < 0.75)
    if key in ("square", "abs"):
        negate = False
    argument = scaled_margin(margin, beta if scaled else None, negate)
    weight = round_significant(log_uniform(rng, *term_weight), 2)
    call = primitive_call(key, argument)
    if any(ast.dump(n) == ast.dump(call) for n in walk_body(work) if isinstance(n, ast.Call)):
        raise Skip(f"`{ast.unparse(call)}` is already part of the loss")
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


def drop_term(work: ast.FunctionDef, rng: random.Random, grad: set[str]) -> tuple[str, str]:
    """``drop_term``: remove one term of a sum in the loss or in an assignment feeding it."""
    chains = loss_chains(work)
    if not chains:
        raise NotApplicable("no sum or difference in the loss or the assignments feeding it")
    root = rng.choice(chains)
    terms = flatten_sum(root)
    # Keep a sum that varied with the inputs varying: relu(1 - z) must not become relu(1).
    varying = varying_names(assigned_values(work), set(data_params(work)))
    varies = [bool(set(loaded_names(term)) & varying) for _, term in terms]
    choices = [i for i in range(len(terms)) if not any(varies) or any(varies[:i] + varies[i + 1:])]
    if not choices:
        raise Skip(f"every term of `{snippet(root)}` but one is constant")
    index = rng.choice(choices)
    dropped = terms[index][1]
    text, dropped_text = snippet(root), snippet(dropped)
    replace_node(work, root, rebuild_sum(terms[:index] + terms[index + 1:]))
    thought = (
        f"Dropped `{dropped_text}` from `{text}` to test whether the loss works without it "
        "(a simpler loss is often more robust)."
    )
    return "drop", thought


def reweight(work: ast.FunctionDef, rng: random.Random, grad: set[str],
             factor_range: tuple[float, float]) -> tuple[str, str]:
    """``reweight``: multiply one term of such a sum by a factor from ``factor_range``."""
    chains = loss_chains(work)
    if not chains:
        raise NotApplicable("no sum or difference in the loss or the assignments feeding it")
    root = rng.choice(chains)
    terms = flatten_sum(root)
    index = rng.randrange(len(terms))
    sign, term = terms[index]
    factor = _noticeable_factor(rng, factor_range, 1.15,
                                "reweight_factor range is too narrow to change a term noticeably")
    text, term_text = snippet(root), snippet(term)
    constant = weight_constant(term)
    if constant is not None:
        constant.value = float(round_significant(constant.value * factor, 3))
        new_term = term
    elif isinstance(term, ast.UnaryOp) and isinstance(term.op, ast.USub):
        new_term = ast.BinOp(ast.UnaryOp(ast.USub(), ast.Constant(factor)), ast.Mult(), term.operand)
    else:
        new_term = ast.BinOp(ast.Constant(factor), ast.Mult(), term)
    terms[index] = (sign, new_term)
    replace_node(work, root, rebuild_sum(terms))
    thought = (
        f"Re-weighted `{term_text}` by {factor:g} in `{text}`, shifting the balance between "
        "the terms of the sum."
    )
    return f"w{tag_number(factor)}", thought


def _affine_parts(argument: ast.expr) -> tuple[float, ast.expr, float]:
    """``argument`` read as ``scale * inner + offset`` (numbers where it has them, else 1 and 0)."""
    scale, inner, offset = 1.0, argument, 0.0
    if isinstance(inner, ast.BinOp) and isinstance(inner.op, (ast.Add, ast.Sub)) and is_number(inner.right):
        offset = inner.right.value if isinstance(inner.op, ast.Add) else -inner.right.value
        inner = inner.left
    if isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Mult) and is_number(inner.left):
        scale, inner = inner.left.value, inner.right
    return float(scale), inner, float(offset)


def _affine(scale: float, inner: ast.expr, offset: float) -> ast.expr:
    expr = inner if scale == 1 else ast.BinOp(ast.Constant(scale), ast.Mult(), inner)
    if offset:
        expr = ast.BinOp(expr, ast.Add() if offset > 0 else ast.Sub(), ast.Constant(abs(offset)))
    return expr


def tune_argument(work: ast.FunctionDef, rng: random.Random, grad: set[str],
                  scale_range: tuple[float, float], shift_range: tuple[float, float]) -> tuple[str, str]:
    """``tune``: scale one primitive's argument by a factor from ``scale_range`` (at least 5%
    away from 1) or shift it by an offset of magnitude in ``shift_range`` (either sign). The
    argument is kept in the form ``a * x + b``: repeated tunes adjust ``a`` and ``b``."""
    varying = varying_names(assigned_values(work), set(data_params(work)))
    sites = [(node, argument) for node in walk_body(work) if (found := as_primitive(node)) is not None
             for argument in (found[1],) if set(loaded_names(argument)) & varying]
    if not sites:
        raise NotApplicable("no primitive whose argument varies with the inputs")
    node, argument = rng.choice(sites)
    before = snippet(node)
    scale, inner, offset = _affine_parts(argument)
    if rng.random() < 0.5:
        factor = _noticeable_factor(rng, scale_range, 1.05, "tune_scale is too narrow to change an argument noticeably")
        scale, offset = round_significant(scale * factor, 3), round_significant(offset * factor, 3)
        tag, what = f"s{tag_number(factor)}", f"scaled its argument by {factor:g}"
    else:
        shift = round_significant(rng.uniform(*shift_range), 2) * rng.choice((-1.0, 1.0))
        if shift == 0:
            raise Skip("tune_shift drew an offset of 0")
        offset = round_significant(offset + shift, 3, zero_below=1e-9)
        tag, what = f"o{tag_number(shift)}", f"shifted its argument by {shift:+g}"
    replace_node(work, argument, _affine(scale, inner, offset))
    thought = f"Tuned `{before}`: {what}, a small move to test whether a nearby loss does better."
    return tag, thought


def _noticeable_factor(rng: random.Random, factor_range: tuple[float, float], at_least: float, narrow: str) -> float:
    """A log-uniform factor from ``factor_range`` (two significant digits) that moves a value by
    at least the ratio ``at_least`` either way; ten draws, then :class:`Skip` with ``narrow``."""
    low, high = factor_range
    for _ in range(10):
        factor = round_significant(log_uniform(rng, low, high), 2)
        if abs(math.log(factor)) >= math.log(at_least):
            return factor
    raise Skip(narrow)
