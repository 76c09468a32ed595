"""GPU check: every GPU code path of evoloss in one short command, offline.

Run it in the first minutes on a GPU machine (no network needed)::

    python benchmarks/gpu_check.py                      # all steps, within --budget-s 480
    python benchmarks/gpu_check.py --wheels WHEELS      # first install what the machine lacks
    python benchmarks/gpu_check.py --dry-run            # the same steps on a CPU, tiny sizes

It generates what it needs (CIFAR-10 batches in the real on-disk format, with generated images
of the real size; a GPT-2-shaped model from a config, randomly initialised, with a tokenizer
trained on the spot; preference pairs as a JSONL file in the dpo plug-in's data format), then
runs each step as a real ``python -m engine evaluate ... --json`` or ``python -m engine run``
subprocess (through the evaluation worker, with the project's default sandbox) and times it:

1. ``cifar10-fast-cold``: ``cifar10 --preset fast`` (data on the GPU, channels_last, bf16
   autocast, ``torch.compile``) with an empty compile cache;
2. ``cifar10-fast-warm``: the same again, the compile cache on disk now warm;
3. ``cifar10-paper``: ``--preset paper`` (ResNet-18) with ``epochs=1``;
4. ``dpo-bf16``: ``dpo`` on the GPT-2-shaped model in bf16, trained in the worker;
5. ``dpo-accelerate``: the same through ``accelerate launch`` with 1 process;
6. ``oom``: a loss that asks the GPU for four times its memory must come back ``oom``;
7. ``after-oom``: the next evaluation on that GPU must come back ``ok``;
8. ``ray-run``: a 3-generation run (``--gens 2`` after the initial population) with
   ``--executor ray --gpus-per-eval 1`` on the fast preset (2 epochs per evaluation), without the
   end-of-run confirmation and validation (Ray on the GPU is checked, not the ranking).

It prints one JSON object: the machine (GPU name and memory, driver, torch, CUDA and package
versions) and, per step, ``status`` (ok, failed, timeout, skipped), ``seconds`` (wall time of
the subprocess, imports and worker start included), the evaluation's own ``eval_seconds``,
``peak_gpu_memory_bytes`` (``torch.cuda.max_memory_allocated`` in the process that ran the loss:
the worker, or rank 0 of an accelerate launch), ``peak_device_used_mib`` (the whole GPU as
``nvidia-smi`` saw it, every process, CUDA contexts and allocator caches included), the GPU name,
the torch/CUDA versions and the sandbox the evaluation ran in. The exit code is 1 if any step
failed, 2 for bad usage (no GPU without ``--dry-run``), else 0. Steps that would not fit in
what is left of ``--budget-s`` are skipped and say so.

``--dry-run`` runs the same steps, through the same CLI and worker, on the CPU with tiny sizes
(the CI test ``tests/benchmarks/test_gpu_check.py`` runs it, so this script cannot rot before a
GPU is at hand). docs/gpu.md says how to read the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Set in the re-executed process after ``--wheels``: the private folder the wheels went to.
SITE_ENV = "EVOLOSS_GPU_CHECK_SITE"
#: Distributions never installed from the wheels folder: the machine's own CUDA build stays.
MACHINE_OWNED = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")
#: Packages whose versions the report names (imported in a subprocess, as the steps do).
PACKAGES = ("torch", "transformers", "accelerate", "trl", "datasets", "tokenizers", "ray", "deap", "safetensors",
            "tinydb", "numpy", "pandas", "psutil", "rich", "scipy", "pyarrow")

CROSS_ENTROPY = '''def cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")
'''
DPO = '''def dpo(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    return -F.logsigmoid(self.beta * (pi_logratios - ref_logratios))
'''
#: The contract checks use batches of 1, 7 and 32 (and 16, 10 for fingerprint and descriptors);
#: the allocation happens only in training, whose batches are larger.
OOM_TEMPLATE = '''def allocates_too_much(logits, targets):
    if logits.shape[0] > 32:
        torch.zeros({elements}, device=logits.device)
    return F.cross_entropy(logits, targets, reduction="none")
'''


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check and its dry run."""

    cifar_per_batch: int
    cifar_test: int
    fast: dict[str, Any]
    paper: dict[str, Any]
    small: dict[str, Any]  # the oom / after-oom recipe
    ray_fast: dict[str, Any]
    gpt2_shape: dict[str, int]
    pairs: int
    dpo: dict[str, Any]
    memory_limit_gb: float  # evaluate's --memory-limit-gb (CUDA needs 0)
    oom_bytes: int | None  # None: four times the GPU's memory
    gpus_per_eval: float
    pop: int = 2
    gens: int = 2
    # Rough seconds per step (from the sizes; used only to skip what cannot fit in the budget).
    estimates: dict[str, float] = field(default_factory=dict)


