"""TRL's ``DPOTrainer`` with a candidate loss, cached reference log-probabilities and TRL < 0.20's
prompt truncation.

Where the candidate goes in (TRL 1.16). Up to TRL 0.28 a subclass overrode ``dpo_loss``; that
method is gone since 0.29, and in 1.16 the loss is an ``if/elif`` chain over ``loss_type``
inside the 300-line ``_compute_loss``, which also runs the forward pass and logs the metrics.
There is no hook between "sequence log-probabilities" and "loss". The options were:

1. copy ``_compute_loss`` and edit one line: 300 lines of TRL to keep in sync;
2. patch a module global of ``trl.trainer.dpo_trainer`` (``F.logsigmoid``) during the call:
   invisible, and breaks any other trainer in the process;
3. override ``compute_loss`` (the ``transformers.Trainer`` entry point TRL itself overrides)
   with a short forward: TRL's fused LM head (``model(..., fused_lm_head=True)``, installed
   by ``DPOTrainer.__init__``) returns the per-token log-probabilities of the completion
   tokens, their sum gives the sequence log-probabilities exactly as ``_compute_loss`` does,
   the reference comes from the ``ref_chosen_logps``/``ref_rejected_logps`` columns that
   ``precompute_ref_log_probs`` adds, and the candidate maps the four tensors to losses.

Option 3 is used: about 40 lines that read as the DPO objective, while tokenisation, chat
templates, collation, truncation, the reference computation, the optimiser, mixed precision,
gradient checkpointing, distributed training and metric logging stay stock TRL. It covers the
configuration this plug-in builds (reverse-KL scores, no ``ld_alpha``, no WPO weighting, a
dense, non-MoE model without PEFT); ``tests/fitness/test_dpo_plugin.py`` checks that the DPO and LRML
seeds give TRL's own ``sigmoid`` and ``discopop`` loss and gradients on the same batch.
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable

import torch
from trl import DPOTrainer

from engine.genome import GenomeError
from fitness.base import losses_of
from fitness.dpo.reference_cache import ReferenceCache, key_of

#: Batch keys that are not model inputs (as in ``DPOTrainer._compute_loss``).
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def sequence_logps(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Summed completion log-probabilities ``(batch,)`` of the chosen and rejected halves of a
    collated batch (``[chosen..., rejected...]``), as ``DPOTrainer._compute_loss`` computes
    them, and the model's fused-head outputs."""
    completion_mask = inputs["completion_mask"]
    model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
    # The fused head gives 0 where the label is -100, so the sum covers completion tokens only.
    per_token = outputs.log_probs[:, -(completion_mask.size(1) - 1):]
    chosen, rejected = per_token.sum(dim=1).chunk(2, dim=0)
    return chosen, rejected, outputs


class CandidateDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose loss is ``preference_loss(pc, pr, rc, rr) -> (batch,)``.

    Args:
        preference_loss: The candidate as a function of the four tensors (see
            :meth:`fitness.preference.PreferenceInterface.bind`).
        reference_cache: Where reference log-probabilities are looked up and stored.
        max_prompt_length: Prompt tokens kept when prompt + response exceeds ``max_length``
            (None: TRL 1.16's behaviour, truncating the sequence end only).
        tokenized: The :attr:`prepared` datasets of an earlier trainer with the same tokenizer
            and settings, by name; passing one of them as a dataset skips its tokenisation.
        *args, **kwargs: As ``DPOTrainer``; ``args.precompute_ref_log_probs`` must be True and
            ``ref_model`` None: the reference is the policy before training.
    """

    def __init__(self, *args: Any, preference_loss: Callable, reference_cache: ReferenceCache,
                 max_prompt_length: int | None = None, tokenized: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.preference_loss = preference_loss
        self.tokenized = dict(tokenized or {})
        self.reference_cache = reference_cache
        self.max_prompt_length = max_prompt_length
        self.reference_forwards = 0
        #: The tokenised (and truncated) datasets by name ("train", "eval"), before the reference
        #: columns are added: the plug-in hands them to its next trainer.
        self.prepared: dict[str, Any] = {}
        config = kwargs.get("args")
        if config is None or not config.precompute_ref_log_probs or kwargs.get("ref_model") is not None:
            raise ValueError("CandidateDPOTrainer needs args.precompute_ref_log_probs=True and no ref_model")
        super().__init__(*args, **kwargs)

    # -- data: prompt truncation, reuse of tokenised data ------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.tokenized.get(dataset_name) is dataset:
            # Tokenised by an earlier trainer of the same plug-in (same tokenizer and limits):
            # a worker tokenises its data once, not once per candidate.
            self.prepared[dataset_name] = dataset
            return dataset
        if self.max_prompt_length is None or args.max_length is None:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        else:
            # TRL drops pairs whose prompt alone reaches max_length; here long prompts are cut
            # instead (kept from the end), so tokenise without the limit first.
            max_length, args.max_length = args.max_length, None
            try:
                dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            finally:
                args.max_length = max_length
            dataset = dataset.map(_truncate, fn_kwargs={"max_length": max_length,
                                                        "max_prompt_length": self.max_prompt_length})
        self.prepared[dataset_name] = dataset
        return dataset

    # -- the reference: computed once, cached on disk ---------------------------------------
    def _reference_settings(self) -> dict[str, Any]:
        import transformers
        import trl

        args, config = self.args, self.model.config
        # The weight hash identifies the reference; the name and revision are kept as well, since a
        # model loaded sharded (DeepSpeed ZeRO-3 init) hashes its local shards only.
        return {"model": getattr(config, "_name_or_path", ""), "revision": getattr(config, "_commit_hash", None),
                "max_length": args.max_length, "truncation_mode": args.truncation_mode, "bf16": args.bf16,
                "fp16": args.fp16, "ld_alpha": args.ld_alpha, "device": self.accelerator.device.type,
                "trl": trl.__version__, "transformers": transformers.__version__}

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        rows = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
        key = key_of(self._precompute_model_hash, rows, self._reference_settings())
        distributed = self.accelerator.num_processes > 1
        cached = self.reference_cache.load(key, len(dataset)) if self.accelerator.is_main_process else None
        if distributed:
            # Rank 0's key and lookup decide for every rank: under ZeRO-3 each rank hashes its own
            # shards, and a rank that found the entry while another computed it would leave the
            # other waiting in a collective forever. (As TRL broadcasts its own cache fingerprint.)
            from accelerate.utils import broadcast_object_list

            shared = [key, None if cached is None else (cached[0].tolist(), cached[1].tolist())]
            broadcast_object_list(shared, from_process=0)
            key = shared[0]
            cached = None if shared[1] is None else tuple(torch.tensor(v, dtype=torch.float32) for v in shared[1])
        if cached is None:
            # A miss: TRL computes them with the policy before training (it is the reference).
            computed = self._trl_precompute(dataset, name, batch_size, distributed)
            chosen = torch.tensor(computed["ref_chosen_logps"], dtype=torch.float32)
            rejected = torch.tensor(computed["ref_rejected_logps"], dtype=torch.float32)
            if self.accelerator.is_main_process:
                self.reference_cache.store(key, chosen, rejected)
            return computed
        chosen, rejected = cached
        return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column(
            "ref_rejected_logps", rejected.tolist())

    def _trl_precompute(self, dataset, name: str, batch_size: int, distributed: bool):
        """TRL's reference pass. Rank 0 writes the result to ``dataset``'s cache file and every
        rank reads it back; for a dataset held in memory that file lies in a temporary folder of
        each process's own, so under distributed training it is moved to the output folder,
        which the ranks share (:mod:`fitness.dpo.rank`)."""
        if not distributed or dataset.cache_files:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        folder = self.args.output_dir
        dataset._get_cache_file_path = lambda fingerprint: os.path.join(folder, f"reference-{fingerprint}.arrow")
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            del dataset._get_cache_file_path

    def compute_ref_log_probs(self, model, inputs):
        self.reference_forwards += 1
        return super().compute_ref_log_probs(model, inputs)

    # -- the loss ---------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        chosen, rejected, outputs = sequence_logps(model, inputs)
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        losses = self._candidate_losses(chosen, rejected, ref_chosen, ref_rejected)
        loss = losses.mean()
        self._log_metrics(mode, chosen, rejected, ref_chosen, ref_rejected, outputs, inputs)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS})
            return loss, outputs
        return loss

    def _candidate_losses(self, chosen, rejected, ref_chosen, ref_rejected) -> torch.Tensor:
        step = self.state.global_step + 1
        try:
            # The reference tensors are cloned: an in-place edit by the loss must not reach the batch.
            losses = losses_of(self.preference_loss(chosen, rejected, ref_chosen.clone(), ref_rejected.clone()))
        except GenomeError:
            raise
        except Exception as exc:
            raise GenomeError(f"the loss raised {type(exc).__name__} at training step {step}: {exc}",
                              status="error") from exc
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != tuple(chosen.shape):
            found = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise GenomeError(f"the loss returned {found} at training step {step}; expected shape "
                              f"{tuple(chosen.shape)}", status="error")
        non_finite = not bool(torch.isfinite(losses).all())
        if self.accelerator.num_processes > 1:
            # Every rank stops at the same step, so rank 0 reports it: a rank stopping alone would
            # leave the others waiting in the next collective until the launcher tears them down.
            flag = torch.tensor([float(non_finite)], device=losses.device)
            non_finite = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if non_finite:
            raise GenomeError(f"the loss became non-finite (nan or inf) at training step {step}", status="error")
        return losses

    def _log_metrics(self, mode, chosen, rejected, ref_chosen, ref_rejected, outputs, inputs) -> None:
        """TRL's reward metrics (same names and definitions as ``DPOTrainer._compute_loss``)."""
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        chosen_rewards = self.beta * (chosen - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected - ref_rejected).detach()
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
        mask = inputs["completion_mask"][..., 1:]
        if getattr(outputs, "entropy", None) is not None:
            entropy = (outputs.entropy[:, -mask.size(1):].detach() * mask).sum()
            tokens = gather(mask.sum()).sum()
            metrics["entropy"].append((gather(entropy).sum() / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


def _truncate(example: dict[str, list[int]], max_length: int, max_prompt_length: int) -> dict[str, list[int]]:
    """TRL < 0.20's rule: when prompt + the longer response exceeds ``max_length``, keep the
    prompt's last ``max_prompt_length`` tokens; if still too long, cut both responses to
    ``max_length - max_prompt_length`` tokens."""
    prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longer > max_length:
        chosen, rejected = chosen[: max_length - max_prompt_length], rejected[: max_length - max_prompt_length]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
