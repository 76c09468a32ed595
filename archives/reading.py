"""Reading a run back from its run log, fast and without plug-ins, torch, pyribs or pandas.

:func:`read_run` loads one run (optionally as it was after generation ``at_gen``) into a
:class:`RunData` of plain Python records; ``replay``, ``show``, the pandas API
(:mod:`archives.analysis`) and the plots are built on it. The MAP-Elites grid is read from
``archive.json`` when that file matches the requested generation and is otherwise rebuilt
from the stored evaluations and the descriptor space saved in the run's meta, exactly as
the engine built it (pyribs' cell index, best fitness per cell, the earlier candidate on ties).
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archives.grid import CODE_SIZE, MapElitesArchive, axis_bin, axis_value, bin_range
from archives.store import RunStore, StoreError
from engine.candidate import Candidate, EvalResult
from engine.genome import code_size
from engine.helpers import first_seed

#: Columns of the run store's ``llm_calls`` table (``prompt`` is the JSON list of chat
#: messages sent); the analysis frames always have them, even for runs without LLM calls.
LLM_CALL_COLUMNS = ("id", "candidate_id", "operator", "model", "kind", "attempt", "generation", "request_seed",
                    "prompt", "reply", "tokens_in", "tokens_out", "latency_s", "cost_usd", "error", "created")


@dataclass
class RunData:
    """One run as plain records.

    Attributes:
        path: The run folder.
        config: The resolved run settings (``RunConfig`` as a dict).
        fitness_name: The fitness plug-in the run was scored on.
        baseline: Name of the baseline seed (e.g. ``dpo``), if the plug-in names one.
        space: The archive's descriptor axes (dicts with name, low, high, bins, help).
        candidates: Every candidate by id (up to ``at_gen``).
        results: The run-fitness evaluation of each candidate by id.
        extra: Scores on other fitness plug-ins (``reevaluate``): label -> candidate id -> result.
        generations: Finished generations (``generation``, ``record``, ``state``, ``finished``).
        llm_calls: Rows of the ``llm_calls`` table (empty if the run has none).
        at_gen: The generation the data stops at, or None for everything stored.
        last_generation: The run's last finished generation overall (None before the first).
        reevaluations: How each extra label was scored (fitness spec, options, seed).
    """

    path: Path
    config: dict[str, Any]
    fitness_name: str | None
    baseline: str | None
    space: list[dict[str, Any]]
    candidates: dict[int, Candidate]
    results: dict[int, EvalResult]
    extra: dict[str, dict[int, EvalResult]]
    generations: list[dict[str, Any]]
    llm_calls: list[dict[str, Any]]
    at_gen: int | None = None
    last_generation: int | None = None
    reevaluations: dict[str, Any] = field(default_factory=dict)
    #: The fidelity stages' labels, cheapest first (empty without a ladder).
    ladder: list[str] = field(default_factory=list)
    #: What has been read so far (:meth:`RunStore.latest_ids` before the read); :func:`refresh_run`
    #: reads only what lies beyond it. Empty for a run read ``at_gen``.
    cursor: dict[str, int] = field(default_factory=dict)
    #: First-stage scores per evaluation seed: candidate id -> seed -> fitness (None: failed on
    #: that seed); the run's own seed for every scored candidate, fresh seeds for re-measured ones.
    seed_scores: dict[int, dict[int, float | None]] = field(default_factory=dict)
    #: The end-of-run validation (``engine.validation``), if the run has one.
    validation: dict[str, Any] | None = None
    _elites: list[dict[str, Any]] | None = field(default=None, repr=False)

    # -- derived views --------------------------------------------------------------------
    def scored(self) -> list[tuple[Candidate, EvalResult]]:
        """Successfully scored candidates, best first (earlier candidate first on ties)."""
        pairs = [(self.candidates[cid], r) for cid, r in self.results.items() if r.ok and cid in self.candidates]
        pairs.sort(key=lambda pair: (-pair[1].fitness, pair[0].id))
        return pairs

    def elites(self, objective: dict[int, float] | None = None) -> list[dict[str, Any]]:
        """The archive's elites, best first: dicts with ``id``, ``name``, ``fitness``, ``cell``,
        ``descriptors`` (axis -> value), ``operator``, ``generation``, ``parents``. Rebuilt (when
        ``archive.json`` is older than the data) with ``objective`` (candidate id -> what the run
        ranked it by, for a run that re-measured) or the scores."""
        if self._elites is None:
            self._elites = self._saved_elites()
            if self._elites is None:
                self._elites = rebuild_elites(self.space, self.candidates, self.results, objective)
        return self._elites

    def _saved_elites(self) -> list[dict[str, Any]] | None:
        """``archive.json``'s elites if it was written after the generation asked for."""
        if not self.generations:
            return None
        wanted = self.generations[-1]
        path = self.path / "archive.json"
        try:
            data = json.loads(path.read_text())
            summary = next(iter(data.get("summary", {}).values()), {})
            elites = list(data.get("elites", {}).values())
        except (OSError, ValueError, AttributeError):
            return None
        if summary.get("generation") != wanted["generation"]:
            return None
        # After the last generation's confirmation the grid was re-ranked: its size may differ.
        if len(elites) != wanted["record"].get("elites") and not summary.get("confirmed"):
            return None
        if any(e.get("id") not in self.results for e in elites):
            return None
        return sorted(elites, key=lambda e: (-e["fitness"], e["id"]))

    def lineage(self, candidate_id: int, max_depth: int | None = None) -> list[tuple[int, int]]:
        """Ancestors of a candidate, breadth first: ``(depth, id)`` with the candidate at depth 0."""
        seen = {candidate_id}
        order = [(0, candidate_id)]
        frontier = [candidate_id]
        depth = 0
        while frontier and (max_depth is None or depth < max_depth):
            depth += 1
            following = []
            for cid in frontier:
                candidate = self.candidates.get(cid)
                for parent in candidate.parents if candidate else ():
                    if parent not in seen:
                        seen.add(parent)
                        order.append((depth, parent))
                        following.append(parent)
            frontier = following
        return order

    def fitness_of(self, candidate_id: int) -> float | None:
        result = self.results.get(candidate_id)
        return result.fitness if result is not None and result.ok else None


