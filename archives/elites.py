"""The elite archive: ``archive.json`` in the run folder, a small human-readable tinydb file
holding the archive's elites (name, fitness, cell, descriptors, code). It is written to a
temporary file, fsynced and renamed over the old one, so a kill mid-write never leaves a
corrupt archive. The run log (``run.sqlite``) remains the source of truth."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tinydb import TinyDB
from tinydb.storages import JSONStorage

ARCHIVE_NAME = "archive.json"


def write_elites(run_dir: str | os.PathLike, elites: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """Atomically replace ``archive.json`` with ``elites`` (and one ``summary`` document)."""
    run_dir = Path(run_dir)
    final = run_dir / ARCHIVE_NAME
    temporary = run_dir / f".{ARCHIVE_NAME}.tmp"
    temporary.unlink(missing_ok=True)
    database = TinyDB(temporary, storage=JSONStorage, indent=1, sort_keys=True)
    try:
        database.table("elites").insert_multiple(elites)
        database.table("summary").insert(summary)
    finally:
        database.close()
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    directory = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return final


def read_elites(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The elites stored in ``archive.json``, best first."""
    path = Path(run_dir) / ARCHIVE_NAME
    database = TinyDB(path, storage=JSONStorage, access_mode="r")
    try:
        return sorted(database.table("elites").all(), key=lambda e: -e.get("fitness", float("-inf")))
    finally:
        database.close()
