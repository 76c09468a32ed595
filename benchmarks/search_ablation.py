"""What evolution adds: the default search against simpler searches with the same budget.

Each variant runs ``python -m engine run`` with the same fitness, the same candidate budget and
the same noise-aware ranking and validation, over several run seeds:

- ``evolution``: the default (MAP-Elites archive, tournaments, the operator's mutations and
  crossovers);
- ``best-of-n``: offspring of the seed losses only, no selection (``--gens 0`` and a population of
  the whole budget);
- ``best-of-2n``: the same with twice the candidates, so that its evaluations (candidates plus
  re-measurements) are about as many as evolution's: racing re-measures up to ``--race-budget``
  per generation, and best-of-N has one generation;
- ``evolution-one-seed``: the default with every candidate first scored on the run's own seed
  (``--first-seeds run``, the default before generation seeds);
- ``random``: the same generations, parents drawn from every scored candidate, fitness unused
  (``--selection random``);
- ``truncation``: plain truncation selection, parents uniformly from the ``--pop`` best by their
  noise-aware bound (``--selection truncation``).

What is compared is the held-out gain over the baseline of each run's reported best (the run's
own rank 1 other than the baseline, chosen before the validation looked at anything:
``--validate-top 1``), measured by the end-of-run validation on the plug-in's held-out tasks
(pref-suite: the meta-test split) and fresh seeds: the validation's own number (for a suite, its
robust fitness: the mean gain, pulled down by a collapse on any task) and, for a suite, the mean gain over
tasks alone, from the same evaluations. Per variant: mean ± standard error over run seeds, the
evaluations each run used, and how many candidates it had made when its reported best appeared;
and the paired differences, evolution minus each other variant, by run seed.

A comparison on one draw of a suite's tasks says partly which search found the loss family that
draw's meta-test tasks favour. ``--draws`` gives each run seed a draw of its own (``--fitness-opt
suite_seed=D`` for every variant of that run seed, so the pairs stay on one draw): the standard
errors then include the spread between draws.

    python benchmarks/search_ablation.py [--fitness pref-suite] [--seeds 1 2 3] [--pop 8] [--gens 6]
    python benchmarks/search_ablation.py --seeds 1 2 3 --draws 20 21 23   # one draw per run seed
"""
from __future__ import annotations

import argparse
import json
import math
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def variants(pop: int, gens: int, seeds: int) -> dict[str, list[str]]:
    budget = max(seeds, pop) + pop * gens
    return {
        "evolution": ["--pop", str(pop), "--gens", str(gens)],
        "best-of-n": ["--pop", str(budget), "--gens", "0"],
        "best-of-2n": ["--pop", str(2 * budget), "--gens", "0"],
        "evolution-one-seed": ["--pop", str(pop), "--gens", str(gens), "--first-seeds", "run"],
        "random": ["--pop", str(pop), "--gens", str(gens), "--selection", "random"],
        "truncation": ["--pop", str(pop), "--gens", str(gens), "--selection", "truncation"],
    }


def run_one(fitness: str, flags: list[str], seed: int, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "engine", "run", "--fitness", fitness, "--seed", str(seed), "--out", str(out),
               "--validate-top", "1", "--quiet", *flags, *extra]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    validation = summary.get("validation") or {}
    best = (validation.get("losses") or [{}])[0]
    db = sqlite3.connect(out / "run.sqlite")
    try:
        evaluations = db.execute("SELECT count(*) FROM evaluations WHERE fitness_name NOT LIKE 'validation:%'").fetchone()[0]
        # A suite's per-seed mean gain over tasks (already paired with the baseline on each task and
        # seed), beside the validation's own number (the suite's robust fitness: mean and worst task).
        mean_gains = [json.loads(metrics).get("mean_gain") for (metrics,) in db.execute(
            "SELECT metrics FROM evaluations WHERE fitness_name LIKE 'validation:%' AND candidate_id = ? "
            "AND status = 'ok'", (best.get("id"),))] if best.get("id") is not None else []
    finally:
        db.close()
    mean_gain, mean_gain_se = mean_se([g for g in mean_gains if isinstance(g, (int, float))])
    return {"seed": seed, "best_name": best.get("name"), "best_id": best.get("id"),
            "held_out_gain": best.get("gain"), "held_out_se": best.get("gain_se"),
            "held_out_mean_gain": None if math.isnan(mean_gain) else mean_gain,
            "held_out_mean_gain_se": None if math.isnan(mean_gain_se) else mean_gain_se,
            "made_before_best": best.get("id"), "evaluations": evaluations, "seconds": round(seconds, 1),
            "selection_gain": (summary.get("best_estimate") or {}).get("gain")}


