"""What the trusted phase computes on is not in a genome's memory.

A genome's process is a fork of the warm worker, which built the problem (true reward,
held-out prompts, the oracle) and scored the last genome. The plug-in's held-out store is
wiped in the child, but the temporaries that built it were freed, not cleared, and freed memory
is still readable by the process that inherits it: a plain-Python genome (the static check off)
that scanned its own memory found the held-out true reward of its evaluation seed, in every
place looked for. The warm worker now has glibc overwrite what it frees
(:func:`engine.worker.scrub_freed_memory`).

The probe looks for runs of four consecutive values of the held-out data and for single values
that normalise the score, and, as a control that the scan sees what the worker left, for runs of
the training data it was given, which must be found.
"""
from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from engine import worker
from tests.conftest import available_sandboxes
from tests.engine.test_attacks_jail import DPO_GENOME, run_genomes

SCAN = '''
import torch

NEEDLES = {needles!r}


def _scan():
    import json
    with open("/proc/self/maps") as maps:
        lines = maps.read().splitlines()
    hits = {{name: 0 for name in NEEDLES}}
    with open("/proc/self/mem", "rb", 0) as memory:
        for line in lines:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or (len(fields) > 5 and (fields[5].startswith("/") or fields[5] in ("[vvar]", "[vsyscall]"))):
                continue
            try:
                memory.seek(low)
                data = bytearray(memory.read(high - low))
            except (OSError, OverflowError, ValueError):
                continue
            if len(data) % 8:
                continue
            words = torch.frombuffer(data, dtype=torch.int32)
            for name, (step, runs) in NEEDLES.items():
                for run in runs:
                    for i in torch.nonzero(words == run[0]).view(-1).tolist():
                        if i % step or i + len(run) > words.numel():
                            continue
                        if all(words[i + j].item() == v for j, v in enumerate(run)):
                            hits[name] += 1
            del words, data
    raise ValueError("SCAN " + json.dumps(hits))


_scan()


def dpo(a, b, c, d):
    return a - b
'''


def _words(values: torch.Tensor) -> list[int]:
    """``values`` as the 32-bit words of its bytes (signed). The probe holds its needles as Python
    ints and compares 32-bit words: it makes no float of its own, whose bytes would be found (a
    copy of the needle), and reuses no freed float (which would overwrite the evidence)."""
    data = values.detach().contiguous().view(-1).numpy().tobytes()
    return list(struct.unpack(f"<{len(data) // 4}i", data))


