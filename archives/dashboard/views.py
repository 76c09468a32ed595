"""What each page shows, as plain JSON-ready dicts built from a run's :class:`Snapshot`.

Everything is taken from the replay summary (:func:`archives.replay.summarize`), the candidate
report (:func:`archives.replay.candidate_report`) and the :class:`archives.reading.RunData`
records; this module only arranges them for the browser (points to plot, the lineage as a
graph, the operator chooser's current choice probabilities).
"""
from __future__ import annotations

import difflib
import math
from typing import Any

from archives.dashboard.library import LiveRun, Snapshot, UNREADABLE
from archives.reading import RunData
from archives.replay import candidate_report
from archives.store import StoreError

#: Lineage graphs stop at this many nodes (a long run's best loss can have thousands of ancestors).
MAX_TREE_NODES = 400
#: Draws used to estimate Thompson sampling's choice probabilities.
THOMPSON_DRAWS = 4000


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def operators_of(config: dict[str, Any]) -> list[str]:
    return [spec.strip() for spec in str(config.get("operator") or "").split(",") if spec.strip()]


# -- runs page ------------------------------------------------------------------------------------
def run_overview(run: LiveRun) -> dict[str, Any]:
    """One row of the runs page; a run that cannot be read says why."""
    try:
        snapshot = run.refresh()
    except StoreError as exc:
        return {"key": run.key, "path": str(run.path), "status": UNREADABLE, "error": str(exc)}
    with run.lock:
        summary, config = snapshot.summary, snapshot.data.config
    best, base = summary["best_fitness"], summary["baseline_fitness"]
    return {
        "key": run.key, "path": str(run.path), "status": snapshot.status, "fitness": summary["fitness"],
        "operators": operators_of(config), "asynchronous": bool(config.get("asynchronous")),
        "evaluations": summary["evaluations"], "generations": summary["generations"],
        "generations_planned": summary["generations_planned"], "best_id": summary["best_id"],
        "best_name": summary["best_name"], "best_fitness": best, "baseline": summary["baseline"],
        "baseline_fitness": base, "delta": best - base if best is not None and base is not None else None,
        "llm_calls": summary["llm_calls"], "llm_cost_usd": summary["llm_cost_usd"],
        "last_write": snapshot.last_write, "version": snapshot.version, "error": None,
    }


def history(snapshot: Snapshot) -> dict[str, Any]:
    """Fitness over the run for the comparison chart: per generation, or per evaluation for
    ``--async`` runs (best so far after each scored evaluation)."""
    summary = snapshot.summary
    if snapshot.data.config.get("asynchronous"):
        best, xs, ys = -math.inf, [], []
        for index, point in enumerate(_points(snapshot.data)):
            best = max(best, point["fitness"])
            xs.append(index + 1)
            ys.append(best)
        return {"x_label": "evaluation", "x": xs, "best": ys}
    return {"x_label": "generation", "x": [g["gen"] for g in summary["history"]],
            "best": [g["best"] for g in summary["history"]]}


# -- run page -------------------------------------------------------------------------------------
def _points(data: RunData) -> list[dict[str, Any]]:
    """Every scored evaluation of the run's fitness, in the order they were stored."""
    return [{"id": cid, "name": data.candidates[cid].name, "generation": data.candidates[cid].generation,
             "fitness": r.fitness}
            for cid, r in data.results.items() if r.ok and cid in data.candidates and _finite(r.fitness) is not None]


