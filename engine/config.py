"""Run settings: one dataclass is the single source of defaults for the CLI and TOML files.

Each field's ``metadata["help"]`` is its documentation; :func:`add_arguments` turns the fields
into argparse flags, :func:`load_toml` checks a TOML file against them, and
``RunConfig.__post_init__`` validates values with messages that show the bad value.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.helpers import field_help as _help
from engine.ladder import StageSpec, parse_fitness, split_options

#: The concerns ``run --help`` groups the flags by: each field's ``metadata["group"]`` is one of
#: these titles, and :func:`add_arguments` makes one argparse group per title, in this order.
SEARCH = "search"
OPERATORS = "operators and LLM"
FITNESS = "fitness and ladder"
EXECUTION = "execution and sandbox"
STORAGE = "storage and resume"
GROUPS: dict[str, str] = {
    SEARCH: "population, generations, variation, selection and noise-aware ranking",
    OPERATORS: "what makes offspring, what operators are shown, LLM requests and budgets",
    FITNESS: "the fitness plug-in or ladder, its options and data, promotion between stages",
    EXECUTION: "workers, executors, deadlines, memory and the OS jail",
    STORAGE: "the run folder, TOML settings and resuming",
}


@dataclass
class RunConfig:
    """Settings of one evolutionary run (the evolving state lives in :class:`engine.Engine`)."""

    fitness: str | list[str] = field(default="pref-suite", metadata=_help(
        "fitness plug-in: a registered name, an entry point, path.py:Class or module:Class; or a fidelity "
        "ladder, cheapest first: 'synthetic-pref>dpo' (a list in TOML); see --promote. The default, pref-suite, "
        "selects on its meta-train tasks and validates on its meta-test tasks (docs/trust.md says why not "
        "synthetic-pref's single task)", group=FITNESS))
    fitness_options: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "keyword options for the fitness plug-in (CLI: --fitness-opt KEY=VALUE, repeatable; with a ladder "
        "STAGE.KEY=VALUE for one stage, KEY=VALUE for the last)", group=FITNESS))
    data_dir: str | None = field(default=None, metadata=_help(
        "data folder of a data-backed fitness plug-in (cifar10: the folder holding cifar-10-batches-py, or that "
        "folder itself), passed as its data_dir option to every stage that takes one; --fitness-opt data_dir=... "
        "wins for its stage (unset: the plug-in's own default, EVOLOSS_DATA for cifar10)", group=FITNESS,
        metavar="DIR"))
    promote: float = field(default=0.25, metadata=_help(
        "with a fidelity ladder: the fraction of a stage's successfully scored candidates promoted to the "
        "next stage (per generation; with --async, the top fraction of all scores on the stage so far)", group=FITNESS))
    promote_baseline: bool = field(default=True, metadata=_help(
        "with a fidelity ladder: also score the plug-in's baseline seed (e.g. DPO) on every stage it passes "
        "successfully, so each stage has a reference to compare with (--no-promote-baseline: rank alone)",
        negative="--no-promote-baseline", group=FITNESS))
    promote_above: float | None = field(default=None, metadata=_help(
        "with a fidelity ladder: promote only candidates scoring at least this on their stage (combined "
        "with --promote; --promote 1 makes it a pure threshold)", group=FITNESS))
    operator: str = field(default="symbolic", metadata=_help(
        "operator(s) making offspring, comma-separated: symbolic, openai:MODEL, openai:MODEL@URL, "
        "anthropic:MODEL, anthropic:MODEL@URL, hf:PATH, replay:RUN, path.py:Class, module:Class", group=OPERATORS))
    operator_choice: str = field(default="bandit", metadata=_help(
        "how an operator is picked per offspring when several are given: bandit (sliding-window "
        "Thompson sampling on recent valid rate and fitness gain), ucb (sliding-window UCB1) or uniform",
        group=OPERATORS))
    bandit_window: int = field(default=50, metadata=_help(
        "outcomes per operator the bandit remembers (older ones are forgotten)", group=OPERATORS))
    strategy: str = field(default="population", metadata=_help(
        "population (pop offspring per generation from the archive) or sequential (the DiscoPOP "
        "paper's single chain: one proposal per generation with the whole history in context)", group=SEARCH))
    context_best: int = field(default=5, metadata=_help(
        "best elites shown to operators (LLM prompts)", group=OPERATORS))
    context_diverse: int = field(default=3, metadata=_help(
        "elites from distant archive cells shown to operators besides the best", group=OPERATORS))
    context_order: str = field(default="ascending", metadata=_help(
        "order of the elites in prompts: ascending (best last, nearest the question) or descending", group=OPERATORS))
    context_errors: int = field(default=3, metadata=_help(
        "recent failures (with their errors) shown in prompts", group=OPERATORS))
    llm_retries: int = field(default=3, metadata=_help(
        "re-prompts with the error ('Code not valid. Error: ...') when a reply has no valid code", group=OPERATORS))
    llm_check: str = field(default="tests", metadata=_help(
        "what a reply must pass before it is accepted: tests (static check and the interface's unit "
        "tests, run in an isolated process unless --executor serial) or static", group=OPERATORS))
    llm_timeout: float = field(default=120.0, metadata=_help("seconds allowed per LLM request", group=OPERATORS))
    llm_http_retries: int = field(default=4, metadata=_help(
        "retries of one LLM request on 429, 5xx, timeouts and connection errors (exponential "
        "backoff, honouring Retry-After; the official clients' own machinery)", group=OPERATORS))
    llm_concurrency: int = field(default=8, metadata=_help("LLM requests in flight at once", group=OPERATORS))
    llm_temperature: float = field(default=0.7, metadata=_help(
        "sampling temperature of LLM operators", group=OPERATORS))
    llm_max_tokens: int = field(default=2048, metadata=_help("maximum tokens per LLM reply", group=OPERATORS))
    llm_prices: str | None = field(default=None, metadata=_help(
        "TOML file of model prices in USD per million tokens (model = {input = 2.5, output = 10}), "
        "overriding the built-in table", group=OPERATORS))
    max_llm_calls: int = field(default=0, metadata=_help(
        "stop the run after this many LLM calls, keeping everything (0: no limit)", group=OPERATORS))
    max_cost_usd: float = field(default=0.0, metadata=_help(
        "stop the run once the estimated LLM cost reaches this many USD (0: no limit)", group=OPERATORS))
    operator_failure_limit: int = field(default=3, metadata=_help(
        "an operator that fails this many times in a row sits out the rest of the generation", group=OPERATORS))
    pop: int = field(default=8, metadata=_help("offspring per generation", group=SEARCH))
    gens: int = field(default=12, metadata=_help("generations after the initial population", group=SEARCH))
    asynchronous: bool = field(default=False, metadata=_help(
        "steady-state search (--async): a new offspring is made the moment a worker frees up, its parents "
        "drawn from the archive as it stands; --pop then counts evaluations per logbook generation",
        flag="--async", group=SEARCH))
    max_evals: int = field(default=0, metadata=_help(
        "stop after this many candidates have been evaluated (on the first fidelity stage), in either mode "
        "(0: --pop and --gens decide)", group=SEARCH))
    cxpb: float = field(default=0.3, metadata=_help("probability that an offspring comes from crossover", group=SEARCH))
    mutpb: float = field(default=0.6, metadata=_help(
        "probability that an offspring comes from mutation (the rest are fresh proposals)", group=SEARCH))
    seed: int = field(default=0, metadata=_help("random seed of the run (operators, selection)", group=SEARCH))
    eval_seed: int = field(default=0, metadata=_help(
        "seed passed to the fitness plug-in: every candidate is scored on the same problem instances", group=FITNESS))
    truth_key: str = field(default="machine", metadata=_help(
        "what seeds a generated problem's truth (synthetic-pref, pref-suite, cls-suite): machine (a random key "
        "made once for you in ~/.local/share/evoloss/truth.key and copied into the run folder; a genome that got "
        "past the sandbox cannot rebuild the true reward or test split from the seed), public (the seed alone: "
        "the same problems on every machine, as in docs/, and rebuildable) or a key file", group=FITNESS,
        metavar="machine|public|FILE"))
    out: str | None = field(default=None, metadata=_help(
        "run folder (created if missing); default runs/<fitness>-<timestamp>", group=STORAGE))
    workers: int = field(default=2, metadata=_help("evaluation worker processes", group=EXECUTION))
    executor: str = field(default="process", metadata=_help(
        "process (isolated workers, the default), ray (isolated workers on a local Ray instance or a "
        "cluster: pip install 'evoloss[ray]') or serial (in-process, no isolation: debugging only)", group=EXECUTION))
    ray_address: str | None = field(default=None, metadata=_help(
        "with --executor ray: the cluster to join (auto, or ray://host:port); unset starts a local Ray "
        "instance with --workers x --cpus-per-eval CPUs", group=EXECUTION))
    cpus_per_eval: float | None = field(default=None, metadata=_help(
        "with --executor ray: CPUs each evaluation reserves (unset: what the fitness plug-in asks for, "
        "usually 1)", group=EXECUTION))
    gpus_per_eval: float | None = field(default=None, metadata=_help(
        "with --executor ray: GPUs each evaluation reserves, a fraction such as 0.5 shares a GPU (unset: what "
        "the fitness plug-in asks for)", group=EXECUTION))
    timeout: float = field(default=120.0, metadata=_help("wall-clock seconds allowed per evaluation", group=EXECUTION))
    check_timeout: float = field(default=10.0, metadata=_help(
        "wall-clock seconds allowed for a genome's contract checks, fingerprint and descriptors (tiny inputs: a "
        "loss that hangs there is stopped at this deadline, not after --timeout); training then gets --timeout",
        group=EXECUTION))
    interrupt: str = field(default="drain", metadata=_help(
        "what Ctrl-C does: drain (start nothing new, let running evaluations finish and save them, then stop; "
        "a second Ctrl-C cancels them) or cancel (stop running evaluations at once); --resume goes on either way",
        group=EXECUTION))
    memory_limit_gb: float = field(default=4.0, metadata=_help(
        "address-space limit per worker in GiB; 0 turns it off (CUDA reserves huge address ranges, so GPU "
        "runs need 0 and rely on the timeout and the GPU's own memory)", group=EXECUTION))
    sandbox: str = field(default="auto", metadata=_help(
        "OS jail of every evaluation worker: auto (the strongest that works here: bwrap, else unshare, else none "
        "with a warning), bwrap (bubblewrap), unshare (util-linux) or none (no jail: warns); see docs/security.md",
        group=EXECUTION))
    allow_host_network: bool = field(default=False, metadata=_help(
        "give evaluation workers the host's network when the fitness plug-in declares that it needs it "
        "(multi-node training); never implied", group=EXECUTION))
    tournament_size: int = field(default=3, metadata=_help("tournament size for parent selection", group=SEARCH))
    hof_size: int = field(default=10, metadata=_help("hall-of-fame size", group=SEARCH))
    max_attempts: int = field(default=10, metadata=_help(
        "tries per offspring slot when operators produce invalid or duplicate genomes", group=SEARCH))
    code_size_bins: int = field(default=4, metadata=_help(
        "bins of the archive's code-size axis (0 drops the axis)", group=SEARCH))
    selection: str = field(default="archive", metadata=_help(
        "where parents come from: archive (every MAP-Elites elite, DEAP tournament; the default), "
        "truncation (uniformly from the --pop best by their noise-aware bound), or for ablations random "
        "(any scored candidate, fitness unused); the archive is kept and shown to operators whichever is "
        "chosen", group=SEARCH))
    race_seeds: int = field(default=3, metadata=_help(
        "noise-aware selection: extra evaluation seeds a candidate that could reach the top gets before it is "
        "trusted (re-measured 1, then 2 more...; each paired with the baseline seed on the same seeds); elites, "
        "parents and the best are then ranked by a lower confidence bound, not one draw (0: off; generational "
        "mode)", group=SEARCH))
    first_seeds: str = field(default="generation", metadata=_help(
        "where a candidate is first scored: generation (each generation's offspring on an evaluation seed of "
        "their own, the baseline measured on it too, so selection never climbs one seed's draw; raced "
        "population runs) or run (every candidate on --eval-seed)", group=SEARCH))
    race_budget: int = field(default=8, metadata=_help(
        "re-measurements on fresh seeds per generation, the baseline's included (at 4, the reported best of "
        "pref-suite runs mostly had 2 seeds and its bound overstated its score on fresh meta-train seeds; "
        "docs/trust.md)", group=SEARCH))
    race_top: int = field(default=5, metadata=_help(
        "how many of the best the re-measurements try to make sure of", group=SEARCH))
    confirm_seeds: int = field(default=4, metadata=_help(
        "at the end of a raced run, measure its --race-top best and the baseline on this many more fresh seeds, "
        "which chose nothing, before its best is reported (racing chooses on the seeds it measures on, so the "
        "best bounds are partly luck there; 0: off)", group=SEARCH))
    validate_top: int = field(default=5, metadata=_help(
        "at the end of the run, re-score this many of the best distinct losses and the baseline seed on the "
        "plug-in's held-out tasks (a task suite's meta-test split; else the same task) and fresh seeds, and "
        "report each held-out gain over the baseline with its standard error (0: no validation)", group=SEARCH))
    validate_seeds: int = field(default=4, metadata=_help(
        "fresh evaluation seeds of the end-of-run validation", group=SEARCH))
    validate_confirm_seeds: int = field(default=8, metadata=_help(
        "more fresh seeds on which the validation's best and the baseline are measured again: the reported gain "
        "and the verdict are from these alone, which chose nothing (the best of several on the validation seeds "
        "is biased upwards; 0: report it on those)", group=SEARCH))
    confidence: float = field(default=1.0, metadata=_help(
        "standard errors below the mean paired gain at which candidates are ranked (the lower confidence bound)",
        group=SEARCH))

    def __post_init__(self) -> None:
        def positive(name: str, value: float) -> None:
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")

        for name in ("validate_top", "validate_seeds", "confirm_seeds", "validate_confirm_seeds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("race_budget", "race_top"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.race_seeds, int) or isinstance(self.race_seeds, bool) or self.race_seeds < 0:
            raise ValueError(f"race_seeds must be a non-negative integer, got {self.race_seeds!r}")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) or self.confidence < 0:
            raise ValueError(f"confidence must be a number >= 0, got {self.confidence!r}")
        for name in ("pop", "workers", "tournament_size", "hof_size", "max_attempts", "bandit_window",
                     "llm_concurrency", "llm_max_tokens", "operator_failure_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            positive(name, value)
        if not isinstance(self.gens, int) or self.gens < 0:
            raise ValueError(f"gens must be a non-negative integer, got {self.gens!r}")
        positive("timeout", self.timeout)
        positive("check_timeout", self.check_timeout)
        if self.memory_limit_gb < 0:
            raise ValueError(f"memory_limit_gb must be >= 0 (0: no limit), got {self.memory_limit_gb!r}")
        for name in ("cxpb", "mutpb"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        if self.cxpb + self.mutpb > 1.0 + 1e-9:
            raise ValueError(
                f"cxpb + mutpb must be at most 1 (the rest are fresh proposals), got "
                f"{self.cxpb} + {self.mutpb} = {self.cxpb + self.mutpb:g}"
            )
        if self.executor not in ("process", "ray", "serial"):
            raise ValueError(f"executor must be 'process', 'ray' or 'serial', got {self.executor!r}")
        for name in ("cpus_per_eval", "gpus_per_eval"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.cpus_per_eval == 0 and self.gpus_per_eval == 0:
            raise ValueError("cpus_per_eval and gpus_per_eval cannot both be 0: an evaluation must reserve something")
        parse_fitness(self.fitness)
        if not 0.0 < self.promote <= 1.0:
            raise ValueError(f"promote must be a fraction in (0, 1], got {self.promote!r}")
        for name in ("asynchronous", "promote_baseline", "allow_host_network"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.max_evals, int) or isinstance(self.max_evals, bool) or self.max_evals < 0:
            raise ValueError(f"max_evals must be a non-negative integer (0: no limit), got {self.max_evals!r}")
        if self.asynchronous and self.strategy == "sequential":
            raise ValueError("--async and --strategy sequential do not go together: the sequential chain waits "
                             "for each result by design")
        if not isinstance(self.fitness_options, dict):
            raise ValueError(f"fitness_options must be a table of options, got {self.fitness_options!r}")
        if self.code_size_bins < 0:
            raise ValueError(f"code_size_bins must be >= 0, got {self.code_size_bins!r}")
        choices = {"operator_choice": ("bandit", "ucb", "uniform"), "strategy": ("population", "sequential"),
                   "selection": ("archive", "truncation", "random"), "first_seeds": ("generation", "run"),
                   "context_order": ("ascending", "descending"), "llm_check": ("tests", "static"),
                   "interrupt": ("drain", "cancel"), "sandbox": ("auto", "bwrap", "unshare", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("context_best", "context_diverse", "context_errors", "llm_retries", "llm_http_retries",
                     "max_llm_calls"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        positive("llm_timeout", self.llm_timeout)
        if self.llm_temperature < 0:
            raise ValueError(f"llm_temperature must be >= 0, got {self.llm_temperature!r}")
        if self.max_cost_usd < 0:
            raise ValueError(f"max_cost_usd must be >= 0 (0: no limit), got {self.max_cost_usd!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cut(self, settings_class):
        """The small frozen settings a component reads (a dataclass whose fields are a subset of
        this one's, with the same names), cut from these settings."""
        return settings_class(**{f.name: getattr(self, f.name) for f in dataclasses.fields(settings_class)})

    def planned_candidates(self, seeds: int) -> int | float:
        """How many candidates the run makes in all: the initial population (at least the
        ``seeds`` seed losses) and ``pop`` per generation (one per generation with the sequential
        strategy), or ``max_evals`` when that is fewer. Both drivers and the progress bar use it."""
        if self.strategy == "sequential":
            total = max(seeds, 1) + self.gens
        else:
            total = max(seeds, self.pop) + self.pop * self.gens
        return min(total, self.max_evals) if self.max_evals else total

    def stages(self) -> list[StageSpec]:
        """The fidelity stages (one unless ``fitness`` is a ladder), each a
        :class:`engine.ladder.StageSpec` with its own options."""
        stages = split_options(parse_fitness(self.fitness), self.fitness_options)
        return stages if self.data_dir is None else with_data_dir(stages, self.data_dir)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**data)

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        import time

        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = "-".join(parse_fitness(self.fitness)).replace(":", "_").replace("/", "_")
        return Path("runs") / f"{name}-{stamp}-{os.getpid()}"


