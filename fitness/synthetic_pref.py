"""``synthetic-pref``: preference optimisation with a known reward, scored exactly on a CPU.

A miniature of the reward/KL frontier experiments of the DPO paper (Rafailov et al. 2023,
sec. 6.1, IMDb) and the DiscoPOP paper (Lu et al. 2024, sec. 5.1): a loss fine-tunes a policy
on noisy preference pairs, and the result is judged by the true reward it gains at a KL cost
to the reference model, relative to the best any policy could do.

The task, per problem instance (several independent instances per evaluation):

* **Prompts and responses.** A prompt is a context vector ``x``; a response is a sequence of
  ``positions`` tokens from a vocabulary of ``vocab``, conditionally independent given the
  prompt, so every expectation and KL is exact. A response's log-probability is the sum over
  its tokens, so log-probabilities and log-ratio margins have the magnitudes of real sequence
  log-probabilities (tens of nats) and the paper's ``beta = 0.05`` means what it means there.
* **Reference policy.** ``pi_ref(y_t | x)``: a softmax of fixed logits that are partly
  *anti*-aligned with the reward (an SFT model with bad habits), so good tokens are rare in
  the preference data and the policy must extrapolate to them.
* **True reward.** ``r(x, y) = sum_t r_t(x, y_t)``; 80% of its variance is linear in the
  policy's token features ``phi(x, t, v) = a(x) * b(t, v) + c(t, v)``, 20% is not
  (misspecification: losses differ in which projection of the reward they reach).
* **Preference data.** ``pairs`` response pairs sampled from ``pi_ref`` on ``train_prompts``
  prompts, labelled by Bradley-Terry on the true reward (``P(y1 > y2) = sigmoid(r1 - r2)``;
  at ``beta = 0.05`` sequence reward gaps are a fraction of a logit, so this is noisy, as
  human labels are) with a further ``label_noise`` share of labels flipped. About 58% of the
  labels agree with the true reward.
* **Policy.** ``logits = reference logits + theta . phi`` with ``theta`` (``features``
  numbers) initialised at zero, so training starts exactly at the reference. Full-batch Adam
  on the mean of the candidate's per-example losses for ``steps`` steps: Adam's update
  ignores a positive rescaling of the loss (``eps`` is 1e-12, far below any gradient), so a
  loss is judged by its shape, not its scale (to about 1e-3 relative: training runs in
  float32; the problem and the score are float64).
* **Score.** The KL-regularised objective ``J(pi) = E_x[E_pi r - kl_coef * KL(pi || pi_ref)]``
  on held-out prompts, computed exactly. ``J(pi) - J(pi_ref)`` is divided by the oracle's
  ``J(pi*) - J(pi_ref) = kl_coef * E_x log Z(x)``, where ``pi* ∝ pi_ref exp(r / kl_coef)`` is
  the best of all policies for that objective. So fitness is the share of the attainable
  regularised gain: 0 = stayed at the reference, 1 = the oracle, negative = worse than the
  reference. ``kl_coef`` defaults to ``beta``: the objective DPO's derivation targets, so
  DPO is not handicapped by the choice of score. The fitness is the mean over ``instances``
  problem instances drawn from the evaluation seed; per-instance scores and their spread
  are in the metrics.

Calibration (defaults, 8 instances): DPO scores about 0.56 (std 0.015 over evaluation seeds),
a constant loss exactly 0, sign-flipped DPO about -0.9, and the paper's DBAQL beats DPO on
every seed tried (+0.05). DPO falls short of 1 because the data are finite and noisy (its
maximum-likelihood fit overshoots the oracle's KL on some directions and undershoots on
others), the policy class is misspecified and training has a fixed budget: these are
problems a loss's shape can address (conservatism on confident pairs, robustness to flipped
labels, batch-level regularisation), not matters of scale or evaluation noise. Compare
candidates on the same evaluation seed: paired differences are far less noisy than scores.

All instances are trained at once: their parameters are independent, so one summed loss
gives each its own gradient, and Adam is per element. The candidate loss is still called
once per instance so that losses using batch statistics (AQFL, DBAQL, AQL) see one
instance's batch.

The two phases of the fitness contract (:mod:`fitness.base`): :meth:`SyntheticPreference.train`
runs the genome on the preference pairs and returns the trained ``theta``; :meth:`~SyntheticPreference.score`
computes the regularised objective from ``theta`` on the held-out prompts with the true reward.
The held-out part of the problem (held-out prompts, reward, oracle, label agreement) lives in
the plug-in's :attr:`~fitness.base.Fitness.held_out` store, which the engine wipes in the
genome's process. The problem's random numbers come from :func:`fitness.truth.draws` and it is
built by :func:`fitness.truth.build_secretly`: with a truth key (the default) a genome that
escaped every sandbox layer cannot regenerate it from the seed and this module's code; with
``--truth-key public`` it is a function of the seed alone, the same on every machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable

import torch

from engine.genome import GenomeError
from fitness.base import Artefacts, Descriptor, Fitness, Score, Seed, TensorSpec, losses_of
from fitness.truth import build_secretly, draws
from fitness.preference import SHAPE_PROFILE, PreferenceInterface, loss_shape_profile, preference_seeds

#: Problem generation and scoring run in float64 (exact, reproducible values); training in
#: float32, as real preference training does, at half the cost.
DTYPE = torch.float64
TRAIN_DTYPE = torch.float32
_EMBEDDING = 8  # dimension of prompt and token embeddings
_HIDDEN_WIDTH = 16  # width of the feature maps the policy does not see
_REFERENCE_SCALE = 1.5  # standard deviation of the reference logits (entropy well below uniform)


def _standardise(values: torch.Tensor) -> torch.Tensor:
    """Zero mean over the vocabulary (softmax ignores it), unit standard deviation per instance."""
    values = values - values.mean(dim=-1, keepdim=True)
    return values / values.flatten(1).std(dim=1).view(-1, *([1] * (values.dim() - 1)))


@dataclass(frozen=True)
class _Features:
    """The policy's token features ``phi(x, t, v) = a(x) * b(t, v) + c(t, v)`` in factored
    form, so that ``theta . phi`` for every token is one small matrix product."""

    prompt: torch.Tensor  # (I, P, d) a(x) for P prompts
    token: torch.Tensor  # (I, d, T*V) b(t, v)
    offset: torch.Tensor  # (I, d, T*V) c(t, v)

    def shift(self, theta: torch.Tensor) -> torch.Tensor:
        """``theta . phi`` of every prompt and token: (I, P, T*V) for ``theta`` (I, d)."""
        scaled = self.prompt * theta[:, None, :]
        return torch.bmm(scaled, self.token) + torch.bmm(theta[:, None, :], self.offset)

    def to(self, dtype: torch.dtype) -> _Features:
        return _Features(*(t.to(dtype).contiguous() for t in (self.prompt, self.token, self.offset)))


@dataclass(frozen=True)
class _Problem:
    """What training sees, for all instances (leading dimension ``instances``)."""

    features: _Features  # on the training prompts, in the training dtype
    reference_logits: torch.Tensor  # (I, C, T*V)
    context: torch.Tensor  # (I, N) prompt of each pair
    pair_features: torch.Tensor  # (I, 2N, d) features summed over chosen then rejected responses
    pair_reference: torch.Tensor  # (I, 2N) reference logits summed over the same responses


@dataclass(frozen=True)
class _HeldOut:
    """What only scoring sees: the held-out prompts, the true reward and the oracle."""

    label_agreement: torch.Tensor  # (I,) share of labels that agree with the true reward
    eval_features: _Features  # on the held-out prompts, float64
    eval_reference_logits: torch.Tensor  # (I, E, T, V)
    eval_reward: torch.Tensor  # (I, E, T, V)
    reference_value: torch.Tensor  # (I,) J(pi_ref) = E_ref r
    oracle_gain: torch.Tensor  # (I,) J(pi*) - J(pi_ref)
    oracle_kl: torch.Tensor  # (I,) KL(pi* || pi_ref)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"synthetic-pref option {name} must be an integer >= {low}, got {value!r}")
    return value


def _check_float(name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"synthetic-pref option {name} must be a number, got {value!r}")
    number = float(value)
    ok = (number > low if low_open else number >= low) and number < high and math.isfinite(number)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        upper = f" and < {high}" if math.isfinite(high) else ""
        raise ValueError(f"synthetic-pref option {name} must be {bound}{upper}, got {value!r}")
    return number


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
    extra_descriptors = tuple(SHAPE_PROFILE)
    descriptor_space = (
        Descriptor(
            "slope_at_zero", -2.0, 2.0, 6,
            "f'(0) / mean |f'| over z = beta*logits in [-10, 10]: DPO -1, hinge -1.8, near 0 for "
            "IPO or exponential losses, positive for DiscoPOP's bump at zero",
        ),
        Descriptor(
            "nonconvex_share", 0.0, 0.5, 5,
            "share of the slope's total variation over z in [-10, 10] that is a decrease "
            "(0 convex, 0.5 sigmoid-shaped)",
        ),
        Descriptor(
            "left_tail_growth", -1.5, 3.0, 6,
            "log10 |f'(-10)| / mean |f'| on [-1, 1]: bounded < 0, logistic 0.3, IPO 1.2, "
            "exponential > 3",
        ),
    )

    def __init__(
        self,
        beta: float = 0.05,
        instances: int = 8,
        steps: int = 120,
        learning_rate: float = 0.05,
        pairs: int = 1024,
        label_noise: float = 0.1,
        reward_scale: float = 2.5,
        kl_coef: float | None = None,
        misspecification: float = 0.2,
        positions: int = 16,
        vocab: int = 8,
        features: int = 32,
        train_prompts: int = 32,
        eval_prompts: int = 64,
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
        self._cached: tuple[int, _Problem] | None = None

    def seeds(self) -> list[Seed]:
        return preference_seeds()

    # -- the task ------------------------------------------------------------------------
    def train_problem(self, seed: int) -> _Problem:
        """The training side of the problem instances of ``seed`` (the last one is cached: a
        worker often scores several candidates on the same seed)."""
        if self._cached is None or self._cached[0] != seed:
            self._cache_problem(seed)
        return self._cached[1]

    def score_problem(self, seed: int) -> _HeldOut:
        """The held-out side of the problem instances of ``seed`` (scoring only)."""
        if seed not in self.held_out:
            self._cache_problem(seed)
        return self.held_out.get(seed, lambda: build_secretly(self._make_problem, seed)[1])

    def _cache_problem(self, seed: int) -> None:
        problem, held_out = build_secretly(self._make_problem, seed)
        self._cached = (seed, problem)
        if not self.held_out.wiped:
            self.held_out.put(seed, held_out)

    def _make_problem(self, seed: int) -> tuple[_Problem, _HeldOut]:
        random = draws(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)

        def normal(*shape: int) -> torch.Tensor:
            return random.randn(*shape, dtype=DTYPE)

        I, T, V, d = self.instances, self.positions, self.vocab, self.features  # noqa: E741 - the paper's sizes
        C, E, N = self.train_prompts, self.eval_prompts, self.pairs
        prompts = normal(I, C + E, _EMBEDDING)
        tokens = normal(I, T, V, _EMBEDDING)  # one embedding per (position, token)

        def projection(width: int) -> torch.Tensor:
            return normal(I, _EMBEDDING, width) / math.sqrt(_EMBEDDING)

        def tokens_through(matrix: torch.Tensor) -> torch.Tensor:  # (I, T, V, width)
            return torch.tanh(torch.einsum("itvk,ikw->itvw", tokens, matrix))

        def readout(values: torch.Tensor) -> torch.Tensor:
            """A random linear read-out of (I, C+E, T, V, width) features, standardised."""
            return _standardise(torch.einsum("ictvw,iw->ictv", values, normal(I, values.shape[-1])))

        def joint_map(width: int) -> torch.Tensor:
            """Features the policy does not have: tanh of a prompt-token interaction."""
            pre = torch.bmm(prompts, projection(width))[:, :, None, None, :] * torch.einsum(
                "itvk,ikw->itvw", tokens, projection(width))[:, None]
            return torch.tanh(pre + torch.einsum("itvk,ikw->itvw", tokens, projection(width))[:, None])

        prompt_factor = torch.tanh(torch.bmm(prompts, projection(d)))  # (I, C+E, d)
        token_factor = tokens_through(projection(d)).reshape(I, T * V, d)
        token_offset = tokens_through(projection(d)).reshape(I, T * V, d)
        features = _Features(prompt_factor, token_factor.transpose(1, 2), token_offset.transpose(1, 2))
        representable = _standardise(features.shift(normal(I, d)).view(I, C + E, T, V))
        m = self.misspecification
        # What the policy's features can express, plus a share they cannot.
        reward_shape = _standardise(
            math.sqrt(1 - m) * representable + math.sqrt(m) * readout(joint_map(_HIDDEN_WIDTH))
        )
        reward = self.kl_coef * self.reward_scale * reward_shape  # (I, C+E, T, V)
        # The reference has habits of its own, partly against the reward: good tokens are rare
        # in its samples, as an SFT model's bad habits are common in its responses.
        habits = readout(joint_map(_HIDDEN_WIDTH))
        reference_logits = _REFERENCE_SCALE * _standardise(0.8 * habits - 0.6 * reward_shape)

        # Preference pairs: two responses from the reference on a random training prompt.
        train_reference = reference_logits[:, :C]
        context = random.randint(C, (I, N))
        rows = torch.arange(I)[:, None]
        cumulative = torch.softmax(train_reference, dim=-1).cumsum(-1)[rows, context]  # (I, N, T, V)

        def sample() -> torch.Tensor:  # inverse-CDF sampling of every token at once
            uniform = random.rand(I, N, T, 1, dtype=DTYPE)
            return (uniform > cumulative).sum(-1).clamp(max=V - 1)

        first, second = sample(), sample()
        token_reward = reward[:, :C][rows, context]  # (I, N, T, V)
        r_first = token_reward.gather(-1, first[..., None]).squeeze(-1).sum(-1)
        r_second = token_reward.gather(-1, second[..., None]).squeeze(-1).sum(-1)
        # Bradley-Terry on the true reward, then a share of labels flipped.
        first_wins = random.rand(I, N, dtype=DTYPE) < torch.sigmoid(r_first - r_second)
        first_wins ^= random.rand(I, N, dtype=DTYPE) < self.label_noise
        chosen = torch.where(first_wins[..., None], first, second)
        rejected = torch.where(first_wins[..., None], second, first)
        agreement = ((r_first > r_second) == first_wins).to(DTYPE).mean(dim=1)

        responses = torch.cat([chosen, rejected], dim=1)  # (I, 2N, T)
        pair_prompt = torch.cat([context, context], dim=1)
        flat = torch.arange(T) * V + responses  # index into T*V
        item = torch.arange(I)[:, None, None]
        pair_features = (
            prompt_factor[item[..., 0], pair_prompt] * token_factor[item, flat].sum(2)
            + token_offset[item, flat].sum(2)
        )
        pair_reference = train_reference.reshape(I, C, T * V)[item, pair_prompt[..., None], flat].sum(2)

        eval_reference = reference_logits[:, C:]
        eval_reward = reward[:, C:]
        ref_log_probs = torch.log_softmax(eval_reference, dim=-1)
        reference_value = (ref_log_probs.exp() * eval_reward).sum(dim=(-1, -2)).mean(dim=1)
        oracle_logits = ref_log_probs + eval_reward / self.kl_coef
        oracle_value = self.kl_coef * torch.logsumexp(oracle_logits, dim=-1).sum(-1).mean(dim=1)
        oracle_log_probs = torch.log_softmax(oracle_logits, dim=-1)
        oracle_kl = (oracle_log_probs.exp() * (oracle_log_probs - ref_log_probs)).sum(dim=(-1, -2)).mean(dim=1)
        train_features = _Features(prompt_factor[:, :C], features.token, features.offset)
        problem = _Problem(
            features=train_features.to(TRAIN_DTYPE),
            reference_logits=train_reference.reshape(I, C, T * V).to(TRAIN_DTYPE).contiguous(),
            context=context,
            pair_features=pair_features.to(TRAIN_DTYPE).contiguous(),
            pair_reference=pair_reference.to(TRAIN_DTYPE).contiguous(),
        )
        # The held-out side owns its tensors (clones): wiping it never touches training data, and
        # none is a view of a tensor that holds more (with one instance, reward[:, C:] is a
        # contiguous view of the reward on the training prompts too).
        def own(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.clone()  # a slice with gaps comes out contiguous; a dense one keeps its strides

        held_out = _HeldOut(
            label_agreement=agreement,
            eval_features=_Features(own(prompt_factor[:, C:]), own(features.token), own(features.offset)),
            eval_reference_logits=own(eval_reference),
            eval_reward=own(eval_reward),
            reference_value=reference_value,
            oracle_gain=oracle_value - reference_value,
            oracle_kl=oracle_kl,
        )
        return problem, held_out

    def _sequence_logps(self, problem: _Problem, theta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities ``(I, N)`` of the chosen and rejected responses.

        The logits are linear in ``theta``, so a response's unnormalised score is its summed
        reference logit plus its summed features dotted with ``theta``; only the normalisers
        (one log-sum-exp per prompt and position) need every token's logit.
        """
        logits = problem.reference_logits  # (I, C, T*V)
        scores = problem.pair_reference  # (I, 2N)
        if theta is not None:
            logits = logits + problem.features.shift(theta)
            scores = scores + torch.einsum("ind,id->in", problem.pair_features, theta)
        shape = (logits.shape[0], self.train_prompts, self.positions, self.vocab)
        normaliser = torch.logsumexp(logits.view(shape), dim=-1).sum(-1).gather(1, problem.context)
        chosen, rejected = scores.split(self.pairs, dim=1)
        return chosen - normaliser, rejected - normaliser

    def _value(self, problem: _HeldOut, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per instance: J(pi) - J(pi_ref), the reward gained and KL(pi || pi_ref) (mean over prompts)."""
        theta = theta.detach().to(DTYPE)
        logits = problem.eval_reference_logits + problem.eval_features.shift(theta).view(
            problem.eval_reference_logits.shape)
        log_probs = torch.log_softmax(logits, dim=-1)
        ref_log_probs = torch.log_softmax(problem.eval_reference_logits, dim=-1)
        probs = log_probs.exp()
        reward = (probs * problem.eval_reward).sum(dim=(-1, -2)).mean(dim=1)
        kl = (probs * (log_probs - ref_log_probs)).sum(dim=(-1, -2)).mean(dim=1)
        reward_gain = reward - problem.reference_value
        return reward_gain - self.kl_coef * kl, reward_gain, kl

    # -- the plug-in contract -------------------------------------------------------------
    def prepare(self, seed: int) -> None:
        self.train_problem(seed)
        self.score_problem(seed)

    def artefact_spec(self, seed: int) -> dict[str, TensorSpec]:
        return {"theta": TensorSpec((self.instances, self.features), TRAIN_DTYPE)}

    def train(self, fn: Callable, seed: int) -> Artefacts:
        """Full-batch Adam on the preference pairs with ``fn`` as the loss; returns ``theta``."""
        problem = self.train_problem(seed)
        loss_fn = self.interface.bind(fn)
        ref_chosen, ref_rejected = self._sequence_logps(problem, None)
        theta = torch.zeros(self.instances, self.features, dtype=TRAIN_DTYPE, requires_grad=True)
        theta.grad = torch.zeros_like(theta)  # stays zero for a loss without a gradient
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
        return {"theta": theta.detach()}

    def score(self, artefacts: Artefacts, seed: int) -> Score:
        """The share of the oracle's regularised gain that ``theta`` reaches on held-out prompts."""
        theta = artefacts["theta"]
        problem, held_out = self.train_problem(seed), self.score_problem(seed)
        with torch.no_grad():
            gain, reward_gain, kl = self._value(held_out, theta)
            per_instance = gain / held_out.oracle_gain
            ref_chosen, ref_rejected = self._sequence_logps(problem, None)
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
            "oracle_gain": float(held_out.oracle_gain.mean()),
            "oracle_kl": float(held_out.oracle_kl.mean()),
            "train_accuracy": float(accuracy.mean()),
            "label_agreement": float(held_out.label_agreement.mean()),
            "mean_margin": float((self.beta * margins).mean()),
            "steps": self.steps,
        }
        return Score(fitness=fitness, metrics=metrics)

    def _loss(self, loss_fn, chosen, rejected, ref_chosen, ref_rejected, step: int) -> torch.Tensor:
        total = chosen.new_zeros(())
        for i in range(self.instances):
            try:
                # The reference tensors are cloned: an in-place edit by the loss must not leak into
                # the next step.
                losses = losses_of(loss_fn(chosen[i], rejected[i], ref_chosen[i].clone(), ref_rejected[i].clone()))
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

    def validation_fitness(self) -> tuple[str, dict[str, object]]:
        """Held-out tasks for the end-of-run validation: the meta-test split of ``pref-suite``,
        preference problems of other policy classes, references, noise levels and betas that this
        single task never shows the search."""
        return "pref-suite", {"split": "test"}

    def descriptors(self, fn: Callable) -> dict[str, float]:
        """The grid's three shape axes, and the loss-shape profile that predicts known failures
        (:data:`fitness.preference.SHAPE_PROFILE`: slope and its sign at zero margin, growth
        for badly ordered pairs, boundedness), stored with every evaluation and shown by ``show``."""
        profile = loss_shape_profile(self.interface, fn)
        return {**loss_shape_descriptors(self.interface, fn),
                **{key: value for key, value in profile.items() if math.isfinite(value)}}


