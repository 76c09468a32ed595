"""The dpo plug-in's accelerate launcher on the ``tiny`` preset (CPU: DDP over gloo with two
processes, and one process), its failures and clean-up, the generated DeepSpeed ZeRO-3 and FSDP
configs (checked by accelerate's own launch code, no DeepSpeed or GPU needed), the launch
settings and ``resources()`` per preset."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
torch.set_num_threads(1)

pytestmark = pytest.mark.dpo

from engine.evaluation import run_candidate  # noqa: E402
from engine.genome import GenomeError, compile_genome  # noqa: E402
from fitness.dpo import DPOFitness  # noqa: E402
from fitness.dpo import launcher  # noqa: E402
from fitness.dpo.settings import resolve_settings  # noqa: E402
from fitness.preference import PreferenceInterface, preference_seeds  # noqa: E402

SEEDS = {seed.name: seed for seed in preference_seeds()}
FAST = {"train_size": 64, "heldout_size": 32}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def seed_fn(name: str):
    return compile_genome(SEEDS[name].code, PreferenceInterface.arg_counts)


def reference_entries(folder) -> dict[str, tuple[list[float], list[float]]]:
    entries = {}
    for path in sorted((folder / "reference").glob("*.pt")):
        entry = torch.load(path, weights_only=True)
        entries[path.name] = (entry["chosen"].tolist(), entry["rejected"].tolist())
    return entries


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory):
    """The tiny preset trained in-process with DPO (its cache holds the reference)."""
    cache = tmp_path_factory.mktemp("inprocess-cache")
    return cache, DPOFitness(preset="tiny", cache_dir=str(cache)).evaluate(seed_fn("dpo"), 0)


# -- training through accelerate launch ----------------------------------------------------------
def test_two_cpu_processes_train_dpo_over_gloo_and_score_held_out_pairs(tmp_path, inprocess):
    fitness = DPOFitness(preset="tiny", cache_dir=str(tmp_path), launcher="accelerate", num_processes=2)
    score = fitness.evaluate(seed_fn("dpo"), 0)
    metrics = score.metrics
    assert 0.5 < score.fitness <= 1.0 and score.fitness == metrics["heldout_accuracy"]
    # Two ranks of 8 pairs: 16 pairs per step, so 16 steps over the 256 pairs; every held-out pair
    # is scored once (the pairs repeated to even out the ranks' last batch are dropped).
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 16 and metrics["heldout_pairs"] == 128
    assert metrics["launcher"] == "accelerate" and metrics["distributed"] == "ddp"
    assert metrics["train_rewards_margins"] > 0 and metrics["heldout_margin"] > 0
    # A miss: computed over both ranks, stored once, the same values as one process computes (the
    # training pairs only: the held-out pairs' reference is computed by the trusted phase, in memory).
    assert (metrics["reference_cache_misses"], metrics["reference_cache_hits"]) == (1, 0)
    assert reference_entries(tmp_path) == reference_entries(inprocess[0])


def test_one_process_launch_gives_the_in_process_result(inprocess):
    cache, expected = inprocess
    fitness = DPOFitness(preset="tiny", cache_dir=str(cache), launcher="accelerate")
    score = fitness.evaluate(seed_fn("dpo"), 0)
    assert score.fitness == expected.fitness
    assert score.metrics["heldout_margin"] == pytest.approx(expected.metrics["heldout_margin"], abs=1e-6)
    assert score.metrics["train_steps"] == expected.metrics["train_steps"] == 32
    assert score.metrics["train_loss"] == pytest.approx(expected.metrics["train_loss"], abs=1e-6)
    assert score.metrics["reference_cache_hits"] == 1 and score.metrics["reference_forwards"] == 0


def test_a_genome_that_diverges_is_recorded_as_an_error_through_the_launcher(tmp_path):
    # Finite for the contract checks' batch sizes, infinite for the training batch of 8 (on both ranks).
    code = '''def blows_up(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    return -F.logsigmoid(self.beta * logits) / (logits.shape[0] - 8)
'''
    fitness = DPOFitness(preset="tiny", cache_dir=str(tmp_path), launcher="accelerate", num_processes=2, **FAST)
    result = run_candidate(fitness, 1, code, 0)
    assert result.status == "error", result.error
    assert result.error == "the loss became non-finite (nan or inf) at training step 1"  # as in-process


def test_killing_the_workers_process_group_ends_the_ranks_too(tmp_path):
    """torchrun starts each rank in a session of its own; the executor's timeout kills only the
    worker's group, so each rank must notice its launcher is gone."""
    import psutil

    worker = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys; from engine.genome import compile_genome; from fitness.dpo import DPOFitness; "
            "from fitness.preference import PreferenceInterface, preference_seeds; "
            "f = DPOFitness(preset='tiny', cache_dir=sys.argv[1], launcher='accelerate', num_processes=2, "
            "train_size=4096, epochs=5.0); "
            "f.evaluate(compile_genome(preference_seeds()[0].code, PreferenceInterface.arg_counts), 0)"),
         str(tmp_path)],
        cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)})

    def ranks():
        found = []
        for process in psutil.Process(worker.pid).children(recursive=True):
            try:
                command = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if "fitness.dpo.rank" in command and "accelerate.commands.launch" not in command:
                found.append(process)
        return found

    try:
        deadline = time.monotonic() + 60
        while len(ranks()) < 2:
            assert worker.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.2)
        started = ranks()
        assert all(os.getpgid(r.pid) != worker.pid for r in started)  # out of reach of the group kill
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        gone, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, f"ranks left running: {alive}"
        # The killed evaluation's folder is removed by the next launch on the machine.
        stale = list(tmp_path.glob(f"{launcher.FOLDER_PREFIX}*"))
        assert len(stale) == 1 and (stale[0] / "owner.json").exists()
        fresh = tmp_path / f"{launcher.FOLDER_PREFIX}next"
        fresh.mkdir()
        launcher._remove_stale_folders(fresh)
        assert not stale[0].exists() and fresh.exists()
    finally:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- failures without a launch -----------------------------------------------------------------------
