"""Reading a run back: the summary shown at the end of a run and by ``replay``, computed
from the run log alone (no plug-in import needed)."""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from archives.reading import RunData, cell_label, error_kind, llm_usage, read_run, spearman
from archives.store import RunStore
from engine.candidate import FAILED, EvalResult
from engine.helpers import finite, visible


def summarize(store: RunStore, top: int = 5, at_gen: int | None = None, data: RunData | None = None) -> dict[str, Any]:
    """The run's key numbers (the ``replay --json`` object), as of generation ``at_gen``
    (default: everything stored). ``data`` skips reading the store again."""
    data = data if data is not None else read_run(store, at_gen)
    config = data.config
    fitness_name = data.fitness_name
    baseline = data.baseline
    candidates = data.candidates
    results = data.results
    generations = data.generations
    last = generations[-1] if generations else None
    counters = (last["state"].get("counters", {}) if last else {}) or {}

    statuses = Counter(r.status for r in results.values())
    from engine.search.racing import ranked

    estimates = seed_estimates(data)
    scored = ranked(data)  # noise-aware: by the lower confidence bound of the paired gain, where re-measured
    best = scored[0] if scored else None
    baseline_result = next(
        (r for c, r in scored if baseline and c.name == baseline and c.operator == "seed"), None
    )

    operators: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"made": 0, "valid": 0, "scored": 0, "failed": 0, "improved": 0})
    for candidate in candidates.values():
        result = results.get(candidate.id)
        stats = operators[candidate.label]
        stats["made"] += 1
        if result is None:
            continue
        if result.status != "invalid":
            stats["valid"] += 1
        if result.status in FAILED:
            stats["failed"] += 1
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

    failures: dict[str, dict[str, Any]] = {}
    for cid, result in results.items():
        if result.status not in FAILED:
            continue
        kind = error_kind(result.status, result.error)
        entry = failures.setdefault(kind, {"kind": kind, "status": result.status, "count": 0,
                                           "example": result.error, "example_id": cid})
        entry["count"] += 1

    labels = sorted(data.extra)
    key_metrics = _key_metrics([r for _, r in scored[:top]])
    ladder = []
    for label in data.ladder:
        stage = results if label == fitness_name else data.extra.get(label, {})
        good = sorted(((r.fitness, -cid) for cid, r in stage.items() if r.ok), reverse=True)
        entry = {"stage": label, "evaluated": len(stage), "ok": len(good), "best_id": None, "best_name": None,
                 "best_fitness": None, "baseline_fitness": None}
        if good:
            entry.update(best_id=-good[0][1], best_name=candidates[-good[0][1]].name, best_fitness=good[0][0])
        base = next((stage[c.id].fitness for c in candidates.values() if baseline and c.name == baseline
                     and c.operator == "seed" and c.id in stage and stage[c.id].ok), None)
        entry["baseline_fitness"] = base
        ladder.append(entry)
    elites = data.elites({cid: e.lower for cid, e in estimates.items()} if estimates else None)
    behaviour_duplicates = statuses.get("duplicate", 0)
    hash_duplicates = int(counters.get("hash_duplicates", 0))
    summary = {
        "run": str(data.path),
        "fitness": fitness_name,
        "at_gen": data.at_gen,
        "last_generation": data.last_generation,
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
        "cells": last["record"].get("cells") if last else None,
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
        "key_metrics": key_metrics,
        "extra_fitness": labels,
        # With a fidelity ladder: per stage, how many were scored there and the best of them.
        "fidelity_ladder": ladder,
        "top": [_row(c, r, data, key_metrics, labels, estimates.get(c.id)) for c, r in scored[:top]],
        "ranking": (f"lower confidence bound of the gain paired with {baseline or 'nothing'} over evaluation seeds "
                    f"(mean - {config.get('confidence', 1.0)} standard errors)") if estimates else "first score",
        "best_estimate": _estimate_dict(estimates.get(best[0].id)) if best and estimates else None,
        **_validation_fields(data.validation),
        "seeds": [
            {"id": c.id, "name": c.name, "fitness": data.fitness_of(c.id)}
            for c in candidates.values() if c.operator == "seed"
        ],
        "axes": [{k: a.get(k) for k in ("name", "low", "high", "bins")} for a in data.space],
        "elite_cells": [
            {"cell": list(e["cell"]), "region": cell_label(data.space, e["cell"]), "id": e["id"], "name": e["name"],
             "fitness": e["fitness"], "generation": e.get("generation"), "operator": e.get("operator")}
            for e in sorted(elites, key=lambda e: tuple(e["cell"]))
        ],
        "failure_kinds": sorted(failures.values(), key=lambda f: (-f["count"], f["kind"])),
        "llm": llm_usage(data.llm_calls) if data.llm_calls else None,
        # Flat LLM totals (0 for a run without LLM operators), handy for scripts.
        "llm_calls": len(data.llm_calls),
        "llm_tokens_in": sum(int(row.get("tokens_in") or 0) for row in data.llm_calls),
        "llm_tokens_out": sum(int(row.get("tokens_out") or 0) for row in data.llm_calls),
        "llm_cost_usd": sum(float(row.get("cost_usd") or 0.0) for row in data.llm_calls),
        "stopped": store.meta("stopped") if hasattr(store, "meta") else None,
        "transfer": _transfer(data, labels),
    }
    return _finite(summary)


