"""What is kept of a run and how it is read back: the run log (``store``), the MAP-Elites
grid (``grid``), the elite archive (``elites``), the replay summary (``replay``) and the
pandas API for notebooks (``load_run``, :mod:`archives.analysis`)."""
from __future__ import annotations

from typing import Any

__all__ = ["Run", "load_run"]


def __getattr__(name: str) -> Any:
    # pandas is imported only when the analysis API is used, not by the engine or replay.
    if name in __all__:
        from archives import analysis

        return getattr(analysis, name)
    raise AttributeError(f"module 'archives' has no attribute {name!r}")
