"""The warm worker and its fresh process per genome, through a real worker process.

Hostile genomes run as plain Python (``jail_only``: no static check, no restricted namespaces),
without an OS jail: what is tested here is the third layer alone (a fresh process per genome,
two deadlines, the process sweep, the trusted scoring phase, bounded output and errors). After
each one, a plain DPO evaluated in the same worker must score exactly what it scores alone.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from engine.processes import JsonConnection
from pathlib import Path

import psutil
import pytest

from engine.candidate import EvalResult
from fitness.preference import preference_seeds
from tests.fixtures.genomes import dpo_after

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"instances": 2, "steps": 15, "pairs": 128, "eval_prompts": 16}
DPO = next(seed.code for seed in preference_seeds() if seed.name == "dpo")
GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "synthetic_pref_golden.json").read_text())


class Worker:
    """A real ``engine.worker`` process driven the way the process executor drives it."""

    def __init__(self, log_path: Path, spec: str = "synthetic-pref", options: dict | None = None,
                 log_cap: int | None = None, memory_limit: int = 0) -> None:
        parent, child = socket.socketpair()
        command = [sys.executable, "-m", "engine.worker", "--fd", str(child.fileno()),
                   "--stages", json.dumps([[spec, SMALL if options is None else options]]),
                   "--sys-path", json.dumps([str(ROOT)]), "--memory-limit", str(memory_limit)]
        if log_cap is not None:
            command += ["--log-cap", str(log_cap)]
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - the child holds it
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, pass_fds=[child.fileno()], start_new_session=True, cwd=ROOT,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        log.close()
        child.close()
        self.conn = JsonConnection(parent.detach())
        assert self.conn.poll(120), "the worker did not start"
        message = self.conn.recv()
        assert message["type"] == "ready", message
        self.duplicates: dict[str, int] = {}

    def evaluate(self, code: str, candidate_id: int = 0, seed: int = 0, jail_only: bool = True,
                 check_timeout: float = 5.0, timeout: float = 60.0, dedup: bool = False) -> EvalResult:
        self.conn.send({"candidate_id": candidate_id, "code": code, "seed": seed, "stage": 0,
                        "jail_only": jail_only, "check_timeout": check_timeout, "timeout": timeout})
        while True:
            assert self.conn.poll(check_timeout + timeout + 30), "the worker did not answer"
            message = self.conn.recv()
            if message["type"] == "probe":
                known = None
                if dedup:
                    known = self.duplicates.setdefault(message["fingerprint"], message["candidate_id"])
                    known = None if known == message["candidate_id"] else known
                self.conn.send({"duplicate_of": known})
            else:
                assert message["type"] == "result", message
                return EvalResult(**message["result"])

    def descendants(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.process.pid).children(recursive=True) if p.status() != "zombie"]

    def close(self) -> None:
        try:
            self.conn.send(None)
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.conn.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    handle = Worker(tmp_path_factory.mktemp("worker") / "workers.log")
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def alone(worker):
    """DPO's score in a fresh worker, before any hostile genome ran in it."""
    result = worker.evaluate(DPO, jail_only=False)
    assert result.ok, result.error
    return result.fitness


def assert_next_genome_unaffected(worker, alone):
    result = worker.evaluate(DPO, jail_only=False)
    assert result.ok, result.error
    assert result.fitness == alone
    assert worker.process.poll() is None
    assert worker.descendants() == []