def choice_probabilities(kind: str, rewards: dict[str, list[float]], names: list[str], seed: int = 0,
                         window: int | None = None) -> dict[str, float]:
    """How likely the operator chooser is to pick each operator next, from its saved rewards.

    ``bandit`` (sliding-window Thompson sampling): the chance that each operator's draw from
    Beta(1 + sum r, 1 + n - sum r) is the highest, estimated with fixed-seed draws; ``ucb``: the
    operator with the highest upper bound gets 1; ``uniform``: equal shares.
    """
    import numpy as np

    names = list(dict.fromkeys([*names, *rewards]))
    if not names:
        return {}
    if len(names) == 1 or kind == "uniform":
        return {name: 1.0 / len(names) for name in names}
    windowed = {name: list(rewards.get(name, []))[-window:] if window else list(rewards.get(name, []))
                for name in names}
    if kind == "ucb":
        unplayed = [name for name in names if not windowed[name]]
        if unplayed:
            return {name: float(name == unplayed[0]) for name in names}
        total = sum(len(r) for r in windowed.values())

        def bound(name: str) -> float:
            r = windowed[name]
            return sum(r) / len(r) + math.sqrt(2.0 * math.log(total) / len(r))

        top = max(names, key=bound)
        return {name: float(name == top) for name in names}
    rng = np.random.default_rng(seed)
    alpha = np.array([1.0 + sum(windowed[n]) for n in names])
    beta = np.array([1.0 + len(windowed[n]) - sum(windowed[n]) for n in names])
    draws = rng.beta(alpha, beta, size=(THOMPSON_DRAWS, len(names)))
    wins = np.bincount(draws.argmax(axis=1), minlength=len(names)) / THOMPSON_DRAWS
    return {name: float(share) for name, share in zip(names, wins)}


#: How an offspring was made; older stores append it to the operator (``symbolic:mutate``).
_VARIATIONS = ("mutate", "crossover", "propose")


def _arm(operator: str) -> str:
    """The operator chooser's name for an operator (``openai:gpt-4o:mutate`` -> ``openai:gpt-4o``)."""
    head, _, tail = operator.rpartition(":")
    return head if head and tail in _VARIATIONS else operator


def _operator_table(snapshot: Snapshot) -> list[dict[str, Any]]:
    data, summary = snapshot.data, snapshot.summary
    config = data.config
    chooser = (data.generations[-1]["state"].get("chooser") if data.generations else None) or {}
    arms = sorted({_arm(c.operator) for c in data.candidates.values() if c.operator != "seed"})
    probabilities = choice_probabilities(config.get("operator_choice", "bandit"), chooser.get("rewards") or {},
                                         arms, window=config.get("bandit_window")) if arms else {}
    rows, shown = [], set()
    for name, stats in sorted(summary["operators"].items()):
        arm = _arm(name)
        # One chance per operator (its mutate, crossover and propose rows share it): on its first row.
        first = name != "seed" and arm not in shown
        shown.add(arm)
        rows.append({"operator": name, "arm": arm, "made": stats["made"], "valid": stats["valid"],
                     "scored": stats["scored"], "improved": stats["improved"], "valid_share": stats["valid_share"],
                     "improved_share": stats["improved_share"],
                     "choice_probability": probabilities.get(arm) if first else None})
    return rows


def _llm_timeline(data: RunData) -> dict[str, list[Any]]:
    """Cumulative LLM calls, tokens and cost against the time each call was made."""
    times, calls, tokens, cost = [], [], [], []
    total_tokens, total_cost = 0, 0.0
    for index, row in enumerate(data.llm_calls):
        total_tokens += int(row.get("tokens_in") or 0) + int(row.get("tokens_out") or 0)
        total_cost += float(row.get("cost_usd") or 0.0)
        times.append(row.get("created"))
        calls.append(index + 1)
        tokens.append(total_tokens)
        cost.append(round(total_cost, 6))
    return {"time": times, "calls": calls, "tokens": tokens, "cost_usd": cost}


def run_view(snapshot: Snapshot, key: str) -> dict[str, Any]:
    """Everything the run page draws."""
    data, summary = snapshot.data, snapshot.summary
    elites = [{"id": e["id"], "name": e["name"], "fitness": _finite(e["fitness"]), "cell": list(e["cell"])}
              for e in data.elites()]
    return {
        "key": key, "version": snapshot.version, "status": snapshot.status, "cursor": snapshot.evaluations_stored,
        "asynchronous": bool(data.config.get("asynchronous")), "operators_used": operators_of(data.config),
        "summary": summary, "points": _points(data), "elites": elites,
        "operators": _operator_table(snapshot), "llm_timeline": _llm_timeline(data),
        "comparison": history(snapshot), "last_write": snapshot.last_write,
    }


