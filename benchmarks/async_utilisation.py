"""Worker utilisation of steady-state (--async) vs generational search when evaluation times
are uneven.

Each evaluation sleeps a time between ``--low`` and ``--high`` seconds that depends on the
genome (tests/fixtures/timed.py), standing in for training runs of uneven length. The same run
(``--pop`` x ``--gens`` on ``--workers`` process workers) is made in both modes; utilisation is
the evaluation time the plug-in logged divided by ``workers x`` the span from the first
evaluation's start to the last one's end. A generational run idles workers at every generation's
end while the slowest evaluation finishes; a steady-state run starts the next offspring at once.
Also reported: wall time and the driver's own CPU per evaluation.

Usage: python benchmarks/async_utilisation.py [--pop 8] [--gens 4] [--workers 2] [--low 0.2] [--high 2.0]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli import main  # noqa: E402


TIMED = f"{ROOT / 'tests' / 'fixtures' / 'timed.py'}:TimedRegression"
JITTER = f"{ROOT / 'tests' / 'fixtures' / 'jitter.py'}:JitterOperator"


def measure(folder: Path, asynchronous: bool, args) -> dict:
    log = folder / "evaluations.jsonl"
    argv = ["run", "--fitness", TIMED, "--fitness-opt", f"low={args.low}", "--fitness-opt", f"high={args.high}",
            "--fitness-opt", f"log={str(log)!r}", "--operator", JITTER, "--pop", str(args.pop),
            "--gens", str(args.gens), "--workers", str(args.workers), "--out", str(folder / "run"), "--quiet"]
    wall, cpu = time.perf_counter(), time.process_time()
    code = main(argv + (["--async"] if asynchronous else []))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if code != 0:
        raise SystemExit(f"the run failed with exit code {code}")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    busy = sum(e["end"] - e["start"] for e in entries)
    span = max(e["end"] for e in entries) - min(e["start"] for e in entries)
    return {"mode": "async" if asynchronous else "generational", "evaluations": len(entries),
            "utilisation": busy / (args.workers * span), "span_s": span, "wall_s": wall,
            "driver_cpu_ms_per_eval": 1000 * cpu / len(entries)}


def run(args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="evoloss-util-") as folder:  # first-run imports, not measured
        warm = argparse.Namespace(**{**vars(args), "gens": 0, "low": 0.0, "high": 0.0, "workers": 1})
        measure(Path(folder), False, warm)
    rows = []
    for asynchronous in (False, True):
        with tempfile.TemporaryDirectory(prefix="evoloss-util-") as folder:
            rows.append(measure(Path(folder), asynchronous, args))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pop", type=int, default=8)
    parser.add_argument("--gens", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--low", type=float, default=0.2)
    parser.add_argument("--high", type=float, default=2.0)
    arguments = parser.parse_args()
    for row in run(arguments):
        print(f"{row['mode']:>12}: utilisation {row['utilisation']:.1%} over {row['evaluations']} evaluations, "
              f"span {row['span_s']:.1f} s, wall {row['wall_s']:.1f} s, "
              f"driver CPU {row['driver_cpu_ms_per_eval']:.1f} ms/evaluation (incl. worker start-up)")
