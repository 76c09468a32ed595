"""Scoring one genome: build it, run the interface's contract checks, fingerprint it, ask the
driver whether its behaviour is new, then train and score it. Shared by the in-process
(serial) executor and the worker processes, so both record failures the same way."""
from __future__ import annotations

import math
import time
from typing import Callable

from engine.candidate import EvalResult
from engine.genome import GenomeError, compile_genome
from engine.processes import classify

#: Called with (candidate_id, fingerprint); returns the id of an earlier candidate with the
#: same behaviour (skip training) or None (go on).
Decide = Callable[[int, str], "int | None"]


def run_candidate(fitness, candidate_id: int, code: str, seed: int, decide: Decide | None = None) -> EvalResult:
    """Score ``code`` with ``fitness``; never raises for anything the genome or plug-in does."""
    start = time.perf_counter()
    fingerprint = None
    descriptors: dict[str, float] = {}
    try:
        import torch

        # Genomes may draw random numbers; seed them so an evaluation is reproducible.
        torch.manual_seed(seed)
        if torch.cuda.is_initialized():  # a worker scores many genomes: the peak is per evaluation
            torch.cuda.reset_peak_memory_stats()
        interface = fitness.interface
        fn = compile_genome(code, interface.arg_counts)
        interface.check(fn)
        try:
            fingerprint = interface.fingerprint(fn)
        except Exception as exc:
            raise GenomeError(f"fingerprint failed: {type(exc).__name__}: {exc}") from exc
        try:
            descriptors = {k: float(v) for k, v in fitness.descriptors(fn).items()}
        except Exception as exc:
            raise GenomeError(f"descriptors failed: {type(exc).__name__}: {exc}", status="error") from exc
        if decide is not None:
            duplicate_of = decide(candidate_id, fingerprint)
            if duplicate_of is not None:
                return EvalResult(
                    candidate_id, "duplicate", fingerprint=fingerprint, descriptors=descriptors,
                    error=f"same behaviour as candidate {duplicate_of}", duplicate_of=duplicate_of,
                    seconds=time.perf_counter() - start,
                )
        score = fitness.evaluate(fn, seed)
        value = getattr(score, "fitness", None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GenomeError(
                f"fitness plug-in {fitness.name!r} returned {type(score).__name__} from evaluate(); "
                "expected fitness.Score with a float 'fitness'", status="error",
            )
        if not math.isfinite(value):
            raise GenomeError(f"fitness is not finite ({value})", status="error")
        metrics = dict(getattr(score, "metrics", {}) or {})
        if torch.cuda.is_initialized():
            # Plug-ins that train in other processes (the accelerate launcher) report their own.
            metrics.setdefault("gpu_peak_memory_bytes", torch.cuda.max_memory_allocated())
        return EvalResult(
            candidate_id, "ok", fitness=float(value), metrics=_jsonable(metrics), descriptors=descriptors,
            fingerprint=fingerprint, seconds=time.perf_counter() - start,
        )
    except BaseException as exc:  # noqa: BLE001 - a genome may raise anything
        if isinstance(exc, KeyboardInterrupt):
            raise
        status, message = classify(exc)
        return EvalResult(
            candidate_id, status, error=message, fingerprint=fingerprint, descriptors=descriptors,
            seconds=time.perf_counter() - start,
        )


def _jsonable(value):
    """Metrics as plain JSON types (tensors and numpy scalars become floats/lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return _jsonable(value.detach().cpu().tolist())
    except ImportError:  # pragma: no cover
        pass
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
