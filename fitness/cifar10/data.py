"""Reading the CIFAR-10 python batches and cutting the splits an evaluation uses.

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
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


# -- reading the batches ------------------------------------------------------------------
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