def read_run(store: RunStore, at_gen: int | None = None) -> RunData:
    """Load a run from its store, as it was after generation ``at_gen`` (default: all).

    Raises:
        StoreError: The store is damaged (a table or row cannot be read).
        ValueError: ``at_gen`` names a generation the run has not finished.
    """
    try:
        return _read(store, at_gen)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{store.path} is damaged or incomplete ({exc}); it was not modified") from exc
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise StoreError(f"{store.path} holds a record this evoloss cannot read ({type(exc).__name__}: {exc})") from exc


def _read(store: RunStore, at_gen: int | None) -> RunData:
    # Taken first: rows another process adds during the read lie beyond it, and reading a row
    # twice is harmless (records are keyed by id), so refresh_run misses nothing.
    cursor = store.latest_ids() if at_gen is None else {}
    config = store.meta("config", {}) or {}
    fitness_name = store.meta("fitness_name") or config.get("fitness")
    generations = store.generations()
    last = generations[-1]["generation"] if generations else None
    if at_gen is not None:
        if last is None or not 0 <= at_gen <= last:
            finished = "no finished generation" if last is None else f"generations 0..{last}"
            raise ValueError(f"--at-gen {at_gen}: the run has {finished}")
        generations = [g for g in generations if g["generation"] <= at_gen]
    candidates = {c.id: c for c in store.candidates() if at_gen is None or c.generation <= at_gen}
    results: dict[int, EvalResult] = {}
    extra: dict[str, dict[int, EvalResult]] = {}
    for name, result in store.evaluations():
        if result.candidate_id not in candidates:
            continue
        if name == fitness_name:
            results[result.candidate_id] = result
        else:
            extra.setdefault(name, {})[result.candidate_id] = result
    seed_scores: dict[int, dict[int, float | None]] = {
        cid: {first_seed(config, candidates[cid].generation): r.fitness} for cid, r in results.items() if r.ok}
    for _, seed, result in store.seed_evaluations(fitness_name):
        if result.candidate_id in candidates:
            seed_scores.setdefault(result.candidate_id, {})[seed] = result.fitness if result.ok else None
    llm_calls = store.llm_calls() if hasattr(store, "llm_calls") else []
    if at_gen is not None and llm_calls:
        llm_calls = [row for row in llm_calls if _before_cut(row, candidates, at_gen)]
    return RunData(
        path=store.path.parent, config=config, fitness_name=fitness_name, baseline=store.meta("baseline"),
        space=list(store.meta("descriptor_space") or []), candidates=candidates, results=results, extra=extra,
        generations=generations, llm_calls=llm_calls, at_gen=at_gen, last_generation=last,
        reevaluations=store.meta("reevaluations") or {}, ladder=list(store.meta("fidelity_ladder") or []),
        cursor=cursor, seed_scores=seed_scores, validation=store.meta("validation") if at_gen is None else None,
    )


#: LLM calls are linked to the candidate they made just after it is made (an update, not a new
#: row); :func:`refresh_run` reads the unlinked replies among this many latest calls again.
_RELINK_WINDOW = 50


