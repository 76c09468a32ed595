"""Preference data for the ``dpo`` plug-in: a Hugging Face dataset, a local JSON, JSONL or
Parquet file, or the generated ``tiny-parity`` pairs.

Accepted layouts (TRL's preference formats, plus one common variant):

* ``prompt``, ``chosen``, ``rejected``: strings, or lists of chat messages
  (``{"role": ..., "content": ...}``);
* ``chosen``, ``rejected`` only, as whole conversations that share the prompt (the implicit
  prompt of ``argilla/dpo-mix-7k``): the prompt is their common leading messages;
* ``prompt``, ``responses`` (two), ``chosen`` (the index of the preferred one), as in
  ``ZHZisZZ/imdb_preference``.

Every row ends as ``{"prompt", "chosen", "rejected"}``; anything else is a
:class:`DataError` naming the file or dataset, the row and the column.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
COLUMNS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """Preference data that cannot be used: unreadable, or missing or malformed columns."""


@dataclass
class PreferenceData:
    """Training and held-out pairs, each a list of ``{"prompt", "chosen", "rejected"}`` rows."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    source: str
    conversational: bool


def is_local(dataset: str) -> bool:
    return dataset.endswith(LOCAL_SUFFIXES) or Path(dataset).expanduser().exists()


def check_local(dataset: str) -> None:
    """Cheap start-up check of a local data file: exists, readable, a known format."""
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DataError(f"dpo option dataset: file {str(path)!r} not found")
    if path.is_dir() or path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"dpo option dataset: {str(path)!r} is not a .json, .jsonl or .parquet file")


def read_local(dataset: str) -> list[dict[str, Any]]:
    """Rows of a local JSON (a list of objects, or JSON lines), JSONL or Parquet file."""
    check_local(dataset)
    path = Path(dataset).expanduser()
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
    except Exception as exc:  # pyarrow raises its own types for damaged files
        raise DataError(f"dpo option dataset: cannot read {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"dpo option dataset: {str(path)!r} is not valid JSON: {exc}") from exc
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"dpo option dataset: {str(path)!r} line {number} is not valid JSON: {exc}") from exc
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"dpo option dataset: {str(path)!r} must hold JSON objects (one per pair)")
    return rows


def _read_hub(name: str, config: str | None, split: str) -> list[dict[str, Any]] | None:
    """Rows of a split of a Hugging Face dataset, or None when the dataset has no such split."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError("the dpo plug-in needs the 'datasets' package: pip install -e '.[dpo]'") from exc
    try:
        builder = datasets.load_dataset_builder(name, config)
        splits = set((builder.info.splits or {}).keys())
        if splits and split not in splits:
            return None
        return datasets.load_dataset(name, config, split=split).to_list()
    except Exception as exc:
        raise DataError(
            f"dpo option dataset: cannot load Hugging Face dataset {name!r} (split {split!r}): "
            f"{type(exc).__name__}: {exc}. Check the name, or download it first (HF_HUB_OFFLINE=1 "
            "allows only cached datasets)") from exc


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _common_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def normalise(rows: list[dict[str, Any]], source: str) -> tuple[list[dict[str, Any]], bool]:
    """Rows as ``{"prompt", "chosen", "rejected"}`` and whether they are conversational.

    Raises:
        DataError: naming the missing columns, or the first bad row and column.
    """
    if not rows:
        raise DataError(f"{source}: no preference pairs")
    columns = set(rows[0])
    if {"prompt", "responses", "chosen"} <= columns and "rejected" not in columns:
        layout = "indexed"
    elif {"chosen", "rejected"} <= columns and "prompt" not in columns:
        layout = "implicit"
    else:
        layout = "explicit"
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            raise DataError(
                f"{source}: missing column(s) {missing}; found {sorted(columns)}. Expected prompt, chosen and "
                "rejected (strings or chat-message lists), chosen and rejected conversations sharing the "
                "prompt, or prompt, responses and a chosen index")
    out, kinds = [], set()
    for number, row in enumerate(rows):
        where = f"{source}: row {number}"
        if layout == "indexed":
            responses, index = row.get("responses"), row.get("chosen")
            if not (isinstance(responses, list) and len(responses) == 2 and index in (0, 1)):
                raise DataError(f"{where}: 'responses' must hold two responses and 'chosen' be 0 or 1")
            pair = {"prompt": row.get("prompt"), "chosen": responses[index], "rejected": responses[1 - index]}
        elif layout == "implicit":
            chosen, rejected = row.get("chosen"), row.get("rejected")
            for name, value in (("chosen", chosen), ("rejected", rejected)):
                if not _is_messages(value) or len(value) < 2:
                    raise DataError(f"{where}: column {name!r} must be a conversation (prompt messages then the "
                                    "answer) when there is no 'prompt' column")
            cut = _common_prefix(chosen, rejected)
            if cut == 0:
                raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt messages")
            pair = {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
        else:
            pair = {c: row.get(c) for c in COLUMNS}
        for column in COLUMNS:
            value = pair[column]
            if isinstance(value, str):
                kinds.add("text")
                if column != "prompt" and not value:
                    raise DataError(f"{where}: column {column!r} is empty")
            elif _is_messages(value):
                kinds.add("messages")
            else:
                raise DataError(f"{where}: column {column!r} must be a string or a list of chat messages "
                                f"({{'role': ..., 'content': ...}}), got {type(value).__name__}")
        out.append(pair)
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes plain strings and chat-message lists; use one format for all columns")
    return out, kinds == {"messages"}


def _sample(rows: list, size: int, rng: random.Random) -> list:
    rows = list(rows)
    rng.shuffle(rows)
    return rows[:size] if size else rows


def load_preference_data(settings) -> PreferenceData:
    """The training and held-out pairs named by ``settings`` (sub-sampled with ``data_seed``)."""
    from fitness.dpo.tiny import parity_pairs

    rng = random.Random(settings.data_seed)
    name = settings.dataset
    heldout_rows = None
    if name == "tiny-parity":
        count = settings.train_size or 256
        rows = parity_pairs(count + settings.heldout_size, settings.data_seed)
        source = "tiny-parity"
        train_rows, heldout_rows = rows[:count], rows[count:]
    elif is_local(name):
        source = f"dataset file {name!r}"
        train_rows = read_local(name)
    else:
        source = f"dataset {name!r}"
        train_rows = _read_hub(name, settings.dataset_config, settings.train_split)
        if train_rows is None:
            raise DataError(f"{source} has no split {settings.train_split!r} (option train_split)")
        if settings.heldout_split:
            heldout_rows = _read_hub(name, settings.dataset_config, settings.heldout_split)
    train, conversational = normalise(train_rows, source)
    if heldout_rows is None:
        # No held-out split: keep the last heldout_size pairs of a fixed shuffle out of training.
        train = _sample(train, 0, rng)
        if len(train) <= settings.heldout_size:
            raise DataError(f"{source}: {len(train)} pairs cannot give {settings.heldout_size} held-out pairs and "
                            "still leave training data; lower heldout_size")
        train, heldout = train[:-settings.heldout_size], train[-settings.heldout_size:]
    else:
        heldout, held_conversational = normalise(heldout_rows, f"{source} split {settings.heldout_split!r}")
        if held_conversational != conversational:
            raise DataError(f"{source}: the training and held-out splits use different formats")
        heldout = _sample(heldout, settings.heldout_size, rng)
    if name != "tiny-parity":
        train = _sample(train, settings.train_size, rng)
    return PreferenceData(train=train, heldout=heldout, source=source, conversational=conversational)
