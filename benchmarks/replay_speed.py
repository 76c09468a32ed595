"""Replay speed on a large run: ``python -m engine replay RUN`` must print in under 3 s for a
run with 5,000 evaluations.

The run store is generated with direct inserts (no training): 50 generations of 100
preference-form candidates with synthetic-pref's descriptor space plus the code-size axis,
about 10% invalid and 3% failed evaluations with varied messages, LLM calls for a third of
the candidates, generation records and the ``archive.json`` the engine would have written.
Then ``replay`` (text and ``--json``), ``replay --at-gen`` (the archive rebuilt from the
evaluations) and ``archives.load_run`` are timed as fresh processes (wall clock, best and
median of ``--repeats``).

Usage: python benchmarks/replay_speed.py [--evaluations 5000] [--repeats 3] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archives.elites import write_elites  # noqa: E402
from archives.reading import rebuild_elites  # noqa: E402
from archives.store import RunStore  # noqa: E402
from engine.candidate import Candidate, EvalResult  # noqa: E402
from engine.config import RunConfig  # noqa: E402

SPACE = [
    {"name": "slope_at_zero", "low": -2.0, "high": 1.0, "bins": 6, "help": ""},
    {"name": "nonconvex_share", "low": 0.0, "high": 0.3, "bins": 5, "help": ""},
    {"name": "left_tail_growth", "low": -2.0, "high": 4.0, "bins": 6, "help": ""},
    {"name": "code_size", "low": 0, "high": 240, "bins": 4, "help": ""},
]
TERMS = ["-F.logsigmoid({a} * z)", "torch.relu(1 - {a} * z)", "torch.exp(-{a} * z)", "(z - {a}) ** 2",
         "torch.sigmoid(-{a} * z)", "F.softplus(-{a} * z)", "torch.tanh(-{a} * z)"]
ERRORS = [
    ("invalid", "line {n}: name 'np' is not allowed in a loss function"),
    ("invalid", "returned shape ({n},) for a batch of 7; expected (7,)"),
    ("invalid", "raised ZeroDivisionError: float division by zero"),
    ("invalid", "syntax error on line {n}: invalid syntax"),
    ("error", "the loss became non-finite (nan or inf) at training step {n}"),
    ("timeout", "the evaluation took longer than 120 s"),
]


def genome(rng: random.Random, cid: int) -> str:
    terms = [rng.choice(TERMS).format(a=round(rng.uniform(0.2, 3.0), 2)) for _ in range(rng.randint(1, 6))]
    weights = [round(rng.uniform(0.1, 1.0), 2) for _ in terms]
    body = " + ".join(f"{w} * {t}" for w, t in zip(weights, terms))
    return (f"def loss_{cid}(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, "
            "reference_rejected_logps):\n"
            "    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - "
            "reference_rejected_logps)\n"
            "    z = self.beta * logits\n"
            f"    return {body}\n")


def build(run_dir: Path, evaluations: int, per_generation: int = 100, seed: int = 0) -> None:
    rng = random.Random(seed)
    gens = max(1, evaluations // per_generation)
    config = RunConfig(pop=per_generation, gens=gens - 1, out=str(run_dir)).to_dict()
    store = RunStore.create(run_dir, config)
    store.set_meta("fitness_name", "synthetic-pref")
    store.set_meta("baseline", "dpo")
    store.set_meta("descriptor_space", SPACE)
    candidates: dict[int, Candidate] = {}
    results: dict[int, EvalResult] = {}
    best = -1.0
    elites: list = []
    for generation in range(gens):
        batch = []
        for _ in range(per_generation):
            cid = len(candidates)
            parents = tuple(rng.sample(range(cid), k=min(cid, rng.choice((0, 1, 1, 2)))))
            operator = "seed" if generation == 0 and cid < 8 else rng.choice(
                ("symbolic:mutate", "symbolic:crossover", "openai:gpt-4o:mutate", "openai:gpt-4o:propose"))
            name = "dpo" if cid == 0 else f"loss_{cid}"
            candidate = Candidate(cid, name, genome(rng, cid), f"thought {cid}", parents if operator != "seed" else (),
                                  operator, generation, f"{cid:016x}")
            roll = rng.random()
            if roll < 0.13:
                status, message = rng.choice(ERRORS)
                result = EvalResult(cid, status, error=message.format(n=rng.randint(1, 99)), seconds=0.5)
            else:
                fitness = rng.gauss(0.3 + 0.004 * generation, 0.15)
                result = EvalResult(
                    cid, "ok", fitness,
                    {"reward_gain": fitness * 1.2, "kl": rng.uniform(0, 2), "train_accuracy": rng.uniform(0.5, 1),
                     "per_instance": [fitness] * 4, "seconds": 1.0},
                    {"slope_at_zero": rng.uniform(-2, 1), "nonconvex_share": rng.uniform(0, 0.3),
                     "left_tail_growth": rng.uniform(-2, 4)},
                    f"fp{cid}", seconds=rng.uniform(0.8, 1.5))
            candidates[cid] = candidate
            results[cid] = result
            batch.append((candidate, result))
        store.add_candidates([c for c, _ in batch])
        store._db.execute("BEGIN")
        for candidate, result in batch:
            store.add_evaluation(result, "synthetic-pref")
            if candidate.operator.startswith("openai"):
                store._db.execute(
                    "INSERT INTO llm_calls (candidate_id, operator, model, kind, attempt, generation, prompt, reply, "
                    "tokens_in, tokens_out, latency_s, cost_usd, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (candidate.id, "openai:gpt-4o", "gpt-4o", "mutate", 1, generation,
                     json.dumps([{"role": "user", "content": "x" * 2000}]), candidate.code, 2500, 300, 3.2, 0.009,
                     time.time()))
        store._db.execute("COMMIT")
        scores = [r.fitness for _, r in batch if r.ok]
        best = max(best, *scores)
        # The archive as the engine keeps it; rebuilt every 10 generations to keep this quick.
        if generation % 10 == 9 or generation == gens - 1:
            elites = rebuild_elites(SPACE, candidates, results)
        record = {"gen": generation, "evals": len(batch), "ok": len(scores),
                  "invalid": sum(r.status == "invalid" for _, r in batch),
                  "failed": sum(r.status in ("error", "timeout") for _, r in batch), "duplicates": 0,
                  "max": max(scores), "mean": statistics.fmean(scores), "min": min(scores),
                  "std": statistics.pstdev(scores), "best": best, "elites": len(elites), "cells": 720,
                  "coverage": len(elites) / 720, "qd_score": sum(e["fitness"] + 1 for e in elites)}
        store.finish_generation(generation, record, {"rng": [0], "counters": {"hash_duplicates": 3 * generation}})
    store.close()
    write_elites(run_dir, [{**e, "code": candidates[e["id"]].code} for e in elites],
                 {"generation": gens - 1, "fitness": "synthetic-pref", "elites": len(elites)})


def timed(command: list[str], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", help="build the run in this folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(args.keep) if args.keep else Path(scratch) / "run"
        start = time.perf_counter()
        build(run_dir, args.evaluations)
        print(f"built {run_dir} with {args.evaluations} evaluations in {time.perf_counter() - start:.1f} s")
        python = sys.executable
        middle = max(0, args.evaluations // 100 // 2)
        for label, command in (
            ("replay RUN", [python, "-m", "engine", "replay", str(run_dir)]),
            ("replay RUN --json", [python, "-m", "engine", "replay", str(run_dir), "--json"]),
            (f"replay RUN --at-gen {middle} (archive rebuilt)",
             [python, "-m", "engine", "replay", str(run_dir), "--at-gen", str(middle)]),
            ("python -c 'load_run(RUN)' (pandas)",
             [python, "-c", f"from archives import load_run; load_run({str(run_dir)!r})"]),
        ):
            best, median = timed(command, args.repeats)
            verdict = ""
            if label == "replay RUN":
                verdict = "  (target < 3 s: met)" if median < 3 else "  (target < 3 s: MISSED)"
            print(f"{label:<48} best {best:.2f} s  median {median:.2f} s{verdict}")


if __name__ == "__main__":
    main()
