"""LLM calls and evaluations in parallel: wall time of a run versus the serial sum.

A local OpenAI-compatible server answers every request after ``--latency`` seconds (0.5) with
a distinct valid loss; the fitness plug-in below sleeps ``--eval-seconds`` (0.5) per
evaluation. A ``--pop 8 --gens 4`` run on 2 worker processes (the default executor, with the
replies' unit tests in their isolated checker) is timed and compared with the serial sum:
every LLM call's latency plus every evaluation's duration, as recorded in the run store.

With ``--async`` the run is steady-state: operator calls start while evaluations run, so the
ideal wall time is the evaluations' alone (their sum / workers).

Usage: python benchmarks/llm_concurrency.py [--pop 8] [--gens 4] [--workers 2] [--async]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fitness.base import Fitness, Score, Seed  # noqa: E402

sys.path.insert(0, str(ROOT / "examples"))
from robust_regression import RegressionInterface  # noqa: E402

EVAL_SECONDS = float(os.environ.get("EVOLOSS_BENCH_EVAL_SECONDS", "0.5"))


class Sleepy(Fitness):
    """The regression contract, scored by a fixed formula after sleeping (a stand-in for training)."""

    name = "sleepy"
    interface = RegressionInterface()
    baseline = "mse"

    def seeds(self):
        return [Seed("mse", "def mse(pred, target):\n    return (pred - target) ** 2\n"),
                Seed("mae", "def mae(pred, target):\n    return (pred - target).abs()\n")]

    def evaluate(self, fn, seed):
        import torch

        time.sleep(EVAL_SECONDS)
        losses = fn(torch.linspace(-3, 3, 16), torch.zeros(16))
        return Score(fitness=-float(losses.mean()))


def answer(request: dict) -> str:
    rng = random.Random(request.get("seed", 0))
    power, weight = round(rng.uniform(0.6, 2.4), 3), round(rng.uniform(0.5, 2.0), 3)
    name = f"p{int(power * 1000)}_w{int(weight * 1000)}"
    code = f"def {name}(pred, target):\n    return {weight} * (pred - target).abs() ** {power}\n"
    return json.dumps({"thought": f"power {power}", "name": name, "code": code})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pop", type=int, default=8)
    parser.add_argument("--gens", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the server takes per reply")
    parser.add_argument("--async", dest="asynchronous", action="store_true", help="steady-state mode")
    args = parser.parse_args()

    # Imported before the clock starts: the run is measured, not Python's imports.
    import openai  # noqa: F401
    import ribs.archives  # noqa: F401
    from archives.store import RunStore
    from engine.config import RunConfig
    from engine.engine import Engine
    from engine.executors import make_executor
    from engine.assembly import build_operators
    from engine.plugins import load_fitness
    from tests.operators.fake_llm import Answer, FakeLLM

    spec = f"{Path(__file__).resolve()}:Sleepy"
    with FakeLLM(default=lambda request: Answer(answer(request), delay=args.latency)) as fake, \
            tempfile.TemporaryDirectory() as tmp:
        # The same steps as ``python -m engine run`` (process executor, isolated reply checks).
        config = RunConfig(fitness=spec, operator=f"openai:bench@{fake.openai_url}", pop=args.pop, gens=args.gens,
                           workers=args.workers, out=tmp, asynchronous=args.asynchronous)
        started = time.perf_counter()
        operators, close_operators = build_operators(config)
        store = RunStore.create(tmp, config.to_dict())
        engine = Engine(config, load_fitness(spec), operators, store)
        with make_executor(config, spec, log_path=Path(tmp) / "workers.log") as executor:
            ready = time.perf_counter()
            engine.run(executor)
        finished = time.perf_counter()
        close_operators()
        calls = store.llm_calls()
        evaluations = [r for _, r in store.evaluations() if r.status != "duplicate"]
        store.close()
    llm_seconds = sum(c["latency_s"] for c in calls)
    eval_seconds = sum(r.seconds for r in evaluations)
    serial = llm_seconds + eval_seconds
    loop, total = finished - ready, finished - started
    print(f"pop {args.pop}, gens {args.gens}, {args.workers} workers, server {args.latency:g} s/reply, "
          f"evaluation {EVAL_SECONDS:g} s, {'steady-state (--async)' if args.asynchronous else 'generational'}")
    print(f"{len(calls)} LLM calls ({llm_seconds:.1f} s), {len(evaluations)} evaluations ({eval_seconds:.1f} s): "
          f"serial sum {serial:.1f} s")
    print(f"generations: {loop:.1f} s = {loop / serial:.2f} x the serial sum "
          f"({loop / (args.gens + 1):.2f} s per generation)")
    print(f"evaluations alone on {args.workers} workers: {eval_seconds / args.workers:.1f} s; the run took "
          f"{loop / (eval_seconds / args.workers):.2f} x that")
    print(f"with worker start-up ({ready - started:.1f} s): {total:.1f} s = {total / serial:.2f} x the serial sum")


if __name__ == "__main__":
    main()
