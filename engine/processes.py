"""Process helpers shared by evaluation workers and plug-ins that start processes of their own
(the DPO launcher's ranks): a parent watchdog, ending a process group, removing the folders a
process wrote (:func:`remove_tree`), and classifying a failure the way every evaluation path
records it.

A leaf module: it imports nothing of the project's but the genome records.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import struct
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from collections.abc import Callable

from engine.genome import GenomeError, is_out_of_memory


def end_process_group() -> None:
    """Kill this process, with its whole process group when it leads one (its own children:
    data-loader workers, anything a genome started)."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


#: How many folders deep :func:`remove_tree` descends before it moves deeper ones up.
_REMOVE_DEPTH = 32


def remove_tree(path: str | os.PathLike) -> bool:
    """Remove ``path`` and everything in it, as a genome may have left it: folders nested far
    deeper than Python's recursion limit (``shutil.rmtree`` raises ``RecursionError`` there),
    folders it made unreadable or unwritable (their mode is restored first), symlinks (removed,
    never followed). Mount points inside it (another device) are left alone, with the folders
    holding them. Never raises; returns True when ``path`` is gone.

    At most ``_REMOVE_DEPTH`` folders are open at once: a folder deeper than that is moved to the
    top of the tree (a rename, on the same file system) and emptied from there."""
    path = os.fspath(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return _remove_entry(path, None)
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except PermissionError:
        try:
            os.chmod(path, 0o700)
            top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return False
    except OSError:
        return False
    try:
        _empty_folder(top, info.st_dev)
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _remove_entry(name: str, folder: int | None) -> bool:
    """Unlink one non-folder ``name`` (in the folder open as ``folder``), making the folder
    writable if it was not."""
    for attempt in range(2):
        try:
            os.unlink(name, dir_fd=folder)
            return True
        except FileNotFoundError:
            return True
        except PermissionError:
            if attempt or folder is None:
                return False
            try:
                os.fchmod(folder, 0o700)
            except OSError:
                return False
        except OSError:
            return False
    return False


def _open_folder(name: str, folder: int) -> int | None:
    """``name`` in ``folder``, opened and made readable, writable and searchable for its owner."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        child = os.open(name, flags, dir_fd=folder)
    except PermissionError:
        try:
            os.chmod(name, 0o700, dir_fd=folder)
            child = os.open(name, flags, dir_fd=folder)
        except OSError:
            return None
    except OSError:
        return None
    try:
        os.fchmod(child, 0o700)
    except OSError:
        pass
    return child


def _empty_folder(top: int, device: int) -> None:
    """Remove everything in the folder open as ``top`` that lies on ``device`` (see
    :func:`remove_tree`): depth first, with an explicit stack of open folders."""
    try:
        os.fchmod(top, 0o700)
    except OSError:
        pass
    moved = itertools.count()
    # (open folder, its name in the folder below it on the stack, names in it that could not be removed)
    stack: list[tuple[int, str, set[str]]] = [(top, "", set())]
    while stack:
        folder, _, stuck = stack[-1]
        child = None
        try:
            entries = list(os.scandir(folder))
        except OSError:
            entries = []
        for entry in entries:
            if entry.name in stuck:
                continue
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
                same_device = entry.stat(follow_symlinks=False).st_dev == device
            except OSError:
                stuck.add(entry.name)
                continue
            if not is_folder:
                if not _remove_entry(entry.name, folder):
                    stuck.add(entry.name)
                continue
            if not same_device:  # a mount point: never ours to remove
                stuck.add(entry.name)
                continue
            if len(stack) >= _REMOVE_DEPTH:
                # Too deep to hold open: move it up to the top and empty it from there.
                try:
                    os.chmod(entry.name, 0o700, dir_fd=folder)
                    os.fchmod(folder, 0o700)
                    name = f".evoloss-removing-{os.getpid()}-{next(moved)}"
                    while os.path.lexists(f"/proc/self/fd/{top}/{name}"):
                        name = f".evoloss-removing-{os.getpid()}-{next(moved)}"
                    os.rename(entry.name, name, src_dir_fd=folder, dst_dir_fd=top)
                except OSError:
                    stuck.add(entry.name)
                continue
            opened = _open_folder(entry.name, folder)
            if opened is None:
                stuck.add(entry.name)
                continue
            child = (opened, entry.name, set())
            break
        if child is not None:
            stack.append(child)
            continue
        folder, name, stuck = stack.pop()
        if not stack:
            return  # the top: emptied as far as it could be
        os.close(folder)
        parent, _, parent_stuck = stack[-1]
        try:
            os.rmdir(name, dir_fd=parent)
        except PermissionError:
            try:
                os.fchmod(parent, 0o700)
                os.rmdir(name, dir_fd=parent)
            except OSError:
                parent_stuck.add(name)
        except OSError:
            parent_stuck.add(name)


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


def whole_lines(data: bytes, longest: int) -> tuple[bytes, bytes]:
    """``data`` cut after its last newline: the whole lines, and the part line after them (held
    back for more). A part line longer than ``longest`` goes with the whole lines, so nothing is
    held back for ever."""
    end = data.rfind(b"\n") + 1
    if len(data) - end > longest:
        end = len(data)
    return data[:end], data[end:]


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


class FrameTooLarge(ValueError):
    """A frame announced more bytes than the reader accepts."""


def read_frame(connection: Connection, limit: int, deadline: float,
               readable: Callable[[float], bool] | None = None) -> bytes | None:
    """The next frame on ``connection`` (``multiprocessing.connection``'s: a 4-byte big-endian
    length, or -1 and an 8-byte one, then the bytes), every part of it read before ``deadline``
    (``time.monotonic()``); None at the deadline. A peer that sends part of a frame and stalls
    cannot hold the reader past it, as ``recv_bytes`` after the first readable byte would.

    ``readable(deadline)`` waits until the connection can be read (True) or the deadline passes
    (False); by default a plain wait on it.

    Raises:
        EOFError: the peer closed the connection.
        FrameTooLarge: the frame is longer than ``limit`` (nothing of it is read).
    """
    def until_readable(until: float) -> bool:
        remaining = until - time.monotonic()
        return remaining > 0 and bool(wait([connection], timeout=remaining))

    readable = readable or until_readable

    def exactly(size: int) -> bytes | None:
        chunks, missing = [], size
        while missing:
            if not readable(deadline):
                return None
            try:
                chunk = os.read(connection.fileno(), min(missing, 1 << 20))
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    header = exactly(4)
    if header is None:
        return None
    (size,) = struct.unpack("!i", header)
    if size == -1:
        longer = exactly(8)
        if longer is None:
            return None
        (size,) = struct.unpack("!Q", longer)
    if size < 0 or size > limit:
        raise FrameTooLarge(f"a message of {size} bytes (at most {limit})")
    return exactly(size)


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

    def recv_within(self, seconds: float):
        """The next message, all of it read within ``seconds`` (for a peer that is not trusted to
        finish what it starts to send).

        Raises:
            EOFError: the peer closed the connection.
            TimeoutError: no whole message within ``seconds``.
            ValueError: a message too large or not JSON.
        """
        data = read_frame(self, self.MAX_BYTES, time.monotonic() + seconds)
        if data is None:
            raise TimeoutError(f"no whole message within {seconds:g} s")
        return json.loads(data)


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed since boot (``oom_kill``
    in ``/proc/vmstat``, system-wide, cgroup limits included; Linux 4.13 and later), or None
    where it cannot be read."""
    try:
        with open("/proc/vmstat", "rb") as handle:
            for line in handle:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None
