"""The helpers shared across packages (engine/helpers.py)."""
from __future__ import annotations

import keyword
import math

import pytest

from engine.helpers import field_help, identifier, round_significant


@pytest.mark.parametrize(("value", "digits", "expected"), [
    (0.123456, 3, 0.123), (123456.0, 2, 120000.0), (-0.0015678, 2, -0.0016), (1e-10, 3, 1e-10), (0.0, 3, 0.0),
])
def test_round_significant_keeps_the_given_digits(value, digits, expected):
    assert round_significant(value, digits) == expected


def test_round_significant_leaves_zero_and_non_finite_values_alone():
    assert math.copysign(1.0, round_significant(-0.0, 3)) == -1.0
    assert math.isnan(round_significant(math.nan, 3))
    assert round_significant(-math.inf, 3) == -math.inf


def test_round_significant_can_flush_float_noise_to_zero():
    assert round_significant(5e-10, 4, zero_below=1e-9) == 0.0
    assert round_significant(-5e-10, 4, zero_below=1e-9) == 0.0
    assert round_significant(2e-9, 4, zero_below=1e-9) == 2e-9


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("dpo", 48, "dpo"), ("my loss!", 48, "my_loss"), ("a__b--c", 48, "a_b_c"), ("  ", 48, "loss"),
    ("2nd_try", 48, "l_2nd_try"), ("lambda", 48, "lambda_loss"), ("print", 48, "print_loss"),
    ("torch", 48, "torch_loss"), ("abcdef_ghij", 7, "abcdef"),
])
def test_identifier_makes_safe_short_names(text, limit, expected):
    name = identifier(text, limit)
    assert name == expected and name.isidentifier() and not keyword.iskeyword(name)


def test_field_help_carries_the_text_and_extra_keys():
    assert field_help("offspring per generation") == {"help": "offspring per generation"}
    assert field_help("x", group="search", negative="--no-x") == {"help": "x", "group": "search", "negative": "--no-x"}


def test_finite_makes_any_metrics_valid_json():
    import json
    import math

    from engine.helpers import finite

    value = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": "x", "e": None}}
    assert finite(value) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": "x", "e": None}}
    json.loads(json.dumps(finite(value), allow_nan=False))
