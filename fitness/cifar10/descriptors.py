"""Cheap behaviour descriptors of a classification loss, computed from its gradients without
training, and the archive's ranges for them."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fitness.base import Descriptor, losses_of

_DESCRIPTOR_MARGIN = 6.0  # logit lead of the confident class (p about 0.98 against 9 others)
_DESCRIPTOR_FALLBACK = {"correct_push": -3.0, "wrong_push": 0.0, "rival_focus": 0.5}

#: The archive's ranges and bins for the descriptors (values reached by known losses in each help).
DESCRIPTOR_SPACE: tuple[Descriptor, ...] = (
    Descriptor("correct_push", -5.0, 1.0, 4,
               "log10 gradient on confidently correct examples / near initialisation: cross-entropy "
               "-1.6, label smoothing -1.1, temperature 2 -0.5, squared error -2.3, focal -4.5"),
    Descriptor("wrong_push", -1.2, 1.2, 3,
               "log10 gradient on confidently wrong examples / near initialisation: cross-entropy "
               "0.2, squared error -0.65 (gives up on them), square loss on logits 0.5"),
    Descriptor("rival_focus", 0.0, 1.0, 3,
               "share of the wrong-class gradient on the strongest rival: cross-entropy 0.5, "
               "temperature 2 0.25, squared error and hinge about 1, square loss on logits 0.11"),
)


def _gradient_rows(fn: Callable, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """d(sum of losses) / d logits, (batch, classes), or None when the loss misbehaves (the
    archive then files it under neutral values; training will judge it)."""
    logits = logits.clone().requires_grad_(True)
    try:
        losses = losses_of(fn(logits, targets.clone()))
    except Exception:  # noqa: BLE001 - a genome may raise anything
        return None
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (logits.shape[0],) or not losses.requires_grad:
        return None
    try:
        (grad,) = torch.autograd.grad(losses.sum(), logits, allow_unused=True)
    except Exception:  # noqa: BLE001
        return None
    if grad is None or not torch.isfinite(grad).all():
        return None
    return grad.detach()


def classification_descriptors(fn: Callable, classes: int = 10) -> dict[str, float]:
    """Shape descriptors of a classification loss, computed without training.

    Each compares the loss's gradient (with respect to the logits) on typical situations, so
    none changes when the loss is multiplied by a positive constant or shifted:

    * ``correct_push``: log10 of the gradient norm on confidently correct examples (the target
      leads by 6 logits) over the norm near initialisation (small random logits). How hard the
      loss keeps pushing examples it already gets right: cross-entropy -1.6, label smoothing
      -1.1 and temperature 2 -0.5 (they keep a target below certainty), squared error -2.3,
      focal -4.5 (it stops early), hinge -9 (exactly zero past the margin).
    * ``wrong_push``: the same on confidently wrong examples (another class leads by 6): how
      hard it pulls back examples it gets badly wrong, which are often mislabelled ones.
      Cross-entropy 0.2; the bounded squared error -0.65 (it gives up on them); a square
      loss on raw logits 0.5.
    * ``rival_focus``: where the push-down goes on an example whose strongest wrong class
      leads the target by 1 logit and the other eight trail it by 1: the share of the
      wrong-class gradient on that rival. About 1 for margin (hinge) losses, which only fight
      the top rival, and for squared error; 0.5 for cross-entropy; 0.25 at temperature 2;
      1/9 for a square loss on logits, which pushes every wrong class alike.
    """
    generator = torch.Generator().manual_seed(0)
    dtype = torch.float32  # what training feeds the loss
    rows = torch.arange(classes)
    targets = rows.clone()
    rival = (rows + 1) % classes
    near_uniform = 0.5 * torch.randn(classes, classes, generator=generator, dtype=dtype)
    confident = torch.zeros(classes, classes, dtype=dtype)
    confident[rows, targets] = _DESCRIPTOR_MARGIN
    wrong = torch.zeros(classes, classes, dtype=dtype)
    wrong[rows, rival] = _DESCRIPTOR_MARGIN
    contest = torch.full((classes, classes), -1.0, dtype=dtype)
    contest[rows, targets] = 0.0
    contest[rows, rival] = 1.0

    grads = [_gradient_rows(fn, x, targets) for x in (near_uniform, confident, wrong, contest)]
    if any(g is None for g in grads):
        return dict(_DESCRIPTOR_FALLBACK)
    base, right, bad, duel = grads
    base_norm = float(base.norm(dim=1).mean())
    if not base_norm > 1e-12:
        return dict(_DESCRIPTOR_FALLBACK)
    tiny = 1e-9 * base_norm

    def log_ratio(g: torch.Tensor) -> float:
        return max(-12.0, min(12.0, math.log10((float(g.norm(dim=1).mean()) + tiny) / base_norm)))

    wrong_classes = duel.clone()
    wrong_classes[rows, targets] = 0.0
    pushed = wrong_classes.abs().sum(dim=1)
    share = wrong_classes[rows, rival].abs() / pushed.clamp_min(1e-30)
    active = pushed > tiny
    rival_focus = float(share[active].mean()) if bool(active.any()) else _DESCRIPTOR_FALLBACK["rival_focus"]
    return {"correct_push": log_ratio(right), "wrong_push": log_ratio(bad), "rival_focus": rival_focus}
