"""What the OS jail adds to a worker's start-up, per sandbox (target: at most 50 ms per worker).

Two measurements, each the median of ``--repeats`` runs:

* ``bare``: a Python interpreter that does nothing (``python -I -S -c pass``) started through the
  jail exactly as a worker is (same view, environment and limits): the jail's own cost, with
  little noise.
* ``worker``: a real evaluation worker (torch imported, the plug-in loaded and warmed up) from
  spawn to its ready message, through :class:`engine.executor.ProcessExecutor`, the sandboxes
  taken in turn; it spreads by about 50 ms from run to run.

    python benchmarks/jail_startup.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import jail  # noqa: E402
from engine.executor import ProcessExecutor, scrubbed_environment  # noqa: E402
from engine.plugins import load_fitness  # noqa: E402


def bare_seconds(sandbox: jail.Sandbox, repeats: int) -> float:
    plugin = load_fitness("synthetic-pref")
    parts = jail.worker_view_parts([plugin]) if sandbox.jailed else {}
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="evoloss-bench-") as folder:
            scratch = Path(folder) / "worker"
            scratch.mkdir()
            view = jail.View(scratch=scratch, **parts)
            env = jail.jail_environment(scrubbed_environment(), view, sandbox)
            argv, launcher_env = jail.wrap(sandbox, [sys.executable, "-I", "-S", "-c", "pass"], view, env,
                                           jail.Limits(address_space=4 << 30))
            start = time.perf_counter()
            subprocess.run(argv, env=launcher_env, check=True, stdin=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker_seconds(sandboxes: dict[str, jail.Sandbox], repeats: int) -> dict[str, float]:
    """Median worker start-up per sandbox, the kinds taken in turn (rotating which goes first):
    measured one kind after another, the first kind measured read about 50 ms faster than the
    others, an order effect as large as the jail's cost."""
    kinds = list(sandboxes)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(repeats):
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            start = time.perf_counter()
            with ProcessExecutor("synthetic-pref", workers=1, sandbox=sandboxes[kind]):
                times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(values) for kind, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-workers", action="store_true", help="only the bare measurement")
    args = parser.parse_args(argv)
    kinds = ["none"] + [kind for kind in ("bwrap", "unshare") if jail.probe(kind) is None]
    sandboxes = {kind: jail.choose(kind) for kind in kinds}
    workers = {} if args.skip_workers else worker_seconds(sandboxes, args.repeats)
    rows = {kind: (bare_seconds(sandbox, args.repeats), workers.get(kind)) for kind, sandbox in sandboxes.items()}
    print(f"{'sandbox':10} {'bare ms':>9} {'+ vs none':>10} {'worker ms':>10} {'+ vs none':>10}")
    for kind, (bare, worker) in rows.items():
        base_bare, base_worker = rows["none"]
        worker_text = "-" if worker is None else f"{worker * 1000:10.0f} {(worker - base_worker) * 1000:+10.0f}"
        print(f"{kind:10} {bare * 1000:9.1f} {(bare - base_bare) * 1000:+10.1f} {worker_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
