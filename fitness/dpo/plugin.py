"""The ``dpo`` fitness plug-in: a candidate loss fine-tunes a language model with TRL's
``DPOTrainer`` and the result is scored (the DiscoPOP paper's inner loop, Lu et al. 2024,
arXiv:2406.08414, sec. 4: zephyr-7b-gemma-sft trained on argilla/dpo-mix-7k, scored by MT-Bench).

The plug-in follows the two-phase fitness contract (docs/plugins.md):

* ``prepare`` (the warm worker, no genome code): loads the pairs, keeping the held-out ones
  only in :attr:`held_out` (wiped in the genome's process), the tokenizer and the shapes of
  the model's weights.
* ``train`` (the genome's process, in the jail): a fresh policy is trained by a
  :class:`fitness.dpo.trainer.CandidateDPOTrainer` whose loss is the candidate, on the training
  pairs only (their reference log-probabilities from the on-disk cache, computed with the
  policy before training on a miss). It returns the trained model's state dict and a training
  report as artefacts, validated by name, shape and dtype (:meth:`artefact_spec`).
* ``score`` (the warm worker after the genome's process has exited, or a fresh process forked
  from it for GPU presets): a freshly built model computes the held-out pairs' reference
  log-probabilities (kept in memory in :attr:`held_out`, never in the on-disk cache the
  genome's process can write), gets the trained weights, and is scored: held-out accuracy and
  margins always, then the reward model, or the MT-Bench answers generated here.
* ``judge`` (the driver, outside every jail; only for the ``mtbench`` scorer): the LLM judge
  grades those answers. Only the driver reaches the judge's API and holds its key, so no
  worker's jail needs the network.

Where training runs is the ``launcher`` option: ``inprocess`` trains inside the genome's
process on one device; ``accelerate`` trains in ``num_processes`` ranks started from the
genome's process by ``accelerate launch`` (DDP, DeepSpeed ZeRO-3 or FSDP;
:mod:`fitness.dpo.launcher`), which the 7B recipe needs; the ranks save the trained policy,
whose weights are the artefacts, so both launchers are scored by the same trusted phase.

The training report (steps, loss, TRL's reward metrics, timings, cache counters) comes from
where genome code ran: it is shown with the score and never used to compute it.
"""
from __future__ import annotations

import gc
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Callable

from engine.genome import GenomeError
from engine.processes import in_worker
from fitness.base import Fitness, SandboxNeeds, Score, Seed, TensorSpec
from fitness.dpo.data import check_local, is_local
from fitness.dpo.settings import DPOSettings, resolve_settings
from fitness.preference import PreferenceInterface, preference_seeds
from fitness.synthetic_pref import SyntheticPreference, loss_shape_descriptors

#: The lowest sensible fitness per scorer (the QD score counts from it): accuracy 0, an MT-Bench
#: rating of 1, a reward of -10 log-odds.
_FLOORS = {"heldout": 0.0, "mtbench": 1.0, "reward-model": -10.0}

#: What the genome's process reports about its training, besides the weights (as ``report.<name>``
#: artefacts): shown with the score, never used to compute it.
REPORTED = (
    "train_steps", "train_loss", "train_rewards_chosen", "train_rewards_rejected", "train_rewards_accuracies",
    "train_rewards_margins", "train_logps_chosen", "train_logps_rejected", "train_entropy", "train_seconds",
    "setup_seconds", "reference_cache_hits", "reference_cache_misses", "reference_forwards", "world_size",
    "launch_seconds", "gpu_peak_memory_bytes",
)
_COUNTS = {"train_steps", "reference_cache_hits", "reference_cache_misses", "reference_forwards", "world_size",
           "gpu_peak_memory_bytes"}


class Training(NamedTuple):
    """A finished training run: the trainer (its model is the trained policy), TRL's train
    output and the seconds spent building the trainer and training."""

    trainer: Any
    result: Any
    setup_seconds: float
    train_seconds: float


def torch_float64():
    import torch

    return torch.float64