def _key_metrics(rows: list[EvalResult], limit: int = 3) -> list[str]:
    """The first scalar metrics the best losses share (bookkeeping such as seconds left out)."""
    names: list[str] = []
    for result in rows:
        for key, value in result.metrics.items():
            if key in names or key in ("seconds", "steps") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and all(isinstance(r.metrics.get(key), (int, float)) for r in rows):
                names.append(key)
    return names[:limit]


def _row(candidate, result: EvalResult, data: RunData, key_metrics: list[str], labels: list[str],
         estimate=None) -> dict[str, Any]:
    row = {
        "id": candidate.id, "name": candidate.name, "fitness": result.fitness, "generation": candidate.generation,
        "operator": candidate.label, "parents": list(candidate.parents),
        "metrics": {k: result.metrics.get(k) for k in key_metrics},
        "extra": {label: _extra_value(data.extra[label].get(candidate.id)) for label in labels},
    }
    if estimate is not None:
        row["estimate"] = _estimate_dict(estimate)
    return row


def render_validation(validation: dict[str, Any] | None, console=None) -> None:
    """The end-of-run validation: held-out gain over the baseline of each validated loss."""
    if not validation:
        return
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Held-out validation: {validation.get('fitness')} ({validation.get('seeds')} fresh seeds, "
                        f"paired with {validation.get('baseline')})")
    for column in ("id", "name", "held-out gain", "± se", "worst task", "flag"):
        table.add_column(column)
    for row in validation.get("losses", []):
        table.add_row(str(row["id"]), row["name"], _fmt(row.get("gain")), _fmt(row.get("gain_se")),
                      _fmt(row.get("worst_task_gain")), row.get("flag") or "")
    console.print(table)
    if validation.get("verdict"):
        console.print(validation["verdict"])


def seed_estimates(data: RunData) -> dict[int, Any]:
    """Per-candidate estimates over evaluation seeds (:func:`engine.search.racing.run_estimates`)."""
    from engine.search.racing import run_estimates

    return run_estimates(data)


def _estimate_dict(estimate) -> dict[str, Any] | None:
    if estimate is None:
        return None
    return {"mean": estimate.mean, "gain": None if math.isnan(estimate.gain) else estimate.gain, "se": estimate.se,
            "seeds": estimate.seeds, "lower": estimate.lower}


def _validation_fields(validation: dict[str, Any] | None) -> dict[str, Any]:
    """The end-of-run validation as summary fields (None when the run has none)."""
    if not validation:
        return {"validation": None, "validated_best_name": None, "validated_best_id": None,
                "validated_gain": None, "validated_gain_se": None}
    best = validation.get("best") or {}
    return {"validation": validation, "validated_best_name": best.get("name"), "validated_best_id": best.get("id"),
            "validated_gain": best.get("gain"), "validated_gain_se": best.get("gain_se")}


