"""Executors run evaluations: ``process`` (isolated worker processes, the default), ``ray``
(the same workers inside Ray actors: :mod:`engine.ray_executor`) and ``serial`` (in-process,
for debugging).

Each process worker runs in an OS jail (:mod:`engine.jail`: ``--sandbox``) in its own session,
with resource limits, an environment holding no secrets and one private scratch folder; its
output reaches the run's worker log through a pipe (capped), so it holds no file of the run.
A task that overruns its wall-clock timeout has its worker killed with everything it started;
a worker that dies mid-task (segfault, kernel OOM killer) is replaced and the task retried
once, then recorded as failed. Either way the run goes on: a replacement starts in the
background and gets work once it is ready, while the other workers go on.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable

from engine import jail
from engine.processes import JsonConnection, oom_kills, remove_tree, whole_lines
from engine.candidate import EvalResult, finite_number, is_fingerprint
from engine.evaluation import Decide, run_candidate
from engine.plugins import PluginError, load_fitness

#: Environment variables a worker keeps; everything else (API keys, tokens) is dropped.
_KEEP_ENV = {
    "PATH", "HOME", "LANG", "LANGUAGE", "TERM", "TMPDIR", "TZ", "PYTHONPATH", "PYTHONHASHSEED",
    "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "EVOLOSS_DATA", "SYSTEMROOT", "EVOLOSS_TRUTH_FILE",  # the truth key file's path, not the key
}
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE|"
                     r"^(AWS|AZURE|GOOGLE|GCP|GCLOUD|OPENAI|ANTHROPIC)_", re.I)
#: Bytes of output one worker may write to the run's worker log; the rest is dropped, with a note.
LOG_LIMIT_BYTES = 4 << 20
#: Name prefix of an executor's folder of worker scratch folders (in the temporary folder),
#: followed by the driver's pid.
SCRATCH_PREFIX = "evoloss-workers-"


def _remove_stale_scratch() -> None:
    """Remove the scratch folders of executors whose driver is gone (killed before it could
    clean up: a scratch may hold a saved model)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            remove_tree(folder)
        except PermissionError:  # another user's live process
            continue

OnResult = Callable[[EvalResult], None]


def scrubbed_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a worker gets: an allow-list, never anything that looks secret."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if (k in _KEEP_ENV or k.startswith("LC_")) and not _SECRET.search(k)}
    # One torch thread per worker: two workers on two cores beat one worker with two threads.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                # What the warm worker frees is overwritten, so no genome's process (a copy of its
                # memory) finds what scoring computed: small blocks too (glibc's per-thread cache,
                # which skips engine.worker.scrub_freed_memory's overwrite, is off) and Python's
                # objects (its debug allocator overwrites what it frees).
                "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "PYTHONMALLOC": "pymalloc_debug"})
    return env


@dataclass
class Task:
    """One evaluation: a candidate's code scored on fidelity stage ``stage`` (0 unless the run
    climbs a fidelity ladder), on evaluation seed ``seed`` (None: the run's own; re-measuring a
    candidate on fresh seeds gives one). ``checked``: the candidate already passed the contract
    checks on this stage and the driver has its fingerprint and descriptors (a re-measurement),
    so its process goes straight to training."""

    candidate_id: int
    code: str
    stage: int = 0
    seed: int | None = None
    attempts: int = 0
    #: The kernel's out-of-memory kill count when the task was first handed to a worker.
    oom_kills_before: int | None = None
    checked: bool = False

    def seed_or(self, default: int) -> int:
        return default if self.seed is None else self.seed


class TaskSource:
    """Where an executor takes its next task when a worker is free.

    The generational loop hands over a fixed list (:class:`ListSource`); the steady-state loop
    makes the next offspring the moment a worker frees up, so its source may have nothing ready
    yet (an LLM call in flight) without being finished.
    """

    #: Longest wait for results before the executor asks the source again while it has
    #: free workers and the source is not exhausted.
    poll_interval: float = 0.05

    def take(self) -> Task | None:
        """The next task, or None when none is ready now."""
        raise NotImplementedError

    def exhausted(self) -> bool:
        """True once no task will ever come again."""
        raise NotImplementedError


