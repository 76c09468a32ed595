"""Small helpers that more than one package uses, each defined here once.

A leaf of the import layers (tests/test_layers.py): it imports only :mod:`engine.genome`, itself a
leaf, so the plug-ins, the operators, the archive and the engine may all use it.
"""
from __future__ import annotations

import keyword
import math
import re
from typing import Any
from collections.abc import Mapping

from engine.genome import FORBIDDEN_NAMES, SAFE_BUILTINS


def field_help(text: str, **extra: Any) -> dict[str, Any]:
    """A settings dataclass field's metadata: its help text (shown by ``--help`` and in docs)
    and any other keys the reader of the fields uses (``group``, ``negative``...)."""
    return {"help": text, **extra}


def round_significant(value: float, digits: int, zero_below: float = 0.0) -> float:
    """``value`` kept to ``digits`` significant digits.

    Magnitudes below ``zero_below`` become ``0.0`` (float noise around zero); zero and
    non-finite values come back unchanged.
    """
    if not math.isfinite(value):
        return float(value)
    if abs(value) < zero_below:
        return 0.0
    if value == 0:
        return float(value)
    return float(f"{value:.{digits}g}")


def identifier(text: str, limit: int = 48, fallback: str = "loss") -> str:
    """``text`` made into a short Python identifier that a genome's function may be called.

    Runs of other characters become one underscore, the result is cut to ``limit`` characters,
    one that starts with a digit gets ``l_`` in front, and a keyword, a builtin a genome sees or
    a forbidden or module name gets ``_loss`` behind. Empty text gives ``fallback``.
    """
    text = re.sub(r"\W+", "_", str(text)).strip("_")
    text = re.sub(r"_{2,}", "_", text)[:limit].rstrip("_") or fallback
    if text[0].isdigit():
        text = ("l_" + text)[:limit].rstrip("_")
    if keyword.iskeyword(text) or text in SAFE_BUILTINS or text in FORBIDDEN_NAMES or text in ("torch", "F", "math"):
        text = text + "_loss"
    return text


def fitness_label(name: str, options: dict[str, Any], seed: int | None = None) -> str:
    """What scores on a plug-in other than the run's are stored under: ``synthetic-pref``,
    ``synthetic-pref[beta=0.1]``, ``dpo[preset=imdb-gpt2,seed=3]``."""
    parts = [f"{key}={value}" for key, value in sorted(options.items())]
    if seed is not None:
        parts.append(f"seed={seed}")
    return f"{name}[{','.join(parts)}]" if parts else name


def finite(value: Any) -> Any:
    """``value`` (dicts and lists of JSON values) with non-finite floats as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


#: What a terminal acts on, or a reader takes for a line break: C0 controls but tab and newline,
#: DEL, the C1 controls, and Unicode's line and paragraph separators.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def visible(text: Any, replacement: str = "?") -> str:
    """Untrusted text (a genome's error or code, an LLM's thought or reply) as it may be shown in a
    terminal or stored for one: every control character replaced."""
    return CONTROL_CHARACTERS.sub(replacement, str(text))


#: A generation's own first-evaluation seed is ``eval_seed + GENERATION_SEEDS + GENERATION_STRIDE *
#: generation``: apart from racing's re-measurement seeds (``eval_seed + 7919 k``), the confirmation's
#: (``+ 500_009 + k``) and the validation's (``+ 1_000_003 + k``).
GENERATION_SEEDS = 250_013
GENERATION_STRIDE = 7919


def per_generation_seeds(config: Mapping[str, Any]) -> bool:
    """Whether a run (its settings, as stored) scores each generation first on a seed of its own:
    ``first_seeds`` generation in a raced population run. Runs stored before the setting existed
    scored every candidate on the run's seed."""
    return (config.get("first_seeds", "run") == "generation" and int(config.get("race_seeds", 0) or 0) > 0
            and not config.get("asynchronous") and config.get("strategy", "population") == "population")


def first_seed(config: Mapping[str, Any], generation: int) -> int:
    """The evaluation seed on which a run first scored its candidates of ``generation``: the run's
    ``eval_seed`` (generation 0, and every generation where :func:`per_generation_seeds` is false),
    else the generation's own seed."""
    eval_seed = int(config.get("eval_seed", 0) or 0)
    if generation > 0 and per_generation_seeds(config):
        return eval_seed + GENERATION_SEEDS + GENERATION_STRIDE * int(generation)
    return eval_seed
