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


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class RunConfig:
    """Settings of one evolutionary run (the evolving state lives in :class:`engine.Engine`)."""

    fitness: str = field(default="synthetic-pref", metadata=_help(
        "fitness plug-in: a registered name, an entry point, path.py:Class or module:Class"))
    fitness_options: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "keyword options for the fitness plug-in (CLI: --fitness-opt KEY=VALUE, repeatable)"))
    operator: str = field(default="symbolic", metadata=_help(
        "operator(s) making offspring, comma-separated (e.g. symbolic)"))
    pop: int = field(default=8, metadata=_help("offspring per generation"))
    gens: int = field(default=12, metadata=_help("generations after the initial population"))
    cxpb: float = field(default=0.3, metadata=_help("probability that an offspring comes from crossover"))
    mutpb: float = field(default=0.6, metadata=_help(
        "probability that an offspring comes from mutation (the rest are fresh proposals)"))
    seed: int = field(default=0, metadata=_help("random seed of the run (operators, selection)"))
    eval_seed: int = field(default=0, metadata=_help(
        "seed passed to the fitness plug-in: every candidate is scored on the same problem instances"))
    out: str | None = field(default=None, metadata=_help(
        "run folder (created if missing); default runs/<fitness>-<timestamp>"))
    workers: int = field(default=2, metadata=_help("evaluation worker processes"))
    executor: str = field(default="process", metadata=_help(
        "process (isolated workers, the default) or serial (in-process, no isolation: debugging only)"))
    timeout: float = field(default=120.0, metadata=_help("wall-clock seconds allowed per evaluation"))
    memory_limit_gb: float = field(default=4.0, metadata=_help("address-space limit per worker in GiB"))
    tournament_size: int = field(default=3, metadata=_help("tournament size for parent selection"))
    hof_size: int = field(default=10, metadata=_help("hall-of-fame size"))
    max_attempts: int = field(default=10, metadata=_help(
        "tries per offspring slot when operators produce invalid or duplicate genomes"))
    code_size_bins: int = field(default=4, metadata=_help(
        "bins of the archive's code-size axis (0 drops the axis)"))

    def __post_init__(self) -> None:
        def positive(name: str, value: float) -> None:
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")

        for name in ("pop", "workers", "tournament_size", "hof_size", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            positive(name, value)
        if not isinstance(self.gens, int) or self.gens < 0:
            raise ValueError(f"gens must be a non-negative integer, got {self.gens!r}")
        positive("timeout", self.timeout)
        positive("memory_limit_gb", self.memory_limit_gb)
        for name in ("cxpb", "mutpb"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        if self.cxpb + self.mutpb > 1.0 + 1e-9:
            raise ValueError(
                f"cxpb + mutpb must be at most 1 (the rest are fresh proposals), got "
                f"{self.cxpb} + {self.mutpb} = {self.cxpb + self.mutpb:g}"
            )
        if self.executor not in ("process", "serial"):
            raise ValueError(f"executor must be 'process' or 'serial', got {self.executor!r}")
        if not isinstance(self.fitness_options, dict):
            raise ValueError(f"fitness_options must be a table of options, got {self.fitness_options!r}")
        if self.code_size_bins < 0:
            raise ValueError(f"code_size_bins must be >= 0, got {self.code_size_bins!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
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
        return Path("runs") / f"{self.fitness.replace(':', '_').replace('/', '_')}-{stamp}-{os.getpid()}"


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per RunConfig field. Defaults are ``None`` so that only flags the user
    set override the TOML file and the dataclass defaults."""
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.name == "fitness_options":
            parser.add_argument("--fitness-opt", dest="fitness_options", action="append", type=parse_option,
                                default=None, metavar="KEY=VALUE", help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(flag, dest=f.name, type=kind, default=None,
                            help=f"{help_text} (default: {default})")


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
    return RunConfig.from_dict(data)
