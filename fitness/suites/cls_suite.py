"""``cls-suite``: classification-loss discovery scored over a family of small tasks, with a
meta-train part for selection and a disjoint meta-test part for validation.

The DiscoPOP paper's first case study (Lu et al. 2024, sec. 3) evolves classification losses
on CIFAR-10; ``cifar10`` scores one such task. This suite asks whether a loss is better across
the settings where classification losses are known to differ, each task small enough to train
in well under a second on one CPU core (tasks drawn by Latin hypercube sampling from a
seeded generator):

* **label noise** 0 to 40%, symmetric (a flipped label goes to another class uniformly), in
  the training labels only;
* **class count** 3 to 10 and **imbalance**: the training set's class sizes fall
  geometrically from the first class to the last by a factor of 1 to 20 (the long-tailed
  setting of Cao et al. 2019, LDAM);
* **model**: a linear classifier or a one-hidden-layer network (32 ReLU units);
* **training set size** 256 to 1024;
* **data**: synthetic (each class a mixture of two Gaussian clusters in 16 dimensions, so a
  linear model underfits) or the real handwritten digits scikit-learn ships
  (``sklearn.datasets.load_digits``: 1,797 8x8 images, 10 classes, no download). The digits
  are split once into two fixed halves (a task trains on 600 images of its half, thinned per
  class for imbalance, and is scored on the rest of the half): the meta-train digits task draws from one, the
  meta-test digits task from the other, so no image is shared between the parts.

Score of a task: balanced accuracy (mean per-class recall) on clean, held-out examples,
rescaled so that chance is 0 and perfect is 1: ``(balanced_accuracy - 1/K) / (1 - 1/K)``.
Balanced, because on an imbalanced task plain accuracy rewards predicting the majority class
(the protocol of the long-tail literature: train imbalanced, test balanced). Held-out
synthetic examples come from the same mixture with balanced classes; held-out digits are the
rest of the task's half.

Training: mini-batch SGD with momentum 0.9 (batch 64, 300 steps, weight decay 5e-4), as
``cifar10`` trains, so a loss's scale acts as a learning-rate factor and is part of what is
searched. The held-out examples stay in the plug-in's held-out store, out of the training
phase's reach; the digits data set itself is public (scikit-learn ships it), so its held-out
half is only as secret as that. The fitness is the robust aggregate of the gain over cross-entropy on the same task
and evaluation seed (:func:`fitness.suites.base.aggregate`); cross-entropy scores exactly 0.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engine.genome import GenomeError
from fitness.base import SandboxNeeds, Seed, TensorSpec, losses_of
from fitness.cifar10 import Cifar10, ClassificationInterface, classification_descriptors, classification_seeds
from fitness.truth import Draws
from fitness.suites.base import Task, TaskSuite, check_losses, latin_hypercube, log_uniform, pick

MODELS = ("linear", "mlp")
_DIMENSIONS = 16  # synthetic features
_CLUSTERS = 2  # Gaussian clusters per synthetic class
_CENTRE_SCALE = 0.6  # spread of cluster centres (cluster noise has unit variance)
_HIDDEN = 32
_TEST_PER_CLASS = 60  # balanced synthetic test set
_DIGITS_TRAIN = 600  # training images of a digits task (the rest of its half is held out)
_DIGITS_DIMENSIONS = 64  # 8x8 pixels


class SuiteClassificationInterface(ClassificationInterface):
    """``cifar10``'s contract, ``loss(logits, targets) -> (batch,)``, described for this suite."""

    description = (
        "Write a classification loss for training a small classifier (a linear model or a "
        "one-hidden-layer network) from scratch on tasks with 3 to 10 classes, some with "
        "imbalanced classes and up to 40% of training labels flipped to a wrong class. logits is "
        "a float tensor of shape (batch, num_classes), the model's unnormalised class scores; it "
        "carries the gradient. targets is an int64 tensor of shape (batch,) holding the (possibly "
        "wrong) class index of each example, in [0, num_classes). Return a tensor of per-example "
        "losses of shape (batch,), which the trainer averages and minimises with SGD (so the "
        "loss's overall scale acts like a learning-rate factor); do not reduce it to a scalar. "
        "Fitness is the balanced accuracy on clean held-out examples, over many tasks. torch, F "
        "(torch.nn.functional) and math are available; imports are not needed. The loss must be "
        "finite and differentiable for any logits; prefer F.log_softmax and F.cross_entropy to "
        "exponentiating logits yourself."
    )


