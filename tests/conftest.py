"""Shared fixtures: paths and tiny plug-ins the tests use."""
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests run beside other work on 2 cores; one thread avoids oversubscription stalls.
torch.set_num_threads(1)
# The machine's truth key (fitness.truth) of the tests' runs: one made for this test session,
# never the user's own.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="evoloss-tests-data-")


@pytest.fixture(autouse=True)
def _no_truth_key_left_over():
    """A command run in the test process sets the truth key of the process (fitness.truth.use):
    each test starts with none (public problems) and leaves none behind."""
    os.environ.pop("EVOLOSS_TRUTH_FILE", None)
    yield
    os.environ.pop("EVOLOSS_TRUTH_FILE", None)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SPEC = f"{ROOT / 'examples' / 'robust_regression.py'}:RobustRegression"


@pytest.fixture
def example_spec() -> str:
    """The README's example plug-in: a fast regression task (~0.1 s per evaluation)."""
    return EXAMPLE_SPEC


@pytest.fixture
def write_plugin(tmp_path):
    """Write a plug-in file from source text and return its path.py:Class spec."""

    def write(source: str, class_name: str = "Plugin", name: str = "plugin.py") -> str:
        path = tmp_path / name
        path.write_text(source)
        return f"{path}:{class_name}"

    return write


FIXTURES = ROOT / "tests" / "fixtures"
JITTER_SPEC = f"{FIXTURES / 'jitter.py'}:JitterOperator"


def evaluations_so_far(run_dir) -> int:
    """Evaluations a run (perhaps one still going, in another process) has saved so far."""
    import sqlite3

    try:
        # Read-only: connecting read-write would create an empty file where the run is about to make its store.
        with sqlite3.connect(f"file:{Path(run_dir) / 'run.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM evaluations WHERE eval_seed IS NULL").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for_evaluations(run_dir, count: int, timeout: float = 120.0) -> int:
    """Poll until a run has saved ``count`` evaluations (or ``timeout`` passes); returns how many."""
    import time

    deadline = time.time() + timeout
    while (done := evaluations_so_far(run_dir)) < count and time.time() < deadline:
        time.sleep(0.05)
    return done


def available_sandboxes() -> list[str]:
    """The OS jails that run on this machine (bwrap, unshare), for tests that try each."""
    from engine import jail

    kinds = []
    for kind in ("bwrap", "unshare"):
        try:
            jail.choose(kind)
            kinds.append(kind)
        except Exception:  # noqa: BLE001 - not available here
            pass
    return kinds
