"""Parsing LLM replies: JSON anywhere, fences, prose, escapes, bare functions."""
import json

import pytest

from operators.llm import ReplyError, parse_reply

CODE = "def hinge(pred, target):\n    return (pred - target).abs()\n"
OBJECT = {"thought": "absolute error is robust", "name": "hinge_abs", "code": CODE}


def test_plain_json_reply():
    parsed = parse_reply(json.dumps(OBJECT))
    assert (parsed.name, parsed.code, parsed.thought) == ("hinge_abs", CODE, "absolute error is robust")


def test_fenced_json_with_prose_around_it():
    text = f"Sure! Here is my idea.\n\n```json\n{json.dumps(OBJECT, indent=2)}\n```\n\nLet me know how it scores."
    parsed = parse_reply(text)
    assert parsed.code == CODE and parsed.name == "hinge_abs"


def test_json_object_inside_prose_without_fences():
    text = f"I propose the following: {json.dumps(OBJECT)} -- it should be robust to outliers."
    assert parse_reply(text).code == CODE


def test_literal_newlines_inside_json_strings_are_tolerated():
    text = '{"thought": "t", "name": "n", "code": "def n(pred, target):\n    return (pred - target) ** 2\n"}'
    assert parse_reply(text).code == "def n(pred, target):\n    return (pred - target) ** 2\n"


def test_double_escaped_newlines_are_unescaped():
    text = json.dumps({"thought": "t", "name": "n", "code": CODE.replace("\n", "\\n")})
    assert parse_reply(text).code == CODE


def test_json_encoded_string_holding_the_object():
    assert parse_reply(json.dumps(json.dumps(OBJECT))).code == CODE


def test_python_dict_syntax_with_triple_quotes_and_trailing_comma():
    text = "{'thought': 'robust', 'name': 'abs_loss', 'code': '''" + CODE + "''',}"
    parsed = parse_reply(text)
    assert parsed.name == "abs_loss" and parsed.code == CODE


def test_code_fenced_inside_the_json_field():
    obj = dict(OBJECT, code="```python\n" + CODE + "```")
    assert parse_reply(json.dumps(obj)).code == CODE


def test_fenced_python_function_without_json():
    text = "My idea is a robust loss.\n\n```python\n" + CODE + "```\nHope it helps."
    parsed = parse_reply(text)
    assert parsed.code == CODE and parsed.name == "hinge"
    assert "robust loss" in parsed.thought


def test_bare_python_function_in_prose():
    text = "Try this one:\n" + CODE + "\nIt ignores the sign of the residual."
    parsed = parse_reply(text)
    assert parsed.code == CODE and parsed.name == "hinge" and "sign" in parsed.thought


@pytest.mark.parametrize("text", ["", "   ", "I think a robust loss would be good, e.g. Huber.", '{"thought": "x"}'])
def test_replies_without_code_raise_a_message_for_the_model(text):
    with pytest.raises(ReplyError, match='"code"'):
        parse_reply(text)


def test_a_reply_nested_deeper_than_the_interpreters_stack_is_a_reply_error():
    # json.loads raises RecursionError, not ValueError, on such nesting: it must be one more bad
    # reply (fed back to the model), not a failure of the operator.
    for text in ("[" * 100_000, '{"code": ' + "[" * 100_000 + "}"):
        with pytest.raises(ReplyError):
            parse_reply(text)
