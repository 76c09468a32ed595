"""The Ray executor's speed-up and the driver's own cost per evaluation.

1. Speed-up: the same batch of evaluations that each sleep 0.5 s, in-process (serial executor)
   and on a local 2-CPU Ray instance (two evaluation slots). Target: at least 1.7x.
2. Driver overhead per evaluation: CPU seconds the driver process spends (its Python code and
   Ray's own client threads, both counted by ``time.process_time``) per evaluation, Ray's start
   excluded. Target: under 20 ms. Also the wall time beyond the ideal (batch x 0.5 s / 2).
3. A whole engine run through the CLI with ``--executor ray``: driver CPU and run-store bytes
   per evaluation, and from them an estimate for 64 GPUs x 1,000 evaluations.

Usage: python benchmarks/ray_speed.py [--evals 24] [--sleep 0.5]
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fitness.base import Score  # noqa: E402

_spec = importlib.util.spec_from_file_location("robust_regression_base", ROOT / "examples" / "robust_regression.py")
_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_example)


class SleepRegression(_example.RobustRegression):
    """The example plug-in, except that an evaluation is a fixed sleep (a stand-in for training)."""

    name = "sleep-regression"

    def __init__(self, sleep: float = 0.5) -> None:
        self.sleep = sleep

    def evaluate(self, fn, seed):
        time.sleep(self.sleep)
        return Score(fitness=0.0)


SPEC = f"{Path(__file__).resolve()}:SleepRegression"


def genomes(n: int) -> list[tuple[int, str]]:
    return [(i, f"def loss_{i}(pred, target):\n    return {1 + i / 100:.2f} * (pred - target) ** 2\n")
            for i in range(n)]


def timed_run(executor, tasks) -> tuple[float, float, list]:
    results: list = []
    wall, cpu = time.perf_counter(), time.process_time()
    executor.run(tasks, seed=0, decide=lambda cid, fp: None, on_result=results.append)
    return time.perf_counter() - wall, time.process_time() - cpu, results


def speedup(n: int, sleep: float) -> None:
    from engine.executor import SerialExecutor
    from engine.ray_executor import RayExecutor

    tasks = genomes(n)
    serial = SerialExecutor(SPEC, {"sleep": sleep})
    serial_wall, _, results = timed_run(serial, tasks)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    started = time.perf_counter()
    with RayExecutor(SPEC, {"sleep": sleep}, workers=2, timeout=60) as executor:
        start_seconds = time.perf_counter() - started
        timed_run(executor, genomes(2))  # the slots' first evaluation pays for lazy imports
        ray_wall, ray_cpu, results = timed_run(executor, tasks)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    ideal = n * sleep / 2
    print(f"{n} evaluations of {sleep:g} s: serial {serial_wall:.2f} s, ray (2 CPUs) {ray_wall:.2f} s "
          f"-> speed-up {serial_wall / ray_wall:.2f}x (target >= 1.7x); Ray start {start_seconds:.1f} s (excluded)")
    print(f"driver CPU per evaluation: {1000 * ray_cpu / n:.1f} ms (target < 20 ms); wall beyond the ideal "
          f"{ideal:.2f} s: {1000 * (ray_wall - ideal) / n:.1f} ms per evaluation")


def engine_run(pop: int, gens: int, sleep: float) -> None:
    """A whole engine run (ask, operators, dedup, archive, store commits, tell) on Ray; the
    driver's CPU is counted from the first ask, Ray's start excluded."""
    from archives.store import RunStore
    from engine.config import RunConfig
    from engine.engine import Engine
    from engine.plugins import load_fitness, load_operator
    from engine.ray_executor import RayExecutor

    folder = Path(tempfile.mkdtemp(prefix="evoloss-ray-bench-"))
    try:
        config = RunConfig(fitness=SPEC, fitness_options={"sleep": sleep}, pop=pop, gens=gens, executor="ray",
                           out=str(folder))
        store = RunStore.create(folder, config.to_dict())
        operator = load_operator(str(ROOT / "tests" / "fixtures" / "jitter.py") + ":JitterOperator")
        engine = Engine(config, load_fitness(SPEC, {"sleep": sleep}), [operator], store)
        with RayExecutor(SPEC, {"sleep": sleep}, workers=2, timeout=60) as executor:
            cpu, wall = time.process_time(), time.perf_counter()
            engine.run(executor)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        evaluations = sum(r.status != "duplicate" for r in engine.results.values())
        store.close()
        size = sum(p.stat().st_size for p in folder.glob("run.sqlite*"))
        ms_cpu, kib = 1000 * cpu / evaluations, size / 1024 / evaluations
        print(f"engine run (pop {pop}, gens {gens}, {evaluations} evaluations on 2 slots): wall {wall:.1f} s "
              f"(ideal {evaluations * sleep / 2:.1f} s), driver CPU {ms_cpu:.1f} ms per evaluation, run.sqlite "
              f"{size / 1024:.0f} KiB = {kib:.1f} KiB per evaluation")
        # 64 GPUs x 1,000 evaluations: the driver's work is per evaluation and serial.
        n = 1000
        print(f"estimate for 64 GPUs x {n:,} evaluations: driver CPU {n * ms_cpu / 1000:.0f} s in all "
              f"({ms_cpu:.1f} ms each; with 64 one-minute evaluations in flight, 64 finish per minute and the driver "
              f"is busy {64 * ms_cpu / 60000:.1%} of the time), run.sqlite about {n * kib / 1024:.1f} MiB "
              f"(plus the LLM calls' prompts and replies, which this run has none of)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=24)
    parser.add_argument("--sleep", type=float, default=0.5)
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    speedup(args.evals, args.sleep)
    if not args.skip_engine:
        engine_run(pop=8, gens=2, sleep=args.sleep)


if __name__ == "__main__":
    main()