class ListSource(TaskSource):
    """A fixed list of tasks: ``(candidate_id, code)``, ``(candidate_id, code, stage)``,
    ``(candidate_id, code, stage, seed)`` or ``(candidate_id, code, stage, seed, checked)``."""

    poll_interval = float("inf")

    def __init__(self, tasks: Iterable[tuple]) -> None:
        self.queue: deque[Task] = deque(Task(*task[:4], checked=bool(task[4]) if len(task) > 4 else False)
                                        for task in tasks)

    def take(self) -> Task | None:
        return self.queue.popleft() if self.queue else None

    def exhausted(self) -> bool:
        return not self.queue


def as_source(tasks: Iterable[tuple] | TaskSource) -> TaskSource:
    return tasks if isinstance(tasks, TaskSource) else ListSource(tasks)


def next_task(retries: deque[Task], source: TaskSource) -> Task | None:
    """What a free worker runs next: a retry of a task whose worker died, else the source's next."""
    return retries.popleft() if retries else source.take()


def wait_seconds(deadlines: list[float], more: bool, idle: bool, source: TaskSource) -> float:
    """How long a scheduler may block for results: until the nearest deadline, and no longer than
    the source's poll interval while a worker is idle and more work may come."""
    wait_for = min(deadlines, default=float("inf")) - time.monotonic()
    if more and idle:
        wait_for = min(wait_for, source.poll_interval)
    return max(0.0, wait_for)


class Executor:
    """What every executor offers: ``start()``, ``run(tasks, seed, decide, on_result)`` (calls
    ``on_result`` in the driver as each evaluation finishes; ``tasks`` is a list of
    ``(candidate_id, code[, stage])`` or a :class:`TaskSource`) and ``close()``; a context
    manager starts and closes it. A plug-in with several fidelity stages is given as a list of
    ``(spec, options)`` pairs; a task's stage picks one."""

    def launch(self, speculative: bool = False) -> None:
        """Begin starting up without waiting (process workers boot while the driver prepares).
        ``speculative``: before the driver has loaded the plug-ins; :meth:`confirm` follows."""

    def confirm(self, fitness_spec: Any = None, plugins: Iterable[Any] = ()) -> bool:
        """Fix the stages served (and what a speculative :meth:`launch` guessed) once the
        driver has loaded the plug-ins; True when nothing started had to start again."""
        return True

    def start(self) -> None:
        pass

    def run(self, tasks: Iterable[tuple] | TaskSource, seed: int, decide: Decide | None,
            on_result: OnResult) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerialExecutor(Executor):
    """Scores candidates one at a time in this process: no timeout, no isolation.

    For debugging plug-ins and for tests; use the process executor for untrusted genomes.
    """

    def __init__(self, fitness_spec: Any, fitness_options: dict[str, Any] | None = None, **_: Any) -> None:
        self.stages = [load_fitness(spec, options) for spec, options in stage_specs(fitness_spec, fitness_options)]

    def run(self, tasks: Iterable[tuple] | TaskSource, seed: int, decide: Decide | None,
            on_result: OnResult) -> None:
        source = as_source(tasks)
        while not source.exhausted():
            task = source.take()
            if task is None:
                time.sleep(min(source.poll_interval, 0.05))
                continue
            on_result(run_candidate(self.stages[task.stage], task.candidate_id, task.code, task.seed_or(seed),
                                    decide=decide, checked=task.checked))


def stage_specs(fitness_spec: Any, fitness_options: dict[str, Any] | None = None) -> list[tuple[Any, dict[str, Any]]]:
    """The fidelity stages an executor serves: one ``(spec, options)`` pair, or a list of them."""
    if isinstance(fitness_spec, (list, tuple)):
        return [(spec, dict(options or {})) for spec, options in fitness_spec]
    return [(fitness_spec, dict(fitness_options or {}))]


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    scratch: Path | None = None
    task: Task | None = None
    deadline: float = float("inf")
    ready: bool = False
    started: float = field(default_factory=time.monotonic)
    #: "ready" messages still to come: one from start-up, one per stage message sent since.
    awaiting: int = 1


