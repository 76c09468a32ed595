"""MT-Bench scoring: FastChat's question and reference formats, judge prompts, [[rating]] parsing,
the real openai and anthropic clients against a judge on 127.0.0.1, the judge-reply cache, and
the scorer end to end on the ``tiny`` preset."""
from __future__ import annotations

import json
import os
import re

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = pytest.mark.dpo

from fitness.dpo import DPOFitness  # noqa: E402
from fitness.dpo.mtbench import (  # noqa: E402
    Judge,
    MTBenchError,
    Question,
    grade,
    judge_messages,
    load_questions,
    load_references,
    parse_rating,
)
from tests.fitness.judge_server import JudgeServer  # noqa: E402

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2 + 3?", "And times 4?"],
     "reference": ["5", "20"]},
    {"question_id": 131, "category": "extraction", "turns": ["UNRATEABLE: list the colours.", "Sort them."]},
]


def rating_reply(request: dict) -> tuple[int, str]:
    """Rates by question: 7 for the haiku, 4 for the sum; never rates the UNRATEABLE question."""
    text = request["messages"][-1]["content"]
    if "UNRATEABLE" in text:
        return 200, "I cannot decide."
    rating = 7 if "haiku" in text else 4
    return 200, f"The answer is fine. Rating: [[{rating}]]"


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    return path


def _answers(questions):
    return {q.question_id: (f"first answer to {q.question_id}", f"second answer to {q.question_id}") for q in questions}


# -- formats and parsing --------------------------------------------------------------------------
@pytest.mark.parametrize(("reply", "rating"), [
    ("Rating: [[8]]", 8.0), ("[[7.5]] and later [[2]]", 7.5), ("I would say [6] overall.", 6.0),
    ("Rating: 9/10", None), ("", None), ("[[ten]]", None),
])
def test_rating_parsing_follows_fastchat(reply, rating):
    assert parse_rating(reply) == rating


def test_questions_load_from_fastchat_and_hf_mirror_layouts(tmp_path, question_file):
    questions = load_questions(str(question_file))
    assert [q.question_id for q in questions] == [81, 111, 131]
    assert questions[1].reference == ("5", "20") and questions[0].reference is None
    assert [q.temperature for q in questions] == [0.7, 0.0, 0.0]  # FastChat's temperature_config
    mirror = tmp_path / "mirror.jsonl"
    mirror.write_text(json.dumps({"prompt": ["a?", "b?"], "prompt_id": 5, "category": "stem", "reference": []}))
    (question,) = load_questions(str(mirror))
    assert (question.question_id, question.turns, question.temperature, question.reference) == (5, ("a?", "b?"), 0.1,
                                                                                                None)
    assert len(load_questions(str(question_file), limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["only one"]}))
    with pytest.raises(MTBenchError, match="'turns' must hold two question strings"):
        load_questions(str(bad))


def test_reference_answers_load_from_fastchats_answer_format(tmp_path):
    path = tmp_path / "gpt-4.jsonl"
    path.write_text(json.dumps({"question_id": 111, "model_id": "gpt-4", "choices": [{"index": 0,
                                "turns": ["five", "twenty"]}]}) + "\n")
    assert load_references(str(path)) == {111: ("five", "twenty")}


def test_judge_prompts_use_references_for_math_and_both_turns_for_turn_two():
    math_question = Question(111, "math", ("What is 2 + 3?", "And times 4?"))
    system, user = judge_messages(math_question, ("5", "20"), 1, ("five", "twenty"))
    assert system == "You are a helpful assistant."
    assert "[The Start of Reference Answer]\nfive\n[The End of Reference Answer]" in user
    assert user.endswith("[The Start of Assistant's Answer]\n5\n[The End of Assistant's Answer]")
    system, user = judge_messages(math_question, ("5", "20"), 2, ("five", "twenty"))
    assert "focus on the assistant's answer to the second question" in system
    assert "### Reference answer:\ntwenty" in user and "### Assistant A:\n20" in user
    writing = Question(81, "writing", ("Write.", "Again."))
    system, user = judge_messages(writing, ("a", "b"), 2, None)
    assert "Reference" not in user and "### User:\nAgain.\n\n### Assistant A:\nb" in user
    assert 'strictly following this format: "[[rating]]", for example: "Rating: [[5]]"' in system


