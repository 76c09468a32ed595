"""``pref-suite``: preference-loss discovery scored over a family of synthetic DPO settings,
with a meta-train part for selection and a disjoint meta-test part for validation.

Each task is a miniature of the reward/KL experiments of the DPO paper (Rafailov et al. 2023,
sec. 6.1) like ``synthetic-pref``, but tasks differ in the ways real DPO settings differ
(drawn per task by Latin hypercube sampling from a seeded generator):

* **policy class**: ``tabular`` (one logit per prompt, position and token: every prompt of
  the data is its own bandit, heavily over-parameterised, the regime of the IPO paper's
  argument; scored on the same prompts), ``linear`` (logits linear in fixed token features,
  as ``synthetic-pref``) or ``mlp`` (a one-hidden-layer network of the prompt, trunk randomly
  initialised, output layer at zero); the latter two are scored on held-out prompts;
* **reference policy**: ``good`` (partly aligned with the reward), ``poor`` (high entropy,
  uninformed, like a base model) or ``anti`` (partly anti-aligned, an SFT model with bad
  habits);
* **label noise**: 0 to 30% of the Bradley-Terry labels flipped;
* **signal** 1 to 4, log-uniform: the standard deviation of a response's true reward in
  logits of the Bradley-Terry labels, so about 66% to 88% of the labels agree with the reward
  before any flip (with flips, down to about 55%; human preference data sits in the lower
  part). Below 1, with a large beta, the best policy gains so little over the reference that
  normalised scores are mostly noise (DPO scores of -5 to -14 on such draws);
* **beta** 0.01 to 0.5, log-uniform (the small beta of the DiscoPOP paper's IMDb check, where
  LRML failed, is in range);
* **pairs** 128 to 1024 and **sequence length** 2 to 24 tokens;
* **misspecification** 0 to 50%: the share of the reward's variance in interactions between
  adjacent tokens, which no policy here can express (every policy factorises over positions
  given the prompt).

The score of a task is ``synthetic-pref``'s: the KL-regularised objective ``J(pi) = E_x[E_pi r
- beta * KL(pi || pi_ref)]`` computed exactly, as the share of the attainable gain:
``(J(pi) - J(pi_ref)) / (J(pi*) - J(pi_ref))`` where ``pi* ∝ pi_ref exp(r / beta)`` is the best
of all policies (with the interaction part, a Markov chain over positions: ``J(pi*) = beta *
log Z`` by the forward algorithm). 0 = stayed at the reference, 1 = the oracle (unreachable
when the reward is misspecified), negative = worse than the reference. The true reward is in
logit units of the Bradley-Terry labels (sequence-level standard deviation about ``signal``),
so DPO's maximum-likelihood target ``pi_ref exp(r / beta)`` *is* the oracle: a loss can only
beat DPO by handling finite, noisy data and a misspecified policy better, not because the
score favours another objective.

The fitness of a candidate is the robust aggregate of its gain over DPO on the same task and
evaluation seed (:func:`fitness.suites.base.aggregate`): by default the mean gain over tasks,
pulled down by any task where the loss falls more than 0.05 below DPO (``0.5 * mean + 0.5 *
min(mean, worst + 0.05)``), so DPO scores exactly 0 and a collapse on one task costs.
Per-(task, seed) scores and DPO's scores are in the metrics. Training: full-batch Adam (``eps``
1e-12, so the loss's positive scale does not matter) from the reference, in float32, 100 steps
at learning rate 0.05; problems and scores are float64.

Trust boundary: the training phase (:func:`train_policy`) receives a :class:`PreferenceData`:
the pairs, the reference policy on the training prompts and the policy's inputs; the reward,
the oracle and the evaluation prompts stay in the plug-in's held-out store. The loss-shape
profile (:func:`fitness.preference.loss_shape_profile`) needs the genome, so it is measured in
the training phase and returned as an artefact; the scoring phase copies it into the metrics.
Problems are deterministic functions of the task and the seed (a genome that escaped every
sandbox layer could regenerate them); the split guarantees who computes the score, not
secrecy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
import torch

from engine.genome import GenomeError
from fitness.base import Artefacts, Score, Seed, TensorSpec, losses_of
from fitness.preference import SHAPE_PROFILE, PreferenceInterface, loss_shape_profile, preference_seeds
from fitness.suites.base import Task, TaskSuite, check_losses, latin_hypercube, log_uniform, pick
from fitness.synthetic_pref import SyntheticPreference, loss_shape_descriptors
from fitness.truth import Draws

DTYPE = torch.float64
TRAIN_DTYPE = torch.float32
POLICIES = ("tabular", "linear", "mlp")
#: Reference kinds: (alignment of the reference logits with the expressible reward, logit scale).
REFERENCES = {"good": (0.5, 1.5), "poor": (0.0, 0.5), "anti": (-0.6, 1.5)}
_EMBEDDING = 8  # prompt and token embedding width
_LINEAR_FEATURES = 16  # parameters of the linear policy
_HIDDEN = 16  # width of the MLP policy and of the hidden maps


@dataclass(frozen=True)
class PreferenceTaskSpec:
    """The parameters of one synthetic preference task (see the module doc)."""

    policy: str
    reference: str
    label_noise: float
    beta: float
    pairs: int
    positions: int
    misspecification: float
    vocab: int = 8
    train_prompts: int = 32
    eval_prompts: int = 64
    signal: float = 2.0
    steps: int = 100
    learning_rate: float = 0.05


def draw_preference_tasks(count: int, rng: np.random.Generator) -> list[PreferenceTaskSpec]:
    """``count`` task specs, one Latin-hypercube stratum per task along every factor."""
    specs = []
    for u in latin_hypercube(count, 8, rng):
        specs.append(PreferenceTaskSpec(
            policy=pick(u[0], POLICIES),
            reference=pick(u[1], tuple(REFERENCES)),
            label_noise=round(0.3 * float(u[2]), 3),
            beta=float(f"{log_uniform(u[3], 0.01, 0.5):.3g}"),
            pairs=int(round(log_uniform(u[4], 128, 1024))),
            positions=int(round(log_uniform(u[5], 2, 24))),
            misspecification=round(0.5 * float(u[6]), 3),
            signal=float(f"{log_uniform(u[7], 1.0, 4.0):.3g}"),
        ))
    return specs


# -- what training sees ---------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceData:
    """A task's training data: the preference pairs and the reference policy, plus the
    policy's inputs (features or prompt embeddings). No reward, no held-out prompts.

    ``reference_logits`` (C, T, V); ``context`` (N,) prompt of each pair; ``chosen``,
    ``rejected`` (N, T) token ids; ``inputs`` the policy class's inputs on the C prompts.
    """

    policy: str
    beta: float
    steps: int
    learning_rate: float
    reference_logits: torch.Tensor
    context: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    inputs: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Truth:
    """What scoring needs (never handed to training), on the evaluation prompts (E of them)."""

    inputs: dict[str, torch.Tensor]  # the policy's inputs on the evaluation prompts
    reference_logits: torch.Tensor  # (E, T, V)
    reward: torch.Tensor  # (E, T, V) additive part
    interaction: torch.Tensor  # (T-1, V, V) reward of adjacent token pairs
    # Scalars as 0-d float64 tensors, not Python floats, so that wiping zeroes them too.
    reference_value: torch.Tensor  # J(pi_ref)
    oracle_value: torch.Tensor  # J(pi*)
    label_agreement: torch.Tensor


def _standardise(values: torch.Tensor) -> torch.Tensor:
    values = values - values.mean(dim=-1, keepdim=True)
    return values / values.std().clamp_min(1e-12)


def policy_shift(policy: str, inputs: dict[str, torch.Tensor], parameters: dict[str, torch.Tensor],
                 shape: tuple[int, int, int]) -> torch.Tensor:
    """The policy's logit shift over the reference, (P, T, V), for ``parameters``."""
    P, T, V = shape
    if policy == "tabular":
        return parameters["theta"].view(P, T, V)
    if policy == "linear":
        theta = parameters["theta"]
        shift = (inputs["prompt"] * theta) @ inputs["token"] + theta @ inputs["offset"]
        return shift.view(P, T, V)
    hidden = torch.tanh(inputs["prompt"] @ parameters["w1"] + parameters["b1"])
    return (hidden @ parameters["w2"] + parameters["b2"]).view(P, T, V)


