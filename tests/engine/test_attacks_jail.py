"""Attacks on the jail that need no kill(): plain-Python genomes (the static check off) through
real jailed workers.

* A genome names its warm worker as the owner of a file's I/O signals (``fcntl F_SETOWN`` with
  ``F_SETSIG``, ``ioctl FIOSETOWN``) or queues it a signal (``sigqueue``): the seccomp filter of
  :mod:`engine.confine` refuses each, so the worker is neither killed nor stopped.
* A genome makes its system calls through the i386 entry (``int 0x80``), where the numbers
  differ: the filter refuses every call of another architecture.
* A genome reads the kernel keyrings its process possesses: the driver's session keyring (and
  the tokens in it) is not among them, and ``keyctl`` is refused.
* A genome leaves folders nested deeper than Python's recursion limit, and folders it made
  unwritable, wherever it can write: the worker empties them before the next genome, and the
  driver removes its scratch without crashing (``shutil.rmtree`` raised ``RecursionError``
  there, and every later run on the machine raised it again on the stale scratch).
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import secrets
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from engine import jail
from engine.executor import ProcessExecutor
from engine.processes import remove_tree
from tests.conftest import available_sandboxes

DPO = "    import torch.nn.functional as F\n    return -F.logsigmoid(0.1 * ((a - c) - (b - d)))\n"
DPO_GENOME = "def dpo(a, b, c, d):\n" + DPO

OWN_SIGNALS = '''def own():
    import ctypes, fcntl, os, signal, socket, time
    libc = ctypes.CDLL(None, use_errno=True)
    worker, done = os.getppid(), []
    here, there = socket.socketpair()
    for name, call in (("F_SETOWN", lambda fd: fcntl.fcntl(fd, fcntl.F_SETOWN, worker)),
                       ("F_SETOWN_EX", lambda fd: fcntl.fcntl(fd, 15, bytes((ctypes.c_int * 2)(1, worker))))):
        try:
            call(there.fileno())
            fcntl.fcntl(there.fileno(), 10, signal.SIGKILL)  # F_SETSIG
            fcntl.fcntl(there.fileno(), fcntl.F_SETFL, fcntl.fcntl(there.fileno(), fcntl.F_GETFL) | os.O_ASYNC)
            here.send(b"x")  # there becomes readable: the kernel signals its owner
            done.append(name)
        except OSError:
            pass
    owner = ctypes.c_int(worker)
    if libc.ioctl(there.fileno(), 0x8901, ctypes.byref(owner)) == 0:  # FIOSETOWN
        done.append("FIOSETOWN")
    if libc.ioctl(there.fileno(), 0x8902, ctypes.byref(owner)) == 0:  # SIOCSPGRP
        done.append("SIOCSPGRP")

    class Value(ctypes.Union):
        _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]
    for target in (worker, 1):
        if libc.sigqueue(target, signal.SIGKILL, Value(0)) == 0:
            done.append(("sigqueue", target))
    info = (ctypes.c_int * 32)(signal.SIGKILL, 0, -1)  # si_signo, si_errno, si_code SI_QUEUE
    if libc.syscall(297 if os.uname().machine == "x86_64" else 240, worker, worker, signal.SIGKILL,
                    ctypes.byref(info)) == 0:
        done.append("rt_tgsigqueueinfo")
    time.sleep(0.2)
    if done:
        raise ValueError("SIGNALLED " + repr(done))


own()  # once, at module level (--jail-only runs it)
''' + DPO_GENOME

INT80 = '''def int80():
    import ctypes, mmap, os, signal, struct
    code = (b"\\x53\\xb8" + struct.pack("<I", 37)  # push rbx; mov eax, 37 (i386 kill)
            + b"\\xbb" + struct.pack("<I", os.getppid()) + b"\\xb9" + struct.pack("<I", signal.SIGKILL)
            + b"\\xcd\\x80\\x5b\\xc3")  # int 0x80; pop rbx; ret
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    if ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))() == 0:
        raise ValueError("SIGNALLED through int 0x80")


int80()
''' + DPO_GENOME

KEYRINGS = '''def keys():
    import ctypes
    libc, found = ctypes.CDLL(None, use_errno=True), []
    number = {"x86_64": 250, "aarch64": 219}[__import__("platform").machine()]
    for special in (-1, -2, -3, -4, -5):  # thread, process, session, user, user-session keyrings
        keyring = libc.syscall(number, 0, special, 0)  # KEYCTL_GET_KEYRING_ID
        listing = ctypes.create_string_buffer(4096)
        size = libc.syscall(number, 11, keyring, listing, 4096) if keyring > 0 else -1  # KEYCTL_READ
        for start in range(0, max(size, 0), 4):
            payload = ctypes.create_string_buffer(4096)
            length = libc.syscall(number, 11, int.from_bytes(listing.raw[start:start + 4], "little"), payload, 4096)
            if length > 0:
                found.append(payload.raw[:length].decode())
    if found:
        raise ValueError("KEYS " + " ".join(found))


keys()
''' + DPO_GENOME

LEAVE_DEEP = '''def leave():
    import os
    start = os.getcwd()
    scratch = os.environ["HOME"]
    for base in ("/tmp", "/dev/shm", scratch, os.path.dirname(scratch)):
        os.chdir(base)
        os.mkdir("left-deep")
        os.chdir("left-deep")
        for _ in range(1500):  # deeper than the recursion limit of shutil.rmtree
            os.mkdir("d")
            os.chdir("d")
        os.chdir(base)
        os.makedirs("left-locked/inner")
        open("left-locked/inner/f", "w").close()
        os.chmod("left-locked/inner", 0)
        os.chmod("left-locked", 0o500)
    os.chdir(start)


leave()
''' + DPO_GENOME

FIND = '''def find():
    import os
    found = [os.path.join(folder, name) for folder in ("/tmp", "/dev/shm", os.path.dirname(os.environ["HOME"]))
             for name in os.listdir(folder) if name.startswith("left-")]
    if found:
        raise ValueError("FOUND " + repr(found))


find()
''' + DPO_GENOME


def run_genomes(tmp_path, sandbox: str, *genomes: str, fitness: str = "synthetic-pref") -> tuple[list, int, str]:
    """``genomes`` in order through one jailed worker: their results, the worker restarts and
    the executor's scratch folder (gone once the executor is closed)."""
    results = {}
    with ProcessExecutor(fitness, workers=1, timeout=60, sandbox=sandbox, jail_only=True,
                         log_path=tmp_path / "workers.log") as executor:
        executor.run(list(enumerate(genomes, 1)), 0, None, lambda result: results.__setitem__(result.candidate_id, result))
        restarts, scratch = executor.restarts, str(executor._scratch_root)
    return [results[i] for i in range(1, len(genomes) + 1)], restarts, scratch


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_genome_cannot_aim_io_signals_or_queued_signals_at_its_worker(tmp_path, sandbox):
    (hostile, after), restarts, _ = run_genomes(tmp_path, sandbox, OWN_SIGNALS, DPO_GENOME)
    assert hostile.ok, hostile.error
    assert after.ok and after.fitness == hostile.fitness and restarts == 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the i386 entry exists on x86_64 only")
