"""Where a loss can be varied: its swappable primitives, the constants that act as weights, the
returned loss expression, margin-like tensors in scope, batch reductions, and sums of terms."""
from __future__ import annotations

import ast
import copy
import math
import re
from typing import Any
from collections.abc import Callable

from operators.symbolic.ast_helpers import (
    Canonical, assigned_values, data_params, is_number, loaded_names, node_count, param_names, parent_map,
    reachable, stored_names, walk_body,
)

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
INCREASING = {"softplus", "exp", "sigmoid", "tanh", "relu"}

#: Keyword arguments whose integer values are structure, not weights.
_STRUCTURAL_KEYWORDS = {"dim", "axis", "keepdim", "dtype", "diagonal", "p", "correction", "unbiased"}
#: Method calls that reduce over the batch: never a per-example margin or a splice partner.
REDUCTIONS = {"mean", "sum", "std", "var", "max", "min", "norm", "median", "logsumexp", "numel",
               "item", "amax", "amin", "prod", "size", "quantile", "nanmean", "count_nonzero"}
_PREFERRED_MARGINS = {"logits", "margin", "margins", "rho", "z"}
_MARGIN_NAME = re.compile(r"logit|margin|rho|ratio|diff|delta|adv|reward|score|^[zuxdh]$")
_NOT_MARGIN_NAME = re.compile(r"loss|gate|weight|blend|modulation|mask|mismatch|correct|^is_|^g$|^w$")


# -- primitives -------------------------------------------------------------------------------
def _module_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name) and node.id in ("torch", "F"):
        return node.id
    if isinstance(node, ast.Attribute) and node.attr == "functional" and isinstance(node.value, ast.Attribute) \
            and node.value.attr == "nn" and isinstance(node.value.value, ast.Name) \
            and node.value.value.id == "torch":
        return "F"
    return None


def as_primitive(node: ast.AST) -> tuple[str, ast.expr] | None:
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


def spelling(key: str) -> str:
    return f"{PRIMITIVES[key][0]}.{key}"


def primitive_call(key: str, argument: ast.expr) -> ast.Call:
    module = PRIMITIVES[key][0]
    return ast.Call(ast.Attribute(ast.Name(module, ast.Load()), key, ast.Load()), [argument], [])


def negated(expr: ast.expr) -> ast.expr:
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


def scaled_margin(margin: ast.expr, beta: ast.expr | None, negate: bool) -> ast.expr:
    if beta is None:
        return ast.UnaryOp(ast.USub(), margin) if negate else margin
    factor = ast.UnaryOp(ast.USub(), copy.deepcopy(beta)) if negate else copy.deepcopy(beta)
    return ast.BinOp(factor, ast.Mult(), margin)


# -- constants --------------------------------------------------------------------------------
def constant_sites(function: ast.FunctionDef) -> list[tuple[ast.Constant, ast.AST]]:
    """Numeric constants that act as weights, with the node to quote in the thought."""
    parents = parent_map(function)
    in_slices = {id(n) for s in walk_body(function) if isinstance(s, ast.Subscript) for n in ast.walk(s.slice)}
    sites = []
    for node in walk_body(function):
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
                and parent.func.attr in REDUCTIONS:
            continue
        sites.append((node, parent if parent is not None else node))
    return sites


# -- the loss expression ----------------------------------------------------------------------
class LossSite:
    """Where the returned loss is built: the expression and how to replace it."""

    def __init__(self, stmt_index: int, get: Callable[[], ast.expr], set_: Callable[[ast.expr], None],
                 name: str | None) -> None:
        self.stmt_index = stmt_index
        self.get = get
        self.set = set_
        #: The returned name when there is no simple assignment to extend.
        self.name = name


def return_holder(function: ast.FunctionDef) -> tuple[Any, Any] | None:
    body = function.body
    if not body or not isinstance(body[-1], ast.Return) or body[-1].value is None:
        return None
    ret = body[-1]
    if isinstance(ret.value, ast.Tuple) and ret.value.elts:
        return ret.value.elts, 0
    return ret, "value"


def loss_site(function: ast.FunctionDef) -> LossSite | None:
    holder = return_holder(function)
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
            if expr.id not in stored_names(statement):
                continue
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                    and isinstance(statement.targets[0], ast.Name):
                # Returned within this iteration, so the lambdas see this statement.
                return LossSite(index, lambda: statement.value,  # noqa: B023
                                lambda v: setattr(statement, "value", v), None)  # noqa: B023
            break
        return LossSite(len(body) - 1, get_return, set_return, expr.id)
    return LossSite(len(body) - 1, get_return, set_return, None)


def set_loss(function: ast.FunctionDef, value: ast.expr) -> None:
    holder = return_holder(function)
    container, key = holder  # the inlining step guarantees a final return
    if isinstance(key, int):
        container[key] = value
    else:
        setattr(container, key, value)