def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fitness", default="pref-suite")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="run seeds")
    parser.add_argument("--pop", type=int, default=8)
    parser.add_argument("--gens", type=int, default=6)
    parser.add_argument("--plugin-seeds", type=int, default=11, help="how many seed losses the plug-in has")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (give each run --workers 1 to keep one core per run)")
    parser.add_argument("--draws", type=int, nargs="+", default=None,
                        help="a suite draw (suite_seed) per run seed, in the order of --seeds")
    parser.add_argument("--truth-key", default="public",
                        help="the runs' --truth-key (default public: the problems the documented numbers were "
                             "measured on, the same on every machine)")
    args, extra = parser.parse_known_args(argv)
    if args.draws is not None and len(args.draws) != len(args.seeds):
        parser.error(f"--draws needs one draw per run seed ({len(args.seeds)}), got {len(args.draws)}")
    draws = dict(zip(args.seeds, args.draws or [None] * len(args.seeds)))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="evoloss-ablation-"))
    chosen = variants(args.pop, args.gens, args.plugin_seeds)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only}
    results: dict[str, list[dict]] = {name: [] for name in chosen}
    jobs = [(name, flags, seed) for seed in args.seeds for name, flags in chosen.items()]

    def one(job: tuple[str, list[str], int]) -> tuple[str, dict]:
        name, flags, seed = job
        draw = [] if draws[seed] is None else ["--fitness-opt", f"suite_seed={draws[seed]}"]
        record = run_one(args.fitness, flags, seed, out / f"{name}-{seed}", [*extra, *draw, "--truth-key", args.truth_key])
        if draws[seed] is not None:
            record["draw"] = draws[seed]
        print(json.dumps({"variant": name, **record}), flush=True)
        return name, record

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for name, record in pool.map(one, jobs):  # in job order: records stay paired by run seed
            results[name].append(record)
    print(f"\n{args.fitness}: held-out gain over the baseline of each run's reported best "
          f"(mean ± standard error over run seeds {args.seeds}"
          f"{'' if args.draws is None else f', each on its own draw {args.draws}'}; budget {max(args.plugin_seeds, args.pop) + args.pop * args.gens} candidates)\n")
    print("| variant | held-out gain | held-out mean gain over tasks | runs | evaluations per run | "
          "candidates made before the best |")
    print("| --- | --- | --- | --- | --- | --- |")
    table = {}
    for name, records in results.items():
        gain, se = mean_se([r["held_out_gain"] for r in records])
        mean_gain, mean_gain_se = mean_se([r["held_out_mean_gain"] for r in records])
        made, _ = mean_se([r["made_before_best"] for r in records])
        evals, _ = mean_se([r["evaluations"] for r in records])
        table[name] = {"gain": gain, "se": se, "mean_gain": mean_gain, "mean_gain_se": mean_gain_se, "runs": records}
        print(f"| {name} | {gain:+.4f} ± {se:.4f} | {mean_gain:+.4f} ± {mean_gain_se:.4f} | {len(records)} | "
              f"{evals:.0f} | {made:.0f} |")
    if "evolution" in table:
        for other in ("best-of-n", "best-of-2n", "evolution-one-seed", "random", "truncation"):
            if other not in table:
                continue
            for key, label in (("held_out_gain", "held-out gain"), ("held_out_mean_gain", "mean gain over tasks")):
                paired = [a[key] - b[key] for a, b in zip(table["evolution"]["runs"], table[other]["runs"])
                          if a[key] is not None and b[key] is not None]
                diff, se = mean_se(paired)
                print(f"evolution - {other}, {label}: {diff:+.4f} ± {se:.4f} (paired by run seed)")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    print(f"runs kept in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
