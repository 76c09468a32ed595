"""What one genome could leave for the warm worker or for the next genome: nothing.

Plain-Python genomes (the static check off) through real jailed workers: no folder the worker
imports from is writable, what a genome writes in /tmp, /dev/shm or the worker's scratch (or
tries to write in / and /dev, or in System V shared memory) is gone before the next genome runs,
a genome cannot move a folder the worker's mounts hang from, it signals neither its worker nor
the jail, and the driver reads workers' messages as JSON, never pickle."""
from __future__ import annotations

import os
import pickle
import socket

import pytest

from engine.executor import ProcessExecutor
from tests.conftest import available_sandboxes
from engine.processes import JsonConnection

DPO = "    import torch.nn.functional as F\n    return -F.logsigmoid(0.1 * ((a - c) - (b - d)))\n"
DPO_GENOME = "def dpo(a, b, c, d):\n" + DPO

PLANT = '''def plant(a, b, c, d):
    import os, sys
    planted = []
    for folder in sys.path + [WORKDIR]:  # the worker's import path and the jail's working folder
        try:
            with open(os.path.join(folder or ".", "evoloss_planted.py"), "w") as stream:
                stream.write("PLANTED = True\\n")
            planted.append(folder)
        except OSError:
            pass
    if planted:
        raise ValueError("PLANTED " + repr(planted))
''' + DPO

LEAVE = '''def leave(a, b, c, d):
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    segment = libc.shmget(0x5EED, 4096, 0o1000 | 0o666)  # System V shared memory, key 0x5EED
    if segment >= 0:
        libc.shmat.restype = ctypes.c_void_p
        ctypes.memmove(libc.shmat(segment, None, 0), b"LEFT", 4)
    for folder in ("/", "/dev", "/tmp", "/dev/shm", os.path.dirname(os.getcwd()), os.environ["HOME"]):
        try:
            with open(os.path.join(folder, "left-behind"), "w") as stream:
                stream.write("x")
        except OSError:
            pass
''' + DPO

FIND = '''def find(a, b, c, d):
    import ctypes, os
    found = [folder for folder in ("/", "/dev", "/tmp", "/dev/shm", os.path.dirname(os.getcwd()))
             if os.path.exists(os.path.join(folder, "left-behind"))]
    if ctypes.CDLL(None).shmget(0x5EED, 0, 0) >= 0:
        found.append("shared memory")
    if found:
        raise ValueError("FOUND " + repr(found))
''' + DPO


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_nothing_a_genome_writes_is_imported_or_seen_by_the_next(tmp_path, sandbox):
    results = {}
    with ProcessExecutor("synthetic-pref", workers=1, timeout=120, sandbox=sandbox, jail_only=True,
                         log_path=tmp_path / "workers.log") as executor:
        executor.run([(1, PLANT.replace("WORKDIR", repr(os.getcwd()))), (2, LEAVE), (3, FIND)], 0, None,
                     lambda result: results.__setitem__(result.candidate_id, result))
    for candidate_id in (1, 2, 3):
        assert results[candidate_id].ok, results[candidate_id].error
    assert results[1].fitness == results[2].fitness == results[3].fitness


def test_the_driver_reads_json_and_refuses_a_pickle():
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    ours, theirs = socket.socketpair()
    driver, worker = JsonConnection(ours.detach()), JsonConnection(theirs.detach())
    try:
        worker.send({"type": "result", "result": {"fitness": 0.5, "values": (1, 2)}})
        assert driver.recv() == {"type": "result", "result": {"fitness": 0.5, "values": [1, 2]}}
        worker.send_bytes(pickle.dumps(Boom()))
        with pytest.raises(ValueError):
            driver.recv()
    finally:
        driver.close()
        worker.close()


SIGNAL = '''def stop_them(a, b, c, d):
    import os, signal
    done = []
    for target in (os.getppid(), 1):
        for number in (signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(target, number)
                done.append((target, number))
            except OSError:
                pass
    try:
        os.kill(-1, signal.SIGKILL)
        done.append("everyone")
    except OSError:
        pass
    if done:
        raise ValueError("SIGNALLED " + repr(done))
''' + DPO


def run_then_dpo(tmp_path, sandbox: str, hostile: str) -> tuple:
    """``hostile``, then plain DPO, through one jailed worker: both results and the restarts."""
    results = {}
    with ProcessExecutor("synthetic-pref", workers=1, timeout=60, sandbox=sandbox, jail_only=True,
                         log_path=tmp_path / "workers.log") as executor:
        executor.run([(1, hostile), (2, DPO_GENOME)], 0, None,
                     lambda result: results.__setitem__(result.candidate_id, result))
        return results[1], results[2], executor.restarts


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_genome_signals_neither_its_worker_nor_the_jail(tmp_path, sandbox):
    hostile, after, restarts = run_then_dpo(tmp_path, sandbox, SIGNAL)
    assert hostile.ok, hostile.error
    assert after.ok and after.fitness == hostile.fitness and restarts == 0


MOVE = '''def move(a, b, c, d):
    import os
    moved = []
    scratch = os.path.dirname(os.getcwd())  # the worker's scratch, a mount below /tmp
    for folder in (os.path.dirname(scratch), scratch):
        try:
            os.rename(folder, folder + "-moved")
            moved.append(folder)
        except OSError:
            pass
    if moved:
        raise ValueError("MOVED " + repr(moved))
''' + DPO


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_genome_cannot_move_the_workers_folders(tmp_path, sandbox):
    hostile, after, restarts = run_then_dpo(tmp_path, sandbox, MOVE)
    assert hostile.ok, hostile.error
    assert after.ok and restarts == 0
