"""``synthetic-pref``: preference optimisation with a known reward, scored exactly on a CPU.

A miniature of the reward/KL frontier experiments of the DPO paper (Rafailov et al. 2023,
sec. 6.1, IMDb) and the DiscoPOP paper (Lu et al. 2024, sec. 5.1): a loss is used to
fine-tune a policy on noisy preference pairs, and the result is judged by the true reward it
gains at a KL cost to the reference model, relative to the best any policy could do.

The task, per problem instance (several independent instances per evaluation):

* **Prompts and responses.** A prompt is a context vector ``x``; a response is a sequence of
  ``positions`` tokens from a vocabulary of ``vocab`` (a tiny "language model" whose tokens
  are conditionally independent given the prompt, so every expectation is exact). A
  response's log-probability is the sum over its tokens, so log-probabilities and log-ratio
  margins have the magnitudes of real sequence log-probabilities (tens of nats) and
  ``beta = 0.05`` is as meaningful as in the paper.
* **Reference policy.** ``pi_ref(y_t | x)`` is a softmax of fixed logits that are partly
  *anti*-aligned with the reward (the SFT model has bad habits), so good tokens are rare in
  the preference data and must be extrapolated to.
* **True reward.** ``r(x, y) = sum_t r_t(x, y_t)``. Most of it is linear in the policy's
  token features ``phi(x, t, v)`` and a share is not (misspecification: the policy class
  cannot represent the oracle exactly, so losses differ in which projection they reach).
* **Preference data.** ``pairs`` response pairs sampled from ``pi_ref`` on ``train_prompts``
  prompts, labelled by Bradley-Terry on the true reward (``P(y1 > y2) = sigmoid(r1 - r2)``,
  itself noisy: sequence reward gaps are a fraction of a logit) with a further ``label_noise``
  share of labels flipped (annotator error).
* **Policy.** ``logits = reference logits + theta . phi(x, t, v)`` with ``theta`` initialised
  at zero, so training starts exactly at the reference. Training is full-batch Adam on the
  mean of the candidate's per-example losses for a fixed number of ``steps``; Adam's update
  ignores a positive rescaling of the loss (``eps`` is 1e-12, far below any gradient), so a
  loss is judged by its shape, not its scale. Everything is float64 and deterministic.
* **Score.** The KL-regularised objective ``J(pi) = E_x[E_pi r - kl_coef * KL(pi || pi_ref)]``
  on held-out prompts, exactly. ``J(pi) - J(pi_ref)`` is divided by the oracle's
  ``J(pi*) - J(pi_ref) = kl_coef * E_x log Z(x)`` where ``pi* ∝ pi_ref exp(r / kl_coef)`` is
  the best policy of all for that objective, so fitness is the share of the attainable
  regularised gain: 0 = stayed at the reference, 1 = the oracle, negative = worse than the
  reference. ``kl_coef`` defaults to ``beta`` (the objective DPO's derivation targets).
  The fitness is the mean over ``instances`` problem instances drawn from the evaluation
  seed; their per-instance scores and spread are reported in the metrics.

Why DPO does not reach 1: finite, noisy data (DPO's maximum-likelihood fit overfits the label
noise and pushes rare responses around), misspecification and a budget of steps. Losses that
are more conservative on confidently separated pairs or more robust to flipped labels can do
better, which leaves room for discovery that is not a matter of scale or evaluation noise.

All instances are trained at once: their parameters are independent, so one summed loss
gives each its own gradient, and Adam is per element. The candidate loss is still called
once per instance so that losses using batch statistics (AQFL, DBAQL, AQL) see one
instance's batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from engine.genome import GenomeError
from fitness.base import Descriptor, Fitness, Score, Seed, losses_of
from fitness.preference import PreferenceInterface, preference_seeds

DTYPE = torch.float64


@dataclass(frozen=True)
class _Problem:
    """Tensors of all instances (leading dimension ``instances``)."""

    features: torch.Tensor  # (I, C, T, V, d) policy features on the training prompts
    reference_logits: torch.Tensor  # (I, C, T, V)
    chosen_index: torch.Tensor  # (I, N, T) flat indices into (C, T, V) of chosen tokens
    rejected_index: torch.Tensor  # (I, N, T)
    label_agreement: torch.Tensor  # (I,) share of labels that agree with the true reward
    eval_features: torch.Tensor  # (I, E, T, V, d) on held-out prompts
    eval_reference_logits: torch.Tensor  # (I, E, T, V)
    eval_reward: torch.Tensor  # (I, E, T, V)
    reference_value: torch.Tensor  # (I,) J(pi_ref) = E_ref r
    oracle_gain: torch.Tensor  # (I,) J(pi*) - J(pi_ref)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"synthetic-pref option {name} must be an integer >= {low}, got {value!r}")
    return value


def _check_float(name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"synthetic-pref option {name} must be a number, got {value!r}")
    value = float(value)
    ok = (value > low if low_open else value >= low) and value < high and math.isfinite(value)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        upper = f" and < {high}" if math.isfinite(high) else ""
        raise ValueError(f"synthetic-pref option {name} must be {bound}{upper}, got {value!r}")
    return value


class SyntheticPreference(Fitness):
    """Preference optimisation on a tiny sequence policy with a known reward (see module doc).

    Args:
        beta: ``self.beta`` seen by the loss.
        instances: Problem instances per evaluation (fitness is their mean).
        steps: Full-batch Adam steps.
        learning_rate: Adam's step size.
        pairs: Preference pairs per instance.
        label_noise: Share of labels flipped after Bradley-Terry sampling.
        reward_scale: How far the oracle moves from the reference: the standard deviation of
            ``r_t / kl_coef`` over tokens (per-token oracle logit shift).
        kl_coef: KL cost in the score; ``None`` means ``beta``.
        misspecification: Share (0-1) of the reward's variance the policy cannot represent.
        positions: Tokens per response.
        vocab: Vocabulary size.
        features: Dimension of the policy's token features (trainable parameters per instance).
        train_prompts: Distinct prompts in the preference data.
        eval_prompts: Held-out prompts on which the policy is scored.
    """

    name = "synthetic-pref"
    interface = PreferenceInterface()
    baseline = "dpo"
    fitness_floor = -1.0
    descriptor_space = (
        Descriptor(
            "slope_at_zero", -2.0, 1.0, 6,
            "f'(0) / mean |f'| over z = beta*logits in [-10, 10]: negative pushes the margin up "
            "at zero (DPO -1), positive marks a local bump like DiscoPOP's",
        ),
        Descriptor(
            "nonconvex_share", 0.0, 0.3, 5,
            "share of z in [-10, 10] where the loss is clearly concave",
        ),
        Descriptor(
            "left_tail_growth", -2.0, 4.0, 6,
            "log10 of |f'(-10)| over the mean |f'| on [-1, 1]: how hard badly ordered pairs are "
            "pushed (bounded losses < 0, DPO 0.3, IPO > 1, exponential ~4)",
        ),
    )

    def __init__(
        self,
        beta: float = 0.05,
        instances: int = 4,
        steps: int = 200,
        learning_rate: float = 0.05,
        pairs: int = 512,
        label_noise: float = 0.1,
        reward_scale: float = 1.5,
        kl_coef: float | None = None,
        misspecification: float = 0.2,
        positions: int = 16,
        vocab: int = 8,
        features: int = 16,
        train_prompts: int = 64,
        eval_prompts: int = 128,
    ) -> None:
        self.beta = _check_float("beta", beta, 0.0)
        self.instances = _check_int("instances", instances, 1)
        self.steps = _check_int("steps", steps, 1)
        self.learning_rate = _check_float("learning_rate", learning_rate, 0.0)
        self.pairs = _check_int("pairs", pairs, 2)
        self.label_noise = _check_float("label_noise", label_noise, 0.0, 0.5, low_open=False)
        self.reward_scale = _check_float("reward_scale", reward_scale, 0.0)
        self.kl_coef = self.beta if kl_coef is None else _check_float("kl_coef", kl_coef, 0.0)
        self.misspecification = _check_float("misspecification", misspecification, 0.0, 1.0, low_open=False)
        self.positions = _check_int("positions", positions, 1)
        self.vocab = _check_int("vocab", vocab, 2)
        self.features = _check_int("features", features, 1)
        self.train_prompts = _check_int("train_prompts", train_prompts, 1)
        self.eval_prompts = _check_int("eval_prompts", eval_prompts, 1)
        self.interface = PreferenceInterface(beta=self.beta)

    def seeds(self) -> list[Seed]:
        return preference_seeds()

    # -- the task ------------------------------------------------------------------------
    def _problem(self, seed: int) -> _Problem:
        generator = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)

        def normal(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, dtype=DTYPE)

        I, T, V, d = self.instances, self.positions, self.vocab, self.features
        C, E, N = self.train_prompts, self.eval_prompts, self.pairs
        context_dim = 8
        prompts = normal(I, C + E, context_dim)
        tokens = normal(I, T, V, context_dim)  # one embedding per (position, token)

        def token_map(width: int) -> torch.Tensor:
            """A random feature map tanh((A x) * (B e) + D e): context-token interactions."""
            a = normal(I, width, context_dim) / math.sqrt(context_dim)
            b = normal(I, width, context_dim) / math.sqrt(context_dim)
            c = normal(I, width, context_dim) / math.sqrt(context_dim)
            from_prompt = torch.einsum("iwk,ick->icw", a, prompts)  # (I, C+E, w)
            from_token = torch.einsum("iwk,itvk->itvw", b, tokens)  # (I, T, V, w)
            own = torch.einsum("iwk,itvk->itvw", c, tokens)
            pre = from_prompt[:, :, None, None, :] * from_token[:, None] + own[:, None]
            return torch.tanh(pre)  # (I, C+E, T, V, w)

        def standardise(values: torch.Tensor) -> torch.Tensor:
            """Zero mean over tokens, unit standard deviation per instance."""
            values = values - values.mean(dim=-1, keepdim=True)
            return values / values.flatten(1).std(dim=1).view(-1, 1, 1, 1)

        phi = token_map(d)
        hidden = token_map(d)  # features the policy does not see
        representable = standardise(torch.einsum("icvtd,id->icvt", phi, normal(I, d)))
        unrepresentable = standardise(torch.einsum("icvtd,id->icvt", hidden, normal(I, d)))
        m = self.misspecification
        reward_shape = standardise(math.sqrt(1 - m) * representable + math.sqrt(m) * unrepresentable)
        reward = self.kl_coef * self.reward_scale * reward_shape  # (I, C+E, T, V)
        # The reference: its own preferences, partly against the reward (bad habits).
        habits = standardise(torch.einsum("icvtd,id->icvt", token_map(d), normal(I, d)))
        reference_logits = 1.5 * standardise(0.8 * habits - 0.6 * reward_shape)

        # Preference pairs from the reference on the training prompts.
        train_ref = reference_logits[:, :C]
        context = torch.randint(C, (I, N), generator=generator)
        probs = torch.softmax(train_ref, dim=-1)[torch.arange(I)[:, None], context]  # (I, N, T, V)
        flat_probs = probs.reshape(-1, V)
        first = torch.multinomial(flat_probs, 1, generator=generator).view(I, N, T)
        second = torch.multinomial(flat_probs, 1, generator=generator).view(I, N, T)
        token_reward = reward[:, :C][torch.arange(I)[:, None], context]  # (I, N, T, V)
        r_first = token_reward.gather(-1, first[..., None]).squeeze(-1).sum(-1)
        r_second = token_reward.gather(-1, second[..., None]).squeeze(-1).sum(-1)
        first_wins = torch.rand(I, N, generator=generator, dtype=DTYPE) < torch.sigmoid(r_first - r_second)
        flip = torch.rand(I, N, generator=generator, dtype=DTYPE) < self.label_noise
        first_wins = first_wins ^ flip
        chosen = torch.where(first_wins[..., None], first, second)
        rejected = torch.where(first_wins[..., None], second, first)
        r_chosen = torch.where(first_wins, r_first, r_second)
        r_rejected = torch.where(first_wins, r_second, r_first)
        agreement = (r_chosen > r_rejected).to(DTYPE).mean(dim=1)

        positions = torch.arange(T)
        base = (context[..., None] * T + positions) * V  # (I, N, T)
        eval_ref = reference_logits[:, C:]
        eval_reward = reward[:, C:]
        ref_log_probs = torch.log_softmax(eval_ref, dim=-1)
        reference_value = (ref_log_probs.exp() * eval_reward).sum(dim=(-1, -2)).mean(dim=1)
        log_z = torch.logsumexp(ref_log_probs + eval_reward / self.kl_coef, dim=-1)  # (I, E, T)
        oracle_value = self.kl_coef * log_z.sum(-1).mean(dim=1)
        return _Problem(
            features=phi[:, :C].contiguous(),
            reference_logits=train_ref.contiguous(),
            chosen_index=base + chosen,
            rejected_index=base + rejected,
            label_agreement=agreement,
            eval_features=phi[:, C:].contiguous(),
            eval_reference_logits=eval_ref.contiguous(),
            eval_reward=eval_reward.contiguous(),
            reference_value=reference_value,
            oracle_gain=oracle_value - reference_value,
        )

    def _sequence_logps(self, problem: _Problem, theta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = problem.reference_logits
        if theta is not None:
            logits = logits + torch.einsum("ictvd,id->ictv", problem.features, theta)
        log_probs = torch.log_softmax(logits, dim=-1).flatten(1)  # (I, C*T*V)
        I = log_probs.shape[0]
        chosen = log_probs.gather(1, problem.chosen_index.view(I, -1)).view(problem.chosen_index.shape).sum(-1)
        rejected = log_probs.gather(1, problem.rejected_index.view(I, -1)).view(problem.rejected_index.shape).sum(-1)
        return chosen, rejected

    def _value(self, problem: _Problem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per instance: J(pi) - J(pi_ref), the reward gained and KL(pi || pi_ref) (mean over prompts)."""
        logits = problem.eval_reference_logits + torch.einsum("ietvd,id->ietv", problem.eval_features, theta)
        log_probs = torch.log_softmax(logits, dim=-1)
        ref_log_probs = torch.log_softmax(problem.eval_reference_logits, dim=-1)
        probs = log_probs.exp()
        reward = (probs * problem.eval_reward).sum(dim=(-1, -2)).mean(dim=1)
        kl = (probs * (log_probs - ref_log_probs)).sum(dim=(-1, -2)).mean(dim=1)
        reward_gain = reward - problem.reference_value
        return reward_gain - self.kl_coef * kl, reward_gain, kl

    # -- the plug-in contract -------------------------------------------------------------
    def evaluate(self, fn: Callable, seed: int) -> Score:
        start = time.perf_counter()
        problem = self._problem(seed)
        loss_fn = self.interface.bind(fn)
        ref_chosen, ref_rejected = self._sequence_logps(problem, None)
        theta = torch.zeros(self.instances, self.features, dtype=DTYPE, requires_grad=True)
        optimiser = torch.optim.Adam([theta], lr=self.learning_rate, eps=1e-12)
        for step in range(1, self.steps + 1):
            chosen, rejected = self._sequence_logps(problem, theta)
            total = self._loss(loss_fn, chosen, rejected, ref_chosen, ref_rejected, step)
            optimiser.zero_grad(set_to_none=False)
            if total.requires_grad:
                total.backward()
            if not torch.isfinite(theta.grad).all():
                raise GenomeError(f"the gradient became non-finite at training step {step}", status="error")
            optimiser.step()
            if not torch.isfinite(theta).all():
                raise GenomeError(f"the policy parameters became non-finite at training step {step}", status="error")
        with torch.no_grad():
            gain, reward_gain, kl = self._value(problem, theta)
            per_instance = gain / problem.oracle_gain
            chosen, rejected = self._sequence_logps(problem, theta)
            margins = (chosen - rejected) - (ref_chosen - ref_rejected)
            accuracy = (margins > 0).to(DTYPE).mean(dim=1)
        scores = [float(v) for v in per_instance]
        fitness = sum(scores) / len(scores)
        spread = float(per_instance.std()) if len(scores) > 1 else 0.0
        metrics = {
            "per_instance": scores,
            "instance_std": spread,
            "reward_gain": float(reward_gain.mean()),
            "kl": float(kl.mean()),
            "objective_gain": float(gain.mean()),
            "oracle_gain": float(problem.oracle_gain.mean()),
            "train_accuracy": float(accuracy.mean()),
            "label_agreement": float(problem.label_agreement.mean()),
            "mean_margin": float((self.beta * margins).mean()),
            "steps": self.steps,
            "seconds": time.perf_counter() - start,
        }
        return Score(fitness=fitness, metrics=metrics)

    def _loss(self, loss_fn, chosen, rejected, ref_chosen, ref_rejected, step: int) -> torch.Tensor:
        total = chosen.new_zeros(())
        for i in range(self.instances):
            try:
                losses = losses_of(loss_fn(chosen[i], rejected[i], ref_chosen[i], ref_rejected[i]))
            except GenomeError:
                raise
            except Exception as exc:
                raise GenomeError(
                    f"the loss raised {type(exc).__name__} at training step {step}: {exc}", status="error"
                ) from exc
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (self.pairs,):
                found = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise GenomeError(
                    f"the loss returned {found} at training step {step}; expected shape ({self.pairs},)",
                    status="error",
                )
            total = total + losses.mean()
        if not torch.isfinite(total):
            raise GenomeError(f"the loss became non-finite (nan or inf) at training step {step}", status="error")
        return total

    def descriptors(self, fn: Callable) -> dict[str, float]:
        return loss_shape_descriptors(self.interface, fn)


