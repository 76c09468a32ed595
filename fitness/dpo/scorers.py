"""How a trained policy is scored: ``heldout``, ``mtbench`` and ``reward-model``.

Each scorer returns ``(fitness, metrics)``; higher fitness is better.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch

from engine.genome import GenomeError
from fitness.dpo.models import generate, response_logps
from fitness.dpo.trainer import sequence_logps


@dataclass
class TrainedPolicy:
    """What a scorer gets: the trainer (its model is the trained policy), the tokenizer, the
    data, the settings, the evaluation seed, and how to load a fresh reference model.

    A policy trained in other processes (the accelerate launcher) comes without a trainer, as
    ``trained_model`` loaded from its saved weights; the generation scorers need only that."""

    trainer: Any
    tokenizer: Any
    data: Any
    settings: Any
    seed: int
    load_reference: Callable[[], Any]
    trained_model: Any = None

    @property
    def model(self):
        return self.trained_model if self.trained_model is not None else self.trainer.model


def heldout(policy: TrainedPolicy) -> tuple[float, dict[str, Any]]:
    """Held-out preference accuracy of the implicit reward ``beta * log(pi / pi_ref)`` (ties count
    one half, so the untrained reference scores 0.5) and its margins; no judge, no generation.

    Under distributed training every rank calls this (a ZeRO-3 or FSDP forward is collective):
    each scores its shard of the held-out pairs, and the gathered values are the same on all."""
    trainer, beta = policy.trainer, policy.settings.beta
    loader = trainer.get_eval_dataloader(trainer.eval_dataset)
    model = trainer.model
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "ref_chosen": [], "ref_rejected": []}
    with torch.no_grad():
        for batch in loader:
            batch = trainer._prepare_inputs(batch)
            chosen, rejected, _ = sequence_logps(model, batch)
            values = (chosen.float(), rejected.float(), batch["ref_chosen_logps"].float(),
                      batch["ref_rejected_logps"].float())
            if trainer.accelerator.num_processes > 1:
                # gather_for_metrics drops the pairs repeated to even out the last batch
                values = trainer.accelerator.gather_for_metrics(values)
            for name, value in zip(parts, values):
                parts[name].append(value.cpu())
    chosen, rejected, ref_chosen, ref_rejected = (torch.cat(parts[k]) for k in parts)
    if not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        raise GenomeError("the trained model gives non-finite log-probabilities (training diverged)", status="error")
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    margins = chosen_rewards - rejected_rewards
    accuracy = float((margins > 0).float().mean() + 0.5 * (margins == 0).float().mean())
    metrics = {
        "heldout_accuracy": accuracy,
        "heldout_pairs": int(margins.numel()),
        "heldout_margin": float(margins.mean()),
        "heldout_margin_std": float(margins.std()) if margins.numel() > 1 else 0.0,
        "heldout_reward_chosen": float(chosen_rewards.mean()),
        "heldout_reward_rejected": float(rejected_rewards.mean()),
        "heldout_logps_chosen": float(chosen.mean()),
        "heldout_logps_rejected": float(rejected.mean()),
    }
    return accuracy, metrics


def _reward_label(config, label: str) -> int:
    names = {str(v).lower(): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if label.lower() in names:
        return names[label.lower()]
    if label.isdigit() and int(label) < config.num_labels:
        return int(label)
    raise ValueError(f"dpo option reward_label: {label!r} is not a label of the reward model "
                     f"(labels: {getattr(config, 'id2label', {})})")


def reward_model(policy: TrainedPolicy) -> tuple[float, dict[str, Any]]:
    """Sample one response per held-out prompt (temperature 1, no top-k/top-p), score it with the
    classifier (reward = log-odds of ``reward_label``) and estimate KL(policy || reference) as the
    mean over samples of ``log pi(y|x) - log pi_ref(y|x)``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    settings, tokenizer = policy.settings, policy.tokenizer
    prompts = [row["prompt"] for row in policy.data.heldout[: settings.reward_prompts]]
    torch.manual_seed(policy.seed)
    samples = generate(policy.model, tokenizer, prompts, temperature=1.0,
                       max_new_tokens=settings.reward_max_new_tokens, batch_size=settings.generation_batch_size)
    prompt_ids = [s[0] for s in samples]
    response_ids = [s[1] for s in samples]
    policy_logps = response_logps(policy.model, prompt_ids, response_ids, settings.generation_batch_size)
    reference = policy.load_reference().to(policy.model.device)
    try:
        reference_logps = response_logps(reference, prompt_ids, response_ids, settings.generation_batch_size)
    finally:
        del reference
    try:
        classifier_tokenizer = AutoTokenizer.from_pretrained(settings.reward_model)
        classifier = AutoModelForSequenceClassification.from_pretrained(settings.reward_model)
    except Exception as exc:
        raise RuntimeError(f"dpo: cannot load the reward model {settings.reward_model!r}: "
                           f"{type(exc).__name__}: {exc}") from exc
    classifier.to(policy.model.device).eval()
    label = _reward_label(classifier.config, settings.reward_label)
    texts = [tokenizer.decode(p + r, skip_special_tokens=True) for p, r in zip(prompt_ids, response_ids)]
    if classifier_tokenizer.pad_token is None:
        classifier_tokenizer.pad_token = classifier_tokenizer.eos_token
    rewards = []
    with torch.no_grad():
        for start in range(0, len(texts), settings.generation_batch_size):
            encoded = classifier_tokenizer(texts[start:start + settings.generation_batch_size], return_tensors="pt",
                                           padding=True, truncation=True).to(classifier.device)
            log_probs = torch.log_softmax(classifier(**encoded).logits.float(), dim=-1)
            target = log_probs[:, label]
            others = torch.logsumexp(torch.cat([log_probs[:, :label], log_probs[:, label + 1:]], dim=1), dim=1)
            rewards.append((target - others).cpu())
    reward = torch.cat(rewards)
    kl = policy_logps - reference_logps
    if not (torch.isfinite(reward).all() and torch.isfinite(kl).all()):
        raise GenomeError("the trained model's samples give non-finite rewards or KL (training diverged)",
                          status="error")
    mean_reward, mean_kl = float(reward.mean()), float(kl.mean())
    fitness = mean_reward - settings.kl_penalty * mean_kl
    metrics = {"reward": mean_reward, "reward_std": float(reward.std()) if reward.numel() > 1 else 0.0,
               "kl": mean_kl, "kl_penalty": settings.kl_penalty, "samples": int(reward.numel()),
               "response_tokens": sum(len(r) for r in response_ids) / max(len(response_ids), 1),
               "example": texts[0][:300] if texts else ""}
    return fitness, metrics


