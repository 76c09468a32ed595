"""The ``accelerate`` launcher of the dpo plug-in: one evaluation trains in ``num_processes``
ranks started by ``accelerate launch``, as the DiscoPOP paper's 7B recipe needs (8 GPUs with
DeepSpeed ZeRO-3: the alignment handbook's ``recipes/accelerate_configs/deepspeed_zero3.yaml``).

The evaluation worker writes a folder holding

* ``loss.py``: the candidate's source (the ranks compile it again, with the same checks);
* ``request.json``: the preset, every setting, the seed and what to save;
* ``accelerate.yaml`` (and ``deepspeed.json`` for ``zero3``): generated from the settings by
  :func:`accelerate_config` and :func:`deepspeed_config`, or the user's ``accelerate_config``;

runs ``python -m accelerate.commands.launch --config_file accelerate.yaml -m fitness.dpo.rank
--request request.json`` (:mod:`fitness.dpo.rank` is the per-rank entry point) and reads what
rank 0 wrote: ``result.json`` (training metrics and where the trained policy was saved; the
plug-in's trusted phase scores that policy), or ``error-rank<k>.json`` from a rank that failed
(status and message as the in-process path records them). Anything else (a rank killed, a
launcher that could not start) becomes an error naming the exit code and the end of
``launch.log``.

Cleaning up. The launcher stays in the worker's process group (no new session), so the
executor's timeout, which kills that group, takes it along. torchrun starts each rank in a
session of its own; every rank therefore watches its parent and this process and ends itself
when either is gone. If the evaluation is cancelled in this process (an exception, Ctrl-C in the serial
executor), the launcher and all its descendants are killed before the exception goes on.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

from engine.genome import GenomeError, is_out_of_memory

#: The folder holding the ``fitness`` package: the ranks import the plug-in from it.
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: The launch folders' name prefix (in the temporary folder: set TMPDIR to move them).
FOLDER_PREFIX = "evoloss-dpo-launch-"
#: Characters of the launch log quoted in an error.
_LOG_TAIL = 3000
#: Variables of an enclosing launch that must not leak into ours.
_LAUNCH_ENV_PREFIXES = ("ACCELERATE_", "FSDP_")
_LAUNCH_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID"}

_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class LaunchOutcome:
    """What rank 0 reported: the training metrics, the saved policy (which the plug-in's trusted
    phase scores) and the launch's wall time."""

    metrics: dict[str, Any]
    policy_dir: str | None
    seconds: float


def source_of(fn: Callable) -> str:
    """The genome source a compiled loss carries (:func:`engine.genome.compile_genome`).

    Raises:
        ValueError: for a function without one (a plain Python callable).
    """
    code = getattr(fn, "__evoloss_source__", None)
    if not isinstance(code, str):
        raise ValueError(
            "dpo option launcher=accelerate trains in other processes, which compile the loss again from its "
            f"source, and {getattr(fn, '__name__', fn)!r} carries none; pass a function built by "
            "engine.genome.compile_genome (as the engine does) or use launcher=inprocess")
    return code


# -- config files ------------------------------------------------------------------------------
def deepspeed_config(settings) -> dict[str, Any]:
    """DeepSpeed ZeRO-3 for the recipe: parameters, gradients and optimiser state sharded, no
    offload, the batch settings written out (``train_batch_size`` = per-device batch x grad
    accumulation x processes; transformers checks them against its arguments), the 16-bit
    weights gathered when the policy is saved. Bucket sizes stay ``auto``: transformers fills
    them from the model's hidden size. The optimiser and schedule stay the Trainer's (AdamW,
    cosine), as in the handbook's recipe."""
    s = settings
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": s.per_device_batch,
        "gradient_accumulation_steps": s.grad_accumulation,
        "train_batch_size": s.per_device_batch * s.grad_accumulation * s.num_processes,
        "gradient_clipping": s.max_grad_norm,
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "none"},
            "offload_param": {"device": "none"},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        # The optimiser is transformers' AdamW, not one of DeepSpeed's own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    if s.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif s.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    return config


