"""Command line: ``python -m engine {run,evaluate,replay,show,list}``.

``main(argv)`` returns the exit code: 0 success, 1 a failed evaluation (``evaluate``),
2 bad input (flag, file, plug-in, run folder), 130 interrupted (everything finished is saved).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from engine.config import RunConfig, add_arguments, parse_option, resolve


class UsageError(Exception):
    """Bad input the user can fix; printed without a traceback."""


# -- progress -------------------------------------------------------------------------------------
class LiveProgress:
    """Live progress line (generation, evaluations, best and mean fitness, invalid rate,
    coverage, ETA) on stderr, and one logbook line per generation on stdout."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.out = Console(highlight=False)
        self.quiet = quiet
        self.done = 0
        self.invalid = 0
        self.generation = 0
        self.best = math.nan
        self.gen_scores: list[float] = []
        self.coverage = 0.0
        self.progress = Progress(
            TextColumn("gen {task.fields[gen]}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("best {task.fields[best]} mean {task.fields[mean]} invalid {task.fields[invalid]} "
                       "coverage {task.fields[coverage]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=True, disable=quiet,
        )
        self.task = self.progress.add_task("run", total=total, gen=0, best="-", mean="-", invalid="0%", coverage="0%")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, kind: str, payload: Any) -> None:
        if kind == "ask":
            self.generation = payload["generation"]
            self.gen_scores = []
        elif kind == "result":
            if payload.status != "duplicate":
                self.done += 1
            self.invalid += payload.status == "invalid"
            if payload.ok:
                self.gen_scores.append(payload.fitness)
                self.best = payload.fitness if math.isnan(self.best) else max(self.best, payload.fitness)
        elif kind == "generation":
            self.coverage = payload.get("coverage", 0.0)
            if not self.quiet:
                self.out.print(
                    f"gen {payload['gen']:>3}  evals {payload['evals']:>3}  ok {payload['ok']:>3}  "
                    f"invalid {payload['invalid']:>2}  max {_num(payload.get('max'))}  mean {_num(payload.get('mean'))}  "
                    f"best {_num(payload.get('best'))}  coverage {payload.get('coverage', 0):.3f}  "
                    f"qd {payload.get('qd_score', 0):.2f}",
                    soft_wrap=True,
                )
        mean = sum(self.gen_scores) / len(self.gen_scores) if self.gen_scores else math.nan
        self.progress.update(
            self.task, completed=self.done, gen=self.generation, best=_num(self.best), mean=_num(mean),
            invalid=f"{(self.invalid / self.done if self.done else 0):.0%}", coverage=f"{self.coverage:.0%}",
        )


def _num(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# -- commands -------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from archives.replay import render_summary, summarize
    from archives.store import RunStore
    from engine.engine import Engine
    from engine.executor import make_executor
    from engine.plugins import load_fitness, load_operator

    if args.resume:
        store = RunStore.open(args.resume)
        saved = store.meta("config")
        config = resolve(args, base=saved)
        for locked in ("fitness", "fitness_options", "eval_seed", "seed", "code_size_bins"):
            if getattr(config, locked) != saved.get(locked):
                raise UsageError(f"--{locked.replace('_', '-')} cannot change when resuming {args.resume} "
                                 f"(the run used {saved.get(locked)!r})")
        config.out = str(Path(args.resume))
        store.set_meta("config", config.to_dict())
    else:
        config = resolve(args)
        run_dir = config.run_dir()
        config.out = str(run_dir)
        store = None
    fitness = load_fitness(config.fitness, config.fitness_options)
    seeds = _checked_seeds(fitness)
    operators = [load_operator(spec.strip()) for spec in config.operator.split(",") if spec.strip()]
    if not operators:
        raise UsageError("--operator names no operator")
    if store is None:
        store = RunStore.create(config.out, config.to_dict())
    run_dir = Path(config.out)
    total = max(len(seeds), config.pop) + config.pop * config.gens
    progress = LiveProgress(total, quiet=args.quiet)
    engine = Engine(config, fitness, operators, store, on_event=progress)
    if args.resume:
        engine.restore()
        progress.done = sum(r.status != "duplicate" for r in engine.results.values())
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", RuntimeWarning)
            with make_executor(config, config.fitness, log_path=run_dir / "workers.log") as executor, progress:
                engine.run(executor)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished evaluation is saved in {run_dir}; continue with "
              f"python -m engine run --resume {run_dir}", file=sys.stderr)
        return 130
    summary = summarize(store)
    summary["wall_seconds"] = time.perf_counter() - started
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.quiet:
        render_summary(summary)
        print(f"run folder: {run_dir} (run.sqlite, archive.json, summary.json); "
              f"replay with: python -m engine replay {run_dir}")
    store.close()
    return 0


def _checked_seeds(fitness) -> list:
    from fitness.base import Seed

    try:
        seeds = list(fitness.seeds())
    except Exception as exc:
        raise UsageError(f"fitness {fitness.name!r}: seeds() failed: {type(exc).__name__}: {exc}") from exc
    for seed in seeds:
        if not isinstance(seed, Seed):
            raise UsageError(f"fitness {fitness.name!r}: seeds() must return fitness.Seed objects, got "
                             f"{type(seed).__name__}")
    return seeds