class _WorkerLog:
    """The run's worker log. Until its file is opened (workers may boot before the run folder
    exists), what they print waits in memory, up to :data:`LOG_LIMIT_BYTES` in all."""

    def __init__(self) -> None:
        self.file = None
        self.pending = bytearray()

    def open(self, path: Path) -> None:
        self.file = open(path, "ab")  # noqa: SIM115 - closed in close()
        self.file.write(self.pending)
        self.file.flush()
        self.pending = bytearray()

    def write(self, data: bytes) -> None:
        if self.file is not None:
            self.file.write(data)
        else:
            self.pending += data[: max(0, LOG_LIMIT_BYTES - len(self.pending))]

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


#: A part line of a worker's output held back for its end at most this long (bytes).
_PART_LINE_MAX = 1 << 16


def _pump_output(stream, log, lock: threading.Lock, pid: int, limit: int | None = None) -> None:
    """Copy one worker's output into the run's worker log, at most ``limit`` bytes (default
    :data:`LOG_LIMIT_BYTES`); read (and drop) the rest so that a genome printing in a loop never
    blocks on a full pipe. Whole lines only (a part line waits for its end, up to 64 KiB): the
    workers share the log, and a line of one must never end up inside a line of another."""
    limit = LOG_LIMIT_BYTES if limit is None else limit
    written, pending = 0, b""

    def put(data: bytes, last: bool = False) -> None:
        nonlocal written
        data = data[: limit - written]
        written += len(data)
        with lock:
            log.write(data)
            if written >= limit:
                log.write(f"\n[worker {pid}: output past {limit} bytes dropped]\n".encode())
            elif last and data and not data.endswith(b"\n"):
                log.write(b"\n")
            log.flush()

    with stream:
        for chunk in iter(lambda: stream.read1(65536), b""):
            if written >= limit:
                continue
            lines, pending = whole_lines(pending + chunk, _PART_LINE_MAX)
            if lines:
                put(lines)
        if pending and written < limit:
            put(pending, last=True)


