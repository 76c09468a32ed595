"""Helpers on the syntax trees of genomes shared by the symbolic operator's modules: parsing and
rendering, names, data flow between locals, beta, structural keys, seeded randomness, and the
two ways one attempt at a variation fails (:class:`Skip`, :class:`NotApplicable`)."""
from __future__ import annotations

import ast
import math
import random
import re
from typing import Any
from collections.abc import Callable

from engine.genome import GenomeError, code_hash, parse_genome
from operators.base import OperatorError


# -- attempts ---------------------------------------------------------------------------------
class Skip(Exception):
    """One attempt of one kind failed; the reason is kept for the final error message."""


class NotApplicable(Exception):
    """A kind has nothing to act on in this genome; other kinds are tried."""


# -- randomness and numbers -------------------------------------------------------------------
def weighted_pick(rng: random.Random, items: list[tuple[Any, float]]) -> Any:
    total = sum(weight for _, weight in items)
    point = rng.random() * total
    for item, weight in items:
        point -= weight
        if point < 0:
            return item
    return items[-1][0]


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def tag_number(value: float) -> str:
    return f"{abs(value):g}".replace(".", "p").replace("-", "m").replace("+", "")


def is_number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value != 0


# -- parsing and rendering --------------------------------------------------------------------
def parse_function(code: str, label: str) -> ast.FunctionDef:
    try:
        _, function = parse_genome(code)
    except GenomeError as exc:
        raise OperatorError(f"cannot parse genome {label!r}: {exc}") from exc
    return function


def safe_hash(code: str) -> str:
    try:
        return code_hash(code)
    except GenomeError:
        return ""


def render(function: ast.FunctionDef, name: str) -> str:
    original, function.name = function.name, name
    ast.fix_missing_locations(function)  # unparse reads the line numbers of assignments
    try:
        return ast.unparse(ast.Module(body=[function], type_ignores=[])) + "\n"
    finally:
        function.name = original


def strip_docstring(function: ast.FunctionDef) -> ast.FunctionDef:
    # A parent's docstring no longer describes its offspring.
    body = function.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        function.body = body[1:]
    return function


def node_count(node: ast.AST) -> int:
    skip = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
    return sum(1 for n in ast.walk(node) if not isinstance(n, skip))


def snippet(node: ast.AST, limit: int = 60) -> str:
    text = ast.unparse(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- tree helpers -----------------------------------------------------------------------------
def walk_body(function: ast.FunctionDef):
    for statement in function.body:
        yield from ast.walk(statement)


def parent_map(root: ast.AST) -> dict[int, ast.AST]:
    return {id(child): parent for parent in ast.walk(root) for child in ast.iter_child_nodes(parent)}


def replace_node(root: ast.AST, old: ast.AST, new: ast.AST) -> None:
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


def param_names(function: ast.FunctionDef) -> list[str]:
    return [a.arg for a in function.args.posonlyargs + function.args.args]


def data_params(function: ast.FunctionDef) -> list[str]:
    params = param_names(function)
    return params[1:] if params and params[0] == "self" else params


def loaded_names(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]


def stored_names(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))]


def all_names(function: ast.FunctionDef) -> set[str]:
    names = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
    return names | {a.arg for a in ast.walk(function) if isinstance(a, ast.arg)} | {function.name}


def fresh_name(base: str, used: set[str]) -> str:
    if base not in used:
        return base
    index = 2
    while f"{base}{index}" in used:
        index += 1
    return f"{base}{index}"


def single_target(statement: ast.stmt) -> str | None:
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
        return statement.targets[0].id
    return None


# -- data flow --------------------------------------------------------------------------------
def assigned_values(function: ast.FunctionDef) -> dict[str, list[ast.AST]]:
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
            for name in stored_names(target):
                values.setdefault(name, []).append(value)
    return values


def reachable(expr: ast.AST, values: dict[str, list[ast.AST]]) -> set[str]:
    """Names ``expr`` reads, directly or through the locals it reads."""
    seen: set[str] = set()
    stack = loaded_names(expr)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for value in values.get(name, []):
            stack.extend(loaded_names(value))
    return seen


def varying_names(values: dict[str, list[ast.AST]], roots: set[str]) -> set[str]:
    """``roots`` and every local whose value depends on them."""
    varying = set(roots)
    changed = True
    while changed:
        changed = False
        for name, assigned in values.items():
            if name not in varying and any(set(loaded_names(v)) & varying for v in assigned):
                varying.add(name)
                changed = True
    return varying


# -- beta -------------------------------------------------------------------------------------
def beta_expression(function: ast.FunctionDef) -> ast.expr | None:
    for node in walk_body(function):
        if isinstance(node, ast.Attribute) and node.attr == "beta" and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            return ast.Attribute(ast.Name("self", ast.Load()), "beta", ast.Load())
    if "beta" in param_names(function):
        return ast.Name("beta", ast.Load())
    return None


def is_beta(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "beta" and isinstance(node.value, ast.Name)
            and node.value.id == "self") or (isinstance(node, ast.Name) and node.id == "beta")


def mentions_beta(expr: ast.AST, function: ast.FunctionDef) -> bool:
    """Whether ``expr`` is already scaled by beta, directly or through the locals it reads."""
    if any(is_beta(n) for n in ast.walk(expr)):
        return True
    values = assigned_values(function)
    for name in reachable(expr, values):
        for value in values.get(name, []):
            if any(is_beta(n) for n in ast.walk(value)):
                return True
    return False


# -- structural keys --------------------------------------------------------------------------
#: The suffix crossovers give the second parent's locals (``logits_b``, ``logits_b2``).
SECOND_PARENT_SUFFIX = re.compile(r"_b\d*$")


class Canonical:
    """Structural keys of subexpressions with the locals they read expanded to their
    definitions, ``_b`` suffixes removed, and sums and products ordered, so that one
    computation spelled in two parents (``exp(-z)``, ``exp(-beta * x)``) gets one key. Keys
    are interned integers (linear time, however deeply locals nest); keys from keyers of one
    instance are comparable."""

    def __init__(self) -> None:
        self.table: dict[tuple, int] = {}

    def keyer(self, function: ast.FunctionDef) -> Callable[[ast.AST], int]:
        counts: dict[str, int] = {}
        definitions: dict[str, ast.expr] = {}
        for statement in function.body:
            for name in stored_names(statement):
                counts[name] = counts.get(name, 0) + 1
            target = single_target(statement)
            if target is not None:
                definitions[target] = statement.value
        params = set(param_names(function))
        definitions = {k: v for k, v in definitions.items()
                       if counts.get(k) == 1 and k not in params and k not in loaded_names(v)}
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
                entry: tuple = ("Name", SECOND_PARENT_SUFFIX.sub("", node.id))
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
