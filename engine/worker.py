"""An evaluation worker process: ``python -m engine.worker`` (started by the process executor).

The warm worker limits its own address space, uses one torch thread, loads the fitness
plug-ins once and never runs genome code. For each genome it forks one child
(:class:`EvaluationChild`), the genome's own process, which:

* starts a session of its own (its process group holds whatever the genome starts), dies with
  the warm worker (``PR_SET_DEATHSIG``), keeps no file descriptor but its pipe to the warm
  worker and an output pipe as stdout/stderr (none to the driver or the run store), lowers its
  rlimits (file size, open files, no core dumps; the address space is inherited), works in a
  scratch folder of its own, and wipes the plug-ins' held-out data;
* runs the untrusted phase (:func:`engine.evaluation.untrusted_phase`: contract checks,
  fingerprint, descriptors, training) and sends back artefacts (safetensors bytes), then exits.

The warm worker relays the dedup probe between the child and the driver, enforces two
deadlines (``check_timeout`` for the contract checks, ``timeout`` for training), caps what the
child prints (``--log-cap`` bytes per worker, then a note), kills the child's whole process
group and sweeps every other process it left (the warm worker is a child subreaper, so even a
double-forked, detached process stays its descendant), then runs the trusted phase: it
validates the artefacts and scores them with ``Fitness.score``. Nothing survives from one
genome to the next: not a thread, a registry entry, a patched module or a mutated plug-in.

A genome's process is a copy of the warm worker's memory, so what the trusted phase computes
on must not be found there. The plug-ins' held-out data is wiped in the child (above); what the
warm worker computed and freed (the temporaries that built a problem's true reward, the last
genome's scoring) would still lie in freed memory. So the warm worker has glibc's ``malloc``
overwrite every block it frees (``mallopt(M_PERTURB)``, :func:`scrub_freed_memory`); the
genome's process turns that off again, so training pays nothing for it.

CUDA and fork do not mix: a process that initialised CUDA cannot use it in a forked child.
The warm worker therefore never initialises CUDA (it stops with an error if loading a plug-in
did); each genome's process initialises it itself, which costs a CUDA context per evaluation
(about 0.3-1 s and a few hundred MB of GPU memory, small beside a GPU training run). A plug-in
that needs the GPU to score (its ``resources()`` ask for GPUs) is scored in a second forked
child that runs no genome code.

The worker's environment was already scrubbed of secrets by the executor; its stdout goes to
the run's worker log.
"""
from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import re
import resource
import signal
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Any
from collections.abc import Callable

from engine.processes import (FrameTooLarge, JsonConnection, end_process_group, oom_kills, read_frame,  # noqa: F401 - re-exported for old imports
                              remove_tree, watch_parent, whole_lines)

#: Default deadline of the contract checks (fingerprint and descriptors included), seconds.
CHECK_TIMEOUT = 10.0
#: Default cap on what the genomes' processes of one worker may print, bytes.
LOG_CAP = 1 << 20
#: How long the sweep of a finished evaluation's processes may take before it gives up.
SWEEP_SECONDS = 5.0

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


#: ``mallopt``'s option to fill freed (and newly allocated) blocks with a byte (glibc).
_M_PERTURB = -6
#: What freed blocks are overwritten with (``0xA5``; new blocks get its complement, as glibc does).
SCRUB_BYTE = 0xA5