@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_genome_cannot_signal_its_worker_through_the_i386_entry(tmp_path, sandbox):
    (hostile, after), restarts, _ = run_genomes(tmp_path, sandbox, INT80, DPO_GENOME)
    assert hostile.ok, hostile.error
    assert after.ok and after.fitness == hostile.fitness and restarts == 0


def _session_keyring_holding(secret: str):
    """A ``preexec_fn``: the child joins a new session keyring holding ``secret`` as a user key."""
    def plant() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        number = {"x86_64": (250, 248), "aarch64": (219, 217)}[platform.machine()]
        libc.syscall(number[0], 1, b"evoloss-test")  # KEYCTL_JOIN_SESSION_KEYRING
        data = secret.encode()
        if libc.syscall(number[1], b"user", b"evoloss-test-token", data, len(data), -3) < 0:  # add_key, @s
            os._exit(3)
    return plant


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="system call numbers known here")
@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_genome_reads_no_key_of_the_drivers_session_keyring(tmp_path, sandbox):
    secret = "sk-keyring-" + secrets.token_hex(8)
    genome = tmp_path / "keys.py"
    genome.write_text(KEYRINGS)
    done = subprocess.run(
        [sys.executable, "-m", "engine", "evaluate", "--fitness", "synthetic-pref", "--sandbox", sandbox,
         "--jail-only", "--json", "--code", str(genome)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=_session_keyring_holding(secret),
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )
    assert done.returncode != 3, "could not plant a key here"
    assert secret not in done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "ok", result["error"]


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_deep_and_locked_folders_are_gone_before_the_next_genome_and_after_the_run(tmp_path, sandbox):
    (hostile, after, dpo), restarts, scratch = run_genomes(tmp_path, sandbox, LEAVE_DEEP, FIND, DPO_GENOME)
    assert hostile.ok, hostile.error
    assert after.ok, after.error
    assert hostile.fitness == after.fitness == dpo.fitness and restarts == 0
    assert not os.path.exists(scratch)


def test_remove_tree_removes_any_depth_and_mode_and_follows_no_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept").write_text("x")
    top = tmp_path / "top"
    top.mkdir()
    folder = os.open(top, os.O_RDONLY)
    for _ in range(3000):  # far deeper than a path may be long: made one folder at a time
        os.mkdir("d", dir_fd=folder)
        below = os.open("d", os.O_RDONLY, dir_fd=folder)
        os.close(folder)
        folder = below
    os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, dir_fd=folder))
    os.close(folder)
    locked = top / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f").write_text("x")
    (top / "link").symlink_to(outside)
    (top / "file-link").symlink_to(outside / "kept")
    os.chmod(locked / "inner", 0)
    os.chmod(locked, stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert remove_tree(top)
        assert not top.exists()
    finally:  # pytest's own clean-up of tmp_path would raise RecursionError on what is left
        subprocess.run(["rm", "-rf", str(top)], check=False)
    assert (outside / "kept").read_text() == "x"
    assert remove_tree(top)  # already gone
    lone = tmp_path / "lone"
    lone.write_text("x")
    assert remove_tree(lone) and not lone.exists()


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_probing_a_sandbox_leaves_nothing_in_the_temporary_folder(tmp_path, monkeypatch, sandbox):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert jail.probe.__wrapped__(sandbox) is None
    assert not list(tmp_path.iterdir())
