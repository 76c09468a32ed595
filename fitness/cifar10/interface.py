"""The function contract of the ``cifar10`` plug-in and its seed losses."""
from __future__ import annotations

from collections.abc import Callable

import torch

from fitness.base import Interface, Seed, losses_of

#: Logit scale of the contract-check inputs: trained networks reach logits of +-10 to +-30.
_CHECK_LOGIT_SCALE = 4.0


class ClassificationInterface(Interface):
    """Classification losses ``loss(logits, targets) -> (batch,)``."""

    signature = "def loss(logits, targets):"
    description = (
        "Write a classification loss for training an image classifier from scratch (CIFAR-10, "
        "10 classes). logits is a float tensor of shape (batch, num_classes), the network's "
        "unnormalised class scores; it carries the gradient. targets is an int64 tensor of shape "
        "(batch,) holding the correct class index of each example, in [0, num_classes). Return a "
        "tensor of per-example losses of shape (batch,), which the trainer averages and minimises "
        "with SGD (so the loss's overall scale acts like a learning-rate factor); do not reduce it "
        "to a scalar. Fitness is the accuracy on held-out images after a short training run. "
        "torch, F (torch.nn.functional) and math are available; imports are not needed. The loss "
        "must be finite and differentiable for any logits (they can reach +-30 during training); "
        "prefer F.log_softmax and F.cross_entropy to exponentiating logits yourself."
    )
    example = (
        "def cross_entropy(logits, targets):\n"
        "    return F.cross_entropy(logits, targets, reduction=\"none\")\n"
    )
    arg_counts = (2,)
    classes = 10

    def sample_inputs(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        logits = _CHECK_LOGIT_SCALE * torch.randn(batch_size, self.classes, generator=generator)
        targets = torch.randint(self.classes, (batch_size,), generator=generator)
        return {"logits": logits.requires_grad_(True), "targets": targets}

    def call(self, fn: Callable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # The targets are cloned so that an in-place edit by the loss cannot leak anywhere.
        return losses_of(fn(inputs["logits"], inputs["targets"].clone()))


def _seed(name: str, thought: str, body: str) -> Seed:
    return Seed(name=name, code=f"def {name}(logits, targets):\n{body}", thought=thought)


#: Baseline classification losses (the first is the baseline of summaries).
CLASSIFICATION_SEEDS: tuple[Seed, ...] = (
    _seed(
        "cross_entropy",
        "Cross-entropy of the softmax: f = -log softmax(logits)[target].",
        "    return F.cross_entropy(logits, targets, reduction=\"none\")\n",
    ),
    _seed(
        "label_smoothing",
        "Label smoothing 0.1 (Szegedy et al. 2016): cross-entropy against 0.9 * one-hot + 0.1 / classes.",
        "    return F.cross_entropy(logits, targets, reduction=\"none\", label_smoothing=0.1)\n",
    ),
    _seed(
        "focal",
        "Focal loss, gamma 2 (Lin et al. 2017): -(1 - p_target)^gamma * log p_target; down-weights "
        "examples the network already gets right.",
        "    log_p = F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)\n"
        "    gamma = 2.0\n"
        "    return -((1 - log_p.exp()) ** gamma) * log_p\n",
    ),
    _seed(
        "squared_error",
        "Squared error between the softmax probabilities and the one-hot target, summed over "
        "classes (the Brier score). On probabilities rather than raw logits: bounded, and its "
        "gradient fades for confidently wrong examples, a behaviour cross-entropy lacks. (The "
        "raw-logit square loss of Hui & Belkin 2021 needs its own target scale and learning rate.)",
        "    probs = F.softmax(logits, dim=-1)\n"
        "    one_hot = F.one_hot(targets, logits.shape[-1]).to(probs.dtype)\n"
        "    return ((probs - one_hot) ** 2).sum(dim=-1)\n",
    ),
    _seed(
        "temperature_ce",
        "Temperature-scaled cross-entropy, T = 2: -log softmax(logits / T)[target]; softer "
        "probabilities, so confident examples keep a gradient longer.",
        "    temperature = 2.0\n"
        "    return F.cross_entropy(logits / temperature, targets, reduction=\"none\")\n",
    ),
)


def classification_seeds() -> list[Seed]:
    """The seed losses: cross-entropy, label smoothing, focal, squared error, temperature CE."""
    return list(CLASSIFICATION_SEEDS)
