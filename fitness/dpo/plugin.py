"""The ``dpo`` fitness plug-in: a candidate loss fine-tunes a language model with TRL's
``DPOTrainer`` and the result is scored (the DiscoPOP paper's inner loop, Lu et al. 2024,
arXiv:2406.08414, sec. 4: zephyr-7b-gemma-sft trained on argilla/dpo-mix-7k, scored by MT-Bench).

One evaluation: load the preference data (once per worker), load a fresh policy, build a
:class:`fitness.dpo.trainer.CandidateDPOTrainer` whose loss is the candidate (reference
log-probabilities from the on-disk cache, computed with the policy before training on a
miss), train, score with the chosen scorer, and release the model.

Where training runs is the ``launcher`` option: ``inprocess`` trains inside the evaluation
worker on one device; ``accelerate`` trains in ``num_processes`` ranks started by ``accelerate
launch`` (DDP, DeepSpeed ZeRO-3 or FSDP; :mod:`fitness.dpo.launcher`), which the 7B recipe
needs, and the worker then scores the saved policy. Both record failures the same way.

This plug-in still follows the first fitness contract (``evaluate`` only): training and scoring
run in the genome's process, so its results are marked ``unprotected``. The two-phase split
(docs/plugins.md) needs three things first: the held-out reference log-probabilities computed
where no genome runs (today they come from the on-disk reference cache, which the genome's
process can write), the held-out score computed outside the accelerate ranks (today rank 0
reports it), and MT-Bench judging in the driver, outside the jail, after generation from the
saved policy in a fresh process.
"""
from __future__ import annotations

import gc
import math
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Callable

from engine.genome import GenomeError
from fitness.base import Fitness, SandboxNeeds, Score, Seed
from fitness.dpo.data import check_local, is_local
from fitness.dpo.settings import DPOSettings, resolve_settings
from fitness.preference import PreferenceInterface, preference_seeds
from fitness.synthetic_pref import SyntheticPreference, loss_shape_descriptors

#: The lowest sensible fitness per scorer (the QD score counts from it): accuracy 0, an MT-Bench
#: rating of 1, a reward of -10 log-odds.
_FLOORS = {"heldout": 0.0, "mtbench": 1.0, "reward-model": -10.0}


class Training(NamedTuple):
    """A finished training run: the trainer (its model is the trained policy), TRL's train
    output and the seconds spent building the trainer and training."""

    trainer: Any
    result: Any
    setup_seconds: float
    train_seconds: float