def refresh_run(store: RunStore, data: RunData) -> list[dict[str, Any]]:
    """Bring ``data`` (a :func:`read_run` of the whole run) up to date with what another
    process wrote since, reading only rows beyond ``data.cursor``: for following a run in
    progress without reading its store again.

    Returns:
        The new evaluations, as :meth:`RunStore.evaluations_after` gives them.

    Raises:
        StoreError: The store is damaged.
        ValueError: ``data`` was read at a past generation (``at_gen``).
    """
    if data.at_gen is not None or not data.cursor:
        raise ValueError("only a run read whole (without at_gen) can be refreshed")
    try:
        return _refresh(store, data)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{store.path} is damaged or incomplete ({exc}); it was not modified") from exc
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise StoreError(f"{store.path} holds a record this evoloss cannot read ({type(exc).__name__}: {exc})") from exc


def _refresh(store: RunStore, data: RunData) -> list[dict[str, Any]]:
    cursor = data.cursor
    # Evaluations before candidates: a candidate is stored before it is evaluated, so every
    # evaluation read here finds its candidate below.
    evaluations = store.evaluations_after(cursor["evaluations"])
    candidates = store.candidates(after=cursor["candidates"])
    generations = store.generations(after=cursor["generations"])
    unlinked = [row["id"] for row in data.llm_calls[-_RELINK_WINDOW:]
                if row.get("candidate_id") is None and row.get("reply") is not None]
    calls = store.llm_calls(after=min(unlinked) - 1 if unlinked else cursor["llm_calls"])
    fitness_name = store.meta("fitness_name") or data.config.get("fitness")
    if calls or generations or candidates or evaluations:
        data.config = store.meta("config", {}) or {}
        data.baseline = store.meta("baseline")
        data.space = list(store.meta("descriptor_space") or [])
        data.reevaluations = store.meta("reevaluations") or {}
        data.ladder = list(store.meta("fidelity_ladder") or [])
    if fitness_name != data.fitness_name:  # named once the run starts: sort what was read again
        everything = [(data.fitness_name, r) for r in data.results.values()]
        everything += [(name, r) for name, rows in data.extra.items() for r in rows.values()]
        data.fitness_name, data.results, data.extra = fitness_name, {}, {}
        for name, result in everything:
            _file_result(data, name, result)
    for candidate in candidates:
        data.candidates[candidate.id] = candidate
        cursor["candidates"] = max(cursor["candidates"], candidate.id)
    for row in evaluations:
        if row["result"].candidate_id in data.candidates:
            _file_result(data, row["fitness_name"], row["result"])
        cursor["evaluations"] = row["id"]
    if generations:
        by_number = {g["generation"]: g for g in data.generations}
        by_number.update((g["generation"], g) for g in generations)
        data.generations = [by_number[k] for k in sorted(by_number)]
        data.last_generation = data.generations[-1]["generation"]
        cursor["generations"] = data.last_generation
    if calls:
        by_id = {row["id"]: row for row in data.llm_calls}
        by_id.update((row["id"], row) for row in calls)
        data.llm_calls = [by_id[k] for k in sorted(by_id)]
        cursor["llm_calls"] = max(cursor["llm_calls"], calls[-1]["id"])
    if evaluations or candidates or generations:
        data._elites = None
    return evaluations


def _file_result(data: RunData, fitness_name: str | None, result: EvalResult) -> None:
    if fitness_name == data.fitness_name:
        data.results[result.candidate_id] = result
    else:
        data.extra.setdefault(fitness_name, {})[result.candidate_id] = result


def _before_cut(row: dict[str, Any], candidates: dict[int, Candidate], at_gen: int) -> bool:
    """Whether an LLM call was made by generation ``at_gen`` (by its candidate, else its generation)."""
    cid = row.get("candidate_id")
    if cid is not None:
        return cid in candidates
    generation = row.get("generation")
    return not isinstance(generation, int) or generation <= at_gen


