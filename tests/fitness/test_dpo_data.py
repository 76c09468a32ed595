"""The ``dpo`` plug-in's preference-data loading: local files, chat formats, errors naming the
row and column, and the tiny task's pairs (no training here)."""
from __future__ import annotations

import json

import pytest

from fitness.dpo import DPOFitness, DPOSettings
from fitness.dpo.data import DataError, load_preference_data, normalise
from fitness.dpo.settings import resolve_settings

ROWS = [{"prompt": f"Review {i}:", "chosen": f" great film {i}", "rejected": f" bad film {i}"} for i in range(12)]


def _settings(dataset: str, **extra) -> DPOSettings:
    return resolve_settings("tiny", {"dataset": dataset, "heldout_size": 4, **extra})


# -- data ------------------------------------------------------------------------------------------
def test_local_jsonl_json_and_parquet_give_the_same_pairs(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet files need pyarrow (the analysis or dpo extra)")
    pq = pytest.importorskip("pyarrow.parquet")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps(ROWS))
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    loaded = [load_preference_data(_settings(str(p))) for p in (jsonl, as_json, parquet)]
    for data in loaded:
        assert len(data.train) == 8 and len(data.heldout) == 4 and not data.conversational
        assert sorted(r["prompt"] for r in data.train + data.heldout) == sorted(r["prompt"] for r in ROWS)
    assert loaded[0].train == loaded[1].train == loaded[2].train  # the same seeded split


def test_train_size_subsamples_and_heldout_is_disjoint(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    data = load_preference_data(_settings(str(path), train_size=3))
    assert len(data.train) == 3
    assert not {r["prompt"] for r in data.train} & {r["prompt"] for r in data.heldout}


def test_chat_messages_and_implicit_prompts_are_accepted():
    user = [{"role": "user", "content": "Hi"}]
    explicit, conversational = normalise([{"prompt": user, "chosen": [{"role": "assistant", "content": "Hello!"}],
                                           "rejected": [{"role": "assistant", "content": "Go away."}]}], "x")
    assert conversational and explicit[0]["prompt"] == user
    implicit, _ = normalise([{"chosen": user + [{"role": "assistant", "content": "Hello!"}],
                              "rejected": user + [{"role": "assistant", "content": "Go away."}], "dataset": "d"}], "x")
    assert implicit == [{"prompt": user, "chosen": [{"role": "assistant", "content": "Hello!"}],
                         "rejected": [{"role": "assistant", "content": "Go away."}]}]


def test_indexed_responses_become_chosen_and_rejected():
    rows, _ = normalise([{"prompt": "p", "responses": ["a", "b"], "chosen": 1, "scores": [0.1, 0.9]}], "x")
    assert rows == [{"prompt": "p", "chosen": "b", "rejected": "a"}]


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "answer": "b"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl.*missing column\(s\) \['rejected'\].*found \['answer', "
                                        r"'chosen', 'prompt'\]"):
        load_preference_data(_settings(str(path)))


def test_bad_values_name_the_row_and_column():
    with pytest.raises(DataError, match="row 1: column 'rejected' must be a string or a list of chat messages"):
        normalise([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": 3}], "d")
    with pytest.raises(DataError, match="mixes plain strings and chat-message lists"):
        normalise([{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}], "d")


def test_unreadable_files_are_reported_with_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="pairs.jsonl' line 2 is not valid JSON"):
        load_preference_data(_settings(str(path)))
    broken = tmp_path / "pairs.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match="cannot read .*pairs.parquet"):
        load_preference_data(_settings(str(broken)))


def test_a_missing_or_unsupported_file_fails_when_the_plugin_is_built(tmp_path):
    with pytest.raises(DataError, match="file .*nowhere.jsonl' not found"):
        DPOFitness(dataset=str(tmp_path / "nowhere.jsonl"))
    other = tmp_path / "pairs.csv"
    other.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="not a .json, .jsonl or .parquet file"):
        DPOFitness(dataset=str(other))


def test_tiny_parity_pairs_follow_the_rule_and_are_deterministic():
    data = load_preference_data(resolve_settings("tiny", {}))
    assert (len(data.train), len(data.heldout)) == (256, 128) and data.conversational
    for row in data.train + data.heldout:
        wanted = 1 if "odd" in row["prompt"][0]["content"] else 0
        assert int(row["chosen"][0]["content"]) % 2 == wanted != int(row["rejected"][0]["content"]) % 2
    assert load_preference_data(resolve_settings("tiny", {})).train == data.train
