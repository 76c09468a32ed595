"""What one genome could leave for the warm worker or for the next genome: nothing.

Plain-Python genomes (the static check off) through real jailed workers: no folder the worker
imports from is writable, what a genome writes in /tmp, /dev/shm or the worker's scratch (or
tries to write in / and /dev, or in System V shared memory) is gone before the next genome runs,
a genome cannot move a folder the worker's mounts hang from, it signals neither its worker nor
the jail, and the driver reads workers' messages as JSON, never pickle."""
from __future__ import annotations

import os
import pickle
import re
import socket
import struct
import time
from collections import deque

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



TUNE = '''def tune(a, b, c, d):
    import os
    def read(pid, name):
        return open(f"/proc/{pid}/{name}").read().split()[-1]
    places = [(f"{short}@{who}", pid, name, value) for who, pid in (("w", os.getppid()), ("i", 1))  # worker, jail init
              for short, name, value in (("oom", "oom_score_adj", "1000"), ("nice", "autogroup", "19"),
                                         ("core", "coredump_filter", "0x31"))]
    before = {key: read(pid, name) for key, pid, name, _ in places}
    for key, pid, name, value in places:
        try:
            with open(f"/proc/{pid}/{name}", "w") as stream:
                stream.write(value)
        except OSError:
            pass
    raise ValueError("TUNED " + " ".join(f"{key}={before[key]}>{read(pid, name)}" for key, pid, name, _ in places))
'''

LOOK = '''def look(a, b, c, d):
    import os
    raise ValueError("NOW " + " ".join(f"{short}@{who}={open(f'/proc/{pid}/{name}').read().split()[-1]}"
                                       for who, pid in (("w", os.getppid()), ("i", 1))
                                       for short, name in (("oom", "oom_score_adj"), ("nice", "autogroup"),
                                                           ("core", "coredump_filter"))))
'''


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_what_a_genome_tunes_in_its_worker_and_the_jail_is_put_back(tmp_path, sandbox):
    """A genome's process can raise the warm worker's and the jail init's OOM score and autogroup
    nice, and change what a core would hold, through /proc (a write, not a call seccomp sees); the
    worker puts them back before the next genome, and notes it in its log."""
    results = {}
    log = tmp_path / "workers.log"
    with ProcessExecutor("synthetic-pref", workers=1, timeout=60, sandbox=sandbox, jail_only=True,
                         log_path=log) as executor:
        executor.run([(1, TUNE), (2, LOOK)], 0, None, lambda result: results.__setitem__(result.candidate_id, result))
        restarts = executor.restarts
    tuned = re.findall(r"(\w+@\w+)=(-?[0-9a-f]+)>(-?[0-9a-f]+)", results[1].error or "")
    now = dict(re.findall(r"(\w+@\w+)=(-?[0-9a-f]+)", (results[2].error or "").split("NOW", 1)[-1]))
    assert len(tuned) == 6 and len(now) == 6, (results[1].error, results[2].error)
    changed = [key for key, before, after in tuned if before != after]
    if not changed:
        pytest.skip(f"a genome's process could change none of them here: {tuned}")
    assert "oom@w" in changed  # what this test is about: it could, and did
    assert {key: before for key, before, _ in tuned} == now
    assert restarts == 0
    assert "; put back" in log.read_text() and "could NOT" not in log.read_text()


PRIORITY = '''def lower(a, b, c, d):
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    ioprio_set = {"x86_64": 251, "aarch64": 30}[os.uname().machine]
    worker = os.getppid()
    calls = {"setpriority(user)": lambda: libc.setpriority(2, 0, 19),
             "setpriority(this user)": lambda: libc.setpriority(2, os.getuid(), 19),
             "setpriority(worker's group)": lambda: libc.setpriority(1, os.getpgid(worker), 19),
             "ioprio_set(user)": lambda: libc.syscall(ioprio_set, 3, 0, 3 << 13),
             "ioprio_set(this user)": lambda: libc.syscall(ioprio_set, 3, os.getuid(), 3 << 13),
             "ioprio_set(worker's group)": lambda: libc.syscall(ioprio_set, 2, os.getpgid(worker), 3 << 13),
             "memfd_create": lambda: libc.memfd_create(b"hoard", 0),
             "shmget": lambda: libc.shmget(0, 1 << 20, 0o1600)}
    done = [name for name, call in calls.items() if call() >= 0]
    os.nice(5)  # its own priority stays its own to lower
    raise ValueError("DONE " + repr(done))
'''

NICE = '''def look(a, b, c, d):
    import os
    raise ValueError("NICE " + " ".join(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[16]
                                        for pid in (os.getppid(), 1)))
'''


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_genome_lowers_no_priority_but_its_own_and_hoards_no_memory_outside_its_limit(tmp_path, sandbox):
    """setpriority and ioprio_set for a whole user (inside the jail: the warm worker, the jail's
    init and every later genome; the worker could not raise them back) or for the worker's group
    are refused; so are memfd_create and shmget, whose memory the address-space limit does not count."""
    results = {}
    with ProcessExecutor("synthetic-pref", workers=1, timeout=60, sandbox=sandbox, jail_only=True,
                         log_path=tmp_path / "workers.log") as executor:
        executor.run([(1, NICE), (2, PRIORITY), (3, NICE)], 0, None,
                     lambda result: results.__setitem__(result.candidate_id, result))
    assert "DONE []" in (results[2].error or ""), results[2].error
    before, after = (results[i].error.split("NICE ", 1)[1].split()[:2] for i in (1, 3))
    assert before == after, (before, after)