def with_data_dir(stages: list[StageSpec], data_dir: str) -> list[StageSpec]:
    """The stages with ``data_dir`` among the options of each plug-in that takes a ``data_dir``
    option (an option already set for a stage is kept). At least one stage must take it."""
    from engine.plugins import fitness_takes

    takes = [fitness_takes(stage.spec, "data_dir") for stage in stages]
    if not any(takes):
        names = ", ".join(repr(stage.spec) for stage in stages)
        raise ValueError(f"--data-dir: fitness {names} takes no data folder (no data_dir option); the flag is "
                         "for data-backed plug-ins such as cifar10")
    return [StageSpec(stage.spec, {"data_dir": str(data_dir), **stage.options}) if take else stage
            for stage, take in zip(stages, takes)]


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML config; keys are RunConfig fields (a ``[fitness_options]`` table allowed)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ValueError(f"--config: file {str(path)!r} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config: {path} is not valid TOML: {exc}") from exc
    data = data.get("run", data)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {unknown}; known settings: {sorted(known)}")
    return data


def parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def add_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """Add one flag per RunConfig field, in one argument group per concern (:data:`GROUPS`, from
    each field's ``metadata["group"]``); returns the groups by title, so that a command can add
    its own flags to them. Defaults are ``None`` so that only flags the user set override the
    TOML file and the dataclass defaults."""
    groups = {title: parser.add_argument_group(title, description) for title, description in GROUPS.items()}
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("group") not in groups:
            raise TypeError(f"RunConfig.{f.name}: its metadata needs group= one of {', '.join(GROUPS)}")
        group = groups[f.metadata["group"]]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.name == "fitness_options":
            group.add_argument("--fitness-opt", dest="fitness_options", action="append", type=parse_option,
                               default=None, metavar="KEY=VALUE", help=help_text)
            group.add_argument("--preset", dest="preset", default=None, metavar="NAME",
                               help="the fitness plug-in's preset (same as --fitness-opt preset=NAME)")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = f.metadata.get("flag", flag)
        if str(f.type) == "bool":
            if "negative" in f.metadata:  # on by default: the flag turns it off
                group.add_argument(f.metadata["negative"], dest=f.name, action="store_const", const=False,
                                   default=None, help=help_text)
            else:
                group.add_argument(flag, dest=f.name, action="store_const", const=True, default=None,
                                   help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).removesuffix(" | None"), str)
        group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.metadata.get("metavar"),
                           help=f"{help_text} (default: {default})")
    return groups


def resolve(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < ``base`` (TOML file or a resumed run's config) < flags set on the CLI."""
    data: dict[str, Any] = dict(base or {})
    config_path = getattr(args, "config", None)
    if config_path:
        data.update(load_toml(config_path))
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "fitness_options":
            options = dict(data.get("fitness_options", {}))
            options.update(dict(value))
            value = options
        data[f.name] = value
    preset = getattr(args, "preset", None)
    if preset is not None:
        data["fitness_options"] = {**data.get("fitness_options", {}), "preset": preset}
    return RunConfig.from_dict(data)
