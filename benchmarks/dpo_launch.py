"""What does the accelerate launcher cost on the ``tiny`` preset, against in-process training?

Times one DPO candidate (256 pairs, held-out scoring on 128) three or more ways, each with a
warm reference cache so that only the launch differs:

1. ``inprocess``: the evaluation worker's path, after its imports (a worker pays them once);
2. ``accelerate`` with 1 process: a fresh ``accelerate launch`` per candidate (interpreter,
   torch/transformers/TRL imports, tokenizer and data in the rank, then training);
3. ``accelerate`` with 2 processes: DDP over gloo on CPU (twice the pairs per step, half the
   steps, as the paper's 8-GPU recipe scales its global batch).

For each it prints the median wall time of ``evaluate`` over ``--repeats`` and, for launches,
the rank's own setup and training seconds (the rest is process start-up and imports). On GPUs
with the 7B recipe, training takes hours and this fixed cost (seconds to a minute for loading
the model shards) does not matter; on the tiny preset it dominates.

Usage::

    python benchmarks/dpo_launch.py [--repeats 3] [--processes 1 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (OMP_NUM_THREADS for the ranks), as a worker has")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from engine.genome import compile_genome
    from fitness.dpo import DPOFitness
    from fitness.preference import PreferenceInterface, preference_seeds

    dpo = compile_genome(preference_seeds()[0].code, PreferenceInterface.arg_counts)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        setups = [("inprocess", {})] + [(f"accelerate x{n}", {"launcher": "accelerate", "num_processes": n})
                                        for n in args.processes]
        DPOFitness(preset="tiny", cache_dir=cache).evaluate(dpo, 0)  # imports, and a warm cache for all
        for label, options in setups:
            fitness = DPOFitness(preset="tiny", cache_dir=cache, **options)
            times, scores = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                scores.append(fitness.evaluate(dpo, 0))
                times.append(time.perf_counter() - start)
            metrics = scores[-1].metrics
            rows.append({
                "setup": label, "seconds": statistics.median(times), "fitness": scores[-1].fitness,
                "train_steps": metrics["train_steps"], "rank_setup_seconds": metrics["setup_seconds"],
                "rank_train_seconds": metrics["train_seconds"], "reference_cache_hits": metrics["reference_cache_hits"],
            })
    print(f"{'setup':<16}{'wall s':>8}{'setup s':>9}{'train s':>9}{'steps':>7}{'fitness':>9}")
    for row in rows:
        print(f"{row['setup']:<16}{row['seconds']:>8.2f}{row['rank_setup_seconds']:>9.2f}"
              f"{row['rank_train_seconds']:>9.2f}{row['train_steps']:>7}{row['fitness']:>9.4f}")
    print(json.dumps({"repeats": args.repeats, "threads": args.threads, "cpus": os.cpu_count(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
