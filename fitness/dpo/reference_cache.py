"""On-disk cache of reference log-probabilities, shared by every candidate of a run and by runs.

The reference model is the policy before training, so its sequence log-probabilities on the
training and held-out pairs are the same for every candidate loss. They are computed once and
stored under a key that hashes everything they depend on:

* the model's weights (TRL's ``hash_module`` of the reference, which DPOTrainer computes
  anyway when ``precompute_ref_log_probs`` is on),
* the tokenised pairs (prompt, chosen and rejected token ids after truncation), so the data
  set, its sub-sampling, the tokenizer, the chat template and the length limits are covered,
* how the log-probabilities are computed (precision, truncation settings, TRL and
  transformers versions).

Any change gives a new key (a miss); entries are never overwritten in place, so a cache
shared by concurrent workers stays consistent (each entry is written to a temporary file and
renamed).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Sequence

import torch


def key_of(model_hash: str, token_rows: Iterable[Sequence[Sequence[int]]], settings: dict[str, Any]) -> str:
    """The cache key of reference log-probabilities (module doc)."""
    digest = hashlib.sha256()
    digest.update(b"evoloss-dpo-reference-v1\0")
    digest.update(model_hash.encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for row in token_rows:
        for ids in row:
            digest.update(b"|")
            digest.update(",".join(map(str, ids)).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class ReferenceCache:
    """Reference log-probabilities stored as small ``.pt`` files under ``folder``.

    Attributes:
        hits: Entries found (a candidate that trained without any reference forward).
        misses: Entries computed and stored.
    """

    folder: Path
    hits: int = 0
    misses: int = 0
    events: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)

    def path(self, key: str) -> Path:
        return self.folder / "reference" / f"{key}.pt"

    def load(self, key: str, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored ``(chosen, rejected)`` log-probabilities, or None (a damaged or mismatched
        entry counts as missing and is recomputed)."""
        path = self.path(key)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            chosen, rejected = entry["chosen"], entry["rejected"]
        except (FileNotFoundError, KeyError, TypeError, RuntimeError, EOFError, OSError):
            return None
        except Exception:  # noqa: BLE001 - a truncated pickle raises UnpicklingError and friends
            return None
        if chosen.shape != (count,) or rejected.shape != (count,):
            return None
        self.hits += 1
        self.events.append("hit")
        return chosen, rejected

    def store(self, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.misses += 1
        self.events.append("miss")
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
            with os.fdopen(handle, "wb") as stream:
                torch.save({"chosen": chosen.detach().cpu(), "rejected": rejected.detach().cpu()}, stream)
            os.replace(temporary, path)
        except OSError as exc:
            # A read-only or full cache folder costs speed, not correctness.
            warnings.warn(f"cannot write the reference log-probability cache {path}: {exc}", stacklevel=2)


@dataclass
class MemoryReferenceCache:
    """Reference log-probabilities kept in memory only, with :class:`ReferenceCache`'s interface.

    The trusted scoring phase keeps the held-out pairs' reference here, inside the plug-in's
    ``held_out`` store: the on-disk cache lies in a folder the genome's process may write, so
    a genome could plant a forged held-out reference there; this one is zeroed and dropped in
    the genome's process before any genome code runs."""

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    events: list[str] = field(default_factory=list)

    def load(self, key: str, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.entries.get(key)
        if entry is None or entry[0].shape != (count,) or entry[1].shape != (count,):
            return None
        self.hits += 1
        self.events.append("hit")
        return entry[0].clone(), entry[1].clone()

    def store(self, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.misses += 1
        self.events.append("miss")
        self.entries[key] = (chosen.detach().cpu().clone(), rejected.detach().cpu().clone())
