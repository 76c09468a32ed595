"""The runs a dashboard serves, each kept in memory and brought up to date as it grows.

A :class:`RunLibrary` finds run folders (``run.sqlite``) under a folder, or serves one run.
Each :class:`LiveRun` reads its run once with :func:`archives.reading.read_run` and then,
at most every ``min_interval`` seconds and only when asked, reads just the rows written since
(:func:`archives.reading.refresh_run`), so a run in progress in another process is followed
without reading its store again. Views (the replay summary, the children of each candidate)
are computed once per change. Nothing here writes to a store: stores are opened read-only.
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from archives.reading import RunData, read_run, refresh_run
from archives.replay import summarize
from archives.store import STORE_NAME, RunStore, StoreError

#: How deep below the served folder run folders are looked for (``runs/<name>`` is depth 1).
SEARCH_DEPTH = 3
#: Evaluations kept for the live feed (the page shows the newest; a late poll gets these).
FEED_SIZE = 500
#: A run whose store has not been written for this long and that has not finished is shown
#: as interrupted (a killed run leaves no mark of its own; one evaluation rarely takes longer).
IDLE_SECONDS = 600.0

RUNNING, FINISHED, STOPPED, INTERRUPTED, UNREADABLE = "running", "finished", "stopped", "interrupted", "unreadable"


class RunNotFound(LookupError):
    """No run of that name is served."""


class Snapshot:
    """What a page shows of one run at one moment: ``version`` grows with every change. Read
    ``data`` and ``summary`` only while holding the run's ``lock`` (a refresh changes them)."""

    def __init__(self, run: LiveRun, version: int, data: RunData, status: str, last_write: float | None,
                 evaluations_stored: int) -> None:
        self._run = run
        self.version = version
        self.data = data
        self.status = status
        self.last_write = last_write
        self.evaluations_stored = evaluations_stored

    @property
    def summary(self) -> dict[str, Any]:
        """The replay summary (:func:`archives.replay.summarize`), computed once per version."""
        return self._run.view("summary", self.version, self._run.summarize)


class LiveRun:
    """One run, read once and then followed. Hold ``lock`` while reading its snapshot's data."""

    def __init__(self, key: str, path: Path, min_interval: float = 0.25, idle_seconds: float = IDLE_SECONDS) -> None:
        self.key = key
        self.path = path
        self.min_interval = min_interval
        self.idle_seconds = idle_seconds
        self.lock = threading.RLock()
        self._data: RunData | None = None
        self._checked = -math.inf
        self._version = 0
        self._feed: deque[dict[str, Any]] = deque(maxlen=FEED_SIZE)
        self._stopped: Any = None
        self._snapshot: Snapshot | None = None
        self._views: dict[tuple[str, int], Any] = {}

    # -- reading --------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> Snapshot:
        """The run as stored now (read at most every ``min_interval`` seconds).

        Raises:
            StoreError: The store is missing, damaged or of another format.
        """
        with self.lock:
            now = time.monotonic()
            if force or self._snapshot is None or now - self._checked >= self.min_interval:
                self._checked = now
                self._read()
            return self._snapshot

    def _read(self) -> None:
        store = RunStore.open(self.path, readonly=True)
        try:
            if self._data is None:
                self._data = read_run(store)
                last = self._data.cursor["evaluations"]
                self._feed.extend(_feed_row(self._data, row) for row in store.evaluations_after(max(-1, last - 50)))
                changed = True
            else:
                before = dict(self._data.cursor)
                new = refresh_run(store, self._data)
                self._feed.extend(_feed_row(self._data, row) for row in new)
                changed = before != self._data.cursor
            stopped = store.meta("stopped")
        finally:
            store.close()
        changed |= stopped != self._stopped
        self._stopped = stopped
        if changed or self._snapshot is None:
            self._version += 1
            self._views.clear()
        data = self._data
        evaluations = sum(r.status != "duplicate" for r in data.results.values())
        last_write = _last_write(self.path)
        status = run_status({"stopped": stopped, "last_generation": data.last_generation, "evaluations": evaluations},
                            data.config, last_write, self.idle_seconds)
        self._snapshot = Snapshot(self, self._version, data, status, last_write, data.cursor.get("evaluations", -1))

    def summarize(self) -> dict[str, Any]:
        with self.lock:
            return {**summarize(None, data=self._data), "stopped": self._stopped}

    def feed(self, after: int = -1, limit: int = 200) -> list[dict[str, Any]]:
        """The newest stored evaluations with a row id above ``after`` (at most ``limit``)."""
        with self.lock:
            rows = [row for row in self._feed if row["eval_id"] > after]
        return rows[-limit:]

    def view(self, name: str, version: int, make) -> Any:
        """A derived view of the run, computed once per version (under the run's lock, so that
        no refresh changes the records while it is made)."""
        with self.lock:
            key = (name, version)
            if key not in self._views:
                self._views[key] = make()
            return self._views[key]