def loss_shape_descriptors(interface: PreferenceInterface, fn: Callable, points: int = 201) -> dict[str, float]:
    """Shape descriptors of ``f(z)``, ``z = beta * logits`` on a grid over [-10, 10], without
    training. The grid is one batch: the chosen log-probability moves, the rest is fixed."""
    z = torch.linspace(-10.0, 10.0, points, dtype=DTYPE)
    reference_chosen = torch.full_like(z, -40.0)
    reference_rejected = torch.full_like(z, -45.0)
    policy_rejected = reference_rejected.clone().requires_grad_(True)
    policy_chosen = (reference_chosen + z / interface.beta).requires_grad_(True)
    losses = losses_of(interface.bind(fn)(policy_chosen, policy_rejected, reference_chosen, reference_rejected))
    losses.sum().backward()
    # d f / d z = d f / d policy_chosen * d policy_chosen / d z
    slope = policy_chosen.grad.detach() / interface.beta
    values = losses.detach()
    if not (torch.isfinite(slope).all() and torch.isfinite(values).all()):
        return {"slope_at_zero": 0.0, "nonconvex_share": 0.0, "left_tail_growth": 0.0}
    mean_abs = slope.abs().mean()
    tiny = 1e-12 + 1e-9 * float(mean_abs)
    zero = points // 2
    slope_at_zero = float(slope[zero] / (mean_abs + tiny))
    step = float(z[1] - z[0])
    second = values[2:] - 2 * values[1:-1] + values[:-2]
    nonconvex = float((second < -1e-3 * step * (mean_abs + tiny)).to(DTYPE).mean())
    near = slope[(z.abs() <= 1.0)].abs().mean()
    left = float(torch.log10((slope[0].abs() + tiny) / (near + tiny)))
    return {
        "slope_at_zero": max(-10.0, min(10.0, slope_at_zero)),
        "nonconvex_share": nonconvex,
        "left_tail_growth": max(-6.0, min(12.0, left)),
    }