def accelerate_config(settings, *, cpu: bool, deepspeed_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``accelerate launch`` config file's content for ``settings.distributed``.

    * ``ddp``: one process: no distribution (``use_cpu`` without GPUs); more: torchrun starts
      them (``MULTI_GPU``; without GPUs the trainer, told ``use_cpu``, joins them over gloo).
    * ``zero3``: ``DEEPSPEED`` with :func:`deepspeed_config` in ``deepspeed_file`` (which then
      owns the precision: accelerate refuses ``mixed_precision`` beside a DeepSpeed file).
    * ``fsdp``: FSDP full shard, transformer-block wrapping, weights loaded on rank 0 and
      broadcast, full state dict on save (the worker loads it with ``from_pretrained``).
    """
    s = settings
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": s.num_processes,
        "use_cpu": cpu,
        "downcast_bf16": "no",
    }
    if s.num_processes > 1:
        # 0: a free port per launch, so concurrent evaluations on one machine do not collide.
        config.update({"main_process_port": 0, "rdzv_backend": "static", "same_network": True, "gpu_ids": "all"})
    if s.distributed == "zero3":
        if deepspeed_file is None:
            raise ValueError("distributed=zero3 needs the DeepSpeed config file's path")
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {"deepspeed_config_file": str(deepspeed_file), "zero3_init_flag": True,
                                      "deepspeed_multinode_launcher": "standard"}
        return config
    config["mixed_precision"] = _MIXED_PRECISION[s.precision]
    if s.distributed == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_sync_module_states": True,
            "fsdp_offload_params": False,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_use_orig_params": True,
        }
    else:
        config["distributed_type"] = "MULTI_GPU" if s.num_processes > 1 else "NO"
    return config


def write_config(settings, folder: str | os.PathLike, *, cpu: bool) -> Path:
    """Write the accelerate config (and the DeepSpeed one) into ``folder``; returns the former,
    or the user's ``accelerate_config`` file when one is set."""
    import yaml  # a dependency of accelerate

    if settings.accelerate_config:
        path = Path(settings.accelerate_config).expanduser()
        if not path.is_file():
            raise ValueError(f"dpo option accelerate_config: file {str(path)!r} not found")
        return path
    folder = Path(folder)
    deepspeed_file = None
    if settings.distributed == "zero3":
        deepspeed_file = folder / "deepspeed.json"
        deepspeed_file.write_text(json.dumps(deepspeed_config(settings), indent=2))
    path = folder / "accelerate.yaml"
    path.write_text(yaml.safe_dump(accelerate_config(settings, cpu=cpu, deepspeed_file=deepspeed_file),
                                   sort_keys=False))
    return path


def launch_command(config_file: str | os.PathLike, request_file: str | os.PathLike, settings, *,
                   cpu: bool) -> list[str]:
    """``python -m accelerate.commands.launch ... -m fitness.dpo.rank --request FILE``."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--num_processes", str(settings.num_processes)]
    if cpu and settings.num_processes == 1:
        # With more processes, --cpu would make accelerate start only one (its CPU multi-process
        # mode wants mpirun); torchrun starts them and the trainer picks gloo.
        command.append("--cpu")
    return command + ["-m", "fitness.dpo.rank", "--request", str(request_file)]


def _environment(folder: Path) -> dict[str, str]:
    """The worker's environment (already free of secrets), the project importable, nothing left
    over from an enclosing distributed launch, and temporary files (torchrun's logs, datasets'
    caches) inside the launch folder, so that they go with it."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_ENV and not k.startswith(_LAUNCH_ENV_PREFIXES)}
    (folder / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(folder / "tmp")
    env["PYTHONPATH"] = os.pathsep.join([str(_PROJECT_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["TQDM_DISABLE"] = "1"  # TRL's reference pass would fill the log with progress bars
    env["EVOLOSS_DPO_LAUNCH_OWNER"] = str(os.getpid())  # each rank ends itself when this process is gone
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# -- running it ----------------------------------------------------------------------------------
def launch(preset: str, settings, code: str, seed: int, folder: str | os.PathLike) -> LaunchOutcome:
    """Train ``code`` with ``settings`` in ranks started by accelerate, which save the trained
    policy in ``folder``; rank 0's report.

    Raises:
        GenomeError: with the status (``error``, ``oom``, ``invalid``) and message the
            in-process path would give, for any failure of the launch or a rank.
        ValueError: for a strategy this machine cannot run (ZeRO-3 or FSDP without GPUs,
            ZeRO-3 without DeepSpeed).
    """
    import torch

    cpu = not torch.cuda.is_available()
    if cpu and settings.distributed != "ddp":
        raise ValueError(f"dpo option distributed={settings.distributed!r} needs GPUs and this machine has none "
                         f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use "
                         "distributed=ddp for CPU processes")
    if settings.distributed == "zero3" and not settings.accelerate_config and \
            importlib.util.find_spec("deepspeed") is None:
        raise ValueError("dpo option distributed=zero3 needs DeepSpeed in the evaluation workers' environment: "
                         "pip install deepspeed (on the GPU machines)")
    folder = Path(folder)
    _remove_stale_folders(folder)
    (folder / "owner.json").write_text(json.dumps(_identity(os.getpid())))
    (folder / "loss.py").write_text(code)
    request = {
        "preset": preset,
        # The cache folder resolved here: every rank reads and writes the worker's.
        "settings": {**settings.to_dict(), "cache_dir": str(settings.resolved_cache_dir())},
        "seed": seed,
        "loss_file": "loss.py",
        "policy_dir": "policy",
    }
    request_file = folder / "request.json"
    request_file.write_text(json.dumps(request, indent=2))
    config_file = write_config(settings, folder, cpu=cpu)
    command = launch_command(config_file, request_file, settings, cpu=cpu)
    log_path = folder / "launch.log"
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=folder, env=_environment(folder), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait()
        except BaseException:
            kill_tree(process)
            raise
    seconds = time.perf_counter() - start
    return _outcome(folder, returncode, log_path, seconds)


def _identity(pid: int) -> dict[str, Any] | None:
    """A process's host, pid and start time (a pid alone may be reused), or None if it is gone."""
    import psutil

    try:
        return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}
    except psutil.Error:
        return None


def _remove_stale_folders(folder: Path) -> None:
    """Remove the launch folders beside ``folder`` whose evaluation was killed (a timeout kills
    the worker before its temporary folder is cleaned up, and a folder may hold a saved 7B
    policy). Folders without an owner record are being set up, or are not ours: left alone."""
    import shutil

    for other in folder.parent.glob(f"{FOLDER_PREFIX}*"):
        if other == folder:
            continue
        try:
            owner = json.loads((other / "owner.json").read_text())
            pid = int(owner["pid"])
        except (OSError, ValueError, TypeError, KeyError):
            continue
        # Only this machine's processes can be checked (a shared TMPDIR holds other hosts' folders).
        if owner.get("host") == socket.gethostname() and _identity(pid) != owner:
            shutil.rmtree(other, ignore_errors=True)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it (torchrun's ranks live in sessions of
    their own, so a process-group kill would miss them)."""
    import psutil

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    for victim in [process, *descendants]:
        try:
            victim.send_signal(signal.SIGKILL)
        except (ProcessLookupError, psutil.Error, OSError):
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass
    psutil.wait_procs(descendants, timeout=10)


def _outcome(folder: Path, returncode: int, log_path: Path, seconds: float) -> LaunchOutcome:
    result_file = folder / "result.json"
    if returncode == 0 and result_file.exists():
        result = json.loads(result_file.read_text())
        policy_dir = result.get("policy_dir")
        return LaunchOutcome(metrics=dict(result["metrics"]),
                             policy_dir=str(folder / policy_dir) if policy_dir else None, seconds=seconds)
    raise _failure(folder, returncode, log_path)


def _failure(folder: Path, returncode: int, log_path: Path) -> GenomeError:
    """The error a failed launch is recorded with: a rank's own report if there is one (rank 0's
    first), else what the exit code and the log say."""
    reports = []
    for path in folder.glob("error-rank*.json"):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if reports:
        report = min(reports, key=lambda r: int(r.get("rank", 0)))
        status = report.get("status") if report.get("status") in ("error", "oom", "invalid") else "error"
        return GenomeError(str(report.get("error", "a training process failed")), status=status)
    tail = _tail(log_path)
    where = f"the accelerate launch exited with code {returncode}"
    if returncode == 0:
        where = "the accelerate launch exited without writing a result"
    killed = returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
    if killed or "Signal 9 (SIGKILL)" in tail or "exitcode  : -9" in tail:  # torchrun's words for a rank
        return GenomeError(f"out of memory: {where}; a training process was killed (SIGKILL), most likely by the "
                           f"kernel's out-of-memory killer. End of the launch log:\n{tail}", status="oom")
    if is_out_of_memory(RuntimeError(tail)):
        return GenomeError(f"out of memory: {where}. End of the launch log:\n{tail}", status="oom")
    return GenomeError(f"{where}. End of the launch log:\n{tail}", status="error")


def _tail(path: Path) -> str:
    try:
        text = path.read_bytes()[-_LOG_TAIL:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return text.strip() or "(empty log)"


def load_policy(policy_dir: str | None, settings, device: str | None = None):
    """The policy the ranks trained and saved, on ``device`` (default: this process's GPU if it
    has one, else the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not policy_dir or not Path(policy_dir).is_dir():
        raise RuntimeError(f"dpo: the accelerate launch saved no trained policy (expected a folder at {policy_dir!r})")
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=getattr(torch, settings.model_dtype))
    if device is not None:
        model.to(device)
    elif torch.cuda.is_available():
        model.to("cuda")
    return model.eval()
