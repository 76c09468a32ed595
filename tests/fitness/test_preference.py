"""The preference-loss contract and the published seed losses."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine.genome import GenomeError, check_genome, compile_genome, function_name
from fitness.preference import PreferenceHparams, PreferenceInterface, preference_seeds

torch.set_num_threads(1)

SEED_NAMES = ["dpo", "slic", "ipo", "kto_pair", "lrml", "padll", "aqfl", "dbaql", "aql", "cell", "pfl"]


# -- independent re-implementations of the published formulas (z = beta * logits) ----------
def _logits(pc, pr, rc, rr):
    return (pc - pr) - (rc - rr)


def ref_dpo(beta, pc, pr, rc, rr):
    return -F.logsigmoid(beta * _logits(pc, pr, rc, rr))


def ref_slic(beta, pc, pr, rc, rr):
    return (1 - beta * _logits(pc, pr, rc, rr)).clamp(min=0)


def ref_ipo(beta, pc, pr, rc, rr):
    return (_logits(pc, pr, rc, rr) - 1 / (2 * beta)).pow(2)


def ref_kto_pair(beta, pc, pr, rc, rr):
    chosen_kl = torch.clamp((pc - rc).mean(), min=0)
    rejected_kl = torch.clamp((pr - rr).mean(), min=0)
    halves = torch.stack([
        1 - torch.sigmoid(beta * ((pc - rc) - rejected_kl)),
        1 - torch.sigmoid(beta * (chosen_kl - (pr - rr))),
    ])
    return halves.sum(0)


def ref_lrml(beta, pc, pr, rc, rr):
    z = beta * _logits(pc, pr, rc, rr)
    m = 1 / (1 + torch.exp(-z / 0.05))
    return (1 - m) * torch.log1p(torch.exp(-z)) + m * torch.exp(-z)


def ref_padll(beta, pc, pr, rc, rr):
    h = _logits(pc, pr, rc, rr)
    weight = torch.where(h < 0, torch.full_like(h, 0.45), torch.full_like(h, 0.9))
    return weight * torch.log1p(torch.exp(-beta * h))


def _logistic_and_hinge(z):
    return torch.log1p(torch.exp(-z)), torch.clamp(1 - z, min=0)


def ref_aqfl(beta, pc, pr, rc, rr):
    z = beta * _logits(pc, pr, rc, rr)
    u = z / 0.05
    q = u.std(unbiased=True) * torch.sigmoid(-u).mean()
    q = q + 0.05 * (torch.sigmoid(u.mean()) - q)
    w = torch.sigmoid(0.1 * torch.abs(u - q))
    logistic, hinge = _logistic_and_hinge(z)
    return w * logistic + (1 - w) * hinge


def ref_dbaql(beta, pc, pr, rc, rr):
    z = beta * _logits(pc, pr, rc, rr)
    c = torch.sigmoid(torch.var(z / 0.05, unbiased=True))
    return c * torch.log1p(torch.exp(-z / 0.9)) + (1 - c) * torch.exp(-0.9 * z)


def ref_aql(beta, pc, pr, rc, rr):
    z = beta * _logits(pc, pr, rc, rr)
    u = z / 0.05
    q = 0.5 + 0.01 * (torch.sigmoid(u.mean()) - 0.5)
    w = torch.sigmoid(q - u)
    logistic, hinge = _logistic_and_hinge(z)
    return w * logistic + (1 - w) * hinge


def ref_cell(beta, pc, pr, rc, rr):
    z = beta * _logits(pc, pr, rc, rr)
    return 0.5 * torch.exp(-z) + 0.5 * torch.log1p(torch.exp(-z))


def ref_pfl(beta, pc, pr, rc, rr):
    z = beta * _logits(pc, pr, rc, rr)
    logistic, hinge = _logistic_and_hinge(z)
    return torch.where(pc > pr, 0.5 * logistic, 2.0 * hinge)


REFERENCES = {name: globals()[f"ref_{name}"] for name in SEED_NAMES}


def _inputs(batch: int, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    rc = -(20 + 60 * torch.rand(batch, generator=generator, dtype=dtype))
    rr = -(20 + 60 * torch.rand(batch, generator=generator, dtype=dtype))
    pc = rc + 15 * torch.randn(batch, generator=generator, dtype=dtype)
    pr = rr + 15 * torch.randn(batch, generator=generator, dtype=dtype)
    return pc, pr, rc, rr


def _compiled(seed):
    return compile_genome(seed.code, PreferenceInterface.arg_counts)


# -- seeds ---------------------------------------------------------------------------------
def test_seeds_are_the_paper_losses_dpo_first():
    seeds = preference_seeds()
    assert [s.name for s in seeds] == SEED_NAMES
    for seed in seeds:
        assert function_name(seed.code) == seed.name
        assert seed.thought and "\n" not in seed.thought


@pytest.mark.parametrize("seed", preference_seeds(), ids=lambda s: s.name)
def test_seed_passes_static_check_and_contract(seed):
    check_genome(seed.code, PreferenceInterface.arg_counts)
    fn = _compiled(seed)
    PreferenceInterface().check(fn)
    assert "self.beta" in seed.code


@pytest.mark.parametrize("seed", preference_seeds(), ids=lambda s: s.name)
@pytest.mark.parametrize("beta", [0.05, 0.1])
def test_seed_matches_published_formula(seed, beta):
    interface = PreferenceInterface(beta=beta)
    fn = _compiled(seed)
    for trial in range(3):
        pc, pr, rc, rr = _inputs(33, seed=trial)
        got = interface.call(fn, dict(
            policy_chosen_logps=pc, policy_rejected_logps=pr,
            reference_chosen_logps=rc, reference_rejected_logps=rr,
        ))
        expected = REFERENCES[seed.name](beta, pc, pr, rc, rr)
        assert got.shape == (33,)
        # rtol 1e-6: PADLL casts its mismatch mask with .float() (float32), as published.
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9), seed.name


@pytest.mark.parametrize("name", ["aqfl", "dbaql"])
def test_batch_statistic_seeds_are_finite_for_a_batch_of_one(name):
    seed = next(s for s in preference_seeds() if s.name == name)
    fn = _compiled(seed)
    pc, pr, rc, rr = _inputs(1, seed=0)
    losses = fn(PreferenceHparams(), pc, pr, rc, rr)
    assert losses.shape == (1,) and torch.isfinite(losses).all()


# -- the interface -------------------------------------------------------------------------
def test_sample_inputs_are_realistic_log_probabilities():
    inputs = PreferenceInterface().sample_inputs(64, torch.Generator().manual_seed(0))
    assert list(inputs) == [
        "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
    ]
    for name, tensor in inputs.items():
        assert tensor.shape == (64,)
        assert tensor.requires_grad == name.startswith("policy")
        assert (tensor < 0).all()
    assert inputs["policy_chosen_logps"].std() > 1


def test_call_accepts_self_four_tensor_and_beta_forms():
    interface = PreferenceInterface(beta=0.2)
    inputs = interface.sample_inputs(5, torch.Generator().manual_seed(1))
    expected = ref_dpo(0.2, *inputs.values())

    def with_self(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        return -F.logsigmoid(self.beta * _logits(policy_chosen_logps, policy_rejected_logps,
                                                 reference_chosen_logps, reference_rejected_logps))

    def four(pc, pr, rc, rr):
        return -F.logsigmoid(0.2 * _logits(pc, pr, rc, rr))

    def with_beta(pc, pr, rc, rr, beta):
        return -F.logsigmoid(beta * _logits(pc, pr, rc, rr))

    def trl_tuple(self, pc, pr, rc, rr):
        losses = with_self(self, pc, pr, rc, rr)
        return losses, self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()

    for fn in (with_self, four, with_beta, trl_tuple):
        assert torch.allclose(interface.call(fn, inputs), expected), fn.__name__
        interface.check(fn)


def test_call_rejects_an_unknown_five_parameter_form():
    def odd(a, b, c, d, e):
        return a - b

    inputs = PreferenceInterface().sample_inputs(3, torch.Generator().manual_seed(0))
    with pytest.raises(GenomeError, match="expected \\(self"):
        PreferenceInterface().call(odd, inputs)


def test_hparams_are_frozen_and_beta_is_validated():
    hparams = PreferenceHparams(beta=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hparams.beta = 1.0  # type: ignore[misc]
    assert PreferenceHparams().beta == 0.05
    with pytest.raises(ValueError, match="-1"):
        PreferenceInterface(beta=-1)


def test_check_rejects_scalar_and_detached_losses():
    interface = PreferenceInterface()

    def scalar(self, pc, pr, rc, rr):
        return -F.logsigmoid(self.beta * _logits(pc, pr, rc, rr)).mean()

    def detached(self, pc, pr, rc, rr):
        return (pc * 0 + 1).detach()

    with pytest.raises(GenomeError, match="scalar"):
        interface.check(scalar)
    with pytest.raises(GenomeError):
        interface.check(detached)


def test_description_and_example_explain_the_contract():
    interface = PreferenceInterface()
    for word in ("policy_chosen_logps", "reference_rejected_logps", "self.beta", "(batch,)"):
        assert word in interface.description
    assert interface.signature.startswith("def loss(self, policy_chosen_logps")
    example = compile_genome(interface.example, interface.arg_counts)
    interface.check(example)