GPU = Sizes(
    cifar_per_batch=10_000, cifar_test=10_000,
    fast={"preset": "fast"},
    paper={"preset": "paper", "epochs": 1},
    small={"preset": "cpu", "device": "cuda"},
    ray_fast={"preset": "fast", "epochs": 2},
    # GPT-2 small's shape (12 layers, 12 heads, width 768); the vocabulary is the local tokenizer's.
    gpt2_shape={"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
    pairs=512,
    dpo={"train_size": 256, "heldout_size": 128, "precision": "bf16", "learning_rate": 1e-5},
    memory_limit_gb=0.0, oom_bytes=None, gpus_per_eval=1.0,
    # Guesses for one H200 (they sum to 465 s, inside the default budget); nothing measured yet.
    estimates={"prepare": 20, "cifar10-fast-cold": 90, "cifar10-fast-warm": 45, "cifar10-paper": 45,
               "dpo-bf16": 45, "dpo-accelerate": 60, "oom": 20, "after-oom": 20, "ray-run": 120},
)
#: A few hundred images, one short epoch, the tiny GPT-2: every step in seconds on one core.
_DRY_CIFAR = {"train_size": 200, "val_size": 100, "batch_size": 50, "epochs": 1, "device": "cpu",
              "eval_batch_size": 100}
DRY = Sizes(
    cifar_per_batch=60, cifar_test=50,
    fast={"preset": "fast", **_DRY_CIFAR},
    paper={"preset": "paper", **_DRY_CIFAR, "train_size": 100},
    small={"preset": "cpu", **_DRY_CIFAR, "width": 8},
    ray_fast={"preset": "cpu", **_DRY_CIFAR, "width": 8},
    gpt2_shape={},  # fitness/dpo/tiny.py's own shape
    pairs=96,
    dpo={"train_size": 64, "heldout_size": 32, "precision": "bf16", "learning_rate": 1e-3},
    memory_limit_gb=4.0, oom_bytes=64 << 30, gpus_per_eval=0.0,
    estimates={"prepare": 5, "cifar10-fast-cold": 10, "cifar10-fast-warm": 10, "cifar10-paper": 15,
               "dpo-bf16": 25, "dpo-accelerate": 35, "oom": 8, "after-oom": 8, "ray-run": 45},
)
STEPS = ("prepare", "cifar10-fast-cold", "cifar10-fast-warm", "cifar10-paper", "dpo-bf16", "dpo-accelerate",
         "oom", "after-oom", "ray-run")
#: What a step needs from an earlier one (a step whose prerequisite did not succeed is skipped).
NEEDS = {"cifar10-fast-warm": "cifar10-fast-cold", "after-oom": "oom"}
#: Python packages each step imports beyond the core (missing: the step is skipped, naming them).
DPO_PACKAGES = ("trl", "datasets", "transformers", "accelerate", "tokenizers")
STEP_PACKAGES = {"dpo-bf16": DPO_PACKAGES, "dpo-accelerate": DPO_PACKAGES, "ray-run": ("ray",)}
CORE_PACKAGES = ("torch", "numpy", "deap", "safetensors", "tinydb", "rich", "psutil", "pandas")


# -- the machine ----------------------------------------------------------------------------------
def machine_report(env: dict[str, str]) -> dict[str, Any]:
    """Python, torch, CUDA, the GPU and package versions, read in a subprocess with the steps'
    environment (so ``--wheels`` installs are what it sees) that exits before the steps start
    (it holds a CUDA context while it runs). Packages are looked up, not imported: an import that
    breaks shows in the log of the first step that needs it."""
    probe = r'''
import importlib.metadata as md, importlib.util, json, platform, sys
out = {"python": platform.python_version(), "packages": {}, "missing": []}
for name in sys.argv[1].split(","):
    try:
        out["packages"][name] = md.version(name) if importlib.util.find_spec(name) else None
    except md.PackageNotFoundError:
        out["packages"][name] = "unknown"
    if out["packages"][name] is None:
        out["missing"].append(name)
import torch
out["torch"] = torch.__version__
out["cuda"] = torch.version.cuda
out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
out["cuda_available"] = torch.cuda.is_available()
if out["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    out["gpu"] = {"name": props.name, "count": torch.cuda.device_count(), "total_memory_bytes": props.total_memory,
                  "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported()}
print(json.dumps(out))
'''
    done = subprocess.run([sys.executable, "-c", probe, ",".join(PACKAGES)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"could not import torch in {sys.executable}: {done.stderr.strip()[-1500:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        report["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout else None
    report["executable"] = sys.executable
    report["platform"] = platform.platform()
    report["cpus"] = os.cpu_count()
    return report


class DeviceMemorySampler:
    """Samples the GPU's used memory (every process, as ``nvidia-smi`` reports it) while a step
    runs; the peak is the step's ``peak_device_used_mib``. Inactive without nvidia-smi."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms = interval_ms
        self.peak: int | None = None
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> DeviceMemorySampler:
        smi = shutil.which("nvidia-smi")
        if smi:
            self.process = subprocess.Popen(
                [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0",
                 f"--loop-ms={self.interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                used = int(line.strip())
            except ValueError:
                continue
            self.peak = used if self.peak is None else max(self.peak, used)

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.thread.join(timeout=5)

    @staticmethod
    def used_now() -> int | None:
        smi = shutil.which("nvidia-smi")
        if not smi:
            return None
        query = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True)
        try:
            return int(query.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):
            return None


# -- generated inputs -------------------------------------------------------------------------------
def prepare_inputs(work: Path, sizes: Sizes, with_model: bool = True) -> dict[str, Any]:
    """CIFAR-10 batches, loss files and (``with_model``) the GPT-2-shaped model with its
    tokenizer and the preference pairs."""
    from tests.fixtures.cifar10_data import write_cifar_folder

    start = time.perf_counter()
    data = work / "data"
    write_cifar_folder(data, per_batch=sizes.cifar_per_batch, test_images=sizes.cifar_test)
    cifar_seconds = time.perf_counter() - start
    losses = work / "losses"
    losses.mkdir()
    (losses / "cross_entropy.py").write_text(CROSS_ENTROPY)
    (losses / "dpo.py").write_text(DPO)
    inputs: dict[str, Any] = {"data_dir": str(data), "cifar_images": 5 * sizes.cifar_per_batch + sizes.cifar_test,
                              "cifar_seconds": round(cifar_seconds, 2)}
    if not with_model:
        return inputs

    from fitness.dpo.tiny import build_model, build_tokenizer, parity_pairs

    model_dir = work / "gpt2-shaped"
    tokenizer = build_tokenizer(0)
    model = build_model(tokenizer, 0, **sizes.gpt2_shape)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    pairs = work / "pairs.jsonl"
    with pairs.open("w") as handle:
        for row in parity_pairs(sizes.pairs, seed=1):
            handle.write(json.dumps(row) + "\n")
    return {**inputs, "model_dir": str(model_dir), "model_parameters": parameters, "vocab_size": len(tokenizer),
            "pairs_file": str(pairs), "pairs": sizes.pairs}


# -- running steps -----------------------------------------------------------------------------------
@dataclass
class Outcome:
    returncode: int | None  # None: killed at the deadline
    stdout: str
    stderr: str
    seconds: float
    peak_device_used_mib: int | None


def run_command(command: list[str], env: dict[str, str], timeout: float, log: Path) -> Outcome:
    """Run ``command`` in its own session; at the deadline its whole process group is killed."""
    start = time.perf_counter()
    with DeviceMemorySampler() as sampler, open(log, "w") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                   start_new_session=True)
        try:
            stdout, _ = process.communicate(timeout=max(1.0, timeout))
            code: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, _ = process.communicate()
            code = None
    return Outcome(code, stdout, log.read_text(errors="replace"), time.perf_counter() - start, sampler.peak)


def fitness_options(options: dict[str, Any]) -> list[str]:
    return [arg for key, value in options.items() for arg in ("--fitness-opt", f"{key}={value}")]


class Check:
    """The steps, their shared inputs and the report."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, work: Path, env: dict[str, str],
                 machine: dict[str, Any]) -> None:
        self.args = args
        self.sizes = sizes
        self.work = work
        self.env = env
        self.machine = machine
        self.inputs: dict[str, Any] = {}
        self.steps: dict[str, dict[str, Any]] = {}
        self.started = time.monotonic()
        self.evaluate_flags = _cli_flags("evaluate")
        # torch.compile's on-disk cache lives in the temporary folder (TMPDIR reaches the worker,
        # whose environment is otherwise an allow-list): a new one for the fast steps, so that
        # cold starts empty and warm reads what cold wrote. A jailed worker gets a scratch
        # folder of its own as TMPDIR instead, so under bwrap or unshare both steps compile from
        # nothing; the warm in-worker number is then the ray-run's later evaluations.
        self.compile_cache = {"TMPDIR": str(work / "tmp-fast")}
        (work / "tmp-fast").mkdir(exist_ok=True)
        self.run_flags = _cli_flags("run")

    # -- budget ------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def device_fields(self) -> dict[str, Any]:
        gpu = self.machine.get("gpu") or {}
        return {"gpu": gpu.get("name"), "torch": self.machine.get("torch"), "cuda": self.machine.get("cuda")}

    # -- one step ----------------------------------------------------------------------------------
    def step(self, name: str, body: Callable[[float], dict[str, Any]]) -> None:
        record: dict[str, Any] = {"status": "skipped"}
        estimate = self.sizes.estimates.get(name, 30.0)
        needed = NEEDS.get(name)
        missing = [p for p in STEP_PACKAGES.get(name, ()) if p in self.machine.get("missing", [])]
        if name != "prepare" and self.steps.get("prepare", {}).get("status") != "ok":
            record["reason"] = "the generated inputs (step prepare) are missing"
        elif needed and self.steps.get(needed, {}).get("status") != "ok":
            record["reason"] = f"needs step {needed}, which did not succeed"
        elif missing:
            record["reason"] = (f"{', '.join(missing)} cannot be imported here; install it, or bring its wheel "
                                "(benchmarks/gpu_wheels.sh DIR, then --wheels DIR)")
        elif self.left() < estimate:
            record["reason"] = (f"needs about {estimate:.0f} s and {max(self.left(), 0):.0f} s of --budget-s "
                                f"{self.args.budget_s:g} are left")
        else:
            try:
                record = body(self.left())
            except Exception as exc:  # noqa: BLE001 - a broken step is reported, and the others still run
                record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        record.update(self.device_fields())
        self.steps[name] = record
        if not self.args.quiet:
            shown = {k: record.get(k) for k in ("status", "seconds", "eval_status", "fitness", "peak_gpu_memory_bytes",
                                                 "reason", "error") if record.get(k) is not None}
            print(f"[gpu_check] {name}: {json.dumps(shown)[:400]}", file=sys.stderr, flush=True)

    # -- the steps ----------------------------------------------------------------------------------
    def prepare(self, left: float) -> dict[str, Any]:
        start = time.perf_counter()
        missing = self.machine.get("missing", [])
        self.inputs = prepare_inputs(self.work, self.sizes, with_model=not any(p in missing for p in DPO_PACKAGES))
        return {"status": "ok", "seconds": round(time.perf_counter() - start, 2), **self.inputs}

    def evaluate(self, left: float, *, fitness: str, options: dict[str, Any], code: str, expect: str = "ok",
                 extra_env: dict[str, str] | None = None, label: str) -> dict[str, Any]:
        command = [sys.executable, "-m", "engine", "evaluate", "--fitness", fitness, *fitness_options(options),
                   "--code", code, "--json", "--timeout", f"{max(left - 5, 10):.0f}",
                   "--memory-limit-gb", f"{self.sizes.memory_limit_gb:g}", *self.sandbox_flags(self.evaluate_flags)]
        env = {**self.env, **(extra_env or {})}
        outcome = run_command(command, env, left, self.work / f"{label}.log")
        record = self._outcome(outcome, command)
        payload = _last_json(outcome.stdout)
        if payload is None:
            record["status"] = "timeout" if outcome.returncode is None else "failed"
            record["error"] = record.get("error") or "no JSON from evaluate"
            return record
        metrics = payload.get("metrics") or {}
        record.update({
            "eval_status": payload.get("status"), "fitness": payload.get("fitness"),
            "eval_seconds": _round(payload.get("seconds")), "error": payload.get("error"),
            "peak_gpu_memory_bytes": metrics.get("gpu_peak_memory_bytes"),
            "sandbox": sandbox_of(payload, outcome.stderr, self.evaluate_flags),
            "metrics": {k: v for k, v in metrics.items() if k in KEY_METRICS},
        })
        record["status"] = "ok" if payload.get("status") == expect else "failed"
        if record["status"] == "failed":
            record["expected"] = expect
        return record

    def cifar(self, left: float, label: str, options: dict[str, Any], code: str | None = None, expect: str = "ok",
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        code = code or str(self.work / "losses" / "cross_entropy.py")
        return self.evaluate(left, fitness="cifar10", options={**options, "data_dir": self.inputs["data_dir"]},
                             code=code, expect=expect, extra_env=extra_env, label=label)

    def dpo(self, left: float, label: str, **options: Any) -> dict[str, Any]:
        options = {"preset": "tiny", "model": self.inputs["model_dir"], "dataset": self.inputs["pairs_file"],
                   "cache_dir": str(self.work / "dpo-cache"), **self.sizes.dpo, **options}
        return self.evaluate(left, fitness="dpo", options=options, code=str(self.work / "losses" / "dpo.py"),
                             label=label)

    def oom(self, left: float) -> dict[str, Any]:
        total = (self.machine.get("gpu") or {}).get("total_memory_bytes")
        wanted = self.sizes.oom_bytes if self.sizes.oom_bytes is not None else 4 * int(total)
        path = self.work / "losses" / "allocates_too_much.py"
        path.write_text(OOM_TEMPLATE.format(elements=wanted // 4))
        before = DeviceMemorySampler.used_now()
        record = self.cifar(left, "oom", self.sizes.small, code=str(path), expect="oom")
        record["asked_bytes"] = wanted
        record["device_used_mib_before"] = before
        return record

    def after_oom(self, left: float) -> dict[str, Any]:
        record = self.cifar(left, "after-oom", self.sizes.small)
        # The oom worker and its children are gone: the GPU holds no memory of theirs.
        record["device_used_mib_before"] = DeviceMemorySampler.used_now()
        return record

    def ray_run(self, left: float) -> dict[str, Any]:
        run_dir = self.work / "ray-run"
        command = [sys.executable, "-m", "engine", "run", "--fitness", "cifar10",
                   *fitness_options({**self.sizes.ray_fast, "data_dir": self.inputs["data_dir"]}),
                   "--executor", "ray", "--gpus-per-eval", f"{self.sizes.gpus_per_eval:g}", "--workers", "1",
                   "--pop", str(self.sizes.pop), "--gens", str(self.sizes.gens), "--seed", "0",
                   "--confirm-seeds", "0", "--validate-top", "0",  # what is checked is Ray on the GPU, not the ranking
                   "--timeout", f"{max(left - 10, 10):.0f}", "--memory-limit-gb", f"{self.sizes.memory_limit_gb:g}",
                   "--out", str(run_dir), "--quiet", *self.sandbox_flags(self.run_flags)]
        outcome = run_command(command, self.env, left, self.work / "ray-run.log")
        record = self._outcome(outcome, command)
        if outcome.returncode != 0:
            record["status"] = "timeout" if outcome.returncode is None else "failed"
            return record
        from archives.analysis import load_run

        run = load_run(run_dir)
        rows = run.evaluations
        statuses = rows["status"].value_counts().to_dict()
        ok_seconds = [float(s) for s, st in zip(rows["seconds"], rows["status"]) if st == "ok"]
        peaks = [float(v) for v in rows.get("metric_gpu_peak_memory_bytes", []) if v == v and v is not None]
        generations = len(run.generations)
        seeds = run.candidates[run.candidates["operator"] == "seed"]
        seeds_ok = bool((seeds["status"] == "ok").all())
        record.update({
            "generations": generations, "evaluations": int(len(rows)), "statuses": statuses,
            "first_eval_seconds": _round(ok_seconds[0]) if ok_seconds else None,
            "later_eval_seconds_median": _round(statistics.median(ok_seconds[1:])) if len(ok_seconds) > 1 else None,
            "best_fitness": _round(rows["fitness"].max()), "peak_gpu_memory_bytes": int(max(peaks)) if peaks else None,
            "sandbox": sandbox_of(_run_meta(run_dir, "sandbox"), outcome.stderr, self.run_flags),
        })
        problems = []
        if generations != self.sizes.gens + 1:
            problems.append(f"{generations} generations, expected {self.sizes.gens + 1}")
        if not seeds_ok:
            problems.append("a seed loss was not scored ok")
        if statuses.get("timeout") or statuses.get("oom"):
            problems.append(f"timeouts or oom among the evaluations: {statuses}")
        record["status"] = "failed" if problems else "ok"
        if problems:
            record["error"] = "; ".join(problems)
        return record

    # -- helpers -----------------------------------------------------------------------------------
    def sandbox_flags(self, flags: set[str]) -> list[str]:
        """``--sandbox`` is passed only when asked for; otherwise the project's default applies."""
        if self.args.sandbox is None:
            return []
        if "--sandbox" not in flags:
            raise RuntimeError("--sandbox was given, but this checkout's CLI has no --sandbox option")
        return ["--sandbox", self.args.sandbox]

    def _outcome(self, outcome: Outcome, command: list[str]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "status": "ok" if outcome.returncode == 0 else "failed", "seconds": round(outcome.seconds, 2),
            "returncode": outcome.returncode, "peak_device_used_mib": outcome.peak_device_used_mib,
            "command": " ".join(_short(part, self.work) for part in command),
        }
        if outcome.returncode is None:
            record["error"] = "killed at the end of --budget-s"
        elif outcome.returncode not in (0, 1):  # evaluate exits 1 for a failed evaluation (reported in its JSON)
            record["log_tail"] = outcome.stderr[-2000:]
        return record

    def run_all(self, wanted: list[str]) -> None:
        s = self.sizes
        bodies: dict[str, Callable[[float], dict[str, Any]]] = {
            "prepare": self.prepare,
            "cifar10-fast-cold": lambda left: self.cifar(left, "cifar10-fast-cold", s.fast, extra_env=self.compile_cache),
            "cifar10-fast-warm": lambda left: self.cifar(left, "cifar10-fast-warm", s.fast,
                                                         extra_env=self.compile_cache),
            "cifar10-paper": lambda left: self.cifar(left, "cifar10-paper", s.paper),
            "dpo-bf16": lambda left: self.dpo(left, "dpo-bf16"),
            "dpo-accelerate": lambda left: self.dpo(left, "dpo-accelerate", launcher="accelerate", num_processes=1),
            "oom": self.oom,
            "after-oom": self.after_oom,
            "ray-run": self.ray_run,
        }
        for name in STEPS:
            if name in wanted:
                self.step(name, bodies[name])
            else:
                self.steps[name] = {"status": "skipped", "reason": "not in --steps", **self.device_fields()}


KEY_METRICS = ("accuracy", "images_per_second", "seconds", "train_seconds", "setup_seconds", "launch_seconds",
               "heldout_accuracy", "train_steps", "train_loss", "device", "preset", "launcher", "world_size",
               "reference_cache_hits", "reference_cache_misses")


def sandbox_of(payload: dict[str, Any], stderr: str, flags: set[str]) -> str:
    """The sandbox the worker ran in, as the CLI reports it (``evaluate --json`` has a
    ``sandbox`` field; ``run`` and ``evaluate`` print ``sandbox: KIND (why)`` on stderr). A
    checkout without a ``--sandbox`` option runs genomes in the worker process alone: ``process``."""
    if isinstance(payload.get("sandbox"), str):
        return payload["sandbox"]
    match = re.search(r"^sandbox: (\S+)", stderr, re.M)
    if match:
        return match.group(1)
    return "process" if "--sandbox" not in flags else "unreported"


def _run_meta(run_dir: Path, key: str) -> dict[str, Any]:
    """``{key: kind}`` from a run folder's stored metadata (``run`` records the sandbox it chose)."""
    from archives.store import RunStore

    store = RunStore.open(run_dir, readonly=True)
    try:
        value = store.meta(key)
    finally:
        store.close()
    return {key: value.get("kind")} if isinstance(value, dict) else {}


def _cli_flags(command: str) -> set[str]:
    """The flags ``python -m engine COMMAND`` takes in this checkout (``--sandbox``, ``--data-dir``...)."""
    from engine.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag for action in commands.choices[command]._actions for flag in action.option_strings}


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _round(value: Any, digits: int = 4) -> Any:
    return round(float(value), digits) if isinstance(value, (int, float)) and value == value else value


def _short(part: str, work: Path) -> str:
    return part.replace(str(work), "$WORK").replace(sys.executable, "python")


# -- wheels -------------------------------------------------------------------------------------------
def _wheel_name(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def project_pins() -> dict[str, str]:
    """``name==version`` pins of the project's extras (trl and transformers: the dpo plug-in
    overrides TRL internals, so other versions may not work)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in [*project.get("dependencies", []),
                        *[r for extra in project.get("optional-dependencies", {}).values() for r in extra]]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;,]+)\s*", requirement)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def install_wheels(wheels: Path, site: Path) -> dict[str, Any]:
    """``pip install --no-index --no-deps --target SITE`` the wheels of what the machine lacks.

    The machine's own packages are kept where it has them (its numpy, its CUDA torch and the
    libraries built against them), except a project pin at another version (trl), and the
    ``transformers`` group (the pinned transformers with its hub and tokenizers), which goes in
    whole when the machine's transformers is not the pinned one. Never torch or its CUDA libraries.
    """
    import importlib.metadata as metadata

    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"--wheels: no .whl files in {wheels}; make them with benchmarks/gpu_wheels.sh {wheels}")
    manifest_file = wheels / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    group_of = {name: group for group, names in (manifest.get("groups") or {}).items() for name in names}
    pins = project_pins()

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    swap_transformers = installed("transformers") != pins.get("transformers", installed("transformers"))
    chosen: list[Path] = []
    kept: dict[str, str] = {}
    owned = []
    for path in files:
        name, version = _wheel_name(path)
        have = installed(name)
        if MACHINE_OWNED.match(name):
            owned.append(path.name)
        elif group_of.get(path.name) == "transformers" and not swap_transformers:
            kept[name] = have or "not needed"
        elif group_of.get(path.name) == "transformers" or have is None or (name in pins and have != pins[name]):
            chosen.append(path)
        else:
            kept[name] = have
    report: dict[str, Any] = {"wheels": str(wheels), "site": str(site), "installed": [p.name for p in chosen],
                              "kept_machine_versions": kept, "left_to_the_machine": owned,
                              "transformers_swapped_for_pin": swap_transformers,
                              "skipped_to_fit": manifest.get("skipped", []),
                              "folder_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1)}
    site.mkdir(parents=True, exist_ok=True)
    if chosen:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                               str(wheels), "--target", str(site), "--upgrade", "--quiet",
                               *[str(p) for p in chosen]], capture_output=True, text=True)
        report["install_seconds"] = round(time.perf_counter() - start, 2)
        if done.returncode != 0:
            raise SystemExit(f"--wheels: pip install into {site} failed:\n{done.stderr[-3000:]}")
    (site / "gpu_check_install.json").write_text(json.dumps(report))
    return report


def reexecute_with_site(site: Path, argv: list[str]) -> None:
    """Run this script again with the private folder first on PYTHONPATH (the steps' subprocesses,
    their workers, Ray's workers and accelerate's ranks inherit it)."""
    env = dict(os.environ)
    env[SITE_ENV] = str(site)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    kept = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--wheels":
            skip = True
            continue
        if arg.startswith("--wheels="):
            continue
        kept.append(arg)
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *kept], env)


# -- main ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock seconds for all steps; a step that would not fit is skipped (default 480)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated steps to run (default all: {','.join(STEPS)})")
    parser.add_argument("--wheels", metavar="DIR", help="install the wheels in DIR (benchmarks/gpu_wheels.sh) into "
                                                        "a private folder first, then run from there")
    parser.add_argument("--site", metavar="DIR", help="the private folder for --wheels (default: a temporary one)")
    parser.add_argument("--sandbox", default=None, help="passed to evaluate and run as --sandbox (default: the "
                                                        "project's default sandbox)")
    parser.add_argument("--work-dir", metavar="DIR", help="where generated inputs, logs and the run go "
                                                          "(default: a temporary folder, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs of every step)")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        print(f"error: --steps: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    if args.wheels and not os.environ.get(SITE_ENV):
        site = Path(args.site or tempfile.mkdtemp(prefix="evoloss-gpu-site-"))
        install_wheels(Path(args.wheels), site)
        reexecute_with_site(site, argv)  # does not return

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # No network on the GPU machine: never let a library try.
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
    env.update(offline)
    os.environ.update(offline)  # the inputs are generated in this process
    machine = machine_report(env)
    if not args.dry_run and not machine.get("cuda_available"):
        print("error: torch sees no CUDA device here; run with --dry-run to check the steps on the CPU",
              file=sys.stderr)
        print(json.dumps({"mode": "gpu", "machine": machine, "error": "no CUDA device"}))
        return 2
    missing_core = [p for p in CORE_PACKAGES if p in machine.get("missing", [])]
    sizes = DRY if args.dry_run else GPU
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="evoloss-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env["EVOLOSS_CACHE"] = str(work / "cache")
    started = time.perf_counter()
    check = Check(args, sizes, work, env, machine)
    try:
        if missing_core:
            raise RuntimeError(f"the core packages {', '.join(missing_core)} cannot be imported; install them, or "
                               "bring their wheels (benchmarks/gpu_wheels.sh DIR, then --wheels DIR)")
        # The data folder is named through --fitness-opt data_dir, which every version of the CLI takes.
        check.run_all(wanted)
    except RuntimeError as exc:
        check.steps.setdefault("setup", {"status": "failed", "error": str(exc)})
    finally:
        if not (args.keep or args.work_dir):
            shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, step in check.steps.items() if step["status"] in ("failed", "timeout")]
    report = {
        "mode": "dry-run" if args.dry_run else "gpu",
        "ok": not failed,
        "failed": failed,
        "skipped": {name: step.get("reason") for name, step in check.steps.items() if step["status"] == "skipped"},
        "seconds": round(time.perf_counter() - started, 2),
        "budget_s": args.budget_s,
        "machine": machine,
        "wheels": _install_report(),
        "work_dir": str(work) if (args.keep or args.work_dir) else None,
        "steps": check.steps,
    }
    text = json.dumps(report, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if failed else 0


def _install_report() -> dict[str, Any] | None:
    site = os.environ.get(SITE_ENV)
    if not site:
        return None
    path = Path(site) / "gpu_check_install.json"
    return json.loads(path.read_text()) if path.exists() else {"site": site}


if __name__ == "__main__":
    sys.exit(main())
