"""Crossovers of the symbolic operator.

The operator first renames the second parent (:func:`rename_second`: parameters renamed
positionally to the first parent's, locals suffixed ``_b``); ``blend`` and ``gate`` then inline
its body into the first and return a combination of the two losses: ``blend`` a convex
combination, ``gate`` (the DiscoPOP/LRML idea of Lu et al. 2024, arXiv:2406.08414) a sigmoid of
the margin that switches between the two losses. ``splice`` replaces one subexpression of the
first parent by one of the second that the first lacks, with the statements it needs.
"""
from __future__ import annotations

import ast
import copy
import random

from engine.helpers import round_significant
from operators.symbolic.ast_helpers import (
    SECOND_PARENT_SUFFIX, Canonical, NotApplicable, Skip, all_names, assigned_values, data_params, fresh_name,
    loaded_names, log_uniform, node_count, param_names, parent_map, replace_node, single_target,
    snippet, stored_names, varying_names, weighted_pick,
)
from operators.symbolic.sites import (
    REDUCTIONS, batched_names, is_batched, loss_site, margin_candidates, primitive_call, return_holder, set_loss,
)

#: Crossover kinds.
CROSSOVERS = ("blend", "gate", "splice")


def blend(fa: ast.FunctionDef, fb: ast.FunctionDef, name_a: str, name_b: str, rng: random.Random, grad: set[str],
          weight_range: tuple[float, float], max_nodes: int) -> tuple[ast.FunctionDef, str]:
    """``blend``: ``w * first + (1 - w) * second``, ``w`` uniform in ``weight_range``."""
    _check_room(fa, fb, max_nodes)
    work, loss_a, loss_b = _inline_second(fa, fb)
    weight = round(rng.uniform(*weight_range), 2)
    combined = ast.BinOp(
        ast.BinOp(ast.Constant(weight), ast.Mult(), ast.Name(loss_a, ast.Load())), ast.Add(),
        ast.BinOp(ast.Constant(round(1 - weight, 2)), ast.Mult(), ast.Name(loss_b, ast.Load())),
    )
    set_loss(work, combined)
    thought = (
        f"Blended {name_a} and {name_b} as {weight:g} * {name_a} + {round(1 - weight, 2):g} * "
        f"{name_b}, mixing the shapes of the two losses."
    )
    return work, thought


def gate(fa: ast.FunctionDef, fb: ast.FunctionDef, name_a: str, name_b: str, rng: random.Random, grad: set[str],
         temperature_range: tuple[float, float], max_nodes: int) -> tuple[ast.FunctionDef, str]:
    """``gate``: a sigmoid of a margin, at a temperature log-uniform in ``temperature_range``,
    switches between the two losses (DiscoPOP/LRML)."""
    _check_room(fa, fb, max_nodes)
    work, loss_a, loss_b = _inline_second(fa, fb)
    candidates = margin_candidates(work, len(work.body) - 1, grad)
    if not candidates:
        raise NotApplicable("no margin-like tensor in scope to gate on")
    margin = copy.deepcopy(weighted_pick(rng, candidates))
    temperature = round_significant(log_uniform(rng, *temperature_range), 2)
    gate_name = fresh_name("gate", all_names(work))
    work.body.insert(len(work.body) - 1, ast.Assign(
        targets=[ast.Name(gate_name, ast.Store())],
        value=primitive_call("sigmoid", ast.BinOp(margin, ast.Div(), ast.Constant(temperature))),
    ))
    high, low = (loss_a, loss_b) if rng.random() < 0.5 else (loss_b, loss_a)
    combined = ast.BinOp(
        ast.BinOp(ast.Name(gate_name, ast.Load()), ast.Mult(), ast.Name(high, ast.Load())), ast.Add(),
        ast.BinOp(ast.BinOp(ast.Constant(1), ast.Sub(), ast.Name(gate_name, ast.Load())), ast.Mult(),
                  ast.Name(low, ast.Load())),
    )
    set_loss(work, combined)
    names = {loss_a: name_a, loss_b: name_b}
    thought = (
        f"Gated {name_a} and {name_b} with sigmoid({ast.unparse(margin)} / {temperature:g}), as in "
        f"DiscoPOP, so {names[high]} dominates for large margins and {names[low]} for small ones."
    )
    return work, thought


def _check_room(fa: ast.FunctionDef, fb: ast.FunctionDef, max_nodes: int) -> None:
    size = node_count(fa) + node_count(fb)
    if size > max_nodes:
        raise NotApplicable(f"both parents together have {size} syntax nodes (max_nodes={max_nodes})")


