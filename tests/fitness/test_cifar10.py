"""The ``cifar10`` fitness on a generated folder in the exact on-disk format of the CIFAR-10
python batches (a few hundred images whose classes differ in colour and stripe direction)."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.cli import main
from engine.evaluation import run_candidate
from engine.genome import compile_genome
from engine.plugins import PluginError, load_fitness
from fitness.cifar10 import (
    PRESETS, ClassificationInterface, Cifar10, Cifar10DataMalformed, Cifar10DataMissing,
    classification_descriptors, classification_seeds, find_data_folder, load_cifar10, read_batch,
)
from fitness.cifar10.recipes import augment
from tests.fixtures.cifar10_data import TEST_IMAGES, _write_pickle, write_cifar_folder

torch.set_num_threads(1)

#: A tiny CPU recipe: 300 training images, 100 held out, 2 epochs of 15 steps (about a second).
TINY = {"train_size": 300, "val_size": 100, "batch_size": 20, "epochs": 2, "width": 8}

BLEND = '''def evolved_blend(logits, targets):
    """A hand-written 'evolved' loss: cross-entropy blended with a focal term, plus a small
    penalty on the logit norm."""
    log_p = F.log_softmax(logits, dim=-1)
    target_log_p = log_p.gather(1, targets[:, None]).squeeze(1)
    focal = -(1 - target_log_p.exp()) ** 1.5 * target_log_p
    return 0.7 * -target_log_p + 0.3 * focal + 1e-3 * (logits ** 2).mean(dim=-1)
'''

NAN_AT_TRAINING_BATCH = '''def nan_in_training(logits, targets):
    ce = F.cross_entropy(logits, targets, reduction="none")
    if logits.shape[0] == 20:
        return ce * float("nan")
    return ce
'''


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    written = write_cifar_folder(root)
    return root, written


@pytest.fixture
def data_dir(cifar_root) -> str:
    return str(cifar_root[0])


def tiny(data_dir: str, preset: str = "cpu", **options) -> Cifar10:
    return Cifar10(preset=preset, data_dir=data_dir, **{**TINY, **options})


SEEDS = {seed.name: seed for seed in classification_seeds()}


# -- data -----------------------------------------------------------------------------------
def test_loader_round_trips_the_written_batches(cifar_root):
    root, written = cifar_root
    folder = root / "cifar-10-batches-py"
    for name, (data, labels) in written.items():
        images, read_labels = read_batch(folder / name, classes=10)
        assert images.dtype == np.uint8 and images.shape == (len(labels), 3, 32, 32)
        assert np.array_equal(images.reshape(len(labels), -1), data)
        assert np.array_equal(read_labels, labels)
    # The row layout is 1024 red, 1024 green, 1024 blue values, each 32 x 32 row-major.
    images, _ = read_batch(folder / "data_batch_1", classes=10)
    assert images[0, 1, 2, 3] == written["data_batch_1"][0][0, 1024 + 2 * 32 + 3]


def test_held_out_split_is_balanced_disjoint_and_fixed(cifar_root):
    folder = cifar_root[0] / "cifar-10-batches-py"
    data = load_cifar10(folder, "val", train_size=300, val_size=100)
    again = load_cifar10(folder, "val", train_size=300, val_size=100)
    assert torch.equal(data.eval_images, again.eval_images) and torch.equal(data.train_labels, again.train_labels)
    assert len(data.train_labels) == 300 and len(data.eval_labels) == 100
    counts = torch.bincount(data.eval_labels, minlength=10)
    assert counts.min() >= 7  # balanced up to what the generated classes hold
    train_rows = {bytes(img.numpy().tobytes()) for img in data.train_images}
    assert not any(bytes(img.numpy().tobytes()) in train_rows for img in data.eval_images)
    test = load_cifar10(folder, "test", train_size=300, val_size=100)
    assert len(test.eval_labels) == TEST_IMAGES and torch.equal(test.train_images, data.train_images)
    assert test.class_names[0] == "airplane" and len(test.class_names) == 10


def test_folder_itself_parent_or_environment(cifar_root, monkeypatch):
    root = cifar_root[0]
    assert find_data_folder(root) == find_data_folder(root / "cifar-10-batches-py") == root / "cifar-10-batches-py"
    monkeypatch.setenv("EVOLOSS_DATA", str(root))
    assert Cifar10().folder == root / "cifar-10-batches-py"


@pytest.mark.parametrize("make,fragment", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: tmp, "no CIFAR-10 batches in"),
])
def test_missing_data_says_what_and_where(tmp_path, monkeypatch, make, fragment):
    monkeypatch.delenv("EVOLOSS_DATA", raising=False)
    with pytest.raises(Cifar10DataMissing, match=fragment) as info:
        Cifar10(data_dir=str(make(tmp_path)))
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert "data_dir" in message and "EVOLOSS_DATA" in message
    with pytest.raises(Cifar10DataMissing, match="not given"):
        Cifar10()


def test_missing_file_and_malformed_files(tmp_path):
    write_cifar_folder(tmp_path, per_batch=20, test_images=20)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(Cifar10DataMissing, match="lacks data_batch_3"):
        Cifar10(data_dir=str(tmp_path))
    # A truncated download: shorter than batches.meta's image count needs.
    (folder / "data_batch_3").write_bytes((folder / "data_batch_2").read_bytes()[:1000])
    with pytest.raises(Cifar10DataMalformed, match="data_batch_3 is 1,000 bytes.*truncated"):
        Cifar10(data_dir=str(tmp_path))
    # Garbage of a plausible size passes the cheap check and is caught when the images are read.
    (folder / "data_batch_3").write_bytes(b"\x80\x02" + bytes(range(256)) * 400)
    fitness = Cifar10(data_dir=str(tmp_path), train_size=40, val_size=20, batch_size=20)
    with pytest.raises(Cifar10DataMalformed, match="data_batch_3 is not a python-version CIFAR-10 batch"):
        fitness.data()
    # A pickle that names anything but numpy arrays is refused, not run.
    (folder / "data_batch_3").write_bytes(pickle.dumps(Path("x"), protocol=2) + bytes(70_000))
    with pytest.raises(Cifar10DataMalformed, match="refers to pathlib"):
        Cifar10(data_dir=str(tmp_path), train_size=40, val_size=20, batch_size=20).data()
    _write_pickle({b"data": np.zeros((20, 100), np.uint8), b"labels": [0] * 20}, folder / "data_batch_3")
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes() + bytes(70_000))
    with pytest.raises(Cifar10DataMalformed, match=r"uint8 array of shape \(N, 3072\)"):
        Cifar10(data_dir=str(tmp_path), train_size=40, val_size=20, batch_size=20).data()


def test_bad_folder_on_the_cli_exits_2_with_the_message(tmp_path, capsys):
    code = tmp_path / "loss.py"
    code.write_text(SEEDS["cross_entropy"].code)
    status = main(["evaluate", "--fitness", "cifar10", "--preset", "cpu", "--fitness-opt",
                   f"data_dir={tmp_path / 'nowhere'}", "--code", str(code), "--executor", "serial"])
    assert status == 2
    error = capsys.readouterr().err
    assert "nowhere" in error and "cifar-10-python.tar.gz" in error


# -- the contract -------------------------------------------------------------------------
def test_seeds_pass_the_interface_check_and_differ():
    interface = ClassificationInterface()
    fingerprints = set()
    for seed in classification_seeds():
        fn = compile_genome(seed.code, interface.arg_counts)
        interface.check(fn)
        fingerprints.add(interface.fingerprint(fn))
    assert len(fingerprints) == len(SEEDS) == 5
    assert set(SEEDS) == {"cross_entropy", "label_smoothing", "focal", "squared_error", "temperature_ce"}


def test_descriptors_ignore_scale_and_separate_the_seeds():
    fns = {name: compile_genome(seed.code, (2,)) for name, seed in SEEDS.items()}
    ce = classification_descriptors(fns["cross_entropy"])
    scaled = classification_descriptors(lambda logits, targets: 5 * fns["cross_entropy"](logits, targets) + 2)
    assert all(math.isclose(ce[k], scaled[k], abs_tol=1e-6) for k in ce)
    values = {name: classification_descriptors(fn) for name, fn in fns.items()}
    assert values["focal"]["correct_push"] < values["cross_entropy"]["correct_push"] < values["label_smoothing"][
        "correct_push"]
    assert values["squared_error"]["wrong_push"] < values["cross_entropy"]["wrong_push"] - 0.5
    assert 0.4 < values["cross_entropy"]["rival_focus"] < 0.6


# -- training -----------------------------------------------------------------------------
def test_augment_translates_and_flips_like_a_crop():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    recipe = PRESETS["cpu"]
    out = augment(images, torch.Generator().manual_seed(5), recipe)
    generator = torch.Generator().manual_seed(5)
    flips = torch.rand(2, generator=generator) < 0.5
    shifts = torch.randint(0, 5, (2, 2), generator=generator)
    for i in range(2):
        source = images[i].flip(-1) if flips[i] else images[i]
        padded = F.pad(source[None], (2, 2, 2, 2), mode="reflect")[0]
        expected = padded[:, shifts[i, 0]:shifts[i, 0] + 8, shifts[i, 1]:shifts[i, 1] + 8]
        assert torch.equal(out[i], expected)


@pytest.mark.parametrize("preset", ["paper", "fast", "cpu"])
def test_each_preset_network_trains_a_step(data_dir, preset):
    fitness = tiny(data_dir, preset, train_size=32, batch_size=32, val_size=20, epochs=1, width=4, device="cpu")
    score = fitness.evaluate(compile_genome(SEEDS["cross_entropy"].code, (2,)), seed=0)
    assert score.metrics["steps"] == 1 and score.metrics["arch"] == PRESETS[preset].arch
    assert 0.0 <= score.fitness <= 1.0 and math.isfinite(score.metrics["loss_first"])


def test_full_cpu_evaluation_of_the_seed_and_an_evolved_loss(data_dir):
    fitness = load_fitness("cifar10", {"preset": "cpu", "data_dir": data_dir, **TINY})
    results = {name: run_candidate(fitness, 0, code, seed=0)
               for name, code in (("cross_entropy", SEEDS["cross_entropy"].code), ("blend", BLEND))}
    for name, result in results.items():
        assert result.status == "ok", (name, result.error)
        assert result.fitness > 0.3  # 10 classes: chance is 0.1
        metrics = result.metrics
        assert metrics["accuracy"] == result.fitness and metrics["epochs"] == 2 and metrics["steps"] == 30
        assert metrics["images"] == 600 and metrics["seconds"] > 0 and len(metrics["loss_curve"]) == 2
        assert set(result.descriptors) == {"correct_push", "wrong_push", "rival_focus"}
    again = run_candidate(fitness, 0, SEEDS["cross_entropy"].code, seed=0)
    assert again.fitness == results["cross_entropy"].fitness  # deterministic on a CPU
    assert again.metrics["loss_curve"] == results["cross_entropy"].metrics["loss_curve"]


def test_a_nan_loss_stops_early_and_is_recorded_as_failed(data_dir):
    fitness = tiny(data_dir)
    result = run_candidate(fitness, 0, NAN_AT_TRAINING_BATCH, seed=0)
    assert result.status == "error"
    assert "non-finite" in result.error and "epoch 1, step 1" in result.error


def test_test_split_and_transfer_overrides(data_dir):
    fitness = tiny(data_dir, split="test", arch="airbench", epochs=1, width=4)
    score = fitness.evaluate(compile_genome(SEEDS["label_smoothing"].code, (2,)), seed=1)
    assert score.metrics["split"] == "test" and score.metrics["eval_images"] == TEST_IMAGES
    assert score.metrics["arch"] == "airbench" and score.metrics["epochs"] == 1


@pytest.mark.parametrize("options,fragment", [
    ({"preset": "gpu"}, "unknown preset 'gpu'"),
    ({"learning_rate": 0.1}, "unknown option.*learning_rate.*options: preset"),
    ({"arch": "vgg"}, "arch must be one of resnet18, airbench, cnn"),
    ({"split": "train"}, "split must be val or test"),
    ({"train_size": 10, "batch_size": 64}, "train_size .10. is smaller than batch_size"),
])
def test_bad_options_are_named(data_dir, options, fragment):
    with pytest.raises(PluginError, match=fragment):
        load_fitness("cifar10", {"data_dir": data_dir, **options})


def test_cli_evaluate_in_a_worker_process(data_dir, tmp_path, capsys):
    code = tmp_path / "blend.py"
    code.write_text(BLEND)
    options = [f"{k}={v}" for k, v in {**TINY, "data_dir": data_dir}.items()]
    argv = ["evaluate", "--fitness", "cifar10", "--preset", "cpu", "--code", str(code), "--json"]
    for option in options:
        argv += ["--fitness-opt", option]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok" and result["fitness_name"] == "cifar10"
    assert result["fitness"] == result["metrics"]["accuracy"] > 0.3


# -- the two phases ----------------------------------------------------------------------------
def test_train_returns_the_weights_and_score_measures_them_on_images_train_never_holds(data_dir):
    from fitness.base import validate_artefacts

    fitness = tiny(data_dir)
    fn = compile_genome(SEEDS["cross_entropy"].code, (2,))
    artefacts = fitness.train(fn, 0)
    assert set(artefacts) == set(fitness.artefact_spec(0))
    assert any(name.startswith("model.") for name in artefacts) and "train.loss_curve" in artefacts
    checked = validate_artefacts(artefacts, fitness.artefact_spec(0), fitness.max_artefact_bytes)
    score = fitness.score(checked, 0)
    assert score.fitness == fitness.evaluate(fn, 0).fitness
    # What a genome's process does first: the evaluation images are zeroed and dropped there.
    eval_images, _ = fitness._eval_images()
    fitness.held_out.wipe()
    assert int(eval_images.abs().sum()) == 0
    again = Cifar10(data_dir=data_dir, **TINY)
    again.held_out.wipe()
    retrained = again.train(fn, 0)  # training needs none of it
    assert all(torch.equal(retrained[name], artefacts[name]) for name in artefacts if name != "train.seconds")
    with pytest.raises(RuntimeError, match="not available in a genome's process"):
        again.score(checked, 0)


def test_cpu_scores_are_exactly_those_of_the_single_phase_evaluation(data_dir):
    """Recorded with the single-phase evaluate() of the previous contract (torch 2.13, CPU, one
    thread): splitting training from scoring changes no number."""
    fitness = tiny(data_dir)
    score = fitness.evaluate(compile_genome(SEEDS["cross_entropy"].code, (2,)), seed=0)
    assert score.fitness == 0.9
    assert score.metrics["eval_cross_entropy"] == 0.19236265182495116
    assert score.metrics["loss_curve"] == [1.328595519065857, 0.3569555878639221]
    assert score.metrics["train_accuracy"] == 0.9266666666666666


def test_an_evaluation_through_a_worker_scores_what_it_scores_in_process(data_dir):
    from engine.executor import ProcessExecutor

    results = []
    options = {"preset": "cpu", "data_dir": data_dir, **TINY}
    with ProcessExecutor("cifar10", options, workers=1, timeout=120, sandbox="none") as executor:
        executor.run([(0, SEEDS["cross_entropy"].code)], 0, None, results.append)
    assert results[0].ok, results[0].error
    assert results[0].fitness == 0.9 and "unprotected" not in results[0].metrics
    assert results[0].metrics["eval_cross_entropy"] == 0.19236265182495116


def test_the_test_batch_is_hidden_from_genomes_and_scored_by_the_trusted_phase(data_dir):
    """With split=test the trusted phase scores on the test batch, which each genome's process
    (inside the jail) cannot read: the score is the one it gets in-process."""
    from engine import jail
    from engine.executor import ProcessExecutor

    plugin = tiny(data_dir, split="test")
    needs = plugin.sandbox_needs()
    assert needs.hidden_from_genome == (str(plugin.folder),) and str(plugin.folder) in needs.read_only
    sandbox = jail.choose("auto")
    if not sandbox.jailed:
        pytest.skip("needs an OS jail")
    results = []
    options = {"preset": "cpu", "data_dir": data_dir, "split": "test", **TINY}
    with ProcessExecutor("cifar10", options, workers=1, timeout=120, sandbox=sandbox) as executor:
        executor.run([(0, SEEDS["cross_entropy"].code)], 0, None, results.append)
    assert results[0].ok, results[0].error
    local = tiny(data_dir, split="test").evaluate(compile_genome(SEEDS["cross_entropy"].code, (2,)), seed=0)
    assert results[0].fitness == local.fitness and results[0].metrics["split"] == "test"


def test_a_genome_cannot_read_the_images_it_is_scored_on(data_dir):
    """The whole data folder is hidden from each genome's process (the worker reads the images
    before the fork): a genome that reads the training batches to rebuild the evaluation split
    finds nothing, and the evaluation still trains and scores as in-process."""
    from engine import jail
    from engine.executor import ProcessExecutor

    sandbox = jail.choose("auto")
    if not sandbox.jailed:
        pytest.skip("needs an OS jail")
    folder = tiny(data_dir).folder
    probe = (
        "def peeking(logits, targets):\n"
        "    import os\n"
        f"    seen = os.listdir({str(folder)!r})\n"
        "    if seen:\n"
        "        raise ValueError('saw ' + ','.join(sorted(seen)))\n"
        "    return F.cross_entropy(logits, targets, reduction='none')\n"
    )
    results = []
    options = {"preset": "cpu", "data_dir": data_dir, **TINY}
    with ProcessExecutor("cifar10", options, workers=1, timeout=120, sandbox=sandbox, jail_only=True) as executor:
        executor.run([(0, probe), (1, SEEDS["cross_entropy"].code)], 0, None, results.append)
    by_id = {r.candidate_id: r for r in results}
    assert by_id[0].ok, by_id[0].error  # the folder is there, and empty
    local = tiny(data_dir).evaluate(compile_genome(SEEDS["cross_entropy"].code, (2,)), seed=0)
    assert by_id[1].fitness == local.fitness