def _runs(tensor: torch.Tensor, length: int = 4) -> list[list[int]]:
    """Runs of ``length`` consecutive values at four places in ``tensor`` (as 32-bit words); none
    all zero (a wiped tensor is zeros) and none repeating one value."""
    flat = tensor.detach().contiguous().view(-1)
    runs = []
    for start in (0, flat.numel() // 3, flat.numel() // 2, flat.numel() - length):
        run = flat[start:start + length]
        if len(run) == length and len(set(run.tolist())) == length and bool((run != 0).any()):
            runs.append(_words(run))
    assert runs
    return runs


def _alone(value) -> list[int]:
    """One float64 as its two 32-bit words."""
    return _words(torch.as_tensor(value, dtype=torch.float64).reshape(1))


def synthetic_pref_needles(seed: int) -> dict:
    from fitness.synthetic_pref import SyntheticPreference

    fitness = SyntheticPreference()
    held = fitness.score_problem(seed)
    return {"eval_reward": (2, _runs(held.eval_reward)),  # (float64: two words from an even word, runs)
            "eval_reference": (2, _runs(held.eval_reference_logits)),
            "oracle_gain": (2, [_alone(value) for value in held.oracle_gain]),
            "training (control)": (1, _runs(fitness.train_problem(seed).pair_reference))}


def pref_suite_needles(seed: int) -> dict:
    from fitness.suites.pref_suite import PreferenceSuite

    fitness = PreferenceSuite()
    tasks = [(task, s) for s in fitness.evaluation_seeds(seed) for task in fitness.tasks_for(s)][:3]
    truths = [fitness.truth(task, s) for task, s in tasks]
    return {"reward": (2, [run for truth in truths for run in _runs(truth.reward)]),
            "eval_reference": (2, [run for truth in truths for run in _runs(truth.reference_logits)]),
            # What normalises each task's score: the reference's and the oracle's values.
            "values": (2, [_alone(value) for truth in truths for value in (truth.reference_value, truth.oracle_value)]),
            "training (control)": (1, [run for task, s in tasks
                                       for run in _runs(fitness.training_data(task, s).reference_logits)])}


def scan_after_one_genome(tmp_path, sandbox: str, fitness: str, needles: dict) -> dict:
    """Score DPO, then scan the next genome's process (same warm worker, seed 0)."""
    (first, probe), restarts, _ = run_genomes(tmp_path, sandbox, DPO_GENOME, SCAN.format(needles=needles),
                                              fitness=fitness)
    assert first.ok, first.error
    found = re.search(r"SCAN (\{.*\})", probe.error or "")
    assert found, probe.error
    return json.loads(found.group(1))


@pytest.mark.parametrize("sandbox", available_sandboxes())
@pytest.mark.parametrize("fitness, needles", [("synthetic-pref", synthetic_pref_needles),
                                              ("pref-suite", pref_suite_needles)])
def test_a_genome_finds_no_held_out_value_in_its_memory(tmp_path, sandbox, fitness, needles):
    hits = scan_after_one_genome(tmp_path, sandbox, fitness, needles(0))
    assert hits.pop("training (control)") > 0  # the scan does see what the warm worker holds
    assert hits == {name: 0 for name in hits}, hits


@pytest.mark.parametrize("sandbox", available_sandboxes())
@pytest.mark.parametrize("fitness, needles", [("synthetic-pref", synthetic_pref_needles),
                                              ("pref-suite", pref_suite_needles)])
def test_a_keyed_problem_sent_back_by_its_builder_leaves_no_held_out_value(tmp_path, monkeypatch, sandbox, fitness,
                                                                            needles):
    """With a truth key the problem is built in a child of the warm worker and sent back
    pickled: neither what carried it nor what unpickling made on the way is left in memory."""
    import os

    from fitness import truth

    truth.write_key(tmp_path / "truth.key", os.urandom(32))
    monkeypatch.setenv(truth.ENV, str(tmp_path / "truth.key"))
    hits = scan_after_one_genome(tmp_path, sandbox, fitness, needles(0))
    assert hits.pop("training (control)") > 0
    assert hits == {name: 0 for name in hits}, hits


SMALL_TEMPORARY = """
import torch
from fitness.synthetic_pref import SyntheticPreference


class Plugin(SyntheticPreference):
    name = "small-temporary"

    def prepare(self, seed):
        super().prepare(seed)
        # Trusted scoring's small temporaries: 32 doubles (256 bytes), made and freed.
        temporary = torch.arange(32, dtype=torch.float64) * 3.14159 + 0.271828
        del temporary
"""


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_small_blocks_the_warm_worker_freed_are_overwritten_too(tmp_path, sandbox, write_plugin):
    """glibc's per-thread cache takes freed blocks up to about 1 KiB without the overwrite; the
    warm worker runs without it (a reviewer's genome found per-prompt expected rewards of
    pref-suite's baseline scoring there)."""
    spec = write_plugin(SMALL_TEMPORARY)
    small = torch.arange(32, dtype=torch.float64) * 3.14159 + 0.271828
    needles = {"small temporary": (2, _runs(small)),
               "training (control)": synthetic_pref_needles(0)["training (control)"]}
    hits = scan_after_one_genome(tmp_path, sandbox, spec, needles)
    assert hits.pop("training (control)") > 0
    assert hits == {"small temporary": 0}, hits


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_the_last_genomes_scores_and_the_baselines_are_not_in_the_next_genomes_memory(tmp_path, sandbox):
    """Scoring a genome makes Python floats in the warm worker: its score and the baseline's on
    every task, which say something of the truth. A reviewer's genome found them there, after
    the previous genome, by their task names, and used the baseline's to choose where to stay at
    the reference (+0.0075). Python's own allocator and its free list of floats keep freed floats
    as they were; workers run with Python's debug allocator, which overwrites what it frees, and
    empty the free list before each genome's process is forked."""
    from fitness.suites.pref_suite import PreferenceSuite

    suite = PreferenceSuite()
    baselines = [suite.baseline_score(task, s) for s in suite.evaluation_seeds(0) for task in suite.tasks_for(s)]
    needles = {"baseline scores": (2, [_alone(value) for value in baselines]),
               "training (control)": pref_suite_needles(0)["training (control)"]}
    hits = scan_after_one_genome(tmp_path, sandbox, "pref-suite", needles)
    assert hits.pop("training (control)") > 0
    assert hits == {"baseline scores": 0}, hits


def test_scrubbing_freed_memory_can_be_turned_on_and_off_here():
    assert worker.scrub_freed_memory(True) is True
    assert worker.scrub_freed_memory(False) is True