# -- the MAP-Elites grid, rebuilt ---------------------------------------------------------------
def rebuild_elites(space: list[dict[str, Any]], candidates: dict[int, Candidate],
                   results: dict[int, EvalResult], objective: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """The grid's elites from scored candidates, best first, rebuilt through the run's own grid
    (:class:`archives.grid.MapElitesArchive`).

    Candidates are offered best first (ties: earlier generation, then lower id, the order a
    generational run added them in), so the first to reach a cell keeps it. The code size is only
    computed for candidates that can still win a cell: going down the fitness order, a
    candidate whose other axes' cells are all taken for every code-size bin cannot be an elite.
    """
    if not space:
        return []
    grid = MapElitesArchive(space)
    objective = objective or {}

    def value(cid: int, result: EvalResult) -> float:
        return objective.get(cid, result.fitness)

    scored = sorted(
        ((candidates[cid], r) for cid, r in results.items() if r.ok and cid in candidates),
        key=lambda pair: (-value(pair[0].id, pair[1]), pair[0].generation, pair[0].id),
    )
    size_axis = next((i for i, a in enumerate(space) if a["name"] == CODE_SIZE), None)
    size_bins = int(space[size_axis]["bins"]) if size_axis is not None else 1
    full: dict[tuple[int, ...], int] = {}
    added: list[tuple[Candidate, EvalResult]] = []
    for candidate, result in scored:
        rest = tuple(axis_bin(a, axis_value(a, result.descriptors.get(a["name"])))
                     for i, a in enumerate(space) if i != size_axis)
        descriptors = dict(result.descriptors)
        if size_axis is not None:
            if full.get(rest, 0) >= size_bins:
                continue
            if descriptors.get(CODE_SIZE) is None:
                try:
                    descriptors[CODE_SIZE] = code_size(candidate.code)
                except Exception:  # noqa: BLE001 - a scored genome parses; be safe all the same
                    descriptors[CODE_SIZE] = None
        if grid.add(candidate.id, value(candidate.id, result), descriptors) == "new":
            full[rest] = full.get(rest, 0) + 1
            added.append((candidate, result))
    by_id = {e.candidate_id: e for e in grid.elites()}
    elites = []
    for candidate, _ in added:
        elite = by_id[candidate.id]
        elites.append({
            "id": candidate.id, "name": candidate.name, "fitness": elite.fitness, "cell": list(elite.cell),
            "descriptors": dict(zip(grid.names, elite.descriptors)), "operator": candidate.label,
            "generation": candidate.generation, "parents": list(candidate.parents),
        })
    return elites


def cell_label(space: list[dict[str, Any]], cell: list[int] | tuple[int, ...]) -> str:
    """A cell as the descriptor ranges it covers: ``slope_at_zero [-1.5, -1) · code_size [60, 120)``."""
    parts = []
    for axis, index in zip(space, cell):
        low, high = bin_range(axis, index)
        parts.append(f"{axis['name']} [{low:g}, {high:g})")
    return " · ".join(parts)


# -- failures by kind ---------------------------------------------------------------------------
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d+(\.\d+)?(e[-+]?\d+)?")
_LINE_PREFIX = re.compile(r"^line \d+:\s*")


def error_kind(status: str, message: str | None) -> str:
    """A failure's kind: its status and the message's leading clause with names and numbers
    blanked (``invalid: name '…' is not allowed in a loss function``), so that the same
    problem in different genomes counts once."""
    text = _LINE_PREFIX.sub("", (message or "").strip().splitlines()[0] if message else "")
    text = re.split(r":\s|;\s", text, maxsplit=1)[0]
    text = _QUOTED.sub("'…'", text)
    text = _NUMBER.sub("N", text)
    text = re.sub(r"\(\s*N(?:\s*,\s*N?)*\s*\)", "(…)", text)
    words = text.split()
    text = " ".join(words[:12]) + (" …" if len(words) > 12 else "")
    return f"{status}: {text}" if text else status


# -- LLM calls ----------------------------------------------------------------------------------
def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def llm_usage(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Calls (and failed calls: an error and no reply), tokens, cost and latency in total
    and per (operator, model)."""
    total = {"calls": 0, "failed_calls": 0, "tokens_in": 0.0, "tokens_out": 0.0, "cost_usd": 0.0, "latency_s": 0.0}
    groups: dict[str, dict[str, Any]] = {}
    for row in calls:
        key = f"{row.get('operator') or '?'} / {row.get('model') or '?'}"
        group = groups.setdefault(key, {"operator": row.get("operator"), "model": row.get("model"), "calls": 0,
                                        "failed_calls": 0, "tokens_in": 0.0, "tokens_out": 0.0, "cost_usd": 0.0,
                                        "latency_s": 0.0})
        for bucket in (total, group):
            bucket["calls"] += 1
            bucket["failed_calls"] += bool(row.get("error")) and row.get("reply") is None
            for column in ("tokens_in", "tokens_out", "cost_usd", "latency_s"):
                bucket[column] += _number(row.get(column))
    for bucket in (total, *groups.values()):
        bucket["tokens_in"] = int(bucket["tokens_in"])
        bucket["tokens_out"] = int(bucket["tokens_out"])
    return {**total, "by_model": groups}


def spearman(pairs: list[tuple[float, float]]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 pairs."""
    if len(pairs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    a, b = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    var = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return cov / var if var else None
