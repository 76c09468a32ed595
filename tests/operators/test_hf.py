"""``hf:PATH``: a tiny transformers chat model built from a config and a locally trained
tokenizer, saved to a temp folder. Its replies are noise; the path must work end to end and
fail cleanly."""
import json
import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

pytestmark = pytest.mark.hf

from archives.store import RunStore  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.assembly import build_operators  # noqa: E402
from engine.plugins import PluginError, load_fitness  # noqa: E402
from operators.base import Context, OperatorError  # noqa: E402
from tests.conftest import EXAMPLE_SPEC  # noqa: E402

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["def loss(pred, target):", "    return (pred - target).abs()", '{"thought": "", "name": "", "code": ""}',
              "torch F math sigmoid logsigmoid softplus beta", "Write a regression loss."] * 20
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|end|>",
                                      pad_token="<|end|>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(wrapped), n_positions=4096, n_embd=16, n_layer=1, n_head=2,
                        eos_token_id=wrapped.eos_token_id, pad_token_id=wrapped.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_a_local_model_answers_and_every_attempt_is_recorded(tiny_model, tmp_path):
    config = RunConfig(fitness=EXAMPLE_SPEC, operator=f"hf:{tiny_model}", executor="serial", llm_retries=1,
                       llm_max_tokens=12)
    (operator,), _ = build_operators(config)
    store = RunStore.create(tmp_path / "run", config.to_dict())
    operator.attach(store)
    interface = load_fitness(EXAMPLE_SPEC).interface
    with pytest.raises(OperatorError, match="no usable reply after 2 attempts"):
        operator.propose(Context(interface=interface, rng=random.Random(0)))
    calls = store.llm_calls()
    assert [c["attempt"] for c in calls] == [0, 1] and all(c["tokens_out"] > 0 and c["tokens_in"] > 0 for c in calls)
    assert all(c["cost_usd"] == 0 and c["reply"] is not None for c in calls)
    assert json.loads(calls[1]["prompt"])[-1]["content"].startswith("Code not valid. Error:")


def test_a_run_with_a_local_model_falls_back_and_finishes(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--fitness", EXAMPLE_SPEC, "--operator", f"symbolic,hf:{tiny_model}", "--pop", "3",
                 "--gens", "1", "--executor", "serial", "--llm-max-tokens", "8", "--llm-retries", "0",
                 "--out", str(out), "--quiet"]) == 0
    store = RunStore.open(out, readonly=True)
    assert store.llm_calls() and len(store.generations()) == 2


def test_bad_model_folders_fail_cleanly_at_start(tmp_path):
    with pytest.raises(PluginError, match="not found"):
        build_operators(RunConfig(fitness=EXAMPLE_SPEC, operator=f"hf:{tmp_path / 'missing'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PluginError, match="no config.json"):
        build_operators(RunConfig(fitness=EXAMPLE_SPEC, operator=f"hf:{tmp_path / 'empty'}"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(PluginError, match="loading the model"):
        build_operators(RunConfig(fitness=EXAMPLE_SPEC, operator=f"hf:{tmp_path / 'broken'}"))