def _require_packages() -> None:
    missing = []
    for package in ("trl", "transformers", "datasets", "accelerate"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise RuntimeError(f"the dpo fitness needs {', '.join(missing)}: pip install -e '.[dpo]' "
                           "(install torch first, pinned, as the README says)")


class DPOFitness(Fitness):
    """DPO fine-tuning through TRL with the candidate as the loss.

    Args:
        preset: ``tiny`` (default; CPU seconds), ``imdb-gpt2`` or ``zephyr-gemma-mtbench``.
        **options: Any field of :class:`fitness.dpo.settings.DPOSettings`, overriding the preset.
    """

    name = "dpo"
    interface = PreferenceInterface()
    baseline = "dpo"
    descriptor_space = SyntheticPreference.descriptor_space
    fitness_floor = 0.0

    def __init__(self, preset: str | None = None, **options: Any) -> None:
        self.preset = preset or "tiny"
        self.settings: DPOSettings = resolve_settings(self.preset, options)
        self.interface = PreferenceInterface(beta=self.settings.beta)
        self.fitness_floor = _FLOORS[self.settings.scorer]
        if is_local(self.settings.dataset):
            check_local(self.settings.dataset)
        if self.settings.scorer == "mtbench":
            # A judge without a key fails here, in the driver, not after hours of training.
            self._make_judge()
        self._data = None
        self._tokenizer = None
        self._reference_cache = None
        self._prepared = None  # tokenised data, kept across the candidates a worker scores

    def seeds(self) -> list[Seed]:
        return preference_seeds()

    def sandbox_needs(self) -> SandboxNeeds:
        """What the worker's jail must show: local model, tokenizer, data and scorer files
        read-only, the reference-log-probability cache writable. (The judge's key file never:
        judging runs outside the jail.)"""
        s = self.settings
        named = (s.model, s.tokenizer, s.dataset, s.reward_model, s.mtbench_questions, s.mtbench_references,
                 s.accelerate_config)
        local = tuple(str(Path(v).expanduser()) for v in named if v and Path(v).expanduser().exists())
        cache = s.resolved_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        return SandboxNeeds(read_only=local, writable=(str(cache),))

    def resources(self) -> dict[str, float]:
        """One evaluation's reservation: every GPU its training processes use (8 for the
        zephyr recipe), one GPU for a model that needs one in-process (imdb-gpt2), else a CPU
        (the tiny preset)."""
        s = self.settings
        if s.model == "tiny":
            # CPU seconds; with the accelerate launcher, one CPU per training process.
            return {"cpus": float(s.num_processes if s.launcher == "accelerate" else 1), "gpus": 0.0}
        if s.launcher == "accelerate":
            return {"cpus": float(s.num_processes), "gpus": float(s.num_processes)}
        return {"cpus": 1.0, "gpus": 1.0}

    def descriptors(self, fn: Callable) -> dict[str, float]:
        return loss_shape_descriptors(self.interface, fn)

    # -- pieces reused across the candidates a worker scores -----------------------------------
    def _make_judge(self):
        from fitness.dpo.mtbench import Judge, MTBenchError

        s = self.settings
        try:
            return Judge(s.judge, s.resolved_cache_dir() / "judge", temperature=s.judge_temperature,
                         max_tokens=s.judge_max_tokens, timeout=s.judge_timeout, retries=s.judge_retries,
                         api_key_file=s.judge_api_key_file)
        except MTBenchError as exc:
            raise ValueError(str(exc)) from exc

    def reference_cache(self):
        from fitness.dpo.reference_cache import ReferenceCache

        if self._reference_cache is None:
            self._reference_cache = ReferenceCache(self.settings.resolved_cache_dir())
        return self._reference_cache

    def data(self):
        from fitness.dpo.data import load_preference_data

        if self._data is None:
            self._data = load_preference_data(self.settings)
        return self._data

    def tokenizer(self):
        from fitness.dpo.models import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.settings)
        return self._tokenizer

    # -- training ---------------------------------------------------------------------------
    def training_arguments(self, output_dir: str, seed: int):
        """TRL's ``DPOConfig`` for ``settings`` (the reference is always precomputed)."""
        import torch
        from trl import DPOConfig

        s = self.settings
        return DPOConfig(
            output_dir=output_dir, seed=seed, beta=s.beta, learning_rate=s.learning_rate,
            num_train_epochs=s.epochs, max_steps=s.max_steps, per_device_train_batch_size=s.per_device_batch,
            per_device_eval_batch_size=s.per_device_batch, gradient_accumulation_steps=s.grad_accumulation,
            lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio, optim=s.optimizer,
            weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, bf16=s.precision == "bf16",
            fp16=s.precision == "fp16", activation_checkpointing=s.gradient_checkpointing, max_length=s.max_length,
            precompute_ref_log_probs=True, precompute_ref_batch_size=s.ref_batch_size,
            use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", eval_strategy="no",
            logging_steps=s.logging_steps, disable_tqdm=True, dataloader_num_workers=0,
        )

    def build_trainer(self, loss_fn: Callable, seed: int, output_dir: str, model=None):
        """A :class:`CandidateDPOTrainer` for the candidate ``loss_fn`` (four tensors -> losses)."""
        from datasets import Dataset

        from fitness.dpo.models import load_model
        from fitness.dpo.trainer import CandidateDPOTrainer

        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        data, tokenizer = self.data(), self.tokenizer()
        # The arguments come before the model: under an accelerate launch with DeepSpeed ZeRO-3
        # they switch on zero.Init, so each rank loads only its shard of the weights.
        args = self.training_arguments(output_dir, seed)
        model = model if model is not None else load_model(self.settings, tokenizer)
        if self._prepared is None:
            train, heldout = Dataset.from_list(data.train), Dataset.from_list(data.heldout)
        else:
            train, heldout = self._prepared["train"], self._prepared["eval"]
        trainer = CandidateDPOTrainer(
            model=model, args=args, processing_class=tokenizer,
            train_dataset=train, eval_dataset=heldout, preference_loss=loss_fn,
            reference_cache=self.reference_cache(), max_prompt_length=self.settings.max_prompt_length,
            tokenized=self._prepared,
        )
        self._prepared = dict(trainer.prepared)
        # Metrics go to the Score (and trainer.state.log_history), not to stdout: the CLI's
        # --json output and the worker log stay clean.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer

    def run_training(self, loss_fn: Callable, seed: int, output_dir: str) -> Training:
        """Build the trainer and train with ``loss_fn``; the same in the worker and in each rank
        of an accelerate launch.

        Raises:
            GenomeError: (status ``error``) when the training loss is not finite.
        """
        start = time.perf_counter()
        trainer = self.build_trainer(loss_fn, seed, output_dir)
        setup_seconds = time.perf_counter() - start
        result = trainer.train()
        train_seconds = time.perf_counter() - start - setup_seconds
        if not math.isfinite(result.training_loss):
            raise GenomeError(f"the training loss is not finite ({result.training_loss}) after "
                              f"{trainer.state.global_step} steps", status="error")
        return Training(trainer, result, setup_seconds, train_seconds)

    def trained_policy(self, seed: int, trainer=None, model=None):
        """What the scorers get: the trainer, or (trained in other processes) the loaded policy."""
        from fitness.dpo import scorers
        from fitness.dpo.models import load_model

        s = self.settings
        return scorers.TrainedPolicy(trainer, self.tokenizer(), self.data(), s, seed,
                                     lambda: load_model(s, self.tokenizer()), trained_model=model)

    def evaluate(self, fn: Callable, seed: int) -> Score:
        _require_packages()
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        if self.settings.launcher == "accelerate":
            return self._evaluate_launched(fn, seed)
        return self._evaluate_inprocess(fn, seed)

    def _evaluate_inprocess(self, fn: Callable, seed: int) -> Score:
        from fitness.dpo import scorers

        start = time.perf_counter()
        s = self.settings
        loss_fn = self.interface.bind(fn)
        judge = self._make_judge() if s.scorer == "mtbench" else None
        cache = self.reference_cache()
        hits, misses = cache.hits, cache.misses
        training = policy = None
        try:
            with tempfile.TemporaryDirectory(prefix="evoloss-dpo-") as output_dir:
                training = self.run_training(loss_fn, seed, output_dir)
                trainer = training.trainer
                policy = self.trained_policy(seed, trainer=trainer)
                # Held-out accuracy and margins are cheap: reported whatever the scorer.
                fitness, metrics = scorers.heldout(policy)
                fitness = self._generation_score(policy, judge, fitness, metrics)
                metrics.update(self.training_metrics(trainer, training.result))
                metrics.update({
                    "preset": self.preset, "scorer": s.scorer, "launcher": "inprocess",
                    "train_seconds": training.train_seconds, "setup_seconds": training.setup_seconds,
                    "seconds": time.perf_counter() - start,
                    "reference_cache_hits": cache.hits - hits, "reference_cache_misses": cache.misses - misses,
                    "reference_forwards": trainer.reference_forwards,
                })
                return Score(fitness=float(fitness), metrics=metrics)
        finally:
            if judge is not None:
                judge.close()
            # Release the policy (and its optimiser state) before the next candidate.
            training = trainer = policy = None
            self._release_memory()

    def _evaluate_launched(self, fn: Callable, seed: int) -> Score:
        """Train in ranks started by ``accelerate launch``; score the result here."""
        from fitness.dpo import launcher

        start = time.perf_counter()
        s = self.settings
        code = launcher.source_of(fn)
        self.interface.bind(fn)  # the parameter form is checked here, as in-process
        judge = self._make_judge() if s.scorer == "mtbench" else None
        policy = None
        try:
            with tempfile.TemporaryDirectory(prefix=launcher.FOLDER_PREFIX) as folder:
                outcome = launcher.launch(self.preset, s, code, seed, folder, save_policy=s.scorer != "heldout")
                fitness, metrics = outcome.fitness, dict(outcome.metrics)
                if s.scorer != "heldout":
                    # Generation runs here, on one device, as FastChat's MT-Bench answers do after
                    # the handbook's multi-GPU training: the ranks have exited and freed the GPUs.
                    policy = self.trained_policy(seed, model=launcher.load_policy(outcome.policy_dir, s))
                    fitness = self._generation_score(policy, judge, fitness, metrics)
                metrics.update({
                    "preset": self.preset, "scorer": s.scorer, "launcher": "accelerate",
                    "num_processes": s.num_processes, "distributed": s.distributed,
                    "launch_seconds": outcome.seconds, "seconds": time.perf_counter() - start,
                })
                return Score(fitness=float(fitness), metrics=metrics)
        finally:
            if judge is not None:
                judge.close()
            policy = None
            self._release_memory()

    def _generation_score(self, policy, judge, fitness: float, metrics: dict[str, Any]) -> float:
        """The reward-model or MT-Bench score (their metrics added to ``metrics``); for the
        heldout scorer, ``fitness`` unchanged."""
        from fitness.dpo import scorers

        scorer = self.settings.scorer
        if scorer == "reward-model":
            fitness, scored = scorers.reward_model(policy)
            metrics.update(scored)
        elif scorer == "mtbench":
            fitness, scored = scorers.mtbench(policy, judge)
            metrics.update(scored)
        return fitness

    @staticmethod
    def _release_memory() -> None:
        import torch

        if torch.cuda.is_available():
            gc.collect()  # the trainer holds reference cycles; a full collection takes ~0.2 s
            torch.cuda.empty_cache()

    @staticmethod
    def training_metrics(trainer, result) -> dict[str, Any]:
        """The run's steps and loss, and TRL's last logged reward metrics."""
        metrics: dict[str, Any] = {"train_steps": trainer.state.global_step, "train_loss": result.training_loss}
        for entry in trainer.state.log_history:
            for key, value in entry.items():
                if key.startswith(("rewards/", "logps/")) or key == "entropy":
                    metrics[f"train_{key.replace('/', '_')}"] = value
        return metrics