def scrub_freed_memory(on: bool = True) -> bool:
    """Have glibc's ``malloc`` overwrite each block this process frees from now on (``on``) or
    stop doing so; False where that is not possible (not Linux, not glibc).

    Blocks glibc keeps in its per-thread cache (up to about 1 KiB) and Python's pools of small
    objects are not overwritten, and neither is memory another allocator manages: a plug-in keeps
    what only its trusted phase reads in :attr:`Fitness.held_out`, which is wiped explicitly."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None).mallopt(_M_PERTURB, SCRUB_BYTE if on else 0) == 1
    except (OSError, AttributeError):
        return False


def forget_freed_numbers() -> None:
    """Overwrite the numbers Python and numpy keep for reuse. Up to 100 freed ``float`` objects
    wait on a free list with their values, which no allocator overwrites (the last genome's
    scores, the baseline's on each task): taking them all and giving them back leaves only these
    values there; the rest are freed through the allocator, which workers run in its debug mode
    (``PYTHONMALLOC=pymalloc_debug``: freed memory is overwritten). Called before each genome's
    process is forked."""
    filler = [float(n) for n in range(256)]
    del filler
    # numpy keeps the data of up to 7 freed small arrays per size for reuse (under 1 KiB), as
    # they were: the per-task scores a plug-in averaged. Taking them as zeros overwrites them.
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        for size in range(1, 128):
            zeros = [numpy.zeros(size) for _ in range(8)]
            del zeros


def _warm_up(torch) -> None:
    """The first optimiser step in a process imports a good part of torch (about 1.5 s); pay
    for it at start-up so it is not charged to the first genome's evaluation time."""
    parameter = torch.zeros(2, requires_grad=True)
    optimiser = torch.optim.Adam([parameter], lr=0.1)
    (parameter**2).sum().backward()
    optimiser.step()
    # What every compiled genome shares (allow-listed member tables, the input relay): built
    # here once, inherited by every genome's process instead of built in each.
    from engine import genome

    getattr(genome, "warm_up", lambda: None)()
    # What the trusted phase and the sweep import later: imported now, before any genome's process
    # exists, so nothing a genome could have written is ever imported here.
    import psutil  # noqa: F401
    import safetensors.torch  # noqa: F401


# -- output of the genomes' processes ----------------------------------------------------------------
#: :data:`engine.helpers.CONTROL_CHARACTERS` in a genome's raw output, as UTF-8 encodes them
#: (C1 controls as 0xC2 0x80-0x9F; other bytes of 0x80-0x9F continue characters such as "€").
_CONTROLS = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")
#: A genome's line longer than this is broken (each piece labelled) rather than held back.
_LINE_MAX = 8192


class CappedOutput:
    """Copies what genomes' processes print to this worker's stdout (the worker log), up to
    ``cap`` bytes over the worker's life; after that one note per evaluation says what was cut.

    A genome's output is untrusted text: every line of it starts with its candidate's label
    (``candidate 12 | ``), so it cannot pass for a line of the worker's own, and control bytes
    (escape sequences a terminal showing the log would act on; Unicode's line and paragraph
    separators) become ``?``. Only whole lines are written (a part line waits for its end, or
    for the end of the evaluation), so the driver, which merges every worker's output into one
    log line by line, never puts another worker's line in the middle of one of them."""

    def __init__(self, cap: int = LOG_CAP, fd: int = 1) -> None:
        self.cap = cap
        self.fd = fd
        self.written = 0
        self.dropped = 0
        self.label = ""
        self.partial = b""

    def begin(self, label: str) -> None:
        self.label, self.dropped, self.partial = label, 0, b""

    def write(self, data: bytes) -> None:
        lines, self.partial = whole_lines(self.partial + _CONTROLS.sub(b"?", data), _LINE_MAX)
        self._emit(lines)

    def _emit(self, lines: bytes) -> None:
        if not lines:
            return
        prefix = f"{self.label} | ".encode()
        body = lines[:-1] if lines.endswith(b"\n") else lines
        data = b"".join(prefix + line + b"\n" for line in body.split(b"\n"))
        room = self.cap - self.written
        if room > 0:
            self._write(data[:room])
            self.written += min(room, len(data))
        self.dropped += max(0, len(data) - max(room, 0))

    def end(self) -> None:
        if self.partial:
            self._emit(self.partial)
            self.partial = b""
        if self.dropped:
            self._write(f"\n[evoloss worker] output of {self.label} truncated: {self.dropped} bytes dropped "
                        f"(cap of {self.cap} bytes of genome output per worker log)\n".encode())
            self.dropped = 0

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            pass


# -- the genome's process -------------------------------------------------------------------------------
class ChildExited(Exception):
    """The genome's process ended (or closed its pipe) without the message expected."""


class EvaluationChild:
    """One forked process that runs one genome (see the module docstring).

    Use :meth:`start` with the body to run (given the child's :class:`~engine.evaluation.Channel`),
    then :meth:`receive`, :meth:`receive_bytes` and :meth:`send_json`; :meth:`finish` always."""

    def __init__(self, pid: int, connection: Connection, output_fd: int, output: CappedOutput | None) -> None:
        self.pid = pid
        self.connection = connection
        self.output_fd = output_fd
        self.output = output
        self.exit_status: int | None = None

    @classmethod
    def start(cls, body: Callable[[Any], None], limits: dict[str, int], scratch: str | None = None,
              inherited: list[Any] = (), output: CappedOutput | None = None) -> EvaluationChild:
        """Fork the child; ``inherited`` are objects with ``close()`` (the driver connection)
        that the child closes first, ``limits`` holds ``file_bytes`` and ``open_files``."""
        from multiprocessing import Pipe

        parent_end, child_end = Pipe(duplex=True)
        output_read, output_write = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        parent_pid = os.getpid()
        # Frozen objects are skipped by the garbage collector: without this, the child's first
        # full collection writes to every object's header and copies the whole inherited heap
        # (about 100 ms of page copies in a torch process). Unfrozen again in the parent below.
        gc.freeze()
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                gc.unfreeze()
        if pid == 0:  # the genome's process: never returns
            code = 0
            try:
                parent_end.close()
                os.close(output_read)
                try:
                    _become_evaluation_child(parent_pid, child_end, output_write, limits, scratch, inherited)
                except OSError as exc:  # engine.confine.ConfineError: never run a genome unconfined
                    from engine.evaluation import Channel

                    Channel(child_end).send_json({"type": "failed", "status": "error", "error": (
                        f"the genome's process could not be confined: {exc}")})
                    raise
                from engine.evaluation import Channel

                body(Channel(child_end))
            except BaseException:  # noqa: BLE001 - nothing may return into the warm worker's code
                code = 70
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except BaseException:  # noqa: BLE001
                        pass
                os._exit(code)
        child_end.close()
        os.close(output_write)
        os.set_blocking(output_read, False)
        return cls(pid, parent_end, output_read, output)

    # -- talking to it ----------------------------------------------------------------------------
    def _wait(self, deadline: float) -> bool:
        """Relay the child's output until its pipe has a message (True) or ``deadline`` (False)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            watched = [self.connection] + ([self.output_fd] if self.output_fd is not None else [])
            ready = wait(watched, timeout=min(remaining, 3600.0))
            if self.output_fd in ready:
                self._relay_output()
            if self.connection in ready:
                return True

    def _relay_output(self) -> None:
        try:
            data = os.read(self.output_fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # every writer closed it
            os.close(self.output_fd)
            self.output_fd = None
            return
        if self.output is not None:
            self.output.write(data)

    def receive(self, deadline: float, limit: int) -> dict[str, Any] | None:
        """The next JSON message (at most ``limit`` bytes), or None at ``deadline``.

        Raises:
            ChildExited: the child closed its pipe (exited or crashed) or sent something that
                is not a JSON object.
        """
        data = self.receive_bytes(deadline, limit)
        if data is None:
            return None
        try:
            message = json.loads(data)
        except ValueError as exc:
            raise ChildExited("sent a message that is not JSON") from exc
        if not isinstance(message, dict):
            raise ChildExited("sent a message that is not a JSON object")
        return message

    def receive_bytes(self, deadline: float, limit: int) -> bytes | None:
        """The next frame's bytes (at most ``limit``), or None at ``deadline``: all of it within
        the deadline (:func:`engine.processes.read_frame`), so a child that sends part of a
        message and stalls cannot hold the worker past it."""
        try:
            return read_frame(self.connection, limit, deadline, self._wait)
        except EOFError:
            raise ChildExited("exited") from None
        except FrameTooLarge:
            raise ChildExited(f"sent more than {limit} bytes at once") from None

    def send_json(self, message: dict[str, Any]) -> None:
        try:
            self.connection.send_bytes(json.dumps(message).encode())
        except OSError:
            pass  # it died; the next receive says so

    # -- ending it ------------------------------------------------------------------------------
    def finish(self) -> int:
        """Kill the child's process group, reap it, sweep every process it left behind and drain
        its output; returns its wait status. Safe to call twice."""
        if self.connection.closed:
            return self.exit_status or 0
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.exit_status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # in case it never reached setsid()
            except ProcessLookupError:
                pass
            try:
                _, self.exit_status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                self.exit_status = 0
        sweep_descendants()
        if TUNABLES is not None:
            for change in TUNABLES.restore():
                print(f"[evoloss worker] a genome's process changed {change}", file=sys.stderr, flush=True)
        self.connection.close()
        deadline = time.monotonic() + 1.0
        while self.output_fd is not None and time.monotonic() < deadline:
            if wait([self.output_fd], timeout=max(0.0, deadline - time.monotonic())):
                self._relay_output()
        if self.output_fd is not None:
            os.close(self.output_fd)
            self.output_fd = None
        return self.exit_status

    def exited_on_its_own(self) -> int | None:
        """The child's wait status if it has exited by itself (not killed by us), else None."""
        if self.exit_status is None:
            for pause in (0.0, 0.05, 0.2):  # it closed its pipe and is exiting: give it a moment
                time.sleep(pause)
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    return None
                if pid:
                    self.exit_status = status
                    break
        return self.exit_status


def _become_evaluation_child(parent_pid: int, connection: Connection, output_write: int,
                             limits: dict[str, int], scratch: str | None, inherited) -> None:
    """Everything the genome's process does before any genome code (see the module docstring)."""
    os.setsid()
    scrub_freed_memory(False)  # only the warm worker's freed memory is ever inherited by a genome
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the warm worker died before the death signal was armed
        os._exit(1)
    for thing in inherited:
        try:
            thing.close()
        except OSError:
            pass
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output_write, 1)
    os.dup2(output_write, 2)
    keep = connection.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, _max_fd())
    for kind, value in ((resource.RLIMIT_FSIZE, limits.get("file_bytes")),
                        (resource.RLIMIT_NOFILE, limits.get("open_files"))):
        if value:
            soft, hard = resource.getrlimit(kind)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(kind, (value, value))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _confine(limits.get("hidden") or (), limits.get("frozen") or ())
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if scratch:
        os.chdir(scratch)
        os.environ.update({"HOME": scratch, "TMPDIR": scratch})
        tempfile.tempdir = scratch