def mtbench_answers(policy: TrainedPolicy) -> list[list[Any]]:
    """The trained policy's answers to both turns of every MT-Bench question, as
    ``[[question_id, turn 1, turn 2], ...]`` (turn 2 sees the policy's own turn 1). Generation
    needs no network: it runs in the trusted phase; :func:`mtbench_grade` judges in the driver."""
    import fitness.dpo.mtbench as bench

    settings, tokenizer, model = policy.settings, policy.tokenizer, policy.model
    questions = bench.load_questions(settings.mtbench_questions, settings.mtbench_limit)
    torch.manual_seed(policy.seed)
    first: dict[Any, str] = {}
    # Questions of one temperature are generated as a batch; turn 2 sees the policy's own turn 1.
    for temperature in sorted({q.temperature for q in questions}):
        group = [q for q in questions if q.temperature == temperature]
        conversations = [[{"role": "user", "content": q.turns[0]}] for q in group]
        for question, (_, _, text) in zip(group, generate(
                model, tokenizer, conversations, temperature=temperature,
                max_new_tokens=settings.answer_max_new_tokens, batch_size=settings.generation_batch_size)):
            first[question.question_id] = text
    answers: dict[Any, tuple[str, str]] = {}
    for temperature in sorted({q.temperature for q in questions}):
        group = [q for q in questions if q.temperature == temperature]
        conversations = [[{"role": "user", "content": q.turns[0]},
                          {"role": "assistant", "content": first[q.question_id]},
                          {"role": "user", "content": q.turns[1]}] for q in group]
        for question, (_, _, text) in zip(group, generate(
                model, tokenizer, conversations, temperature=temperature,
                max_new_tokens=settings.answer_max_new_tokens, batch_size=settings.generation_batch_size)):
            answers[question.question_id] = (first[question.question_id], text)
    return [[question.question_id, *answers[question.question_id]] for question in questions]


def mtbench_grade(settings, judge, answered: Any) -> tuple[float, dict[str, Any]]:
    """MT-Bench score of ``answered`` (what :func:`mtbench_answers` returned, come back as JSON),
    graded by ``judge`` (:mod:`fitness.dpo.mtbench`) against the questions and references read
    here. Answers that do not match the questions are an error, never a score."""
    import fitness.dpo.mtbench as bench

    questions = bench.load_questions(settings.mtbench_questions, settings.mtbench_limit)
    references = bench.load_references(settings.mtbench_references) if settings.mtbench_references else {}
    answers: dict[Any, tuple[str, str]] = {}
    for row in answered if isinstance(answered, list) else ():
        if (isinstance(row, list) and len(row) == 3 and all(isinstance(text, str) for text in row[1:])
                and row[0] not in answers):
            answers[row[0]] = (row[1], row[2])
    expected = {question.question_id for question in questions}
    if set(answers) != expected:
        raise bench.MTBenchError(f"the MT-Bench answers do not match the {len(expected)} questions "
                                 f"({len(answers)} well-formed answers)")
    metrics = bench.grade(judge, questions, answers, references, repeats=settings.judge_repeats,
                          parse_retries=settings.judge_parse_retries)
    metrics["mtbench_answer_chars"] = sum(len(a) + len(b) for a, b in answers.values()) / max(len(answers), 1)
    score = metrics["mtbench_score"]
    if not math.isfinite(score):
        raise RuntimeError("MT-Bench gave no score")
    return score, metrics