# -- the judge through the real clients ------------------------------------------------------------
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_grading_through_the_real_client_with_an_unparseable_judgment(tmp_path, question_file, provider):
    questions = load_questions(str(question_file))
    with JudgeServer(rating_reply) as server:
        judge = Judge(f"{provider}:judge-model@{server.url}", tmp_path / "judge", retries=0)
        result = grade(judge, questions, _answers(questions), {}, parse_retries=1)
        judge.close()
    route = "/v1/chat/completions" if provider == "openai" else "/v1/messages"
    assert set(server.paths) == {route}
    # 6 turns judged once each, plus one retry for each of the two unparseable turns.
    assert len(server.requests) == 8 and result["judge_calls"] == 8
    assert result["mtbench_unparsed_judgments"] == 2 and result["mtbench_rated_turns"] == 4
    assert result["mtbench_turn1"] == result["mtbench_turn2"] == result["mtbench_score"] == pytest.approx(5.5)
    assert result["mtbench_stderr"] == pytest.approx(3 ** 0.5 / 2)  # sd of (7, 4, 7, 4) over sqrt(4)
    assert result["mtbench_categories"] == {"math": 4.0, "writing": 7.0}
    first = server.requests[0]
    assert first["model"] == "judge-model" and first["max_tokens"] == 2048
    if provider == "openai":  # anthropic 2.x clients no longer send a temperature
        assert first["temperature"] == 0.0 and first["messages"][0]["role"] == "system"
    else:
        assert first["system"] == "You are a helpful assistant."


def test_a_rescore_is_served_from_the_cache_with_no_http_call(tmp_path, question_file):
    questions = load_questions(str(question_file))
    with JudgeServer(rating_reply) as server:
        first = grade(Judge(f"openai:judge@{server.url}", tmp_path / "judge"), questions, _answers(questions), {})
        made = len(server.requests)
        again = grade(Judge(f"openai:judge@{server.url}", tmp_path / "judge"), questions, _answers(questions), {})
    assert len(server.requests) == made and again["judge_calls"] == 0 and again["judge_cached"] == made
    assert again["mtbench_score"] == first["mtbench_score"]


def test_judge_repeats_are_separate_calls_and_averaged(tmp_path):
    replies = iter(["Rating: [[6]]", "Rating: [[8]]"] * 2)
    question = Question(1, "writing", ("q1", "q2"))
    with JudgeServer(lambda request: (200, next(replies))) as server:
        result = grade(Judge(f"openai:judge@{server.url}", tmp_path), [question], {1: ("a", "b")}, {}, repeats=2)
    assert len(server.requests) == 4 and result["mtbench_score"] == 7.0


def test_a_judge_outage_is_an_error_not_a_zero(tmp_path):
    question = Question(1, "writing", ("q1", "q2"))
    with JudgeServer(lambda request: (500, "overloaded")) as server:
        judge = Judge(f"openai:judge@{server.url}", tmp_path, retries=1, timeout=5)
        with pytest.raises(MTBenchError, match=r"judge openai:judge@.* failed after 1 retries"):
            grade(judge, [question], {1: ("a", "b")}, {})
    assert len(server.requests) == 2  # the client's own retry


def test_a_judge_that_never_rates_is_an_error(tmp_path):
    question = Question(1, "writing", ("q1", "q2"))
    with JudgeServer(lambda request: (200, "no idea")) as server:
        with pytest.raises(MTBenchError, match="no parseable \\[\\[rating\\]\\]"):
            grade(Judge(f"openai:judge@{server.url}", tmp_path), [question], {1: ("a", "b")}, {}, parse_retries=0)


