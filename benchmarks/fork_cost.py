"""Cost of a fresh process per genome and of the split fitness contract.

1. Fork cost: in a process holding what a warm worker holds (torch, the synthetic-pref plug-in,
   its problem cached), the time of one evaluation child that does everything a child does
   except running a genome (fork, new session, closing inherited descriptors, rlimits, sending
   an empty artefact message back, exit, reap and sweep): what the fork adds per evaluation.
2. Per-evaluation wall time of synthetic-pref through the process executor (one worker, the
   DPO seed, ``--evals`` evaluations), optionally against another checkout of the project
   (``--compare-with DIR``, e.g. a ``git archive`` of an older commit), alternating the two
   ``--repeats`` times so both see the same machine load; prints each ratio and the median.

3. With ``--fork-versus-in-process``: in this checkout, the CPU time per evaluation through the
   warm worker's path (fresh process, artefacts, trusted scoring, sweep) over that of both phases
   in one process (what a worker did before): the cost of the fresh process and the split alone,
   apart from other changes between checkouts (such as the genome's input relay).

Usage: python benchmarks/fork_cost.py [--forks 200] [--evals 8] [--repeats 3] [--compare-with DIR]
       python benchmarks/fork_cost.py --skip-fork --fork-versus-in-process [--evals 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Run in a fresh interpreter whose import path starts at the checkout being measured.
_PER_EVALUATION = r"""
import inspect, json, sys, time
import psutil, torch
torch.set_num_threads(1)
from engine.executor import ProcessExecutor
from fitness.preference import preference_seeds
code = next(s.code for s in preference_seeds() if s.name == "dpo")
n = int(sys.argv[1])
# Both checkouts without an OS jail, so that the worker is this process's child and its CPU
# time (with that of the processes it reaped) is read from its /proc entry.
extra = {"sandbox": "none"} if "sandbox" in inspect.signature(ProcessExecutor).parameters else {}
with ProcessExecutor("synthetic-pref", workers=1, timeout=600, **extra) as executor:
    results = []
    executor.run([(0, code)], 0, None, results.append)  # warm-up: first imports, problem cache
    worker = psutil.Process(executor.workers[0].process.pid)
    before = sum(worker.cpu_times()[:4])
    results = []
    start = time.perf_counter()
    executor.run([(i + 1, code) for i in range(n)], 0, None, results.append)
    wall = time.perf_counter() - start
    time.sleep(0.2)
    cpu = sum(worker.cpu_times()[:4]) - before
assert all(r.status == "ok" for r in results), [r.error for r in results]
print(json.dumps({"per_evaluation": wall / n, "cpu": cpu / n, "fitness": results[0].fitness}))
"""


def per_evaluation(checkout: Path, evals: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PER_EVALUATION, str(evals)], cwd=checkout, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fork_cost(forks: int) -> tuple[float, float]:
    """Median wall milliseconds and mean CPU milliseconds (this process plus its children) of one
    evaluation child that runs no genome. On a loaded machine the wall time includes waiting for
    a core; the CPU time does not."""
    sys.path.insert(0, str(ROOT))
    import resource

    import torch

    torch.set_num_threads(1)
    from engine.worker import EvaluationChild
    from fitness.synthetic_pref import SyntheticPreference

    fitness = SyntheticPreference()
    fitness.prepare(0)  # what a warm worker holds after its first evaluation
    limits = {"file_bytes": fitness.max_file_bytes, "open_files": fitness.max_open_files}

    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    times = []
    cpu_start = cpu()
    for _ in range(forks):
        start = time.perf_counter()
        child = EvaluationChild.start(lambda channel: channel.send_json({"type": "artefacts", "size": 0}), limits)
        message = child.receive(time.monotonic() + 10, 1 << 16)
        child.finish()
        times.append(time.perf_counter() - start)
        assert message and message["type"] == "artefacts", message
    return statistics.median(times) * 1000, (cpu() - cpu_start) / forks * 1000


def fork_versus_in_process(evals: int, repeats: int) -> list[float]:
    """CPU time per evaluation of the DPO seed on synthetic-pref through the warm worker's path
    (a fresh process per genome, artefacts through safetensors, trusted scoring, sweep) divided
    by that of both phases in one process (what a worker did before): same code, same genome
    layer, alternating, so the ratio is the cost of the fresh process and the split alone."""
    sys.path.insert(0, str(ROOT))
    import resource

    import torch

    torch.set_num_threads(1)
    from engine import genome
    from engine.evaluation import run_candidate
    from engine.worker import evaluate_in_child
    from fitness.preference import preference_seeds
    from fitness.synthetic_pref import SyntheticPreference

    code = next(s.code for s in preference_seeds() if s.name == "dpo")
    fitness = SyntheticPreference()
    fitness.prepare(0)
    genome.warm_up()

    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def forked() -> float:
        return evaluate_in_child(fitness, [fitness], {"candidate_id": 0, "code": code, "seed": 0}, None).fitness

    def in_process() -> float:
        return run_candidate(fitness, 0, code, 0).fitness

    assert forked() == in_process()  # and warms both paths up
    ratios = []
    for _ in range(repeats):
        spent = {}
        for name, path in (("fork", forked), ("in-process", in_process)):
            start = cpu()
            for _ in range(evals):
                path()
            spent[name] = (cpu() - start) / evals
        ratios.append(spent["fork"] / spent["in-process"])
        print(f"  fork {spent['fork']:.3f} s CPU, in-process {spent['in-process']:.3f} s CPU per evaluation: "
              f"ratio {ratios[-1]:.3f}", flush=True)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forks", type=int, default=200)
    parser.add_argument("--evals", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-with", type=Path, default=None, metavar="DIR")
    parser.add_argument("--skip-fork", action="store_true")
    parser.add_argument("--fork-versus-in-process", action="store_true",
                        help="instead of 2: the fork path against both phases in one process, same checkout")
    args = parser.parse_args()
    if not args.skip_fork:
        wall, cpu = fork_cost(args.forks)
        print(f"fork per evaluation: {wall:.1f} ms wall (median of {args.forks}), {cpu:.1f} ms CPU (mean)")
    if args.fork_versus_in_process:
        ratios = fork_versus_in_process(args.evals, args.repeats)
        print(f"fresh process per genome vs both phases in one process, CPU: median ratio "
              f"{statistics.median(ratios):.3f} over {len(ratios)} repeats")
        return
    ratios, cpu_ratios = [], []
    for repeat in range(args.repeats):
        now = per_evaluation(ROOT, args.evals)
        line = (f"repeat {repeat}: this checkout {now['per_evaluation']:.3f} s wall, {now['cpu']:.3f} s CPU "
                "per evaluation")
        if args.compare_with:
            before = per_evaluation(args.compare_with.resolve(), args.evals)
            ratios.append(now["per_evaluation"] / before["per_evaluation"])
            cpu_ratios.append(now["cpu"] / before["cpu"])
            same = "same fitness" if now["fitness"] == before["fitness"] else "DIFFERENT fitness"
            line += (f"; {args.compare_with}: {before['per_evaluation']:.3f} s wall, {before['cpu']:.3f} s CPU; "
                     f"ratio wall {ratios[-1]:.3f}, CPU {cpu_ratios[-1]:.3f} ({same})")
        print(line, flush=True)
    if ratios:
        print(f"median ratio over {len(ratios)} repeats: wall {statistics.median(ratios):.3f}, "
              f"CPU {statistics.median(cpu_ratios):.3f}")


if __name__ == "__main__":
    main()
