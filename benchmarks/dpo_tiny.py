"""How long does one ``dpo`` candidate take on the ``tiny`` preset, and what does the reference
cache save?

On one CPU thread, after the imports (TRL and transformers take about 10 s to import once per
process, which a worker pays once), prints the median over ``--repeats`` of:

1. a whole evaluation through the plug-in (data, fresh model, trainer, 32 DPO steps, held-out
   scoring) with a cold reference cache (a miss: the reference forward runs) and a warm one;
2. training three ways on the same model and data, split into trainer construction
   (tokenisation, reference log-probabilities) and ``train()``: the plug-in with a warm cache,
   the plug-in with a cold cache, and stock TRL (``DPOTrainer`` with the built-in sigmoid loss,
   a reference model in memory and the reference log-probabilities recomputed every step),
   with the warm/stock ratios. On a model this small fixed costs (tokenising, building the
   Trainer) weigh as much as the 32 steps; the ``train()`` ratio shows the per-step saving
   that dominates for real models.

Usage::

    python benchmarks/dpo_tiny.py [--repeats 5] [--options '{"train_size": 512}']
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.genome import compile_genome  # noqa: E402
from fitness.dpo import DPOFitness  # noqa: E402
from fitness.preference import PreferenceInterface, preference_seeds  # noqa: E402


def _stock_train(fitness: DPOFitness, model, output_dir: str) -> tuple[float, float]:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    start = time.perf_counter()
    args = fitness.training_arguments(output_dir, seed=0)
    args.precompute_ref_log_probs = False
    trainer = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                         processing_class=fitness.tokenizer(), train_dataset=Dataset.from_list(fitness.data().train),
                         eval_dataset=Dataset.from_list(fitness.data().heldout))
    trainer.remove_callback(PrinterCallback)
    built = time.perf_counter()
    trainer.train()
    return built - start, time.perf_counter() - built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--options", default="{}", help="JSON of dpo options on top of the tiny preset")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import datasets
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    options = json.loads(args.options)
    dpo = compile_genome(preference_seeds()[0].code, PreferenceInterface.arg_counts)
    cache = Path(tempfile.mkdtemp(prefix="evoloss-dpo-bench-"))
    try:
        fitness = DPOFitness(preset="tiny", cache_dir=str(cache), **options)
        loss = fitness.interface.bind(dpo)
        fitness.evaluate(dpo, 0)  # warm-up: first-use costs (kernels, tokenizer) are not a candidate's
        timings: dict[str, list[float]] = {k: [] for k in (
            "evaluate_cold", "evaluate_warm", "build_warm", "train_warm", "build_cold", "train_cold", "build_stock",
            "train_stock")}
        fitness_values = []
        for _ in range(args.repeats):
            shutil.rmtree(cache / "reference", ignore_errors=True)
            start = time.perf_counter()
            cold = fitness.evaluate(dpo, 0)
            timings["evaluate_cold"].append(time.perf_counter() - start)
            start = time.perf_counter()
            warm = fitness.evaluate(dpo, 0)
            timings["evaluate_warm"].append(time.perf_counter() - start)
            assert (cold.metrics["reference_cache_misses"], warm.metrics["reference_cache_hits"]) == (2, 2)
            fitness_values.append(warm.fitness)
            from fitness.dpo.models import load_model

            model = load_model(fitness.settings, fitness.tokenizer())
            with tempfile.TemporaryDirectory() as out:
                for name, clear in (("warm", False), ("cold", True)):
                    if clear:
                        shutil.rmtree(cache / "reference", ignore_errors=True)
                    start = time.perf_counter()
                    trainer = fitness.build_trainer(loss, 0, out, model=copy.deepcopy(model))
                    built = time.perf_counter()
                    trainer.train()
                    timings[f"build_{name}"].append(built - start)
                    timings[f"train_{name}"].append(time.perf_counter() - built)
                build, train = _stock_train(fitness, model, out)
                timings["build_stock"].append(build)
                timings["train_stock"].append(train)
        median = {k: statistics.median(v) for k, v in timings.items()}
        s = fitness.settings
        steps = cold.metrics["train_steps"]
        params = sum(p.numel() for p in model.parameters())
        print(f"tiny preset: {params:,}-parameter GPT-2, {len(fitness.data().train)} training pairs, "
              f"{len(fitness.data().heldout)} held-out, {steps} steps of batch {s.per_device_batch}; "
              f"torch {torch.__version__}, trl {trl.__version__}, transformers {transformers.__version__}, "
              f"1 thread, median of {args.repeats}")
        print(f"held-out accuracy (DPO seed): {statistics.mean(fitness_values):.3f}")
        print(f"whole evaluation, cold reference cache: {median['evaluate_cold']:.2f} s")
        print(f"whole evaluation, warm reference cache: {median['evaluate_warm']:.2f} s "
              f"(saves {median['evaluate_cold'] - median['evaluate_warm']:.2f} s)")
        print("training (construction + train()):")
        for name, label in (("warm", "plug-in, warm cache"), ("cold", "plug-in, cold cache"),
                            ("stock", "stock TRL, reference per step")):
            build, train = median[f"build_{name}"], median[f"train_{name}"]
            print(f"  {label:30s} {build:.2f} + {train:.2f} = {build + train:.2f} s")
        total = (median["build_warm"] + median["train_warm"]) / (median["build_stock"] + median["train_stock"])
        print(f"ratio warm plug-in / stock TRL: {total:.2f} (construction + train()), "
              f"{median['train_warm'] / median['train_stock']:.2f} (train() only)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