def _quiet_libraries() -> None:
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def _quiet(trainer) -> None:
    """Metrics go to the Score (and trainer.state.log_history), not to stdout: the CLI's --json
    output and the worker log stay clean."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _no_training(*tensors):
    raise RuntimeError("the scoring trainer never trains")


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
        if self.settings.scorer == "mtbench" and not in_worker():
            # A judge without a key fails here, in the driver (where it runs), not after hours of training.
            self._make_judge()
        self._data = None
        self._tokenizer = None
        self._reference_cache = None
        self._prepared = None  # tokenised training data, kept across the trainers of one process
        self._reference_ready: set[int] = set()  # seeds whose training reference prepare() made sure of
        self._spec = None

    def seeds(self) -> list[Seed]:
        return preference_seeds()

    def sandbox_needs(self) -> SandboxNeeds:
        """What the worker's jail must show: local model, tokenizer, data, reward model and
        MT-Bench questions read-only, the reference-log-probability cache writable; never the
        network (the MT-Bench judge runs in the driver: :meth:`judge`), the judge's key file,
        its reference answers or its reply cache. The scorer's own files (a local reward model,
        local MT-Bench questions) are hidden from each genome's process: only the trusted phase
        reads them."""
        s = self.settings

        def local(*values) -> tuple[str, ...]:
            return tuple(str(Path(v).expanduser()) for v in values if v and Path(v).expanduser().exists())

        scorer_files = local(s.reward_model) if s.scorer == "reward-model" else \
            local(s.mtbench_questions) if s.scorer == "mtbench" else ()
        cache = s.resolved_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        # In-process training finds the training pairs' reference in the cache :meth:`prepare`
        # filled, so genomes' processes only read it; accelerate's ranks compute it themselves.
        where = {"trusted_writable": (str(cache),)} if s.launcher == "inprocess" else {"writable": (str(cache),)}
        return SandboxNeeds(read_only=local(s.model, s.tokenizer, s.dataset, s.accelerate_config),
                            hidden_from_genome=scorer_files, **where)

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
            return Judge(s.judge, s.resolved_judge_cache_dir(), temperature=s.judge_temperature,
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
            from fitness.dpo.reference_cache import MemoryReferenceCache

            data = load_preference_data(self.settings)
            if not self.held_out.wiped:
                self.held_out.put("heldout", {"rows": data.heldout, "reference": MemoryReferenceCache(),
                                              "prepared": None})
            # The held-out pairs live in held_out only, which the genome's process wipes.
            self._data = replace(data, heldout=[])
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
        """A :class:`CandidateDPOTrainer` for the candidate ``loss_fn`` (four tensors -> losses),
        on the training pairs only: the held-out pairs never reach the process that trains."""
        from datasets import Dataset

        from fitness.dpo.models import load_model
        from fitness.dpo.trainer import CandidateDPOTrainer

        data, tokenizer = self.data(), self.tokenizer()
        # The arguments come before the model: under an accelerate launch with DeepSpeed ZeRO-3
        # they switch on zero.Init, so each rank loads only its shard of the weights.
        args = self.training_arguments(output_dir, seed)
        model = model if model is not None else load_model(self.settings, tokenizer)
        train = self._prepared["train"] if self._prepared else Dataset.from_list(data.train)
        trainer = CandidateDPOTrainer(
            model=model, args=args, processing_class=tokenizer, train_dataset=train,
            preference_loss=loss_fn, reference_cache=self.reference_cache(),
            max_prompt_length=self.settings.max_prompt_length, tokenized=self._prepared,
        )
        self._prepared = {"train": trainer.prepared["train"]}
        _quiet(trainer)
        return trainer

    def run_training(self, loss_fn: Callable, seed: int, output_dir: str) -> Training:
        """Build the trainer and train with ``loss_fn``; the same in the genome's process and in
        each rank of an accelerate launch.

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

    # -- the two phases -----------------------------------------------------------------------
    def prepare(self, seed: int) -> None:
        """In the warm worker, before each genome's process is forked: the data (held-out pairs
        into :attr:`held_out`), the tokenizer, the shapes of the model's weights and, for
        in-process training, the tokenised training pairs and their reference log-probabilities
        (in the on-disk cache, which genomes' processes can only read)."""
        _require_packages()
        _quiet_libraries()
        self.data()
        self.tokenizer()
        self._model_spec()
        if self.settings.launcher == "inprocess" and seed not in self._reference_ready:
            try:
                with tempfile.TemporaryDirectory(prefix="evoloss-dpo-prepare-") as output_dir:
                    self.build_trainer(_no_training, seed, output_dir)  # computes or loads them; then dropped
                self._reference_ready.add(seed)
            finally:
                self._release_memory()

    def artefact_spec(self, seed: int) -> dict[str, TensorSpec]:
        """The trained model's state dict (``model.<name>``, the shapes and dtypes of a fresh
        model's) and the training report (``report.<metric>``, float64 scalars, NaN where a
        metric was not logged)."""
        spec = {f"model.{name}": value for name, value in self._model_spec().items()}
        spec.update({f"report.{name}": TensorSpec((), torch_float64(), finite=False) for name in REPORTED})
        return spec

    @property
    def max_artefact_bytes(self) -> int:  # type: ignore[override]
        """The model's weights and the report: the spec's size, exactly."""
        return sum(spec.nbytes() for spec in self.artefact_spec(0).values())

    def train(self, fn: Callable, seed: int) -> dict[str, Any]:
        """Untrusted phase: train with ``fn`` as the loss (in this process, or in the ranks of an
        accelerate launch) and return the trained model's state dict and the training report."""
        _require_packages()
        _quiet_libraries()
        if self.settings.launcher == "accelerate":
            return self._train_launched(fn, seed)
        loss_fn = self.interface.bind(fn)
        cache = self.reference_cache()
        hits, misses = cache.hits, cache.misses
        training = trainer = None
        try:
            with tempfile.TemporaryDirectory(prefix="evoloss-dpo-") as output_dir:
                training = self.run_training(loss_fn, seed, output_dir)
                trainer = training.trainer
                report = self.training_metrics(trainer, training.result)
                report.update({
                    "train_seconds": training.train_seconds, "setup_seconds": training.setup_seconds,
                    "reference_cache_hits": cache.hits - hits, "reference_cache_misses": cache.misses - misses,
                    "reference_forwards": trainer.reference_forwards,
                })
                return self._artefacts(trainer.model, report)
        finally:
            # Release the policy (and its optimiser state).
            training = trainer = None
            self._release_memory()

    def _train_launched(self, fn: Callable, seed: int) -> dict[str, Any]:
        """Train in ranks started by ``accelerate launch``; the saved policy is the artefact."""
        import fitness.dpo.launcher as launcher

        s = self.settings
        code = launcher.source_of(fn)
        self.interface.bind(fn)  # the parameter form is checked here, as in-process
        model = None
        try:
            with tempfile.TemporaryDirectory(prefix=launcher.FOLDER_PREFIX) as folder:
                outcome = launcher.launch(self.preset, s, code, seed, folder)
                model = launcher.load_policy(outcome.policy_dir, s, device="cpu")
                report = {k: v for k, v in outcome.metrics.items() if k in REPORTED}
                report["launch_seconds"] = outcome.seconds
                return self._artefacts(model, report)
        finally:
            model = None
            self._release_memory()

    def score(self, artefacts: dict[str, Any], seed: int) -> Score:
        """Trusted phase: a freshly built model (no genome code) gets the trained weights; the
        held-out pairs (their reference log-probabilities computed here, by the untrained model)
        give the accuracy and margins; the reward-model scorer, or the MT-Bench answers that
        :meth:`judge` grades in the driver, are generated with it."""
        import fitness.dpo.scorers as scorers
        from fitness.dpo.models import load_model

        _require_packages()
        _quiet_libraries()
        start = time.perf_counter()
        s = self.settings
        metrics = self._report_of(artefacts)
        trainer = policy = None
        try:
            with tempfile.TemporaryDirectory(prefix="evoloss-dpo-score-") as output_dir:
                trainer = self._scoring_trainer(seed, output_dir)
                state = {name[len("model."):]: value for name, value in artefacts.items() if name.startswith("model.")}
                trainer.model.load_state_dict(state, strict=True)
                data = replace(self.data(), heldout=self._heldout()["rows"])
                policy = scorers.TrainedPolicy(trainer, self.tokenizer(), data, s, seed,
                                               lambda: load_model(s, self.tokenizer()))
                # Held-out accuracy and margins are cheap: reported whatever the scorer.
                fitness, scored = scorers.heldout(policy)
                metrics.update(scored)
                to_judge = None
                if s.scorer == "reward-model":
                    fitness, scored = scorers.reward_model(policy)
                    metrics.update(scored)
                elif s.scorer == "mtbench":
                    metrics["heldout_fitness"] = fitness
                    to_judge = {"answers": scorers.mtbench_answers(policy)}
                metrics.update({"preset": self.preset, "scorer": s.scorer, "launcher": s.launcher,
                                "score_seconds": time.perf_counter() - start})
                if s.launcher == "accelerate":
                    metrics.update({"num_processes": s.num_processes, "distributed": s.distributed})
                return Score(fitness=float(fitness), metrics=metrics, to_judge=to_judge)
        finally:
            trainer = policy = None
            self._release_memory()

    def _scoring_trainer(self, seed: int, output_dir: str):
        """A trainer over the held-out pairs whose model is a fresh, untrained policy: building it
        computes their reference log-probabilities (kept in memory, in :attr:`held_out`); the
        caller then loads the trained weights into its model. It never trains."""
        from datasets import Dataset

        from fitness.dpo.models import load_model
        from fitness.dpo.trainer import CandidateDPOTrainer

        held = self._heldout()
        tokenizer = self.tokenizer()
        args = self.training_arguments(output_dir, seed)
        model = load_model(self.settings, tokenizer)
        pairs = held["prepared"] if held["prepared"] is not None else Dataset.from_list(held["rows"])
        tokenized = {"train": pairs, "eval": pairs} if held["prepared"] is not None else None
        trainer = CandidateDPOTrainer(
            model=model, args=args, processing_class=tokenizer, train_dataset=pairs, eval_dataset=pairs,
            preference_loss=_no_training, reference_cache=held["reference"],
            max_prompt_length=self.settings.max_prompt_length, tokenized=tokenized,
        )
        held["prepared"] = trainer.prepared["eval"]
        _quiet(trainer)
        return trainer

    def _heldout(self) -> dict[str, Any]:
        """The held-out pairs, their tokenised form and their reference log-probabilities."""
        from fitness.dpo.data import load_preference_data
        from fitness.dpo.reference_cache import MemoryReferenceCache

        self.data()  # loads the pairs once, the held-out ones into held_out
        return self.held_out.get("heldout", lambda: {
            "rows": load_preference_data(self.settings).heldout, "reference": MemoryReferenceCache(),
            "prepared": None})

    def _model_spec(self) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes of a fresh model's state dict (built once per plug-in)."""
        if self._spec is None:
            from fitness.dpo.models import weight_shapes

            self._spec = {name: TensorSpec(tuple(shape), dtype)
                          for name, (shape, dtype) in weight_shapes(self.settings, self.tokenizer()).items()}
        return self._spec

    def _artefacts(self, model, report: dict[str, Any]) -> dict[str, Any]:
        import torch

        artefacts = {f"model.{name}": value.detach().cpu() for name, value in model.state_dict().items()}
        for name in REPORTED:
            value = report.get(name)
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
            artefacts[f"report.{name}"] = torch.tensor(number, dtype=torch.float64)
        return artefacts

    @staticmethod
    def _report_of(artefacts: dict[str, Any]) -> dict[str, Any]:
        """The training report the genome's process sent: shown with the score, never part of it
        (it comes from where genome code ran)."""
        metrics: dict[str, Any] = {}
        for name in REPORTED:
            value = float(artefacts[f"report.{name}"])
            if math.isfinite(value):
                metrics[name] = int(value) if name in _COUNTS and value.is_integer() else value
        return metrics

    def judge(self, score: Score, seed: int) -> Score:
        """Judge phase, in the driver (the MT-Bench scorer): the LLM judge grades the answers the
        trained model generated in :meth:`score`; the MT-Bench rating becomes the fitness."""
        import fitness.dpo.scorers as scorers

        if self.settings.scorer != "mtbench":
            return score
        judge = self._make_judge()
        try:
            fitness, graded = scorers.mtbench_grade(self.settings, judge, (score.to_judge or {}).get("answers"))
        finally:
            judge.close()
        return Score(fitness=float(fitness), metrics={**score.metrics, **graded})

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
