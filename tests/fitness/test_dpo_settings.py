"""The ``dpo`` plug-in's options and presets: the paper's recipe, overrides, and bad or unknown
options named with their values (no training here)."""
from __future__ import annotations

import pytest

from fitness.dpo import PRESETS, DPOFitness
from fitness.dpo.settings import resolve_settings


def test_zephyr_preset_is_the_papers_recipe():
    s = resolve_settings("zephyr-gemma-mtbench", {})
    assert (s.model, s.dataset, s.scorer) == ("HuggingFaceH4/zephyr-7b-gemma-sft-v0.1", "argilla/dpo-mix-7k", "mtbench")
    assert (s.beta, s.learning_rate, s.epochs, s.per_device_batch, s.grad_accumulation) == (0.05, 5e-7, 2.0, 2, 8)
    assert (s.lr_scheduler, s.warmup_ratio, s.optimizer, s.precision) == ("cosine", 0.1, "adamw_torch", "bf16")
    assert (s.max_length, s.max_prompt_length, s.gradient_checkpointing) == (1024, 512, True)


def test_every_preset_builds_and_options_override_it():
    assert set(PRESETS) == {"zephyr-gemma-mtbench", "imdb-gpt2", "tiny"}
    for name in PRESETS:
        resolve_settings(name, {})
    s = resolve_settings("imdb-gpt2", {"beta": 0.2, "max_prompt_length": "none", "scorer": "heldout"})
    assert (s.beta, s.max_prompt_length, s.scorer, s.model) == (0.2, None, "heldout", "lvwerra/gpt2-imdb")


def test_plugin_defaults_to_the_tiny_preset_and_takes_beta_from_options():
    fitness = DPOFitness()
    assert fitness.preset == "tiny" and fitness.settings.model == "tiny"
    assert DPOFitness(beta=0.3).interface.beta == 0.3
    assert [seed.name for seed in fitness.seeds()][0] == "dpo"


@pytest.mark.parametrize(("option", "value"), [
    ("beta", 0), ("learning_rate", -1e-6), ("per_device_batch", 0), ("precision", "fp8"), ("scorer", "bleu"),
    ("max_length", 0), ("warmup_ratio", 1.5), ("judge", "gpt-4"), ("max_steps", 0), ("epochs", float("nan")),
    ("model_dtype", "float8"),
])
def test_bad_option_values_name_the_option_and_show_the_value(option, value):
    with pytest.raises(ValueError, match=option) as caught:
        DPOFitness(preset="tiny", **{option: value})
    assert repr(value) in str(caught.value)


def test_unknown_option_and_unknown_preset_are_rejected_with_the_known_names():
    with pytest.raises(TypeError, match="learning_rte.*known options"):
        DPOFitness(learning_rte=1e-3)
    with pytest.raises(ValueError, match="unknown preset 'zephyr'.*tiny"):
        DPOFitness(preset="zephyr")


def test_prompt_limit_must_leave_room_for_responses():
    with pytest.raises(ValueError, match="max_prompt_length"):
        DPOFitness(max_length=64, max_prompt_length=64)
