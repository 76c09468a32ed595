"""Simplification and liveness of offspring: :func:`tidy` removes what edits leave behind,
:func:`loss_depends_on` checks statically that the loss still carries a gradient to its inputs."""
from __future__ import annotations

import ast

from engine.helpers import round_significant
from operators.symbolic.ast_helpers import (
    SECOND_PARENT_SUFFIX, assigned_values, data_params, is_beta, is_number, loaded_names, param_names, reachable,
    single_target, stored_names, varying_names, walk_body,
)

#: Methods whose result carries no gradient.
_DETACHING = {"detach", "item", "sign", "round", "floor", "ceil", "bool", "long", "int", "numel", "size"}


# -- liveness ---------------------------------------------------------------------------------
def loss_depends_on(function: ast.FunctionDef, grad: set[str], beta: float | None = None) -> bool:
    """Whether a returned loss can carry a gradient to ``grad``: it reads them, and not only
    through linear combinations in which they cancel (``(pc - pr) - (pc - pr)``). ``beta``,
    when known, is the value of ``self.beta`` (cancellations such as ``pc - z / 0.05`` with
    ``z = beta * pc`` depend on it)."""
    values = assigned_values(function)
    returns = [n for n in walk_body(function) if isinstance(n, ast.Return) and n.value is not None]
    live = _Liveness(function, grad, values, beta)
    for node in returns:
        value = node.value
        if isinstance(value, ast.Tuple) and value.elts:
            value = value.elts[0]
        if reachable(value, values) & grad and live.live(value):
            return True
    return False


class _Liveness:
    """A static test for gradients cancelled by linear algebra. Locals assigned exactly once
    at the top level are expanded; anything else counts as live when it reads ``grad``."""

    def __init__(self, function: ast.FunctionDef, grad: set[str], values: dict[str, list[ast.AST]],
                 beta: float | None = None) -> None:
        self.grad = grad
        self.beta = beta
        self.params = set(data_params(function))
        self.values = values
        self.definitions: dict[str, ast.expr] = {}
        for statement in function.body:
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                    and isinstance(statement.targets[0], ast.Name) \
                    and len(values.get(statement.targets[0].id, [])) == 1:
                self.definitions[statement.targets[0].id] = statement.value
        self.expanding: set[str] = set()
        # Names whose value depends on a parameter (the rest are constants such as tau).
        self.varying = varying_names(values, self.params)
        self._read_cache: dict[int, set[str]] = {}

    def _reads(self, node: ast.AST) -> set[str]:
        """Names ``node`` reads, memoised: the walk is repeated for every sub-expression."""
        # Keyed by id(): every node stays alive (held by the function) while this object is used.
        key = id(node)
        if key not in self._read_cache:
            self._read_cache[key] = set(loaded_names(node))
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
        if self.beta is not None and is_beta(node):
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


# -- tidying ----------------------------------------------------------------------------------
def tidy(function: ast.FunctionDef) -> None:
    """Tidy an offspring in place: duplicate and dead assignments removed, signs and unit
    factors simplified (``--x``, ``a + -b``, ``1 * x``, ``2 * (3 * x)``), ``_b`` suffixes renumbered."""
    _merge_duplicates(function)
    _prune_dead_assignments(function)
    function.body = [_Simplifier().visit(statement) for statement in function.body]
    _tidy_names(function)


def _merge_duplicates(function: ast.FunctionDef) -> None:
    """Compute each value once: a top-level assignment that repeats an earlier one (both
    targets, and every name the value reads, assigned once) becomes a use of the earlier name.
    Crossovers otherwise pile up copies such as ``pi_logratios_b2 = <same as pi_logratios>``."""
    counts: dict[str, int] = {}
    for name in stored_names(function):
        counts[name] = counts.get(name, 0) + 1
    seen: dict[str, str] = {}
    mapping: dict[str, str] = {}
    for statement in function.body[:-1]:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in mapping:
                node.id = mapping[node.id]
        target = single_target(statement)
        if target is None or counts[target] != 1 or any(counts.get(n, 0) > 1 for n in loaded_names(statement.value)):
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
    for name in stored_names(function):
        counts[name] = counts.get(name, 0) + 1
    for statement in function.body[:-1]:
        target = single_target(statement)
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
        loaded = set(loaded_names(function))
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
        if isinstance(node.op, ast.Mult) and is_number(node.left) and isinstance(node.right, ast.BinOp) \
                and isinstance(node.right.op, ast.Mult) and is_number(node.right.left):
            # c1 * (c2 * x) -> c * x, at the 3 significant digits constants are kept to
            product = round_significant(node.left.value * node.right.left.value, 3)
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
    params = set(param_names(function))
    ordered: list[str] = []
    for statement in function.body:
        for node in ast.walk(statement):
            name = node.id if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) else \
                node.arg if isinstance(node, ast.arg) else None
            if name is not None and name not in params and name not in ordered:
                ordered.append(name)
    if not any(SECOND_PARENT_SUFFIX.search(name) for name in ordered):
        return
    taken = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)} - set(ordered)
    taken |= params | {function.name}
    mapping: dict[str, str] = {}
    for name in ordered:
        base = SECOND_PARENT_SUFFIX.sub("", name)
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
