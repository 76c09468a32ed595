"""Start-up, shutdown and memory of ``python -m engine run``.

Runs the command line on an instant evaluator (tests/fixtures/timed.py with no sleep) with the
symbolic operator and 2 workers, and measures from outside the driver:

- seconds from starting the command to the first finished evaluation (its row committed);
- seconds from the last finished evaluation to the process's exit;
- the driver's peak resident memory (polled; its workers are separate processes);
- the whole wall time and the number of evaluations.

    python benchmarks/startup.py [--repeat 3] [--pop 8 --gens 6] [--sandbox auto] [--fitness SPEC] [-- more run flags]

``--fitness`` measures another plug-in (e.g. the default, ``pref-suite``, whose evaluations train).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
INSTANT = f"{ROOT / 'tests' / 'fixtures' / 'timed.py'}:TimedRegression"


def evaluation_times(store: Path) -> list[float]:
    try:
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1)
        try:
            return [row[0] for row in db.execute("SELECT finished FROM evaluations ORDER BY id")]
        finally:
            db.close()
    except sqlite3.Error:
        return []


def measure(pop: int, gens: int, sandbox: str, extra: list[str], fitness: str = INSTANT) -> dict:
    out = Path(tempfile.mkdtemp(prefix="evoloss-startup-")) / "run"
    command = [sys.executable, "-m", "engine", "run", "--fitness", fitness, "--pop", str(pop), "--gens", str(gens),
               "--workers", "2", "--sandbox", sandbox, "--out", str(out), "--quiet", *extra]
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT)
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.01)
    ended = time.time()
    if process.returncode != 0:
        raise SystemExit(f"the run failed with exit code {process.returncode}")
    finished = evaluation_times(out / "run.sqlite")
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"first_evaluation_s": finished[0] - started, "exit_after_last_s": ended - finished[-1],
            "wall_s": ended - started, "evaluations": len(finished), "driver_peak_rss_mb": peak / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pop", type=int, default=8)
    parser.add_argument("--gens", type=int, default=6)
    parser.add_argument("--sandbox", default="auto")
    parser.add_argument("--fitness", default=INSTANT, help="the plug-in run (default: an instant evaluator)")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"] or ["--validate-top", "0", "--race-seeds", "0"]
    runs = [measure(args.pop, args.gens, args.sandbox, extra, args.fitness) for _ in range(args.repeat)]
    for run in runs:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()}))
    summary = {key: {"median": statistics.median(r[key] for r in runs), "min": min(r[key] for r in runs),
                     "max": max(r[key] for r in runs)} for key in runs[0] if key != "evaluations"}
    print(json.dumps({"summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