@dataclass(frozen=True)
class ClassificationTaskSpec:
    """The parameters of one classification task (see the module doc)."""

    data: str  # "synthetic" or "digits"
    model: str
    classes: int
    imbalance: float
    label_noise: float
    train_size: int
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4


def draw_classification_tasks(count: int, rng: np.random.Generator) -> list[ClassificationTaskSpec]:
    """``count`` task specs: the last one on the digits data, the others synthetic."""
    specs = []
    for i, u in enumerate(latin_hypercube(count, 5, rng)):
        digits = i == count - 1
        specs.append(ClassificationTaskSpec(
            data="digits" if digits else "synthetic",
            model=pick(u[0], MODELS),
            classes=10 if digits else 3 + min(int(u[1] * 8), 7),
            imbalance=float(f"{log_uniform(u[2], 1.0, 20.0):.3g}"),
            label_noise=round(0.4 * float(u[3]), 3),
            train_size=_DIGITS_TRAIN if digits else int(round(log_uniform(u[4], 256, 1024))),
        ))
    return specs


@dataclass(frozen=True)
class ClassificationData:
    """What training sees: inputs, (noisy) labels and the initial parameters."""

    model: str
    classes: int
    inputs: torch.Tensor  # (n, d)
    labels: torch.Tensor  # (n,)
    initial: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _HeldOut:
    inputs: torch.Tensor
    labels: torch.Tensor
    train_label_accuracy: torch.Tensor  # share of training labels that are correct


def class_sizes(total: int, classes: int, imbalance: float) -> list[int]:
    """Training class sizes falling geometrically by ``imbalance`` from first to last, >= 2 each."""
    weights = np.array([imbalance ** (-k / max(classes - 1, 1)) for k in range(classes)])
    return [max(2, int(round(total * w / weights.sum()))) for w in weights]


def _sample_classes(pool_labels: torch.Tensor, sizes: list[int], random: Draws) -> torch.Tensor:
    """Indices into a labelled pool: up to ``sizes[k]`` examples of each class ``k``."""
    chosen = []
    for k, size in enumerate(sizes):
        members = (pool_labels == k).nonzero().squeeze(1)
        members = members[random.randperm(len(members))]
        chosen.append(members[:size])
    return torch.cat(chosen)


def _flip(labels: torch.Tensor, classes: int, rate: float, random: Draws) -> torch.Tensor:
    flip = random.rand(len(labels)) < rate
    offset = random.randint(1, classes, (len(labels),))
    return torch.where(flip, (labels + offset) % classes, labels)


