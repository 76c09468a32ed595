"""MT-Bench (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena",
arXiv:2306.05685) as FastChat's ``llm_judge`` runs it in single-answer grading mode.

* **Questions**: 80 two-turn questions in FastChat's ``question.jsonl`` format
  (``question_id``, ``category``, ``turns``, optional ``reference``), from a local file or the
  Hugging Face mirror ``HuggingFaceH4/mt_bench_prompts`` (``prompt_id``, ``category``,
  ``prompt``, ``reference``).
* **Answers**: the trained policy answers turn 1, then turn 2 with its own turn-1 answer in
  the conversation, through its chat template; sampling temperature per category as
  FastChat's ``temperature_config`` (greedy at 0), ``max_new_tokens`` 1024.
* **Grading**: FastChat's ``single-v1`` and ``single-v1-multi-turn`` judge prompts, and the
  ``-math-`` variants with reference answers for the math, reasoning and coding categories
  (``NEED_REF_CATS``); the rating is the first ``[[x]]`` in the reply, else the first
  ``[x]`` (FastChat's patterns). The judge is called through the official ``openai`` or
  ``anthropic`` client at temperature 0 with 2048 reply tokens by default.
* **Score**: turn-1, turn-2 and overall means over questions with their standard errors
  (``judge_repeats`` judgments averaged per answer). A reply without a rating is asked again
  (``judge_parse_retries``); one that never has one is left out and counted, as FastChat's
  -1 ratings are.

Judge replies are cached on disk by (judge, URL, prompt, temperature, repeat, attempt): a
re-score costs no API call.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: FastChat fastchat/llm_judge/common.py: sampling temperature per category.
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
#: Categories graded against reference answers.
NEED_REF_CATS = ("math", "reasoning", "coding")

_ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")

_RATING_RULE = ('you must rate the response on a scale of 1 to 10 by strictly following this format: '
                '"[[rating]]", for example: "Rating: [[5]]".')
_TWO_TURNS = ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n"
              "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
              "<|The End of Assistant A's Conversation with User|>")
_TWO_REFERENCES = ("<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n"
                   "{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n"
                   "<|The End of Reference Answer|>\n\n\n")

#: FastChat fastchat/llm_judge/data/judge_prompts.jsonl, the four single-answer prompts
#: (Apache-2.0); ``system`` and ``user`` templates as FastChat sends them.
JUDGE_PROMPTS: dict[str, dict[str, str]] = {
    "single-v1": {
        "system": "You are a helpful assistant.",
        "user": ("[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided "
                 "by an AI assistant to the user question displayed below. Your evaluation should consider factors "
                 "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the "
                 "response. Begin your evaluation by providing a short explanation. Be as objective as possible. "
                 f"After providing your explanation, {_RATING_RULE}\n\n[Question]\n{{question}}\n\n"
                 "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"),
    },
    "single-math-v1": {
        "system": "You are a helpful assistant.",
        "user": ("[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided "
                 "by an AI assistant to the user question displayed below. Your evaluation should consider "
                 "correctness and helpfulness. You will be given a reference answer and the assistant's answer. "
                 "Begin your evaluation by comparing the assistant's answer with the reference answer. Identify "
                 "and correct any mistakes. Be as objective as possible. After providing your explanation, "
                 f"{_RATING_RULE}\n\n[Question]\n{{question}}\n\n[The Start of Reference Answer]\n{{ref_answer_1}}\n"
                 "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
                 "[The End of Assistant's Answer]"),
    },
    "single-v1-multi-turn": {
        "system": ("Please act as an impartial judge and evaluate the quality of the response provided by an AI "
                   "assistant to the user question displayed below. Your evaluation should consider factors such as "
                   "the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. "
                   "You evaluation should focus on the assistant's answer to the second user question. Begin your "
                   "evaluation by providing a short explanation. Be as objective as possible. After providing your "
                   f"explanation, {_RATING_RULE}\n\n"),
        "user": _TWO_TURNS,
    },
    "single-math-v1-multi-turn": {
        "system": ("Please act as an impartial judge and evaluate the quality of the response provided by an AI "
                   "assistant to the user question. Your evaluation should consider correctness and helpfulness. "
                   "You will be given a reference answer and the assistant's answer. You evaluation should focus on "
                   "the assistant's answer to the second question. Begin your evaluation by comparing the "
                   "assistant's answer with the reference answer. Identify and correct any mistakes. Be as "
                   f"objective as possible. After providing your explanation, {_RATING_RULE}\n\n"),
        "user": _TWO_REFERENCES + _TWO_TURNS,
    },
}


class MTBenchError(RuntimeError):
    """Questions that cannot be read, or a judge that cannot be reached or never rates."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, str]
    reference: tuple[str, str] | None = None

    @property
    def temperature(self) -> float:
        return TEMPERATURE.get(self.category, DEFAULT_TEMPERATURE)


def parse_rating(judgment: str) -> float | None:
    """FastChat's rating: the first ``[[x]]``, else the first ``[x]``; None if neither."""
    match = _ONE_SCORE.search(judgment) or _ONE_SCORE_BACKUP.search(judgment)
    if not match:
        return None
    value = float(match.group(1))
    return value if math.isfinite(value) else None


