"""Executors run evaluations: ``process`` (isolated worker processes, the default), ``ray``
(the same workers inside Ray actors: :mod:`engine.ray_executor`) and ``serial`` (in-process,
for debugging).

Each process worker runs in its own session (process group) with an address-space limit and
an environment holding no secrets. A task that overruns its wall-clock timeout has its
worker's whole process group killed; a worker that dies mid-task (segfault, kernel OOM
killer) is replaced and the task retried once, then recorded as failed. Either way the run
goes on.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterable

from engine.candidate import EvalResult
from engine.evaluation import Decide, run_candidate
from engine.plugins import PluginError, load_fitness

#: Environment variables a worker keeps; everything else (API keys, tokens) is dropped.
_KEEP_ENV = {
    "PATH", "HOME", "LANG", "LANGUAGE", "TERM", "TMPDIR", "TZ", "PYTHONPATH", "PYTHONHASHSEED",
    "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "EVOLOSS_DATA", "SYSTEMROOT",
}
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION", re.I)

OnResult = Callable[[EvalResult], None]


def scrubbed_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a worker gets: an allow-list, never anything that looks secret."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if (k in _KEEP_ENV or k.startswith("LC_")) and not _SECRET.search(k)}
    # One torch thread per worker: two workers on two cores beat one worker with two threads.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


@dataclass
class Task:
    """One evaluation: a candidate's code scored on fidelity stage ``stage`` (0 unless the run
    climbs a fidelity ladder)."""

    candidate_id: int
    code: str
    stage: int = 0
    attempts: int = 0


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
    """A fixed list of tasks: ``(candidate_id, code)`` or ``(candidate_id, code, stage)``."""

    poll_interval = float("inf")

    def __init__(self, tasks: Iterable[tuple]) -> None:
        self.queue: deque[Task] = deque(Task(*task[:3]) for task in tasks)

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
            on_result(run_candidate(self.stages[task.stage], task.candidate_id, task.code, seed, decide=decide))


def stage_specs(fitness_spec: Any, fitness_options: dict[str, Any] | None = None) -> list[tuple[Any, dict[str, Any]]]:
    """The fidelity stages an executor serves: one ``(spec, options)`` pair, or a list of them."""
    if isinstance(fitness_spec, (list, tuple)):
        return [(spec, dict(options or {})) for spec, options in fitness_spec]
    return [(fitness_spec, dict(fitness_options or {}))]


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    task: Task | None = None
    deadline: float = float("inf")
    ready: bool = False
    started: float = field(default_factory=time.monotonic)


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
    """

    def __init__(self, fitness_spec: Any, fitness_options: dict[str, Any] | None = None, workers: int = 2,
                 timeout: float = 120.0, memory_limit_gb: float = 4.0, log_path: str | os.PathLike | None = None,
                 startup_timeout: float = 120.0) -> None:
        self.stages = stage_specs(fitness_spec, fitness_options)
        if not all(isinstance(spec, str) for spec, _ in self.stages):
            raise PluginError("the process executor needs the fitness plug-in as a string spec (name or path.py:Class)")
        self.fitness_spec = " > ".join(spec for spec, _ in self.stages)
        self.n_workers = workers
        self.timeout = timeout
        self.memory_limit = int(memory_limit_gb * 1024**3)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.workers: list[_Worker] = []
        self.restarts = 0
        self._log = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self.log_path:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        for _ in range(self.n_workers):
            self.workers.append(self._spawn())
        for worker in list(self.workers):
            self._await_ready(worker)

    def close(self) -> None:
        for worker in self.workers:
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
        if self._log:
            self._log.close()
            self._log = None

    def _spawn(self) -> _Worker:
        parent, child = socket.socketpair()
        command = [
            sys.executable, "-m", "engine.worker", "--fd", str(child.fileno()),
            "--stages", json.dumps(self.stages),
            "--memory-limit", str(self.memory_limit),
            "--sys-path", json.dumps([os.path.abspath(p or ".") for p in sys.path]),
        ]
        output = self._log if self._log else subprocess.DEVNULL
        process = subprocess.Popen(
            command, pass_fds=[child.fileno()], start_new_session=True, env=scrubbed_environment(),
            stdin=subprocess.DEVNULL, stdout=output, stderr=output,
        )
        child.close()
        return _Worker(process=process, conn=Connection(parent.detach()))

    def _await_ready(self, worker: _Worker) -> None:
        if not worker.conn.poll(self.startup_timeout):
            self._kill(worker)
            raise PluginError(f"an evaluation worker did not start within {self.startup_timeout:g} s")
        try:
            message = worker.conn.recv()
        except EOFError:
            code = worker.process.wait()
            raise PluginError(
                f"an evaluation worker exited during start-up (exit code {code})"
                + (f"; see {self.log_path}" if self.log_path else "")
            ) from None
        if message.get("type") == "fatal":
            self._kill(worker)
            raise PluginError(f"loading fitness {self.fitness_spec!r} in a worker failed: {message['error']}")
        worker.ready = True

    def _kill(self, worker: _Worker) -> None:
        try:
            os.killpg(worker.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            worker.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass

    def _replace(self, worker: _Worker) -> _Worker:
        self._kill(worker)
        worker.conn.close()
        fresh = self._spawn()
        self._await_ready(fresh)
        self.workers[self.workers.index(worker)] = fresh
        self.restarts += 1
        return fresh

    # -- scheduling -------------------------------------------------------------------------
    def run(self, tasks: Iterable[tuple] | TaskSource, seed: int, decide: Decide | None,
            on_result: OnResult) -> None:
        """Score every task; ``on_result`` is called in the driver as each one finishes."""
        source = as_source(tasks)
        retries: deque[Task] = deque()  # tasks whose worker died, retried before new ones
        try:
            while True:
                for worker in self.workers:
                    if worker.task is None:
                        task = next_task(retries, source)
                        if task is None:
                            break
                        worker.task, worker.deadline = task, time.monotonic() + self.timeout
                        worker.conn.send({"candidate_id": task.candidate_id, "code": task.code, "seed": seed,
                                          "stage": task.stage})
                busy = [w for w in self.workers if w.task]
                more = bool(retries) or not source.exhausted()
                if not busy and not more:
                    return
                wait_for = wait_seconds([w.deadline for w in busy], more, len(busy) < len(self.workers), source)
                if busy:
                    ready = wait([w.conn for w in busy], timeout=wait_for)
                else:
                    time.sleep(wait_for)
                    ready = []
                for worker in busy:
                    if worker.conn in ready:
                        self._receive(worker, retries, decide, on_result)
                now = time.monotonic()
                for worker in list(self.workers):
                    if worker.task and now >= worker.deadline:
                        task = worker.task
                        self._replace(worker)
                        on_result(EvalResult(
                            task.candidate_id, "timeout", seconds=self.timeout,
                            error=f"evaluation exceeded the {self.timeout:g} s wall-clock limit; its worker was killed",
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
            message = worker.conn.recv()
        except (EOFError, OSError):
            code = worker.process.wait()
            self._replace(worker)
            task.attempts += 1
            if task.attempts < 2:
                retries.appendleft(task)
                return
            on_result(self._death_result(task, code))
            return
        if message["type"] == "probe":
            duplicate_of = decide(message["candidate_id"], message["fingerprint"]) if decide else None
            worker.conn.send({"duplicate_of": duplicate_of})
        elif message["type"] == "result":
            worker.task, worker.deadline = None, float("inf")
            on_result(EvalResult(**message["result"]))

    @staticmethod
    def _death_result(task: Task, code: int) -> EvalResult:
        if code < 0:
            name = signal.Signals(-code).name
            if -code == signal.SIGKILL:
                return EvalResult(task.candidate_id, "oom", error=(
                    "the worker was killed (SIGKILL) twice while evaluating this genome, most likely by the "
                    "kernel's out-of-memory killer"))
            return EvalResult(task.candidate_id, "error", error=f"the worker crashed with {name} twice on this genome")
        return EvalResult(task.candidate_id, "error", error=f"the worker exited with code {code} twice on this genome")


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