def _confine(paths, frozen=()) -> None:
    """Inside a jail: cover what only the trusted phase may read (``SandboxNeeds.hidden_from_genome``)
    and make what only trusted code writes (``SandboxNeeds.trusted_writable``) read-only, and
    forbid new user namespaces in this genome's process (:mod:`engine.confine`).
    ``--sandbox none`` confines nothing.

    Raises:
        ConfineError: when paths were to be hidden, or namespaces could be made, and that failed.
    """
    if os.environ.get("EVOLOSS_SANDBOX", "none") == "none":
        return
    from engine.confine import NoNamespaces, confine, protect_from_genome, warm_worker_ids

    try:
        confine(paths, frozen)
    except NoNamespaces:
        if paths or frozen:
            raise
        # No user namespace can be made here at all (none by the genome either); the seccomp
        # filter that keeps it off the warm worker needs none.
        protect_from_genome(*warm_worker_ids())


def _max_fd() -> int:
    try:
        return max(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ValueError, OSError):  # pragma: no cover
        return 4096


class Tunables:
    """What a process of the same user may change in another's ``/proc`` without any capability,
    and a genome's process could set in the warm worker and the jail's init: the OOM killer's
    preference (``oom_score_adj``, raised to 1000 makes it the first one killed), the
    scheduler's (``autogroup`` nice, raised to 19) and what a core dump would hold
    (``coredump_filter``; no core is ever written, the limit is 0). seccomp filters calls, not
    ``open()`` of a ``/proc`` file, so the worker notes them when it starts and puts them back
    after every genome's process and all it started are gone (putting any of them back where it
    was needs no capability). Inside a jail only: pid 1 is then the jail's own init."""

    NAMES = ("oom_score_adj", "autogroup", "coredump_filter")
    #: How long to keep trying a change the kernel refuses for now (autogroup: EAGAIN).
    RETRY_SECONDS = 3.0

    def __init__(self, pids: tuple[int, ...]) -> None:
        self.saved = {(pid, name): value for pid in pids for name in self.NAMES
                      if (value := self._read(pid, name)) is not None}

    @staticmethod
    def _read(pid: int, name: str) -> str | None:
        try:
            with open(f"/proc/{pid}/{name}") as stream:
                text = stream.read().split()
        except OSError:
            return None
        if name == "autogroup":  # "/autogroup-123 nice 0"
            return text[-1] if len(text) >= 3 and text[-2] == "nice" else None
        return text[0] if text else None

    def restore(self) -> list[str]:
        """Put back what changed; returns what was put back ("pid 1 oom_score_adj 1000 -> 0")."""
        restored = []
        for (pid, name), value in self.saved.items():
            now = self._read(pid, name)
            if now is None or now == value:
                continue
            # The kernel takes one autogroup nice change per 100 ms from anyone on the machine
            # (EAGAIN): a genome in another worker can keep taking it; try often, for a while.
            deadline = time.monotonic() + self.RETRY_SECONDS
            while True:
                try:
                    with open(f"/proc/{pid}/{name}", "w") as stream:
                        # coredump_filter reads as hex digits and is parsed with C's base rules
                        stream.write("0x" + value if name == "coredump_filter" else value)
                    restored.append(f"pid {pid} {name} {now} -> {value}; put back")
                    break
                except OSError as exc:
                    if exc.errno == errno.EAGAIN and time.monotonic() < deadline:
                        time.sleep(0.005)
                        continue
                    restored.append(f"pid {pid} {name} {now}, could NOT be put back to {value} ({exc.strerror})")
                    break
        return restored


