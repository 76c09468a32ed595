"""Command line: ``python -m engine {run,evaluate,replay,show,reevaluate,list,serve}``.

``main(argv)`` returns the exit code: 0 success, 1 a failed evaluation (``evaluate``),
2 bad input (flag, file, plug-in, run folder), 130 interrupted (everything finished is saved).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from engine.config import STORAGE, RunConfig, add_arguments, parse_option, resolve


class UsageError(Exception):
    """Bad input the user can fix; printed without a traceback."""


# -- progress -------------------------------------------------------------------------------------
class LiveProgress:
    """Live progress line (generation, evaluations, best and mean fitness, invalid rate,
    coverage, ETA) on stderr, and one logbook line per generation on stdout."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.out = Console(highlight=False)
        self.quiet = quiet
        self.done = 0
        self.invalid = 0
        self.generation = 0
        self.best = math.nan
        self.gen_scores: list[float] = []
        self.coverage = 0.0
        self.llm = ""
        self.promoted = 0  # evaluations on later fidelity stages: started, finished
        self.promoted_done = 0
        self.progress = Progress(
            TextColumn("gen {task.fields[gen]}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("best {task.fields[best]} mean {task.fields[mean]} invalid {task.fields[invalid]} "
                       "coverage {task.fields[coverage]}{task.fields[ladder]}{task.fields[llm]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=True, disable=quiet,
        )
        self.task = self.progress.add_task("run", total=total, gen=0, best="-", mean="-", invalid="0%", coverage="0%",
                                           llm="", ladder="")

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
        elif kind == "confirm":
            if not self.quiet:
                self.out.print(f"confirming the best on fresh seeds: {payload['evaluations']} evaluations")
        elif kind == "promote":
            self.promoted += len(payload["candidates"])
        elif kind == "stage_result":
            self.promoted_done += 1
        elif kind == "llm":
            self.llm = (f" llm {payload['calls']} calls {payload['tokens_in'] + payload['tokens_out']} tokens "
                        f"${payload['cost_usd']:.4f}")
        elif kind == "generation":
            self.coverage = payload.get("coverage", 0.0)
            self.generation = payload["gen"] + 1  # steady state: no "ask" per generation
            if not self.quiet:
                self.out.print(
                    f"gen {payload['gen']:>3}  evals {payload['evals']:>3}  ok {payload['ok']:>3}  "
                    f"invalid {payload['invalid']:>2}  max {_num(payload.get('max'))}  "
                    f"mean {_num(payload.get('mean'))}  "
                    f"best {_num(payload.get('best'))}  coverage {payload.get('coverage', 0):.3f}  "
                    f"qd {payload.get('qd_score', 0):.2f}" + (" " + self.llm.strip() if self.llm else ""),
                    soft_wrap=True,
                )
        mean = sum(self.gen_scores) / len(self.gen_scores) if self.gen_scores else math.nan
        self.progress.update(
            self.task, completed=self.done, gen=self.generation, best=_num(self.best), mean=_num(mean),
            invalid=f"{(self.invalid / self.done if self.done else 0):.0%}", coverage=f"{self.coverage:.0%}",
            llm=self.llm, ladder=f" promoted {self.promoted_done}/{self.promoted}" if self.promoted else "",
        )


def _num(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# -- commands -------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "jail_only", False):
        raise UsageError("--jail-only is for 'evaluate' only (testing the OS jail and the fresh process alone): a run "
                         "never turns the static check and the restricted namespaces off")
    from archives.store import RunStore

    if args.resume:
        store = RunStore.open(args.resume)
        saved = store.meta("config")
        saved.setdefault("truth_key", "public")  # a run made before truth keys drew public problems
        saved.setdefault("first_seeds", "run")  # and one made before generation seeds scored all on one seed
        # ... and one made before --validate-confirm-seeds confirmed on as many seeds as it validated on.
        saved.setdefault("validate_confirm_seeds", saved.get("validate_seeds", RunConfig.validate_seeds))
        config = resolve(args, base=saved)
        for locked in ("fitness", "fitness_options", "eval_seed", "seed", "code_size_bins", "asynchronous",
                       "promote", "promote_above", "promote_baseline", "truth_key", "first_seeds"):
            if getattr(config, locked) != saved.get(locked, getattr(RunConfig, locked, None)):
                flag = "async" if locked == "asynchronous" else locked.replace("_", "-")
                raise UsageError(f"--{flag} cannot change when resuming {args.resume} "
                                 f"(the run used {saved.get(locked)!r})")
        config.out = str(Path(args.resume))
        store.set_meta("config", config.to_dict())
    else:
        config = resolve(args)
        run_dir = config.run_dir()
        config.out = str(run_dir)
        store = None
    if not [spec for spec in config.operator.split(",") if spec.strip()]:
        raise UsageError("--operator names no operator")
    if config.executor == "ray":
        from engine.ray_executor import import_ray

        import_ray()  # a missing Ray is reported before the run folder is made
    from engine import jail

    jail.mark_not_dumpable()  # no process of this user reads the driver's environment (API keys)
    sandbox = jail.choose(config.sandbox)  # an explicit sandbox that cannot run here stops the run (exit 2)
    run_dir = Path(config.out)
    _use_truth_key(config.truth_key, run_dir if args.resume else None)
    with ExitStack() as cleanup:  # the workers and the operators, closed on every way out
        executor = _launch_workers(config, run_dir, sandbox, cleanup)
        code = _run(args, config, store, run_dir, sandbox, executor, cleanup)
    return code


def _use_truth_key(setting: str, run_dir: Path | None = None) -> None:
    """Make the key that ``--truth-key`` names (a run's own copy when ``run_dir`` has one) the
    key of this process and of the workers it starts (:mod:`fitness.truth`)."""
    from fitness import truth

    try:
        truth.use(truth.resolve(setting, run_dir))
    except truth.TruthKeyError as exc:
        raise UsageError(f"--truth-key: {exc}") from None


def _keep_truth_key(store, run_dir: Path) -> None:
    """Copy the key in effect into the run folder (so the run resumes and validates with it
    anywhere) and record which key it is."""
    from fitness import truth

    truth.keep_in_run(truth.key_file(), run_dir)
    store.set_meta("truth_key", truth.key_id(truth.key_file()))


def _launch_workers(config, run_dir: Path, sandbox, cleanup: ExitStack):
    """The process executor's workers, started before anything else: they boot (torch, the
    plug-ins) while the driver imports the plug-ins itself and prepares the run. Their jail's
    view is a guess until the driver knows the plug-ins' needs (:meth:`ProcessExecutor.confirm`
    keeps them only if it was right). None for the other executors."""
    if config.executor != "process":
        return None
    from engine.executors import make_executor

    executor = make_executor(config, log_path=run_dir / "workers.log", sandbox=sandbox)
    cleanup.callback(executor.close)
    executor.launch(speculative=True)
    return executor


def _run(args, config, store, run_dir: Path, sandbox, executor, cleanup: ExitStack) -> int:
    """``run`` once the workers are booting: the plug-ins, the operators, the run store, the
    search and the end-of-run validation."""
    # Imported here: they import torch (about a second), which the workers import meanwhile.
    from archives.replay import render_summary, summarize
    from archives.store import RunStore
    from engine.assembly import build_operators, build_stages
    from engine.engine import Engine
    from engine.executor import plugin_resources
    from engine.executors import make_executor
    from engine.ladder import check_compatible

    stages = build_stages(config)
    try:
        check_compatible(stages)
        resources = plugin_resources(stages)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    fitness = stages[0]
    seeds = _checked_seeds(fitness)
    # LLM operators are checked here (key, server, model folder), before the run folder is made.
    operators, close_operators = build_operators(config, fitness.interface)
    cleanup.callback(close_operators)
    # The workers serve every fidelity stage and, last, the end-of-run validation's held-out stage.
    validation = _validation_stage(config, fitness)
    fitness_spec = [(s.spec, s.options) for s in config.stages()] + validation
    if executor is None:
        executor = make_executor(config, fitness_spec=fitness_spec, log_path=run_dir / "workers.log",
                                 resources=resources, sandbox=sandbox)
        cleanup.callback(executor.close)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        executor.confirm(fitness_spec, plugins=stages)  # the plug-ins' real needs: workers kept or started again
        if not args.quiet:
            print(sandbox.describe(), file=sys.stderr)
        if store is None:
            store = RunStore.create(config.out, config.to_dict())
        _keep_truth_key(store, run_dir)
        store.set_meta("sandbox", {"requested": sandbox.requested, "kind": sandbox.kind, "reason": sandbox.reason})
        total = config.planned_candidates(len(seeds))
        progress = LiveProgress(total, quiet=args.quiet)
        engine = Engine(config, stages, operators, store, on_event=progress)
        if args.resume:
            engine.restore()
            progress.done = sum(r.status != "duplicate" for r in engine.results.values())
        started = time.perf_counter()
        with warnings.catch_warnings(), _interrupts(engine, config.interrupt, progress):
            warnings.simplefilter("always", RuntimeWarning)
            with executor, progress:
                engine.run(executor)
                if not engine.draining and validation:
                    _validate(config, store, validation[0], executor, len(stages), args.quiet, engine)
        if engine.draining:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished evaluation is saved in {run_dir}; continue with "
              f"python -m engine run --resume {run_dir}", file=sys.stderr)
        return 130
    finally:
        cleanup.close()  # the workers exit now, before the summary is written
    if engine.stop_reason:
        print(f"stopped after generation {engine.generation - 1}: {engine.stop_reason}. Everything is saved in "
              f"{run_dir}; to go on, raise the budget and resume: python -m engine run --resume {run_dir} "
              "--max-llm-calls N --max-cost-usd USD", file=sys.stderr)
    summary = summarize(store)
    summary["wall_seconds"] = time.perf_counter() - started
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.quiet:
        render_summary(summary)
        print(f"run folder: {run_dir} (run.sqlite, archive.json, summary.json); "
              f"replay with: python -m engine replay {run_dir}")
    store.close()
    return 0


def _validation_stage(config, fitness) -> list[tuple[str, dict]]:
    """The end-of-run validation's stage, ``[(spec, options)]``: held-out tasks for the first
    stage's plug-in (:func:`engine.validation.held_out_stage`); empty when the run validates nothing."""
    if config.validate_top < 1 or config.validate_seeds < 1:
        return []
    from engine.validation import held_out_stage

    stage = config.stages()[0]
    return [held_out_stage(fitness, stage.spec, stage.options)]


def _validate(config, store, held_out: tuple[str, dict], executor, stage: int, quiet: bool, engine=None) -> None:
    """The end-of-run validation (:mod:`engine.validation`): the top losses and the baseline on
    held-out tasks and fresh seeds, on the executor's validation stage."""
    from archives.reading import read_run
    from engine.plugins import load_fitness
    from engine.validation import ValidationSettings, validate

    spec, options = held_out
    fitness = load_fitness(spec, options)

    settings = config.cut(ValidationSettings)
    if not quiet:
        print(f"validating the top {settings.validate_top} losses on {fitness.name} "
              f"{options or ''} with {settings.validate_seeds} fresh seeds...", file=sys.stderr)

    def stop_when_draining(result, seed) -> None:
        if engine is not None and engine.draining:
            raise KeyboardInterrupt  # Ctrl-C: what finished is saved; --resume scores the rest

    validate(store, read_run(store), executor, settings, fitness.name, options, fitness.fitness_floor,
             on_result=stop_when_draining, stage=stage)


@contextmanager
def _interrupts(engine, mode: str, progress) -> Iterator[None]:
    """Ctrl-C while a run is going: with ``--interrupt drain`` the first one lets running
    evaluations finish (saved as usual) and starts nothing new; the next one, or the first with
    ``--interrupt cancel``, stops everything at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        if mode == "drain" and not engine.draining:
            engine.draining = True
            progress.console.print("Ctrl-C: letting the running evaluations finish and starting no new ones; "
                                   "Ctrl-C again stops them now")
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    if args.preset is not None:
        options["preset"] = args.preset
    fitness = load_fitness(args.fitness, options)  # fail fast, in this process, on a bad plug-in
    if args.jail_only:
        if args.executor == "serial":
            raise UsageError("--jail-only tests the OS jail and the fresh process per genome: it needs --executor "
                             "process")
        print("WARNING: --jail-only (testing only): the static check and the restricted namespaces are OFF; the "
              "genome runs as plain Python, held only by the OS jail and its own process", file=sys.stderr)
    from engine import jail
    from fitness import truth

    jail.mark_not_dumpable()
    _use_truth_key(args.truth_key)
    sandbox = jail.choose(args.sandbox) if args.executor != "serial" else \
        jail.Sandbox("none", "--executor serial evaluates in this process", requested=args.sandbox)
    print(sandbox.describe(), file=sys.stderr)
    results = []
    try:
        if not args.jail_only:
            check_genome(code, fitness.interface.arg_counts)
    except GenomeError as exc:
        from engine.candidate import EvalResult

        results.append(EvalResult(0, "invalid", error=str(exc)))
    if not results:
        if args.executor == "serial":
            executor = SerialExecutor(args.fitness, options)
        else:
            executor = ProcessExecutor(args.fitness, options, workers=1, timeout=args.timeout,
                                       memory_limit_gb=args.memory_limit_gb, sandbox=sandbox,
                                       allow_host_network=args.allow_host_network,
                                       check_timeout=args.check_timeout, jail_only=args.jail_only)
        from engine.judging import Judging

        executor = Judging(executor, args.fitness, options)  # a plug-in's judge phase runs here, outside the jail
        with executor:
            executor.run([(0, code)], args.seed, None, results.append)
    result = results[0]
    payload = {"status": result.status, "fitness": result.fitness, "error": result.error,
               "metrics": result.metrics, "descriptors": result.descriptors, "seconds": result.seconds,
               "file": str(path), "fitness_name": fitness.name, "sandbox": sandbox.kind,
               "static_check": not args.jail_only, "truth_key": truth.key_id(truth.key_file())}
    if args.json:
        from engine.helpers import finite

        print(json.dumps(finite(payload)))  # one valid JSON line, even with non-finite metrics
    else:
        print(f"{path}: {result.status}" + (f"  fitness {result.fitness:.4f}" if result.ok else f"  {result.error}"))
        for key, value in sorted(result.metrics.items()):
            print(f"  {key}: {value}")
    return 0 if result.ok else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from archives.reading import read_run
    from archives.replay import open_run, render_summary, summarize

    if args.export and args.export[0] not in ("csv", "parquet"):
        raise UsageError(f"--export: format must be csv or parquet, got {args.export[0]!r}")
    store = open_run(args.run)
    try:
        data = read_run(store, args.at_gen)
    finally:
        store.close()
    summary = summarize(None, top=args.top, data=data)
    if args.json:
        print(json.dumps(summary))
    else:
        render_summary(summary, detail=True, max_rows=args.rows)
    if args.export or args.plots:
        _replay_files(args, data)
    return 0


def _replay_files(args: argparse.Namespace, data) -> None:
    """``replay --export`` and ``--plots``; file lists go to stderr so ``--json`` stays clean."""
    from archives.analysis import Run

    run = Run(data)
    try:
        if args.export:
            fmt, directory = args.export
            written = run.export(directory, fmt)
            print(f"exported {', '.join(p.name for p in written)} to {directory}", file=sys.stderr)
        if args.plots:
            from archives.plots import write_plots

            written, notes = write_plots(run, args.plots, top=args.top)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"plots: {', '.join(str(p) for p in written) or 'none'}", file=sys.stderr)
    except ImportError as exc:
        raise UsageError(str(exc)) from exc


def cmd_show(args: argparse.Namespace) -> int:
    from archives.reading import read_run
    from archives.replay import candidate_report, open_run, render_candidate

    store = open_run(args.run)
    try:
        data = read_run(store)
    finally:
        store.close()
    if args.id not in data.candidates:
        raise UsageError(f"{args.run} has no candidate {args.id} (ids 0..{max(data.candidates, default=-1)})")
    report = candidate_report(data, args.id)
    if args.json:
        print(json.dumps(report))
    else:
        render_candidate(report)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from archives.reading import read_run
    from archives.replay import render_validation
    from archives.store import RunStore
    from engine.executors import make_executor
    from engine.plugins import load_fitness
    from engine.validation import ValidationSettings, held_out_stage, validate

    if args.top < 1 or args.seeds < 1:
        raise UsageError(f"--top and --seeds must be positive, got {args.top} and {args.seeds}")
    store = RunStore.open(args.run)
    try:
        data = read_run(store)
        saved = RunConfig.from_dict({"truth_key": "public",  # a run made before truth keys
                                     **{k: v for k, v in data.config.items() if k in RunConfig.__dataclass_fields__}})
        _use_truth_key(saved.truth_key, data.path)
        stage = saved.stages()[0]
        spec = args.fitness or stage.spec
        options = dict(args.fitness_options or []) if args.fitness else dict(stage.options)
        fitness = load_fitness(spec, options)
        if not args.fitness:
            spec, options = held_out_stage(fitness, spec, options)
            fitness = load_fitness(spec, options)
        config = RunConfig(fitness=spec, fitness_options=options, executor=args.executor, workers=args.workers,
                           timeout=args.timeout, eval_seed=saved.eval_seed)
        # A run stored before the setting confirmed on as many seeds as it validated on.
        confirm = args.confirm_seeds if args.confirm_seeds is not None else data.config.get(
            "validate_confirm_seeds", args.seeds)
        if confirm < 0:
            raise UsageError(f"--confirm-seeds must be non-negative, got {confirm}")
        settings = ValidationSettings(validate_top=args.top, validate_seeds=args.seeds,
                                      validate_confirm_seeds=confirm, eval_seed=saved.eval_seed)
        with make_executor(config, fitness_spec=[(spec, options)], log_path=data.path / "workers.log") as executor:
            summary = validate(store, data, executor, settings, fitness.name, options, fitness.fitness_floor)
    finally:
        store.close()
    if summary is None:
        raise UsageError(f"{args.run} has no scored loss to validate")
    if args.json:
        print(json.dumps(summary))
    else:
        render_validation(summary)
    return 0


def cmd_reevaluate(args: argparse.Namespace) -> int:
    from archives.reading import read_run
    from archives.store import RunStore
    from engine.executors import make_executor
    from engine.plugins import load_fitness
    from engine.helpers import fitness_label
    from engine.reevaluate import choose, reevaluate

    if not (args.top or args.elites or args.ids):
        raise UsageError("say which losses to re-score: --top K, --elites or --ids 3,7")
    if args.top is not None and args.top < 1:
        raise UsageError(f"--top must be positive, got {args.top}")
    try:
        ids = [int(i) for i in args.ids.split(",") if i.strip()] if args.ids else None
    except ValueError as exc:
        raise UsageError(f"--ids: expected comma-separated candidate ids, got {args.ids!r}") from exc
    options = dict(args.fitness_options or [])
    store = RunStore.open(args.run)
    try:
        data = read_run(store)
        _use_truth_key(data.config.get("truth_key", "public"), data.path)  # the run's own problems' key
        fitness = load_fitness(args.fitness, options)  # fail fast, in this process, on a bad plug-in
        label = args.label or fitness_label(fitness.name, options, args.seed)
        if label == data.fitness_name:
            raise UsageError(f"{label!r} is the fitness the run was scored on; pass another --fitness, a "
                             "--fitness-opt, a --seed or a --label")
        seed = args.seed if args.seed is not None else int(data.config.get("eval_seed", 0))
        chosen = choose(data, top=args.top, elites=args.elites, ids=ids)
        done = data.extra.get(label, {})
        todo = [c for c in chosen if c.id not in done or (args.retry_failed and not done[c.id].ok)]
        if not chosen:
            raise UsageError(f"{args.run} has no scored loss to re-evaluate")
        history = store.meta("reevaluations", {}) or {}
        history[label] = {"fitness": args.fitness, "fitness_name": fitness.name, "fitness_options": options,
                          "seed": seed, "time": time.time()}
        store.set_meta("reevaluations", history)
        if len(todo) < len(chosen) and not args.json:
            print(f"{len(chosen) - len(todo)} of {len(chosen)} already scored on {label}; scoring {len(todo)}")
        config = RunConfig(fitness=args.fitness, fitness_options=options, executor=args.executor,
                           workers=args.workers, timeout=args.timeout, memory_limit_gb=args.memory_limit_gb)

        def report(result) -> None:
            if not args.json:
                candidate = data.candidates[result.candidate_id]
                score = f"{result.fitness:.4f}" if result.ok else f"{result.status}: {result.error}"
                print(f"{candidate.id} {candidate.name}: {data.fitness_name} {_num(data.fitness_of(candidate.id))}  "
                      f"{label} {score}", flush=True)

        results = []
        if todo:
            with make_executor(config, args.fitness, log_path=data.path / "workers.log") as executor:
                results = reevaluate(store, label, todo, executor, seed, on_result=report)
    finally:
        store.close()
    by_id = {**done, **{r.candidate_id: r for r in results}}
    if args.json:
        print(json.dumps({"label": label, "seed": seed, "scored": len(results), "rows": [
            {"id": c.id, "name": c.name, "fitness": data.fitness_of(c.id), "other_status": by_id[c.id].status,
             "other_fitness": by_id[c.id].fitness, "error": by_id[c.id].error}
            for c in chosen if c.id in by_id
        ]}))
    else:
        print(f"stored {len(results)} score(s) on {label} in {data.path}; compare with: python -m engine replay "
              f"{data.path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from engine.doctor import run_doctor

    return run_doctor(args.sandbox, as_json=args.json)


def cmd_list(args: argparse.Namespace) -> int:
    from engine.plugins import available, describe

    if args.json:
        print(json.dumps(available()))
        return 0
    about = describe()
    column = 16
    for title, key in (("fitness plug-ins", "fitness"), ("operators", "operators")):
        print(f"{title}:")
        for name, line in about[key]:
            # A long name (an operator family's forms) gets its own line, its description the next.
            print(f"  {name:<{column}}  {line}" if len(name) <= column else f"  {name}\n  {'':<{column}}  {line}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # The web stack is imported here only: other commands never pay for it.
    from archives.dashboard import require_web_stack, serve

    try:
        require_web_stack()
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    if not Path(args.runs).exists():
        raise UsageError(f"{args.runs} does not exist: pass a run folder or a folder of runs")
    serve(args.runs, host=args.host, port=args.port, open_browser=args.open)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Evolutionary search for loss functions.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evolve losses (or continue a run with --resume)")
    storage = add_arguments(run)[STORAGE]
    storage.add_argument("--config", help="TOML file with run settings (flags override it)")
    storage.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN")
    run.add_argument("--quiet", action="store_true", help="no progress or summary output")
    run.add_argument("--jail-only", action="store_true", help=argparse.SUPPRESS)  # refused: evaluate only
    run.set_defaults(handler=cmd_run)

    evaluate = sub.add_parser("evaluate", help="score one loss file")
    evaluate.add_argument("--fitness", default=RunConfig.fitness)
    evaluate.add_argument("--fitness-opt", dest="fitness_options", action="append", default=None,
                          type=parse_option, metavar="KEY=VALUE")
    evaluate.add_argument("--preset", default=None, metavar="NAME", help="the fitness plug-in's preset")
    evaluate.add_argument("--code", required=True, help="file holding one loss function")
    evaluate.add_argument("--seed", type=int, default=RunConfig.eval_seed)
    evaluate.add_argument("--timeout", type=float, default=RunConfig.timeout)
    evaluate.add_argument("--check-timeout", type=float, default=RunConfig.check_timeout,
                          help="seconds for the contract checks before training (see run --help)")
    evaluate.add_argument("--jail-only", action="store_true",
                          help="testing only: turn the static check and restricted namespaces off, so the genome "
                               "runs as plain Python inside the OS jail and its fresh process (run refuses it)")
    evaluate.add_argument("--memory-limit-gb", type=float, default=RunConfig.memory_limit_gb)
    evaluate.add_argument("--executor", choices=("process", "serial"), default=RunConfig.executor)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--sandbox", choices=("auto", "bwrap", "unshare", "none"), default=RunConfig.sandbox,
                          help="the worker's OS jail (see run --help)")
    evaluate.add_argument("--allow-host-network", action="store_true",
                          help="give the worker the host's network if the plug-in declares it needs it")
    evaluate.add_argument("--truth-key", default=RunConfig.truth_key, metavar="machine|public|FILE",
                          help="what seeds a generated problem's truth (see run --help)")
    evaluate.set_defaults(handler=cmd_evaluate)

    replay = sub.add_parser("replay", help="summarise a run: best losses, archive, generations, operators, "
                                           "failures, LLM cost; plots and export")
    replay.add_argument("run")
    replay.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    replay.add_argument("--top", type=int, default=5, help="best losses listed (and drawn in the loss-shape plot)")
    replay.add_argument("--at-gen", type=int, default=None, metavar="N", help="the run as it was after generation N")
    replay.add_argument("--rows", type=int, default=20, help="rows shown per long table")
    replay.add_argument("--plots", metavar="DIR", help="write PNG figures into DIR")
    replay.add_argument("--export", nargs=2, metavar=("FORMAT", "DIR"),
                        help="write the run's tables into DIR as csv or parquet")
    replay.set_defaults(handler=cmd_replay)

    show = sub.add_parser("show", help="print one candidate of a run")
    show.add_argument("run")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show)

    reeval = sub.add_parser("reevaluate", help="re-score a run's best losses on another fitness plug-in or preset")
    reeval.add_argument("run")
    reeval.add_argument("--fitness", required=True, help="the other fitness: a name, path.py:Class or module:Class")
    reeval.add_argument("--fitness-opt", dest="fitness_options", action="append", default=None,
                        type=parse_option, metavar="KEY=VALUE")
    which = reeval.add_mutually_exclusive_group()
    which.add_argument("--top", type=int, default=None, metavar="K", help="the K best losses of the run")
    which.add_argument("--elites", action="store_true", help="every elite of the run's archive")
    which.add_argument("--ids", help="comma-separated candidate ids")
    reeval.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's)")
    reeval.add_argument("--label", help="name the scores are stored under (default: plug-in name and options)")
    reeval.add_argument("--retry-failed", action="store_true", help="score again losses that failed on it before")
    reeval.add_argument("--executor", choices=("process", "serial"), default=RunConfig.executor)
    reeval.add_argument("--workers", type=int, default=RunConfig.workers)
    reeval.add_argument("--timeout", type=float, default=RunConfig.timeout)
    reeval.add_argument("--memory-limit-gb", type=float, default=RunConfig.memory_limit_gb)
    reeval.add_argument("--json", action="store_true", help="print one JSON object")
    reeval.set_defaults(handler=cmd_reevaluate)

    check = sub.add_parser("validate", help="re-score a run's top losses and its baseline on held-out tasks and "
                                            "fresh seeds (what every run does at its end; or on another fitness)")
    check.add_argument("run")
    check.add_argument("--fitness", default=None, help="the fitness to validate on (default: the run's own, on its "
                                                       "held-out part where the plug-in has one)")
    check.add_argument("--fitness-opt", dest="fitness_options", action="append", default=None,
                       type=parse_option, metavar="KEY=VALUE")
    check.add_argument("--top", type=int, default=RunConfig.validate_top, metavar="K", help="losses to validate")
    check.add_argument("--seeds", type=int, default=RunConfig.validate_seeds, help="fresh evaluation seeds")
    check.add_argument("--confirm-seeds", type=int, default=None, metavar="N",
                       help="more fresh seeds on which the best of them and the baseline are measured again, its "
                            "reported gain (default: the run's --validate-confirm-seeds)")
    check.add_argument("--executor", choices=("process", "serial"), default=RunConfig.executor)
    check.add_argument("--workers", type=int, default=RunConfig.workers)
    check.add_argument("--timeout", type=float, default=RunConfig.timeout)
    check.add_argument("--json", action="store_true", help="print the validation as one JSON object")
    check.set_defaults(handler=cmd_validate)

    doctor = sub.add_parser("doctor", help="say which OS jail workers get here, and run hostile probes through it")
    doctor.add_argument("--sandbox", choices=("auto", "bwrap", "unshare", "none"), default=RunConfig.sandbox)
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(handler=cmd_doctor)

    listing = sub.add_parser("list", help="the fitness plug-ins and operators found, one line about each")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)

    serve = sub.add_parser("serve", help="a live web dashboard over a run or a folder of runs (read-only)")
    serve.add_argument("runs", nargs="?", default="runs", metavar="RUN | RUNS_DIR",
                       help="a run folder or a folder of runs (default: runs)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--open", action="store_true", help="open the dashboard in a web browser")
    serve.set_defaults(handler=cmd_serve)
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
