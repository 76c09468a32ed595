"""benchmarks/gpu_check.py: its dry run goes through every step (the same CLI commands, worker,
accelerate launch and Ray run as on a GPU, with tiny sizes on the CPU), the budget skips what
does not fit, and --wheels installs into a private folder and runs from there."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def gpu_check(*args: str, timeout: float = 300) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quiet", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr


@pytest.mark.slow
def test_dry_run_passes_every_step_through_the_cli_and_worker():
    # About 70 s on two idle cores; a generous budget so that a loaded CI machine skips nothing.
    code, report, stderr = gpu_check("--dry-run", "--budget-s", "1500", timeout=1600)
    steps = report["steps"]
    assert code == 0 and report["ok"], json.dumps({k: v for k, v in steps.items() if v["status"] != "ok"})[:3000]
    assert report["mode"] == "dry-run" and report["skipped"] == {}
    assert list(steps) == ["prepare", "cifar10-fast-cold", "cifar10-fast-warm", "cifar10-paper", "dpo-bf16",
                           "dpo-accelerate", "oom", "after-oom", "ray-run"]
    assert all(step["status"] == "ok" and step["seconds"] > 0 for step in steps.values())
    for name in ("cifar10-fast-cold", "cifar10-paper", "dpo-bf16", "dpo-accelerate", "after-oom"):
        assert steps[name]["eval_status"] == "ok" and steps[name]["sandbox"], name
        assert steps[name]["torch"] == report["machine"]["torch"] and "gpu" in steps[name]
    assert steps["cifar10-fast-cold"]["metrics"]["preset"] == "fast"
    assert steps["cifar10-paper"]["metrics"]["preset"] == "paper"
    assert steps["dpo-accelerate"]["metrics"]["launcher"] == "accelerate"
    assert steps["dpo-accelerate"]["metrics"]["world_size"] == 1
    # The loss that asks for 64 GiB is recorded as out of memory, not as an error.
    assert steps["oom"]["eval_status"] == "oom" and "allocate" in steps["oom"]["error"]
    ray = steps["ray-run"]
    assert ray["generations"] == 3 and ray["statuses"].get("ok", 0) >= 5 and "--executor ray" in ray["command"]
    # The sandbox each step ran in is recorded: evaluate reports it, run stores it.
    assert {steps[name]["sandbox"] for name in steps if name != "prepare"} <= {"bwrap", "unshare", "none"}


def test_steps_that_do_not_fit_the_budget_are_skipped_with_the_reason():
    code, report, _ = gpu_check("--dry-run", "--budget-s", "1", "--steps", "prepare,cifar10-paper")
    steps = report["steps"]
    assert code == 0 and report["ok"]
    assert "--budget-s 1" in steps["prepare"]["reason"]
    assert steps["cifar10-paper"]["reason"] == "the generated inputs (step prepare) are missing"
    assert steps["ray-run"]["reason"] == "not in --steps"


def test_bad_usage_exits_2():
    code, _, stderr = gpu_check("--steps", "prepare,warp-drive")
    assert code == 2 and "unknown step(s) warp-drive" in stderr
    code, report, stderr = gpu_check("--steps", "prepare")  # no --dry-run, and this machine has no GPU
    assert code == 2 and "no CUDA device" in stderr and report["machine"]["cuda_available"] is False


def _wheel(folder: Path, name: str, version: str, module: str | None) -> Path:
    """A minimal pure-Python wheel (METADATA, WHEEL, RECORD and one module)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        if module:
            wheel.writestr(f"{module}.py", "ANSWER = 42\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_wheels_are_installed_into_a_private_folder_except_torch(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "evoloss_probe", "1.0", "evoloss_probe")
    _wheel(wheels, "torch", "9.9", None)  # the machine's own CUDA build is never replaced
    _wheel(wheels, "tinydb", "0.1", None)  # present here at another version: the machine's is kept
    (wheels / "manifest.json").write_text(json.dumps({"skipped": [{"group": "ray", "mb": 79.3}]}))
    site = tmp_path / "site"
    code, report, stderr = gpu_check("--wheels", str(wheels), "--site", str(site), "--dry-run", "--budget-s", "1",
                                     "--steps", "prepare")
    assert code == 0, stderr
    assert (site / "evoloss_probe.py").exists() and not list(site.glob("torch*"))
    assert report["wheels"]["installed"] == ["evoloss_probe-1.0-py3-none-any.whl"]
    assert report["wheels"]["left_to_the_machine"] == ["torch-9.9-py3-none-any.whl"]
    assert report["wheels"]["kept_machine_versions"] == {"tinydb": report["machine"]["packages"]["tinydb"]}
    assert report["wheels"]["skipped_to_fit"] == [{"group": "ray", "mb": 79.3}]
    # The re-executed check ran with the private folder first on its path (the machine's torch still found).
    assert report["machine"]["torch"].startswith("2.") and report["machine"]["executable"] == sys.executable