#: The worker's and its jail init's tunables as they were when the worker started (inside a jail).
TUNABLES: Tunables | None = None


def sweep_descendants(seconds: float = SWEEP_SECONDS) -> bool:
    """Kill and reap every process below this one (the warm worker is a child subreaper, so every
    process an evaluation started is below it, even one that detached into a session of its own).
    Returns False if some survived ``seconds`` of trying."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True  # no child at all, hence no descendant
        if pid:
            continue
        if time.monotonic() > deadline:
            print(f"[evoloss worker] could not end every process left by an evaluation within {seconds:g} s",
                  file=sys.stderr, flush=True)
            return False
        import psutil

        try:
            descendants = psutil.Process().children(recursive=True)
        except psutil.Error:
            descendants = []
        for process in descendants:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its own group, if it leads one
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.kill()
            except psutil.Error:
                pass
        time.sleep(0.002)


# -- one evaluation, seen from the warm worker --------------------------------------------------------
def _death_message(status: int, oom_kills_before: int | None = None) -> tuple[str, str]:
    """Status and message for a genome's process that ended without its result.

    A SIGKILL is ``oom`` when the kernel's out-of-memory kill count grew while the process ran
    (or cannot be read); otherwise something else killed it (the genome itself, or a user), an
    ``error``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGKILL:
            after = oom_kills() if oom_kills_before is not None else None
            if after is None:
                return "oom", ("the genome's process was killed (SIGKILL) before it returned its artefacts, most "
                               "likely by the kernel's out-of-memory killer")
            if after > oom_kills_before:
                return "oom", ("the genome's process was killed (SIGKILL) by the kernel's out-of-memory killer "
                               "before it returned its artefacts")
            return "error", ("the genome's process was killed (SIGKILL) before it returned its artefacts, not by "
                             "the kernel's out-of-memory killer (its kill count did not change)")
        if number == signal.SIGXFSZ:
            return "error", "the genome's process wrote a file larger than the limit (SIGXFSZ)"
        return "error", f"the genome's process crashed with {name}"
    return "error", f"the genome's process exited with code {os.WEXITSTATUS(status)} before returning its result"


