"""Checking LLM replies: the unit tests run in an isolated worker (or in-process with serial)."""
import pytest

from engine.genome import GenomeError
from engine.plugins import load_fitness
from engine.reply_checker import ReplyChecker
from tests.conftest import EXAMPLE_SPEC

GOOD = "def abs_loss(pred, target):\n    return (pred - target).abs()\n"
SCALAR = "def mean_loss(pred, target):\n    return ((pred - target) ** 2).mean()\n"
ESCAPE = "def sneaky(pred, target):\n    return open('/etc/passwd')\n"


@pytest.fixture(scope="module")
def interface():
    return load_fitness(EXAMPLE_SPEC).interface


@pytest.mark.parametrize("isolated", [True, False])
def test_unit_tests_catch_a_scalar_loss(interface, isolated):
    checker = ReplyChecker("tests", isolated=isolated, fitness=EXAMPLE_SPEC, timeout=30)
    try:
        checker.check(GOOD, interface)
        with pytest.raises(GenomeError, match="returned a scalar"):
            checker.check(SCALAR, interface)
        with pytest.raises(GenomeError, match="open"):
            checker.check(ESCAPE, interface)  # refused statically, never run
    finally:
        checker.close()
    assert checker.executor is None


def test_static_mode_does_not_run_the_code(interface):
    checker = ReplyChecker("static", isolated=True, fitness=EXAMPLE_SPEC)
    checker.check(SCALAR, interface)
    assert checker.executor is None


@pytest.mark.parametrize("sandbox", ["auto", "none"])
def test_the_checkers_worker_uses_the_runs_sandbox(interface, sandbox):
    from engine.assembly import reply_checker
    from engine.config import RunConfig

    config = RunConfig(fitness=EXAMPLE_SPEC, sandbox=sandbox, check_timeout=3.0, operator="openai:m@http://127.0.0.1:9/v1")
    checker = reply_checker(config, interface)
    try:
        with pytest.warns(RuntimeWarning, match="WITHOUT an OS jail") if sandbox == "none" else _no_warning():
            checker.check(GOOD, interface)
        assert checker.executor.sandbox.requested == sandbox
        assert checker.executor.check_timeout == 3.0
    finally:
        checker.close()


def _no_warning():
    import contextlib

    return contextlib.nullcontext()