# -- a worker that a genome took over ----------------------------------------------------------------
def test_a_message_begun_and_never_finished_ends_at_the_deadline():
    ours, theirs = socket.socketpair()
    driver = JsonConnection(ours.detach())
    try:
        theirs.sendall(struct.pack("!i", 100) + b"{")  # a header and one byte of a 100-byte message
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            driver.recv_within(0.5)
        assert time.monotonic() - start < 5
        theirs.close()
    finally:
        driver.close()


@pytest.mark.parametrize("sent", [
    b"[1, 2]",                                                        # not an object
    b'{"type": "result", "result": {"candidate_id": 7, "status": "ok", "fitness": 42.0}}',  # another candidate's
    b'{"type": "result", "result": {"candidate_id": 1, "status": "ok", "bogus": 1}}',     # not a result
    b'{"type": "result", "result": {"candidate_id": 1, "status": "won"}}',                # no such status
    b'{"type": "probe", "candidate_id": 1, "fingerprint": "../../etc"}',                   # not a fingerprint
    b'{"type": "result", "result": {"candidate_id": 1, "status": "ok", "fitness": "high"}}',  # not a number
    b'{"type": "result", "result": {"candidate_id": 1, "status": "ok", "fitness": 1e999}}',   # not finite
    b'{"type": "result", "result": {"candidate_id": 1, "status": "ok", "fitness": 0.5, "descriptors": [1]}}',
    b'{"type": "score", "fitness": 42.0}',                                                 # no such message
    b"\xff\xfe",                                                                           # not JSON
    None,                                                                                  # half a message, then nothing
])
def test_the_driver_replaces_a_worker_that_sends_what_no_worker_sends(sent, monkeypatch):
    """What only a worker that a genome took over could send: the evaluation is an error that says
    so, the worker is replaced, and the driver goes on."""
    from engine import executor as module

    monkeypatch.setattr(module, "MESSAGE_SECONDS", 0.5)
    ours, theirs = socket.socketpair()
    pool = ProcessExecutor("synthetic-pref", workers=1, sandbox="none")
    worker = module._Worker(process=None, conn=JsonConnection(ours.detach()), task=module.Task(1, "code"), ready=True)
    replaced, results = [], []
    monkeypatch.setattr(pool, "_replace", lambda w: replaced.append(w))
    try:
        theirs.sendall(struct.pack("!i", 64) + b"{" if sent is None else struct.pack("!i", len(sent)) + sent)
        pool._receive(worker, deque(), None, results.append)
    finally:
        worker.conn.close()
        theirs.close()
    assert replaced == [worker]
    assert [r.status.value for r in results] == ["error"] and results[0].candidate_id == 1
    assert "its worker sent the driver" in results[0].error and results[0].fitness is None


def test_the_driver_takes_a_workers_real_result():
    from engine import executor as module

    ours, theirs = socket.socketpair()
    pool = ProcessExecutor("synthetic-pref", workers=1, sandbox="none")
    worker = module._Worker(process=None, conn=JsonConnection(ours.detach()), task=module.Task(1, "code"), ready=True)
    results = []
    try:
        JsonConnection(theirs.detach()).send({"type": "result", "result": {"candidate_id": 1, "status": "ok",
                                                                           "fitness": 0.5}})
        pool._receive(worker, deque(), None, results.append)
    finally:
        worker.conn.close()
    assert [(r.candidate_id, r.fitness) for r in results] == [(1, 0.5)] and worker.task is None


def test_a_ray_slot_replaces_a_worker_that_sends_what_no_worker_sends(monkeypatch):
    """The same check in the Ray actor, which drives its worker call by call."""
    from engine import executor as module
    from engine.ray_executor import _EvaluationActor

    monkeypatch.setattr("engine.ray_executor.MESSAGE_SECONDS", 0.5)
    ours, theirs = socket.socketpair()
    worker = module._Worker(process=None, conn=JsonConnection(ours.detach()), ready=True)
    replaced = []

    class Pool:
        workers = [worker]

        def _replace(self, w):
            replaced.append(w)

    actor = object.__new__(_EvaluationActor)
    actor.pool, actor.deadline, actor.candidate_id = Pool(), time.monotonic() + 30, 1
    try:
        theirs.sendall(struct.pack("!i", 64) + b"{")  # half a message, then nothing
        answer = actor._next()
    finally:
        worker.conn.close()
        theirs.close()
    assert answer["type"] == "malformed" and "its worker sent the driver" in answer["error"]
    assert replaced == [worker]