def test_a_keyed_judge_needs_a_key_in_the_driver_and_none_in_workers(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("EVOLOSS_SANDBOX", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        DPOFitness(scorer="mtbench", judge="openai:gpt-4", cache_dir=str(tmp_path))
    key = tmp_path / "key.txt"
    key.write_text("sk-test\n")
    assert DPOFitness(scorer="mtbench", judge="openai:gpt-4", judge_api_key_file=str(key), cache_dir=str(tmp_path))
    with JudgeServer(lambda request: (200, "[[5]]")) as server:
        Judge(f"openai:judge@{server.url}", tmp_path / "judge", api_key_file=str(key)).judge("s", "u")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
        Judge(f"openai:judge@{server.url}", tmp_path / "judge2").judge("s", "u")
    assert [h["authorization"] for h in server.headers] == ["Bearer sk-test", "Bearer sk-from-env"]
    # A worker builds the plug-in without any key: it never judges.
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("EVOLOSS_SANDBOX", "bwrap")
    assert DPOFitness(scorer="mtbench", judge="openai:gpt-4", cache_dir=str(tmp_path))


def test_no_jail_needs_the_network_or_sees_the_judges_files(tmp_path, question_file):
    references = tmp_path / "gpt-4.jsonl"
    references.write_text("")
    fitness = DPOFitness(scorer="mtbench", mtbench_questions=str(question_file), mtbench_references=str(references),
                         judge="openai:judge@http://127.0.0.1:9/v1", cache_dir=str(tmp_path / "cache"))
    needs = fitness.sandbox_needs()
    assert needs.host_network is False
    assert str(question_file) in needs.read_only and str(references) not in needs.read_only
    assert needs.hidden_from_genome == (str(question_file),)  # generation reads them; genomes never
    judge_cache = fitness.settings.resolved_judge_cache_dir()
    from pathlib import Path

    shown = [Path(path) for path in needs.writable + needs.read_only]
    assert shown and not any(path == judge_cache or path in judge_cache.parents for path in shown)


def test_answers_that_do_not_match_the_questions_are_an_error(tmp_path, question_file):
    from fitness.base import Score

    fitness = DPOFitness(scorer="mtbench", mtbench_questions=str(question_file),
                         judge="openai:judge@http://127.0.0.1:9/v1", cache_dir=str(tmp_path / "cache"))
    for answers in ([[81, "a", "b"]], [[81, "a", "b"], [111, "a", 3], [131, "a", "b"]], "not a list", None):
        with pytest.raises(MTBenchError, match="do not match"):
            fitness.judge(Score(0.5, {}, {"answers": answers}), 0)


# -- end to end on the tiny preset ---------------------------------------------------------------------
def test_mtbench_scorer_end_to_end_and_the_rescore_costs_nothing(tmp_path, question_file):
    with JudgeServer(rating_reply) as server:
        options = {"scorer": "mtbench", "mtbench_questions": str(question_file), "judge": f"openai:judge@{server.url}",
                   "cache_dir": str(tmp_path / "cache"), "judge_parse_retries": 1, "train_size": 64,
                   "heldout_size": 32}
        fitness = DPOFitness(preset="tiny", **options)
        from engine.genome import compile_genome
        from fitness.preference import PreferenceInterface, preference_seeds

        dpo = compile_genome(preference_seeds()[0].code, PreferenceInterface.arg_counts)
        first = fitness.evaluate(dpo, 0)
        made = len(server.requests)
        again = DPOFitness(preset="tiny", **options).evaluate(dpo, 0)
    assert first.fitness == pytest.approx(5.5) and first.metrics["mtbench_unparsed_judgments"] == 2
    assert made == 8 and first.metrics["judge_calls"] == 8
    # The judge saw the policy's answers in FastChat's prompt; turn 2 shows the policy's turn 1.
    turn_two = [r for r in server.requests if "### Assistant A:" in r["messages"][-1]["content"]]
    assert turn_two and all(re.search(r"### User:\n.*\n\n### Assistant A:\n", r["messages"][-1]["content"])
                            for r in turn_two)
    assert again.metrics["judge_calls"] == 0 and len(server.requests) == made and again.fitness == first.fitness
    assert first.metrics["mtbench_questions"] == 3 and "mtbench_turn2_stderr" in first.metrics


def test_mtbench_through_jailed_workers_is_judged_by_the_driver(tmp_path, question_file):
    """The worker's jail has no network (no --allow-host-network): the answers are generated
    there, and the driver's judge phase grades them against the server on 127.0.0.1."""
    from engine import jail
    from engine.executor import ProcessExecutor
    from engine.judging import Judging
    from fitness.preference import preference_seeds

    sandbox = jail.choose("auto")
    with JudgeServer(rating_reply) as server:
        options = {"scorer": "mtbench", "mtbench_questions": str(question_file), "judge": f"openai:judge@{server.url}",
                   "cache_dir": str(tmp_path / "cache"), "judge_parse_retries": 1, "train_size": 64,
                   "heldout_size": 32}
        executor = Judging(ProcessExecutor("dpo", options, workers=1, timeout=300, sandbox=sandbox,
                                           log_path=tmp_path / "workers.log"), "dpo", options)
        results = []
        with executor:
            executor.run([(0, preference_seeds()[0].code)], 0, None, results.append)
    (result,) = results
    assert result.ok, result.error
    assert result.fitness == pytest.approx(5.5) and result.metrics["judge_calls"] == 8
    assert 0.0 <= result.metrics["heldout_fitness"] <= 1.0 and "judge_seconds" in result.metrics
    assert len(server.requests) == 8