def _checked_message(message: dict[str, Any], fitness) -> tuple[str, dict[str, float]]:
    """The fingerprint and descriptors a genome's process reported, validated (it may lie only
    about its own behaviour: a fingerprint of 64 hex digits at most, finite descriptors named
    in the plug-in's descriptor space)."""
    from engine.candidate import finite_number, is_fingerprint

    fingerprint = message.get("fingerprint")
    if not is_fingerprint(fingerprint):
        raise ValueError("an invalid fingerprint")
    names = {d.name for d in getattr(fitness, "descriptor_space", ())} | set(getattr(fitness, "extra_descriptors", ()))
    descriptors = message.get("descriptors")
    if not isinstance(descriptors, dict) or len(descriptors) > max(len(names), 64):
        raise ValueError("invalid descriptors")
    clean: dict[str, float] = {}
    for key, value in descriptors.items():
        number = finite_number(value)
        if (names and key not in names) or number is None:
            raise ValueError(f"an invalid descriptor {str(key)[:40]!r}")
        clean[str(key)] = number
    return fingerprint, clean


def evaluate_in_child(fitness, stages: list, task: dict[str, Any], decide, *, inherited=(),
                      output: CappedOutput | None = None, scratch_root: str | None = None):
    """Score one task: the untrusted phase in a fresh forked process, the trusted phase here."""
    from engine.candidate import EvalResult, finite_number
    from engine.evaluation import (CHILD_STATUSES, MAX_MESSAGE_BYTES, bounded_error, duplicate_result,
                                   judge_request, jsonable, short_error, trusted_score, untrusted_phase)
    from fitness.base import ArtefactError, artefacts_from_bytes, is_protected

    start = time.perf_counter()
    candidate_id, code, seed = task["candidate_id"], task["code"], task["seed"]
    timeout = float(task.get("timeout") or 0) or float("inf")
    check_timeout = min(float(task.get("check_timeout") or CHECK_TIMEOUT), timeout)
    jail_only = bool(task.get("jail_only", False))
    checked = bool(task.get("checked", False))  # a re-measurement: the checks ran on its first evaluation
    fingerprint, descriptors = None, {}

    def failed(status: str, error: str) -> EvalResult:
        return EvalResult(candidate_id, status, error=error, fingerprint=fingerprint, descriptors=descriptors,
                          seconds=time.perf_counter() - start)

    try:
        # Caches and held-out data, built here once and inherited by every genome's process.
        getattr(fitness, "prepare", lambda seed: None)(seed)
    except Exception as exc:  # noqa: BLE001 - a plug-in's own failure
        return failed(*short_error(exc))
    scratch = tempfile.mkdtemp(prefix=f"eval-{candidate_id}-", dir=scratch_root)
    if output is not None:
        output.begin(f"candidate {candidate_id}")
    limits = {"file_bytes": int(getattr(fitness, "max_file_bytes", 0) or 0),
              "open_files": int(getattr(fitness, "max_open_files", 0) or 0), **genome_view(stages)}
    oom_kills_before = oom_kills()
    forget_freed_numbers()
    child = EvaluationChild.start(
        lambda channel: untrusted_phase(fitness, stages, code, seed, channel, jail_only, checked),
        limits, scratch=scratch, inherited=list(inherited), output=output,
    )
    phase = "checks"
    try:
        message = child.receive(time.monotonic() + check_timeout, MAX_MESSAGE_BYTES)
        if message is None:
            return failed("timeout", f"the contract checks did not finish within their {check_timeout:g} s wall-clock "
                                     "limit (--check-timeout): the loss hangs or is far too slow on tiny inputs")
        if message.get("type") == "checked":
            try:  # a re-measurement keeps nothing the genome's process says here
                fingerprint, descriptors = (None, {}) if checked else _checked_message(message, fitness)
            except ValueError as exc:
                return failed("error", f"the genome's process reported {exc}")
            if decide is not None and fingerprint is not None:
                duplicate_of = decide(candidate_id, fingerprint)
                if duplicate_of is not None:
                    return duplicate_result(candidate_id, duplicate_of, fingerprint, descriptors, start)
            phase = "training"
            child.send_json({"type": "go"})
            deadline = time.monotonic() + timeout
            message = child.receive(deadline, MAX_MESSAGE_BYTES)
            if message is None:
                return failed("timeout", f"training exceeded the {timeout:g} s wall-clock limit (--timeout); "
                                         "its process was killed")
        kind = message.get("type")
        if kind == "failed":
            status = message.get("status") if message.get("status") in CHILD_STATUSES else "error"
            return failed(status, bounded_error(message.get("error", "")))
        if kind == "artefacts" and phase == "training" and is_protected(fitness):
            cap = int(fitness.max_artefact_bytes)
            data = child.receive_bytes(deadline, cap + (1 << 20))
            if data is None:
                return failed("timeout", f"training exceeded the {timeout:g} s wall-clock limit (--timeout); "
                                         "its process was killed")
            child.finish()  # nothing of the genome runs while it is scored
            try:
                artefacts = artefacts_from_bytes(data, fitness.artefact_spec(seed), cap)
            except ArtefactError as exc:
                return failed("error", bounded_error(f"the genome's process returned invalid artefacts: {exc}"))
            value, metrics, payload = _score(fitness, artefacts, seed, trusted_score)
            peak = message.get("gpu_peak_memory_bytes")  # the genome's process says it: bounded
            if isinstance(peak, int) and not isinstance(peak, bool) and 0 <= peak < 1 << 63:
                metrics.setdefault("gpu_peak_memory_bytes", peak)
            # A plug-in with a judge phase is judged by the driver, outside this jail.
            return EvalResult(candidate_id, "ok", fitness=value, metrics=metrics, descriptors=descriptors,
                              fingerprint=fingerprint, seconds=time.perf_counter() - start,
                              judge=judge_request(seed, int(task.get("stage", 0) or 0), payload))
        if kind == "unprotected" and phase == "training" and not is_protected(fitness):
            value = finite_number(message.get("fitness"))
            if value is None:
                return failed("error", "the plug-in's evaluate() returned a fitness that is not a finite number")
            metrics = message.get("metrics") if isinstance(message.get("metrics"), dict) else {}
            metrics = jsonable(metrics)
            metrics["unprotected"] = True
            return EvalResult(candidate_id, "ok", fitness=float(value), metrics=metrics, descriptors=descriptors,
                              fingerprint=fingerprint, seconds=time.perf_counter() - start)
        return failed("error", f"the genome's process sent an unexpected message during the {phase}")
    except ChildExited as exc:
        status = child.exited_on_its_own()
        if status is not None and str(exc) == "exited":
            return failed(*_death_message(status, oom_kills_before))
        return failed("error", f"the genome's process {exc} during the {phase}")
    except Exception as exc:  # noqa: BLE001 - the trusted phase's own failure (a plug-in bug)
        status, message = short_error(exc)
        return failed(status, message)
    finally:
        child.finish()
        if output is not None:
            output.end()
        remove_tree(scratch)
        _clean_shared_folders()


