"""How fast is a task suite, and how do the published losses fare on its held-out tasks?

Prints, on one CPU thread:

1. seconds per task (train and score of the baseline, after a warm-up), per split, and the
   slowest task (wall clock, and the process's CPU time, which a busy machine does not inflate);
2. seconds per evaluation of the whole meta-train and meta-test suite on one seed: first with
   the baseline still to train (a worker's first candidate), then with it cached;
3. for each compared loss, its gain over the baseline on the meta-test tasks over ``--seeds``
   evaluation seeds (paired: the same problems for both): the mean gain over tasks and the
   suite's robust fitness (mean and worst task), each as mean ± standard error over seeds, and
   the mean gain per task.

Usage::

    python benchmarks/pref_suite_seeds.py [--seeds 8] [--losses lrml,ipo,slic] [--split test]
    python benchmarks/pref_suite_seeds.py --suite cls-suite --losses label_smoothing,focal,squared_error
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.genome import compile_genome  # noqa: E402
from engine.plugins import load_fitness  # noqa: E402
from fitness.suites import aggregate  # noqa: E402

DEFAULT_LOSSES = {"pref-suite": "lrml,ipo,slic", "cls-suite": "label_smoothing,focal,squared_error"}


def mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:+.4f} ± {se:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="pref-suite", choices=sorted(DEFAULT_LOSSES))
    parser.add_argument("--seeds", type=int, default=8, help="evaluation seeds for the gains (0, 1, ...)")
    parser.add_argument("--losses", default=None, help="seed losses to compare with the baseline")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="split for the gains")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    probe = load_fitness(args.suite)
    fns = {s.name: compile_genome(s.code, probe.interface.arg_counts) for s in probe.seeds()}
    baseline = fns[probe.baseline]

    print(f"== {args.suite}: seconds per task (baseline, train + score, one thread) ==")
    for split in ("train", "test"):
        suite = load_fitness(args.suite, {"split": split})
        suite.evaluate_task(baseline, suite.tasks[0], 100)  # warm-up: imports, first allocations
        times = []
        for task in suite.tasks:
            suite.training_data(task, 0)  # problem generation timed apart
            start, cpu = time.perf_counter(), time.process_time()
            suite.score_task(suite.train_task(baseline, task, 0), task, 0)
            times.append((time.perf_counter() - start, time.process_time() - cpu, task.name))
        slowest = max(times)
        print(f"{split}: {len(times)} tasks, wall mean {statistics.fmean(t[0] for t in times):.3f} s, "
              f"slowest {slowest[0]:.3f} s (CPU {slowest[1]:.3f} s; {slowest[2]})")

    print(f"\n== {args.suite}: seconds per evaluation of a whole split, one seed ==")
    other = next(name for name in fns if name != probe.baseline)
    for split in ("train", "test"):
        suite = load_fitness(args.suite, {"split": split})
        start = time.perf_counter()
        suite.evaluate(fns[other], 1)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        suite.evaluate(fns[other], 1)
        warm = time.perf_counter() - start
        print(f"{split}: {cold:.2f} s with the baseline to train, {warm:.2f} s with it cached")

    names = (args.losses or DEFAULT_LOSSES[args.suite]).split(",")
    suite = load_fitness(args.suite, {"split": args.split})
    seeds = list(range(args.seeds))
    print(f"\n== {args.suite} {args.split} split ({len(suite.tasks)} tasks): gain over {probe.baseline}, "
          f"{len(seeds)} seeds, mean ± standard error over seeds ==")
    for name in names:
        results = suite.evaluate_many(fns[name], seeds)
        per_seed = [aggregate([r for r in results if r.seed == s], suite.worst_weight, suite.worst_tolerance, suite.gain_clip) for s in seeds]
        summary = aggregate(results, suite.worst_weight, suite.worst_tolerance, suite.gain_clip)
        print(f"{name:16s} mean gain {mean_se([p['mean_gain'] for p in per_seed])}   "
              f"robust fitness {mean_se([p['fitness'] for p in per_seed])}   "
              f"worst task {summary['worst_task'].split(':')[0]} ({summary['worst_gain']:+.3f})")
        for task, entry in summary["per_task"].items():
            print(f"    {task:72s} {entry['gain']:+.3f}  ({probe.baseline} {entry['baseline']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
