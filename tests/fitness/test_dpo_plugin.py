"""The ``dpo`` plug-in through TRL's real DPOTrainer on the ``tiny`` preset (CPU, no downloads):
the seeds reproduce TRL's built-in losses, training and held-out scoring end to end, the
reference cache, failures, the reward-model scorer and the CLI."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
torch.set_num_threads(1)

pytestmark = pytest.mark.dpo

from engine.cli import main  # noqa: E402
from engine.evaluation import run_candidate  # noqa: E402
from engine.genome import GenomeError, compile_genome  # noqa: E402
from engine.plugins import available, load_fitness  # noqa: E402
from fitness.dpo import DPOFitness  # noqa: E402
from fitness.preference import PreferenceInterface, preference_seeds  # noqa: E402

SEEDS = {seed.name: seed for seed in preference_seeds()}
FAST = {"train_size": 64, "heldout_size": 32}  # 8 steps: the cache and failure tests need no learning


def seed_fn(name: str):
    return compile_genome(SEEDS[name].code, PreferenceInterface.arg_counts)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dpo-cache")


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return DPOFitness(preset="tiny", cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def dpo_score(tiny):
    return tiny.evaluate(seed_fn("dpo"), 0)


# -- the injection reproduces TRL's own losses --------------------------------------------------------
def _stock_trainer(fitness: DPOFitness, model, loss_type: str, output_dir: str):
    """Stock TRL: built-in loss, a reference model in memory, reference log-probs computed per step."""
    from datasets import Dataset
    from trl import DPOTrainer

    args = fitness.training_arguments(output_dir, seed=0)
    args.precompute_ref_log_probs, args.loss_type = False, [loss_type]
    data = fitness.data()
    return DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                      processing_class=fitness.tokenizer(), train_dataset=Dataset.from_list(data.train))


@pytest.mark.parametrize(("seed", "loss_type"), [("dpo", "sigmoid"), ("lrml", "discopop")])
def test_seed_gives_trls_builtin_loss_and_gradients_on_the_same_batch(tmp_path, seed, loss_type):
    from fitness.dpo.models import load_model

    # No prompt truncation and a policy moved away from the reference (so the losses are not at
    # their symmetric point): TRL's path and ours see the same data and weights.
    fitness = DPOFitness(preset="tiny", cache_dir=str(tmp_path / "cache"), max_prompt_length="none", **FAST)
    model = load_model(fitness.settings, fitness.tokenizer())
    ours = fitness.build_trainer(fitness.interface.bind(seed_fn(seed)), 0, str(tmp_path / "ours"),
                                 model=copy.deepcopy(model))
    stock = _stock_trainer(fitness, model, loss_type, str(tmp_path / "stock"))
    with torch.no_grad():
        for trainer in (ours, stock):
            for parameter in trainer.model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
    batch = next(iter(ours.get_train_dataloader()))
    assert "ref_chosen_logps" in batch
    losses = {}
    for name, trainer in (("ours", ours), ("stock", stock)):
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
        loss.backward()
        losses[name] = (loss.detach(), [p.grad.clone() for p in trainer.model.parameters()])
    assert losses["ours"][0].item() == pytest.approx(losses["stock"][0].item(), abs=1e-6)
    assert abs(losses["ours"][0].item() - 0.6931) > 1e-3  # not the trivial value at logits = 0
    for mine, theirs in zip(losses["ours"][1], losses["stock"][1]):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours._metrics["train"][key][-1] == pytest.approx(stock._metrics["train"][key][-1], abs=1e-5)


# -- the tiny preset end to end -----------------------------------------------------------------------
def test_registered_and_listed():
    assert "dpo" in available()["fitness"]
    assert isinstance(load_fitness("dpo", {"preset": "tiny"}), DPOFitness)


def test_tiny_preset_trains_dpo_and_scores_held_out_accuracy(dpo_score):
    metrics = dpo_score.metrics
    assert 0.65 <= dpo_score.fitness <= 1.0 and dpo_score.fitness == metrics["heldout_accuracy"]
    assert metrics["train_steps"] == 32 and metrics["heldout_pairs"] == 128
    assert metrics["heldout_margin"] > 0 and metrics["heldout_reward_chosen"] > metrics["heldout_reward_rejected"]
    for key in ("train_rewards_chosen", "train_rewards_rejected", "train_rewards_margins", "train_rewards_accuracies"):
        assert key in metrics  # TRL's metric names, as logged
    assert metrics["preset"] == "tiny" and metrics["scorer"] == "heldout"


def test_sign_flipped_dpo_scores_below_chance_and_dpo(tiny, dpo_score):
    def flipped(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
        return -torch.nn.functional.logsigmoid(-self.beta * logits)

    score = tiny.evaluate(flipped, 0)
    assert score.fitness < 0.5 < dpo_score.fitness


def test_a_discovered_loss_trains_through_the_same_path(tiny):
    score = tiny.evaluate(seed_fn("lrml"), 0)
    assert 0.0 <= score.fitness <= 1.0 and score.metrics["train_steps"] == 32
    assert score.metrics["reference_cache_hits"] == 1  # the training pairs' reference the DPO run stored


def test_evaluation_is_deterministic_for_a_seed(tiny, dpo_score):
    again = tiny.evaluate(seed_fn("dpo"), 0)
    assert again.fitness == dpo_score.fitness
    assert again.metrics["heldout_margin"] == pytest.approx(dpo_score.metrics["heldout_margin"], abs=1e-6)


# -- the reference cache ------------------------------------------------------------------------------
def test_second_evaluation_uses_the_cache_without_any_reference_forward(tmp_path, monkeypatch):
    from fitness.dpo.trainer import CandidateDPOTrainer

    fitness = DPOFitness(preset="tiny", cache_dir=str(tmp_path), **FAST)
    first = fitness.evaluate(seed_fn("dpo"), 0)
    assert (first.metrics["reference_cache_misses"], first.metrics["reference_cache_hits"]) == (1, 0)
    assert first.metrics["reference_forwards"] > 0
    # The training pairs only: the held-out pairs' reference is computed by the trusted phase and
    # kept in memory, never in the folder the genome's process can write.
    assert len(list((tmp_path / "reference").glob("*.pt"))) == 1

    callers = []
    original = CandidateDPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(CandidateDPOTrainer, "compute_ref_log_probs",
                        lambda self, *a, **k: callers.append(self) or original(self, *a, **k))
    built = []
    original_build = DPOFitness.build_trainer
    monkeypatch.setattr(DPOFitness, "build_trainer", lambda self, *a, **k: built.append(original_build(self, *a, **k))
                        or built[-1])
    # A new plug-in object (a new worker) reads the same cache folder.
    second = DPOFitness(preset="tiny", cache_dir=str(tmp_path), **FAST).evaluate(seed_fn("ipo"), 0)
    assert (second.metrics["reference_cache_hits"], second.metrics["reference_cache_misses"]) == (1, 0)
    assert second.metrics["reference_forwards"] == 0
    assert callers and not any(caller is built[0] for caller in callers)  # only the scoring phase's held-out pass
    assert built[0].ref_model is None  # no reference model in memory during training


def test_changing_the_data_or_the_length_limit_misses_the_cache(tmp_path):
    DPOFitness(preset="tiny", cache_dir=str(tmp_path), **FAST).evaluate(seed_fn("dpo"), 0)
    other_data = DPOFitness(preset="tiny", cache_dir=str(tmp_path), train_size=48, heldout_size=32)
    assert other_data.evaluate(seed_fn("dpo"), 0).metrics["reference_cache_misses"] == 1
    other_limit = DPOFitness(preset="tiny", cache_dir=str(tmp_path), max_length=20, max_prompt_length=12, **FAST)
    assert other_limit.evaluate(seed_fn("dpo"), 0).metrics["reference_cache_misses"] == 1
    same = DPOFitness(preset="tiny", cache_dir=str(tmp_path), train_size=48, heldout_size=32)
    assert same.evaluate(seed_fn("dpo"), 0).metrics["reference_cache_hits"] == 1


def test_prompt_truncation_keeps_the_end_of_the_prompt():
    from fitness.dpo.trainer import _truncate

    example = {"prompt_ids": list(range(10)), "chosen_ids": [20, 21, 22], "rejected_ids": [30]}
    assert _truncate(example, max_length=8, max_prompt_length=4) == {
        "prompt_ids": [6, 7, 8, 9], "chosen_ids": [20, 21, 22], "rejected_ids": [30]}
    example = {"prompt_ids": [1, 2], "chosen_ids": list(range(20, 30)), "rejected_ids": [30]}
    assert _truncate(example, max_length=8, max_prompt_length=4)["chosen_ids"] == [20, 21, 22, 23]
    short = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}
    assert _truncate(short, max_length=8, max_prompt_length=4) == short


# -- failures -----------------------------------------------------------------------------------------
def test_a_loss_that_becomes_infinite_in_training_is_an_error_naming_the_step(tmp_path):
    # Finite for the contract checks' batch sizes (1, 7, 16, 32), infinite for the training batch of 8.
    code = '''def blows_up(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    return -F.logsigmoid(self.beta * logits) / (logits.shape[0] - 8)
'''
    fitness = DPOFitness(preset="tiny", cache_dir=str(tmp_path), **FAST)
    result = run_candidate(fitness, 1, code, 0)
    assert result.status == "error", result.error
    assert "non-finite (nan or inf) at training step 1" in result.error
    with pytest.raises(GenomeError) as caught:
        fitness.evaluate(lambda pc, pr, rc, rr: (pc - pr) * float("nan"), 0)
    assert caught.value.status == "error"


def test_a_loss_of_the_wrong_shape_is_an_error(tmp_path):
    fitness = DPOFitness(preset="tiny", cache_dir=str(tmp_path), **FAST)
    with pytest.raises(GenomeError, match=r"returned \(\) at training step 1; expected shape \(8,\)"):
        fitness.evaluate(lambda pc, pr, rc, rr: -(pc - pr).mean(), 0)


# -- the reward-model scorer ---------------------------------------------------------------------------
def test_reward_model_scorer_reports_reward_and_kl(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from fitness.dpo.tiny import build_tokenizer

    tokenizer = build_tokenizer(0)
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2, num_labels=2,
                        pad_token_id=tokenizer.pad_token_id, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                        label2id={"NEGATIVE": 0, "POSITIVE": 1})
    classifier = tmp_path / "classifier"
    GPT2ForSequenceClassification(config).save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    fitness = DPOFitness(preset="tiny", cache_dir=str(tmp_path / "cache"), scorer="reward-model",
                         reward_model=str(classifier), kl_penalty=0.5, **FAST)
    score = fitness.evaluate(seed_fn("dpo"), 0)
    metrics = score.metrics
    assert metrics["samples"] == 16 and metrics["kl_penalty"] == 0.5
    assert score.fitness == pytest.approx(metrics["reward"] - 0.5 * metrics["kl"])
    assert abs(metrics["kl"]) < 50 and metrics["response_tokens"] > 0


# -- the CLI ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_evaluates_a_loss_file_on_the_tiny_preset(tmp_path, capsys):
    code = tmp_path / "dpo.py"
    code.write_text(SEEDS["dpo"].code)
    status = main(["evaluate", "--fitness", "dpo", "--preset", "tiny", "--code", str(code), "--json",
                   "--fitness-opt", f"cache_dir={tmp_path / 'cache'}", "--timeout", "300"])
    payload = json.loads(capsys.readouterr().out)
    assert status == 0, payload
    assert payload["status"] == "ok" and payload["fitness_name"] == "dpo"
    assert payload["fitness"] == payload["metrics"]["heldout_accuracy"] > 0.6


def test_in_jailed_workers_the_reference_cache_is_filled_before_any_genome_and_only_read_by_them(tmp_path):
    """prepare() (the warm worker) computes the training pairs' reference log-probabilities; each
    genome's process finds them in the cache, which it can read but not write."""
    from engine import jail
    from engine.executor import ProcessExecutor

    sandbox = jail.choose("auto")
    if not sandbox.jailed:
        pytest.skip("needs an OS jail")
    cache = tmp_path / "cache"
    options = {"cache_dir": str(cache), "train_size": 64, "heldout_size": 32}
    needs = DPOFitness(**options).sandbox_needs()
    assert needs.trusted_writable == (str(cache),) and str(cache) in needs.writable
    results = []
    with ProcessExecutor("dpo", options, workers=1, timeout=300, sandbox=sandbox,
                         log_path=tmp_path / "workers.log") as executor:
        before = None
        executor.run([(0, preference_seeds()[0].code)], 0, None, results.append)
        before = sorted(p.name for p in cache.rglob("*"))
        executor.run([(1, preference_seeds()[1].code)], 0, None, results.append)
    for result in results:
        assert result.ok, result.error
        assert (result.metrics["reference_cache_hits"], result.metrics["reference_cache_misses"]) == (1, 0)
        assert result.metrics["reference_forwards"] == 0
    assert before and sorted(p.name for p in cache.rglob("*")) == before
    # The same score as in one process (which computes the reference itself).
    local = DPOFitness(**{**options, "cache_dir": str(tmp_path / "local")}).evaluate(seed_fn("dpo"), 0)
    assert results[0].fitness == local.fitness
