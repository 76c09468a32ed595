"""Cost of the truth key (fitness.truth) per evaluation: a problem built in a child of the warm
worker from a keyed seed, against the public problem built in the worker itself.

Every evaluation is on a new evaluation seed, so every one builds its problem: the worst case
(a run re-uses a seed's problem for every candidate on it). One worker through the process
executor in the OS jail ``--sandbox`` names, the DPO seed; the public and the keyed executor
alternate ``--repeats`` times so that both see the same machine load. Prints wall and CPU time
per evaluation of each and their ratios (keyed / public), each repeat and the median.

With ``--compare-with DIR`` (a checkout from before the key, whose worker built every problem
itself) a third arm measures that, and the ratios are to it.

Usage: python benchmarks/truth_key_cost.py [--fitness synthetic-pref] [--evals 8] [--repeats 3]
       [--compare-with DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


_MEASURE = r"""
import json, os, sys, time
import psutil, torch
torch.set_num_threads(1)
from engine.executor import ProcessExecutor
from engine.plugins import load_fitness
fitness, evals, first_seed, sandbox, key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if key:
    os.environ["EVOLOSS_TRUTH_FILE"] = key
plugin = load_fitness(fitness)
code = next(seed.code for seed in plugin.seeds() if seed.name == plugin.baseline)
with ProcessExecutor(fitness, workers=1, timeout=600, sandbox=sandbox) as executor:
    results = []
    executor.run([(0, code)], first_seed - 1, None, results.append)  # warm-up: imports
    worker = psutil.Process(executor.workers[0].process.pid)
    before = sum(worker.cpu_times()[:4])
    start = time.perf_counter()
    for offset in range(evals):
        executor.run([(offset + 1, code)], first_seed + offset, None, results.append)
    wall = time.perf_counter() - start
    time.sleep(0.2)
    cpu = sum(worker.cpu_times()[:4]) - before
assert all(r.status == "ok" for r in results), [r.error for r in results]
print(json.dumps({"wall": wall / evals, "cpu": cpu / evals}))
"""


def measure(checkout: Path, fitness: str, key: Path | None, evals: int, first_seed: int, sandbox: str) -> dict:
    """Wall and CPU seconds per evaluation (the worker and the processes it reaped), in a fresh
    interpreter running ``checkout``'s code."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    env.pop("EVOLOSS_TRUTH_FILE", None)
    out = subprocess.run([sys.executable, "-c", _MEASURE, fitness, str(evals), str(first_seed), sandbox,
                          str(key or "")], cwd=checkout, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fitness", default="synthetic-pref")
    parser.add_argument("--evals", type=int, default=8, help="evaluations per measurement, each on a new seed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-with", default=None, metavar="DIR",
                        help="also measure another checkout (e.g. a git archive of the commit before the key); "
                             "ratios are then to it")
    parser.add_argument("--sandbox", default="none",
                        help="the worker's jail (none: its CPU time, with its children's, can be read)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="evoloss-truth-cost-"))
    key = folder / "truth.key"
    from fitness import truth

    truth.write_key(key, secrets.token_bytes(truth.KEY_BYTES))
    arms = {"public": (ROOT, None), "keyed": (ROOT, key)}
    if args.compare_with:
        arms = {"before": (Path(args.compare_with).resolve(), None), **arms}
    rows = []
    for repeat in range(args.repeats):
        seed = 10_000 * (repeat + 1)
        times = {name: measure(checkout, args.fitness, arm_key, args.evals, seed, args.sandbox)
                 for name, (checkout, arm_key) in arms.items()}
        base = times["before" if "before" in times else "public"]
        row = {"repeat": repeat, **{f"{name}_wall_s": round(t["wall"], 4) for name, t in times.items()},
               **{f"{name}_cpu_ratio": round(t["cpu"] / base["cpu"], 3) for name, t in times.items() if t is not base},
               **{f"{name}_wall_ratio": round(t["wall"] / base["wall"], 3) for name, t in times.items() if t is not base}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ratios = sorted({k for row in rows for k in row if k.endswith("_ratio")})
    print(json.dumps({"fitness": args.fitness, "evals": args.evals, "sandbox": args.sandbox,
                      **{f"median_{k}": statistics.median(r[k] for r in rows) for k in ratios}}))
    key.unlink()
    folder.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