def loss_shape_descriptors(interface: PreferenceInterface, fn: Callable, points: int = 401) -> dict[str, float]:
    """Shape descriptors of the loss as a function of ``z = beta * logits`` on a grid over
    [-10, 10], without training (the grid is one batch: the chosen log-probability moves,
    the rest is fixed). All three are unchanged by a positive rescaling of the loss.

    * ``slope_at_zero``: ``f'(0) / mean |f'|`` over the grid (DPO -1, hinge -1.8; positive
      for DiscoPOP-like losses, whose modulation makes a bump at zero).
    * ``nonconvex_share``: the share of the slope's total variation over the grid that is a
      decrease (0 for convex losses, 0.5 for a sigmoid-shaped, bounded loss).
    * ``left_tail_growth``: ``log10(|f'(-10)| / mean |f'| on [-1, 1])``: how hard badly
      ordered pairs are pushed (bounded losses < 0, logistic 0.3, IPO 1.2, exponential 4).
    """
    z = torch.linspace(-10.0, 10.0, points, dtype=DTYPE)
    reference_chosen = torch.full_like(z, -40.0)
    reference_rejected = torch.full_like(z, -45.0)
    policy_rejected = reference_rejected.clone().requires_grad_(True)
    policy_chosen = (reference_chosen + z / interface.beta).requires_grad_(True)
    losses = losses_of(interface.bind(fn)(policy_chosen, policy_rejected, reference_chosen, reference_rejected))
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (points,) or not losses.requires_grad:
        return {"slope_at_zero": 0.0, "nonconvex_share": 0.0, "left_tail_growth": 0.0}
    losses.sum().backward()
    if policy_chosen.grad is None:
        return {"slope_at_zero": 0.0, "nonconvex_share": 0.0, "left_tail_growth": 0.0}
    slope = policy_chosen.grad.detach() / interface.beta  # d f / d z
    if not torch.isfinite(slope).all():
        return {"slope_at_zero": 0.0, "nonconvex_share": 0.0, "left_tail_growth": 0.0}
    mean_abs = float(slope.abs().mean())
    tiny = 1e-12 + 1e-9 * mean_abs
    slope_at_zero = float(slope[points // 2]) / (mean_abs + tiny)
    change = slope[1:] - slope[:-1]
    variation = float(change.abs().sum())
    nonconvex = float((-change).clamp(min=0).sum()) / variation if variation > tiny else 0.0
    near = float(slope[z.abs() <= 1.0].abs().mean())
    left = math.log10((abs(float(slope[0])) + tiny) / (near + tiny))
    return {
        "slope_at_zero": max(-10.0, min(10.0, slope_at_zero)),
        "nonconvex_share": nonconvex,
        "left_tail_growth": max(-6.0, min(12.0, left)),
    }
