"""Loading the policy, its tokenizer and text generation for the scorers."""
from __future__ import annotations

from typing import Any

import torch


def load_tokenizer(settings):
    """The tokenizer named by ``settings`` (the tiny one is trained on the spot)."""
    if settings.model == "tiny" and settings.tokenizer is None:
        from fitness.dpo.tiny import build_tokenizer

        tokenizer = build_tokenizer(settings.data_seed)
    else:
        from transformers import AutoTokenizer

        name = settings.tokenizer or settings.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, revision=settings.model_revision)
        except Exception as exc:
            raise RuntimeError(f"dpo: cannot load the tokenizer {name!r}: {type(exc).__name__}: {exc}") from exc
    if settings.chat_template:
        tokenizer.chat_template = settings.chat_template
    return tokenizer


def load_model(settings, tokenizer):
    """A fresh copy of the model before training (the policy to train, or the reference)."""
    if settings.model == "tiny":
        from fitness.dpo.tiny import build_model

        return build_model(tokenizer, settings.data_seed).to(getattr(torch, settings.model_dtype))
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(settings.model, revision=settings.model_revision,
                                                    dtype=getattr(torch, settings.model_dtype))
    except Exception as exc:
        raise RuntimeError(f"dpo: cannot load the model {settings.model!r}: {type(exc).__name__}: {exc}") from exc


def weight_shapes(settings, tokenizer) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The names, shapes and dtypes of a fresh model's state dict, without loading its weights
    (the model is built on the meta device; the tiny one is small enough to build)."""
    if settings.model == "tiny":
        model = load_model(settings, tokenizer)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(settings.model, revision=settings.model_revision)
        except Exception as exc:
            raise RuntimeError(f"dpo: cannot load the model {settings.model!r}: {type(exc).__name__}: {exc}") from exc
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, settings.model_dtype))
    return {name: (tuple(value.shape), value.dtype) for name, value in model.state_dict().items()}


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def prompt_texts(tokenizer, prompts: list[Any]) -> list[str]:
    """Prompts as text: chat-message lists through the chat template (with the generation
    prompt), strings as they are."""
    texts = []
    for prompt in prompts:
        if isinstance(prompt, str):
            texts.append(prompt)
        else:
            texts.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    return texts


@torch.no_grad()
def generate(model, tokenizer, prompts: list[Any], *, temperature: float, max_new_tokens: int, batch_size: int,
             ) -> list[tuple[list[int], list[int], str]]:
    """Sample (``temperature`` > 1e-4, FastChat's rule) or greedily decode one response per prompt.

    Returns:
        Per prompt: its token ids, the response's token ids and the response text.
    """
    texts = prompt_texts(tokenizer, prompts)
    # A chat template already holds the special tokens it needs (the BOS, if any).
    add_special = all(isinstance(p, str) for p in prompts)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    _disable_checkpointing(model)
    device = device_of(model)
    results = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special).to(device)
            sample = temperature > 1e-4
            options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens,
                                       "pad_token_id": tokenizer.pad_token_id}
            if sample:
                options.update(temperature=temperature, top_k=0, top_p=1.0)
            output = model.generate(**encoded, **options)
            width = encoded["input_ids"].shape[1]
            for row, attention in zip(range(output.shape[0]), encoded["attention_mask"]):
                prompt_ids = encoded["input_ids"][row][attention.bool()].tolist()
                response = output[row, width:].tolist()
                response = _until_eos(response, tokenizer)
                text = tokenizer.decode(response, skip_special_tokens=True).strip()
                results.append((prompt_ids, response, text))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return results


def _disable_checkpointing(model) -> None:
    """Generation wants the KV cache, which activation checkpointing turns off."""
    if hasattr(model, "is_activation_checkpointing"):  # transformers >= 5.20 names
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def _until_eos(ids: list[int], tokenizer) -> list[int]:
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for index, token in enumerate(ids):
        if token in stops:
            return ids[:index + 1] if token == tokenizer.eos_token_id else ids[:index]
    return ids


@torch.no_grad()
def response_logps(model, prompt_ids: list[list[int]], response_ids: list[list[int]], batch_size: int) -> torch.Tensor:
    """Summed log-probabilities ``(n,)`` of each response given its prompt."""
    device = device_of(model)
    was_training = model.training
    model.eval()
    totals = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            rows = [p + r for p, r in zip(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size])]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            attention = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, (row, prompt) in enumerate(zip(rows, prompt_ids[start:start + batch_size])):
                ids[i, :len(row)] = torch.tensor(row)
                attention[i, :len(row)] = 1
                mask[i, len(prompt):len(row)] = True
            ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            totals.append((token_logps * mask[:, 1:]).sum(dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(totals) if totals else torch.zeros(0)