# -- candidate page -------------------------------------------------------------------------------
def children_of(data: RunData) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for candidate in data.candidates.values():
        for parent in candidate.parents:
            children.setdefault(parent, []).append(candidate.id)
    return children


def tree(data: RunData, children: dict[int, list[int]], root: int, descendants: bool = True,
         max_nodes: int = MAX_TREE_NODES) -> dict[str, Any]:
    """The lineage around ``root`` as a graph: its ancestors back to the seeds and (with
    ``descendants``) everything bred from it, breadth first up to ``max_nodes`` nodes."""
    seen = {root: 0}
    frontier = [root]
    truncated = False
    for direction in ("up", "down") if descendants else ("up",):
        frontier, depth = [root], 0
        while frontier and not truncated:
            depth += 1
            following = []
            for cid in frontier:
                neighbours = (data.candidates[cid].parents if cid in data.candidates else ()) if direction == "up" \
                    else children.get(cid, [])
                for other in neighbours:
                    if other in seen:
                        continue
                    if len(seen) >= max_nodes:
                        truncated = True
                        break
                    seen[other] = -depth if direction == "up" else depth
                    following.append(other)
            frontier = following
    nodes = []
    for cid, depth in seen.items():
        candidate = data.candidates.get(cid)
        result = data.results.get(cid)
        nodes.append({"id": cid, "name": candidate.name if candidate else "?",
                      "generation": candidate.generation if candidate else None,
                      "operator": candidate.operator if candidate else None,
                      "status": result.status if result else None, "fitness": _finite(data.fitness_of(cid)),
                      "depth": depth, "root": cid == root})
    edges = [[parent, cid] for cid in seen if cid in data.candidates
             for parent in data.candidates[cid].parents if parent in seen]
    return {"root": root, "nodes": nodes, "edges": edges, "truncated": truncated}


def best_with_ancestors(snapshot: Snapshot) -> int | None:
    """The best loss (the best one with parents when the very best is a seed)."""
    scored = snapshot.data.scored()
    if not scored:
        return None
    with_parents = [c.id for c, _ in scored if c.parents]
    return scored[0][0].id if scored[0][0].parents or not with_parents else with_parents[0]


def code_diff(parent_code: str, code: str, parent_label: str, label: str) -> str:
    return "".join(difflib.unified_diff(parent_code.splitlines(True), code.splitlines(True),
                                        fromfile=parent_label, tofile=label))


def candidate_view(snapshot: Snapshot, candidate_id: int) -> dict[str, Any]:
    """The ``show --json`` report of a candidate, with its children and a diff per parent."""
    data = snapshot.data
    report = candidate_report(data, candidate_id)
    children = children_of(data).get(candidate_id, [])
    report["children"] = [{"id": cid, "name": data.candidates[cid].name, "fitness": _finite(data.fitness_of(cid))}
                          for cid in children]
    report["parents_detail"] = []
    for parent in report["parents"]:
        other = data.candidates.get(parent)
        report["parents_detail"].append({
            "id": parent, "name": other.name if other else "?", "fitness": _finite(data.fitness_of(parent)),
            "diff": code_diff(other.code, report["code"], f"{parent} {other.name}", f"{candidate_id} {report['name']}")
            if other else ""})
    result = data.results.get(candidate_id)
    report["status"] = result.status if result else None
    report["fitness"] = _finite(result.fitness) if result else None
    report["baseline"] = snapshot.summary.get("baseline")
    report["baseline_fitness"] = snapshot.summary.get("baseline_fitness")
    report["fitness_name"] = data.fitness_name
    for call in report["llm_calls"]:
        call["messages"] = prompt_messages(call.get("prompt"))
    return report


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A stored prompt (the JSON list of chat messages sent, or plain text) as role and content."""
    import json

    try:
        messages = json.loads(prompt) if isinstance(prompt, str) else prompt
    except ValueError:
        messages = None
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return [{"role": str(m.get("role", "?")), "content": str(m.get("content", ""))} for m in messages]
    return [{"role": "prompt", "content": "" if prompt is None else str(prompt)}]