def _clean_shared_folders() -> None:
    """Inside a jail, after a genome's process and everything it started are gone: empty the
    folders every genome's process can write besides its own scratch (the jail's ``/tmp`` and
    ``/dev/shm``, the worker's scratch), so nothing one genome leaves there reaches the next. Mount
    points (the worker's scratch, a plug-in's folders) and what lies in them are never touched:
    only what the jail's own in-memory folders hold is removed. ``--sandbox none``: nothing (those
    are the machine's own folders then)."""
    if os.environ.get("EVOLOSS_SANDBOX", "none") == "none":
        return
    from engine.confine import mount_points

    points = set(mount_points())

    def clean(folder: str) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            path = entry.path
            if path in points:
                if path == tempfile.gettempdir():  # the worker's scratch: a mount, but ours to clean
                    clean(path)
                continue
            if any(point.startswith(path + "/") for point in points):
                clean(path)  # a folder on the way to a mount point: clean around it
            else:
                remove_tree(path)  # however deep, whatever modes the genome gave it

    for folder in ("/tmp", "/dev/shm", tempfile.gettempdir()):
        clean(folder)


def _score(fitness, artefacts, seed, trusted_score):
    """The trusted phase here, or in a forked child that runs no genome code when the plug-in
    scores on GPUs (this process must never initialise CUDA)."""
    wants_gpu = float(dict(fitness.resources()).get("gpus", 0) or 0) > 0
    if not wants_gpu:
        return trusted_score(fitness, artefacts, seed)
    return _score_in_child(fitness, artefacts, seed, trusted_score)


