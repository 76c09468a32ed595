"""The preference-optimisation loss contract and the published seed losses.

The function contract is the published form of the DiscoPOP paper (Lu et al. 2024,
"Discovering Preference Optimization Algorithms with and for Large Language Models",
arXiv:2406.08414) and of TRL's ``DPOTrainer`` loss methods::

    def loss(self, policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps):
        ...  # uses self.beta; returns per-example losses of shape (batch,)

so that losses copied from the paper, its code release (github.com/luchris429/DiscoPOP,
``src/alignment/gpo.py``) or TRL run unchanged. Two shorter forms are accepted as well:
four tensors only, or four tensors followed by a parameter named ``beta``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from collections.abc import Callable

import torch

from engine.genome import GenomeError
from fitness.base import Interface, Seed, losses_of

#: Parameter names of the published form, in order (after ``self``).
TENSOR_NAMES = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
)


@dataclass(frozen=True)
class PreferenceHparams:
    """What a published-form loss finds on ``self``.

    Attributes:
        beta: The KL-regularisation strength of DPO (the paper uses 0.05).
        label_smoothing: Present because TRL's ``sigmoid_loss`` reads it; always 0 here.
    """

    beta: float = 0.05
    label_smoothing: float = 0.0


class PreferenceInterface(Interface):
    """Offline preference-optimisation losses ``f(self, pc, pr, rc, rr) -> (batch,)``.

    Args:
        beta: The value a loss sees as ``self.beta`` (or as its ``beta`` parameter).
    """

    signature = (
        "def loss(self, policy_chosen_logps, policy_rejected_logps, "
        "reference_chosen_logps, reference_rejected_logps):"
    )
    description = (
        "Write an offline preference-optimisation loss (like DPO) for fine-tuning a language "
        "model on pairs of responses to the same prompt, one chosen (preferred) and one "
        "rejected. The four arguments are tensors of shape (batch,): the summed log-probability "
        "of the chosen and of the rejected response under the policy being trained "
        "(policy_chosen_logps, policy_rejected_logps; they carry the gradient) and under the "
        "frozen reference model (reference_chosen_logps, reference_rejected_logps; constants). "
        "The regularisation strength beta is available as self.beta (a float, 0.05 by default). "
        "Return a tensor of per-example losses of shape (batch,), which the trainer averages and "
        "minimises; do not reduce it to a scalar. A common building block is the log-ratio "
        "difference logits = (policy_chosen_logps - policy_rejected_logps) - "
        "(reference_chosen_logps - reference_rejected_logps), usually scaled as self.beta * logits. "
        "torch, F (torch.nn.functional) and math are available; imports are not needed. The loss "
        "must be finite and differentiable for any inputs."
    )
    example = '''def dpo(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    return -F.logsigmoid(self.beta * logits)
'''
    arg_counts = (4, 5)

    def __init__(self, beta: float = 0.05) -> None:
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
            raise ValueError(f"beta must be a positive number, got {beta!r}")
        self.beta = float(beta)
        self.hparams = PreferenceHparams(beta=self.beta)

    def sample_inputs(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Realistic sequence log-probabilities: negative, tens of nats, with policy and
        reference differing by a few nats so that ``beta * logits`` spans roughly [-1, 1]."""
        reference_chosen = -(20.0 + 100.0 * torch.rand(batch_size, generator=generator))
        reference_rejected = -(20.0 + 100.0 * torch.rand(batch_size, generator=generator))
        policy_chosen = reference_chosen + 8.0 * torch.randn(batch_size, generator=generator)
        policy_rejected = reference_rejected + 8.0 * torch.randn(batch_size, generator=generator)
        return {
            "policy_chosen_logps": policy_chosen.requires_grad_(True),
            "policy_rejected_logps": policy_rejected.requires_grad_(True),
            "reference_chosen_logps": reference_chosen,
            "reference_rejected_logps": reference_rejected,
        }

    def bind(self, fn: Callable) -> Callable[..., object]:
        """``fn`` as a function of the four tensors, whichever accepted form it has.

        Raises:
            GenomeError: (``invalid``) for a parameter list none of the forms matches.
        """
        try:
            parameters = [
                p for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError) as exc:
            raise GenomeError(f"cannot read the loss's parameters: {exc}") from exc
        names = [p.name for p in parameters]
        hparams, beta = self.hparams, self.beta
        if len(names) == 5 and names[0] == "self":
            return lambda pc, pr, rc, rr: fn(hparams, pc, pr, rc, rr)
        if len(names) == 5 and names[4] == "beta":
            return lambda pc, pr, rc, rr: fn(pc, pr, rc, rr, beta)
        if len(names) == 4:
            return fn
        raise GenomeError(
            f"the loss takes parameters ({', '.join(names)}); expected (self, "
            f"{', '.join(TENSOR_NAMES)}) using self.beta, the four tensors alone, or the four "
            "tensors followed by beta"
        )

    def call(self, fn: Callable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses_of(self.bind(fn)(*(inputs[name] for name in TENSOR_NAMES)))


def _seed(name: str, thought: str, body: str) -> Seed:
    code = (
        f"def {name}(self, policy_chosen_logps, policy_rejected_logps, "
        "reference_chosen_logps, reference_rejected_logps):\n"
        "    pi_logratios = policy_chosen_logps - policy_rejected_logps\n"
        "    ref_logratios = reference_chosen_logps - reference_rejected_logps\n"
        "    logits = pi_logratios - ref_logratios\n"
        f"{body}"
    )
    return Seed(name=name, code=code, thought=thought)


_GPO = "github.com/luchris429/DiscoPOP src/alignment/gpo.py"

#: The paper's baselines (its first prompt lists DPO, SLiC/hinge, IPO and KTO-pair) followed
#: by the discovered losses of its appendix, in the released code's beta-relative form (the
#: constant 0.05 there is the beta of the discovery runs, so ``logits * beta / 0.05`` equals
#: the raw log-ratio difference at beta = 0.05).
PREFERENCE_SEEDS: tuple[Seed, ...] = (
    _seed(
        "dpo",
        "DPO (Rafailov et al. 2023): f = -log sigmoid(beta * logits).",
        "    return -F.logsigmoid(self.beta * logits)\n",
    ),
    _seed(
        "slic",
        "SLiC / hinge (Zhao et al. 2023; TRL 'hinge'): f = relu(1 - beta * logits).",
        "    return torch.relu(1 - self.beta * logits)\n",
    ),
    _seed(
        "ipo",
        "IPO (Azar et al. 2023, eq. 17; TRL 'ipo'): f = (logits - 1 / (2 * beta))^2.",
        "    return (logits - 1 / (2 * self.beta)) ** 2\n",
    ),
    _seed(
        "kto_pair",
        "KTO-pair (TRL's historical 'kto_pair', HALOs eq. 7): 1 - sigmoid(beta * (chosen log-ratio - "
        "rejected KL)) + 1 - sigmoid(beta * (chosen KL - rejected log-ratio)), KL = batch mean of the "
        "log-ratio clamped at 0; TRL concatenates the two halves (2*batch values), here they are "
        "summed per pair to give one loss per example.",
        "    chosen_logratios = policy_chosen_logps - reference_chosen_logps\n"
        "    rejected_logratios = policy_rejected_logps - reference_rejected_logps\n"
        "    chosen_kl = chosen_logratios.mean().clamp(min=0)\n"
        "    rejected_kl = rejected_logratios.mean().clamp(min=0)\n"
        "    chosen_losses = 1 - torch.sigmoid(self.beta * (chosen_logratios - rejected_kl))\n"
        "    rejected_losses = 1 - torch.sigmoid(self.beta * (chosen_kl - rejected_logratios))\n"
        "    return chosen_losses + rejected_losses\n",
    ),
    _seed(
        "lrml",
        "LRML / DiscoPOP (Lu et al. 2024, sec. 5; TRL 'discopop'): z = beta * logits, "
        "m = sigmoid(z / 0.05), f = (1 - m) * -log sigmoid(z) + m * exp(-z).",
        "    z = logits * self.beta\n"
        "    tau = 0.05\n"
        "    modulation = torch.sigmoid(z / tau)\n"
        "    logistic = -F.logsigmoid(z)\n"
        "    exponential = torch.exp(-z)\n"
        "    return logistic * (1 - modulation) + exponential * modulation\n",
    ),
    _seed(
        "padll",
        f"PADLL (Lu et al. 2024 appendix; {_GPO}): f = 0.9 * (1 - 0.5 * [logits < 0]) * "
        "-log sigmoid(beta * logits).",
        "    mismatches = (logits < 0).float()\n"
        "    decay = 0.9 * (1 - 0.5 * mismatches)\n"
        "    return decay * -F.logsigmoid(self.beta * logits)\n",
    ),
    _seed(
        "aqfl",
        f"AQFL (Lu et al. 2024 appendix; {_GPO}, released beta-relative form): z = beta * logits, "
        "u = z / 0.05, q = std(u) * mean(sigmoid(-u)), q += 0.05 * (sigmoid(mean(u)) - q), "
        "w = sigmoid(0.1 * |u - q|), f = w * -log sigmoid(z) + (1 - w) * relu(1 - z); batch "
        "statistics; the std of a batch of one is taken as 0 (the original gives nan).",
        "    z = logits * self.beta\n"
        "    u = z / 0.05\n"
        "    spread = u.std() if u.numel() > 1 else u.sum() * 0\n"
        "    quantile = spread * torch.sigmoid(-u).mean()\n"
        "    quantile = quantile + 0.05 * (torch.sigmoid(u.mean()) - quantile)\n"
        "    blend = torch.sigmoid(0.1 * (u - quantile).abs())\n"
        "    logistic = -F.logsigmoid(z)\n"
        "    hinge = torch.relu(1 - z)\n"
        "    return blend * logistic + (1 - blend) * hinge\n",
    ),
    _seed(
        "dbaql",
        f"DBAQL (Lu et al. 2024 appendix; {_GPO}, released beta-relative form): z = beta * logits, "
        "c = sigmoid(var(z / 0.05)), f = c * -log sigmoid(z / 0.9) + (1 - c) * exp(-0.9 * z); "
        "batch statistic; the variance of a batch of one is taken as 0 (the original gives nan).",
        "    z = logits * self.beta\n"
        "    u = z / 0.05\n"
        "    variability = u.var() if u.numel() > 1 else u.sum() * 0\n"
        "    blend = torch.sigmoid(variability)\n"
        "    logistic = -F.logsigmoid(z / 0.9)\n"
        "    exponential = torch.exp(-z * 0.9)\n"
        "    return blend * logistic + (1 - blend) * exponential\n",
    ),
    _seed(
        "aql",
        f"AQL (Lu et al. 2024 appendix; {_GPO}, released beta-relative form): z = beta * logits, "
        "u = z / 0.05, q = 0.5 + 0.01 * (sigmoid(mean(u)) - 0.5), w = sigmoid(-(u - q)), "
        "f = w * -log sigmoid(z) + (1 - w) * relu(1 - z).",
        "    z = logits * self.beta\n"
        "    u = z / 0.05\n"
        "    quantile = 0.5 + 0.01 * (torch.sigmoid(u.mean()) - 0.5)\n"
        "    weight = torch.sigmoid(-(u - quantile))\n"
        "    logistic = -F.logsigmoid(z)\n"
        "    hinge = torch.relu(1 - z)\n"
        "    return weight * logistic + (1 - weight) * hinge\n",
    ),
    _seed(
        "cell",
        f"CELL (Lu et al. 2024 appendix; {_GPO}): f = 0.5 * exp(-beta * logits) + "
        "0.5 * -log sigmoid(beta * logits).",
        "    exponential = torch.exp(-self.beta * logits)\n"
        "    logistic = -F.logsigmoid(self.beta * logits)\n"
        "    alpha = 0.5\n"
        "    return alpha * exponential + (1 - alpha) * logistic\n",
    ),
    _seed(
        "pfl",
        f"PFL (Lu et al. 2024 appendix; {_GPO}, released form with z = beta * logits): "
        "f = -log sigmoid(z) / 2 where policy_chosen_logps > policy_rejected_logps, "
        "else 2 * relu(1 - z).",
        "    z = logits * self.beta\n"
        "    focus_scale = 2.0\n"
        "    is_correct = policy_chosen_logps > policy_rejected_logps\n"
        "    logistic = -F.logsigmoid(z)\n"
        "    hinge = torch.relu(1 - z)\n"
        "    return torch.where(is_correct, logistic / focus_scale, hinge * focus_scale)\n",
    ),
)


def preference_seeds() -> list[Seed]:
    """The seed losses, DPO first (it is the baseline)."""
    return list(PREFERENCE_SEEDS)


# -- loss-shape profile ---------------------------------------------------------------------
#: Keys of :func:`loss_shape_profile`, each with what it measures (shown to users).
SHAPE_PROFILE = {
    "shape_slope_at_zero": "f'(0) / mean |f'| on z in [-1, 1] (DPO -1; positive: the loss rises "
                           "with the margin at zero, the trap DiscoPOP's LRML shows at small beta)",
    "shape_slope_sign_at_zero": "sign of f'(0): -1 pushes the margin up (like DPO), 0 flat, +1 pushes it down",
    "shape_increasing_share": "share of z in [-10, 10] where the loss rises with the margin by more than "
                              "0.1% of its typical slope (0 for DPO, 0.88 for sign-flipped DPO)",
    "shape_left_slope": "f'(-10) / mean |f'| on [-1, 1]: how hard badly ordered pairs are pushed (DPO -2, hinge -1, "
                        "near 0 gives up on them, positive pushes them further wrong)",
    "shape_left_tail_exponent": "log2 |f'(-20)| / |f'(-10)|: 0 linear tail (DPO, hinge), 1 quadratic (IPO), "
                                "large exponential, negative saturating",
    "shape_left_bounded": "1 when the loss flattens as z -> -inf (grows less than 1% of its typical "
                          "slope between z = -100 and -1000), else 0",
    "shape_right_behaviour": "as z -> +inf: -1 keeps falling without bound (pushes margins forever), "
                             "0 flattens (DPO, hinge), +1 rises again (IPO penalises large margins)",
}


def loss_shape_profile(interface: PreferenceInterface, fn: Callable) -> dict[str, float]:
    """Loss-shape descriptors of a preference loss that predict known failures, computed by
    evaluating ``fn`` on a grid of margins ``z = beta * logits`` (no training).

    The loss is called on one batch spanning z in [-20, 20] (the chosen log-probability moves,
    the other three are fixed), and on a second batch of extreme margins (+-100, +-1000) for
    boundedness. Slopes are ``d f / d z``, divided by the mean absolute slope on [-1, 1], so
    no value changes when the loss is multiplied by a positive constant or shifted. Losses
    that use batch statistics are profiled on these batches. The keys and their meaning are
    :data:`SHAPE_PROFILE`; a loss that cannot be evaluated on the grid (raises, wrong shape,
    non-finite or no gradient on [-20, 20]) or is flat gets an empty dict: nothing is claimed.
    """
    dtype = torch.float64
    points = 801
    z = torch.linspace(-20.0, 20.0, points, dtype=dtype)  # step 0.05: 0 and +-10 are grid points
    values, slope = _profile_batch(interface, fn, z)
    if values is None or slope is None or not (torch.isfinite(values).all() and torch.isfinite(slope).all()):
        return {}
    middle = z.abs() <= 10.0
    scale = float(slope[z.abs() <= 1.0].abs().mean())
    if not scale > 1e-12:
        return {}
    tolerance = 1e-3 * scale
    zero = points // 2
    at = {-20.0: 0, -10.0: (points - 1) // 4}  # grid indices of z = -20 and -10
    slope_zero = float(slope[zero])
    left10, left20 = abs(float(slope[at[-10.0]])), abs(float(slope[at[-20.0]]))
    tail = math.log2((left20 + tolerance) / (left10 + tolerance))
    profile = {
        "shape_slope_at_zero": slope_zero / scale,
        "shape_slope_sign_at_zero": float(0 if abs(slope_zero) <= tolerance else math.copysign(1, slope_zero)),
        "shape_increasing_share": float((slope[middle] > tolerance).to(dtype).mean()),
        "shape_left_slope": max(-1e4, min(1e4, float(slope[at[-10.0]]) / scale)),
        "shape_left_tail_exponent": max(-30.0, min(30.0, tail)),
    }
    extremes = torch.tensor([-1000.0, -100.0, 100.0, 1000.0], dtype=dtype)
    far, _ = _profile_batch(interface, fn, extremes, gradient=False)
    if far is not None:
        # A non-finite value out there is growth without bound (exp overflows first).
        finite = torch.isfinite(far)
        threshold = 0.01 * scale * 900.0
        left_change = float(far[0] - far[1]) if bool(finite[:2].all()) else math.inf
        profile["shape_left_bounded"] = float(abs(left_change) < threshold)
        if bool(finite[2:].all()):
            right_change = float(far[3] - far[2])
            profile["shape_right_behaviour"] = float(
                0 if abs(right_change) < threshold else math.copysign(1, right_change))
        else:
            profile["shape_right_behaviour"] = float(math.copysign(1, float(far[3])) if not torch.isnan(far[3])
                                                     else 1.0)
    return profile


def _profile_batch(interface: PreferenceInterface, fn: Callable, z: torch.Tensor,
                   gradient: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Losses (and ``d f / d z``) of ``fn`` at margins ``z``; ``(None, None)`` if it misbehaves."""
    reference_chosen = torch.full_like(z, -40.0)
    reference_rejected = torch.full_like(z, -45.0)
    policy_rejected = reference_rejected.clone().requires_grad_(gradient)
    policy_chosen = (reference_chosen + z / interface.beta).requires_grad_(gradient)
    try:
        with torch.set_grad_enabled(gradient):
            losses = losses_of(interface.bind(fn)(policy_chosen, policy_rejected, reference_chosen.clone(),
                                                  reference_rejected.clone()))
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != tuple(z.shape):
            return None, None
        if not gradient:
            return losses.detach().to(z.dtype), None
        if not losses.requires_grad:
            return None, None
        (grad,) = torch.autograd.grad(losses.sum(), policy_chosen, allow_unused=True)
    except Exception:  # noqa: BLE001 - a genome may raise anything; it gets no profile
        return None, None
    if grad is None:
        return None, None
    return losses.detach().to(z.dtype), grad.detach().to(z.dtype) / interface.beta
