"""Settings of the ``dpo`` fitness plug-in: one dataclass (the single source of defaults and
help text) and the presets, each a set of overrides of it.

Every field can be set from the CLI (``--fitness-opt beta=0.1``), a TOML file
(``[fitness_options]``) or Python (``DPOFitness(preset="tiny", beta=0.1)``); options given
with a preset override the preset's values.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.helpers import field_help

#: Scorers, by the name of the ``scorer`` option.
SCORERS = ("heldout", "mtbench", "reward-model")
PRECISIONS = ("fp32", "bf16", "fp16")
#: Where training runs: in the evaluation worker, or in ranks started by ``accelerate launch``.
LAUNCHERS = ("inprocess", "accelerate")
#: How the accelerate launcher spreads training over its processes.
STRATEGIES = ("ddp", "zero3", "fsdp")
#: The options that only mean something to the accelerate launcher.
LAUNCH_OPTIONS = ("num_processes", "distributed", "accelerate_config")


@dataclass(frozen=True)
class DPOSettings:
    """Everything one DPO evaluation needs. Field metadata holds the help text."""

    # -- model and data -------------------------------------------------------------------
    model: str = field(default="tiny", metadata=field_help(
        "policy (and reference) model: a Hugging Face model name or a local folder, loaded with "
        "AutoModelForCausalLM.from_pretrained; 'tiny' builds a small GPT-2 from a config with a "
        "locally trained tokenizer (CPU, seconds)"))
    model_revision: str | None = field(default=None, metadata=field_help("model revision (branch, tag or commit)"))
    tokenizer: str | None = field(default=None, metadata=field_help("tokenizer name or folder (default: the model's)"))
    chat_template: str | None = field(default=None, metadata=field_help(
        "Jinja chat template replacing the tokenizer's (for models without one)"))
    dataset: str = field(default="tiny-parity", metadata=field_help(
        "preference data: a Hugging Face dataset name, a local .json/.jsonl/.parquet file, or "
        "'tiny-parity' (generated pairs following a learnable rule)"))
    dataset_config: str | None = field(default=None, metadata=field_help("dataset configuration (subset) name"))
    train_split: str = field(default="train", metadata=field_help("split used for training"))
    heldout_split: str | None = field(default="test", metadata=field_help(
        "split holding held-out pairs; when missing (or for a local file) held-out pairs are taken "
        "from the training split"))
    train_size: int = field(default=0, metadata=field_help("training pairs used (0: all)"))
    heldout_size: int = field(default=256, metadata=field_help("held-out pairs scored by the heldout scorer"))
    data_seed: int = field(default=0, metadata=field_help(
        "seed of data sub-sampling and of the tiny model's initialisation; fixed across candidates so "
        "that every candidate sees the same data and reference"))

    # -- training (TRL DPOConfig / transformers TrainingArguments) ---------------------------
    beta: float = field(default=0.05, metadata=field_help("DPO beta, the value the loss sees as self.beta"))
    learning_rate: float = field(default=5e-7, metadata=field_help("peak learning rate"))
    epochs: float = field(default=2.0, metadata=field_help("training epochs"))
    max_steps: int = field(default=-1, metadata=field_help("stop after this many optimiser steps (-1: epochs decide)"))
    per_device_batch: int = field(default=2, metadata=field_help("pairs per device per forward pass"))
    grad_accumulation: int = field(default=8, metadata=field_help("gradient accumulation steps"))
    lr_scheduler: str = field(default="cosine", metadata=field_help("transformers learning-rate schedule name"))
    warmup_ratio: float = field(default=0.1, metadata=field_help("share of steps used for linear warm-up"))
    optimizer: str = field(default="adamw_torch", metadata=field_help("transformers optimiser name (optim)"))
    weight_decay: float = field(default=0.0, metadata=field_help("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=field_help("gradient clipping norm"))
    precision: str = field(default="bf16", metadata=field_help("fp32, bf16 or fp16 (mixed precision)"))
    model_dtype: str = field(default="float32", metadata=field_help(
        "dtype the model's weights are loaded in: float32 (master weights for bf16/fp16 mixed precision), "
        "bfloat16 or float16. Without DeepSpeed's fp32 master copy, AdamW on bf16 weights loses updates "
        "as small as lr 5e-7 gives"))
    gradient_checkpointing: bool = field(default=True, metadata=field_help("recompute activations to save memory"))
    max_length: int | None = field(default=1024, metadata=field_help("tokens per prompt+response (None: no limit)"))
    max_prompt_length: int | None = field(default=512, metadata=field_help(
        "prompt tokens kept when prompt+response exceeds max_length (the end of the prompt is kept and "
        "responses are cut to max_length - max_prompt_length, as TRL < 0.20 did; TRL 1.16 has no such "
        "option, so the plug-in applies it)"))
    ref_batch_size: int | None = field(default=None, metadata=field_help(
        "pairs per forward pass when computing reference log-probabilities (default: per_device_batch)"))
    logging_steps: int = field(default=10, metadata=field_help("optimiser steps between TRL metric logs"))

    # -- where training runs ------------------------------------------------------------------
    launcher: str = field(default="inprocess", metadata=field_help(
        "inprocess (train inside the genome's process, one device) or accelerate (write the loss to a "
        "temporary folder and train with `accelerate launch -m fitness.dpo.rank` over num_processes "
        "processes, which save the trained policy); either way the trusted phase scores the trained "
        "weights in the warm worker)"))
    num_processes: int = field(default=1, metadata=field_help(
        "training processes the accelerate launcher starts (one per GPU; on a machine without GPUs, CPU "
        "processes that synchronise over gloo)"))
    distributed: str = field(default="ddp", metadata=field_help(
        "how the accelerate launcher shares the work: ddp (a model copy per process), zero3 (DeepSpeed "
        "ZeRO-3: parameters, gradients and optimiser state sharded; needs `pip install deepspeed` and "
        "GPUs) or fsdp (PyTorch FSDP, full shard; GPUs)"))
    accelerate_config: str | None = field(default=None, metadata=field_help(
        "an accelerate config file used instead of the generated one (multi-node runs, offloading); it "
        "must agree with num_processes, precision, per_device_batch and grad_accumulation"))

    # -- scoring --------------------------------------------------------------------------
    scorer: str = field(default="heldout", metadata=field_help(
        "heldout (held-out preference accuracy and implicit reward margins; offline), mtbench "
        "(MT-Bench with an LLM judge) or reward-model (a classifier's reward and the KL to the reference)"))
    cache_dir: str | None = field(default=None, metadata=field_help(
        "folder for cached reference log-probabilities (default: $EVOLOSS_CACHE/dpo or "
        "~/.cache/evoloss/dpo); judge replies go to the folder beside it named <folder>-judge"))

    # MT-Bench
    mtbench_questions: str = field(default="HuggingFaceH4/mt_bench_prompts", metadata=field_help(
        "MT-Bench questions: FastChat's question.jsonl (a local file) or the Hugging Face mirror name"))
    mtbench_references: str | None = field(default=None, metadata=field_help(
        "FastChat reference answers (reference_answer/gpt-4.jsonl) for math, reasoning and coding; "
        "default: the questions' own 'reference' field"))
    mtbench_limit: int = field(default=0, metadata=field_help("score only the first N questions (0: all)"))
    judge: str = field(default="openai:gpt-4", metadata=field_help(
        "judge model: openai:MODEL, anthropic:MODEL, or openai:MODEL@URL / anthropic:MODEL@URL for a "
        "compatible server"))
    judge_repeats: int = field(default=1, metadata=field_help("judgments averaged per answer (judge noise)"))
    judge_temperature: float = field(default=0.0, metadata=field_help("judge sampling temperature (FastChat: 0)"))
    judge_max_tokens: int = field(default=2048, metadata=field_help("judge reply tokens (FastChat: 2048)"))
    judge_timeout: float = field(default=120.0, metadata=field_help("seconds per judge request"))
    judge_retries: int = field(default=6, metadata=field_help(
        "retries of a judge request on 429, 5xx, timeouts and connection errors (the client's backoff)"))
    judge_parse_retries: int = field(default=2, metadata=field_help(
        "extra judge calls when a reply has no [[rating]]; still none: the turn is left out and counted"))
    judge_api_key_file: str | None = field(default=None, metadata=field_help(
        "file holding the judge's API key (default: OPENAI_API_KEY or ANTHROPIC_API_KEY from the "
        "environment); the judge runs in the driver, and no evaluation worker sees either"))
    answer_max_new_tokens: int = field(default=1024, metadata=field_help("tokens per MT-Bench answer (FastChat: 1024)"))
    generation_batch_size: int = field(default=16, metadata=field_help("prompts generated at once"))

    # Reward model
    reward_model: str = field(default="lvwerra/distilbert-imdb", metadata=field_help(
        "sequence classifier scoring generations (name or folder)"))
    reward_label: str = field(default="POSITIVE", metadata=field_help(
        "the classifier's label to reward (name in id2label, or an index); reward = its log-odds"))
    reward_prompts: int = field(default=128, metadata=field_help("held-out prompts generated from"))
    reward_max_new_tokens: int = field(default=48, metadata=field_help("tokens generated per prompt"))
    kl_penalty: float = field(default=0.0, metadata=field_help(
        "fitness = mean reward - kl_penalty * KL(policy || reference); the KL is always reported"))

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"dpo option {name} must be {expected}, got {getattr(self, name)!r}")

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"an integer >= {low}")

        def number(name: str, low: float, *, open_low: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "a finite number")
            if value < low or (open_low and value == low):
                raise bad(name, f"{'>' if open_low else '>='} {low}")

        for name in ("model", "dataset", "train_split", "lr_scheduler", "optimizer", "mtbench_questions",
                     "judge", "reward_model", "reward_label"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise bad(name, "a non-empty string")
        for name in ("beta", "learning_rate"):
            number(name, 0.0, open_low=True)
        number("epochs", 0.0, open_low=True)
        for name in ("warmup_ratio", "weight_decay", "max_grad_norm", "judge_temperature", "kl_penalty"):
            number(name, 0.0)
        number("judge_timeout", 0.0, open_low=True)
        if not self.warmup_ratio < 1:  # transformers reads a float warmup_steps in [0, 1) as a ratio
            raise bad("warmup_ratio", "within [0, 1)")
        for name in ("per_device_batch", "grad_accumulation", "heldout_size", "judge_repeats", "judge_max_tokens",
                     "answer_max_new_tokens", "generation_batch_size", "reward_prompts", "reward_max_new_tokens",
                     "logging_steps"):
            integer(name, 1)
        for name in ("train_size", "data_seed", "mtbench_limit", "judge_retries", "judge_parse_retries"):
            integer(name, 0)
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or (
                self.max_steps < 1 and self.max_steps != -1):
            raise bad("max_steps", "a positive integer or -1")
        for name in ("max_length", "max_prompt_length", "ref_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise bad(name, "a positive integer or None")
        if self.max_length is not None and self.max_prompt_length is not None and \
                self.max_prompt_length >= self.max_length:
            raise ValueError(f"dpo option max_prompt_length ({self.max_prompt_length}) must be below "
                             f"max_length ({self.max_length})")
        if self.model_dtype not in ("float32", "bfloat16", "float16"):
            raise bad("model_dtype", "one of float32, bfloat16, float16")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {', '.join(PRECISIONS)}")
        if self.scorer not in SCORERS:
            raise bad("scorer", f"one of {', '.join(SCORERS)}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise bad("gradient_checkpointing", "true or false")
        if self.judge.partition(":")[0] not in ("openai", "anthropic") or ":" not in self.judge:
            raise bad("judge", "openai:MODEL, anthropic:MODEL, openai:MODEL@URL or anthropic:MODEL@URL")
        if self.launcher not in LAUNCHERS:
            raise bad("launcher", f"one of {', '.join(LAUNCHERS)}")
        if self.distributed not in STRATEGIES:
            raise bad("distributed", f"one of {', '.join(STRATEGIES)}")
        integer("num_processes", 1)
        if self.accelerate_config is not None and (not isinstance(self.accelerate_config, str)
                                                   or not self.accelerate_config.strip()):
            raise bad("accelerate_config", "a file path or None")
        if self.launcher == "inprocess" and (self.num_processes != 1 or self.distributed != "ddp"
                                             or self.accelerate_config is not None):
            raise ValueError(
                f"dpo options num_processes={self.num_processes}, distributed={self.distributed!r} and "
                f"accelerate_config={self.accelerate_config!r} need launcher=accelerate (in-process training is one "
                "process); set launcher=accelerate, or leave them at 1, ddp and None")

    def resolved_cache_dir(self) -> Path:
        """Where cached reference log-probabilities and judge replies live."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        if os.environ.get("EVOLOSS_CACHE"):
            return Path(os.environ["EVOLOSS_CACHE"]).expanduser() / "dpo"
        return Path.home() / ".cache" / "evoloss" / "dpo"

    def resolved_judge_cache_dir(self) -> Path:
        """Where the MT-Bench judge's replies are cached: beside :meth:`resolved_cache_dir`, not in
        it, because that one is writable inside the workers' jails and these are read by the driver."""
        cache = self.resolved_cache_dir()
        return cache.parent / f"{cache.name}-judge"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Presets: overrides of the dataclass defaults (which are the paper's training recipe).
PRESETS: dict[str, dict[str, Any]] = {
    # The DiscoPOP paper's inner loop (Lu et al. 2024, sec. 4 and app. D): the alignment-handbook
    # recipe for zephyr-7b-gemma (recipes/zephyr-7b-gemma/dpo/config_full.yaml), scored by MT-Bench.
    # The dataclass defaults are this recipe; the preset names them explicitly for the record.
    "zephyr-gemma-mtbench": {
        "model": "HuggingFaceH4/zephyr-7b-gemma-sft-v0.1",
        "dataset": "argilla/dpo-mix-7k",
        "train_split": "train",
        "heldout_split": "test",
        "beta": 0.05,
        "learning_rate": 5e-7,
        "epochs": 2.0,
        "per_device_batch": 2,
        "grad_accumulation": 8,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.1,
        "optimizer": "adamw_torch",
        "precision": "bf16",
        "gradient_checkpointing": True,
        "max_length": 1024,
        "max_prompt_length": 512,
        "scorer": "mtbench",
        "judge": "openai:gpt-4",
        # The paper trained on 8 A100s; the handbook's accelerate_configs/deepspeed_zero3.yaml.
        "launcher": "accelerate",
        "num_processes": 8,
        "distributed": "zero3",
    },
    # Positive-sentiment generation on IMDb (the DPO paper's sec. 6.1 frontier): GPT-2 fine-tuned
    # on IMDb as the SFT model, pairs labelled by the distilbert-imdb classifier (Bradley-Terry
    # sampled; dataset card of ZHZisZZ/imdb_preference), scored by that classifier's reward with
    # the KL to the reference reported.
    "imdb-gpt2": {
        "model": "lvwerra/gpt2-imdb",
        "dataset": "ZHZisZZ/imdb_preference",
        "train_split": "train",
        "heldout_split": "test",
        "train_size": 0,
        "beta": 0.1,
        "learning_rate": 1e-6,
        "epochs": 1.0,
        "per_device_batch": 8,
        "grad_accumulation": 8,
        "lr_scheduler": "constant_with_warmup",
        "warmup_ratio": 0.1,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "max_length": 256,
        "max_prompt_length": 128,
        "scorer": "reward-model",
        "reward_model": "lvwerra/distilbert-imdb",
        "reward_label": "POSITIVE",
        "reward_prompts": 256,
        "reward_max_new_tokens": 48,
    },
    # CPU seconds: tests and CI. A 2-layer GPT-2 built from a config and a tokenizer trained on
    # the spot, 256 generated pairs (32 steps), 128 held-out pairs.
    "tiny": {
        "model": "tiny",
        "dataset": "tiny-parity",
        "train_size": 256,
        "heldout_size": 128,
        "beta": 0.1,
        "learning_rate": 1e-3,
        "epochs": 1.0,
        "per_device_batch": 8,
        "grad_accumulation": 1,
        "lr_scheduler": "linear",
        "warmup_ratio": 0.0,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "max_length": 64,
        "max_prompt_length": 48,
        "scorer": "heldout",
        "answer_max_new_tokens": 16,
        "reward_max_new_tokens": 8,
        "reward_prompts": 16,
        "logging_steps": 8,
    },
}


def resolve_settings(preset: str | None, overrides: dict[str, Any]) -> DPOSettings:
    """The preset's settings with ``overrides`` applied.

    Raises:
        ValueError: for an unknown preset or a bad value (naming the option and the value).
        TypeError: for an unknown option (naming it and listing the known ones).
    """
    known = {f.name for f in dataclasses.fields(DPOSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"dpo: unknown option(s) {unknown}; known options: preset, {', '.join(sorted(known))}")
    if preset is None:
        preset = "tiny"
    if preset not in PRESETS:
        raise ValueError(f"dpo: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(DPOSettings)}
    preset_values = dict(PRESETS[preset])
    if str(overrides.get("launcher", "")).strip().lower() == "inprocess":
        # The launch options belong to the launcher: switching a multi-GPU preset to in-process
        # training drops the preset's, while ones the user gave still meet the check below.
        for name in LAUNCH_OPTIONS:
            preset_values.pop(name, None)
    values = {**preset_values, **overrides}
    for name, value in values.items():
        # The CLI and TOML have no null: "none" means None for the optional fields.
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and "None" in types[name]:
            values[name] = None
    return DPOSettings(**values)