def _extra_value(result: EvalResult | None) -> float | str | None:
    """A re-evaluation as shown beside the run's fitness: its fitness, else its status."""
    if result is None:
        return None
    return result.fitness if result.ok else result.status


def _transfer(data: RunData, labels: list[str]) -> dict[str, Any]:
    """Scores on other fitness plug-ins (``reevaluate``) beside the run's fitness."""
    if not labels:
        return {"labels": [], "rows": [], "spearman": {}}
    ids = sorted({cid for label in labels for cid in data.extra[label]},
                 key=lambda cid: (-(data.fitness_of(cid) if data.fitness_of(cid) is not None else -math.inf), cid))
    rows = [
        {"id": cid, "name": data.candidates[cid].name, "fitness": data.fitness_of(cid),
         "extra": {label: _extra_value(data.extra[label].get(cid)) for label in labels}}
        for cid in ids
    ]
    correlation = {}
    for label in labels:
        pairs = [(data.fitness_of(cid), r.fitness) for cid, r in data.extra[label].items()
                 if r.ok and data.fitness_of(cid) is not None]
        correlation[label] = spearman(pairs)
    return {"labels": labels, "rows": rows, "spearman": correlation,
            "how": {label: data.reevaluations.get(label) for label in labels}}


_finite = finite  # JSON has no NaN: non-finite floats become None


def _fmt(value: Any, digits: int = 4) -> str:
    """A table cell: numbers rounded, text escaped (names and errors may hold [brackets])."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    from rich.markup import escape

    return escape(str(value))


def render_summary(summary: dict[str, Any], console=None, detail: bool = False, max_rows: int = 20) -> None:
    """Print the summary as tables (rich). ``detail`` adds the archive's cells, fitness per
    generation, failures by kind, LLM usage and re-evaluations (``replay``); ``max_rows``
    caps the long tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    baseline = summary["baseline_fitness"]
    when = f"  state after generation {summary['at_gen']} of {summary['last_generation']}" \
        if summary.get("at_gen") is not None else ""
    console.print(f"[bold]Run[/bold] {summary['run']}  fitness={summary['fitness']}  "
                  f"generations={summary['generations']}/{summary['generations_planned']}{when}")
    console.print(
        f"evaluations {summary['evaluations']}  unique genomes {summary['unique_genomes']}  "
        f"invalid {summary['invalid']}  failed {sum(summary['failed'].values()) - summary['invalid']}  "
        f"dedup saved {summary['dedup_saved']} (AST {summary['hash_duplicates']}, behaviour "
        f"{summary['behaviour_duplicates']})  offspring valid {_fmt(summary['offspring_valid_share'], 2)}"
    )
    console.print(f"archive: {summary['elites']} elites, coverage {_fmt(summary['coverage'], 3)}, "
                  f"QD score {_fmt(summary['qd_score'], 3)}")
    if summary.get("llm_calls"):
        console.print(f"LLM: {summary['llm_calls']} calls, {summary['llm_tokens_in']} tokens in, "
                      f"{summary['llm_tokens_out']} out, estimated ${summary['llm_cost_usd']:.4f}")
    if summary.get("stopped"):
        console.print(f"stopped early in generation {summary['stopped']['generation']}: {summary['stopped']['reason']}")
    key_metrics = summary.get("key_metrics", [])
    labels = summary.get("extra_fitness", [])
    columns = ("id", "name", "fitness", f"vs {summary['baseline'] or 'baseline'}", *key_metrics, *labels,
               "gen", "operator")
    rows = []
    for row in summary["top"]:
        estimate = row.get("estimate")
        delta = row["fitness"] - baseline if baseline is not None else None
        shown = _fmt(row["fitness"])
        if estimate:  # mean over seeds ± standard error of the paired gain (seeds)
            shown = f"{estimate['mean']:.4f}±{estimate['se']:.4f} ({estimate['seeds']})"
            delta = estimate["gain"] if estimate["gain"] is not None else delta
        rows.append((str(row["id"]), _fmt(row["name"]), shown, "-" if delta is None else f"{delta:+.4f}",
                     *(_fmt(row.get("metrics", {}).get(k)) for k in key_metrics),
                     *(_fmt(row.get("extra", {}).get(label)) for label in labels),
                     str(row["generation"]), row["operator"]))
    table = _table("Best losses", columns, rows)
    if console.measure(table, options=console.options.update_width(10_000)).maximum > console.width:
        # Too wide for the terminal (80 columns): names would be cut to "lrml_x…". The losses and
        # their fitness first, names whole, then the metrics and origin of each by id.
        console.print(_table("Best losses", columns[:4], [r[:4] for r in rows], whole=("name",)))
        console.print(_table("Best losses: metrics and origin", ("id", *columns[4:]), [(r[0], *r[4:]) for r in rows]))
    else:
        console.print(table)
    best_estimate = summary.get("best_estimate")
    if best_estimate and best_estimate.get("gain") is not None:
        gain, se = best_estimate["gain"], best_estimate["se"]
        verdict = "beats" if gain > 2 * se else "is not clearly better than"
        console.print(f"best {summary['best_name']} (ranked by {summary['ranking']}): gain {gain:+.4f} ± {se:.4f} "
                      f"over {best_estimate['seeds']} seeds; it {verdict} the {summary['baseline']} seed on the "
                      "tasks selection saw")
    elif baseline is not None and summary["best_fitness"] is not None:
        verdict = "beats" if summary["best_fitness"] > baseline else "does not beat"
        console.print(f"best {summary['best_name']} ({summary['best_fitness']:.4f}) {verdict} the "
                      f"{summary['baseline']} seed ({baseline:.4f})")
    render_validation(summary.get("validation"), console)
    for entry in summary.get("fidelity_ladder") or []:
        line = f"fidelity {entry['stage']}: {entry['ok']} of {entry['evaluated']} scored"
        if entry["best_fitness"] is not None:
            line += f", best {entry['best_name']} ({entry['best_fitness']:.4f})"
        if entry["baseline_fitness"] is not None:
            line += f", {summary['baseline']} seed {entry['baseline_fitness']:.4f}"
        console.print(line)
    ops = Table(title="Operators")
    for column in ("operator", "made", "valid share", "improved on parent"):
        ops.add_column(column)
    for name, stats in sorted(summary["operators"].items()):
        ops.add_row(_fmt(name), str(stats["made"]), _fmt(stats["valid_share"], 2), _fmt(stats["improved_share"], 2))
    console.print(ops)
    if detail:
        _render_detail(summary, console, max_rows)


