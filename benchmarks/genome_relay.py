"""Cost of handing a genome detached copies of its inputs (engine.genome.isolate_inputs).

Times the synthetic-pref evaluation of one seed loss (DPO by default) with the compiled
genome as the engine builds it (detached copies, gradient relayed through an autograd
Function) against the same function called directly, interleaved so that load on the machine
affects both alike; also counts the genome's calls to give the cost per call. One torch
thread.

Usage: python benchmarks/genome_relay.py [--seed-name dpo] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.genome import compile_genome  # noqa: E402
from fitness.preference import preference_seeds  # noqa: E402
from fitness.synthetic_pref import SyntheticPreference  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-name", default="dpo", help="which preference seed to evaluate (default dpo)")
    parser.add_argument("--repeats", type=int, default=5, help="evaluations per variant (default 5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = {s.name: s for s in preference_seeds()}
    if args.seed_name not in seeds:
        parser.error(f"--seed-name must be one of {sorted(seeds)}")
    fitness = SyntheticPreference()
    isolated = compile_genome(seeds[args.seed_name].code, fitness.interface.arg_counts)
    direct = isolated.__wrapped__  # the same genome, same restricted namespace, called as is
    calls = {"n": 0}

    def counted(*a, **k):
        calls["n"] += 1
        return direct(*a, **k)

    counted.__wrapped__ = direct  # keeps inspect.signature, as the isolated function does
    fitness.evaluate(isolated, 0)  # warm-up: the plug-in's problem caches, torch's first calls
    times: dict[str, list[float]] = {"isolated": [], "direct": []}
    scores: dict[str, float] = {}
    for _ in range(args.repeats):
        for label, fn in (("isolated", isolated), ("direct", counted)):
            start = time.perf_counter()
            score = fitness.evaluate(fn, 0)
            times[label].append(time.perf_counter() - start)
            scores[label] = score.fitness
    n_calls = calls["n"] // args.repeats
    print(f"synthetic-pref, seed loss {args.seed_name!r}, {args.repeats} evaluations each, {n_calls} genome calls each")
    for label, values in times.items():
        print(f"  {label:<9} median {statistics.median(values):.3f} s   min {min(values):.3f}   max {max(values):.3f}")
    extra = statistics.median(times["isolated"]) - statistics.median(times["direct"])
    print(f"  overhead  {extra:+.3f} s per evaluation ({100 * extra / statistics.median(times['direct']):+.1f}%), "
          f"{1e6 * extra / max(n_calls, 1):+.0f} us per genome call")
    print(f"  fitness   isolated {scores['isolated']!r}  direct {scores['direct']!r}  "
          f"{'identical' if scores['isolated'] == scores['direct'] else 'DIFFERENT'}")
    return 0 if scores["isolated"] == scores["direct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