def margin_candidates(function: ast.FunctionDef, before: int, grad: set[str]) -> list[tuple[ast.expr, float]]:
    """Margin-like tensors available before statement ``before``, with preference weights:
    locals named like ``logits`` first, then primitive arguments, then the inputs' combination."""
    params = param_names(function)
    data = data_params(function)
    values = assigned_values(function)
    defined = set(params) | {"torch", "F", "math"}
    out: list[tuple[ast.expr, float]] = []
    seen: set[int] = set()
    key = Canonical().keyer(function)

    def add(expr: ast.expr, weight: float) -> None:
        # Compared with locals expanded: `logits` and the inputs' combination are one margin.
        text = key(expr)
        if text in seen or not (reachable(expr, values) & grad):
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
            if _NOT_MARGIN_NAME.search(name) or has_reduction(statement.value) \
                    or any(isinstance(n, ast.Compare) for n in ast.walk(statement.value)):
                continue
            weight = 4.0 if name in _PREFERRED_MARGINS else 2.0 if _MARGIN_NAME.search(name) else 0.5
            add(ast.Name(name, ast.Load()), weight)
        else:
            defined.update(stored_names(statement))
    for statement in function.body[: before + 1]:
        for node in ast.walk(statement):
            found = as_primitive(node)
            if found is None:
                continue
            argument = found[1]
            if node_count(argument) <= 12 and set(loaded_names(argument)) <= defined and not has_reduction(argument):
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


def reaches_reduction(expr: ast.AST, function: ast.FunctionDef) -> bool:
    values = assigned_values(function)
    return has_reduction(expr) or any(
        has_reduction(value) for name in reachable(expr, values) for value in values.get(name, []))


def is_reduction(node: ast.AST) -> bool:
    """``x.mean()``-style methods and ``torch.mean(x)``-style functions that reduce the batch."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in REDUCTIONS


def batched_names(function: ast.FunctionDef) -> set[str]:
    """Inputs and the locals computed per example from them (not through a reduction)."""
    values = assigned_values(function)
    batched = set(data_params(function))
    changed = True
    while changed:
        changed = False
        for name, assigned in values.items():
            if name not in batched and any(is_batched(v, batched) for v in assigned):
                batched.add(name)
                changed = True
    return batched


def is_batched(expr: ast.AST, batched: set[str]) -> bool:
    if is_reduction(expr):
        return False
    if isinstance(expr, ast.Name):
        return isinstance(expr.ctx, ast.Load) and expr.id in batched
    return any(is_batched(child, batched) for child in ast.iter_child_nodes(expr))


def has_reduction(expr: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in REDUCTIONS
               for n in ast.walk(expr))


# -- sums -------------------------------------------------------------------------------------
def _is_additive(node: ast.AST) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub))


def _chain_roots(expr: ast.AST) -> list[ast.BinOp]:
    parents = parent_map(expr)
    roots = []
    for node in ast.walk(expr):
        if _is_additive(node):
            parent = parents.get(id(node))
            if _is_additive(parent) and parent.left is node:
                continue
            roots.append(node)
    return roots


def flatten_sum(root: ast.BinOp) -> list[tuple[int, ast.expr]]:
    terms = []
    node: ast.expr = root
    while _is_additive(node):
        terms.append((1 if isinstance(node.op, ast.Add) else -1, node.right))
        node = node.left
    terms.append((1, node))
    terms.reverse()
    return terms


def rebuild_sum(terms: list[tuple[int, ast.expr]]) -> ast.expr:
    sign, first = terms[0]
    result: ast.expr = first if sign > 0 else ast.UnaryOp(ast.USub(), first)
    for sign, term in terms[1:]:
        result = ast.BinOp(result, ast.Add() if sign > 0 else ast.Sub(), term)
    return result


def loss_chains(function: ast.FunctionDef) -> list[ast.BinOp]:
    """Sums and differences in the returned loss and in the top-level assignments it reads."""
    site = loss_site(function)
    if site is None:
        return []
    expr = site.get()
    exprs = [expr]
    wanted = set(loaded_names(expr))
    for statement in reversed(function.body[: site.stmt_index]):
        if isinstance(statement, ast.Assign) and set(stored_names(statement)) & wanted:
            exprs.append(statement.value)
            wanted |= set(loaded_names(statement.value))
    exprs.reverse()
    return [root for e in exprs for root in _chain_roots(e) if len(flatten_sum(root)) >= 2]


def weight_constant(term: ast.expr) -> ast.Constant | None:
    """The constant that already scales ``term`` (``2 * x``, ``x * 2``, ``1 / x``, ``3``)."""
    if is_number(term):
        return term
    if isinstance(term, ast.BinOp) and isinstance(term.op, ast.Mult):
        for side in (term.left, term.right):
            if is_number(side):
                return side
    if isinstance(term, ast.BinOp) and isinstance(term.op, ast.Div) and is_number(term.left):
        return term.left
    return None
