"""One evaluation's two phases in one process, artefact validation and bounded error text."""
from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from engine.evaluation import bounded_error, run_candidate, short_error
from engine.genome import GenomeError, compile_genome
from fitness.base import (ArtefactError, Fitness, HeldOut, Score, TensorSpec, UnprotectedFitnessWarning,
                          artefacts_from_bytes, artefacts_to_bytes, is_protected, validate_artefacts)
from fitness.preference import PreferenceInterface, preference_seeds
from fitness.synthetic_pref import SyntheticPreference

DPO = next(seed.code for seed in preference_seeds() if seed.name == "dpo")
SPEC = {"theta": TensorSpec((2, 3), torch.float32), "steps": TensorSpec((), torch.int64)}


def good():
    return {"theta": torch.randn(2, 3), "steps": torch.tensor(5)}


# -- artefacts ------------------------------------------------------------------------------------
def test_valid_artefacts_survive_the_round_trip_through_safetensors_bytes():
    artefacts = good()
    loaded = artefacts_from_bytes(artefacts_to_bytes(artefacts), SPEC, 1 << 20)
    assert set(loaded) == set(SPEC)
    assert torch.equal(loaded["theta"], artefacts["theta"]) and int(loaded["steps"]) == 5


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("steps"), "missing \\['steps'\\]"),
    (lambda a: a.update(extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
    (lambda a: a.update(theta=torch.zeros(3, 2)), "expected torch.float32 \\(2, 3\\)"),
    (lambda a: a.update(theta=torch.zeros(2, 3, dtype=torch.float64)), "torch.float64"),
    (lambda a: a.update(theta=torch.full((2, 3), float("nan"))), "non-finite"),
    (lambda a: a.update(theta=[[0.0] * 3] * 2), "not a torch.Tensor"),
])
def test_artefacts_that_differ_from_the_spec_are_rejected_naming_what_is_wrong(change, message):
    artefacts = good()
    change(artefacts)
    with pytest.raises(ArtefactError, match=message):
        validate_artefacts(artefacts, SPEC, 1 << 20)


def test_artefacts_over_the_size_cap_are_rejected():
    with pytest.raises(ArtefactError, match="size cap of 16 bytes"):
        validate_artefacts(good(), SPEC, 16)
    with pytest.raises(ArtefactError, match="size cap"):
        artefacts_from_bytes(b"\0" * (2 << 20), SPEC, 1 << 10)


def test_bytes_that_are_not_safetensors_are_rejected_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for data in (b"garbage", pickle.dumps(Exploit()), pickle.dumps(good())):
        with pytest.raises(ArtefactError, match="not valid safetensors"):
            artefacts_from_bytes(data, SPEC, 1 << 20)
    assert not marker.exists()


def test_a_parameter_or_tensor_subclass_becomes_a_plain_tensor():
    artefacts = {"theta": torch.nn.Parameter(torch.randn(2, 3)), "steps": torch.tensor(1)}
    checked = validate_artefacts(artefacts, SPEC, 1 << 20)
    assert type(checked["theta"]) is torch.Tensor and not checked["theta"].requires_grad


# -- held-out data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Truth:
    reward: torch.Tensor
    table: np.ndarray
    nested: dict


def test_wiping_held_out_data_zeroes_every_tensor_and_array_and_forgets_them():
    reward, table, deep = torch.ones(4), np.ones(3), torch.ones(2, 2)
    store = HeldOut(capacity=1)
    store.put(0, Truth(reward, table, {"deep": [deep]}))
    assert store.get(0, lambda: None).reward is reward
    store.wipe()
    assert float(reward.sum()) == 0 and float(table.sum()) == 0 and float(deep.sum()) == 0
    assert 0 not in store
    with pytest.raises(RuntimeError, match="not available in a genome's process"):
        store.get(0, lambda: 1)


def test_wiping_a_held_out_slice_zeroes_all_it_keeps_alive():
    """A slice that is a view of a larger tensor keeps all of it in memory (the reward on the
    training prompts beside the held-out ones); an array view keeps its base."""
    whole, table = torch.arange(1.0, 13.0).reshape(3, 4), np.arange(1.0, 7.0)
    store = HeldOut()
    store.put(0, Truth(whole[2:], table[3:], {}))
    store.wipe()
    assert float(whole.abs().sum()) == 0 and float(np.abs(table).sum()) == 0