def cmd_evaluate(args: argparse.Namespace) -> int:
    from engine.executor import ProcessExecutor, SerialExecutor
    from engine.genome import GenomeError, check_genome
    from engine.plugins import load_fitness

    path = Path(args.code)
    try:
        code = path.read_text()
    except OSError as exc:
        raise UsageError(f"--code: cannot read {path}: {exc.strerror or exc}") from exc
    options = dict(args.fitness_options or [])
    fitness = load_fitness(args.fitness, options)  # fail fast, in this process, on a bad plug-in
    results = []
    try:
        check_genome(code, fitness.interface.arg_counts)
    except GenomeError as exc:
        from engine.candidate import EvalResult

        results.append(EvalResult(0, "invalid", error=str(exc)))
    if not results:
        if args.executor == "serial":
            executor = SerialExecutor(args.fitness, options)
        else:
            executor = ProcessExecutor(args.fitness, options, workers=1, timeout=args.timeout,
                                       memory_limit_gb=args.memory_limit_gb)
        with executor:
            executor.run([(0, code)], args.seed, None, results.append)
    result = results[0]
    payload = {"status": result.status, "fitness": result.fitness, "error": result.error,
               "metrics": result.metrics, "descriptors": result.descriptors, "seconds": result.seconds,
               "file": str(path), "fitness_name": fitness.name}
    if args.json:
        print(json.dumps(payload))
    else:
        print(f"{path}: {result.status}" + (f"  fitness {result.fitness:.4f}" if result.ok else f"  {result.error}"))
        for key, value in sorted(result.metrics.items()):
            print(f"  {key}: {value}")
    return 0 if result.ok else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from archives.replay import open_run, render_summary, summarize

    store = open_run(args.run)
    summary = summarize(store, top=args.top)
    store.close()
    if args.json:
        print(json.dumps(summary))
    else:
        render_summary(summary)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from archives.replay import open_run

    store = open_run(args.run)
    candidates = {c.id: c for c in store.candidates()}
    if args.id not in candidates:
        raise UsageError(f"{args.run} has no candidate {args.id} (ids 0..{max(candidates, default=-1)})")
    candidate = candidates[args.id]
    evaluations = [(name, r) for name, r in store.evaluations() if r.candidate_id == args.id]
    store.close()
    if args.json:
        print(json.dumps({**candidate.to_dict(), "evaluations": [{"fitness_name": n, **r.to_dict()} for n, r in evaluations]}))
        return 0
    from rich.console import Console
    from rich.syntax import Syntax

    console = Console()
    console.print(f"[bold]{candidate.id} {candidate.name}[/bold]  generation {candidate.generation}  "
                  f"operator {candidate.operator}  parents {list(candidate.parents) or '-'}")
    if candidate.thought:
        console.print(f"thought: {candidate.thought}")
    console.print(Syntax(candidate.code, "python"))
    for name, result in evaluations:
        line = f"{name}: {result.status}"
        line += f" fitness {result.fitness:.4f}" if result.ok else f" {result.error}"
        console.print(line + f" ({result.seconds:.2f} s)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from engine.plugins import available

    names = available()
    if args.json:
        print(json.dumps(names))
        return 0
    print("fitness plug-ins: " + ", ".join(names["fitness"]))
    print("operators:        " + ", ".join(names["operators"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Evolutionary search for loss functions.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evolve losses (or continue a run with --resume)")
    add_arguments(run)
    run.add_argument("--config", help="TOML file with run settings (flags override it)")
    run.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN")
    run.add_argument("--quiet", action="store_true", help="no progress or summary output")
    run.set_defaults(handler=cmd_run)

    evaluate = sub.add_parser("evaluate", help="score one loss file")
    evaluate.add_argument("--fitness", default=RunConfig.fitness)
    evaluate.add_argument("--fitness-opt", dest="fitness_options", action="append", default=None,
                          type=parse_option, metavar="KEY=VALUE")
    evaluate.add_argument("--code", required=True, help="file holding one loss function")
    evaluate.add_argument("--seed", type=int, default=RunConfig.eval_seed)
    evaluate.add_argument("--timeout", type=float, default=RunConfig.timeout)
    evaluate.add_argument("--memory-limit-gb", type=float, default=RunConfig.memory_limit_gb)
    evaluate.add_argument("--executor", choices=("process", "serial"), default=RunConfig.executor)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=cmd_evaluate)

    replay = sub.add_parser("replay", help="summarise a run")
    replay.add_argument("run")
    replay.add_argument("--json", action="store_true")
    replay.add_argument("--top", type=int, default=5)
    replay.set_defaults(handler=cmd_replay)

    show = sub.add_parser("show", help="print one candidate of a run")
    show.add_argument("run")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show)

    listing = sub.add_parser("list", help="name the fitness plug-ins and operators found")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    from archives.store import StoreError
    from engine.plugins import PluginError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, PluginError, StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
