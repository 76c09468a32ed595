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
