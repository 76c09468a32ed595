"""The ``tiny`` model and the ``tiny-parity`` data: real DPO through TRL in CPU seconds.

* **Data.** A user asks for a number ("red cat sun. Pick a number."), and the chosen answer
  has the wanted parity while the rejected one, a neighbouring number, has the other. Two
  prompts in three want an even number; the rest say "Pick an odd number." A policy that
  learns only "prefer even" reaches about 2/3 held-out accuracy; reading the prompt is needed
  beyond that. (Arithmetic answers gave no learnable signal to a model this small.)
* **Tokenizer.** A BPE tokenizer trained on the spot with the ``tokenizers`` library (digits
  are single tokens, so parity is the last digit's token), wrapped as
  ``PreTrainedTokenizerFast`` with a small chat template.
* **Model.** GPT-2 from a config: 2 layers, 2 heads, width 64, about 110k parameters,
  initialised from ``data_seed`` so every candidate starts from the same reference.

Everything here is deterministic for a seed and needs no download.
"""
from __future__ import annotations

import random
from typing import Any

#: The chat template of the tiny tokenizer: ``<|role|>content<|end|>`` per message.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone")
_VOCAB_SIZE = 192
_CONFIG = {"n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 2}


def parity_pairs(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` conversational preference pairs following the parity rule (module doc)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        context = " ".join(rng.choice(_WORDS) for _ in range(3))
        wanted = rng.choice(("even", "even", "odd"))
        good = rng.randrange(2, 1000, 2) + (1 if wanted == "odd" else 0)
        bad = good + rng.choice((-1, 1))
        ask = "Pick a number." if wanted == "even" else "Pick an odd number."
        rows.append({
            "prompt": [{"role": "user", "content": f"{context}. {ask}"}],
            "chosen": [{"role": "assistant", "content": str(good)}],
            "rejected": [{"role": "assistant", "content": str(bad)}],
        })
    return rows


def _corpus(seed: int) -> list[str]:
    text = []
    for row in parity_pairs(512, seed):
        text.append(f"{row['prompt'][0]['content']} {row['chosen'][0]['content']}")
    return text


def build_tokenizer(seed: int = 0):
    """A BPE tokenizer trained on parity-task text (any printable ASCII still encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Metaspace(prepend_scheme="first")])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    alphabet = [chr(i) for i in range(32, 127)] + ["\n", "\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(_corpus(seed), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", unk_token="<|unk|>", eos_token="<|end|>",
        bos_token="<|end|>", chat_template=TINY_CHAT_TEMPLATE, padding_side="left",
    )


def build_model(tokenizer, seed: int = 0, **shape: int):
    """A small GPT-2 initialised from ``seed`` (the same weights for the same seed). ``shape``
    overrides GPT2Config sizes (``n_layer=12, n_head=12, n_embd=768, n_positions=1024`` is
    GPT-2 small's shape, as ``benchmarks/gpu_check.py`` builds it)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        **{**_CONFIG, **shape})
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