def _initial(model: str, dims: int, classes: int, random: Draws) -> dict[str, torch.Tensor]:
    """PyTorch's default ``nn.Linear`` initialisation (uniform in +-1/sqrt(fan_in))."""

    def uniform(fan_in: int, *shape: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return (2 * random.rand(*shape) - 1) * bound

    if model == "linear":
        return {"w": uniform(dims, dims, classes), "b": uniform(dims, classes)}
    return {"w1": uniform(dims, dims, _HIDDEN), "b1": uniform(dims, _HIDDEN),
            "w2": uniform(_HIDDEN, _HIDDEN, classes), "b2": uniform(_HIDDEN, classes)}


def forward(model: str, parameters: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """The classifier's logits (n, classes)."""
    if model == "linear":
        return inputs @ parameters["w"] + parameters["b"]
    return torch.relu(inputs @ parameters["w1"] + parameters["b1"]) @ parameters["w2"] + parameters["b2"]


def train_classifier(fn: Callable, data: ClassificationData, spec: ClassificationTaskSpec,
                     generator: torch.Generator, task_name: str = "task") -> dict[str, torch.Tensor]:
    """Train from ``data.initial`` with ``fn`` as the loss (mini-batch SGD with momentum).

    Raises:
        GenomeError: (``error``) when the loss raises, returns the wrong shape or becomes
            non-finite, naming the task and the step.
    """
    parameters = {k: v.clone().requires_grad_(True) for k, v in data.initial.items()}
    optimiser = torch.optim.SGD(list(parameters.values()), lr=spec.learning_rate, momentum=spec.momentum,
                                weight_decay=spec.weight_decay)
    count = len(data.labels)
    batch = min(spec.batch_size, count)
    order = torch.randperm(count, generator=generator)
    cursor = 0
    for step in range(1, spec.steps + 1):
        if cursor + batch > count:
            order, cursor = torch.randperm(count, generator=generator), 0
        rows = order[cursor:cursor + batch]
        cursor += batch
        logits = forward(data.model, parameters, data.inputs[rows])
        try:
            losses = losses_of(fn(logits, data.labels[rows].clone()))
        except GenomeError:
            raise
        except Exception as exc:
            raise GenomeError(f"task {task_name}: the loss raised {type(exc).__name__} at training step "
                              f"{step}: {exc}", status="error") from exc
        loss = check_losses(losses, batch, task_name, step).float().mean()
        if not torch.isfinite(loss):
            raise GenomeError(f"task {task_name}: the loss became non-finite (nan or inf) at training step {step}",
                              status="error")
        optimiser.zero_grad(set_to_none=False)
        if loss.requires_grad:
            loss.backward()
        optimiser.step()
        if not all(torch.isfinite(p).all() for p in parameters.values()):
            raise GenomeError(f"task {task_name}: the weights became non-finite at training step {step}",
                              status="error")
    return {k: v.detach() for k, v in parameters.items()}


def balanced_score(logits: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """Balanced accuracy rescaled so that chance is 0 and perfect is 1."""
    predictions = logits.argmax(dim=1)
    recalls = [float((predictions[labels == k] == k).float().mean()) for k in range(classes) if (labels == k).any()]
    balanced = sum(recalls) / len(recalls)
    return (balanced - 1.0 / classes) / (1.0 - 1.0 / classes)


def digits_file() -> Path | None:
    """The file scikit-learn's ``load_digits`` reads (found without importing scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path.resolve()
    return None


class ClassificationSuite(TaskSuite):
    """Classification losses scored over small synthetic tasks and the digits data (module doc).

    Options: those of :class:`fitness.suites.base.TaskSuite` (``split``, ``tasks``, ``seeds``,
    ``worst_weight``, ``worst_tolerance``, ``suite_seed``, ``train_tasks`` 6, ``test_tasks`` 8).
    """

    name = "cls-suite"
    interface = SuiteClassificationInterface()
    baseline = "cross_entropy"
    descriptor_space = Cifar10.descriptor_space

    def __init__(self, train_tasks: int = 6, test_tasks: int = 8, **options: Any) -> None:
        super().__init__(train_tasks=train_tasks, test_tasks=test_tasks, **options)

    def seeds(self) -> list[Seed]:
        return classification_seeds()

    def sandbox_needs(self) -> SandboxNeeds:
        # The digits file labels every image, the test rows' included: only the child that
        # builds a problem reads it (fitness.truth); every genome's process has it covered.
        return SandboxNeeds(hidden_from_genome=tuple(str(path) for path in [digits_file()] if path is not None))

    def descriptors(self, fn: Callable) -> dict[str, float]:
        return classification_descriptors(fn, classes=self.interface.classes)

    def make_tasks(self, count: int, split: str, rng: np.random.Generator) -> list[ClassificationTaskSpec]:
        return draw_classification_tasks(count, rng)

    def describe(self, spec: ClassificationTaskSpec) -> str:
        return (f"{spec.data}/{spec.model}/K={spec.classes}/imbalance={spec.imbalance:g}/"
                f"noise={spec.label_noise:g}/n={spec.train_size}")

    # -- data -------------------------------------------------------------------------------
    def digits_half(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The half of the digits data set that ``split``'s digits task draws from (features
        scaled to [0, 1]); the halves are fixed by ``suite_seed`` and disjoint.

        Read from the file each time, never kept: the whole data set labels the test rows too, and
        what a warm worker keeps every genome's process inherits (the file itself is covered
        there, :meth:`sandbox_needs`)."""
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise RuntimeError("cls-suite needs scikit-learn for the digits data: pip install scikit-learn") from exc
        digits = load_digits()
        inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        del digits
        order = torch.from_numpy(np.random.default_rng([self.suite_seed, 7]).permutation(len(labels)))
        half = order[: len(order) // 2] if split == "train" else order[len(order) // 2:]
        return inputs[half], labels[half]

    def build_problem(self, task: Task, seed: int) -> tuple[ClassificationData, _HeldOut]:
        spec, random = task.spec, task.draws(seed)
        K = spec.classes
        if spec.data == "digits":
            pool_x, pool_y = self.digits_half(task.split)
            shuffle = random.randperm(len(pool_y))
            pool_x, pool_y = pool_x[shuffle], pool_y[shuffle]
            test_x, test_y = pool_x[spec.train_size:], pool_y[spec.train_size:]
            pool_x, pool_y = pool_x[:spec.train_size], pool_y[:spec.train_size]
            # The largest class keeps all of its images; the others fall geometrically from it.
            head = int(torch.bincount(pool_y, minlength=K).min())
            sizes = [max(2, round(head * spec.imbalance ** (-k / (K - 1)))) for k in range(K)]
            rows = _sample_classes(pool_y, sizes, random)
            train_x, clean_y = pool_x[rows], pool_y[rows]
        else:
            centres = _CENTRE_SCALE * random.randn(K, _CLUSTERS, _DIMENSIONS) * math.sqrt(2.0)

            def draw(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
                labels = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(sizes)])
                cluster = random.randint(_CLUSTERS, (len(labels),))
                noise = random.randn(len(labels), _DIMENSIONS)
                return centres[labels, cluster] + noise, labels

            train_x, clean_y = draw(class_sizes(spec.train_size, K, spec.imbalance))
            test_x, test_y = draw([_TEST_PER_CLASS] * K)
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-3)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        noisy_y = _flip(clean_y, K, spec.label_noise, random)
        data = ClassificationData(model=spec.model, classes=K, inputs=train_x.contiguous(), labels=noisy_y,
                                  initial=_initial(spec.model, train_x.shape[1], K, random))
        held_out = _HeldOut(test_x.contiguous(), test_y.clone(), (noisy_y == clean_y).float().mean())
        return data, held_out

    def parameter_spec(self, task: Task) -> dict[str, TensorSpec]:
        dims = _DIGITS_DIMENSIONS if task.spec.data == "digits" else _DIMENSIONS
        K = task.spec.classes
        shapes = ({"w": (dims, K), "b": (K,)} if task.spec.model == "linear" else
                  {"w1": (dims, _HIDDEN), "b1": (_HIDDEN,), "w2": (_HIDDEN, K), "b2": (K,)})
        return {name: TensorSpec(shape, torch.float32) for name, shape in shapes.items()}

    # -- the two phases ---------------------------------------------------------------------
    def train_task(self, fn: Callable, task: Task, seed: int) -> dict[str, torch.Tensor]:
        data = self.training_data(task, seed)
        # Mini-batch order from its own stream, the same for every candidate.
        order = torch.Generator().manual_seed(task.public_seed(seed) ^ 0x5DEECE66D)
        return train_classifier(fn, data, task.spec, order, task.name)

    def score_task(self, parameters: dict[str, torch.Tensor], task: Task, seed: int) -> float:
        held_out = self.truth(task, seed)
        for name, value in parameters.items():
            if not torch.isfinite(value).all():
                raise GenomeError(f"task {task.name}: the trained parameter {name!r} is not finite", status="error")
        with torch.no_grad():
            logits = forward(task.spec.model, parameters, held_out.inputs)
        return balanced_score(logits, held_out.labels, task.spec.classes)
