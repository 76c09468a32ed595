"""``cifar10``: classification-loss discovery on CIFAR-10, the DiscoPOP paper's first case study.

Lu et al. 2024 ("Discovering Preference Optimization Algorithms with and for Large Language
Models", arXiv:2406.08414, sec. 3) evolve supervised classification losses by training a
ResNet-18 on CIFAR-10 for 5 epochs per proposal, then re-score the best ones on other
networks and on longer runs. This plug-in scores a loss ``loss(logits, targets) -> (batch,)``
the same way: train a network from scratch with the loss, report held-out accuracy.

Data. The standard python batches of CIFAR-10 (``cifar-10-batches-py``: ``data_batch_1`` ...
``data_batch_5``, ``test_batch``, ``batches.meta``; pickled dicts holding ``b"data"``, uint8
(N, 3072), and ``b"labels"``) from the ``data_dir`` option or the ``EVOLOSS_DATA`` variable
(the folder itself or the folder holding it). Missing or malformed files stop the plug-in with
a message saying what was expected and where to put it; random data is never substituted.
The pickles are read with an unpickler that only accepts numpy arrays, lists and bytes.

Splits. The search never sees the test batch: ``val_size`` images are held out from the 50,000
training images (a class-balanced split fixed once for all seeds and candidates) and the
network trains on ``train_size`` of the rest. ``split="test"`` trains the same way and scores
on the 10,000 test images, for final reports (``python -m engine reevaluate RUN --fitness
cifar10 --fitness-opt split=test``).

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
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.genome import GenomeError
from fitness.base import Descriptor, Fitness, Interface, Score, Seed, losses_of
from fitness import cifar10_nets

#: The files of the python version of CIFAR-10, and where to get them.
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
FOLDER_NAME = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGE_SHAPE = (3, 32, 32)
IMAGE_VALUES = 3 * 32 * 32
#: Per-channel mean and standard deviation of the CIFAR-10 training images.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
#: The held-out split is the same for every seed and candidate.
SPLIT_SEED = 0
#: Logit scale of the contract-check inputs: trained networks reach logits of +-10 to +-30.
_CHECK_LOGIT_SCALE = 4.0


# -- errors ------------------------------------------------------------------------------
class Cifar10DataError(Exception):
    """The CIFAR-10 files are missing or malformed (a setup problem, never the genome's)."""


class Cifar10DataMissing(Cifar10DataError, FileNotFoundError):
    """The folder or one of its files does not exist."""


class Cifar10DataMalformed(Cifar10DataError, ValueError):
    """A file exists but does not hold what the CIFAR-10 python batches hold."""


_HOW_TO_GET = (
    f"Expected the python version of CIFAR-10: a folder {FOLDER_NAME} holding "
    f"{', '.join(TRAIN_FILES)}, {TEST_FILE} and {META_FILE}. Download {ARCHIVE_NAME} from "
    f"{DOWNLOAD_URL}, extract it (tar xzf {ARCHIVE_NAME}) and pass the folder with "
    "--fitness-opt data_dir=PATH or set EVOLOSS_DATA=PATH (the folder itself or the folder holding it)."
)


# -- the function contract ---------------------------------------------------------------
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


# -- cheap behaviour descriptors ---------------------------------------------------------
_DESCRIPTOR_MARGIN = 6.0  # logit lead of the confident class (p about 0.98 against 9 others)
_DESCRIPTOR_FALLBACK = {"correct_push": -3.0, "wrong_push": 0.0, "rival_focus": 0.5}


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


# -- data --------------------------------------------------------------------------------
class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (numpy arrays, lists, bytes) and nothing else: a pickle
    can name any callable, and these files come from outside."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}; a CIFAR-10 batch holds only numpy arrays, lists and bytes"
            )
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            import codecs

            return codecs.encode
        # Old pickles (the official files) name numpy.core, which numpy 2 renamed numpy._core.
        core = getattr(np, "_core", None) or np.core
        return getattr(core.multiarray, name)


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return _BatchUnpickler(handle, encoding="bytes").load()
    except OSError as exc:
        raise Cifar10DataMissing(f"cannot read CIFAR-10 file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # truncated or foreign files raise anything from EOFError to KeyError
        raise Cifar10DataMalformed(
            f"CIFAR-10 file {path} is not a python-version CIFAR-10 batch ({type(exc).__name__}: {exc}); "
            f"it may be truncated or from another release. {_HOW_TO_GET}"
        ) from exc


def _entry(record: Any, key: str, path: Path) -> Any:
    if not isinstance(record, dict):
        raise Cifar10DataMalformed(
            f"CIFAR-10 file {path} holds a {type(record).__name__}, expected a dict. {_HOW_TO_GET}"
        )
    for candidate in (key.encode(), key):
        if candidate in record:
            return record[candidate]
    keys = ", ".join(repr(k) for k in list(record)[:8])
    raise Cifar10DataMalformed(f"CIFAR-10 file {path} has no {key!r} entry (found {keys}). {_HOW_TO_GET}")


def find_data_folder(data_dir: str | os.PathLike | None = None) -> Path:
    """The ``cifar-10-batches-py`` folder from ``data_dir`` or ``EVOLOSS_DATA`` (the folder
    itself or its parent).

    Raises:
        Cifar10DataMissing: No folder given, or no CIFAR-10 batches where it points.
    """
    if data_dir is not None and str(data_dir).strip():
        raw, source = str(data_dir), "data_dir"
    elif os.environ.get("EVOLOSS_DATA", "").strip():
        raw, source = os.environ["EVOLOSS_DATA"], "EVOLOSS_DATA"
    else:
        raise Cifar10DataMissing(f"CIFAR-10 data folder not given. {_HOW_TO_GET}")
    root = Path(raw).expanduser().resolve()
    if not root.is_dir():
        raise Cifar10DataMissing(f"CIFAR-10 data folder {root} (from {source}) does not exist. {_HOW_TO_GET}")
    for folder in (root / FOLDER_NAME, root):
        if any((folder / name).is_file() for name in (META_FILE, *TRAIN_FILES, TEST_FILE)):
            return folder
    hint = ""
    archives = [p for p in (root / ARCHIVE_NAME, root.parent / ARCHIVE_NAME) if p.is_file()]
    if archives:
        hint = f" Found {archives[0]} not yet extracted: run tar xzf {archives[0]} -C {root}."
    raise Cifar10DataMissing(
        f"no CIFAR-10 batches in {root} (from {source}) or in {root / FOLDER_NAME}.{hint} {_HOW_TO_GET}"
    )


def check_data_folder(folder: Path, files: tuple[str, ...]) -> list[str]:
    """Cheap checks of ``folder`` (no image is read): the files exist, ``batches.meta`` names
    the classes, and no batch is shorter than its images need (a truncated download).

    Returns:
        The class names.

    Raises:
        Cifar10DataMissing, Cifar10DataMalformed: naming the file and what was wrong.
    """
    missing = [name for name in (META_FILE, *files) if not (folder / name).is_file()]
    if missing:
        raise Cifar10DataMissing(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}. {_HOW_TO_GET}")
    meta_path = folder / META_FILE
    meta = _unpickle(meta_path)
    names = _entry(meta, "label_names", meta_path)
    if not isinstance(names, (list, tuple)) or len(names) < 2:
        raise Cifar10DataMalformed(f"CIFAR-10 file {meta_path}: label_names must list the classes, got {names!r}")
    labels = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]
    per_batch = _entry(meta, "num_cases_per_batch", meta_path)
    if isinstance(per_batch, (int, np.integer)) and per_batch > 0:
        for name in files:
            size = (folder / name).stat().st_size
            if size < int(per_batch) * IMAGE_VALUES:
                raise Cifar10DataMalformed(
                    f"CIFAR-10 file {folder / name} is {size:,} bytes, too small for the {int(per_batch):,} images "
                    f"{META_FILE} announces ({int(per_batch) * IMAGE_VALUES:,} bytes of pixels): a truncated "
                    f"download? {_HOW_TO_GET}"
                )
    return labels


