"""Assembling a run from its settings: the fitness stages, the operators with the services they
are handed (the reply checker, the reader of recorded runs), and the executor.

This is where the layers meet: operators and plug-ins know nothing of executors or run stores;
the pieces are built here, from small settings cut from :class:`engine.config.RunConfig`, and
handed down.
"""
from __future__ import annotations

from pathlib import Path
from collections.abc import Callable

from archives.store import RunStore, StoreError
from engine.config import RunConfig
from engine.plugins import load_fitness, load_operators, prefix_class
from engine.reply_checker import ReplyChecker
from operators.base import RecordedRun, Services


def open_recorded_run(run: str) -> RecordedRun:
    """An earlier run's ``--operator`` specs and its recorded LLM calls (for ``replay:RUN``)."""
    try:
        store = RunStore.open(Path(run), readonly=True)
    except StoreError as exc:
        raise StoreError(f"replay:{run}: {exc}") from exc
    try:
        specs = tuple(s.strip() for s in str(store.meta("config", {}).get("operator", "")).split(",") if s.strip())
    finally:
        store.close()

    def calls(operator: str) -> list[dict]:
        recorded = RunStore.open(Path(run), readonly=True)
        try:
            return recorded.llm_calls(operator=operator)
        finally:
            recorded.close()

    return RecordedRun(specs, calls)


def reply_checker(config: RunConfig, interface=None) -> ReplyChecker:
    """The run's reply checker: the static check, then the interface's unit tests in one isolated
    worker (in-process with ``--executor serial``)."""
    stage = config.stages()[0]
    return ReplyChecker(config.llm_check, isolated=config.executor != "serial", fitness=stage.spec,
                        fitness_options=stage.options, timeout=min(config.timeout, 60.0),
                        memory_limit_gb=config.memory_limit_gb, interface=interface, sandbox=config.sandbox,
                        check_timeout=config.check_timeout)


def build_operators(config: RunConfig, interface=None) -> tuple[list, Callable[[], None]]:
    """The run's operators and a function that closes them (and the reply checker's worker).

    The reply checker is built only when an operator family that uses it is named, and its
    worker starts in the background at once, beside the evaluation workers.
    """
    specs = [spec.strip() for spec in str(config.operator).split(",") if spec.strip()]
    checker = reply_checker(config, interface) if any(prefix_class(spec) for spec in specs) else None
    services = Services(check=checker, recorded_run=open_recorded_run, settings=config)
    operators = load_operators(specs, services)
    if checker is not None:
        checker.warm_up()

    def close() -> None:
        for operator in operators:
            closer = getattr(operator, "close", None)
            if callable(closer):
                closer()
        if checker is not None:
            checker.close()

    return operators, close


def build_stages(config: RunConfig) -> list:
    """The run's fitness plug-ins, one per fidelity stage."""
    return [load_fitness(stage.spec, stage.options) for stage in config.stages()]