def _feed_row(data: RunData, row: dict[str, Any]) -> dict[str, Any]:
    result = row["result"]
    candidate = data.candidates.get(result.candidate_id)
    return {"eval_id": row["id"], "candidate_id": result.candidate_id, "name": candidate.name if candidate else None,
            "generation": candidate.generation if candidate else None,
            "operator": candidate.operator if candidate else None, "fitness_name": row["fitness_name"],
            "status": result.status, "fitness": _finite(result.fitness), "error": result.error,
            "seconds": result.seconds, "finished": row["finished"]}


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _last_write(path: Path) -> float | None:
    """When the run's store was last written (the WAL file changes with every commit)."""
    times = []
    for name in (STORE_NAME, STORE_NAME + "-wal"):
        try:
            times.append((path / name).stat().st_mtime)
        except OSError:
            pass
    return max(times, default=None)


def run_status(summary: dict[str, Any], config: dict[str, Any], last_write: float | None,
               idle_seconds: float = IDLE_SECONDS, now: float | None = None) -> str:
    """``finished`` (every planned generation or evaluation done), ``stopped`` (ended early by
    a budget or a request), ``running`` (written within ``idle_seconds``) or ``interrupted``."""
    if summary.get("stopped"):
        return STOPPED
    last = summary.get("last_generation")
    gens = config.get("gens")
    max_evals = config.get("max_evals") or 0
    if max_evals and summary.get("evaluations", 0) >= max_evals:
        return FINISHED
    if isinstance(gens, int) and last is not None and last >= gens and not max_evals:
        return FINISHED
    now = time.time() if now is None else now
    if last_write is not None and now - last_write < idle_seconds:
        return RUNNING
    return INTERRUPTED


class RunLibrary:
    """The runs under ``root`` (a folder of runs, or one run folder), by key.

    A key is the run folder's path below ``root`` with ``/`` written ``:`` (the folder's own
    name when ``root`` is one run), so that it fits in one URL segment.
    """

    def __init__(self, root: str | Path, min_interval: float = 0.25, idle_seconds: float = IDLE_SECONDS) -> None:
        self.root = Path(root).resolve()
        if not self.root.exists():
            raise StoreError(f"{root} does not exist: pass a run folder or a folder of runs")
        self.min_interval = min_interval
        self.idle_seconds = idle_seconds
        self._runs: dict[str, LiveRun] = {}
        self._lock = threading.Lock()
        self._scanned = -math.inf

    def _scan(self) -> dict[str, Path]:
        if (self.root / STORE_NAME).exists():
            return {self.root.name: self.root}
        found: dict[str, Path] = {}
        frontier = [self.root]
        for _ in range(SEARCH_DEPTH):
            following = []
            for folder in frontier:
                try:
                    entries = sorted(os.scandir(folder), key=lambda e: e.name)
                except OSError:
                    continue
                for entry in entries:
                    if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
                        continue
                    path = Path(entry.path)
                    if (path / STORE_NAME).exists():
                        found[path.relative_to(self.root).as_posix().replace("/", ":")] = path
                    else:
                        following.append(path)
            frontier = following
        return found

    def runs(self) -> list[LiveRun]:
        """Every run found (the folder is looked through again at most every second)."""
        with self._lock:
            if time.monotonic() - self._scanned >= 1.0:
                self._scanned = time.monotonic()
                for key, path in self._scan().items():
                    if key not in self._runs:
                        self._runs[key] = LiveRun(key, path, self.min_interval, self.idle_seconds)
            return sorted(self._runs.values(), key=lambda run: run.key)

    def get(self, key: str) -> LiveRun:
        with self._lock:
            run = self._runs.get(key)
        if run is None:
            run = next((r for r in self.runs() if r.key == key), None)
        if run is None:
            raise RunNotFound(f"no run {key!r} is served from {self.root}")
        return run
