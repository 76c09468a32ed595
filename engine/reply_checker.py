"""Checking an LLM reply before it becomes a candidate, so that the operator can re-prompt with
the error as the DiscoPOP paper does ("Code not valid. Error: ...").

A service of the runtime: the run's assembly builds one :class:`ReplyChecker` for the fitness
plug-in and hands it to the operators as a plain callable (``check(code) -> error or None``),
so operators never learn that executors exist.

The static check (:func:`engine.genome.check_genome`) only parses the code and is safe in the
driver. The interface's unit tests (:meth:`fitness.base.Interface.check`) *run* the genome, so
with ``--executor process`` they run in one long-lived isolated worker of the same kind as the
evaluation workers (own process group, memory limit, no secrets in its environment, killed on
timeout), reached through :class:`engine.executor.ProcessExecutor` with the
:class:`ContractCheck` plug-in below, which runs the checks and skips training. A check
takes milliseconds once the worker is up (one torch import, about a second, at first use).
With ``--executor serial`` (debugging, no isolation anyway) they run in-process.
"""
from __future__ import annotations

import threading
from typing import Any

from engine.executor import ProcessExecutor
from engine.genome import GenomeError, check_genome, compile_genome
from engine.plugins import load_fitness
from fitness.base import Fitness, Score


class ContractCheck(Fitness):
    """A fitness plug-in that wraps another one's interface and scores every loss 0: running it
    through the evaluation machinery runs the contract checks (and nothing else) in a worker.

    Args:
        fitness: The wrapped plug-in's spec.
        fitness_options: Its options.
    """

    name = "contract-check"

    def __init__(self, fitness: str, fitness_options: dict[str, Any] | None = None) -> None:
        self.inner = load_fitness(fitness, fitness_options or {})
        self.interface = self.inner.interface

    def seeds(self):
        return []

    # Training returns nothing and scoring gives 0: the contract checks are the whole job.
    def artefact_spec(self, seed):
        return {}

    def train(self, fn, seed):
        return {}

    def score(self, artefacts, seed):
        return Score(0.0)


class ReplyChecker:
    """Static check, then (``mode == "tests"``) the interface's unit tests, in-process or in an
    isolated worker. Thread-safe: concurrent operator threads share one worker. Calling it
    returns the error text, or None when the code passes.

    Args:
        mode: ``tests`` or ``static``.
        isolated: Run the unit tests in a worker process (else in-process).
        fitness: Spec of the fitness plug-in (for the worker).
        fitness_options: Its options.
        timeout: Seconds allowed per check in the worker.
        memory_limit_gb: The worker's address-space limit.
        interface: The plug-in's interface (loaded from ``fitness`` when not given).
    """

    def __init__(self, mode: str = "tests", isolated: bool = True, fitness: Any = None,
                 fitness_options: dict[str, Any] | None = None, timeout: float = 60.0,
                 memory_limit_gb: float = 4.0, interface: Any = None, sandbox: str = "auto",
                 check_timeout: float = 10.0) -> None:
        self.interface = interface
        self.sandbox = sandbox
        self.check_timeout = check_timeout
        self.mode = mode
        self.isolated = isolated and isinstance(fitness, str)
        self.fitness = fitness
        self.fitness_options = dict(fitness_options or {})
        self.timeout = timeout
        self.memory_limit_gb = memory_limit_gb
        self.lock = threading.Lock()
        self.executor = None

    def warm_up(self) -> None:
        """Start the isolated worker in the background (its torch import then overlaps the
        evaluation workers' start-up instead of delaying the first reply)."""
        if self.mode == "tests" and self.isolated and self.executor is None:
            threading.Thread(target=self._start_quietly, daemon=True, name="evoloss-reply-checker").start()

    def _start_quietly(self) -> None:
        try:
            self._start()
        except Exception:  # noqa: BLE001 - check() starts it again and reports the error
            pass

    def _start(self) -> None:
        with self.lock:
            if self.executor is None:
                executor = ProcessExecutor(
                    f"{__name__}:ContractCheck", {"fitness": self.fitness, "fitness_options": self.fitness_options},
                    workers=1, timeout=self.timeout, memory_limit_gb=self.memory_limit_gb,
                    sandbox=self.sandbox, check_timeout=self.check_timeout,
                )
                try:
                    executor.start()
                except BaseException:
                    executor.close()
                    raise
                self.executor = executor

    def __call__(self, code: str) -> str | None:
        """The reason ``code`` breaks the contract, or None. Raises only when the checker itself
        fails (its worker cannot start)."""
        if self.interface is None:
            self.interface = load_fitness(self.fitness, self.fitness_options).interface
        try:
            self.check(code, self.interface)
        except GenomeError as exc:
            return str(exc)
        return None

    def check(self, code: str, interface) -> None:
        """Raise :class:`GenomeError` with a readable message if ``code`` breaks the contract."""
        check_genome(code, interface.arg_counts)
        if self.mode != "tests":
            return
        if not self.isolated:
            import torch

            fn = compile_genome(code, interface.arg_counts)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                interface.check(fn)
            return
        results = []
        self._start()
        with self.lock:
            self.executor.run([(0, code)], 0, None, results.append)
        result = results[0]
        if result.status != "ok":
            raise GenomeError(result.error or result.status, status=result.status)

    def close(self) -> None:
        with self.lock:
            if self.executor is not None:
                self.executor.close()
                self.executor = None