def _question(row: dict[str, Any], where: str) -> Question:
    turns = row.get("turns", row.get("prompt"))
    qid = row.get("question_id", row.get("prompt_id"))
    category = row.get("category")
    if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, str) for t in turns[:2])):
        raise MTBenchError(f"{where}: 'turns' must hold two question strings")
    if qid is None or not isinstance(category, str):
        raise MTBenchError(f"{where}: each question needs 'question_id' and 'category'")
    reference = row.get("reference")
    reference = tuple(reference[:2]) if isinstance(reference, list) and len(reference) >= 2 else None
    return Question(qid, category, (turns[0], turns[1]), reference)


def load_questions(source: str, limit: int = 0) -> list[Question]:
    """Questions from FastChat's ``question.jsonl`` or the Hugging Face mirror."""
    path = Path(source).expanduser()
    if path.exists() or source.endswith((".jsonl", ".json")):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise MTBenchError(f"dpo option mtbench_questions: cannot read {str(path)!r}: {exc}") from exc
        rows = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise MTBenchError(f"{path} line {number} is not valid JSON: {exc}") from exc
        where = str(path)
    else:
        try:
            import datasets

            rows = datasets.load_dataset(source, split="train").to_list()
        except Exception as exc:
            raise MTBenchError(f"dpo option mtbench_questions: cannot load {source!r}: {type(exc).__name__}: "
                               f"{exc}. Give FastChat's question.jsonl as a local file instead") from exc
        where = source
    questions = [_question(row, f"{where} question {i}") for i, row in enumerate(rows)]
    if not questions:
        raise MTBenchError(f"{where} holds no questions")
    return questions[:limit] if limit else questions