def _score_in_child(fitness, artefacts, seed, trusted_score):
    from engine.evaluation import MAX_JUDGE_BYTES, MAX_MESSAGE_BYTES, short_error

    def body(channel) -> None:
        try:
            value, metrics, payload = trusted_score(fitness, artefacts, seed)
            channel.send_json({"type": "score", "fitness": value, "metrics": metrics, "to_judge": payload})
        except BaseException as exc:  # noqa: BLE001
            status, message = short_error(exc)
            channel.send_json({"type": "failed", "status": status, "error": message})

    scorer = EvaluationChild.start(body, {}, output=CappedOutput(1 << 62))
    try:
        message = scorer.receive(float("inf"), MAX_MESSAGE_BYTES * 16 + MAX_JUDGE_BYTES)
    except ChildExited:
        raise RuntimeError("the scoring process ended without a score") from None
    finally:
        scorer.finish()
    if message.get("type") != "score":
        from engine.genome import GenomeError

        raise GenomeError(message.get("error", "scoring failed"), status=message.get("status", "error"))
    return float(message["fitness"]), message["metrics"], message.get("to_judge")


def genome_view(stages) -> dict[str, tuple[str, ...]]:
    """What each genome's process gives up of the jail (:mod:`engine.confine`), from every
    stage's ``sandbox_needs()`` (worked out once per plug-in): ``hidden`` (its
    ``hidden_from_genome``) and ``frozen`` (its ``trusted_writable``, read-only there)."""
    view: dict[str, list[str]] = {"hidden": [], "frozen": []}
    for stage in stages:
        needs = stage.__dict__.get("_evoloss_needs")
        if needs is None:
            needs = stage.sandbox_needs() if hasattr(stage, "sandbox_needs") else None
            try:
                stage.__dict__["_evoloss_needs"] = needs
            except (AttributeError, TypeError):  # pragma: no cover - a plug-in without a __dict__
                pass
        view["hidden"].extend(getattr(needs, "hidden_from_genome", ()) or ())
        view["frozen"].extend(getattr(needs, "trusted_writable", ()) or ())
    from fitness.truth import key_file

    if key_file() is not None:  # only the child that builds a problem reads it (fitness.truth)
        view["hidden"].append(str(key_file()))
    return {key: tuple(paths) for key, paths in view.items()}


