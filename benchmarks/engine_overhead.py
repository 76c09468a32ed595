"""Engine overhead per candidate and worker scaling.

1. Overhead: a run whose plug-in scores instantly, in-process (serial executor), so the wall
   time is the engine's own work per candidate: operators, static checks, AST and behaviour
   dedup, the interface's contract checks, the archive, the SQLite commits and the
   per-generation elite archive.
2. Scaling: the same batch of synthetic-pref evaluations on 1 and on 2 worker processes.

Usage: python benchmarks/engine_overhead.py [--skip-scaling]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from archives.store import RunStore  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.executor import ProcessExecutor, SerialExecutor  # noqa: E402
from engine.plugins import load_fitness, load_operator  # noqa: E402
from fitness.base import Score  # noqa: E402


def overhead(pop: int = 8, gens: int = 30) -> None:
    from fitness.synthetic_pref import SyntheticPreference

    class Instant(SyntheticPreference):
        """synthetic-pref's interface, seeds and descriptors, but scoring takes no time."""

        name = "instant"

        def evaluate(self, fn, seed):
            return Score(fitness=float(fn.__code__.co_code.__len__() % 97) / 97.0)

    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(fitness="instant", pop=pop, gens=gens, executor="serial", out=tmp)
        store = RunStore.create(tmp, config.to_dict())
        operator = load_operator("symbolic")
        spent = {"operator": 0.0, "worker": 0.0}

        def timed(method, key):
            def call(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    spent[key] += time.perf_counter() - start
            return call

        for name in ("mutate", "crossover", "propose"):
            setattr(operator, name, timed(getattr(operator, name), "operator"))
        engine = Engine(config, Instant(), [operator], store)

        class Direct(SerialExecutor):
            """In-process; times the worker-side work (compile, contract checks, fingerprint, descriptors)."""

            def __init__(self):
                self.stages = [Instant()]

            def run(self, tasks, seed, decide, on_result):
                super().run(tasks, seed, decide, timed(on_result, "callback"))

        from engine import evaluation

        original = evaluation.run_candidate
        evaluation.run_candidate = timed(original, "worker")
        import engine.executor as executor_module

        executor_module.run_candidate = evaluation.run_candidate
        spent["callback"] = 0.0
        start = time.perf_counter()
        engine.run(Direct())
        wall = time.perf_counter() - start
        executor_module.run_candidate = original
        candidates = len(store.candidates())
    per = lambda seconds: 1000 * seconds / candidates  # noqa: E731
    worker = spent["worker"] - spent["callback"]
    driver = wall - spent["operator"] - spent["worker"] + spent["callback"]
    print(f"per candidate ({candidates} candidates, {gens + 1} generations, {wall:.2f} s, instant scoring):")
    print(f"  total                                  {per(wall):6.1f} ms")
    print(f"  symbolic operator                      {per(spent['operator']):6.1f} ms")
    print(f"  worker-side checks (compile, contract, fingerprint, descriptors) {per(worker):6.1f} ms")
    print(f"  engine bookkeeping (dedup, archive, store, selection)           {per(driver):6.1f} ms")


def scaling(n: int = 16) -> None:
    fitness = load_fitness("synthetic-pref")
    seeds = fitness.seeds()
    codes = [(i, seeds[i % len(seeds)].code.replace("self.beta", f"(self.beta * {1 + i / 100})"))
             for i in range(n)]
    timings = {}
    for workers in (1, 2):
        with ProcessExecutor("synthetic-pref", workers=workers, timeout=600) as executor:
            for worker in executor.workers:  # start() returns once one is ready: time evaluations only
                executor.await_ready(worker)
            results = []
            start = time.perf_counter()
            executor.run(codes, seed=0, decide=None, on_result=results.append)
            timings[workers] = time.perf_counter() - start
        ok = sum(r.ok for r in results)
        per = sum(r.seconds for r in results) / len(results)
        print(f"{workers} worker(s): {timings[workers]:.2f} s for {n} evaluations ({ok} ok, {per:.2f} s each)")
    print(f"speed-up with 2 workers: {timings[1] / timings[2]:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overhead()
    if not args.skip_scaling:
        scaling()
