"""Attacks on the jail that need no kill(): plain-Python genomes (the static check off) through
real jailed workers.

* A genome names its warm worker as the owner of a file's I/O signals (``fcntl F_SETOWN`` with
  ``F_SETSIG``, ``ioctl FIOSETOWN``) or queues it a signal (``sigqueue``): the seccomp filter of
  :mod:`engine.confine` refuses each, so the worker is neither killed nor stopped.
"""
from __future__ import annotations

import pytest

from engine.executor import ProcessExecutor
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

def run_genomes(tmp_path, sandbox: str, *genomes: str) -> tuple[list, int, str]:
    """``genomes`` in order through one jailed worker: their results, the worker restarts and
    the executor's scratch folder (gone once the executor is closed)."""
    results = {}
    with ProcessExecutor("synthetic-pref", workers=1, timeout=60, sandbox=sandbox, jail_only=True,
                         log_path=tmp_path / "workers.log") as executor:
        executor.run(list(enumerate(genomes, 1)), 0, None, lambda result: results.__setitem__(result.candidate_id, result))
        restarts, scratch = executor.restarts, str(executor._scratch_root)
    return [results[i] for i in range(1, len(genomes) + 1)], restarts, scratch


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_genome_cannot_aim_io_signals_or_queued_signals_at_its_worker(tmp_path, sandbox):
    (hostile, after), restarts, _ = run_genomes(tmp_path, sandbox, OWN_SIGNALS, DPO_GENOME)
    assert hostile.ok, hostile.error
    assert after.ok and after.fitness == hostile.fitness and restarts == 0
