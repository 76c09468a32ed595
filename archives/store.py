"""The run log: every candidate, evaluation and finished generation of a run, in SQLite (WAL).

Each write is its own transaction, committed before the engine goes on, so a run killed at
any moment (even SIGKILL) keeps everything that finished and resumes from it. The file is
``run.sqlite`` inside the run folder.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from engine.candidate import Candidate, EvalResult

STORE_NAME = "run.sqlite"
FORMAT = "evoloss-run"
VERSION = 2
#: Older format versions this code opens, and migrates in place when opened for writing
#: (version 1 kept a candidate's operator and variation in one column: ``symbolic:mutate``).
MIGRATES = (1,)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    code TEXT NOT NULL,
    thought TEXT NOT NULL,
    parents TEXT NOT NULL,
    operator TEXT NOT NULL,
    generation INTEGER NOT NULL,
    code_hash TEXT NOT NULL,
    created REAL NOT NULL,
    variation TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    fitness_name TEXT NOT NULL,
    status TEXT NOT NULL,
    fitness REAL,
    metrics TEXT NOT NULL,
    descriptors TEXT NOT NULL,
    fingerprint TEXT,
    error TEXT,
    seconds REAL NOT NULL,
    duplicate_of INTEGER,
    finished REAL NOT NULL,
    eval_seed INTEGER
);
CREATE INDEX IF NOT EXISTS evaluations_candidate ON evaluations(candidate_id);
CREATE TABLE IF NOT EXISTS generations (
    generation INTEGER PRIMARY KEY,
    record TEXT NOT NULL,
    state TEXT NOT NULL,
    finished REAL NOT NULL
);
"""

#: LLM calls (prompt, reply, tokens, cost); added in place to stores written before it existed,
#: which simply have no rows. ``prompt`` is the JSON list of chat messages sent.
_LLM_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_id INTEGER REFERENCES candidates(id),
    operator TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    generation INTEGER,
    request_seed INTEGER,
    prompt TEXT NOT NULL,
    reply TEXT,
    tokens_in INTEGER NOT NULL DEFAULT 0,
    tokens_out INTEGER NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS llm_calls_candidate ON llm_calls(candidate_id);
