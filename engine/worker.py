"""An evaluation worker process: ``python -m engine.worker`` (started by the process executor).

It limits its own address space, uses one torch thread, loads the fitness plug-in once and
then scores genomes sent over a socket until told to stop. Its environment was already
scrubbed of secrets by the executor; its stdout goes to the run's worker log.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from multiprocessing.connection import Connection

from engine.processes import end_process_group, watch_parent  # noqa: F401 - re-exported for old imports


def _warm_up(torch) -> None:
    """The first optimiser step in a process imports a good part of torch (about 1.5 s); pay
    for it at start-up so it is not charged to the first genome's evaluation time."""
    parameter = torch.zeros(2, requires_grad=True)
    optimiser = torch.optim.Adam([parameter], lr=0.1)
    (parameter**2).sum().backward()
    optimiser.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--stages", required=True, help="JSON list of [fitness spec, options] (fidelity stages)")
    parser.add_argument("--memory-limit", type=int, default=0, help="bytes of address space (0: none)")
    parser.add_argument("--sys-path", default="[]")
    args = parser.parse_args(argv)

    for entry in reversed(json.loads(args.sys_path)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if args.memory_limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    # A worker never needs core dumps, and a crashing genome should not write one.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    watch_parent()
    conn = Connection(args.fd)
    try:
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        from engine.evaluation import run_candidate
        from engine.plugins import load_fitness

        stages = [load_fitness(spec, options) for spec, options in json.loads(args.stages)]
        _warm_up(torch)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, which stops cleanly
        from engine.plugins import PluginError

        message = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
        conn.send({"type": "fatal", "error": message})
        return 1
    conn.send({"type": "ready", "pid": os.getpid()})

    def decide(candidate_id: int, fingerprint: str):
        conn.send({"type": "probe", "candidate_id": candidate_id, "fingerprint": fingerprint})
        return conn.recv()["duplicate_of"]

    while True:
        try:
            task = conn.recv()
        except EOFError:
            return 0
        if task is None:
            return 0
        result = run_candidate(stages[task.get("stage", 0)], task["candidate_id"], task["code"], task["seed"], decide=decide)
        conn.send({"type": "result", "result": result.to_dict()})
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
