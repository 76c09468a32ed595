"""Scoring one genome, in the two phases of the fitness contract (:mod:`fitness.base`).

Untrusted phase (:func:`untrusted_phase`), in a process forked for this one genome
(:mod:`engine.worker`): build the function, run the interface's contract checks, fingerprint
it, compute its descriptors, ask the driver whether its behaviour is new, then train
(``Fitness.train``) and send the artefacts back as safetensors bytes. Trusted phase
(:func:`trusted_score`), in the warm worker after that process has exited: validate the
artefacts and score them (``Fitness.score``). Judge phase (:func:`judged`), in the driver, for
a plug-in whose score asks for one (``Score.to_judge``): ``Fitness.judge`` outside every jail.

:func:`run_candidate` runs both phases in the calling process (the serial executor, tests):
no isolation at all, for debugging plug-ins.

Messages from the genome's process are JSON (and raw safetensors bytes), never pickle: that
process may have run anything.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Any
from collections.abc import Callable

from engine.candidate import EvalResult
from engine.genome import GenomeError, compile_genome
from engine.genome import short_error as genome_short_error
from engine.helpers import visible
from engine.processes import classify

#: Called with (candidate_id, fingerprint); returns the id of an earlier candidate with the
#: same behaviour (skip training) or None (go on).
Decide = Callable[[int, str], "int | None"]

#: Longest error text stored (and shown to LLM operators): one line.
MAX_ERROR_CHARS = 300
#: Statuses a genome's process may report for itself (never ``ok``: only the trusted phase scores).
CHILD_STATUSES = ("invalid", "error", "oom")
#: Largest JSON message accepted from a genome's process.
MAX_MESSAGE_BYTES = 256 << 10
#: Largest ``Score.to_judge`` (as JSON) a trusted phase may hand to the driver's judge phase.
MAX_JUDGE_BYTES = 16 << 20

_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)*[\w.+-]+")


def bounded_error(text: Any, limit: int = MAX_ERROR_CHARS) -> str:
    """What may be stored and shown in prompts of an error text a genome may have written: its
    first line, without control characters or absolute file paths, at most ``limit``
    characters. (A genome that raises ``ValueError(open(...).read())`` gets one short line of
    it through, never the file.)"""
    lines = str(text).strip().splitlines()
    first = lines[0] if lines else ""
    first = _ABSOLUTE_PATH.sub("<path>", visible(first, ""))
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return first + (" (more lines cut)" if len(lines) > 1 and len(first) + 16 <= limit else "")


def short_error(exc: BaseException) -> tuple[str, str]:
    """The status and the bounded message of an exception from a genome or a plug-in: the
    exception type, a short first line and the genome's own line in the traceback
    (:func:`engine.genome.short_error`), without absolute file paths."""
    status, _ = classify(exc)
    return status, bounded_error(genome_short_error(exc))


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)``; on a machine without an accelerator only the CPU generator,
    which is all it seeds there (it also queues a lazy CUDA seeding that captures the stack,
    a third of a millisecond per evaluation)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and not accelerator.is_available():
        torch.random.default_generator.manual_seed(int(seed))
    else:
        torch.manual_seed(seed)


# -- building a genome ---------------------------------------------------------------------------
def build_function(code: str, interface, jail_only: bool = False) -> Callable:
    """The genome's function. Normally through :func:`engine.genome.compile_genome` (static
    check, restricted namespaces). ``jail_only`` (testing the other layers alone) runs the
    source as plain Python with full builtins and imports (any module-level code, helper
    functions) and takes the last top-level function whose number of positional parameters the
    interface accepts; its inputs are still detached copies (:func:`engine.genome.isolate_inputs`)."""
    if not jail_only:
        return compile_genome(code, interface.arg_counts)
    import ast

    import torch
    import torch.nn.functional as F

    from engine import genome

    try:
        module = ast.parse(code)
    except (SyntaxError, ValueError) as exc:
        raise GenomeError(f"syntax error on line {getattr(exc, 'lineno', '?')}: {getattr(exc, 'msg', exc)}") from exc
    functions = [node for node in module.body if isinstance(node, ast.FunctionDef)]
    accepted = [node for node in functions if interface.arg_counts is None
                or len(node.args.posonlyargs) + len(node.args.args) in interface.arg_counts]
    if not (accepted or functions):
        raise GenomeError("a genome must define a function")
    name = (accepted or functions)[-1].name
    namespace: dict[str, Any] = {"torch": torch, "F": F, "math": math, "__name__": "genome"}
    try:
        exec(compile(module, "<genome>", "exec"), namespace)  # noqa: S102 - jail-only testing mode, by request
    except Exception as exc:  # noqa: BLE001 - module-level code of a plain-Python genome may raise anything
        raise GenomeError(f"cannot build function: {genome_short_error(exc)}") from exc
    raw = namespace.get(name)
    if not callable(raw):
        raise GenomeError(f"cannot build function: {name!r} is not defined after running the module")
    fn = genome.isolate_inputs(raw) if hasattr(genome, "isolate_inputs") else raw
    fn.__evoloss_source__ = code
    return fn


def check_behaviour(fitness, fn: Callable) -> tuple[str, dict[str, float]]:
    """The contract checks, the behavioural fingerprint and the descriptors of ``fn`` (all run
    genome code on small inputs: the short ``--check-timeout`` deadline covers them)."""
    interface = fitness.interface
    interface.check(fn)
    try:
        fingerprint = interface.fingerprint(fn)
    except Exception as exc:
        raise GenomeError(f"fingerprint failed: {type(exc).__name__}: {exc}") from exc
    try:
        descriptors = {str(k): float(v) for k, v in fitness.descriptors(fn).items()}
    except Exception as exc:
        raise GenomeError(f"descriptors failed: {type(exc).__name__}: {exc}", status="error") from exc
    return fingerprint, descriptors


def checked_score(fitness, score: Any, method: str) -> tuple[float, dict[str, Any]]:
    """The fitness and JSON metrics of what a plug-in's ``score`` (or ``evaluate``) returned."""
    value = getattr(score, "fitness", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GenomeError(
            f"fitness plug-in {fitness.name!r} returned {type(score).__name__} from {method}(); "
            "expected fitness.Score with a float 'fitness'", status="error",
        )
    if not math.isfinite(value):
        raise GenomeError(f"fitness is not finite ({value})", status="error")
    return float(value), jsonable(dict(getattr(score, "metrics", {}) or {}))


def trusted_score(fitness, artefacts: dict, seed: int) -> tuple[float, dict[str, Any], Any]:
    """The trusted phase on artefacts already validated: ``fitness.score``. Returns the fitness,
    the metrics and what the driver's judge phase is to grade (``Score.to_judge``, or None)."""
    score = fitness.score(artefacts, seed)
    value, metrics = checked_score(fitness, score, "score")
    return value, metrics, judge_payload(fitness, score)


def judge_payload(fitness, score: Any) -> Any:
    """``score.to_judge`` as plain JSON (None when the plug-in has no judge phase).

    Raises:
        GenomeError: (status ``error``) when it is not JSON or larger than ``MAX_JUDGE_BYTES``.
    """
    payload = getattr(score, "to_judge", None)
    if payload is None:
        return None
    try:
        text = json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GenomeError(f"fitness plug-in {fitness.name!r}: Score.to_judge is not plain JSON ({exc})",
                          status="error") from exc
    if len(text) > MAX_JUDGE_BYTES:
        raise GenomeError(f"fitness plug-in {fitness.name!r}: Score.to_judge is {len(text)} bytes of JSON, more than "
                          f"{MAX_JUDGE_BYTES}", status="error")
    return json.loads(text)


def judge_request(seed: int, stage: int, payload: Any) -> dict[str, Any] | None:
    """What an :class:`EvalResult` carries to the driver's judge phase (``EvalResult.judge``)."""
    return None if payload is None else {"seed": int(seed), "stage": int(stage), "payload": payload}


def judged(fitness, result: EvalResult) -> EvalResult:
    """The judge phase (``Fitness.judge``) of a result that asks for one, in this process (the
    driver, outside every jail); other results are returned as they are. Never raises for what
    the plug-in does: a failing judge makes the result an ``error`` that says so."""
    request = result.judge
    if request is None or not result.ok:
        return result
    from fitness.base import Score

    start = time.perf_counter()
    try:
        score = fitness.judge(Score(float(result.fitness), dict(result.metrics), request["payload"]),
                              int(request["seed"]))
        value, metrics = checked_score(fitness, score, "judge")
    except Exception as exc:  # noqa: BLE001 - a plug-in's judge (or its service) may fail any way
        status, message = short_error(exc)
        return EvalResult(result.candidate_id, "oom" if status == "oom" else "error",
                          error=f"the judge phase failed: {message}", fingerprint=result.fingerprint,
                          descriptors=result.descriptors, seconds=result.seconds + time.perf_counter() - start)
    seconds = time.perf_counter() - start
    metrics["judge_seconds"] = round(seconds, 3)
    return dataclasses.replace(result, fitness=value, metrics=metrics, judge=None, seconds=result.seconds + seconds)


# -- both phases in one process (serial executor) --------------------------------------------------
def run_candidate(fitness, candidate_id: int, code: str, seed: int, decide: Decide | None = None,
                  jail_only: bool = False, checked: bool = False) -> EvalResult:
    """Score ``code`` with ``fitness`` in this process; never raises for anything the genome or
    plug-in does (``checked``: a re-measurement, without the contract checks, fingerprint and
    descriptors its first evaluation had). No isolation: use the process executor for untrusted
    genomes."""
    from fitness.base import is_protected, validate_artefacts

    start = time.perf_counter()
    fingerprint = None
    descriptors: dict[str, float] = {}
    try:
        import torch

        # Genomes may draw random numbers; seed them so an evaluation is reproducible.
        seed_torch(seed)
        if torch.cuda.is_initialized():  # this process scores many genomes: the peak is per evaluation
            torch.cuda.reset_peak_memory_stats()
        fn = build_function(code, fitness.interface, jail_only)
        if not checked:
            fingerprint, descriptors = check_behaviour(fitness, fn)
        if decide is not None and fingerprint is not None:
            duplicate_of = decide(candidate_id, fingerprint)
            if duplicate_of is not None:
                return duplicate_result(candidate_id, duplicate_of, fingerprint, descriptors, start)
        if is_protected(fitness):
            artefacts = validate_artefacts(fitness.train(fn, seed), fitness.artefact_spec(seed),
                                           fitness.max_artefact_bytes)
            value, metrics, payload = trusted_score(fitness, artefacts, seed)
        else:
            value, metrics = checked_score(fitness, fitness.evaluate(fn, seed), "evaluate")
            metrics["unprotected"] = True
            payload = None
        if torch.cuda.is_initialized():
            # Plug-ins that train in other processes (the accelerate launcher) report their own.
            metrics.setdefault("gpu_peak_memory_bytes", torch.cuda.max_memory_allocated())
        result = EvalResult(candidate_id, "ok", fitness=value, metrics=metrics, descriptors=descriptors,
                            fingerprint=fingerprint, seconds=time.perf_counter() - start,
                            judge=judge_request(seed, 0, payload))
        return judged(fitness, result)
    except BaseException as exc:  # noqa: BLE001 - a genome may raise anything
        if isinstance(exc, KeyboardInterrupt):
            raise
        status, message = short_error(exc)
        return EvalResult(candidate_id, status, error=message, fingerprint=fingerprint, descriptors=descriptors,
                          seconds=time.perf_counter() - start)


def duplicate_result(candidate_id: int, duplicate_of: int, fingerprint: str | None,
                     descriptors: dict[str, float], start: float) -> EvalResult:
    return EvalResult(candidate_id, "duplicate", fingerprint=fingerprint, descriptors=descriptors,
                      error=f"same behaviour as candidate {duplicate_of}", duplicate_of=duplicate_of,
                      seconds=time.perf_counter() - start)


# -- the untrusted phase, in the genome's own process ----------------------------------------------
class Channel:
    """The genome's process's end of its one pipe to the warm worker: JSON messages and raw
    byte frames (``multiprocessing.connection.Connection`` without its pickle methods)."""

    def __init__(self, connection) -> None:
        self.connection = connection

    def send_json(self, message: dict[str, Any]) -> None:
        self.connection.send_bytes(json.dumps(message).encode())

    def send_bytes(self, data: bytes) -> None:
        self.connection.send_bytes(data)

    def receive_json(self) -> dict[str, Any]:
        return json.loads(self.connection.recv_bytes(MAX_MESSAGE_BYTES))


def untrusted_phase(fitness, stages, code: str, seed: int, channel: Channel, jail_only: bool = False,
                    checked: bool = False) -> None:
    """Everything that runs genome code, in the genome's own process: sends ``checked``
    (fingerprint, descriptors), waits for ``go`` (the driver's dedup answer), then sends
    ``artefacts`` and their safetensors bytes (or, for a plug-in of the first contract,
    ``unprotected`` with its self-computed score), or ``failed`` with a bounded error."""
    import torch

    from fitness.base import artefacts_to_bytes, is_protected, validate_artefacts

    # The held-out data of every stage is zeroed here before any genome code runs (but that of a
    # plug-in of the first contract scoring here: its evaluate() may need it, and is unprotected anyway).
    for stage in stages:
        store = stage.__dict__.get("_held_out_store")
        if store is not None and (stage is not fitness or is_protected(fitness)):
            store.wipe()
    phase = "checks"
    try:
        seed_torch(seed)
        fn = build_function(code, fitness.interface, jail_only)
        fingerprint, descriptors = (None, {}) if checked else check_behaviour(fitness, fn)
        channel.send_json({"type": "checked", "fingerprint": fingerprint, "descriptors": descriptors})
        if channel.receive_json().get("type") != "go":
            return
        phase = "training"
        if is_protected(fitness):
            artefacts = validate_artefacts(fitness.train(fn, seed), fitness.artefact_spec(seed),
                                           fitness.max_artefact_bytes)
            data = artefacts_to_bytes(artefacts)
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
            channel.send_json({"type": "artefacts", "size": len(data), "gpu_peak_memory_bytes": peak})
            channel.send_bytes(data)
        else:
            value, metrics = checked_score(fitness, fitness.evaluate(fn, seed), "evaluate")
            channel.send_json({"type": "unprotected", "fitness": value, "metrics": metrics})
    except BaseException as exc:  # noqa: BLE001 - a genome may raise anything
        status, message = short_error(exc)
        channel.send_json({"type": "failed", "status": status, "error": message, "phase": phase})


def jsonable(value):
    """Metrics as plain JSON types (tensors and numpy scalars become floats/lists)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return jsonable(value.detach().cpu().tolist())
    except ImportError:  # pragma: no cover
        pass
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


_jsonable = jsonable  # the name older callers import