def initial_parameters(policy: str, inputs: dict[str, torch.Tensor], shape: tuple[int, int, int],
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Parameters at which the policy equals the reference (a zero shift)."""
    P, T, V = shape
    if policy == "tabular":
        return {"theta": torch.zeros(P * T * V, dtype=dtype)}
    if policy == "linear":
        return {"theta": torch.zeros(inputs["token"].shape[0], dtype=dtype)}
    return {"w1": inputs["trunk"].to(dtype).clone(), "b1": torch.zeros(_HIDDEN, dtype=dtype),
            "w2": torch.zeros(_HIDDEN, T * V, dtype=dtype), "b2": torch.zeros(T * V, dtype=dtype)}


def build_problem(spec: PreferenceTaskSpec, random: Draws) -> tuple[PreferenceData, _Truth]:
    """One problem instance of ``spec``: the training data and the truth for scoring."""

    def normal(*shape: int) -> torch.Tensor:
        return random.randn(*shape, dtype=DTYPE)

    T, V, C = spec.positions, spec.vocab, spec.train_prompts
    # The tabular policy has no generalisation to speak of: it is scored on its own prompts.
    E = C if spec.policy == "tabular" else spec.eval_prompts
    P = C if spec.policy == "tabular" else C + E
    prompts = normal(P, _EMBEDDING)
    tokens = normal(T, V, _EMBEDDING)

    def random_map(width: int) -> torch.Tensor:  # tokens through a random tanh layer, (T*V, width)
        return torch.tanh(tokens.reshape(T * V, _EMBEDDING) @ normal(_EMBEDDING, width))

    # The policy class's inputs, and a reward part it can express.
    if spec.policy == "tabular":
        inputs_all: dict[str, torch.Tensor] = {}
        expressible = normal(P, T, V)
    elif spec.policy == "linear":
        prompt = torch.tanh(prompts @ normal(_EMBEDDING, _LINEAR_FEATURES))  # (P, d)
        inputs_all = {"prompt": prompt, "token": random_map(_LINEAR_FEATURES).T.contiguous(),
                      "offset": random_map(_LINEAR_FEATURES).T.contiguous()}
        expressible = policy_shift("linear", inputs_all, {"theta": normal(_LINEAR_FEATURES)}, (P, T, V))
    else:
        inputs_all = {"prompt": prompts / math.sqrt(_EMBEDDING) * 2.0}
        teacher = {"w1": normal(_EMBEDDING, _HIDDEN), "b1": 0.5 * normal(_HIDDEN),
                   "w2": normal(_HIDDEN, T * V), "b2": 0.5 * normal(T * V)}
        expressible = policy_shift("mlp", inputs_all, teacher, (P, T, V))
    expressible = _standardise(expressible)
    # Adjacent-token interactions: a share of the reward no factorised policy expresses.
    interaction = normal(max(T - 1, 0), V, V)
    if T > 1:
        interaction = interaction / interaction.std()
    scale = spec.signal / math.sqrt(T)
    m = spec.misspecification
    reward = scale * math.sqrt(1 - m) * expressible
    interaction = scale * math.sqrt(m) * interaction
    # The reference: its own habits (a random function of prompt and token), mixed with the reward.
    alignment, logit_scale = REFERENCES[spec.reference]
    habits = _standardise((torch.tanh(prompts @ normal(_EMBEDDING, _HIDDEN))[:, None, :]
                           * random_map(_HIDDEN)[None]) @ normal(_HIDDEN)).view(P, T, V)
    habits = _standardise(habits.view(P, T, V))
    reference_logits = logit_scale * _standardise(alignment * expressible + math.sqrt(1 - alignment ** 2) * habits)

    # Preference pairs: two reference samples on a random training prompt, Bradley-Terry labels.
    N = spec.pairs
    context = random.randint(C, (N,))
    cumulative = torch.softmax(reference_logits[:C], dim=-1).cumsum(-1)[context]  # (N, T, V)

    def sample() -> torch.Tensor:
        uniform = random.rand(N, T, 1, dtype=DTYPE)
        return (uniform > cumulative).sum(-1).clamp(max=V - 1)

    first, second = sample(), sample()

    def sequence_reward(responses: torch.Tensor) -> torch.Tensor:
        total = reward[context[:, None], torch.arange(T), responses].sum(-1)
        if T > 1:
            total = total + interaction[torch.arange(T - 1), responses[:, :-1], responses[:, 1:]].sum(-1)
        return total

    r_first, r_second = sequence_reward(first), sequence_reward(second)
    first_wins = random.rand(N, dtype=DTYPE) < torch.sigmoid(r_first - r_second)
    first_wins ^= random.rand(N, dtype=DTYPE) < spec.label_noise
    chosen = torch.where(first_wins[:, None], first, second)
    rejected = torch.where(first_wins[:, None], second, first)
    agreement = ((r_first > r_second) == first_wins).to(DTYPE).mean()

    trunk = normal(_EMBEDDING, _HIDDEN)  # the MLP policy's random initial trunk
    train_inputs = {k: v[:C] if k == "prompt" else v for k, v in inputs_all.items()}
    eval_inputs = {k: v[P - E:].clone() if k == "prompt" else v.clone() for k, v in inputs_all.items()}
    if spec.policy == "mlp":
        train_inputs["trunk"] = trunk
        eval_inputs["trunk"] = trunk
    data = PreferenceData(
        policy=spec.policy, beta=spec.beta, steps=spec.steps, learning_rate=spec.learning_rate,
        reference_logits=reference_logits[:C].to(TRAIN_DTYPE).contiguous(), context=context,
        chosen=chosen, rejected=rejected,
        inputs={k: v.to(TRAIN_DTYPE).contiguous() for k, v in train_inputs.items()},
    )
    # Clones: a slice that is already contiguous is a view of the whole tensor, training prompts too.
    eval_reference = reference_logits[P - E:].clone()
    eval_reward = reward[P - E:].clone()
    reference_log_probs = torch.log_softmax(eval_reference, dim=-1)
    reference_value = _expected_reward(reference_log_probs.exp(), eval_reward, interaction)
    oracle_value = spec.beta * _log_partition(reference_log_probs, eval_reward, interaction, spec.beta)
    truth = _Truth(inputs=eval_inputs, reference_logits=eval_reference, reward=eval_reward,
                   interaction=interaction, reference_value=reference_value, oracle_value=oracle_value,
                   label_agreement=agreement)
    return data, truth


def _expected_reward(probs: torch.Tensor, reward: torch.Tensor, interaction: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of E_pi r for a policy factorised over positions, exactly (a 0-d tensor)."""
    value = (probs * reward).sum(dim=(-1, -2))
    if interaction.shape[0]:
        value = value + torch.einsum("ptv,tvw,ptw->p", probs[:, :-1], interaction, probs[:, 1:])
    return value.mean()


def _log_partition(reference_log_probs: torch.Tensor, reward: torch.Tensor, interaction: torch.Tensor,
                   beta: float) -> torch.Tensor:
    """Mean over prompts of log sum_y pi_ref(y) exp(r(y) / beta) (forward algorithm over positions;
    a 0-d tensor)."""
    unary = reference_log_probs + reward / beta  # (E, T, V)
    alpha = unary[:, 0]
    for t in range(1, unary.shape[1]):
        alpha = torch.logsumexp(alpha[:, :, None] + interaction[t - 1] / beta, dim=1) + unary[:, t]
    return torch.logsumexp(alpha, dim=-1).mean()


# -- the two phases ---------------------------------------------------------------------------
def train_policy(fn: Callable, data: PreferenceData, interface: PreferenceInterface,
                 task_name: str = "task") -> dict[str, torch.Tensor]:
    """Fine-tune the policy from the reference with ``fn`` as the loss (full-batch Adam).

    Runs the genome: it sees the pairs' sequence log-probabilities under the policy and the
    reference, nothing else.

    Raises:
        GenomeError: (``error``) when the loss raises, returns the wrong shape or becomes
            non-finite, naming the task and the step.
    """
    loss_fn = interface.bind(fn)
    C, T, V = data.reference_logits.shape
    positions = torch.arange(T)

    def sequence_logps(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = data.context[:, None]
        return (log_probs[rows, positions, data.chosen].sum(-1), log_probs[rows, positions, data.rejected].sum(-1))

    with torch.no_grad():
        reference_chosen, reference_rejected = sequence_logps(torch.log_softmax(data.reference_logits, dim=-1))
    parameters = {k: v.requires_grad_(True) for k, v in
                  initial_parameters(data.policy, data.inputs, (C, T, V), TRAIN_DTYPE).items()}
    for tensor in parameters.values():
        tensor.grad = torch.zeros_like(tensor)  # stays zero for a loss without a gradient
    optimiser = torch.optim.Adam(list(parameters.values()), lr=data.learning_rate, eps=1e-12)
    pairs = data.context.shape[0]
    for step in range(1, data.steps + 1):
        logits = data.reference_logits + policy_shift(data.policy, data.inputs, parameters, (C, T, V))
        chosen, rejected = sequence_logps(torch.log_softmax(logits, dim=-1))
        try:
            # The reference tensors are cloned: an in-place edit must not leak into the next step.
            losses = losses_of(loss_fn(chosen, rejected, reference_chosen.clone(), reference_rejected.clone()))
        except GenomeError:
            raise
        except Exception as exc:
            raise GenomeError(f"task {task_name}: the loss raised {type(exc).__name__} at training step "
                              f"{step}: {exc}", status="error") from exc
        total = check_losses(losses, pairs, task_name, step).mean()
        if not torch.isfinite(total):
            raise GenomeError(f"task {task_name}: the loss became non-finite (nan or inf) at training step {step}",
                              status="error")
        optimiser.zero_grad(set_to_none=False)
        if total.requires_grad:
            total.backward()
        if not all(torch.isfinite(p.grad).all() for p in parameters.values()):
            raise GenomeError(f"task {task_name}: the gradient became non-finite at training step {step}",
                              status="error")
        optimiser.step()
    return {k: v.detach() for k, v in parameters.items()}


def score_policy(parameters: dict[str, torch.Tensor], spec: PreferenceTaskSpec, truth: _Truth) -> dict[str, float]:
    """The trained policy's exact objective on the evaluation prompts (no genome code).

    Returns ``score`` (share of the oracle's attainable gain), ``reward_gain`` and ``kl``."""
    E, T, V = truth.reference_logits.shape
    parameters = {k: v.to(DTYPE) for k, v in parameters.items()}
    if spec.policy == "tabular":
        parameters["theta"] = parameters["theta"].view(-1)
    for name, value in parameters.items():
        if not torch.isfinite(value).all():
            raise GenomeError(f"the trained parameter {name!r} is not finite", status="error")
    log_probs = torch.log_softmax(
        truth.reference_logits + policy_shift(spec.policy, {k: v for k, v in truth.inputs.items()},
                                              parameters, (E, T, V)), dim=-1)
    reference_log_probs = torch.log_softmax(truth.reference_logits, dim=-1)
    probs = log_probs.exp()
    value = _expected_reward(probs, truth.reward, truth.interaction)
    kl = float((probs * (log_probs - reference_log_probs)).sum(dim=(-1, -2)).mean())
    # In 0-d float64 tensors, the same arithmetic as in Python floats: no truth becomes a Python
    # float, which no wipe could zero (freed floats stay in the interpreter's pools).
    objective = value - spec.beta * kl
    attainable = truth.oracle_value - truth.reference_value
    return {"score": float((objective - truth.reference_value) / attainable),
            "reward_gain": float(value - truth.reference_value), "kl": kl}


class PreferenceSuite(TaskSuite):
    """Preference losses scored over synthetic DPO settings (see the module doc).

    Options: those of :class:`fitness.suites.base.TaskSuite` (``split``, ``tasks``, ``seeds``,
    ``worst_weight``, ``worst_tolerance``, ``suite_seed``, ``train_tasks`` 32, ``test_tasks`` 12,
    ``tasks_per_seed`` 8, ``fresh_tasks`` true, ``gain_clip`` 0.06).
    Meta-train: each evaluation seed scores 8 tasks drawn afresh from the generator for that
    seed (:meth:`~fitness.suites.base.TaskSuite.fresh_tasks_for`), the same for every candidate
    and for DPO on that seed. Selection therefore sees a new sample of the family at every
    seed and climbs the family's expected gain; with a fixed pool (``fresh_tasks`` false: 8 of
    a pool of 32 per seed) a run's best losses fitted the pool and lost to best-of-N on
    meta-test. Meta-test is 12 fixed tasks, all scored on every seed.

    A task is usable when DPO scores between -1 and 1 on it: on a task where the best policy
    gains little over the reference (a large beta with a weak signal), normalised scores are
    noise of a larger scale than every other task's (about 4% of drawn tasks). A fresh
    meta-train draw replaces such a task by the next one (:meth:`usable`); the meta-test draw
    must have none (the draws of ``suite_seed`` 1, 3, 6-9, 12, 13 have some). The default draw
    is 11, the first usable one from 10 on that no search was validated on: 0 served to design
    the search, 2, 4, 5 and 10 each validated earlier versions of it (5 then served to develop
    this one; docs/trust.md has the order of events); a test checks that its meta-test split
    is usable. The metrics also
    carry the loss-shape profile (:data:`fitness.preference.SHAPE_PROFILE`), measured in the
    training phase and sent back as an artefact.
    """

    name = "pref-suite"
    default_suite_seed = 11
    default_train_tasks = 32
    default_tasks_per_seed = 8
    default_fresh_tasks = True
    default_gain_clip = 0.06
    interface = PreferenceInterface()
    baseline = "dpo"
    #: The same grid as ``synthetic-pref``: the loss's shape as a function of beta * logits.
    descriptor_space = SyntheticPreference.descriptor_space

    def seeds(self) -> list[Seed]:
        return preference_seeds()

    def make_tasks(self, count: int, split: str, rng: np.random.Generator) -> list[PreferenceTaskSpec]:
        return draw_preference_tasks(count, rng)

    def describe(self, spec: PreferenceTaskSpec) -> str:
        return (f"{spec.policy}/{spec.reference}/beta={spec.beta:g}/noise={spec.label_noise:g}/"
                f"pairs={spec.pairs}/T={spec.positions}/mis={spec.misspecification:g}/signal={spec.signal:g}")

    def build_problem(self, task: Task, seed: int) -> tuple[PreferenceData, _Truth]:
        return build_problem(task.spec, task.draws(seed))

    def usable(self, task: Task, seed: int) -> bool:
        """A drawn task is kept when DPO scores between -1 and 1 on it: where the best policy
        gains little over the reference (a large beta with a weak signal), normalised scores
        are of a larger scale than every other task's and would swamp the mean."""
        return -1.0 < self.baseline_score(task, seed) < 1.0

    def parameter_spec(self, task: Task) -> dict[str, TensorSpec]:
        spec = task.spec
        shape = (spec.train_prompts, spec.positions, spec.vocab)
        inputs = {"token": torch.empty(_LINEAR_FEATURES, 0), "trunk": torch.empty(_EMBEDDING, _HIDDEN)}
        return {name: TensorSpec(tuple(value.shape), TRAIN_DTYPE)
                for name, value in initial_parameters(spec.policy, inputs, shape, TRAIN_DTYPE).items()}

    def train_task(self, fn: Callable, task: Task, seed: int) -> dict[str, torch.Tensor]:
        data = self.training_data(task, seed)
        return train_policy(fn, data, PreferenceInterface(beta=task.spec.beta), task.name)

    def score_task(self, parameters: dict[str, torch.Tensor], task: Task, seed: int) -> float:
        return score_policy(parameters, task.spec, self.truth(task, seed))["score"]

    def descriptors(self, fn: Callable) -> dict[str, float]:
        return loss_shape_descriptors(self.interface, fn)

    # The shape profile needs the genome, so it is measured in the training phase and travels
    # as one more artefact (NaN where the profile has no value).
    def artefact_spec(self, seed: int) -> dict[str, TensorSpec]:
        return {**super().artefact_spec(seed), _PROFILE: TensorSpec((len(SHAPE_PROFILE),), DTYPE, finite=False)}

    def train(self, fn: Callable, seed: int) -> Artefacts:
        artefacts = super().train(fn, seed)
        profile = loss_shape_profile(self.interface, fn)
        artefacts[_PROFILE] = torch.tensor([profile.get(key, math.nan) for key in SHAPE_PROFILE], dtype=DTYPE)
        return artefacts

    def score(self, artefacts: Artefacts, seed: int) -> Score:
        profile = artefacts.get(_PROFILE)
        result = super().score({k: v for k, v in artefacts.items() if k != _PROFILE}, seed)
        if profile is not None:
            result.metrics.update({key: float(value) for key, value in zip(SHAPE_PROFILE, profile.tolist())
                                   if math.isfinite(value)})
        return result


_PROFILE = "shape_profile"
