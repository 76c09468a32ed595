"""The truth key: a generated problem's truth is not a public function of its seed.

A genome that gets past the static check can import a plug-in and call its own problem builder.
With public problems (``--truth-key public``) that rebuilds, bit for bit, the problem the genome
is being trained on, true reward and test split included. With a key, the builder needs the key,
which only a child of the warm worker reads, and which every genome's process has covered.
"""
from __future__ import annotations

import json
import os
import re
import stat
import struct

import pytest
import torch

from engine.cli import main
from engine.doctor import rebuilder
from fitness import truth
from tests.conftest import available_sandboxes

DPO = '''def dpo(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    return -F.logsigmoid(self.beta * logits)
'''

# -- the key itself ---------------------------------------------------------------------------
def test_public_draws_are_torchs_and_keyed_ones_depend_on_the_key(tmp_path, monkeypatch):
    public, generator = truth.draws(12345), torch.Generator().manual_seed(12345)
    assert isinstance(public, truth.PublicDraws)  # no key: torch's generator, so public scores never changed
    assert torch.equal(public.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, generator=generator, dtype=torch.float64))
    assert torch.equal(public.randint(5, (7,)), torch.randint(5, (7,), generator=generator))
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    truth.write_key(first, os.urandom(32))
    truth.write_key(second, os.urandom(32))
    monkeypatch.setenv(truth.ENV, str(first))
    keyed = truth.draws(12345)
    assert isinstance(keyed, truth.KeyedDraws)
    values = keyed.randn(1000, dtype=torch.float64)
    assert torch.equal(values, truth.draws(12345).randn(1000, dtype=torch.float64))  # reproducible for the key
    assert not torch.equal(values, truth.draws(12346).randn(1000, dtype=torch.float64))
    monkeypatch.setenv(truth.ENV, str(second))
    assert not torch.equal(values, truth.draws(12345).randn(1000, dtype=torch.float64))


def test_keyed_draws_have_the_distributions_and_shapes_asked_for(tmp_path, monkeypatch):
    truth.write_key(tmp_path / "k.key", os.urandom(32))
    monkeypatch.setenv(truth.ENV, str(tmp_path / "k.key"))
    random = truth.draws(0)
    normal = random.randn(200_000, dtype=torch.float64)
    assert abs(float(normal.mean())) < 0.01 and abs(float(normal.std()) - 1) < 0.01
    assert abs(float((normal.abs() < 1.96).double().mean()) - 0.95) < 0.005
    assert random.randn(2, 3).shape == (2, 3) and random.randn(2, 3).dtype == torch.float32
    for dtype in (torch.float32, torch.float64):
        uniform = random.rand(100_000, dtype=dtype)
        assert uniform.dtype == dtype and float(uniform.min()) >= 0 and float(uniform.max()) < 1
        assert abs(float(uniform.mean()) - 0.5) < 0.01
    integers = random.randint(3, 8, (4, 10_000))
    assert integers.shape == (4, 10_000) and integers.dtype == torch.int64
    assert set(integers.unique().tolist()) == set(range(3, 8))
    assert sorted(random.randperm(50).tolist()) == list(range(50))
    # A stream's successive calls differ (a counter in every call).
    assert not torch.equal(random.rand(10, dtype=torch.float64), random.rand(10, dtype=torch.float64))


def test_machine_key_is_made_once_for_its_owner_and_runs_keep_a_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    path = truth.resolve("machine")
    assert path == (tmp_path / "data" / "evoloss" / "truth.key").resolve()
    assert len(path.read_bytes()) == truth.KEY_BYTES and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert truth.resolve("machine").read_bytes() == path.read_bytes()  # made once
    assert truth.resolve("public") is None and truth.key_id(None) == "public"
    run = tmp_path / "run"
    run.mkdir()
    truth.keep_in_run(path, run)
    copy = run / truth.RUN_KEY_NAME
    assert copy.read_bytes() == path.read_bytes() and stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert truth.resolve("machine", run) == copy.resolve()  # a run resumes with its own copy
    assert truth.key_id(copy) == truth.key_id(path) != "public" and path.read_bytes().hex() not in truth.key_id(path)
    with pytest.raises(truth.TruthKeyError, match="cannot be read"):
        truth.resolve(str(tmp_path / "missing.key"))
    (tmp_path / "a-file").write_text("")  # no folder can be made below it, not even by root
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "a-file" / "data"))
    with pytest.raises(truth.TruthKeyError, match="cannot make"):
        truth.resolve("machine")
    (tmp_path / "short.key").write_bytes(b"")
    with pytest.raises(truth.TruthKeyError, match="0 bytes"):
        truth.resolve(str(tmp_path / "short.key"))


