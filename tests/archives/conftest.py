"""Runs for the dashboard tests: a real one made by the engine, one written directly (preference
losses, LLM calls, failures) with hostile text in it, shared by the server and browser tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from archives.store import RunStore
from engine.candidate import Candidate, EvalResult
from tests.conftest import EXAMPLE_SPEC
from tests.fixtures.runs import HEADER, build_run

#: Text that would run script if a page used it as HTML.
HOSTILE = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2"><b>bold</b>'
HOSTILE_ID = 10
FAILED_HOSTILE_ID = 11


def add_hostile(run_dir: Path) -> None:
    """A best loss whose name, thought, code comment, LLM prompt and reply are hostile HTML, and
    a failure whose error message is."""
    store = RunStore.open(run_dir)
    try:
        code = HEADER.format(name="hostile") + f"    # {HOSTILE}\n    return -F.logsigmoid(3.0 * self.beta * logits)\n"
        store.add_candidates([
            Candidate(HOSTILE_ID, HOSTILE, code, HOSTILE, (7,), "llm:mutate", 2, "hostile-hash"),
            Candidate(FAILED_HOSTILE_ID, "failing", HEADER.format(name="failing") + "    return logits\n", "",
                      (7,), "llm:mutate", 2, "failing-hash"),
        ])
        store.add_evaluation(EvalResult(HOSTILE_ID, "ok", 0.75, {"kl": 0.2, "reward_gain": 0.75},
                                        {"slope_at_zero": 0.5, "left_tail_growth": 3.5}, "fp-hostile", seconds=1.0),
                             "synthetic-pref")
        store.add_evaluation(EvalResult(FAILED_HOSTILE_ID, "error", error=HOSTILE, seconds=1.0), "synthetic-pref")
        store.add_llm_call(candidate_id=HOSTILE_ID, operator="llm", model="gpt-test", kind="mutate", attempt=1,
                           generation=2, prompt=json.dumps([{"role": "user", "content": HOSTILE}]), reply=HOSTILE,
                           tokens_in=10, tokens_out=20, latency_s=0.5, cost_usd=0.001)
    finally:
        store.close()


@pytest.fixture(scope="session")
def dashboard_runs(tmp_path_factory) -> Path:
    """A folder with two runs: ``regression`` (a real engine run of the README's example
    plug-in, 2 generations of 4) and ``preference`` (written directly, with hostile text)."""
    from engine.cli import main

    root = tmp_path_factory.mktemp("dashboard") / "runs"
    code = main(["run", "--fitness", EXAMPLE_SPEC, "--pop", "4", "--gens", "2", "--executor", "serial",
                 "--out", str(root / "regression"), "--quiet"])
    assert code == 0
    build_run(root / "preference")
    add_hostile(root / "preference")
    return root