def _wait_gone(pids, seconds=5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


# -- the contract through a real worker -----------------------------------------------------------------
@pytest.mark.slow
def test_seed_scores_through_the_worker_are_exactly_the_recorded_values(tmp_path):
    default = Worker(tmp_path / "workers.log", options={})
    try:
        for seed in (0, 1):
            result = default.evaluate(DPO, seed=seed, jail_only=False)
            assert result.ok, result.error
            assert result.fitness.hex() == GOLDEN[f"dpo/{seed}"]
    finally:
        default.close()


def test_the_same_genome_scores_the_same_in_a_warm_worker_and_in_process(worker, alone):
    from engine.evaluation import run_candidate
    from fitness.synthetic_pref import SyntheticPreference

    local = run_candidate(SyntheticPreference(**SMALL), 0, DPO, 0)
    assert local.fitness == alone
    again = worker.evaluate(DPO, jail_only=False)
    assert again.metrics == local.metrics and again.descriptors == local.descriptors
    assert again.fingerprint == local.fingerprint and "unprotected" not in again.metrics


def test_a_known_behaviour_is_a_duplicate_and_is_not_trained(worker):
    renamed = DPO.replace("def dpo", "def other_name") if "def dpo" in DPO else DPO
    first = worker.evaluate(DPO, candidate_id=10, jail_only=False, dedup=True)
    second = worker.evaluate(renamed, candidate_id=11, jail_only=False, dedup=True)
    assert first.ok and second.status == "duplicate" and second.duplicate_of == 10


# -- deadlines ----------------------------------------------------------------------------------------
def test_a_loss_that_hangs_in_the_contract_checks_ends_at_the_check_deadline(worker, alone):
    hangs = "def loss(self, pc, pr, rc, rr):\n    while True:\n        pass\n"
    start = time.monotonic()
    result = worker.evaluate(hangs, check_timeout=1.5, timeout=120)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and "contract checks" in result.error and "--check-timeout" in result.error
    assert 1.4 < elapsed < 10
    assert_next_genome_unaffected(worker, alone)


def test_a_loss_that_hangs_only_in_training_ends_at_the_training_deadline(worker, alone):
    # The checks use batches of 1, 7 and 32 pairs; training uses 128.
    hangs = dpo_after("pass").replace("    if not DONE:", "    while pc.shape[0] == 128:\n        pass\n    if not DONE:")
    result = worker.evaluate(hangs, check_timeout=5, timeout=1.5)
    assert result.status == "timeout" and "training" in result.error and "--timeout" in result.error
    assert result.fingerprint is not None  # the checks passed before
    assert_next_genome_unaffected(worker, alone)


# -- processes a genome starts ------------------------------------------------------------------------
def test_a_detached_child_dies_with_its_evaluation(worker, alone, tmp_path):
    marker, pids = tmp_path / "marker", tmp_path / "pids"
    genome = dpo_after(f'''
import os, subprocess, sys
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5); open({str(marker)!r}, 'w').write('x')"],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if os.fork() == 0:  # a double fork into a session of its own: reparented away from the genome
    os.setsid()
    if os.fork() == 0:
        import time; time.sleep(1.5); open({str(marker)!r} + "2", "w").write("x"); os._exit(0)
    os._exit(0)
open({str(pids)!r}, "w").write(str(p.pid))
''')
    result = worker.evaluate(genome)
    assert result.ok, result.error
    assert result.fitness == alone  # the genome's loss is DPO: what it started changes nothing
    assert _wait_gone([int(pids.read_text())]) == []
    time.sleep(2.0)
    assert not marker.exists() and not Path(str(marker) + "2").exists()
    assert_next_genome_unaffected(worker, alone)


def test_a_spreading_fork_is_swept_entirely(worker, alone, tmp_path):
    pids = tmp_path / "pids"
    genome = dpo_after(f'''
import os, time
for _ in range(3):          # 3 generations of doubling, each in a session of its own: 8 processes
    if os.fork() == 0:
        os.setsid()
with open({str(pids)!r}, "a") as out:
    out.write(str(os.getpid()) + "\\n")
if os.getpid() != DONE_PID:
    while True:
        try:
            if os.fork() == 0:
                time.sleep(30); os._exit(0)
        except OSError:
            pass
        time.sleep(0.05)
''').replace("DONE = []", "import os\nDONE = []\nDONE_PID = os.getpid()")
    result = worker.evaluate(genome)
    listed = [int(line) for line in pids.read_text().split()]
    assert len(listed) >= 2
    assert result.ok, result.error
    assert _wait_gone(listed) == []
    assert_next_genome_unaffected(worker, alone)


# -- state left behind --------------------------------------------------------------------------------
def test_a_thread_left_running_and_patched_modules_do_not_reach_the_next_genome(worker, alone):
    genome = dpo_after('''
import threading, time, torch, torch.nn.functional as F
def meddle():
    while True:
        torch.set_default_dtype(torch.float64)
        time.sleep(0.001)
threading.Thread(target=meddle, daemon=True).start()
F.logsigmoid = lambda x: x * 0
torch.optim.Adam.step = lambda self, closure=None: None
''')
    worker.evaluate(genome)
    assert_next_genome_unaffected(worker, alone)


@pytest.mark.slow
def test_a_memory_hog_kept_alive_in_a_registry_does_not_reach_the_next_genome(tmp_path):
    limited = Worker(tmp_path / "workers.log", memory_limit=3 << 30)
    try:
        first = limited.evaluate(DPO, jail_only=False)
        genome = dpo_after('''
import torch, torch.monitor
blocks = []
try:
    while True:
        blocks.append(torch.empty(256 << 20, dtype=torch.uint8))
except (MemoryError, RuntimeError):
    pass
torch.monitor.register_event_handler(lambda event, blocks=blocks: None)
''')
        limited.evaluate(genome)
        after = limited.evaluate(DPO, jail_only=False)
        assert after.ok, after.error
        assert after.fitness == first.fitness
    finally:
        limited.close()


#: Genome code that finds the plug-in objects of its own process by walking up the stack (the
#: objects a warm worker held before the fork are frozen, out of gc.get_objects()'s sight).
_FIND_PLUGINS = """
import sys
from fitness.synthetic_pref import SyntheticPreference
plugins, frame = [], sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()):
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, SyntheticPreference) and all(item is not p for p in plugins):
                plugins.append(item)
    frame = frame.f_back
"""


def test_mutating_the_plugins_state_does_not_reach_the_next_genome_or_the_score(worker, alone, tmp_path):
    found = tmp_path / "found"
    genome = dpo_after(_FIND_PLUGINS + f'''
for thing in plugins:
    thing.beta = -1.0
    thing.kl_coef = 1e-9
    thing.interface.beta = -1.0
    if thing._cached is not None:
        thing._cached[1].pair_reference.mul_(-1)
open({str(found)!r}, "w").write(str(len(plugins)))
''')
    worker.evaluate(genome)
    assert int(found.read_text()) >= 1
    assert_next_genome_unaffected(worker, alone)


def test_the_held_out_data_is_zeroed_in_the_genomes_process(worker, tmp_path):
    seen = tmp_path / "seen"
    genome = dpo_after(_FIND_PLUGINS + f'''
total = 0.0
for thing in plugins:
    store = thing.held_out
    total += len(store._values) + (0 if store.wiped else 1)
open({str(seen)!r}, "w").write(f"{{len(plugins)}} {{total}}")
''')
    assert worker.evaluate(genome).ok
    found, total = seen.read_text().split()
    assert int(found) >= 1 and float(total) == 0.0


def test_the_genomes_process_holds_no_descriptor_but_its_pipe_and_output(worker, tmp_path):
    seen = tmp_path / "fds"
    genome = dpo_after(f'''
import os
fds = {{}}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{{fd}}")
    except OSError:
        pass
open({str(seen)!r}, "w").write(repr(fds))
''')
    assert worker.evaluate(genome).ok
    fds = eval(seen.read_text())  # noqa: S307 - written by the test's own genome
    fds = {int(fd): target for fd, target in fds.items() if not target.startswith("/proc/")}
    # stdin (/dev/null), stdout and stderr (one pipe), the channel, the file the genome just opened
    assert fds[0] == "/dev/null" and fds[1] == fds[2] and fds[1].startswith("pipe:")
    others = {fd: target for fd, target in fds.items() if fd > 2 and target != str(seen)}
    assert len(others) == 1 and next(iter(others.values())).startswith("socket:"), fds
    assert "workers.log" not in repr(fds) and "sqlite" not in repr(fds)


# -- no genome reports its own score --------------------------------------------------------------------
_FORGE = """
import json, pickle
import multiprocessing.connection as mpc
def forged(obj):
    if isinstance(obj, dict):
        if "fitness" in obj or obj.get("type") in ("artefacts", "checked"):
            obj = dict(obj, fitness=42.0, type="unprotected", metrics={})
        if isinstance(obj.get("result"), dict):
            obj = dict(obj, result=dict(obj["result"], fitness=42.0, status="ok"))
    return obj
real_pdumps = pickle.dumps
pickle.dumps = lambda obj, *a, **k: real_pdumps(forged(obj), *a, **k)
real_send = mpc.Connection.send
mpc.Connection.send = lambda self, obj: real_send(self, forged(obj))
"""
_FORGE_JSON_TOO = """
real_dumps = json.dumps
json.dumps = lambda obj, *a, **k: real_dumps(forged(obj), *a, **k)
real_send_bytes = mpc.Connection.send_bytes
def send_bytes(self, buf, *a):
    try:
        message = json.loads(bytes(buf))
    except Exception:
        return real_send_bytes(self, buf, *a)
    return real_send_bytes(self, real_dumps(forged(message)).encode())
mpc.Connection.send_bytes = send_bytes
"""


def test_a_genome_that_forges_pickled_messages_gets_the_score_its_loss_earned(worker, alone):
    """The routes by which a worker used to send its score (pickle, Connection.send)."""
    result = worker.evaluate(dpo_after(_FORGE))
    assert result.ok, result.error
    assert result.fitness == alone
    assert_next_genome_unaffected(worker, alone)


def test_a_genome_that_forges_every_message_cannot_report_a_score(worker, alone):
    result = worker.evaluate(dpo_after(_FORGE + _FORGE_JSON_TOO))
    assert result.fitness != 42.0
    assert result.status == "error" and "unexpected message" in result.error
    assert_next_genome_unaffected(worker, alone)


def test_artefacts_that_do_not_match_the_spec_are_rejected(worker, alone):
    genome = dpo_after('''
import gc, torch
import fitness.synthetic_pref as sp
original = sp.SyntheticPreference.train
sp.SyntheticPreference.train = lambda self, fn, seed: {"theta": torch.zeros(3, 3)}
''')
    result = worker.evaluate(genome)
    assert result.status == "error" and "artefact" in result.error
    assert_next_genome_unaffected(worker, alone)


_STALL = """
import json, struct, time
import engine.evaluation as ev
send_json, send_bytes = ev.Channel.send_json, ev.Channel.send_bytes
def stall(self, data):  # a frame's header and one byte, then nothing for longer than any deadline
    raw = struct.pack("!i", len(data)) + data
    self.connection._send(raw[:5])
    time.sleep(60)
    self.connection._send(raw[5:])
if "{which}" == "checked":
    ev.Channel.send_json = lambda self, m: stall(self, json.dumps(m).encode()) if m["type"] == "checked" else send_json(self, m)
else:
    ev.Channel.send_bytes = lambda self, data: stall(self, data)
"""


@pytest.mark.parametrize("which, deadline", [("checked", "contract checks"), ("artefacts", "training")])
def test_a_message_sent_in_part_cannot_hold_the_worker_past_its_deadline(worker, alone, which, deadline):
    """Waiting for a message covers all of its bytes, not only the first."""
    start = time.monotonic()
    result = worker.evaluate(dpo_after(_STALL.format(which=which)), check_timeout=2, timeout=3)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and deadline in result.error, result.error
    assert elapsed < 15
    assert_next_genome_unaffected(worker, alone)


_HUGE = """
import engine.evaluation as ev
send_json = ev.Channel.send_json
def huge(self, message):
    if message["type"] == "{which}":
        message = dict(message, **{{"{key}": {value}}})
    send_json(self, message)
ev.Channel.send_json = huge
"""


def test_numbers_too_large_for_a_float_in_a_genomes_messages_are_refused_or_dropped(worker, alone):
    # A descriptor the size of 10**400: the evaluation is an error that says so, not a crash.
    descriptors = worker.evaluate(dpo_after(_HUGE.format(which="checked", key="descriptors",
                                                         value='{"slope_at_zero": 10**400}')))
    assert descriptors.status == "error" and "invalid descriptor" in descriptors.error, descriptors.error
    # The GPU peak its process reports is kept only when it is a plausible byte count.
    peak = worker.evaluate(dpo_after(_HUGE.format(which="artefacts", key="gpu_peak_memory_bytes", value="10**400")))
    assert peak.ok and peak.fitness == alone and "gpu_peak_memory_bytes" not in peak.metrics
    assert_next_genome_unaffected(worker, alone)


# -- output and errors ------------------------------------------------------------------------------------
def test_a_genome_that_prints_in_a_loop_is_cut_at_the_log_cap(tmp_path):
    capped = Worker(tmp_path / "workers.log", log_cap=64 << 10)
    try:
        genome = dpo_after('''
import os, sys
for i in range(20000):
    print("flood " * 20)
    os.write(2, b"raw flood on stderr\\n")
''')
        result = capped.evaluate(genome, candidate_id=5)
        assert result.ok, result.error
        capped.evaluate(genome, candidate_id=6)
    finally:
        capped.close()
    log = (tmp_path / "workers.log").read_bytes()
    assert len(log) < (64 << 10) + 4096
    assert b"output of candidate 5 truncated" in log and b"output of candidate 6 truncated" in log


def test_a_genomes_output_is_labelled_and_cannot_drive_a_terminal_or_pass_for_the_workers(tmp_path):
    logged = Worker(tmp_path / "workers.log")
    try:
        genome = dpo_after('''
import os, sys
print("\\x1b[2J\\x1b]0;pwned\\x07clear screen, retitle")
print("[evoloss worker] all genomes passed", flush=True)
os.write(2, "prix: 5 \\u20ac, \\u009b31mred".encode())
''')
        assert logged.evaluate(genome, candidate_id=9).ok
    finally:
        logged.close()
    log = (tmp_path / "workers.log").read_bytes()
    assert b"\x1b" not in log and b"\x07" not in log and b"\xc2\x9b" not in log
    assert b"candidate 9 | ?[2J?]0;pwned?clear screen, retitle\n" in log
    assert b"candidate 9 | [evoloss worker] all genomes passed\n" in log
    assert "candidate 9 | prix: 5 \u20ac, ?31mred\n".encode() in log  # text stays text
    assert not any(line.startswith(b"[evoloss worker] all genomes") for line in log.splitlines())


def test_two_workers_part_lines_never_interleave_in_the_log(tmp_path):
    """A genome prints part of a line and waits while a genome in another worker prints a line,
    then ends its own with a forged worker note: the log gets whole, labelled lines only."""
    import threading

    from engine.executor import _pump_output
    from engine.worker import CappedOutput

    lock = threading.Lock()
    with open(tmp_path / "workers.log", "wb") as log:
        pipes, pumps = [], []
        for pid in (1, 2):
            read, write = os.pipe()
            pumps.append(threading.Thread(target=_pump_output, args=(os.fdopen(read, "rb"), log, lock, pid)))
            pumps[-1].start()
            pipes.append(write)
        first, second = CappedOutput(fd=pipes[0]), CappedOutput(fd=pipes[1])
        first.begin("candidate 1")
        second.begin("candidate 2")
        first.write(b"part")
        time.sleep(0.2)
        second.write(b"a whole line\n")
        time.sleep(0.2)
        first.write(b"[evoloss worker] all genomes passed\nand a tail")
        first.end()
        second.end()
        for write in pipes:
            os.close(write)
        for pump in pumps:
            pump.join(10)
    lines = (tmp_path / "workers.log").read_bytes().decode().splitlines()
    assert lines == ["candidate 2 | a whole line", "candidate 1 | part[evoloss worker] all genomes passed",
                     "candidate 1 | and a tail"]


def test_error_text_is_one_short_line_without_file_contents_or_paths(worker, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("first line\nSECOND-LINE-SECRET\n" + "x" * 5000)
    genome = f"def loss(self, pc, pr, rc, rr):\n    raise ValueError(open({str(secret)!r}).read())\n"
    result = worker.evaluate(genome)
    assert result.status in ("invalid", "error")
    assert "SECOND-LINE-SECRET" not in result.error and "\n" not in result.error
    assert len(result.error) <= 300 and "ValueError" in result.error and "genome line 2" in result.error
    missing = "def loss(self, pc, pr, rc, rr):\n    open('/home/someone/.ssh/id_rsa')\n"
    result = worker.evaluate(missing)
    assert ".ssh" not in result.error and "FileNotFoundError" in result.error


def test_a_genome_that_kills_its_own_process_is_an_error_and_the_worker_goes_on(worker, alone):
    genome = dpo_after("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    result = worker.evaluate(genome)
    assert result.status == "error" and "SIGSEGV" in result.error
    exits = dpo_after("import os\nos._exit(3)")
    result = worker.evaluate(exits)
    assert result.status == "error" and "code 3" in result.error
    assert_next_genome_unaffected(worker, alone)


def test_a_plugin_of_the_first_contract_runs_in_the_genomes_process_marked_unprotected(tmp_path, write_plugin):
    spec = write_plugin('''
from fitness.base import Fitness, Score, Seed
from fitness.preference import PreferenceInterface, preference_seeds

class Plugin(Fitness):
    name = "old-style"
    interface = PreferenceInterface()

    def seeds(self):
        return preference_seeds()[:1]

    def evaluate(self, fn, seed):
        return Score(fitness=0.25, metrics={"seed": seed})
''')
    old = Worker(tmp_path / "workers.log", spec=spec, options={})
    try:
        result = old.evaluate(DPO, seed=3, jail_only=False)
    finally:
        old.close()
    assert result.ok and result.fitness == 0.25
    assert result.metrics == {"seed": 3, "unprotected": True}
    assert b"implements only evaluate" in (tmp_path / "workers.log").read_bytes()


# -- evaluate --jail-only ------------------------------------------------------------------------------
def _evaluate_cli(tmp_path, code: str, *flags: str, capsys) -> tuple[int, dict, str]:
    from engine.cli import main

    path = tmp_path / "loss.py"
    path.write_text(code)
    options = [item for key, value in SMALL.items() for item in ("--fitness-opt", f"{key}={value}")]
    status = main(["evaluate", "--fitness", "synthetic-pref", *options, "--code", str(path), "--sandbox", "none",
                   "--json", *flags])
    captured = capsys.readouterr()
    return status, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_evaluate_jail_only_runs_plain_python_and_scores_it_in_the_trusted_phase(tmp_path, capsys):
    status, plain, _ = _evaluate_cli(tmp_path, DPO, capsys=capsys)
    assert status == 0 and plain["static_check"] is True and plain["sandbox"] == "none"
    # Plain Python the static check would refuse (an import, a module-level statement, open()).
    unchecked = "import os\nCWD = os.getcwd()\n" + DPO
    status, jailed, err = _evaluate_cli(tmp_path, unchecked, "--jail-only", capsys=capsys)
    assert "--jail-only (testing only)" in err and "static check" in err
    assert status == 0 and jailed["static_check"] is False and jailed["sandbox"] == "none"
    assert jailed["fitness"] == plain["fitness"]
    status, refused, _ = _evaluate_cli(tmp_path, unchecked, capsys=capsys)
    assert status == 1 and refused["status"] == "invalid"


def test_evaluate_jail_only_a_forging_genome_reports_the_score_its_loss_earned(tmp_path, capsys):
    _, plain, _ = _evaluate_cli(tmp_path, DPO, capsys=capsys)
    _, forged, _ = _evaluate_cli(tmp_path, dpo_after(_FORGE), "--jail-only", capsys=capsys)
    assert forged["status"] == "ok" and forged["fitness"] == plain["fitness"] != 42.0
    _, forged, _ = _evaluate_cli(tmp_path, dpo_after(_FORGE + _FORGE_JSON_TOO), "--jail-only", capsys=capsys)
    assert forged["status"] == "error" and forged["fitness"] is None


def test_evaluate_check_timeout_ends_a_hang_in_the_checks(tmp_path, capsys):
    hangs = "def loss(self, pc, pr, rc, rr):\n    while True:\n        pass\n"
    start = time.monotonic()
    status, result, _ = _evaluate_cli(tmp_path, hangs, "--check-timeout", "1", "--timeout", "300", capsys=capsys)
    assert status == 1 and result["status"] == "timeout" and "--check-timeout" in result["error"]
    assert time.monotonic() - start < 60


def test_run_refuses_jail_only_with_exit_2(tmp_path, capsys):
    from engine.cli import main

    assert main(["run", "--jail-only", "--out", str(tmp_path / "run")]) == 2
    assert "--jail-only is for 'evaluate' only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_genomes_process_has_its_own_session_limits_and_scratch_folder(worker, tmp_path):
    seen = tmp_path / "seen.json"
    genome = dpo_after(f'''
import json, os, resource
json.dump({{"session_leader": os.getsid(0) == os.getpid(), "cwd": os.getcwd(), "home": os.environ["HOME"],
           "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
           "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
           "core": resource.getrlimit(resource.RLIMIT_CORE)[0]}}, open({str(seen)!r}, "w"))
''')
    assert worker.evaluate(genome).ok
    facts = json.loads(seen.read_text())
    assert facts["session_leader"] and facts["core"] == 0
    assert facts["fsize"] == 1 << 30 and facts["nofile"] == 256  # Fitness.max_file_bytes, max_open_files
    assert facts["home"] == facts["cwd"] and Path(facts["cwd"]).name.startswith("eval-0-")
    assert not Path(facts["cwd"]).exists()  # removed with its evaluation
