"""``python -m fitness.dpo.rank --request FOLDER/request.json``: one training process (rank)
of a dpo evaluation, started by ``accelerate launch`` (:mod:`fitness.dpo.launcher` writes the
folder and runs the launch).

Every rank rebuilds the plug-in from the request's settings, compiles the loss from its source
with :func:`engine.genome.compile_genome` (the same static checks and restricted namespace as
the evaluation worker), trains with :class:`fitness.dpo.trainer.CandidateDPOTrainer` and saves
the trained policy (every rank takes part: under ZeRO-3 and FSDP the weights are gathered). The
ranks never see the held-out pairs' score: the evaluation worker's trusted phase computes it
from the saved policy. Rank 0 writes ``result.json`` (the training report); a rank that fails
writes ``error-rank<k>.json`` holding the status and message the in-process path would record
(:func:`engine.processes.classify`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


#: The environment variable naming the process that runs the launch (the evaluation worker).
OWNER_ENV = "EVOLOSS_DPO_LAUNCH_OWNER"


def _watch_launch(interval: float = 1.0) -> None:
    """End this rank when its launcher or the evaluation that started it is gone. torchrun
    starts each rank in a session of its own, so the kill of the evaluation worker's process
    group (a timeout) does not reach it, and an orphaned rank would hold its GPU for as long as
    the training lasts. The worker is watched as well as the parent: the worker may have died
    (and the parent with it) while this rank was still importing torch."""
    import psutil

    from engine.processes import end_process_group, watch_parent

    if not os.environ.get(OWNER_ENV, "").isdigit():
        watch_parent(interval)
        return
    try:
        owner = psutil.Process(int(os.environ[OWNER_ENV]))
    except psutil.NoSuchProcess:
        end_process_group()

    def owner_gone() -> bool:
        try:
            return not owner.is_running() or owner.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    watch_parent(interval, also_gone=owner_gone)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Written whole or not at all: the worker may read it the moment the launch exits."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, default=str))
    os.replace(temporary, path)


def train(request: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    """Train one candidate in this rank and save the trained policy; rank 0 returns the training
    report, the others None."""
    import datasets
    import torch
    import transformers

    from engine.genome import compile_genome
    from fitness.dpo.plugin import DPOFitness

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    seed = int(request["seed"])
    # As engine.evaluation.run_candidate does before evaluate: a genome may draw random numbers.
    torch.manual_seed(seed)
    # This rank trains in-process; every scorer runs in the worker's trusted phase afterwards.
    options = {**request["settings"], "launcher": "inprocess", "num_processes": 1, "distributed": "ddp",
               "accelerate_config": None, "scorer": "heldout"}
    fitness = DPOFitness(preset=request["preset"], **options)
    fn = compile_genome((folder / request["loss_file"]).read_text(), fitness.interface.arg_counts)
    loss_fn = fitness.interface.bind(fn)
    cache = fitness.reference_cache()
    # One output folder for all ranks: TRL's reference pass hands its result over through a file there.
    output_dir = folder / "trainer"
    output_dir.mkdir(exist_ok=True)
    training = fitness.run_training(loss_fn, seed, str(output_dir))
    trainer = training.trainer
    metrics = fitness.training_metrics(trainer, training.result)
    # Every rank takes part: ZeRO-3 gathers the 16-bit weights, FSDP the full state dict. The
    # worker's trusted phase scores the saved policy; no rank ever sees the held-out pairs' score.
    trainer.save_model(str(folder / request["policy_dir"]))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return None
    metrics.update({
        "train_seconds": training.train_seconds, "setup_seconds": training.setup_seconds,
        "reference_cache_hits": cache.hits, "reference_cache_misses": cache.misses,
        "reference_forwards": trainer.reference_forwards, "world_size": trainer.accelerator.num_processes,
    })
    if torch.cuda.is_initialized():  # rank 0's peak, as the worker reports for in-process training
        metrics["gpu_peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return {"status": "ok", "metrics": metrics, "policy_dir": request["policy_dir"]}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fitness.dpo.rank", description=__doc__.splitlines()[0])
    parser.add_argument("--request", required=True, help="request.json written by fitness.dpo.launcher")
    args = parser.parse_args(argv)
    request_file = Path(args.request).resolve()
    folder = request_file.parent
    rank = int(os.environ.get("RANK", "0"))
    _watch_launch()
    try:
        report = train(json.loads(request_file.read_text()), folder)
    except BaseException as exc:  # noqa: BLE001 - a genome may raise anything; the worker gets the report
        from engine.processes import classify

        status, message = classify(exc)
        traceback.print_exc()  # into launch.log, for the record
        _write_json(folder / f"error-rank{rank}.json", {"rank": rank, "status": status, "error": message})
        return 1
    if report is not None:
        _write_json(folder / "result.json", report)
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Wait until every rank is done (rank 0 has written its report), then leave the process
    group, so that no rank exits while another still works: torchrun tears the launch down at
    the first exit, and a rank that exits with the group alive can abort in gloo's threads."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