class ProcessExecutor(Executor):
    """A pool of isolated worker processes (see the module docstring).

    Args:
        fitness_spec: How workers find the fitness plug-in (a name or ``path.py:Class``).
        fitness_options: Keyword options for the plug-in.
        workers: Number of worker processes.
        timeout: Wall-clock seconds per evaluation.
        memory_limit_gb: Address-space limit per worker.
        log_path: File that receives the workers' stdout and stderr.
        startup_timeout: Seconds a worker may take to import torch and load the plug-in.
        sandbox: ``auto``, ``bwrap``, ``unshare`` or ``none`` (:func:`engine.jail.choose`), or a
            :class:`engine.jail.Sandbox` already chosen.
        allow_host_network: Let a plug-in that declares it needs the host's network have it.
        gpus: Show the GPU devices in the jail (default: when a plug-in's ``resources()`` asks).
        check_timeout: Seconds the contract checks of one genome may take. The worker ends a
            genome's process at this deadline and at ``timeout`` (training); the executor's own
            deadline (checks + twice the training limit + 30 s) only catches a worker stuck in
            the plug-in's trusted code (``prepare``, ``score``).
        jail_only: Testing only: genomes run as plain Python (no static check, no restricted
            namespaces), to test the jail and the fresh process alone.
    """

    def __init__(self, fitness_spec: Any, fitness_options: dict[str, Any] | None = None, workers: int = 2,
                 timeout: float = 120.0, memory_limit_gb: float = 4.0, log_path: str | os.PathLike | None = None,
                 startup_timeout: float = 120.0, sandbox: str | jail.Sandbox = "auto",
                 allow_host_network: bool = False, gpus: bool | None = None, check_timeout: float = 10.0,
                 jail_only: bool = False) -> None:
        stages = stage_specs(fitness_spec, fitness_options)
        self.check_timeout = check_timeout
        self.jail_only = jail_only
        if not all(isinstance(spec, str) for spec, _ in stages):
            raise PluginError("the process executor needs the fitness plug-in as a string spec (name or path.py:Class)")
        self._set_stages(stages)
        self.n_workers = workers
        self.timeout = timeout
        self.memory_limit = int(memory_limit_gb * 1024**3)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.workers: list[_Worker] = []
        self.restarts = 0
        self._log_lock = threading.Lock()
        self.sandbox_mode = sandbox
        self.sandbox: jail.Sandbox | None = None
        self.allow_host_network = allow_host_network
        self.gpus = gpus
        self.limits = jail.Limits(address_space=self.memory_limit)
        self._scratch_root: Path | None = None
        self._view_parts: dict[str, Any] = {}
        self._guessed: dict[str, Any] | None = None  # the view of a speculative launch, until confirmed
        self._log: _WorkerLog | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def launch(self, speculative: bool = False) -> None:
        """Start every worker at once without waiting for them: they import torch and load the
        plug-ins while the driver prepares the run. :meth:`start` then waits (and launches first
        when this was not called).

        ``speculative``: launch before the driver has loaded the plug-ins (importing one imports
        torch, about a second), in the jail view the plug-ins get when they declare no needs
        (:func:`engine.jail.guessed_view_parts`), with no worker log file yet (the run folder may
        not exist: what workers print waits in memory). :meth:`confirm` then works out the real
        view and keeps the workers only if it is the same; no task reaches a worker before."""
        if self.workers:
            return
        self.sandbox = self.sandbox_mode if isinstance(self.sandbox_mode, jail.Sandbox) else \
            jail.choose(self.sandbox_mode)
        if self.sandbox.warning:
            warnings.warn(self.sandbox.warning, RuntimeWarning, stacklevel=2)
        if self._scratch_root is None:
            self._make_scratch_root()
        if self.log_path and self._log is None:
            self._log = _WorkerLog()
        if speculative:
            guessed = jail.guessed_view_parts([spec for spec, _ in self.stages], run_dir=self._run_dir(),
                                              gpus=bool(self.gpus)) if self.sandbox.jailed else {}
            try:
                if guessed:
                    jail.plan(jail.View(scratch=self._scratch_root, **guessed))
            except jail.SandboxUnavailable:
                return  # not a view to boot in: confirm() launches in the real one
            self._view_parts, self._guessed = guessed, guessed
        else:
            self._view_parts = self._real_view_parts(self.stages) if self.sandbox.jailed else {}
            self._open_log()
        try:
            for _ in range(self._early_workers() if speculative else self.n_workers):
                self.workers.append(self._spawn())
        except BaseException:
            self.close()
            raise

    def _early_workers(self) -> int:
        """How many workers a speculative launch starts: as many as leave the driver a CPU of its
        own while it imports the plug-ins (it must before any task is sent), at least one; the
        others start once it has (:meth:`confirm`)."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return max(1, min(self.n_workers, cpus - 1))

    def confirm(self, fitness_spec: Any = None, plugins: Iterable[Any] = ()) -> bool:
        """End a speculative :meth:`launch` (else launch now): ``fitness_spec`` is every stage
        the workers serve (default: those given at construction), beginning with the stages they
        were launched with; ``plugins`` are the plug-ins the driver built for the first stages
        (the others are built here). Works out the jail view from the plug-ins' declared needs
        (:func:`engine.jail.worker_view_parts`). When it is the launch's view, the workers are
        kept and sent the stages they lack; otherwise they are killed and started again in the
        real view: no genome ever runs in a view that is not the real one. Returns True when the
        workers were kept."""
        stages = stage_specs(fitness_spec) if fitness_spec is not None else self.stages
        if not all(isinstance(spec, str) for spec, _ in stages):
            raise PluginError("the process executor needs the fitness plug-in as a string spec (name or path.py:Class)")
        if self._guessed is None:
            if self.workers:
                if stages != self.stages:
                    raise RuntimeError("confirm() cannot change the stages of workers launched with their real view")
                return True
            self._set_stages(stages)
            self.launch()
            return False
        try:
            real = self._real_view_parts(stages, plugins) if self.sandbox.jailed else {}
            keep = stages[:len(self.stages)] == self.stages and jail.same_view(real, self._guessed)
            extra = self._absolute_stages(stages[len(self.stages):])
            self._set_stages(stages)
            self._view_parts, self._guessed = real, None
            self._open_log()
            if keep:
                for worker in self.workers:
                    if extra:
                        self._send_stages(worker, extra)
            else:
                for worker in self.workers:
                    self._kill(worker)
                    worker.conn.close()
                self.workers = []
            self.workers += [self._spawn() for _ in range(self.n_workers - len(self.workers))]
            return keep
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        """Start every worker at once (unless :meth:`launch` did), then wait until one is ready:
        :meth:`run` gives work to the others as they become ready, so the first evaluation never
        waits for the slowest worker's start-up."""
        self.launch()
        if self._guessed is not None or not self.workers:
            self.confirm()
        try:
            deadline = time.monotonic() + self.startup_timeout
            while not any(worker.ready for worker in self.workers):
                waiting = [w for w in self.workers if not w.ready]
                for conn in wait([w.conn for w in waiting], timeout=max(0.0, deadline - time.monotonic())):
                    self._started(next(w for w in waiting if w.conn is conn))
                self._check_startup(time.monotonic())
        except BaseException:
            self.close()
            raise

    def _set_stages(self, stages: list[tuple[Any, dict[str, Any]]]) -> None:
        self.stages = stages
        self.fitness_spec = " > ".join(spec for spec, _ in stages)

    def _run_dir(self) -> Path | None:
        return self.log_path.parent if self.log_path else None

    def _make_scratch_root(self) -> None:
        _remove_stale_scratch()
        self._scratch_root = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        # Removed by close(); also when this executor is collected or the interpreter exits without it.
        weakref.finalize(self, remove_tree, str(self._scratch_root))

    def _open_log(self) -> None:
        if self._log is not None and self._log.file is None:
            with self._log_lock:
                self._log.open(self.log_path)

    def _real_view_parts(self, stages: list[tuple[Any, dict[str, Any]]], plugins: Iterable[Any] = ()) -> dict:
        """What every worker's jail shows, from the plug-ins' declared needs: ``plugins`` built
        by the caller for the first stages, the others built here."""
        built = list(plugins)
        built += [load_fitness(spec, options) for spec, options in stages[len(built):]]
        gpus = self.gpus if self.gpus is not None else plugin_resources(built)["gpus"] > 0
        return jail.worker_view_parts(built, run_dir=self._run_dir(), allow_host_network=self.allow_host_network,
                                      gpus=gpus)

    def _send_stages(self, worker: _Worker, stages: list) -> None:
        """Tell a worker of stages it was not started with; it answers "ready" once it serves them."""
        worker.ready = False
        worker.awaiting += 1
        try:
            worker.conn.send({"type": "stages", "stages": stages})
        except OSError:
            pass  # it died; its start-up says so

    def close(self) -> None:
        for worker in self.workers:
            if not worker.ready:  # still booting (or loading stages): nothing of it to wait for
                self._kill(worker)
                continue
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for worker in self.workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(worker)
            worker.conn.close()
        self.workers = []
        self._guessed = None
        if self._log is not None:
            with self._log_lock:
                self._log.close()
            self._log = None
        if self._scratch_root is not None:
            remove_tree(self._scratch_root)  # however deep and locked a genome left it
            self._scratch_root = None

    def _spawn(self) -> _Worker:
        """Start one worker in its jail; it is ready once it says so (:meth:`_started`)."""
        scratch = Path(tempfile.mkdtemp(prefix="worker-", dir=self._scratch_root))
        parent, child = socket.socketpair()
        command = [
            sys.executable, "-m", "engine.worker", "--fd", str(child.fileno()),
            "--stages", json.dumps(self._absolute_stages(self.stages)),
            "--memory-limit", str(self.memory_limit),
            "--sys-path", json.dumps([os.path.abspath(p or ".") for p in sys.path]),
        ]
        view = jail.View(scratch=scratch, **self._view_parts)
        env = jail.jail_environment(scrubbed_environment(), view, self.sandbox)
        argv, launcher_env = jail.wrap(self.sandbox, command, view, env, self.limits)
        try:
            process = subprocess.Popen(
                argv, pass_fds=[child.fileno()], start_new_session=True, env=launcher_env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if self._log is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT, preexec_fn=jail.preexec(self.limits),  # noqa: PLW1509 - only without prlimit
            )
        finally:
            child.close()
        if self._log is not None:
            threading.Thread(target=_pump_output, args=(process.stdout, self._log, self._log_lock, process.pid),
                             daemon=True, name=f"evoloss-log-{process.pid}").start()
        return _Worker(process=process, conn=JsonConnection(parent.detach()), scratch=scratch)

    @staticmethod
    def _absolute_stages(given: list[tuple[str, dict[str, Any]]]) -> list:
        """The stages with ``path.py:Class`` specs made absolute (a jailed worker starts elsewhere)."""
        stages = []
        for spec, options in given:
            location, _, name = spec.rpartition(":")
            if location.endswith(".py") and os.path.exists(location):
                spec = f"{os.path.abspath(location)}:{name}"
            stages.append((spec, options))
        return stages

    def _started(self, worker: _Worker) -> None:
        """Read a starting worker's first message: ready, or a failure that stops the run."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            code = worker.process.wait()
            self._kill(worker)
            raise PluginError(
                f"an evaluation worker exited during start-up (exit code {code})"
                + (f"; see {self.log_path}" if self.log_path else "")
            ) from None
        if message.get("type") == "fatal":
            self._kill(worker)
            raise PluginError(f"loading fitness {self.fitness_spec!r} in a worker failed: {message['error']}")
        worker.awaiting -= 1
        worker.ready = worker.awaiting <= 0

    def _check_startup(self, now: float) -> None:
        for worker in self.workers:
            if not worker.ready and now - worker.started > self.startup_timeout:
                self._kill(worker)
                raise PluginError(f"an evaluation worker did not start within {self.startup_timeout:g} s"
                                  + (f"; see {self.log_path}" if self.log_path else ""))

    def await_ready(self, worker: _Worker) -> None:
        """Block until ``worker`` is ready (callers that drive one worker by hand: the Ray actor)."""
        if worker.ready:
            return
        if not worker.conn.poll(max(0.0, self.startup_timeout - (time.monotonic() - worker.started))):
            self._kill(worker)
            raise PluginError(f"an evaluation worker did not start within {self.startup_timeout:g} s")
        self._started(worker)

    def _kill(self, worker: _Worker) -> None:
        """Kill a worker and everything it started: its process group, and, in a jail, the
        PID namespace (bwrap dies, its init dies with it, and the kernel kills the rest)."""
        try:
            os.killpg(worker.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            worker.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        if worker.scratch is not None:
            remove_tree(worker.scratch)
            root = worker.scratch.parent / f".{worker.scratch.name}.root"  # the unshare jail's mount point
            if root.exists():
                remove_tree(root)

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill ``worker`` and start a fresh one in its place without waiting for it: the run
        loop hands it work once it reports ready."""
        self._kill(worker)
        worker.conn.close()
        fresh = self._spawn()
        self.workers[self.workers.index(worker)] = fresh
        self.restarts += 1
        return fresh

    # -- scheduling -------------------------------------------------------------------------
    @property
    def backstop_seconds(self) -> float:
        """The executor's own deadline per evaluation (see ``check_timeout``)."""
        return self.check_timeout + 2 * self.timeout + 30.0

    def run(self, tasks: Iterable[tuple] | TaskSource, seed: int, decide: Decide | None,
            on_result: OnResult) -> None:
        """Score every task; ``on_result`` is called in the driver as each one finishes (the
        workers start here if :meth:`start` was not called; :meth:`close` ends them)."""
        if not self.workers:
            self.start()
        if self._guessed is not None:
            self.confirm()  # never a genome in a view that is not the plug-ins' own
        source = as_source(tasks)
        retries: deque[Task] = deque()  # tasks whose worker died, retried before new ones
        try:
            while True:
                for worker in self.workers:
                    if worker.ready and worker.task is None:
                        task = next_task(retries, source)
                        if task is None:
                            break
                        worker.task, worker.deadline = task, time.monotonic() + self.backstop_seconds
                        if task.attempts == 0:
                            task.oom_kills_before = oom_kills()
                        try:
                            worker.conn.send({"candidate_id": task.candidate_id, "code": task.code,
                                              "seed": task.seed_or(seed), "stage": task.stage,
                                              "check_timeout": self.check_timeout, "timeout": self.timeout,
                                              "jail_only": self.jail_only, "checked": task.checked})
                        except (EOFError, OSError):
                            # The worker died while idle (killed from outside, the kernel's OOM
                            # killer): the task never reached it, so it goes first to the new one.
                            self._replace(worker)
                            retries.appendleft(task)
                            break
                busy = [w for w in self.workers if w.task]
                starting = [w for w in self.workers if not w.ready]
                more = bool(retries) or not source.exhausted()
                if not busy and not more:
                    return
                idle = any(w.ready and not w.task for w in self.workers)
                deadlines = [w.deadline for w in busy] + [w.started + self.startup_timeout for w in starting]
                wait_for = wait_seconds(deadlines, more, idle, source)
                if busy or starting:
                    ready = wait([w.conn for w in busy + starting], timeout=wait_for)
                else:
                    time.sleep(wait_for)
                    ready = []
                for worker in starting:
                    if worker.conn in ready:
                        self._started(worker)
                for worker in busy:
                    if worker.conn in ready:
                        self._receive(worker, retries, decide, on_result)
                now = time.monotonic()
                self._check_startup(now)
                for worker in list(self.workers):
                    if worker.task and now >= worker.deadline:
                        task = worker.task
                        self._replace(worker)
                        on_result(EvalResult(
                            task.candidate_id, "timeout", seconds=self.backstop_seconds,
                            error=f"evaluation exceeded the {self.backstop_seconds:g} s wall-clock limit; its worker "
                                  "was killed",
                        ))
        except BaseException:
            # Ctrl-C or a driver error: stop every worker now; finished results are already saved.
            for worker in self.workers:
                self._kill(worker)
            raise

    def _receive(self, worker: _Worker, retries: deque[Task], decide: Decide | None, on_result: OnResult) -> None:
        task = worker.task
        assert task is not None
        try:
            message = worker.conn.recv_within(MESSAGE_SECONDS)
            result = _worker_message(message, task.candidate_id)
        except (TimeoutError, ValueError, TypeError) as exc:
            # Only a worker that a genome took over sends this: it is not trusted again.
            self._replace(worker)
            on_result(EvalResult(task.candidate_id, "error", error=(
                f"its worker sent the driver {str(exc)[:200]}; the worker was replaced")))
            return
        except (EOFError, OSError):
            code = self._exit_code(worker)
            self._replace(worker)
            task.attempts += 1
            if task.attempts < 2:
                retries.appendleft(task)
                return
            on_result(self._death_result(task, code))
            return
        if result is None:  # a probe: is this behaviour known?
            duplicate_of = decide(message["candidate_id"], message["fingerprint"]) if decide else None
            worker.conn.send({"duplicate_of": duplicate_of})
        else:
            worker.task, worker.deadline = None, float("inf")
            on_result(result)

    def _exit_code(self, worker: _Worker) -> int:
        """The worker's exit code, as a negative signal number when a signal ended it (a jail's
        launcher reports a worker killed by signal N as exit code 128 + N)."""
        code = worker.process.wait()
        if self.sandbox is not None and self.sandbox.jailed and 128 < code < 128 + 65:
            return 128 - code
        return code

    @staticmethod
    def _death_result(task: Task, code: int) -> EvalResult:
        """The result of a task whose worker died twice: a SIGKILL is ``oom`` when the kernel's
        out-of-memory kill count grew meanwhile (or cannot be read), else an ``error``."""
        if code < 0:
            name = signal.Signals(-code).name
            if -code == signal.SIGKILL:
                before, after = task.oom_kills_before, oom_kills()
                if before is not None and after is not None and after <= before:
                    return EvalResult(task.candidate_id, "error", error=(
                        "the worker was killed (SIGKILL) twice while evaluating this genome, not by the "
                        "kernel's out-of-memory killer"))
                return EvalResult(task.candidate_id, "oom", error=(
                    "the worker was killed (SIGKILL) twice while evaluating this genome, most likely by the "
                    "kernel's out-of-memory killer"))
            return EvalResult(task.candidate_id, "error", error=f"the worker crashed with {name} twice on this genome")
        return EvalResult(task.candidate_id, "error", error=f"the worker exited with code {code} twice on this genome")