# -- the warm worker's loop -------------------------------------------------------------------------------
def _load_stages(specs: list, torch) -> list:
    """Build the plug-ins of ``specs`` (``[spec, options]`` pairs); none may initialise CUDA here."""
    from engine.plugins import load_fitness

    stages = [load_fitness(spec, options) for spec, options in specs]
    if torch.cuda.is_initialized():
        names = ", ".join(repr(getattr(stage, "name", stage)) for stage in stages)
        raise RuntimeError(f"loading fitness {names} initialised CUDA in the warm worker, which forks one "
                           "process per genome (CUDA does not survive a fork): initialise CUDA in train() "
                           "or score(), not in __init__")
    return stages


def _fatal(exc: BaseException) -> dict[str, str]:
    """The message that tells the driver this worker cannot serve (it stops the run cleanly)."""
    from engine.plugins import PluginError

    return {"type": "fatal", "error": str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--stages", required=True, help="JSON list of [fitness spec, options] (fidelity stages)")
    parser.add_argument("--memory-limit", type=int, default=0, help="bytes of address space (0: none)")
    parser.add_argument("--sys-path", default="[]")
    parser.add_argument("--log-cap", type=int, default=LOG_CAP,
                        help="bytes of genome output copied to the worker log over the worker's life")
    args = parser.parse_args(argv)

    for entry in reversed(json.loads(args.sys_path)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if os.environ.get("EVOLOSS_SANDBOX", "none") != "none":
        # Inside a jail nothing writable (or missing: a genome could make it) is ever imported from.
        sys.path[:] = [entry for entry in sys.path
                       if entry and os.path.exists(entry) and not os.access(entry, os.W_OK)]
    if args.memory_limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    # A worker never needs core dumps, and a crashing genome should not write one.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Every process an evaluation starts stays below this one, even once detached (the sweep).
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    # A genome's process may not ptrace this one or read its memory.
    _prctl(4, 0)  # PR_SET_DUMPABLE
    # Nor find, in the memory it is forked with, what this process computed and freed: the
    # temporaries of a problem's true reward, the last genome's scoring (before torch is imported).
    if not scrub_freed_memory():
        print("[evoloss worker] freed memory is not overwritten here (no glibc mallopt): a genome's "
              "process may find values the trusted phase computed and freed", flush=True)
    global TUNABLES
    if os.environ.get("EVOLOSS_SANDBOX", "none") != "none":
        TUNABLES = Tunables((os.getpid(), 1))

    watch_parent()
    conn = JsonConnection(args.fd)  # JSON both ways: the driver never unpickles what a worker sends
    # torch.cuda.is_available() through NVML: it does not initialise CUDA, so forking stays safe.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        from fitness.truth import forking_genomes

        # Problems are built in a child of their own, the truth key read only there; its memory
        # goes with it, so it need not overwrite what it frees.
        forking_genomes(builder_setup=lambda: scrub_freed_memory(False))
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        stages = _load_stages(json.loads(args.stages), torch)
        _warm_up(torch)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, which stops cleanly
        conn.send(_fatal(exc))
        return 1
    conn.send({"type": "ready", "pid": os.getpid()})

    def decide(candidate_id: int, fingerprint: str):
        conn.send({"type": "probe", "candidate_id": candidate_id, "fingerprint": fingerprint})
        return conn.recv()["duplicate_of"]

    output = CappedOutput(args.log_cap)
    cuda_warned = False
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return 0
        if task is None:
            return 0
        if task.get("type") == "stages":  # stages the driver named after starting this worker
            try:
                stages += _load_stages(task["stages"], torch)
            except BaseException as exc:  # noqa: BLE001 - reported to the driver, which stops cleanly
                conn.send(_fatal(exc))
                return 1
            conn.send({"type": "ready", "pid": os.getpid()})
            continue
        stage = stages[task.get("stage", 0)]
        result = evaluate_in_child(stage, stages, task, decide, inherited=[conn], output=output)
        conn.send({"type": "result", "result": result.to_dict()})
        del result  # the next genome's process must not find this one's scores alive here
        if not cuda_warned and torch.cuda.is_initialized():
            cuda_warned = True
            print(f"[evoloss worker] fitness {getattr(stage, 'name', stage)!r} initialised CUDA in the warm worker "
                  "(in prepare() or score()); the processes it forks for genomes cannot use CUDA now. Declare "
                  "GPUs in resources() so that score() runs in a process of its own.", file=sys.stderr)
        sys.stdout.flush()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A worker owns nothing that needs tearing down (the driver owns the run store); skipping the
    # interpreter's teardown of torch lets the run exit as soon as its last evaluation is in.
    os._exit(code)
