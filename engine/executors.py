"""Choosing an executor: ``make_executor`` builds the one a run's settings name, serving every
fidelity stage. It lives beside the executors it chooses between (:mod:`engine.executor`,
:mod:`engine.ray_executor`), so neither of those imports the other's subclass."""
from __future__ import annotations

import os
from typing import Any

from engine.executor import ProcessExecutor, SerialExecutor
from engine.judging import Judging


def make_executor(config, fitness_spec: Any = None, log_path: str | os.PathLike | None = None,
                  resources: dict[str, float] | None = None, sandbox=None):
    """The executor named by ``config.executor``, serving every fidelity stage of the run, with
    the judge phase of plug-ins that have one done in this process (:class:`engine.judging.Judging`).

    ``resources`` is what the plug-ins ask for per evaluation (:func:`plugin_resources`);
    ``--cpus-per-eval`` / ``--gpus-per-eval`` override it. ``sandbox`` is the
    :class:`engine.jail.Sandbox` already chosen (default: chosen from ``config.sandbox``)."""
    sandbox = sandbox if sandbox is not None else config.sandbox
    if fitness_spec is None:
        fitness_spec = [(stage.spec, stage.options) for stage in config.stages()]
    options = None if isinstance(fitness_spec, (list, tuple)) else config.fitness_options
    return Judging(_executor(config, fitness_spec, options, log_path, resources, sandbox), fitness_spec, options,
                   threads=max(2, int(config.workers)))


def _executor(config, fitness_spec: Any, options: dict[str, Any] | None, log_path, resources, sandbox):
    if config.executor == "serial":
        return SerialExecutor(fitness_spec, options)
    if config.executor == "ray":
        from engine.ray_executor import RayExecutor  # imports ray lazily; only Ray runs pay for it

        resources = resources or {"cpus": 1.0, "gpus": 0.0}
        cpus = config.cpus_per_eval if config.cpus_per_eval is not None else resources["cpus"]
        gpus = config.gpus_per_eval if config.gpus_per_eval is not None else resources["gpus"]
        return RayExecutor(
            fitness_spec, options, workers=config.workers, timeout=config.timeout,
            memory_limit_gb=config.memory_limit_gb, log_path=log_path, address=config.ray_address,
            cpus_per_eval=cpus, gpus_per_eval=gpus,
            sandbox=getattr(sandbox, "kind", sandbox), allow_host_network=config.allow_host_network,
        )
    return ProcessExecutor(
        fitness_spec, options, workers=config.workers, timeout=config.timeout,
        memory_limit_gb=config.memory_limit_gb, log_path=log_path, sandbox=sandbox,
        allow_host_network=config.allow_host_network, check_timeout=getattr(config, "check_timeout", 10.0),
    )