def test_a_function_without_genome_source_is_refused_by_the_launcher(tmp_path):
    fitness = DPOFitness(preset="tiny", cache_dir=str(tmp_path), launcher="accelerate")
    with pytest.raises(ValueError, match="compile_genome"):
        fitness.evaluate(lambda pc, pr, rc, rr: -(pc - pr), 0)
    assert seed_fn("dpo").__evoloss_source__ == SEEDS["dpo"].code


def test_failed_launches_become_the_in_process_statuses(tmp_path):
    log = tmp_path / "launch.log"
    log.write_text("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    error = launcher._failure(tmp_path, 1, log)
    assert error.status == "oom" and "exited with code 1" in str(error)
    log.write_text("exitcode  : -9 (pid: 123)\nSignal 9 (SIGKILL) received by PID 123\n")
    assert launcher._failure(tmp_path, 1, log).status == "oom"
    log.write_text("ModuleNotFoundError: No module named 'deepspeed'\n")
    error = launcher._failure(tmp_path, 1, log)
    assert error.status == "error" and "No module named 'deepspeed'" in str(error)
    # A rank's own report wins, rank 0's first.
    (tmp_path / "error-rank1.json").write_text(json.dumps({"rank": 1, "status": "error", "error": "gloo: closed"}))
    (tmp_path / "error-rank0.json").write_text(json.dumps({"rank": 0, "status": "oom", "error": "out of memory: x"}))
    error = launcher._failure(tmp_path, 1, log)
    assert isinstance(error, GenomeError) and (error.status, str(error)) == ("oom", "out of memory: x")


def test_zero3_and_fsdp_need_gpus_and_zero3_deepspeed(tmp_path, monkeypatch):
    import importlib.util

    settings = resolve_settings("tiny", {"launcher": "accelerate", "num_processes": 2, "distributed": "zero3"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="distributed='zero3' needs GPUs"):
        launcher.launch("tiny", settings, SEEDS["dpo"].code, 0, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install deepspeed"):
        launcher.launch("tiny", settings, SEEDS["dpo"].code, 0, tmp_path)


# -- the generated configs ------------------------------------------------------------------------
def test_zero3_config_holds_the_recipes_settings(tmp_path, monkeypatch):
    settings = resolve_settings("zephyr-gemma-mtbench", {})
    assert (settings.launcher, settings.num_processes, settings.distributed) == ("accelerate", 8, "zero3")
    config_file = launcher.write_config(settings, tmp_path, cpu=False)
    deepspeed = json.loads((tmp_path / "deepspeed.json").read_text())
    assert deepspeed["zero_optimization"]["stage"] == 3
    assert deepspeed["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert deepspeed["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert deepspeed["bf16"] == {"enabled": True} and "fp16" not in deepspeed
    assert (deepspeed["train_micro_batch_size_per_gpu"], deepspeed["gradient_accumulation_steps"]) == (2, 8)
    assert deepspeed["train_batch_size"] == 2 * 8 * 8 and deepspeed["gradient_clipping"] == 1.0

    # transformers checks these against its arguments at start-up (with DeepSpeed installed): the
    # arguments the plug-in builds agree.
    args = DPOFitness(preset="zephyr-gemma-mtbench", scorer="heldout").training_arguments(str(tmp_path), 0)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 8)
    assert args.max_grad_norm == deepspeed["gradient_clipping"] and args.bf16 and not args.fp16
    assert (args.learning_rate, args.lr_scheduler_type.value, args.num_train_epochs) == (5e-7, "cosine", 2.0)

    # accelerate's own launch code reads the file: ZeRO-3 over 8 processes, DeepSpeed's file in charge.
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    command = launcher.launch_command(config_file, tmp_path / "request.json", settings, cpu=False)
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--cpu" not in command
    assert command[-4:] == ["-m", "fitness.dpo.rank", "--request", str(tmp_path / "request.json")]
    parsed = launch_command_parser().parse_args(command[3:])
    parsed, defaults, mixed_precision_from_config = _validate_launch_command(parsed)
    assert parsed.use_deepspeed and parsed.num_processes == 8 and not mixed_precision_from_config
    parsed.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(parsed)
    # What a rank sees: accelerate's DeepSpeed plug-in built from the launch's environment.
    for name, value in env.items():
        if name.startswith("ACCELERATE_"):
            monkeypatch.setenv(name, value)
    plugin = DeepSpeedPlugin()  # raises if the file and the accelerate config disagree
    assert (plugin.zero_stage, plugin.gradient_accumulation_steps, plugin.gradient_clipping) == (3, 8, 1.0)
    assert plugin.zero3_init_flag and plugin.zero3_save_16bit_model


def test_fsdp_config_is_full_shard_with_a_full_state_dict(tmp_path):
    settings = resolve_settings("zephyr-gemma-mtbench", {"distributed": "fsdp"})
    config = launcher.accelerate_config(settings, cpu=False)
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 8
    assert config["mixed_precision"] == "bf16"
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_offload_params"] is False

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config_file = launcher.write_config(settings, tmp_path, cpu=False)
    command = launcher.launch_command(config_file, tmp_path / "request.json", settings, cpu=False)
    parsed, _, _ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    assert parsed.use_fsdp and parsed.num_processes == 8
    env = prepare_multi_gpu_env(parsed)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert parsed.nproc_per_node == "8" and int(parsed.master_port) > 0  # a free port, not 29500 for all


def test_ddp_configs_for_cpu_and_gpu():
    one = resolve_settings("tiny", {"launcher": "accelerate"})
    config = launcher.accelerate_config(one, cpu=True)
    assert (config["distributed_type"], config["use_cpu"], config["mixed_precision"]) == ("NO", True, "no")
    assert "--cpu" in launcher.launch_command("a.yaml", "r.json", one, cpu=True)
    two = resolve_settings("tiny", {"launcher": "accelerate", "num_processes": 2})
    # accelerate's --cpu starts a single process (its CPU multi-process mode wants mpirun); torchrun
    # starts both, and the trainer (use_cpu) joins them over gloo.
    assert launcher.accelerate_config(two, cpu=True)["distributed_type"] == "MULTI_GPU"
    assert "--cpu" not in launcher.launch_command("a.yaml", "r.json", two, cpu=True)
    config = launcher.accelerate_config(resolve_settings("zephyr-gemma-mtbench", {"distributed": "ddp"}), cpu=False)
    assert (config["distributed_type"], config["num_processes"], config["mixed_precision"]) == ("MULTI_GPU", 8, "bf16")
    assert config["use_cpu"] is False and config["main_process_port"] == 0


# -- settings and resources -------------------------------------------------------------------------
def test_launch_settings_are_checked_and_follow_the_launcher():
    assert resolve_settings("tiny", {}).launcher == "inprocess"
    with pytest.raises(ValueError, match="launcher must be one of inprocess, accelerate"):
        resolve_settings("tiny", {"launcher": "torchrun"})
    with pytest.raises(ValueError, match="distributed must be one of ddp, zero3, fsdp"):
        resolve_settings("tiny", {"launcher": "accelerate", "distributed": "zero2"})
    with pytest.raises(ValueError, match="num_processes must be an integer >= 1"):
        resolve_settings("tiny", {"launcher": "accelerate", "num_processes": 0})
    with pytest.raises(ValueError, match="need launcher=accelerate"):
        resolve_settings("tiny", {"num_processes": 2})
    # Switching the 8-GPU preset to in-process training drops the preset's launch options...
    single = resolve_settings("zephyr-gemma-mtbench", {"launcher": "inprocess"})
    assert (single.num_processes, single.distributed) == (1, "ddp")
    # ...but not ones given with it.
    with pytest.raises(ValueError, match="need launcher=accelerate"):
        resolve_settings("zephyr-gemma-mtbench", {"launcher": "inprocess", "distributed": "fsdp"})


@pytest.mark.parametrize(("preset", "options", "expected"), [
    ("tiny", {}, {"cpus": 1.0, "gpus": 0.0}),
    ("tiny", {"launcher": "accelerate", "num_processes": 2}, {"cpus": 2.0, "gpus": 0.0}),
    ("imdb-gpt2", {}, {"cpus": 1.0, "gpus": 1.0}),
    ("zephyr-gemma-mtbench", {"scorer": "heldout"}, {"cpus": 8.0, "gpus": 8.0}),
    ("zephyr-gemma-mtbench", {"scorer": "heldout", "num_processes": 4}, {"cpus": 4.0, "gpus": 4.0}),
])
def test_resources_per_preset(preset, options, expected):
    assert DPOFitness(preset=preset, **options).resources() == expected
