"""The judge phase in the driver: :class:`Judging` wraps an executor whose results may ask for one.

A plug-in whose trusted ``score`` returns ``Score.to_judge`` (the MT-Bench answers a trained model
wrote) is finished by ``Fitness.judge`` in the driver, outside every jail: only the driver can
reach the judge's API and hold its key. The worker's result arrives with ``EvalResult.judge``
set; this wrapper judges it on a thread (calls to a remote judge take seconds to minutes, and the
run loop must not wait on them) and hands the judged result to ``on_result`` in the thread that
called :meth:`run`, as every executor does. Results that ask for no judge pass straight through.

While a judgement is pending the task source counts as not exhausted, so a steady-state run
keeps polling (and may start promotions the judged result makes possible) and a generational
run's :meth:`run` returns only once every result of its batch is judged.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.candidate import EvalResult
from engine.evaluation import Decide, judged, short_error
from engine.executor import Executor, OnResult, Task, TaskSource, as_source, stage_specs
from engine.plugins import load_fitness


class _Source(TaskSource):
    """The caller's task source, seen by the wrapped executor: hands judged results to the
    caller whenever the executor asks for work, and is not exhausted while any is pending."""

    def __init__(self, inner: TaskSource, judging: Judging, on_result: OnResult) -> None:
        self.inner = inner
        self.judging = judging
        self.on_result = on_result
        self.poll_interval = min(getattr(inner, "poll_interval", 0.05), 0.05)

    def take(self) -> Task | None:
        self.judging.deliver(self.on_result)
        return self.inner.take()

    def exhausted(self) -> bool:
        self.judging.deliver(self.on_result)
        return self.inner.exhausted() and not self.judging.pending


class Judging(Executor):
    """``executor`` with the judge phase of its results done here (see the module docstring).

    Args:
        executor: Any executor (process, Ray, serial).
        fitness_spec, fitness_options: The stages it serves, as given to it; a stage's plug-in is
            built here the first time one of its results asks for a judge.
        threads: Judgements that may run at once.
    """

    def __init__(self, executor: Executor, fitness_spec: Any, fitness_options: dict[str, Any] | None = None,
                 threads: int = 4) -> None:
        self.executor = executor
        self.stages = stage_specs(fitness_spec, fitness_options)
        self.threads = max(1, int(threads))
        self._plugins: dict[int, Any] = {}
        self._plugins_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._done: queue.SimpleQueue[EvalResult] = queue.SimpleQueue()
        self.pending = 0

    def __getattr__(self, name: str) -> Any:
        # What callers read of the executor (its sandbox, workers, restarts) is the wrapped one's.
        if name == "executor":
            raise AttributeError(name)
        return getattr(self.executor, name)

    # -- lifecycle ----------------------------------------------------------------------------------
    def launch(self, speculative: bool = False) -> None:
        self.executor.launch(speculative)

    def confirm(self, fitness_spec: Any = None, plugins: Iterable[Any] = ()) -> bool:
        if fitness_spec is not None:  # the stages known once the driver has loaded the plug-ins
            self.stages = stage_specs(fitness_spec)
        return self.executor.confirm(fitness_spec, plugins)

    def start(self) -> None:
        self.executor.start()

    def close(self) -> None:
        try:
            self.executor.close()
        finally:
            if self._pool is not None:
                # A judgement still running is abandoned (its evaluation was never stored, so a resumed
                # run scores it again); the threads are not waited for.
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    # -- running --------------------------------------------------------------------------------------
    def run(self, tasks: Iterable[tuple] | TaskSource, seed: int, decide: Decide | None,
            on_result: OnResult) -> None:
        source = _Source(as_source(tasks), self, on_result)

        def arrived(result: EvalResult) -> None:
            if result.judge is None or not result.ok:
                on_result(result)
            else:
                self._submit(result)
            self.deliver(on_result)

        while True:
            self.executor.run(source, seed, decide, arrived)
            self.deliver(on_result, wait=True)
            if self.pending == 0 and source.exhausted():
                return

    def deliver(self, on_result: OnResult, wait: bool = False) -> None:
        """Hand every judged result to ``on_result``; with ``wait``, first wait for all pending."""
        while True:
            try:
                result = self._done.get(block=wait and self.pending > 0)
            except queue.Empty:
                return
            self.pending -= 1
            on_result(result)
            if not wait and self._done.empty():
                return

    def _submit(self, result: EvalResult) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="evoloss-judge")
        self.pending += 1
        self._pool.submit(self._judge, result)

    def _judge(self, result: EvalResult) -> None:
        try:
            fitness = self._plugin(int(result.judge.get("stage", 0)))
            outcome = judged(fitness, result)
        except BaseException as exc:  # noqa: BLE001 - a plug-in that cannot be built here
            outcome = EvalResult(result.candidate_id, "error", fingerprint=result.fingerprint,
                                 descriptors=result.descriptors, seconds=result.seconds,
                                 error=f"the judge phase failed: {short_error(exc)[1]}")
        self._done.put(outcome)

    def _plugin(self, stage: int) -> Any:
        with self._plugins_lock:
            if stage not in self._plugins:
                spec, options = self.stages[stage]
                self._plugins[stage] = load_fitness(spec, options)
            return self._plugins[stage]
