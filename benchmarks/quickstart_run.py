"""Time the quick-start job and report what it found: its best against the DPO seed on the
tasks it selected on, and the end-of-run validation on held-out tasks (the verdict, and the
validated best's held-out gain over DPO with its standard error).

Usage: python benchmarks/quickstart_run.py [--pop 8] [--gens 12] [--workers 2] [--seed 0]
Runs ``python -m engine run`` as a user would, then reads the run's summary.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pop", default="8")
    parser.add_argument("--gens", default="12")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the run in DIR (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp) / "run"
        command = [sys.executable, "-m", "engine", "run", "--pop", args.pop, "--gens", args.gens,
                   "--workers", args.workers, "--seed", args.seed, "--out", str(out), "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True)
        wall = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
    best, baseline = summary["best_fitness"], summary["baseline_fitness"]
    print(f"wall time: {wall:.1f} s for {summary['evaluations']} evaluations "
          f"({summary['generations']} generations, {args.workers} workers)")
    estimate = summary.get("best_estimate") or {}
    if estimate.get("gain") is not None:  # ranked over several seeds: the estimate, not one draw
        print(f"best: {summary['best_name']} gain {estimate['gain']:+.4f} ± {estimate['se']:.4f} over "
              f"{estimate['seeds']} seeds (lower bound {estimate['lower']:+.4f}) vs {summary['baseline']}, "
              "on the tasks selection saw")
    else:
        print(f"best: {summary['best_name']} {best:.4f}  vs  {summary['baseline']} seed {baseline:.4f}  "
              f"({'beats' if best > baseline else 'does not beat'} it by {best - baseline:+.4f})")
    validation = summary.get("validation") or {}
    if validation:
        print(f"held-out validation ({validation.get('fitness')}, {validation.get('seeds')} fresh seeds): "
              f"{validation.get('verdict')}")
        for row in validation.get("losses", []):
            se = row.get("gain_se")
            print(f"  {row['name']:32s} gain {row['gain']:+.4f} ± {se if se is not None else float('nan'):.4f}  "
                  f"worst task {row.get('worst_task_gain', float('nan')):+.4f}  {row.get('flag') or ''}")
    print(f"invalid {summary['invalid']}, dedup saved {summary['dedup_saved']}, offspring valid share "
          f"{summary['offspring_valid_share']:.2f}, coverage {summary['coverage']:.3f}, QD score {summary['qd_score']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
