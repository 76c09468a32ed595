"""Reading a run back: the summary shown at the end of a run and by ``replay``, computed
from the run log alone (no plug-in import needed)."""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from archives.store import RunStore
from engine.candidate import FAILED


def summarize(store: RunStore, top: int = 5) -> dict[str, Any]:
    """The run's key numbers (the ``replay --json`` object)."""
    config = store.meta("config", {})
    fitness_name = store.meta("fitness_name") or config.get("fitness")
    baseline = store.meta("baseline")
    candidates = {c.id: c for c in store.candidates()}
    results = {r.candidate_id: r for _, r in store.evaluations(fitness_name)}
    generations = store.generations()
    last = generations[-1] if generations else None
    counters = (last["state"].get("counters", {}) if last else {}) or {}

    statuses = Counter(r.status for r in results.values())
    scored = [(candidates[cid], r) for cid, r in results.items() if r.ok and cid in candidates]
    scored.sort(key=lambda pair: (-pair[1].fitness, pair[0].id))
    best = scored[0] if scored else None
    baseline_result = next(
        (r for c, r in scored if baseline and c.name == baseline and c.operator == "seed"), None
    )

    operators: dict[str, dict[str, Any]] = defaultdict(lambda: {"made": 0, "valid": 0, "scored": 0, "improved": 0})
    for candidate in candidates.values():
        result = results.get(candidate.id)
        stats = operators[candidate.operator]
        stats["made"] += 1
        if result is None:
            continue
        if result.status != "invalid":
            stats["valid"] += 1
        if result.ok:
            stats["scored"] += 1
            parent_scores = [results[p].fitness for p in candidate.parents if p in results and results[p].ok]
            if parent_scores and result.fitness > max(parent_scores):
                stats["improved"] += 1
    for stats in operators.values():
        stats["valid_share"] = stats["valid"] / stats["made"] if stats["made"] else None
        stats["improved_share"] = stats["improved"] / stats["scored"] if stats["scored"] else None
    offspring = [c for c in candidates.values() if c.operator != "seed" and c.id in results]
    valid_offspring = sum(results[c.id].status != "invalid" for c in offspring)

    behaviour_duplicates = statuses.get("duplicate", 0)
    hash_duplicates = int(counters.get("hash_duplicates", 0))
    summary = {
        "run": str(store.path.parent),
        "fitness": fitness_name,
        "evaluations": sum(n for s, n in statuses.items() if s != "duplicate"),
        "unique_genomes": len(candidates),
        "invalid": statuses.get("invalid", 0),
        "failed": {s: statuses.get(s, 0) for s in FAILED},
        "generations": len(generations),
        "generations_planned": int(config.get("gens", 0)) + 1,
        "best_fitness": best[1].fitness if best else None,
        "best_name": best[0].name if best else None,
        "best_id": best[0].id if best else None,
        "baseline": baseline,
        "baseline_fitness": baseline_result.fitness if baseline_result else None,
        "coverage": last["record"].get("coverage") if last else 0.0,
        "qd_score": last["record"].get("qd_score") if last else 0.0,
        "elites": last["record"].get("elites") if last else 0,
        "dedup_saved": hash_duplicates + behaviour_duplicates,
        "hash_duplicates": hash_duplicates,
        "behaviour_duplicates": behaviour_duplicates,
        "operator_failures": int(counters.get("operator_failures", 0)),
        "offspring_valid_share": valid_offspring / len(offspring) if offspring else None,
        "evaluation_seconds": sum(r.seconds for r in results.values()),
        "operators": dict(operators),
        "history": [
            {k: g["record"].get(k) for k in ("gen", "evals", "ok", "invalid", "max", "mean", "best", "coverage")}
            for g in generations
        ],
        "top": [
            {"id": c.id, "name": c.name, "fitness": r.fitness, "generation": c.generation, "operator": c.operator,
             "parents": list(c.parents)}
            for c, r in scored[:top]
        ],
    }
    return _finite(summary)


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_summary(summary: dict[str, Any], console=None) -> None:
    """Print the summary as tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    baseline = summary["baseline_fitness"]
    console.print(f"[bold]Run[/bold] {summary['run']}  fitness={summary['fitness']}  "
                  f"generations={summary['generations']}/{summary['generations_planned']}")
    console.print(
        f"evaluations {summary['evaluations']}  unique genomes {summary['unique_genomes']}  "
        f"invalid {summary['invalid']}  failed {sum(summary['failed'].values()) - summary['invalid']}  "
        f"dedup saved {summary['dedup_saved']} (AST {summary['hash_duplicates']}, behaviour "
        f"{summary['behaviour_duplicates']})  offspring valid {_fmt(summary['offspring_valid_share'], 2)}"
    )
    console.print(f"archive: {summary['elites']} elites, coverage {_fmt(summary['coverage'], 3)}, "
                  f"QD score {_fmt(summary['qd_score'], 3)}")
    table = Table(title="Best losses", show_lines=False)
    for column in ("id", "name", "fitness", f"vs {summary['baseline'] or 'baseline'}", "gen", "operator"):
        table.add_column(column)
    for row in summary["top"]:
        delta = row["fitness"] - baseline if baseline is not None else None
        table.add_row(str(row["id"]), row["name"], _fmt(row["fitness"]),
                      "-" if delta is None else f"{delta:+.4f}", str(row["generation"]), row["operator"])
    console.print(table)
    if baseline is not None and summary["best_fitness"] is not None:
        verdict = "beats" if summary["best_fitness"] > baseline else "does not beat"
        console.print(f"best {summary['best_name']} ({summary['best_fitness']:.4f}) {verdict} the "
                      f"{summary['baseline']} seed ({baseline:.4f})")
    ops = Table(title="Operators")
    for column in ("operator", "made", "valid share", "improved on parent"):
        ops.add_column(column)
    for name, stats in sorted(summary["operators"].items()):
        ops.add_row(name, str(stats["made"]), _fmt(stats["valid_share"], 2), _fmt(stats["improved_share"], 2))
    console.print(ops)


def open_run(path: str | Path) -> RunStore:
    return RunStore.open(path, readonly=True)