def test_in_a_warm_worker_only_the_builder_child_reads_the_key(tmp_path, monkeypatch):
    key = tmp_path / "k.key"
    truth.write_key(key, os.urandom(32))
    monkeypatch.setenv(truth.ENV, str(key))
    expected = truth.draws(7).randn(5)
    monkeypatch.setattr(truth, "_forks_genomes", True)
    with pytest.raises(truth.TruthKeyError, match="build_secretly"):
        truth.draws(7)
    parent = os.getpid()
    values, elsewhere = truth.build_secretly(lambda s: (truth.draws(s).randn(5), os.getpid() != parent), 7)
    assert torch.equal(values, expected) and elsewhere

    def broken(_):
        raise ValueError("bad option")

    with pytest.raises(ValueError, match="bad option"):
        truth.build_secretly(broken, 7)


def test_a_keyed_problem_scores_the_same_for_its_key_and_differently_from_the_public_one(tmp_path, monkeypatch):
    from engine.genome import compile_genome
    from fitness.preference import PreferenceInterface
    from fitness.synthetic_pref import SyntheticPreference

    dpo = compile_genome(DPO, PreferenceInterface.arg_counts)

    def score() -> float:
        return SyntheticPreference(instances=2, steps=20, pairs=128).evaluate(dpo, 3).fitness

    public = score()
    key = tmp_path / "k.key"
    truth.write_key(key, os.urandom(32))
    monkeypatch.setenv(truth.ENV, str(key))
    keyed = score()
    assert keyed == score() != public


# -- through a real jailed worker ----------------------------------------------------------------
def _rebuild_through_evaluate(tmp_path, capsys, sandbox: str, fitness: str, key: str) -> dict:
    code = tmp_path / "rebuild.py"
    code.write_text(rebuilder("classification" if fitness == "cls-suite" else "preference"))
    main(["evaluate", "--code", str(code), "--fitness", fitness, "--jail-only", "--sandbox", sandbox, "--json",
          "--timeout", "120", "--truth-key", key])
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    error = payload["error"] or ""
    assert "REBUILT=" in error, payload
    rebuilt = error.split("REBUILT=", 1)[1].split(" ", 1)[0]
    notes = error.split("NOTES=", 1)[1].split(" ", 1)[0] if "NOTES=" in error else ""
    return {"rebuilt": [r for r in rebuilt.split(",") if r], "notes": dict(n.split(":", 1) for n in notes.split(",") if ":" in n),
            "truth_key": payload["truth_key"]}


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", available_sandboxes())
@pytest.mark.parametrize("fitness", ["synthetic-pref", "pref-suite", "cls-suite"])
def test_a_genome_past_the_static_check_cannot_rebuild_its_keyed_problem(tmp_path, capsys, sandbox, fitness):
    keyed = _rebuild_through_evaluate(tmp_path, capsys, sandbox, fitness, "machine")
    assert keyed["rebuilt"] == [], keyed
    assert keyed["truth_key"] != "public"
    notes = keyed["notes"]
    assert notes["d"] == notes["f"] == "TKE", keyed  # direct, or as if in the builder: TruthKeyError
    assert notes["k"] == "0B"  # the key file is covered in the genome's process
    assert notes["i"] in ("PE", "FNFE") and notes["w"] in ("PE", "FNFE")  # no way round through /proc/*/root
    if fitness == "cls-suite":
        assert not notes["g"].isdigit()  # every digit's label is in that file
    # The control: the same genome with public problems rebuilds its problem exactly.
    public = _rebuild_through_evaluate(tmp_path, capsys, sandbox, fitness, "public")
    assert "d" in public["rebuilt"] and public["truth_key"] == "public"


