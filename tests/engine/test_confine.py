"""What only the trusted phase may read is hidden in each genome's process (engine.confine):
the plug-in's own code there cannot read it, and a hostile genome (plain Python, --jail-only)
can neither read it nor undo the covers, through bwrap and through unshare."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.executor import ProcessExecutor
from tests.conftest import available_sandboxes

ROOT = Path(__file__).resolve().parents[2]
SPEC = f"{ROOT / 'tests' / 'fixtures' / 'hidden.py'}:HiddenData"
MSE = "def mse(pred, target):\n    return (pred - target) ** 2\n"

# Plain Python, run with --jail-only: every way it knows to reach the hidden files.
ATTACK = '''
def attack(pred, target):
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    folder, file = FOLDER, FILE
    found = []
    def grab(path):
        try:
            if os.path.isdir(path):
                found.extend(os.listdir(path))
            else:
                found.append(open(path).read())
        except OSError:
            pass
    grab(folder); grab(file)
    for path in (folder, file):
        libc.umount2(path.encode(), 2)
    grab(folder); grab(file)
    if libc.unshare(0x00020000) == 0:  # a mount namespace of its own, then try again
        for path in (folder, file):
            libc.umount2(path.encode(), 2)
            libc.mount(None, path.encode(), None, 32 | 4096, None)
        grab(folder); grab(file)
        libc.mount(os.path.dirname(folder).encode(), b"/tmp", None, 4096, None)
        grab(os.path.join("/tmp", os.path.basename(folder)))
    grab(f"/proc/{os.getppid()}/root{folder}"); grab(f"/proc/{os.getppid()}/root{file}")
    found = [f for f in found if f]
    if found:
        raise ValueError("LEAK " + repr(found))
    return (pred - target) ** 2
'''


@pytest.fixture
def secrets(tmp_path):
    folder = tmp_path / "test-split"
    folder.mkdir()
    (folder / "labels.txt").write_text("SECRET-LABELS")
    file = tmp_path / "questions.jsonl"
    file.write_text("SECRET-QUESTIONS")
    return folder, file


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_the_trusted_phase_reads_what_the_genomes_process_cannot(secrets, tmp_path, sandbox):
    folder, file = secrets
    cache = tmp_path / "cache"
    cache.mkdir()
    options = {"folder": str(folder), "file": str(file), "cache": str(cache)}
    results = []
    with ProcessExecutor(SPEC, options, workers=1, timeout=60, sandbox=sandbox,
                         log_path=tmp_path / "workers.log") as executor:
        executor.run([(1, MSE), (2, MSE)], 0, None, results.append)
    for result in results:
        assert result.ok, result.error
        assert result.metrics["genome_saw"] == [0.0, 0.0]
        assert result.metrics["trusted_read"] == [True, True]
        # The cache prepare() wrote is read by the genome's process, never written.
        assert result.metrics["genome_read_cache"] is True and result.metrics["genome_wrote_cache"] is False
    assert not (cache / "forged").exists() and (cache / "prepared-0").exists()


def test_without_a_jail_nothing_is_hidden(secrets, tmp_path):
    folder, file = secrets
    results = []
    cache = tmp_path / "cache"
    cache.mkdir()
    options = {"folder": str(folder), "file": str(file), "cache": str(cache)}
    with pytest.warns(RuntimeWarning), ProcessExecutor(SPEC, options, workers=1, timeout=60,
                                                       sandbox="none") as executor:
        executor.run([(1, MSE)], 0, None, results.append)
    assert results[0].ok and results[0].metrics["genome_saw"] == [1.0, 1.0]
    assert results[0].metrics["genome_wrote_cache"] is True


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_hostile_genome_cannot_uncover_them(secrets, tmp_path, sandbox):
    folder, file = secrets
    genome = tmp_path / "attack.py"
    genome.write_text(ATTACK.replace("FOLDER", repr(str(folder))).replace("FILE", repr(str(file))))
    done = subprocess.run(
        [sys.executable, "-m", "engine", "evaluate", "--code", str(genome), "--fitness", SPEC, "--fitness-opt",
         f"folder={folder}", "--fitness-opt", f"file={file}", "--sandbox", sandbox, "--jail-only", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "SECRET" not in done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok", result["error"]
    assert result["metrics"]["genome_saw"] == [0.0, 0.0]


NESTING = '''
def nest(pred, target):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    caps = [line.split()[1] for line in open("/proc/self/status") if line.startswith(("CapEff", "CapPrm", "CapBnd"))]
    made = libc.unshare(0x10000000)  # CLONE_NEWUSER
    if made == 0 or any(int(value, 16) for value in caps):
        raise ValueError(f"NESTED {made} {caps}")
    return (pred - target) ** 2
'''


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_a_genome_makes_no_user_namespace_and_holds_no_capability(tmp_path, sandbox):
    genome = tmp_path / "nest.py"
    genome.write_text(NESTING)
    done = subprocess.run(
        [sys.executable, "-m", "engine", "evaluate", "--code", str(genome), "--fitness",
         "examples/robust_regression.py:RobustRegression", "--sandbox", sandbox, "--jail-only", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok", result["error"]
