"""``cifar10``: classification-loss discovery on CIFAR-10, the DiscoPOP paper's first case study.

Lu et al. 2024 ("Discovering Preference Optimization Algorithms with and for Large Language
Models", arXiv:2406.08414, sec. 3) evolve supervised classification losses by training a
ResNet-18 on CIFAR-10 for 5 epochs per proposal, then re-score the best ones on other
networks and on longer runs. This plug-in scores a loss ``loss(logits, targets) -> (batch,)``
the same way: train a network from scratch with the loss, report held-out accuracy.

The data and its splits are described in :mod:`fitness.cifar10.data`, the presets and the
transfer checks in :mod:`fitness.cifar10.recipes`, the networks in
:mod:`fitness.cifar10.networks`.

The trainer averages the per-example losses and uses SGD, so a loss's scale acts as a
learning-rate factor: unlike the Adam-trained ``synthetic-pref``, scale is part of what is
being searched (as it was in the paper). The descriptors, by contrast, ignore scale.

Determinism. On a CPU an evaluation is a function of the seed (model initialisation from
``torch.manual_seed(seed)``; shuffling, flips and translations from a ``torch.Generator``
seeded with it), for a given torch build and thread count. On a GPU the same seed gives the
same initialisation and data order, but results still vary from run to run by a few tenths of
a percent of accuracy: cuDNN picks convolution algorithms by timing (``cudnn.benchmark``) and
some of them accumulate with atomics, bf16 autocast rounds differently from float32, and
``torch.compile`` fuses and reorders reductions. ``deterministic=true`` turns off cuDNN
benchmarking and asks for deterministic algorithms (slower); bf16 and compile stay as set.

The two phases of the fitness contract (:mod:`fitness.base`): :meth:`Cifar10.train` trains the
network with the genome as the loss, in the genome's own process, and returns its weights
(the ``state_dict``) with the training curve; :meth:`Cifar10.score` loads the weights into a
fresh network and measures accuracy on the evaluation images, which only the trusted phase
holds (``held_out``; on a GPU preset it runs in a process of its own that may use CUDA). The
genome's process still shows the CIFAR-10 folder read-only (training reads it), and the ``val``
images are cut from the training batch files: a genome that escaped every other layer could
read them there. ``split=test`` scores on ``test_batch`` instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from engine.genome import GenomeError
from fitness.base import Artefacts, Fitness, SandboxNeeds, Score, Seed, TensorSpec, losses_of
import fitness.cifar10.networks as networks
from fitness.cifar10.data import (
    MEAN, STD, TEST_FILE, TRAIN_FILES, Cifar10Data, check_data_folder, find_data_folder, load_cifar10,
)
from fitness.cifar10.descriptors import DESCRIPTOR_SPACE, classification_descriptors
from fitness.cifar10.interface import ClassificationInterface, classification_seeds
from fitness.cifar10.recipes import PRESETS, RECIPE_FIELDS, augment, lr_factor


class Cifar10(Fitness):
    """Held-out CIFAR-10 accuracy of a network trained with the candidate loss (module doc).

    Args:
        preset: ``cpu`` (default), ``fast`` or ``paper``.
        data_dir: The ``cifar-10-batches-py`` folder or its parent (default: ``EVOLOSS_DATA``).
        split: ``val`` (held out from the training batches; the search) or ``test`` (the test
            batch; final reports only).
        **overrides: Any :class:`~fitness.cifar10.recipes.Recipe` field, e.g. ``arch``, ``epochs``, ``train_size``.

    Raises:
        Cifar10DataMissing, Cifar10DataMalformed: The data folder is not usable (checked here,
            cheaply; the images are read at the first evaluation).
        ValueError, TypeError: A bad or unknown option.
    """

    name = "cifar10"
    interface = ClassificationInterface()
    baseline = "cross_entropy"
    fitness_floor = 0.0
    descriptor_space = DESCRIPTOR_SPACE

    def __init__(self, preset: str = "cpu", data_dir: str | None = None, split: str = "val", **overrides: Any) -> None:
        if preset not in PRESETS:
            raise ValueError(f"cifar10: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - set(RECIPE_FIELDS))
        if unknown:
            raise TypeError(
                f"cifar10: unknown option(s) {', '.join(unknown)}; options: preset, data_dir, split, "
                f"{', '.join(RECIPE_FIELDS)}"
            )
        if split not in ("val", "test"):
            raise ValueError(f"cifar10 option split must be val or test, got {split!r}")
        if "train_size" in overrides and overrides["train_size"] in ("None", "none", "all"):
            overrides["train_size"] = None
        self.preset = preset
        self.split = split
        self.recipe = dataclasses.replace(PRESETS[preset], **overrides)
        self.folder = find_data_folder(data_dir)
        files = TRAIN_FILES + ((TEST_FILE,) if split == "test" else ())
        self.class_names = check_data_folder(self.folder, files)
        self._training: tuple[torch.Tensor, torch.Tensor] | None = None
        self._device_data: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._spec: dict[str, TensorSpec] | None = None
        self._compiled: dict[tuple, tuple[torch.nn.Module, Callable]] = {}

    def seeds(self) -> list[Seed]:
        return classification_seeds()

    def sandbox_needs(self) -> SandboxNeeds:
        """The CIFAR-10 folder, read-only in the worker's jail (which shows nothing else of the
        user's) and hidden from each genome's process: :meth:`prepare` reads the images before
        the fork, so training needs no file, and a genome that reads the training batches could
        rebuild the evaluation split (``split=train`` carves it from them with the seed) or read
        the test batch (``split=test``), and train on what it is scored on."""
        return SandboxNeeds(read_only=(str(self.folder),), hidden_from_genome=(str(self.folder),))

    def descriptors(self, fn: Callable) -> dict[str, float]:
        return classification_descriptors(fn, classes=self.interface.classes)

    # -- data and device ------------------------------------------------------------------
    def data(self) -> Cifar10Data:
        """Read the images (once per worker): the training images are kept for :meth:`train`,
        the evaluation images in :attr:`held_out` for :meth:`score`."""
        r = self.recipe
        data = load_cifar10(self.folder, self.split, r.train_size, r.val_size)
        if len(data.train_labels) < r.batch_size:
            raise ValueError(f"cifar10: {len(data.train_labels)} training images, fewer than "
                             f"batch_size {r.batch_size}")
        self._training = (data.train_images, data.train_labels)
        if not self.held_out.wiped:  # in a genome's process it is wiped: never refill it there
            self.held_out.put("eval", (data.eval_images, data.eval_labels))
        return data

    def _training_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._training is None:
            self.data()
        return self._training

    def _eval_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "eval" not in self.held_out:
            self.data()
        return self.held_out.get("eval", lambda: None)

    def prepare(self, seed: int) -> None:
        """Read the images in the warm worker (on the CPU: it must not initialise CUDA)."""
        if self._training is None or "eval" not in self.held_out:
            self.data()

    def resources(self) -> dict[str, float]:
        """One GPU per evaluation when the recipe trains on CUDA (``device=auto`` on a machine
        with one): scoring then also runs in a process of its own, which may use it."""
        wanted = self.recipe.device
        cuda = wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available())
        return {"cpus": 1.0, "gpus": 1.0 if cuda else 0.0}

    def device(self) -> torch.device:
        wanted = self.recipe.device
        if wanted == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"cifar10: device {wanted!r} asked for, but torch sees no CUDA device "
                               "(use device=auto or device=cpu)")
        return torch.device(wanted)

    def _on_device(self, device: torch.device, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images and labels of ``part`` (``train`` or ``eval``), resident on
        ``device`` (moved once per process)."""
        key = (part, str(device))
        if key not in self._device_data:
            images, labels = self._training_images() if part == "train" else self._eval_images()
            mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
            std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
            self._device_data[key] = ((images.to(device).float() / 255 - mean) / std, labels.to(device))
        return self._device_data[key]

    def _network(self, device: torch.device, compile_: bool, channels_last: bool, seed: int):
        """The network, initialised from ``seed``, and the callable to run it (compiled or not).
        A compiled network is built once and re-initialised in place for each candidate."""
        r = self.recipe
        key = (r.arch, r.width, len(self.class_names), str(device), channels_last)
        if compile_ and key in self._compiled:
            model, forward = self._compiled[key]
        else:
            model = networks.build(r.arch, r.width, classes=len(self.class_names)).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            forward = torch.compile(model) if compile_ else model
            if compile_:
                self._compiled[key] = (model, forward)
        networks.initialise(model, seed)
        return model, forward

    # -- the two phases ---------------------------------------------------------------------
    def _settings(self) -> tuple[torch.device, bool, bool, bool, Callable, Any]:
        """Device, CUDA, compile, channels-last, bf16 autocast and memory format as the recipe
        resolves them in this process."""
        r = self.recipe
        device = self.device()
        cuda = device.type == "cuda"
        amp = cuda if r.amp == "auto" else bool(r.amp)
        compile_ = cuda if r.compile == "auto" else bool(r.compile)
        channels_last = cuda if r.channels_last == "auto" else bool(r.channels_last)
        if cuda:
            torch.backends.cudnn.benchmark = not r.deterministic
            torch.backends.cudnn.deterministic = r.deterministic
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return device, cuda, compile_, channels_last, autocast, memory_format

    def artefact_spec(self, seed: int) -> dict[str, TensorSpec]:
        """The network's ``state_dict`` (as ``model.NAME``) and the training curve."""
        if self._spec is None:
            r = self.recipe
            model = networks.build(r.arch, r.width, classes=len(self.class_names))
            spec = {f"model.{name}": TensorSpec(tuple(value.shape), value.dtype)
                    for name, value in model.state_dict().items()}
            spec["train.loss_curve"] = TensorSpec((r.epochs,), torch.float32)
            spec["train.correct_last_epoch"] = TensorSpec((), torch.int64)
            spec["train.seconds"] = TensorSpec((), torch.float64)
            self._spec = spec
        return self._spec

    def train(self, fn: Callable, seed: int) -> Artefacts:
        """Train the network from scratch with ``fn`` as the loss; return its weights."""
        r = self.recipe
        device, cuda, compile_, channels_last, autocast, memory_format = self._settings()
        check_every = r.check_every or (25 if cuda else 1)
        train_x, train_y = self._on_device(device, "train")
        start = time.perf_counter()

        generator = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        model, forward = self._network(device, compile_, channels_last, seed)
        if isinstance(model, networks.AirbenchNet):
            model.initialise_whitening(train_x[:5000])
        norm_params, other_params = networks.norm_parameters(model)
        groups = [{"params": other_params, "lr": r.lr, "weight_decay": r.weight_decay, "base_lr": r.lr}]
        if norm_params:
            scaled = r.lr * r.norm_lr_scale
            groups.append({"params": norm_params, "lr": scaled, "weight_decay": r.weight_decay / r.norm_lr_scale,
                           "base_lr": scaled})
        optimizer = torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov and r.momentum > 0)

        count, batch = len(train_y), r.batch_size
        steps_per_epoch = count // batch
        total = steps_per_epoch * r.epochs
        step_losses = torch.zeros(total, device=device)
        correct_last_epoch = torch.zeros((), device=device, dtype=torch.long)
        checked = 0
        model.train()
        for epoch in range(r.epochs):
            order = torch.randperm(count, generator=generator).to(device)
            for index in range(steps_per_epoch):
                step = epoch * steps_per_epoch + index
                factor = lr_factor(r.schedule, step, total)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                rows = order[index * batch:(index + 1) * batch]
                images = augment(train_x[rows], generator, r).contiguous(memory_format=memory_format)
                targets = train_y[rows]
                with autocast():
                    logits = forward(images)
                logits = logits.float()
                loss = self._mean_loss(fn, logits, targets, epoch, index)
                step_losses[step] = loss.detach()
                if (step + 1) % check_every == 0 or index == steps_per_epoch - 1:
                    self._check_finite(step_losses, checked, step + 1, steps_per_epoch, total)
                    checked = step + 1
                optimizer.zero_grad(set_to_none=True)
                try:
                    loss.backward()
                except Exception as exc:
                    raise GenomeError(f"backward failed at epoch {epoch + 1}, step {index + 1}: "
                                      f"{type(exc).__name__}: {exc}", status="error") from exc
                optimizer.step()
                if epoch == r.epochs - 1:
                    correct_last_epoch += (logits.detach().argmax(1) == targets).sum()

        if cuda:
            torch.cuda.synchronize(device)
        curve = step_losses.view(r.epochs, steps_per_epoch).mean(dim=1)
        artefacts = {f"model.{name}": value.detach().cpu() for name, value in model.state_dict().items()}
        artefacts["train.loss_curve"] = curve.float().cpu()
        artefacts["train.correct_last_epoch"] = correct_last_epoch.cpu()
        artefacts["train.seconds"] = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        return artefacts

    def score(self, artefacts: Artefacts, seed: int) -> Score:
        """Accuracy on the evaluation images of a fresh network holding the trained weights.
        The training curve and speed are reported as the genome's process measured them."""
        r = self.recipe
        device, _, _, channels_last, autocast, memory_format = self._settings()
        eval_x, eval_y = self._on_device(device, "eval")
        model = networks.build(r.arch, r.width, classes=len(self.class_names))
        model.load_state_dict({name[len("model."):]: value for name, value in artefacts.items()
                               if name.startswith("model.")})
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        accuracy, eval_ce = self._score(model, model, eval_x, eval_y, autocast, memory_format)
        count, batch = len(self._training_images()[1]), r.batch_size
        steps_per_epoch = count // batch
        total = steps_per_epoch * r.epochs
        curve = artefacts["train.loss_curve"].tolist()
        seconds = float(artefacts["train.seconds"])
        images_seen = total * batch
        metrics = {
            "accuracy": accuracy,
            "eval_cross_entropy": eval_ce,
            "train_accuracy": float(artefacts["train.correct_last_epoch"]) / (steps_per_epoch * batch),
            "loss_curve": curve,
            "loss_first": curve[0],
            "loss_last": curve[-1],
            "epochs": r.epochs,
            "steps": total,
            "images": images_seen,
            "images_per_second": images_seen / seconds if seconds > 0 else None,
            "seconds": seconds,
            "train_images": count,
            "eval_images": len(eval_y),
            "split": self.split,
            "preset": self.preset,
            "arch": r.arch,
            "device": str(device),
        }
        return Score(fitness=accuracy, metrics=metrics)

    @staticmethod
    def _mean_loss(fn: Callable, logits: torch.Tensor, targets: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        where = f"at epoch {epoch + 1}, step {index + 1}"
        try:
            losses = losses_of(fn(logits, targets.clone()))
        except GenomeError:
            raise
        except Exception as exc:
            raise GenomeError(f"the loss raised {type(exc).__name__} {where}: {exc}", status="error") from exc
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (logits.shape[0],):
            found = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise GenomeError(f"the loss returned {found} {where}; expected shape ({logits.shape[0]},)",
                              status="error")
        if not losses.requires_grad:
            raise GenomeError(f"the loss has no gradient {where}", status="error")
        return losses.float().mean()

    @staticmethod
    def _check_finite(step_losses: torch.Tensor, begin: int, end: int, steps_per_epoch: int, total: int) -> None:
        bad = ~torch.isfinite(step_losses[begin:end])
        if bool(bad.any()):
            first = begin + int(bad.nonzero()[0, 0])
            epoch, index = divmod(first, steps_per_epoch)
            value = float(step_losses[first])
            raise GenomeError(
                f"the loss became non-finite ({value}) at epoch {epoch + 1}, step {index + 1} "
                f"(training step {first + 1} of {total}); training stopped",
                status="error",
            )

    def _score(self, model, forward, images, labels, autocast, memory_format) -> tuple[float, float]:
        """Accuracy and mean cross-entropy of the trained network on the evaluation images."""
        model.eval()
        correct = torch.zeros((), device=images.device, dtype=torch.long)
        cross_entropy = torch.zeros((), device=images.device, dtype=torch.float64)
        with torch.no_grad():
            for begin in range(0, len(labels), self.recipe.eval_batch_size):
                chunk = images[begin:begin + self.recipe.eval_batch_size].contiguous(memory_format=memory_format)
                targets = labels[begin:begin + self.recipe.eval_batch_size]
                with autocast():
                    logits = forward(chunk)
                logits = logits.float()
                correct += (logits.argmax(1) == targets).sum()
                cross_entropy += F.cross_entropy(logits, targets, reduction="sum").double()
        model.train()
        ce = float(cross_entropy) / len(labels)
        if not math.isfinite(ce):
            raise GenomeError("the trained network's logits are not finite on the evaluation images "
                              "(the weights diverged)", status="error")
        return float(correct) / len(labels), ce