def load_references(path: str) -> dict[Any, tuple[str, str]]:
    """FastChat reference answers (``reference_answer/gpt-4.jsonl``): question id -> two turns."""
    references = {}
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise MTBenchError(f"dpo option mtbench_references: cannot read {path!r}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["choices"][0]["turns"]
            references[row["question_id"]] = (turns[0], turns[1])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise MTBenchError(f"{path} line {number}: expected FastChat's answer format "
                               f"{{'question_id', 'choices': [{{'turns': [...]}}]}}: {exc}") from exc
    return references


# -- the judge ---------------------------------------------------------------------------------
class Judge:
    """An LLM judge through the official client, with an on-disk reply cache.

    Args:
        spec: ``openai:MODEL``, ``anthropic:MODEL``, or either with ``@URL``.
        cache_folder: Where replies are kept (one JSON file per request).
        api_key_file: A file holding the API key (workers get no keys from the environment).
    """

    def __init__(self, spec: str, cache_folder: Path, *, temperature: float = 0.0, max_tokens: int = 2048,
                 timeout: float = 120.0, retries: int = 6, api_key_file: str | None = None) -> None:
        provider, _, rest = spec.partition(":")
        model, _, url = rest.partition("@")
        if provider not in ("openai", "anthropic") or not model:
            raise MTBenchError(f"dpo option judge: expected openai:MODEL or anthropic:MODEL[@URL], got {spec!r}")
        self.spec, self.provider, self.model, self.url = spec, provider, model, url or None
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout, self.retries = timeout, retries
        self.cache_folder = Path(cache_folder)
        self.calls = 0
        self.cached = 0
        self._key = self._api_key(api_key_file)
        self._client = None

    def _api_key(self, api_key_file: str | None) -> str | None:
        variable = "OPENAI_API_KEY" if self.provider == "openai" else "ANTHROPIC_API_KEY"
        if api_key_file:
            try:
                key = Path(api_key_file).expanduser().read_text().strip()
            except OSError as exc:
                raise MTBenchError(f"dpo option judge_api_key_file: cannot read {api_key_file!r}: {exc}") from exc
            if not key:
                raise MTBenchError(f"dpo option judge_api_key_file: {api_key_file!r} is empty")
            return key
        key = os.environ.get(variable)
        if not key and self.url is None:
            raise MTBenchError(
                f"the MT-Bench judge {self.spec!r} needs an API key: set {variable} for the driver (it "
                "judges; no evaluation worker sees the key), or pass --fitness-opt judge_api_key_file=PATH "
                "(or name a local server as judge=openai:MODEL@URL)")
        return key

    def _client_for_calls(self):
        if self._client is None:
            if self.provider == "openai":
                import openai

                self._client = openai.OpenAI(api_key=self._key or "not-needed", base_url=self.url,
                                             timeout=self.timeout, max_retries=self.retries)
            else:
                import anthropic

                url = self.url[:-3] if self.url and self.url.endswith("/v1") else self.url
                self._client = anthropic.Anthropic(api_key=self._key or "not-needed", base_url=url,
                                                   timeout=self.timeout, max_retries=self.retries)
        return self._client

    def _cache_path(self, system: str, user: str, repeat: int, attempt: int) -> Path:
        text = json.dumps([self.provider, self.model, self.url, system, user, self.temperature, self.max_tokens,
                           repeat, attempt])
        key = hashlib.sha256(text.encode()).hexdigest()
        return self.cache_folder / key[:2] / f"{key}.json"

    def judge(self, system: str, user: str, repeat: int = 0, attempt: int = 0) -> str:
        """The judge's reply (from the cache when this exact request was made before)."""
        path = self._cache_path(system, user, repeat, attempt)
        try:
            reply = json.loads(path.read_text())["reply"]
            self.cached += 1
            return reply
        except (OSError, ValueError, KeyError, TypeError):
            pass
        reply = self._call(system, user)
        self.calls += 1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
            with os.fdopen(handle, "w") as stream:
                json.dump({"judge": self.spec, "system": system, "user": user, "reply": reply}, stream)
            os.replace(temporary, path)
        except OSError as exc:
            import warnings

            warnings.warn(f"cannot write the judge cache {path}: {exc}", stacklevel=2)
        return reply

    def _call(self, system: str, user: str) -> str:
        client = self._client_for_calls()
        where = self.url or ("https://api.openai.com/v1" if self.provider == "openai" else "https://api.anthropic.com")
        try:
            if self.provider == "openai":
                response = client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                    temperature=self.temperature, max_tokens=self.max_tokens, n=1)
                if not response.choices:
                    raise MTBenchError(f"judge {self.spec} returned no choices")
                return response.choices[0].message.content or ""
            arguments: dict[str, Any] = {"model": self.model, "system": system, "max_tokens": self.max_tokens,
                                         "messages": [{"role": "user", "content": user}]}
            # anthropic 2.x dropped sampling parameters from Messages; send temperature where it is taken.
            if "temperature" in inspect.signature(client.messages.create).parameters:
                arguments["temperature"] = min(self.temperature, 1.0)
            response = client.messages.create(**arguments)
            return "".join(getattr(block, "text", "") for block in response.content)
        except MTBenchError:
            raise
        except Exception as exc:
            raise MTBenchError(f"the MT-Bench judge {self.spec} at {where} failed after {self.retries} retries: "
                               f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def judge_messages(question: Question, answers: tuple[str, str], turn: int,
                   reference: tuple[str, str] | None) -> tuple[str, str]:
    """FastChat's (system, user) judge messages for one turn (1 or 2) of one question."""
    needs_reference = question.category in NEED_REF_CATS and reference is not None
    name = ("single-math-v1" if needs_reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
    template = JUDGE_PROMPTS[name]
    fields = {"question": question.turns[0], "answer": answers[0], "question_1": question.turns[0],
              "question_2": question.turns[1], "answer_1": answers[0], "answer_2": answers[1]}
    if needs_reference:
        fields.update(ref_answer_1=reference[0], ref_answer_2=reference[1])
    return template["system"], template["user"].format(**fields)


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def grade(judge: Judge, questions: list[Question], answers: dict[Any, tuple[str, str]],
          references: dict[Any, tuple[str, str]], *, repeats: int = 1, parse_retries: int = 2) -> dict[str, Any]:
    """Judge every answer; turn means, standard errors and per-category means.

    Raises:
        MTBenchError: when no answer got a rating (a judge that never follows the format).
    """
    scores: dict[int, list[float]] = {1: [], 2: []}
    by_category: dict[str, list[float]] = {}
    unparsed = 0
    calls_before, cached_before = judge.calls, judge.cached
    for question in questions:
        reference = references.get(question.question_id, question.reference)
        for turn in (1, 2):
            system, user = judge_messages(question, answers[question.question_id], turn, reference)
            ratings = []
            for repeat in range(repeats):
                rating = None
                for attempt in range(parse_retries + 1):
                    rating = parse_rating(judge.judge(system, user, repeat, attempt))
                    if rating is not None:
                        break
                if rating is None:
                    unparsed += 1
                else:
                    ratings.append(rating)
            if ratings:
                score = sum(ratings) / len(ratings)
                scores[turn].append(score)
                by_category.setdefault(question.category, []).append(score)
    if not scores[1] and not scores[2]:
        raise MTBenchError(f"the judge {judge.spec} gave no parseable [[rating]] for any of the "
                           f"{2 * len(questions)} answers")
    turn1, turn1_error = _mean_and_error(scores[1])
    turn2, turn2_error = _mean_and_error(scores[2])
    overall, overall_error = _mean_and_error(scores[1] + scores[2])
    return {
        "mtbench_score": overall, "mtbench_stderr": overall_error,
        "mtbench_turn1": turn1, "mtbench_turn1_stderr": turn1_error,
        "mtbench_turn2": turn2, "mtbench_turn2_stderr": turn2_error,
        "mtbench_categories": {k: sum(v) / len(v) for k, v in sorted(by_category.items())},
        "mtbench_questions": len(questions), "mtbench_rated_turns": len(scores[1]) + len(scores[2]),
        "mtbench_unparsed_judgments": unparsed,
        "judge_calls": judge.calls - calls_before, "judge_cached": judge.cached - cached_before,
    }