@pytest.mark.parametrize("make", [
    lambda: SyntheticPreference(instances=1, pairs=64, eval_prompts=8).score_problem(0),
    lambda: SyntheticPreference(instances=2, pairs=64, eval_prompts=8).score_problem(0),
    lambda: __import__("fitness.suites.pref_suite", fromlist=["x"]).PreferenceSuite().truth(
        *next((task, 0) for task in __import__("fitness.suites.pref_suite", fromlist=["x"]).PreferenceSuite()
              .tasks_for(0) if task.spec.policy != "tabular")),
], ids=["synthetic-pref-1", "synthetic-pref-2", "pref-suite"])
def test_every_held_out_tensor_owns_its_storage(make):
    """What the held-out store keeps is all there is of it: no tensor in it is a view of one
    holding more (sent pickled from the builder, a view carries its whole storage)."""
    import dataclasses

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                yield from tensors(getattr(value, field.name))

    found = list(tensors(make()))
    assert found
    for tensor in found:
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), tensor.shape


def test_held_out_keeps_only_the_most_recent_values():
    store = HeldOut(capacity=2)
    for key in range(3):
        store.put(key, key)
    assert 0 not in store and 1 in store and 2 in store
    assert store.get(5, lambda: "made") == "made"


# -- both phases in one process (serial executor) ---------------------------------------------------
SMALL = {"instances": 2, "steps": 15, "pairs": 128, "eval_prompts": 16}


def test_run_candidate_trains_then_scores_with_the_same_result_as_evaluate():
    fitness = SyntheticPreference(**SMALL)
    result = run_candidate(fitness, 3, DPO, seed=0)
    assert result.ok, result.error
    expected = fitness.evaluate(compile_genome(DPO, PreferenceInterface.arg_counts), 0)
    assert result.fitness == expected.fitness and "unprotected" not in result.metrics
    assert is_protected(fitness)


def test_a_plugin_of_the_first_contract_is_unprotected_and_says_so():
    with pytest.warns(UnprotectedFitnessWarning, match="implements only evaluate"):
        class OldStyle(SyntheticPreference):
            def evaluate(self, fn, seed):
                return Score(0.5)

    assert not is_protected(OldStyle) and is_protected(SyntheticPreference)
    result = run_candidate(OldStyle(**SMALL), 0, DPO, seed=0)
    assert result.ok and result.fitness == 0.5 and result.metrics == {"unprotected": True}


def test_train_that_returns_artefacts_not_in_the_spec_is_an_error():
    class Sloppy(SyntheticPreference):
        def train(self, fn, seed):
            return {"theta": torch.zeros(1)}

    result = run_candidate(Sloppy(**SMALL), 0, DPO, seed=0)
    assert result.status == "error" and "artefact 'theta'" in result.error


def test_the_base_class_names_what_a_plugin_forgot():
    class Partial(Fitness):
        name = "partial"
        interface = PreferenceInterface()

        def seeds(self):
            return []

        def train(self, fn, seed):
            return {}

    with pytest.raises(NotImplementedError, match="artefact_spec"):
        Partial().evaluate(lambda *a: None, 0)


# -- error text ----------------------------------------------------------------------------------------
def test_bounded_error_keeps_one_short_line_without_paths_or_control_characters():
    text = "first /home/user/.ssh/id_rsa here\x1b[31m\nsecond line secret\n" + "x" * 1000
    bounded = bounded_error(text)
    assert bounded.startswith("first <path> here") and "secret" not in bounded and "\x1b" not in bounded
    assert "\n" not in bounded and len(bounded) <= 300
    assert len(bounded_error("y" * 5000)) == 300


def test_short_error_gives_status_type_first_line_and_the_genomes_line():
    fn = compile_genome("def f(a, b):\n    x = a\n    raise ValueError('bad\\nsecret')\n", (2,))
    with pytest.raises(ValueError) as caught:
        fn(torch.zeros(1), torch.zeros(1))
    status, message = short_error(caught.value)
    assert status == "error" and message.startswith("ValueError: bad") and "secret" not in message
    assert message.endswith("(genome line 3)")
    assert short_error(GenomeError("returned a scalar", status="invalid")) == ("invalid", "returned a scalar")
    assert short_error(MemoryError())[0] == "oom"
