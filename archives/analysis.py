"""A run as pandas DataFrames, for notebooks and scripts::

    from archives import load_run

    run = load_run("runs/synthetic-pref-20250101-120000")
    run.best(5)                  # the five best losses (a DataFrame)
    run.generations[["generation", "max", "mean", "best"]]
    run.lineage(run.best(1).index[0])
    run.export("out", "parquet")

Frames and their columns (extra columns may follow; every frame is indexed by its first
column where one is named ``id``):

``candidates``: one row per genome. ``id``, ``name``, ``generation``, ``operator``,
``parents`` (list of ids), ``thought``, ``code``, ``code_hash``, then the run-fitness
evaluation: ``status``, ``fitness``, ``error``, ``error_kind``, ``seconds``,
``improved`` (scored above its best scored parent), and one ``fitness:<label>`` column per
fitness the run was re-evaluated on (``python -m engine reevaluate``).

``evaluations``: one row per evaluation. ``candidate_id``, ``fitness_name``, ``status``,
``fitness``, ``error``, ``error_kind``, ``seconds``, ``duplicate_of``, ``fingerprint``,
``metrics`` (dict), ``descriptors`` (dict), then the scalar metrics as ``metric_<key>`` and
the descriptors as ``descriptor_<name>``.

``generations``: one row per finished generation. ``generation``, ``evals``, ``ok``,
``invalid``, ``failed``, ``duplicates``, ``max``, ``mean``, ``min``, ``std`` (of the
generation's fitness), ``best`` (best so far), ``elites``, ``cells``, ``coverage``,
``qd_score``, ``finished`` (unix time).

``llm_calls``: one row per LLM call (empty when the run made none). At least ``id``,
``candidate_id``, ``operator``, ``model``, ``prompt``, ``reply``, ``tokens_in``,
``tokens_out``, ``cost_usd``, ``latency``.

``archive``: the MAP-Elites elites, best first. ``id``, ``name``, ``fitness``, ``cell``
(tuple of bin indices), ``region`` (the descriptor ranges of the cell), ``generation``,
``operator``, then ``descriptor_<name>`` per axis.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from archives.reading import LLM_CALL_COLUMNS, RunData, cell_label, error_kind, read_run
from archives.store import RunStore

CANDIDATE_COLUMNS = ("id", "name", "generation", "operator", "variation", "parents", "thought", "code", "code_hash",
                     "status", "fitness", "error", "error_kind", "seconds", "improved")
EVALUATION_COLUMNS = ("candidate_id", "fitness_name", "status", "fitness", "error", "error_kind", "seconds",
                      "duplicate_of", "fingerprint", "metrics", "descriptors")
GENERATION_COLUMNS = ("generation", "evals", "ok", "invalid", "failed", "duplicates", "max", "mean", "min", "std",
                      "best", "elites", "cells", "coverage", "qd_score", "finished")
ARCHIVE_COLUMNS = ("id", "name", "fitness", "cell", "region", "generation", "operator")
EXPORT_FORMATS = ("csv", "parquet")


class Run:
    """One run's frames (see the module docstring). Build it with :func:`load_run`."""

    def __init__(self, data: RunData) -> None:
        import pandas as pd

        self.data = data
        self.path = data.path
        self.fitness_name = data.fitness_name
        self.baseline = data.baseline
        self.config = data.config
        self.space = data.space
        self.at_gen = data.at_gen
        self.extra_fitness = sorted(data.extra)
        self.evaluations = self._evaluations(pd)
        self.candidates = self._candidates(pd)
        self.generations = self._generations(pd)
        self.llm_calls = self._llm_calls(pd)
        self.archive = self._archive(pd)

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, fitness={self.fitness_name!r}, candidates={len(self.candidates)}, "
                f"generations={len(self.generations)}, elites={len(self.archive)})")

    # -- frames ---------------------------------------------------------------------------
    def _evaluations(self, pd):
        rows = []
        results = [(self.fitness_name, r) for r in self.data.results.values()]
        results += [(label, r) for label in self.extra_fitness for r in self.data.extra[label].values()]
        for name, r in results:
            row = {"candidate_id": r.candidate_id, "fitness_name": name, "status": r.status, "fitness": r.fitness,
                   "error": r.error, "error_kind": error_kind(r.status, r.error) if not r.ok else None,
                   "seconds": r.seconds, "duplicate_of": r.duplicate_of, "fingerprint": r.fingerprint,
                   "metrics": r.metrics, "descriptors": r.descriptors}
            for key, value in r.metrics.items():
                if isinstance(value, (int, float, str, bool)) or value is None:
                    row[f"metric_{key}"] = value
            for key, value in r.descriptors.items():
                row[f"descriptor_{key}"] = value
            rows.append(row)
        return _frame(pd, rows, EVALUATION_COLUMNS)

    def _candidates(self, pd):
        data = self.data
        rows = []
        for c in data.candidates.values():
            r = data.results.get(c.id)
            parent_scores = [data.fitness_of(p) for p in c.parents if data.fitness_of(p) is not None]
            row = {"id": c.id, "name": c.name, "generation": c.generation, "operator": c.operator,
                   "variation": str(c.variation), "parents": list(c.parents), "thought": c.thought, "code": c.code,
                   "code_hash": c.code_hash,
                   "status": r.status if r else None, "fitness": r.fitness if r else None,
                   "error": r.error if r else None,
                   "error_kind": error_kind(r.status, r.error) if r is not None and not r.ok else None,
                   "seconds": r.seconds if r else None,
                   "improved": bool(r is not None and r.ok and parent_scores and r.fitness > max(parent_scores))}
            for label in self.extra_fitness:
                other = data.extra[label].get(c.id)
                row[f"fitness:{label}"] = other.fitness if other is not None and other.ok else None
            rows.append(row)
        return _frame(pd, rows, CANDIDATE_COLUMNS, index="id")

    def _generations(self, pd):
        rows = []
        for g in self.data.generations:
            record = {k: v for k, v in g["record"].items() if k != "gen"}
            rows.append({"generation": g["generation"], **record, "finished": g["finished"]})
        return _frame(pd, rows, GENERATION_COLUMNS)

    def _llm_calls(self, pd):
        return _frame(pd, self.data.llm_calls, LLM_CALL_COLUMNS)

    def _archive(self, pd):
        rows = []
        for e in self.data.elites():
            row = {"id": e["id"], "name": e["name"], "fitness": e["fitness"], "cell": tuple(e["cell"]),
                   "region": cell_label(self.space, e["cell"]), "generation": e.get("generation"),
                   "operator": e.get("operator")}
            for key, value in (e.get("descriptors") or {}).items():
                row[f"descriptor_{key}"] = value
            rows.append(row)
        return _frame(pd, rows, ARCHIVE_COLUMNS, index="id")

    # -- convenience ----------------------------------------------------------------------
    def best(self, k: int = 5, fitness: str | None = None):
        """The ``k`` best scored candidates (a ``candidates`` slice), best first; ``fitness``
        ranks by a re-evaluation label instead of the run's fitness."""
        column = "fitness" if fitness in (None, self.fitness_name) else f"fitness:{fitness}"
        if column not in self.candidates:
            raise KeyError(f"no scores for fitness {fitness!r}; known: {[self.fitness_name, *self.extra_fitness]}")
        scored = self.candidates[self.candidates[column].notna()]
        if column == "fitness":
            scored = scored[scored["status"] == "ok"]
        return scored.sort_values([column, "id"], ascending=[False, True], kind="stable").head(k)

    def lineage(self, candidate_id: int, max_depth: int | None = None):
        """The candidate and its ancestors (parents, grandparents...) with a ``depth`` column."""
        order = self.data.lineage(int(candidate_id), max_depth)
        frame = self.candidates.loc[[cid for _, cid in order if cid in self.candidates.index]].copy()
        depth = dict((cid, d) for d, cid in order)
        frame.insert(0, "depth", [depth[cid] for cid in frame.index])
        return frame

    def code(self, candidate_id: int) -> str:
        return self.candidates.loc[int(candidate_id), "code"]

    def summary(self, top: int = 5) -> dict[str, Any]:
        """The ``replay --json`` object of this run."""
        from archives.replay import summarize

        return summarize(None, top=top, data=self.data)

    def export(self, directory: str | Path, fmt: str = "csv") -> list[Path]:
        """Write every frame to ``directory`` as ``<frame>.csv`` or ``<frame>.parquet``. Lists,
        tuples and dicts (parents, metrics, cells) are written as JSON text."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError as exc:
                raise ImportError("parquet export needs pyarrow: pip install 'evoloss[analysis]' "
                                  "(or pip install pyarrow), or export as csv") from exc
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name in ("candidates", "evaluations", "generations", "llm_calls", "archive"):
            frame = _jsonable_frame(getattr(self, name))
            path = directory / f"{name}.{fmt}"
            if fmt == "csv":
                frame.to_csv(path, index=False)
            else:
                frame.to_parquet(path, index=False)
            written.append(path)
        return written


def load_run(path: str | Path, at_gen: int | None = None) -> Run:
    """Load the run in folder ``path`` (or its ``run.sqlite``), as it was after generation
    ``at_gen`` (default: everything stored).

    Raises:
        archives.store.StoreError: No run there, or the store is damaged or of another version.
        ValueError: ``at_gen`` is not a finished generation of the run.
    """
    store = RunStore.open(path, readonly=True)
    try:
        data = read_run(store, at_gen)
    finally:
        store.close()
    return Run(data)


def _frame(pd, rows: list[dict[str, Any]], columns: tuple[str, ...], index: str | None = None):
    """A frame with the documented ``columns`` first (present even when there are no rows)."""
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = pd.Series(dtype=object)
    frame = frame[[*columns, *[c for c in frame.columns if c not in columns]]]
    if index is not None:
        frame = frame.set_index(index, drop=False)
        frame.index.name = None
    return frame


def _jsonable_frame(frame):
    """Nested values as JSON text, and columns that mix text with numbers as text, so that
    both csv and parquet (one type per column) can hold every frame."""
    import json

    def kind(value: Any) -> str:
        if isinstance(value, bool):
            return "bool"
        return "number" if isinstance(value, (int, float)) else type(value).__name__

    frame = frame.reset_index(drop=True).copy()
    for column in frame.columns:
        values = frame[column]
        if values.dtype != object:
            continue
        if values.map(lambda v: isinstance(v, (list, tuple, dict))).any():
            values = values.map(lambda v: json.dumps(list(v) if isinstance(v, tuple) else v)
                                if isinstance(v, (list, tuple, dict)) else v)
        kinds = {kind(v) for v in values if v is not None and not (isinstance(v, float) and v != v)}
        if len(kinds) > 1:
            values = values.map(lambda v: v if v is None else str(v))
        frame[column] = values
    return frame