#: Once a worker's message has begun, all of it arrives within this (it is written at once).
MESSAGE_SECONDS = 60.0


def _worker_message(message: Any, candidate_id: int) -> EvalResult | None:
    """A worker's message about ``candidate_id``, checked: a probe (None; its fingerprint is
    then ``message["fingerprint"]``) or a result (the :class:`EvalResult`).

    Raises:
        ValueError: anything else (what a worker that a genome took over might send).
    """
    if not isinstance(message, dict):
        raise ValueError("a message that is not a JSON object")
    if message.get("type") == "probe":
        if message.get("candidate_id") != candidate_id or not is_fingerprint(message.get("fingerprint")):
            raise ValueError("a malformed probe")
        return None
    if message.get("type") == "result" and isinstance(message.get("result"), dict):
        try:
            result = EvalResult(**message["result"])
        except TypeError as exc:
            raise ValueError("a malformed result") from exc
        if result.candidate_id != candidate_id:
            raise ValueError(f"a result for another candidate ({str(result.candidate_id)[:20]})")
        _check_result_fields(result)
        return result
    raise ValueError(f"an unexpected message ({str(message.get('type'))[:40]!r})")


def _check_result_fields(result: EvalResult) -> None:
    """Raises ValueError unless each field of a worker's result has the type the engine reads."""
    def number(value: Any) -> bool:
        return finite_number(value) is not None

    bad = [name for name, fine in (
        ("fitness", result.fitness is None or number(result.fitness)),
        ("seconds", number(result.seconds)),
        ("metrics", isinstance(result.metrics, dict)),
        ("descriptors", isinstance(result.descriptors, dict)
         and all(isinstance(k, str) and number(v) for k, v in result.descriptors.items())),
        ("fingerprint", result.fingerprint is None or is_fingerprint(result.fingerprint)),
        ("error", result.error is None or isinstance(result.error, str)),
        ("duplicate_of", result.duplicate_of is None or isinstance(result.duplicate_of, int)
         and not isinstance(result.duplicate_of, bool)),
        ("judge", result.judge is None or isinstance(result.judge, dict)),
    ) if not fine]
    if bad:
        raise ValueError(f"a result with a malformed {', '.join(bad)}")


def plugin_resources(fitnesses: Iterable[Any]) -> dict[str, float]:
    """What one evaluation needs across every stage's plug-in (the largest of each)."""
    needs = {"cpus": 0.0, "gpus": 0.0}
    for fitness in fitnesses:
        try:
            asked = dict(fitness.resources())
        except Exception as exc:  # noqa: BLE001 - a broken plug-in method is the plug-in's error
            raise PluginError(f"fitness {getattr(fitness, 'name', fitness)!r}: resources() failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        for key in needs:
            value = asked.get(key, 1.0 if key == "cpus" else 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise PluginError(f"fitness {getattr(fitness, 'name', fitness)!r}: resources() gave {key}={value!r}; "
                                  "expected a number >= 0")
            needs[key] = max(needs[key], float(value))
    if needs["cpus"] == 0 and needs["gpus"] == 0:
        needs["cpus"] = 1.0
    return needs