"""

#: Columns of ``llm_calls`` a caller may set (``id`` and ``created`` are filled in).
LLM_CALL_FIELDS = ("candidate_id", "operator", "model", "kind", "attempt", "generation", "request_seed", "prompt",
                   "reply", "tokens_in", "tokens_out", "latency_s", "cost_usd", "error")


class StoreError(Exception):
    """A run store is missing, corrupt, of another format or in the wrong state."""


class RunStore:
    """SQLite run log of one run folder. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        # LLM calls are recorded from the operators' threads: on a connection of their own.
        self._calls_db: sqlite3.Connection | None = None
        self._calls_lock = threading.Lock()
        # Stores older than format 2 have no eval_seed column (read-only opens are not migrated).
        columns = {row[1] for row in connection.execute("PRAGMA table_info(evaluations)")}
        self._own = "eval_seed IS NULL" if "eval_seed" in columns or not columns else "1"

    # -- opening ----------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        connection = sqlite3.connect(path, isolation_level=None, timeout=30)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (not a power cut) and is much faster.
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    @classmethod
    def create(cls, run_dir: str | Path, config: dict[str, Any]) -> RunStore:
        run_dir = Path(run_dir)
        path = run_dir / STORE_NAME
        if path.exists() and path.stat().st_size == 0:
            path.unlink()  # an empty file (a reader that connected too early made it) holds no run
        if path.exists():
            raise StoreError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        store = cls(path, cls._connect(path))
        store._db.executescript(_SCHEMA + _LLM_SCHEMA)
        store.set_meta("format", FORMAT)
        store.set_meta("version", VERSION)
        store.set_meta("created", time.time())
        store.set_meta("config", config)
        return store

    @classmethod
    def open(cls, run_dir: str | Path, readonly: bool = False) -> RunStore:
        run_dir = Path(run_dir)
        path = run_dir / STORE_NAME if run_dir.is_dir() or not run_dir.suffix else run_dir
        if not path.exists():
            raise StoreError(f"no run found at {run_dir}: {path} does not exist")
        try:
            if readonly:
                connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
                connection.row_factory = sqlite3.Row
            else:
                connection = cls._connect(path)
            rows = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path} is not a readable evoloss run store ({exc}); it was not modified") from exc
        if json.loads(rows.get("format", "null")) != FORMAT:
            raise StoreError(f"{path} is not an evoloss run store (format {rows.get('format')!r})")
        version = json.loads(rows.get("version", "0"))
        if version != VERSION and version not in MIGRATES:
            raise StoreError(
                f"{path} has run-store format version {version}; this evoloss reads version {VERSION}. "
                "Use the evoloss release that wrote it, or start a new run."
            )
        store = cls(path, connection)
        if not readonly:
            store._db.executescript(_LLM_SCHEMA)
            if version != VERSION:
                store._migrate(version)
        try:
            store._db.execute("SELECT count(*) FROM candidates").fetchone()
            store._db.execute("SELECT count(*) FROM evaluations").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path} is damaged: {exc}") from exc
        return store

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _migrate(self, version: int) -> None:
        """Bring an older store to :data:`VERSION` in one transaction (a kill leaves it as it was)."""
        with self._transaction():
            if version < 2:
                if "eval_seed" not in self._columns("evaluations"):
                    self._db.execute("ALTER TABLE evaluations ADD COLUMN eval_seed INTEGER")
                self._db.execute("ALTER TABLE candidates ADD COLUMN variation TEXT NOT NULL DEFAULT ''")
                rows = self._db.execute("SELECT id, operator FROM candidates").fetchall()
                split = [Candidate(r["id"], "", "", operator=r["operator"]) for r in rows]
                self._db.executemany("UPDATE candidates SET operator = ?, variation = ? WHERE id = ?",
                                     [(c.operator, c.variation, c.id) for c in split])
            self.set_meta("version", VERSION)
        self._own = "eval_seed IS NULL"

    def close(self) -> None:
        with self._calls_lock:
            if self._calls_db is not None:
                self._calls_db.close()
                self._calls_db = None
        self._db.close()

    def _transaction(self):
        db = self._db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, value, tb):
                db.execute("COMMIT" if kind is None else "ROLLBACK")

        return _Tx()

    # -- writing ----------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def add_candidates(self, candidates: list[Candidate]) -> None:
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT INTO candidates (id, name, code, thought, parents, operator, variation, generation, code_hash, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(c.id, c.name, c.code, c.thought, json.dumps(list(c.parents)), c.operator, c.variation, c.generation,
                  c.code_hash, now) for c in candidates],
            )

    def add_evaluation(self, result: EvalResult, fitness_name: str, eval_seed: int | None = None) -> None:
        """Record one evaluation. ``eval_seed`` is set for a re-measurement on another evaluation
        seed (or a validation); the run's own evaluation of a candidate leaves it empty."""
        self._db.execute(
            "INSERT INTO evaluations (candidate_id, fitness_name, status, fitness, metrics, descriptors, fingerprint, "
            "error, seconds, duplicate_of, finished, eval_seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (result.candidate_id, fitness_name, result.status, result.fitness, json.dumps(result.metrics),
             json.dumps(result.descriptors), result.fingerprint, result.error, result.seconds,
             result.duplicate_of, time.time(), eval_seed),
        )

    def finish_generation(self, generation: int, record: dict[str, Any], state: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO generations (generation, record, state, finished) VALUES (?, ?, ?, ?)",
            (generation, json.dumps(record), json.dumps(state), time.time()),
        )

    def add_llm_call(self, **call: Any) -> int:
        """Record one LLM call (thread-safe; committed at once) and return its id. Keys are
        :data:`LLM_CALL_FIELDS`; ``operator``, ``model``, ``kind``, ``attempt`` and ``prompt``
        are required."""
        unknown = sorted(set(call) - set(LLM_CALL_FIELDS))
        if unknown:
            raise ValueError(f"add_llm_call: unknown field(s) {unknown}; known: {list(LLM_CALL_FIELDS)}")
        names = [name for name in LLM_CALL_FIELDS if name in call]
        with self._calls_lock:
            if self._calls_db is None:
                self._calls_db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
                self._calls_db.execute("PRAGMA synchronous=NORMAL")
            cursor = self._calls_db.execute(
                f"INSERT INTO llm_calls ({', '.join(names)}, created) VALUES ({', '.join('?' * len(names))}, ?)",
                [call[name] for name in names] + [time.time()],
            )
            return int(cursor.lastrowid)

    def link_llm_calls(self, call_ids: list[int] | tuple[int, ...], candidate_id: int) -> None:
        """Mark the calls that produced ``candidate_id``."""
        if call_ids:
            with self._transaction():
                self._db.executemany("UPDATE llm_calls SET candidate_id = ? WHERE id = ?",
                                     [(candidate_id, call_id) for call_id in call_ids])

    # -- reading ----------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def candidates(self, after: int | None = None) -> list[Candidate]:
        """Every candidate in id order, or only those with an id above ``after``."""
        where, values = (" WHERE id > ?", (after,)) if after is not None else ("", ())
        return [
            Candidate(id=r["id"], name=r["name"], code=r["code"], thought=r["thought"],
                      parents=tuple(json.loads(r["parents"])), operator=r["operator"],
                      generation=r["generation"], code_hash=r["code_hash"],
                      variation=r["variation"] if "variation" in r.keys() else "")  # noqa: SIM118 - sqlite3.Row has no __contains__ for keys
            for r in self._db.execute(f"SELECT * FROM candidates{where} ORDER BY id", values)
        ]

    def evaluations(self, fitness_name: str | None = None) -> Iterator[tuple[str, EvalResult]]:
        """The run's own evaluations (one per candidate and fitness), in order; re-measurements on
        other seeds and validations are read with :meth:`seed_evaluations`."""
        query = (f"SELECT * FROM evaluations WHERE {self._own}" + (" AND fitness_name = ?" if fitness_name else "")
                 + " ORDER BY id")
        for r in self._db.execute(query, (fitness_name,) if fitness_name else ()):
            yield r["fitness_name"], _result(r)

    def seed_evaluations(self, fitness_name: str | None = None) -> list[tuple[str, int, EvalResult]]:
        """Re-measurements on other evaluation seeds and validations: ``(fitness_name, eval_seed,
        result)`` in order."""
        if self._own == "1":
            return []
        query = ("SELECT * FROM evaluations WHERE eval_seed IS NOT NULL"
                 + (" AND fitness_name = ?" if fitness_name else "") + " ORDER BY id")
        return [(r["fitness_name"], r["eval_seed"], _result(r))
                for r in self._db.execute(query, (fitness_name,) if fitness_name else ())]

    def evaluations_after(self, evaluation_id: int) -> list[dict[str, Any]]:
        """Evaluations stored after row ``evaluation_id``, in order: dicts with the row's ``id``,
        ``fitness_name``, ``finished`` (unix time) and ``result`` (an :class:`EvalResult`).
        Row ids only grow, so a reader following a run in progress keeps the last id it saw."""
        return [
            {"id": r["id"], "fitness_name": r["fitness_name"], "finished": r["finished"], "result": _result(r)}
            for r in self._db.execute(f"SELECT * FROM evaluations WHERE id > ? AND {self._own} ORDER BY id",
                                      (evaluation_id,))
        ]

    def latest_ids(self) -> dict[str, int]:
        """The highest candidate id, evaluation row id, LLM call id and finished generation
        (-1 where there is none): what a reader following a run compares to see news."""
        one = self._db.execute(
            "SELECT (SELECT coalesce(max(id), -1) FROM candidates), (SELECT coalesce(max(id), -1) FROM evaluations), "
            "(SELECT coalesce(max(generation), -1) FROM generations)").fetchone()
        try:
            calls = self._db.execute("SELECT coalesce(max(id), -1) FROM llm_calls").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            calls = -1
        return {"candidates": int(one[0]), "evaluations": int(one[1]), "generations": int(one[2]),
                "llm_calls": int(calls)}

    def llm_calls(self, candidate_id: int | None = None, operator: str | None = None,
                  after: int | None = None) -> list[dict[str, Any]]:
        """Recorded LLM calls in order, optionally those of one candidate or one operator, or
        with an id above ``after`` (a store written before LLM operators existed has none)."""
        where, values = [], []
        if after is not None:
            where.append("id > ?")
            values.append(after)
        if candidate_id is not None:
            where.append("candidate_id = ?")
            values.append(candidate_id)
        if operator is not None:
            where.append("operator = ?")
            values.append(operator)
        query = "SELECT * FROM llm_calls" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        try:
            return [dict(row) for row in self._db.execute(query, values)]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise

    def llm_totals(self) -> dict[str, Any]:
        """Calls, tokens in and out and estimated cost of the run's LLM calls."""
        try:
            row = self._db.execute(
                "SELECT count(*), coalesce(sum(tokens_in), 0), coalesce(sum(tokens_out), 0), "
                "coalesce(sum(cost_usd), 0.0), coalesce(sum(error IS NOT NULL AND reply IS NULL), 0) FROM llm_calls"
            ).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            row = (0, 0, 0, 0.0, 0)
        return {"calls": int(row[0]), "tokens_in": int(row[1]), "tokens_out": int(row[2]), "cost_usd": float(row[3]),
                "failed_calls": int(row[4])}

    def generations(self, after: int | None = None) -> list[dict[str, Any]]:
        """Finished generations in order, or only those after generation ``after``."""
        where, values = (" WHERE generation > ?", (after,)) if after is not None else ("", ())
        return [
            {"generation": r["generation"], "record": json.loads(r["record"]), "state": json.loads(r["state"]),
             "finished": r["finished"]}
            for r in self._db.execute(f"SELECT * FROM generations{where} ORDER BY generation", values)
        ]


def _result(row) -> EvalResult:
    """An ``evaluations`` row as the record the engine wrote."""
    return EvalResult(
        candidate_id=row["candidate_id"], status=row["status"], fitness=row["fitness"],
        metrics=json.loads(row["metrics"]), descriptors=json.loads(row["descriptors"]),
        fingerprint=row["fingerprint"], error=row["error"], seconds=row["seconds"], duplicate_of=row["duplicate_of"],
    )
