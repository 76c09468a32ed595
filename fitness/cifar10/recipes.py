"""Training recipes of the ``cifar10`` plug-in: the :class:`Recipe` fields, the presets, the
learning-rate schedules and the data augmentation.

Presets (every :class:`Recipe` field can be overridden as an option):

* ``paper``: CIFAR ResNet-18, 5 epochs on 45,000 images, batch 128, SGD lr 0.1 momentum 0.9
  weight decay 5e-4, cosine decay over the run, random crop (4 px zero padding) and flips,
  float32, on the GPU. The paper names ResNet-18 and 5 epochs but not the optimiser (no code
  for this case study is in its code release); the optimiser, weight decay, augmentation and cosine
  schedule are those of kuangliu/pytorch-cifar's ``main.py``, the usual source of CIFAR
  ResNet-18 code, with the cosine compressed from its 200 epochs to the 5 trained here (left
  at 200, the learning rate would barely move in 5 epochs). Batch 128 is our choice.
* ``fast``: the speed-run style ``airbench`` network, 10 epochs of batch 1024 on 45,000 images,
  Nesterov SGD with a triangular schedule and a 64x learning rate on batch-norm shifts,
  flips and 2 px translations; data resident on the device, channels_last, bf16 autocast and
  ``torch.compile`` on a GPU (compiled once per worker; candidates re-initialise the same
  network in place). It runs on a CPU too, without compile or bf16, slowly.
* ``cpu``: a 4-layer CNN (``width=16``) on a 5,000-image subset for 3 epochs, scored on 2,000
  held-out images: 40-60 s per candidate on one core of a busy 2-core machine
  (``benchmarks/cifar10_speed.py``).

Transfer checks (the paper's re-scoring on other networks and longer runs): the ``arch``
(``resnet18``, ``airbench``, ``cnn``) and ``epochs`` options, e.g. ``reevaluate RUN --fitness
cifar10 --fitness-opt preset=paper --fitness-opt arch=airbench --fitness-opt epochs=20``.
Only the named fields change; the rest of the preset's recipe stays.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engine.helpers import field_help
from fitness.cifar10.networks import ARCH_WIDTHS


@dataclass(frozen=True)
class Recipe:
    """How a candidate loss is trained and scored. The defaults are the ``cpu`` preset; any
    field can be overridden by name with ``--fitness-opt FIELD=VALUE``."""

    arch: str = field(default="cnn", metadata=field_help("network: resnet18, airbench or cnn (transfer checks)"))
    width: int | None = field(default=None, metadata=field_help("base channel width (default: the network's own)"))
    epochs: int = field(default=3, metadata=field_help("passes over the training images"))
    batch_size: int = field(default=64, metadata=field_help("training batch size (the last partial batch is dropped)"))
    lr: float = field(default=0.05, metadata=field_help(
        "peak SGD learning rate for the mean of the per-example losses"))
    momentum: float = field(default=0.9, metadata=field_help("SGD momentum"))
    nesterov: bool = field(default=True, metadata=field_help("Nesterov momentum"))
    weight_decay: float = field(default=5e-4, metadata=field_help("SGD weight decay"))
    norm_lr_scale: float = field(default=1.0, metadata=field_help(
        "learning-rate factor of batch-norm parameters (their weight decay is divided by it)"))
    schedule: str = field(default="triangle", metadata=field_help(
        "learning-rate schedule over the run: cosine (to zero), triangle (0.2 -> 1 at 23% -> 0.07) or constant"))
    flip: bool = field(default=True, metadata=field_help("random horizontal flips"))
    translate: int = field(default=2, metadata=field_help("random translations by up to this many pixels (0: none)"))
    pad_mode: str = field(default="reflect", metadata=field_help(
        "padding of translations: reflect or constant (zeros)"))
    train_size: int | None = field(default=5000, metadata=field_help(
        "training images used (None: all not held out)"))
    val_size: int = field(default=2000, metadata=field_help("training images held out for scoring (split=val)"))
    device: str = field(default="cpu", metadata=field_help("auto (cuda if available), cpu, cuda or cuda:N"))
    amp: Any = field(default="auto", metadata=field_help("bf16 autocast: auto (on CUDA only), true or false"))
    compile: Any = field(default=False, metadata=field_help(
        "torch.compile the network: auto (on CUDA only), true or false"))
    channels_last: Any = field(default="auto", metadata=field_help(
        "channels_last memory format: auto (on CUDA only), true or false"))
    deterministic: bool = field(default=False, metadata=field_help("deterministic cuDNN algorithms on a GPU (slower)"))
    check_every: int | None = field(default=None, metadata=field_help(
        "training steps between checks for a non-finite loss (default: every step on a CPU, 25 on a GPU)"))
    eval_batch_size: int = field(default=1000, metadata=field_help("batch size when scoring"))

    def __post_init__(self) -> None:
        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"cifar10 option {name} must be an integer >= {low}, got {value!r}")

        def number(name: str, low: float, low_open: bool) -> None:
            value = getattr(self, name)
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not ok or (value <= low if low_open else value < low):
                raise ValueError(f"cifar10 option {name} must be a number {'>' if low_open else '>='} {low}, "
                                 f"got {value!r}")

        def choice(name: str, allowed: tuple[Any, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"cifar10 option {name} must be one of {', '.join(map(str, allowed))}; "
                                 f"got {getattr(self, name)!r}")

        choice("arch", tuple(ARCH_WIDTHS))
        integer("width", 1, optional=True)
        integer("epochs", 1)
        integer("batch_size", 1)
        number("lr", 0.0, True)
        number("momentum", 0.0, False)
        if self.momentum >= 1:
            raise ValueError(f"cifar10 option momentum must be < 1, got {self.momentum!r}")
        number("weight_decay", 0.0, False)
        number("norm_lr_scale", 0.0, True)
        choice("schedule", ("cosine", "triangle", "constant"))
        for name in ("flip", "nesterov", "deterministic"):
            choice(name, (True, False))
        integer("translate", 0)
        if self.translate > 16:
            raise ValueError(f"cifar10 option translate must be at most 16 pixels, got {self.translate!r}")
        choice("pad_mode", ("reflect", "constant"))
        integer("train_size", 1, optional=True)
        integer("val_size", 1)
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            raise ValueError(f"cifar10 option device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        for name in ("amp", "compile", "channels_last"):
            choice(name, ("auto", True, False))
        integer("check_every", 1, optional=True)
        integer("eval_batch_size", 1)
        if self.train_size is not None and self.train_size < self.batch_size:
            raise ValueError(
                f"cifar10: train_size ({self.train_size}) is smaller than batch_size ({self.batch_size}); "
                "no full batch to train on"
            )


#: The presets (see the module docstring).
PRESETS: dict[str, Recipe] = {
    "paper": Recipe(
        arch="resnet18", epochs=5, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
        schedule="cosine", flip=True, translate=4, pad_mode="constant", train_size=None, val_size=5000,
        device="auto", amp=False, compile=False, channels_last="auto",
    ),
    # The speed-run recipe in mean-loss units: their lr 11.5 per 1024 examples with momentum 0.85
    # is a step of 1.5 on the batch mean, and their decoupled weight decay 0.0153 per 1024
    # examples is 1.33e-3 in torch SGD's coupled form at that learning rate.
    "fast": Recipe(
        arch="airbench", epochs=10, batch_size=1024, lr=1.5, momentum=0.85, nesterov=True, weight_decay=1.33e-3,
        norm_lr_scale=64.0, schedule="triangle", flip=True, translate=2, pad_mode="reflect", train_size=None,
        val_size=5000, device="auto", amp="auto", compile="auto", channels_last="auto", eval_batch_size=2000,
    ),
    "cpu": Recipe(),  # the field defaults
}

RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rate at ``step`` of ``total`` as a fraction of the peak, for ``schedule``."""
    progress = step / max(1, total)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "triangle":  # the speed runs' shape: warm up to the peak, then decay linearly
        start, peak, end, peak_at = 0.2, 1.0, 0.07, 0.23
        if progress < peak_at:
            return start + (peak - start) * progress / peak_at
        return peak + (end - peak) * (progress - peak_at) / (1 - peak_at)
    return 1.0


def augment(images: torch.Tensor, generator: torch.Generator, recipe: Recipe) -> torch.Tensor:
    """Random flips and translations of a batch (batch, 3, H, W); the random numbers come from
    ``generator`` on the CPU so that a seed fixes them on any device."""
    batch, _, height, width = images.shape
    if recipe.flip:
        flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    r = recipe.translate
    if r:
        padded = F.pad(images, (r, r, r, r), mode=recipe.pad_mode)
        shifts = torch.randint(0, 2 * r + 1, (batch, 2), generator=generator)
        rows = (shifts[:, :1] + torch.arange(height)).to(images.device)
        cols = (shifts[:, 1:] + torch.arange(width)).to(images.device)
        index = torch.arange(batch, device=images.device)
        # Advanced indices around a slice: the result is (batch, H, W, channels).
        images = padded[index[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return images
