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
from dataclasses import dataclass
from typing import Callable

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