def splice(fa: ast.FunctionDef, fb: ast.FunctionDef, name_a: str, name_b: str, rng: random.Random,
           grad: set[str]) -> tuple[ast.FunctionDef, str]:
    """``splice``: one subexpression of the first parent replaced by one of the second that the
    first lacks, with the statements it needs."""
    sites = _splice_nodes(fa, exclude_loss=True)
    donors = _splice_nodes(fb, exclude_loss=False)
    if not sites or not donors:
        raise NotApplicable("no tensor subexpression to exchange")
    calls = [s for s in sites if isinstance(s[0], ast.Call)]
    others = [s for s in sites if not isinstance(s[0], ast.Call)]
    group = calls if calls and (not others or rng.random() < 0.5) else others
    site, site_index = rng.choice(group)
    want_call = isinstance(site, ast.Call)
    # Only material the first parent lacks (compared with locals expanded) is worth taking.
    canonical = Canonical()
    key_a, key_b = canonical.keyer(fa), canonical.keyer(fb)
    known = {key_a(node) for node, _ in _splice_nodes(fa, exclude_loss=False)}
    fitting = [d for d, _ in donors if isinstance(d, ast.Call) == want_call]
    if is_batched(site, batched_names(fa)):
        # a batch statistic in place of a per-example term can leave a scalar loss
        batched_b = batched_names(fb)
        fitting = [d for d in fitting if is_batched(d, batched_b)]
    donor = next((d for d in rng.sample(fitting, len(fitting)) if key_b(d) not in known), None)
    if donor is None:
        raise Skip(f"{name_b} has no part that {name_a} lacks to put in place of `{snippet(site)}`")
    _reuse_first_definitions(fa.body[:site_index], fb)  # renames inside the donor too
    donor = copy.deepcopy(donor)
    needed = _statements_needed(fb, donor)
    site_text, donor_text = snippet(site), snippet(donor)
    replace_node(fa, site, donor)
    fa.body[site_index:site_index] = [copy.deepcopy(s) for s in needed]
    thought = (
        f"Replaced `{site_text}` in {name_a} with `{donor_text}` from {name_b}, keeping "
        f"{name_a}'s structure around a part of {name_b}."
    )
    return fa, thought


# -- helpers ----------------------------------------------------------------------------------
def rename_second(first: ast.FunctionDef, second: ast.FunctionDef) -> None:
    """Give ``second`` the first parent's parameter names and fresh (``_b``) local names."""
    mapping = dict(zip(param_names(second), param_names(first)))
    used = all_names(first) | all_names(second)
    for name in _local_names(second):
        if name in mapping:
            continue
        fresh = fresh_name(SECOND_PARENT_SUFFIX.sub("", name) + "_b", used)
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
        for name in stored_names(statement):
            counts_a[name] = counts_a.get(name, 0) + 1
    known: dict[str, str] = {}
    for statement in statements:
        target = single_target(statement)
        if target is not None and counts_a[target] == 1:
            known.setdefault(ast.dump(statement.value), target)
    counts_b: dict[str, int] = {}
    for name in stored_names(second):
        counts_b[name] = counts_b.get(name, 0) + 1
    mapping: dict[str, str] = {}
    kept = []
    for statement in second.body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in mapping:
                node.id = mapping[node.id]
        target = single_target(statement)
        if target is not None and counts_b[target] == 1 and ast.dump(statement.value) in known:
            mapping[target] = known[ast.dump(statement.value)]
            continue
        kept.append(statement)
    second.body = kept


def _inline_second(first: ast.FunctionDef, second: ast.FunctionDef) -> tuple[ast.FunctionDef, str, str]:
    """``first`` with ``second``'s statements inlined before its return; both losses bound to
    names, which are returned."""
    if return_holder(first) is None:
        raise NotApplicable("the first parent does not end with 'return <loss>'")
    holder = return_holder(second)
    if holder is None:
        raise NotApplicable("the second parent does not end with 'return <loss>'")
    if any(isinstance(n, ast.Return) for s in second.body[:-1] for n in ast.walk(s)):
        raise NotApplicable("the second parent returns early, so its body cannot be inlined")
    _reuse_first_definitions(first.body[:-1], second)
    holder = return_holder(second)
    container, key = holder
    loss_b = container[key] if isinstance(key, int) else getattr(container, key)
    site = return_holder(first)
    loss_a = site[0][site[1]] if isinstance(site[1], int) else getattr(site[0], site[1])
    used = all_names(first) | all_names(second)
    body = first.body[:-1]
    if isinstance(loss_a, ast.Name):
        name_a = loss_a.id
    else:
        name_a = fresh_name("losses", used)
        used.add(name_a)
        body.append(ast.Assign(targets=[ast.Name(name_a, ast.Store())], value=loss_a))
    body.extend(second.body[:-1])
    if isinstance(loss_b, ast.Name):
        name_b = loss_b.id
    else:
        name_b = fresh_name("losses_b", used)
        body.append(ast.Assign(targets=[ast.Name(name_b, ast.Store())], value=loss_b))
    body.append(first.body[-1])
    first.body = body
    return first, name_a, name_b


def _splice_nodes(function: ast.FunctionDef, exclude_loss: bool) -> list[tuple[ast.expr, int]]:
    """Tensor-valued subexpressions with the index of their top-level statement."""
    data = set(data_params(function))
    varying = varying_names(assigned_values(function), data)
    excluded: set[int] = set()
    site = loss_site(function)
    if exclude_loss and site is not None:
        excluded.add(id(site.get()))
        excluded.add(id(function.body[-1].value))
    facts = _node_facts(function, varying)
    nodes = []
    for index, statement in enumerate(function.body):
        parents = parent_map(statement)
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
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in REDUCTIONS:
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


def _statements_needed(function: ast.FunctionDef, expr: ast.AST) -> list[ast.stmt]:
    """The top-level statements of ``function`` that compute the locals ``expr`` reads."""
    local = set(_local_names(function)) - set(param_names(function))
    wanted = set(loaded_names(expr)) & local
    chosen: list[int] = []
    for index in range(len(function.body) - 1, -1, -1):
        statement = function.body[index]
        if set(stored_names(statement)) & wanted:
            if any(isinstance(n, ast.Return) for n in ast.walk(statement)):
                raise Skip("the spliced part depends on a statement that returns early")
            chosen.append(index)
            wanted |= set(loaded_names(statement)) & local
    return [function.body[i] for i in sorted(chosen)]
