"""Process helpers shared by evaluation workers and plug-ins that start processes of their own
(the DPO launcher's ranks): a parent watchdog, ending a process group, and classifying a failure
the way every evaluation path records it.

A leaf module: it imports nothing of the project's but the genome records.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection

from engine.genome import GenomeError, is_out_of_memory


def end_process_group() -> None:
    """Kill this process, with its whole process group when it leads one (its own children:
    data-loader workers, anything a genome started)."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(interval: float = 1.0, also_gone=None) -> None:
    """End this process (:func:`end_process_group`) once its parent dies (a killed Ray actor or
    driver), or once ``also_gone()`` says so: an orphan would otherwise go on running a genome,
    perhaps one that never stops, or hold a GPU."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent or (also_gone is not None and also_gone()):
                end_process_group()
            time.sleep(interval)

    threading.Thread(target=watch, daemon=True, name="evoloss-parent-watch").start()


def genome_location(exc: BaseException) -> str:
    """The genome's own line in a traceback, if the error was raised there."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<genome>"]
    return f" (genome line {frames[-1].lineno})" if frames else ""


def classify(exc: BaseException) -> tuple[str, str]:
    """Map an exception from a genome or a plug-in to a status and a readable message."""
    if isinstance(exc, GenomeError):
        # Plug-ins wrap what a loss raises (or its backward) as an error naming the step; an
        # allocation that failed there is still out of memory, whatever the plug-in called it.
        if exc.status == "error" and exc.__cause__ is not None and is_out_of_memory(exc.__cause__):
            return "oom", f"out of memory: {exc}"[:1000]
        return exc.status, str(exc)
    text = f"{type(exc).__name__}: {exc}"
    if is_out_of_memory(exc):
        return "oom", f"out of memory: {text[:500]}"
    if isinstance(exc, RecursionError):
        return "error", f"recursion too deep{genome_location(exc)}"
    return "error", f"{text[:1000]}{genome_location(exc)}"


def in_worker() -> bool:
    """Whether this process is an evaluation worker (or a process it started): the executor names
    the worker's sandbox in ``EVOLOSS_SANDBOX``. Plug-ins use it to leave driver-only work (a
    judge's API key) to the driver."""
    return "EVOLOSS_SANDBOX" in os.environ


class JsonConnection(Connection):
    """A ``multiprocessing`` connection whose ``send``/``recv`` carry JSON, never pickle: what a
    jailed worker sends the driver is data, so a worker that a genome took over cannot run code
    in the driver by sending it a crafted pickle. Messages are dicts, lists, strings, numbers,
    booleans and None (tuples arrive as lists); at most ``MAX_BYTES`` each."""

    MAX_BYTES = 256 << 20

    def send(self, obj) -> None:
        self.send_bytes(json.dumps(obj).encode())

    def recv(self):
        return json.loads(self.recv_bytes(self.MAX_BYTES))