def read_batch(path: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file as uint8 images (n, 3, 32, 32) and int64 labels (n,).

    Raises:
        Cifar10DataMalformed: The file does not hold a CIFAR-10 batch.
    """
    record = _unpickle(path)
    data, labels = _entry(record, "data", path), _entry(record, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_VALUES:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise Cifar10DataMalformed(
            f"CIFAR-10 file {path}: 'data' must be a uint8 array of shape (N, {IMAGE_VALUES}), found {found}"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise Cifar10DataMalformed(f"CIFAR-10 file {path}: 'labels' must be integers ({exc})") from exc
    if labels.shape != (data.shape[0],):
        raise Cifar10DataMalformed(
            f"CIFAR-10 file {path}: {data.shape[0]} images but labels of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise Cifar10DataMalformed(
            f"CIFAR-10 file {path}: labels must lie in [0, {classes}), found {labels.min()}..{labels.max()}"
        )
    return data.reshape(-1, *IMAGE_SHAPE), labels


def balanced_order(labels: np.ndarray, classes: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices of ``labels`` shuffled within each class and interleaved class by class, so
    that every prefix is class-balanced (to within one image per class)."""
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.int64)
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        keys[rng.permutation(members)] = np.arange(len(members)) * classes + c
    return np.argsort(keys, kind="stable")