@pytest.mark.parametrize("sandbox", available_sandboxes())
def test_no_key_or_keyed_digest_is_in_a_genomes_memory(tmp_path, monkeypatch, sandbox):
    """The warm worker never reads the key: the child that builds each problem does. So a
    genome's memory (a copy of the warm worker's) holds neither the key nor the keyed digest
    its problem's numbers were drawn from."""
    import hashlib

    from tests.engine.test_truth_in_memory import scan_after_one_genome, synthetic_pref_needles

    key = tmp_path / "k.key"
    secret = os.urandom(32)
    truth.write_key(key, secret)
    monkeypatch.setenv(truth.ENV, str(key))
    digest = hashlib.blake2b(b"0", key=secret, digest_size=32, person=b"evoloss truth").digest()
    assert digest == truth.draws(0)._digest
    needles = {"key": (1, [list(struct.unpack("<8i", secret))[i:i + 4] for i in (0, 4)]),
               "keyed digest": (1, [list(struct.unpack("<8i", digest))[i:i + 4] for i in (0, 4)]),
               "training (control)": synthetic_pref_needles(0)["training (control)"]}
    hits = scan_after_one_genome(tmp_path, sandbox, "synthetic-pref", needles)
    assert hits.pop("training (control)") > 0
    assert hits == {"key": 0, "keyed digest": 0}, hits


@pytest.mark.slow
def test_a_genome_that_solves_for_the_generators_state_wins_only_on_public_problems(tmp_path, capsys):
    """Mersenne Twister's state follows from the low bits of its outputs (the pair indices): a
    genome that solves for it rebuilds a public problem and nears the oracle; a keyed problem's
    numbers come from a cryptographic stream, and the same genome gets nowhere."""
    from tests.conftest import FIXTURES

    code = FIXTURES / "mersenne_attack.py"
    scores = {}
    for key in ("public", "machine"):
        main(["evaluate", "--code", str(code), "--fitness", "synthetic-pref", "--jail-only", "--sandbox",
              available_sandboxes()[0], "--json", "--timeout", "300", "--truth-key", key])
        scores[key] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["public"]["status"] == "ok" and scores["public"]["fitness"] > 0.9, scores["public"]  # DPO: 0.56
    assert scores["machine"]["status"] == "error" and "ATTACK FAILED" in scores["machine"]["error"], scores["machine"]


SUITE_PEEK = '''def peek(PARAMS):
    import gc, sys
    import torch
    frame, plugin, task, seed = sys._getframe(1), None, None, None
    while frame is not None:
        if "task" in frame.f_locals and "seed" in frame.f_locals and hasattr(frame.f_locals.get("self"), "tasks_for"):
            plugin, task, seed = frame.f_locals["self"], frame.f_locals["task"], frame.f_locals["seed"]
            break
        frame = frame.f_back
    if plugin is None:
        return FALLBACK
    seen = []
    try:
        seen.append("baseline:%r" % plugin.baseline_score(task, seed))
    except Exception as exc:
        seen.append("baseline:" + type(exc).__name__)
    if hasattr(plugin, "digits_half"):
        try:
            seen.append("digits:%d" % len(plugin.digits_half("train")[1]))
        except Exception as exc:
            seen.append("digits:" + type(exc).__name__)
        whole = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.numel() == 1797]
        seen.append("kept:%d" % len(whole))
    raise RuntimeError("PEEK " + " ".join(seen))
'''


@pytest.mark.slow
@pytest.mark.parametrize("fitness", ["pref-suite", "cls-suite"])
@pytest.mark.parametrize("key", ["machine", "public"])
def test_a_suites_genome_finds_no_baseline_score_and_no_digits(tmp_path, capsys, fitness, key):
    """What DPO (or cross-entropy) scored on a task is computed on its truth: kept with the
    held-out data, wiped in a genome's process. The digits data labels the test rows: never kept
    in the warm worker, its file covered, with or without a key."""
    if fitness == "cls-suite":
        params, fallback = "logits, targets", "torch.nn.functional.cross_entropy(logits, targets, reduction='none')"
    else:
        params, fallback = "self, a, b, c, d", "-torch.nn.functional.logsigmoid(self.beta * ((a - b) - (c - d)))"
    code = tmp_path / "peek.py"
    code.write_text(SUITE_PEEK.replace("PARAMS", params).replace("FALLBACK", fallback))
    main(["evaluate", "--code", str(code), "--fitness", fitness, "--jail-only", "--sandbox", available_sandboxes()[0],
          "--json", "--timeout", "120", "--truth-key", key])
    error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"] or ""
    seen = dict(re.findall(r"(baseline|digits|kept):(\S+)", error))
    assert seen["baseline"] == "RuntimeError", error  # "not available in a genome's process"
    if fitness == "cls-suite":
        assert not seen["digits"].isdigit() and seen["kept"] == "0", error