def _table(title: str, columns: tuple[str, ...], rows: list[tuple], whole: tuple[str, ...] = ()):
    """A rich table; the ``whole`` columns are never wrapped or cut (rich narrows the others)."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(_fmt(column), no_wrap=column in whole, min_width=max(
            (len(str(r[columns.index(column)])) for r in rows), default=0) if column in whole else None)
    for row in rows:
        table.add_row(*row)
    return table


def _render_detail(summary: dict[str, Any], console, max_rows: int) -> None:
    from rich.table import Table

    def capped(rows: list, what: str) -> list:
        if len(rows) > max_rows:
            console.print(f"({len(rows) - max_rows} more {what} not shown; see --json or --export)")
        return rows[:max_rows]

    cells = summary.get("elite_cells", [])
    if cells:
        grid = Table(title=f"Archive elites by region ({len(cells)} of {summary.get('cells') or '?'} cells filled)")
        for column in ("cell", "region", "id", "name", "fitness", "gen", "operator"):
            grid.add_column(column)
        best_first = sorted(cells, key=lambda e: -e["fitness"])[:max_rows]
        for cell in sorted(best_first, key=lambda e: tuple(e["cell"])):
            grid.add_row(str(tuple(cell["cell"])), _fmt(cell["region"]), str(cell["id"]), _fmt(cell["name"]),
                         _fmt(cell["fitness"]), _fmt(cell["generation"]), str(cell["operator"]))
        console.print(grid)
        if len(cells) > max_rows:
            console.print(f"(the {max_rows} best of {len(cells)} cells shown; see --json or --export)")
    history = summary.get("history", [])
    if history:
        generations = Table(title="Fitness per generation")
        for column in ("gen", "evals", "ok", "invalid", "best so far", "max", "mean", "coverage"):
            generations.add_column(column)
        step = max(1, math.ceil(len(history) / max_rows))
        shown = history[::step] if history[-1] in history[::step] else [*history[::step], history[-1]]
        for g in shown:
            generations.add_row(str(g["gen"]), str(g["evals"]), str(g["ok"]), str(g["invalid"]), _fmt(g["best"]),
                                _fmt(g["max"]), _fmt(g["mean"]), _fmt(g["coverage"], 3))
        console.print(generations)
        if step > 1:
            console.print(f"(every {step}th generation shown)")
    failures = summary.get("failure_kinds", [])
    if failures:
        kinds = Table(title="Invalid and failed losses by kind")
        for column in ("count", "kind", "example (candidate)"):
            kinds.add_column(column)
        for failure in capped(failures, "kinds"):
            example = (failure["example"] or "")[:120]
            kinds.add_row(str(failure["count"]), _fmt(failure["kind"]), _fmt(f"{example} ({failure['example_id']})"))
        console.print(kinds)
    llm = summary.get("llm")
    if llm:
        calls = Table(title="LLM calls")
        for column in ("operator / model", "calls", "failed", "tokens in", "tokens out", "cost USD", "seconds"):
            calls.add_column(column)
        for key, group in [*sorted(llm["by_model"].items()), ("total", llm)]:
            calls.add_row(_fmt(key), str(group["calls"]), str(group["failed_calls"]), str(group["tokens_in"]),
                          str(group["tokens_out"]), f"{group['cost_usd']:.4f}", f"{group['latency_s']:.1f}")
        console.print(calls)
    transfer = summary.get("transfer") or {}
    if transfer.get("rows"):
        labels = transfer["labels"]
        scores = Table(title="Re-evaluated on other fitness plug-ins")
        for column in ("id", "name", summary["fitness"] or "fitness", *labels):
            scores.add_column(_fmt(column))
        for row in capped(transfer["rows"], "re-evaluated losses"):
            scores.add_row(str(row["id"]), _fmt(row["name"]), _fmt(row["fitness"]),
                           *(_fmt(row["extra"].get(label)) for label in labels))
        console.print(scores)
        for label in labels:
            rho = transfer["spearman"].get(label)
            if rho is not None:
                console.print(f"rank correlation (Spearman) of {summary['fitness']} with {label}: {rho:+.2f}",
                              markup=False)


def candidate_report(data: RunData, candidate_id: int) -> dict[str, Any]:
    """One candidate with its evaluations (run fitness first, then re-evaluations), its
    ancestors (``lineage``: depth, id, name, fitness, operator, generation) and the LLM calls
    that produced it (``show --json``)."""
    candidate = data.candidates[candidate_id]
    evaluations = []
    if candidate_id in data.results:
        evaluations.append({"fitness_name": data.fitness_name, **data.results[candidate_id].to_dict()})
    for label in sorted(data.extra):
        if candidate_id in data.extra[label]:
            evaluations.append({"fitness_name": label, **data.extra[label][candidate_id].to_dict()})
    lineage = [
        {"depth": depth, "id": cid, "name": data.candidates[cid].name if cid in data.candidates else "?",
         "fitness": data.fitness_of(cid),
         "operator": data.candidates[cid].label if cid in data.candidates else None,
         "generation": data.candidates[cid].generation if cid in data.candidates else None}
        for depth, cid in data.lineage(candidate_id)[1:]
    ]
    calls = [row for row in data.llm_calls if row.get("candidate_id") == candidate_id]
    result = data.results.get(candidate_id)
    axes = {axis.get("name") for axis in data.space}
    shape = {}
    if result is not None:
        # The grid's axes and the loss-shape profile (``shape_*``: slope and its sign at zero
        # margin, growth for badly ordered pairs, boundedness) that predict known failures.
        for source in (result.descriptors, result.metrics):
            shape.update({k: v for k, v in source.items() if (k in axes or k.startswith("shape_"))
                          and isinstance(v, (int, float))})
    validated = next((row for row in (data.validation or {}).get("losses", []) if row.get("id") == candidate_id), None)
    return _finite({**candidate.to_dict(), "evaluations": evaluations, "lineage": lineage, "llm_calls": calls,
                    "seed_scores": {str(k): v for k, v in sorted(data.seed_scores.get(candidate_id, {}).items())},
                    "estimate": _estimate_dict(seed_estimates(data).get(candidate_id)), "shape": shape,
                    "validation": validated})


def render_candidate(report: dict[str, Any], console=None) -> None:
    """Print a :func:`candidate_report`: header, thought, code (syntax-highlighted in a
    terminal), evaluations, lineage and the prompt and reply that produced it."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.markup import escape
    from rich.syntax import Syntax
    from rich.text import Text

    console = console or Console()
    console.print(f"[bold]{escape(visible(report['id']))} {escape(visible(report['name']))}[/bold]  "
                  f"generation {report['generation']}  operator {escape(visible(report['operator']))}  "
                  f"parents {report['parents'] or '-'}")
    if report["thought"]:
        console.print(f"thought: {visible(report['thought'])}", markup=False, highlight=False)
    console.print(Syntax(visible(report["code"]), "python"))
    for evaluation in report["evaluations"]:
        line = f"{evaluation['fitness_name']}: {evaluation['status']}"
        line += f" fitness {evaluation['fitness']:.4f}" if evaluation["status"] == "ok" else f" {evaluation['error']}"
        console.print(visible(line) + f" ({evaluation['seconds'] or 0:.2f} s)", markup=False)
    estimate = report.get("estimate")
    if estimate:
        gain = "" if estimate.get("gain") is None else f", paired gain over the baseline {estimate['gain']:+.4f}"
        console.print(f"over {estimate['seeds']} evaluation seeds: mean {estimate['mean']:.4f} ± {estimate['se']:.4f}"
                      f"{gain}, ranked at {estimate['lower']:.4f} (lower bound)", markup=False)
    validated = report.get("validation")
    if validated and validated.get("gain") is not None:
        se = "" if validated.get("gain_se") is None else f" ± {validated['gain_se']:.4f}"
        console.print(f"held-out validation: gain {validated['gain']:+.4f}{se} over {validated['seeds']} fresh seeds"
                      + (f"  [{validated['flag']}]" if validated.get("flag") else ""), markup=False)
    if report.get("shape"):
        console.print("loss shape: " + ", ".join(f"{k} {_fmt(v)}" for k, v in report["shape"].items()),
                      markup=False, highlight=False)
    if report["lineage"]:
        console.print("[bold]lineage[/bold] (ancestors, nearest first)")
        for ancestor in report["lineage"]:
            console.print(f"{'  ' * ancestor['depth']}<- {ancestor['id']} {ancestor['name']}  "
                          f"fitness {_fmt(ancestor['fitness'])}  gen {_fmt(ancestor['generation'])}  "
                          f"{ancestor['operator']}", markup=False, highlight=False)
    else:
        console.print("lineage: no parents (a seed or a fresh proposal)")
    for call in report["llm_calls"]:
        usage = ", ".join(f"{key} {call[key]}" for key in ("tokens_in", "tokens_out", "cost_usd", "latency_s")
                          if call.get(key) is not None)
        title = (f"LLM call {call.get('id', '')}: {call.get('operator') or '?'} / {call.get('model') or '?'}"
                 f" ({call.get('kind') or 'call'}, attempt {call.get('attempt', '?')})")
        console.print(Panel(Text(visible(_prompt_text(call.get("prompt")))),
                            title=escape(visible(f"{title} - prompt")), subtitle=escape(usage) or None))
        if call.get("reply") is not None:
            console.print(Panel(Text(visible(str(call["reply"]))), title="reply"))
        if call.get("error"):
            console.print(f"error: {visible(call['error'])}", markup=False, highlight=False)



def _prompt_text(prompt: Any) -> str:
    """A stored prompt (a JSON list of chat messages, or plain text) as readable text."""
    try:
        messages = json.loads(prompt) if isinstance(prompt, str) else prompt
    except ValueError:
        return str(prompt)
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return "\n\n".join(f"[{m.get('role', '?')}]\n{m.get('content', '')}" for m in messages)
    return str(prompt if prompt is not None else "")


def open_run(path: str | Path) -> RunStore:
    return RunStore.open(path, readonly=True)