@dataclass(frozen=True)
class Cifar10Data:
    """The images an evaluation uses, as uint8 tensors (n, 3, 32, 32) and int64 labels (n,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    class_names: tuple[str, ...]
    split: str


def load_cifar10(folder: Path, split: str, train_size: int | None, val_size: int) -> Cifar10Data:
    """Read the batches and cut the splits (see the module docstring).

    Raises:
        Cifar10DataMissing, Cifar10DataMalformed: naming the file at fault.
        ValueError: ``train_size + val_size`` exceeds the training images.
    """
    files = TRAIN_FILES + ((TEST_FILE,) if split == "test" else ())
    class_names = check_data_folder(folder, files)
    classes = len(class_names)
    parts = [read_batch(folder / name, classes) for name in TRAIN_FILES]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    wanted = val_size + (train_size or 0)
    if wanted > len(labels) or (train_size is None and val_size >= len(labels)):
        raise ValueError(
            f"cifar10: train_size ({train_size}) + val_size ({val_size}) exceeds the {len(labels):,} training "
            f"images in {folder}"
        )
    order = balanced_order(labels, classes)
    held_out, rest = order[:val_size], order[val_size:]
    train = rest if train_size is None else rest[:train_size]
    if split == "test":
        eval_images, eval_labels = read_batch(folder / TEST_FILE, classes)
    else:
        eval_images, eval_labels = images[held_out], labels[held_out]
    return Cifar10Data(
        train_images=torch.from_numpy(np.ascontiguousarray(images[train])),
        train_labels=torch.from_numpy(labels[train]),
        eval_images=torch.from_numpy(np.ascontiguousarray(eval_images)),
        eval_labels=torch.from_numpy(np.ascontiguousarray(eval_labels)),
        class_names=tuple(class_names),
        split=split,
    )


# -- training recipes --------------------------------------------------------------------
def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Recipe:
    """How a candidate loss is trained and scored. The defaults are the ``cpu`` preset; any
    field can be overridden by name with ``--fitness-opt FIELD=VALUE``."""

    arch: str = field(default="cnn", metadata=_help("network: resnet18, airbench or cnn (transfer checks)"))
    width: int | None = field(default=None, metadata=_help("base channel width (default: the network's own)"))
    epochs: int = field(default=3, metadata=_help("passes over the training images"))
    batch_size: int = field(default=64, metadata=_help("training batch size (the last partial batch is dropped)"))
    lr: float = field(default=0.05, metadata=_help("peak SGD learning rate for the mean of the per-example losses"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    nesterov: bool = field(default=True, metadata=_help("Nesterov momentum"))
    weight_decay: float = field(default=5e-4, metadata=_help("SGD weight decay"))
    norm_lr_scale: float = field(default=1.0, metadata=_help(
        "learning-rate factor of batch-norm parameters (their weight decay is divided by it)"))
    schedule: str = field(default="triangle", metadata=_help(
        "learning-rate schedule over the run: cosine (to zero), triangle (0.2 -> 1 at 23% -> 0.07) or constant"))
    flip: bool = field(default=True, metadata=_help("random horizontal flips"))
    translate: int = field(default=2, metadata=_help("random translations by up to this many pixels (0: none)"))
    pad_mode: str = field(default="reflect", metadata=_help("padding of translations: reflect or constant (zeros)"))
    train_size: int | None = field(default=5000, metadata=_help(
        "training images used (None: all not held out)"))
    val_size: int = field(default=2000, metadata=_help("training images held out for scoring (split=val)"))
    device: str = field(default="cpu", metadata=_help("auto (cuda if available), cpu, cuda or cuda:N"))
    amp: Any = field(default="auto", metadata=_help("bf16 autocast: auto (on CUDA only), true or false"))
    compile: Any = field(default=False, metadata=_help("torch.compile the network: auto (on CUDA only), true or false"))
    channels_last: Any = field(default="auto", metadata=_help(
        "channels_last memory format: auto (on CUDA only), true or false"))
    deterministic: bool = field(default=False, metadata=_help("deterministic cuDNN algorithms on a GPU (slower)"))
    check_every: int | None = field(default=None, metadata=_help(
        "training steps between checks for a non-finite loss (default: every step on a CPU, 25 on a GPU)"))
    eval_batch_size: int = field(default=1000, metadata=_help("batch size when scoring"))

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

        choice("arch", tuple(cifar10_nets.ARCH_WIDTHS))
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


def _lr_factor(schedule: str, step: int, total: int) -> float:
    progress = step / max(1, total)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "triangle":  # the speed runs' shape: warm up to the peak, then decay linearly
        start, peak, end, peak_at = 0.2, 1.0, 0.07, 0.23
        if progress < peak_at:
            return start + (peak - start) * progress / peak_at
        return peak + (end - peak) * (progress - peak_at) / (1 - peak_at)
    return 1.0


def _augment(images: torch.Tensor, generator: torch.Generator, recipe: Recipe) -> torch.Tensor:
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


# -- the plug-in -------------------------------------------------------------------------
class Cifar10(Fitness):
    """Held-out CIFAR-10 accuracy of a network trained with the candidate loss (module doc).

    Args:
        preset: ``cpu`` (default), ``fast`` or ``paper``.
        data_dir: The ``cifar-10-batches-py`` folder or its parent (default: ``EVOLOSS_DATA``).
        split: ``val`` (held out from the training batches; the search) or ``test`` (the test
            batch; final reports only).
        **overrides: Any :class:`Recipe` field, e.g. ``arch``, ``epochs``, ``train_size``.

    Raises:
        Cifar10DataMissing, Cifar10DataMalformed: The data folder is not usable (checked here,
            cheaply; the images are read at the first evaluation).
        ValueError, TypeError: A bad or unknown option.
    """

    name = "cifar10"
    interface = ClassificationInterface()
    baseline = "cross_entropy"
    fitness_floor = 0.0
    descriptor_space = (
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
        self._data: Cifar10Data | None = None
        self._device_data: dict[str, tuple[torch.Tensor, ...]] = {}
        self._compiled: dict[tuple, tuple[torch.nn.Module, Callable]] = {}

    def seeds(self) -> list[Seed]:
        return classification_seeds()

    def descriptors(self, fn: Callable) -> dict[str, float]:
        return classification_descriptors(fn, classes=self.interface.classes)

    # -- data and device ------------------------------------------------------------------
    def data(self) -> Cifar10Data:
        """The images, read on first use and kept (a worker scores many candidates)."""
        if self._data is None:
            r = self.recipe
            self._data = load_cifar10(self.folder, self.split, r.train_size, r.val_size)
            if len(self._data.train_labels) < r.batch_size:
                raise ValueError(f"cifar10: {len(self._data.train_labels)} training images, fewer than "
                                 f"batch_size {r.batch_size}")
        return self._data

    def device(self) -> torch.device:
        wanted = self.recipe.device
        if wanted == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"cifar10: device {wanted!r} asked for, but torch sees no CUDA device "
                               "(use device=auto or device=cpu)")
        return torch.device(wanted)

    def _on_device(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Normalised float images and labels, resident on ``device`` (moved once per worker)."""
        key = str(device)
        if key not in self._device_data:
            data = self.data()
            mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
            std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

            def prepare(images: torch.Tensor) -> torch.Tensor:
                return (images.to(device).float() / 255 - mean) / std

            self._device_data[key] = (prepare(data.train_images), data.train_labels.to(device),
                                      prepare(data.eval_images), data.eval_labels.to(device))
        return self._device_data[key]

    def _network(self, device: torch.device, compile_: bool, channels_last: bool, seed: int):
        """The network, initialised from ``seed``, and the callable to run it (compiled or not).
        A compiled network is built once and re-initialised in place for each candidate."""
        r = self.recipe
        key = (r.arch, r.width, len(self.class_names), str(device), channels_last)
        if compile_ and key in self._compiled:
            model, forward = self._compiled[key]
        else:
            model = cifar10_nets.build(r.arch, r.width, classes=len(self.class_names)).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            forward = torch.compile(model) if compile_ else model
            if compile_:
                self._compiled[key] = (model, forward)
        cifar10_nets.initialise(model, seed)
        return model, forward

    # -- scoring ----------------------------------------------------------------------------
    def evaluate(self, fn: Callable, seed: int) -> Score:
        r = self.recipe
        device = self.device()
        cuda = device.type == "cuda"
        amp = cuda if r.amp == "auto" else bool(r.amp)
        compile_ = cuda if r.compile == "auto" else bool(r.compile)
        channels_last = cuda if r.channels_last == "auto" else bool(r.channels_last)
        check_every = r.check_every or (25 if cuda else 1)
        if cuda:
            torch.backends.cudnn.benchmark = not r.deterministic
            torch.backends.cudnn.deterministic = r.deterministic
        train_x, train_y, eval_x, eval_y = self._on_device(device)
        start = time.perf_counter()

        generator = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        model, forward = self._network(device, compile_, channels_last, seed)
        if isinstance(model, cifar10_nets.AirbenchNet):
            model.initialise_whitening(train_x[:5000])
        norm_params, other_params = cifar10_nets.norm_parameters(model)
        groups = [{"params": other_params, "lr": r.lr, "weight_decay": r.weight_decay, "base_lr": r.lr}]
        if norm_params:
            scaled = r.lr * r.norm_lr_scale
            groups.append({"params": norm_params, "lr": scaled, "weight_decay": r.weight_decay / r.norm_lr_scale,
                           "base_lr": scaled})
        optimizer = torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov and r.momentum > 0)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        memory_format = torch.channels_last if channels_last else torch.contiguous_format

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
                factor = _lr_factor(r.schedule, step, total)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                rows = order[index * batch:(index + 1) * batch]
                images = _augment(train_x[rows], generator, r).contiguous(memory_format=memory_format)
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

        accuracy, eval_ce = self._score(model, forward, eval_x, eval_y, autocast, memory_format)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        curve = step_losses.view(r.epochs, steps_per_epoch).mean(dim=1).tolist()
        images_seen = total * batch
        metrics = {
            "accuracy": accuracy,
            "eval_cross_entropy": eval_ce,
            "train_accuracy": float(correct_last_epoch) / (steps_per_epoch * batch),
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
