"""The Ray executor (``--executor ray``): evaluations on a local Ray instance or a cluster.

Each evaluation slot is a Ray actor holding the requested resources (``--cpus-per-eval``,
``--gpus-per-eval``) and one isolated ``engine.worker`` subprocess, started and supervised
exactly as the process executor does it (own process group, address-space limit, scrubbed
environment, wall-clock timeout that kills the whole group). The actor keeps its worker warm
between evaluations, so torch and the plug-in are imported once per slot, not per genome.

Behavioural dedup stays in the driver: an evaluation is two actor calls on the same worker.
``submit`` compiles, checks and fingerprints the genome and returns the fingerprint; the driver
asks ``decide`` (the engine's single table of known behaviours, updated in the order results
arrive) and ``reply`` then trains and scores it or skips it as a duplicate. This costs one
extra round trip (about a millisecond) per evaluation and keeps the one source of truth; the
alternative, shipping the set of known fingerprints with each task, would let two
behaviourally equal genomes in flight at once both be trained.

Fault tolerance: a worker subprocess that dies is replaced by its actor; an actor (Ray worker
process or node) that dies is replaced by the driver. Either way the evaluation is retried
once, then recorded as failed, and the run goes on. Results are collected as they finish
(``ray.wait``).
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterable

from engine.candidate import EvalResult
from engine.evaluation import Decide
from engine.executor import (MESSAGE_SECONDS, Executor, OnResult, ProcessExecutor, Task, TaskSource, _worker_message,
                             as_source, next_task, stage_specs, wait_seconds)
from engine.plugins import PluginError

INSTALL_HINT = "pip install 'evoloss[ray]' (or pip install 'ray>=2.9')"


class RayNotInstalled(PluginError):
    """``--executor ray`` without Ray installed."""


def import_ray():
    """Ray, or an error that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayNotInstalled(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


def local_ray_options(temp_dir: str) -> dict[str, Any]:
    """``ray.init`` options for a private local instance whose state stays in ``temp_dir``.

    Ray's sessions, sockets and logs go to ``temp_dir`` (a short path: the run folder's may be
    too long for a Unix socket), which the caller removes. Ray (2.5x) also enables token
    authentication for a new local instance and saves the token in ~/.ray unless one is given:
    give it one in the environment (Ray's processes inherit it; a genome never does, its
    environment drops anything named *TOKEN*).
    """
    if not any(name in os.environ for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        # Ray then turns token authentication on and says so on every start; it is expected here.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    return {"_temp_dir": temp_dir, "include_dashboard": False, "log_to_driver": False,
            "logging_level": logging.WARNING}


class _EvaluationActor:
    """One evaluation slot (a Ray actor): a process-executor worker driven call by call."""

    def __init__(self, stages: list, timeout: float, memory_limit_gb: float,
                 log_path: str | None, sys_path: list[str], startup_timeout: float, sandbox: str = "auto",
                 allow_host_network: bool = False, gpus: bool = False) -> None:
        # Plug-ins given as module:Class resolve as they do on the driver.
        for entry in reversed(sys_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        if log_path and not os.path.isdir(os.path.dirname(log_path)):
            log_path = None  # a node that does not share the run folder
        # The sandbox is chosen on this node: the driver's choice must be available here too.
        self.pool = ProcessExecutor(stages, workers=1, timeout=timeout,
                                    memory_limit_gb=memory_limit_gb, log_path=log_path,
                                    startup_timeout=startup_timeout, sandbox=sandbox,
                                    allow_host_network=allow_host_network, gpus=gpus)
        self.pool.start()
        self.deadline = float("inf")

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "worker_pid": self.pool.workers[0].process.pid}

    def submit(self, candidate_id: int, code: str, seed: int, stage: int = 0) -> dict[str, Any]:
        """Start one evaluation; returns its probe (fingerprint) or its end."""
        # A replacement started in the background after the last evaluation; it is ready by now
        # or soon (its start-up does not count against this evaluation's timeout).
        self.pool.await_ready(self.pool.workers[0])
        # The worker ends a genome's process at its check and training deadlines; this one only
        # catches a worker stuck in trusted plug-in code.
        self.deadline = time.monotonic() + self.pool.backstop_seconds
        self.candidate_id = candidate_id
        try:
            self.pool.workers[0].conn.send({"candidate_id": candidate_id, "code": code, "seed": seed, "stage": stage,
                                            "check_timeout": self.pool.check_timeout, "timeout": self.pool.timeout})
        except OSError:
            return self._died()
        return self._next()

    def reply(self, duplicate_of: int | None) -> dict[str, Any]:
        """The driver's dedup answer to the last probe; returns the evaluation's end."""
        try:
            self.pool.workers[0].conn.send({"duplicate_of": duplicate_of})
        except OSError:
            return self._died()
        return self._next()

    def _next(self) -> dict[str, Any]:
        worker = self.pool.workers[0]
        if not worker.conn.poll(max(0.0, self.deadline - time.monotonic())):
            self.pool._replace(worker)  # kills the worker's whole process group
            return {"type": "timeout"}
        try:
            message = worker.conn.recv_within(MESSAGE_SECONDS)
            _worker_message(message, self.candidate_id)  # what a worker sends, about its candidate
            return message
        except (TimeoutError, ValueError, TypeError) as exc:  # a worker that a genome took over
            self.pool._replace(worker)
            return {"type": "malformed",
                    "error": f"its worker sent the driver {str(exc)[:200]}; the worker was replaced"}
        except (EOFError, OSError):
            return self._died()

    def _died(self) -> dict[str, Any]:
        worker = self.pool.workers[0]
        code = self.pool._exit_code(worker)
        self.pool._replace(worker)
        return {"type": "died", "code": code}

    def close(self) -> None:
        self.pool.close()


@dataclass
class _Slot:
    actor: Any
    task: Task | None = None
    # The driver's backstop for an actor that stops answering (a hung or lost node): the actor
    # enforces the evaluation timeout itself, this only catches the actor failing to.
    deadline: float = float("inf")


class RayExecutor(Executor):
    """Evaluations as Ray actors (see the module docstring).

    Args:
        fitness_spec: How workers find the fitness plug-in (a name or ``path.py:Class``).
        fitness_options: Keyword options for the plug-in.
        workers: Concurrent evaluations on a local Ray instance (it gets ``workers *
            cpus_per_eval`` CPUs). On a cluster (``address``) every slot the cluster's
            resources fit is used.
        timeout: Wall-clock seconds per evaluation.
        memory_limit_gb: Address-space limit per evaluation worker.
        log_path: File that receives the workers' stdout and stderr (when the node can see it).
        address: None starts a local Ray instance; ``auto`` or ``ray://host:port`` joins a cluster.
        cpus_per_eval: Ray CPUs each evaluation holds.
        gpus_per_eval: Ray GPUs each evaluation holds (fractions share a GPU).
        startup_timeout: Seconds an evaluation slot may take to import torch and load the plug-in.
        sandbox: The OS jail of each slot's worker (:mod:`engine.jail`), chosen on its node.
        allow_host_network: Let a plug-in that declares it needs the host's network have it.
    """

    def __init__(self, fitness_spec: Any, fitness_options: dict[str, Any] | None = None, workers: int = 2,
                 timeout: float = 120.0, memory_limit_gb: float = 4.0, log_path: str | os.PathLike | None = None,
                 address: str | None = None, cpus_per_eval: float = 1.0, gpus_per_eval: float = 0.0,
                 startup_timeout: float = 120.0, sandbox: str = "auto", allow_host_network: bool = False) -> None:
        self.ray = import_ray()
        self.stages = stage_specs(fitness_spec, fitness_options)
        if not all(isinstance(spec, str) for spec, _ in self.stages):
            raise PluginError("the ray executor needs the fitness plug-in as a string spec (name or path.py:Class)")
        self.fitness_spec = " > ".join(spec for spec, _ in self.stages)
        self.n_workers = workers
        self.timeout = timeout
        self.memory_limit_gb = memory_limit_gb
        self.log_path = os.path.abspath(log_path) if log_path else None
        self.address = address
        self.cpus_per_eval = cpus_per_eval
        self.gpus_per_eval = gpus_per_eval
        self.startup_timeout = startup_timeout
        self.sandbox = sandbox
        self.allow_host_network = allow_host_network
        self.slots: list[_Slot] = []
        self.restarts = 0
        self._owns_ray = False
        self._temp_dir: str | None = None
        self._actor_class = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            self._init_ray()
        self._actor_class = ray.remote(_EvaluationActor).options(
            num_cpus=self.cpus_per_eval, num_gpus=self.gpus_per_eval, max_restarts=0, max_task_retries=0,
        )
        try:
            self.slots = [_Slot(self._new_actor()) for _ in range(self._capacity())]
            pings = [slot.actor.ping.remote() for slot in self.slots]
            ready, _ = ray.wait(pings, num_returns=len(pings), timeout=self.startup_timeout)
            if len(ready) < len(pings):
                raise PluginError(
                    f"{len(pings) - len(ready)} of {len(pings)} Ray evaluation slots did not start within "
                    f"{self.startup_timeout:g} s (cluster resources: {ray.cluster_resources()}; each slot asks "
                    f"for {self.cpus_per_eval:g} CPU and {self.gpus_per_eval:g} GPU)")
            try:
                ray.get(pings)
            except ray.exceptions.RayActorError as exc:
                raise PluginError(f"loading fitness {self.fitness_spec!r} in a Ray worker failed: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _init_ray(self) -> None:
        ray = self.ray
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.WARNING}
        if self.address:
            options["address"] = self.address
        else:
            self._temp_dir = tempfile.mkdtemp(prefix="evoloss-ray-")
            options.update(local_ray_options(self._temp_dir))
            options["num_cpus"] = max(1, int(round(self.n_workers * self.cpus_per_eval)))
        try:
            ray.init(**options)
        except Exception as exc:
            self._remove_temp_dir()
            where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray instance"
            raise PluginError(f"--executor ray: could not start or join {where}: {type(exc).__name__}: {exc}") from exc
        self._owns_ray = True

    def _capacity(self) -> int:
        """Evaluation slots: what the cluster's resources fit (capped by ``workers`` locally)."""
        resources = self.ray.cluster_resources()
        fits = []
        if self.cpus_per_eval > 0:
            fits.append(int(resources.get("CPU", 0) // self.cpus_per_eval))
        if self.gpus_per_eval > 0:
            fits.append(int(resources.get("GPU", 0) // self.gpus_per_eval))
        capacity = min(fits) if fits else self.n_workers
        if not self.address:
            capacity = min(capacity, self.n_workers)
        if capacity < 1:
            raise PluginError(
                f"--executor ray: no evaluation fits the cluster (resources {resources}; each evaluation asks for "
                f"{self.cpus_per_eval:g} CPU (--cpus-per-eval) and {self.gpus_per_eval:g} GPU (--gpus-per-eval))")
        return capacity

    def _new_actor(self):
        return self._actor_class.remote(
            self.stages, self.timeout, self.memory_limit_gb, self.log_path,
            [os.path.abspath(p or ".") for p in sys.path], self.startup_timeout, self.sandbox,
            self.allow_host_network, self.gpus_per_eval > 0,
        )

    def close(self) -> None:
        ray = self.ray
        if self.slots and ray.is_initialized():
            # Let each actor stop its worker cleanly, then end the actors.
            closing = [slot.actor.close.remote() for slot in self.slots]
            try:
                ray.wait(closing, num_returns=len(closing), timeout=5.0)
            except Exception:  # noqa: BLE001 - a dead actor cannot close; it is killed below
                pass
            for slot in self.slots:
                self._kill(slot)
        self.slots = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        self._remove_temp_dir()

    def _remove_temp_dir(self) -> None:
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def _kill(self, slot: _Slot) -> None:
        # A worker subprocess whose actor is killed notices it lost its parent and ends its own
        # process group (engine.worker's watchdog).
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass

    def _replace(self, slot: _Slot) -> None:
        self._kill(slot)
        # No wait for the fresh actor: Ray queues its first call until it has started.
        slot.actor = self._new_actor()
        self.restarts += 1

    # -- scheduling -------------------------------------------------------------------------
    def run(self, tasks: Iterable[tuple] | TaskSource, seed: int, decide: Decide | None,
            on_result: OnResult) -> None:
        """Score every task; ``on_result`` is called in the driver as each one finishes."""
        ray = self.ray
        source = as_source(tasks)
        queue: deque[Task] = deque()  # retries, before new tasks
        inflight: dict[Any, _Slot] = {}
        # Past the slot's own deadline (its worker's check and training deadlines plus a margin:
        # ProcessExecutor.backstop_seconds at the default check timeout).
        backstop = 10.0 + 2 * self.timeout + 30.0 + self.startup_timeout + 60.0
        try:
            while True:
                for slot in self.slots:
                    if slot.task is None:
                        task = next_task(queue, source)
                        if task is None:
                            break
                        slot.task = task
                        slot.deadline = time.monotonic() + backstop
                        ref = slot.actor.submit.remote(task.candidate_id, task.code, task.seed_or(seed), task.stage)
                        inflight[ref] = slot
                more = bool(queue) or not source.exhausted()
                if not inflight and not more:
                    return
                wait_for = wait_seconds([s.deadline for s in inflight.values()], more,
                                        any(slot.task is None for slot in self.slots), source)
                if not inflight:
                    time.sleep(wait_for)
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait_for)
                for ref in ready:
                    slot = inflight.pop(ref)
                    try:
                        message = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        # The actor, its process or its node died, or the actor failed (its worker
                        # would not restart): a fresh actor takes over.
                        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                        self._lost(slot, queue, on_result, f"{type(exc).__name__}: {first_line}")
                        continue
                    self._handle(slot, message, inflight, decide, on_result, queue)
                now = time.monotonic()
                for ref, slot in list(inflight.items()):
                    if now >= slot.deadline:
                        del inflight[ref]
                        self._lost(slot, queue, on_result, f"no answer within {backstop:g} s")
        except BaseException:
            # Ctrl-C or a driver error: stop every evaluation now; finished results are already saved.
            for slot in self.slots:
                if slot.task is not None:
                    self._kill(slot)
                    slot.task = None
            raise

    def _handle(self, slot: _Slot, message: dict[str, Any], inflight: dict[Any, _Slot], decide: Decide | None,
                on_result: OnResult, queue: deque[Task]) -> None:
        task = slot.task
        assert task is not None
        kind = message["type"]
        if kind == "probe":
            duplicate_of = decide(message["candidate_id"], message["fingerprint"]) if decide else None
            inflight[slot.actor.reply.remote(duplicate_of)] = slot
            return
        slot.task, slot.deadline = None, float("inf")
        if kind == "result":
            on_result(EvalResult(**message["result"]))
        elif kind == "timeout":
            on_result(EvalResult(
                task.candidate_id, "timeout", seconds=self.timeout,
                error=f"evaluation exceeded the {self.timeout:g} s wall-clock limit; its worker was killed"))
        elif kind == "malformed":
            self.restarts += 1
            on_result(EvalResult(task.candidate_id, "error", error=str(message.get("error"))[:300]))
        elif kind == "died":
            self.restarts += 1
            task.attempts += 1
            if task.attempts < 2:
                queue.appendleft(task)
            else:
                on_result(ProcessExecutor._death_result(task, message["code"]))
        else:  # pragma: no cover - the worker protocol has no other message
            on_result(EvalResult(task.candidate_id, "error", error=f"unexpected worker message {kind!r}"))

    def _lost(self, slot: _Slot, queue: deque[Task], on_result: OnResult, why: str) -> None:
        """The slot's actor died or stopped answering: replace it; retry the task once."""
        task = slot.task
        slot.task, slot.deadline = None, float("inf")
        self._replace(slot)
        if task is None:
            return
        task.attempts += 1
        if task.attempts < 2:
            queue.appendleft(task)
        else:
            on_result(EvalResult(task.candidate_id, "error", error=(
                f"the Ray worker evaluating this genome was lost twice ({why}); the evaluation was not retried again")))
