"""Seconds per candidate of the ``cifar10`` fitness: measured for the ``cpu`` preset on one
core, planned for ``fast`` and ``paper`` on one H100.

The measurement scores seed losses through the engine's own path (``run_candidate``: contract
checks, fingerprint, descriptors, training, scoring) with one torch thread. It uses the real
CIFAR-10 batches from ``--data-dir`` or ``EVOLOSS_DATA``; without them it writes generated
images of the real size and format (50,000 + 10,000, class-dependent stripes and noise) to a
temporary folder and says so: the timing is the same, the accuracies mean nothing.

Usage::

    python benchmarks/cifar10_speed.py [--data-dir PATH] [--candidates 3] [--preset cpu]
                                       [--options '{"epochs": 2}']

GPU plan (one H100 SXM, one worker per GPU: ``--workers 1``)
--------------------------------------------------------------

Work per candidate, from ``torch.utils.flop_counter`` on the plug-in's networks (training
counts forward and backward, about 3x the forward):

| preset | network | train GFLOP/image | images/candidate | PFLOP/candidate |
| - | - | - | - | - |
| ``fast`` | airbench (64/256/256) | 0.71 | 10 x 45,000 | 0.32 |
| ``paper`` | ResNet-18 (CIFAR) | 3.33 | 5 x 45,000 | 0.75 |
| ``cpu`` | 4-layer CNN (width 16) | 0.087 | 3 x 5,000 | 0.0013 |

Published throughputs (airbench README, all on one A100): airbench94 trains 0.36 PFLOP in
3.09 s compiled (3.83 s eager), 117 TFLOP/s effective; standard ResNet-18 training (96% in
200 epochs) takes 7 min for 32.3 PFLOP, 77 TFLOP/s effective. An H100 SXM has 3.2x the A100's
dense bf16 peak but 1.7x its memory bandwidth, and 32x32 convnets at these batch sizes are
bandwidth- and launch-bound, so these figures scale by about 1.7x, not 3x.

* ``fast``: 0.32 PFLOP at 117 x 1.7 = 200 TFLOP/s is 1.6 s. This version adds what airbench
  leaves out or does differently: bf16 autocast instead of a half-precision model (extra cast
  kernels), an uncompiled candidate loss (10-20 small kernels per step, 440 steps), a
  non-finite check every 25 steps, scoring 5,000 held-out images and re-initialising the
  network. Expect **2-3 s per candidate**, plus a one-time ``torch.compile`` of 40-60 s in
  each worker (give the first evaluation room: ``--timeout 300``). A population of 8 for 12
  generations (about 100 candidates) takes about 5 minutes.
* ``paper``: 0.75 PFLOP at 77 x 1.7 = 130 TFLOP/s is 5.8 s in mixed precision; the preset
  trains in float32 (TF32 convolutions), about half that rate, and its 1,760 steps of batch 128
  cost 1.5-2 ms each in launch overhead alone. Expect **10-15 s per candidate** (6-8 s with
  ``amp=true``). The paper's own runs fed the GPU from a CPU data loader; here the data stay on
  the GPU, so the loader is not the bottleneck.
* Transfer checks scale linearly: ``preset=paper epochs=100`` is about 20x the ``paper`` figure
  (3-5 minutes per elite).

These are estimates from FLOPs and published speed-run figures, not measurements: no GPU was
available when this plan was written. Run this script with ``--preset fast`` on the GPU machine
to replace them with measured numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.evaluation import run_candidate  # noqa: E402
from fitness.cifar10 import ARCH_WIDTHS, Cifar10, Cifar10DataError, classification_seeds, find_data_folder  # noqa: E402

_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_generated(root: Path, per_batch: int = 10_000, test_images: int = 10_000, seed: int = 0) -> Path:
    """Generated images in the official layout (``root/cifar-10-batches-py``): class-dependent
    colour and stripe direction under heavy noise. For timing only."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)

    def images(labels: np.ndarray) -> np.ndarray:
        angle = np.pi * labels / 10.0
        phase = rng.uniform(0, 2 * np.pi, len(labels))
        direction = np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y
        waves = np.sin(0.5 * direction + phase[:, None, None])
        colours = np.stack([(labels * 37) % 256, (labels * 91) % 256, (labels * 53 + 80) % 256], 1).astype(np.float32)
        noise = rng.normal(0, 45, (len(labels), 3, 32, 32)).astype(np.float32)
        pixels = 0.5 * colours[:, :, None, None] + 50 * waves[:, None] + noise + 60
        return np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(labels), -1)

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        count = test_images if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, count)
        record = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": images(labels),
                  b"filenames": [b"generated.png"] * count}
        (folder / name).write_bytes(pickle.dumps(record, protocol=2))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": _NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: EVOLOSS_DATA)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--candidates", type=int, default=3, help="seed losses scored (cross-entropy first)")
    parser.add_argument("--options", default="{}", help="extra plug-in options as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)

    scratch = None
    try:
        folder = find_data_folder(args.data_dir)
        source = f"CIFAR-10 batches found in {folder}"
    except Cifar10DataError:
        scratch = tempfile.TemporaryDirectory(prefix="cifar10-generated-")
        began = time.perf_counter()
        folder = write_generated(Path(scratch.name))
        source = (f"GENERATED images of the real size and format in {folder} (no CIFAR-10 found via --data-dir "
                  f"or EVOLOSS_DATA; written in {time.perf_counter() - began:.0f} s): timings are real, "
                  "accuracies are not")
    print(f"data: {source}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")

    options = {"preset": args.preset, "data_dir": str(folder), **json.loads(args.options)}
    began = time.perf_counter()
    fitness = Cifar10(**options)
    constructed = time.perf_counter() - began
    began = time.perf_counter()
    data = fitness.data()
    loaded = time.perf_counter() - began
    recipe = fitness.recipe
    print(f"preset {args.preset}: {recipe.arch} width {recipe.width or ARCH_WIDTHS[recipe.arch]}, {recipe.epochs} epochs of "
          f"{len(data.train_labels):,} images (batch {recipe.batch_size}), scored on {len(data.eval_labels):,}; "
          f"device {fitness.device()}")
    print(f"plug-in construction {constructed * 1000:.0f} ms (cheap folder checks); first data load {loaded:.2f} s "
          "(once per worker)")

    # As a worker does at start-up: the first optimiser step imports a good part of torch.
    parameter = torch.zeros(2, requires_grad=True)
    (parameter ** 2).sum().backward()
    torch.optim.SGD([parameter], lr=0.1, momentum=0.9).step()

    seconds = []
    for seed in classification_seeds()[: args.candidates]:
        result = run_candidate(fitness, 0, seed.code, seed=0)
        seconds.append(result.seconds)
        metrics = result.metrics
        rate = metrics.get("images_per_second") or 0
        print(f"  {seed.name:16s} {result.status:5s} fitness {result.fitness if result.ok else result.error}  "
              f"{result.seconds:6.1f} s per candidate ({metrics.get('seconds', 0):.1f} s training and scoring, "
              f"{rate:.0f} training images/s)")
    print(f"seconds per candidate ({args.preset}, one core): mean {statistics.mean(seconds):.1f}, "
          f"min {min(seconds):.1f}, max {max(seconds):.1f} over {len(seconds)} candidates")
    print()
    print(__doc__[__doc__.index("GPU plan"):])
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
