"""The run log: every candidate, evaluation and finished generation of a run, in SQLite (WAL).

Each write is its own transaction, committed before the engine goes on, so a run killed at
any moment (even SIGKILL) keeps everything that finished and resumes from it. The file is
``run.sqlite`` inside the run folder.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from engine.candidate import Candidate, EvalResult

STORE_NAME = "run.sqlite"
FORMAT = "evoloss-run"
VERSION = 1

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
    created REAL NOT NULL
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
    finished REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_candidate ON evaluations(candidate_id);
CREATE TABLE IF NOT EXISTS generations (
    generation INTEGER PRIMARY KEY,
    record TEXT NOT NULL,
    state TEXT NOT NULL,
    finished REAL NOT NULL
);
"""


class StoreError(Exception):
    """A run store is missing, corrupt, of another format or in the wrong state."""


class RunStore:
    """SQLite run log of one run folder. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection

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
    def create(cls, run_dir: str | Path, config: dict[str, Any]) -> "RunStore":
        run_dir = Path(run_dir)
        path = run_dir / STORE_NAME
        if path.exists():
            raise StoreError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        store = cls(path, cls._connect(path))
        store._db.executescript(_SCHEMA)
        store.set_meta("format", FORMAT)
        store.set_meta("version", VERSION)
        store.set_meta("created", time.time())
        store.set_meta("config", config)
        return store

    @classmethod
    def open(cls, run_dir: str | Path, readonly: bool = False) -> "RunStore":
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
        if version != VERSION:
            raise StoreError(
                f"{path} has run-store format version {version}; this evoloss reads version {VERSION}. "
                "Use the evoloss release that wrote it, or start a new run."
            )
        store = cls(path, connection)
        try:
            store._db.execute("SELECT count(*) FROM candidates").fetchone()
            store._db.execute("SELECT count(*) FROM evaluations").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path} is damaged: {exc}") from exc
        return store

    def close(self) -> None:
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
                "INSERT INTO candidates (id, name, code, thought, parents, operator, generation, code_hash, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(c.id, c.name, c.code, c.thought, json.dumps(list(c.parents)), c.operator, c.generation,
                  c.code_hash, now) for c in candidates],
            )

    def add_evaluation(self, result: EvalResult, fitness_name: str) -> None:
        self._db.execute(
            "INSERT INTO evaluations (candidate_id, fitness_name, status, fitness, metrics, descriptors, fingerprint, "
            "error, seconds, duplicate_of, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (result.candidate_id, fitness_name, result.status, result.fitness, json.dumps(result.metrics),
             json.dumps(result.descriptors), result.fingerprint, result.error, result.seconds,
             result.duplicate_of, time.time()),
        )

    def finish_generation(self, generation: int, record: dict[str, Any], state: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO generations (generation, record, state, finished) VALUES (?, ?, ?, ?)",
            (generation, json.dumps(record), json.dumps(state), time.time()),
        )

    # -- reading ----------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def candidates(self) -> list[Candidate]:
        return [
            Candidate(id=r["id"], name=r["name"], code=r["code"], thought=r["thought"],
                      parents=tuple(json.loads(r["parents"])), operator=r["operator"],
                      generation=r["generation"], code_hash=r["code_hash"])
            for r in self._db.execute("SELECT * FROM candidates ORDER BY id")
        ]

    def evaluations(self, fitness_name: str | None = None) -> Iterator[tuple[str, EvalResult]]:
        query = "SELECT * FROM evaluations" + (" WHERE fitness_name = ?" if fitness_name else "") + " ORDER BY id"
        for r in self._db.execute(query, (fitness_name,) if fitness_name else ()):
            yield r["fitness_name"], EvalResult(
                candidate_id=r["candidate_id"], status=r["status"], fitness=r["fitness"],
                metrics=json.loads(r["metrics"]), descriptors=json.loads(r["descriptors"]),
                fingerprint=r["fingerprint"], error=r["error"], seconds=r["seconds"],
                duplicate_of=r["duplicate_of"],
            )

    def generations(self) -> list[dict[str, Any]]:
        return [
            {"generation": r["generation"], "record": json.loads(r["record"]), "state": json.loads(r["state"]),
             "finished": r["finished"]}
            for r in self._db.execute("SELECT * FROM generations ORDER BY generation")
        ]
