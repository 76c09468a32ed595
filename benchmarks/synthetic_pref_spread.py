"""How reliable and how fast is the ``synthetic-pref`` fitness?

Prints, on one CPU thread:

1. DPO's fitness over repeated evaluation seeds (mean, std, min, max) and the seconds per
   evaluation;
2. the paired difference to DPO of the seed losses that compete with it, over the same seeds
   (what a search compares when all candidates share a seed);
3. the fitness and main metrics of every seed loss, of a few variants and of broken losses
   on evaluation seed 0;
4. the seeds' behaviour descriptors and the archive cell each falls in.

Usage::

    python benchmarks/synthetic_pref_spread.py [--seeds 8] [--options '{"instances": 4}']
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.genome import GenomeError, compile_genome  # noqa: E402
from fitness.preference import PreferenceInterface, preference_seeds  # noqa: E402
from fitness.synthetic_pref import SyntheticPreference  # noqa: E402


def _logits(pc, pr, rc, rr):
    return (pc - pr) - (rc - rr)


def _variants() -> dict:
    """Hand-made variants of DPO (shape changes) and broken losses."""

    def dpo_inner_2x(self, pc, pr, rc, rr):
        return -F.logsigmoid(2 * self.beta * _logits(pc, pr, rc, rr))

    def dpo_inner_half(self, pc, pr, rc, rr):
        return -F.logsigmoid(0.5 * self.beta * _logits(pc, pr, rc, rr))

    def conservative_dpo(self, pc, pr, rc, rr):  # cDPO, label smoothing 0.1
        z = self.beta * _logits(pc, pr, rc, rr)
        return -0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z)

    def dpo_plus_ipo(self, pc, pr, rc, rr):
        z = self.beta * _logits(pc, pr, rc, rr)
        return -F.logsigmoid(z) + 0.05 * z * z

    def noise_mle(self, pc, pr, rc, rr):  # exact likelihood under 10% flipped labels
        z = self.beta * _logits(pc, pr, rc, rr)
        return -torch.log(0.1 + 0.8 * torch.sigmoid(z))

    def dpo_times_3(self, pc, pr, rc, rr):
        return 3 * -F.logsigmoid(self.beta * _logits(pc, pr, rc, rr))

    def constant_detached(self, pc, pr, rc, rr):
        return (pc * 0 + 1).detach()

    def constant_zero_gradient(self, pc, pr, rc, rr):
        return 0.0 * _logits(pc, pr, rc, rr) + 1.0

    def sign_flipped_dpo(self, pc, pr, rc, rr):
        return -F.logsigmoid(-self.beta * _logits(pc, pr, rc, rr))

    def sft_on_rejected(self, pc, pr, rc, rr):
        return -pr

    def nan_after_a_while(self, pc, pr, rc, rr):
        return torch.exp(-1e4 * self.beta * _logits(pc, pr, rc, rr))

    return {name: fn for name, fn in locals().items() if callable(fn)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="evaluation seeds for the spread")
    parser.add_argument("--options", default="{}", help="fitness options as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fitness = SyntheticPreference(**json.loads(args.options))
    seeds = {s.name: compile_genome(s.code, PreferenceInterface.arg_counts) for s in preference_seeds()}
    print(f"synthetic-pref, options {args.options}, torch threads {torch.get_num_threads()}")

    # 1. DPO over evaluation seeds (a fresh plug-in per seed: no problem cache).
    dpo_scores, seconds = [], []
    for seed in range(args.seeds):
        start = time.perf_counter()
        dpo_scores.append(SyntheticPreference(**json.loads(args.options)).evaluate(seeds["dpo"], seed).fitness)
        seconds.append(time.perf_counter() - start)
    print(f"\nDPO over {args.seeds} evaluation seeds: mean {statistics.mean(dpo_scores):.4f}  "
          f"std {statistics.stdev(dpo_scores) if len(dpo_scores) > 1 else 0:.4f}  "
          f"min {min(dpo_scores):.4f}  max {max(dpo_scores):.4f}")
    print("  per seed: " + " ".join(f"{s:.3f}" for s in dpo_scores))
    print(f"seconds per evaluation (incl. building the problem): mean {statistics.mean(seconds):.2f}  "
          f"min {min(seconds):.2f}  max {max(seconds):.2f}")

    # 2. Paired differences to DPO on the same seeds.
    print(f"\npaired difference to DPO over the same {args.seeds} seeds (mean ± std, min):")
    for name in ("dbaql", "lrml", "slic", "cell", "aqfl"):
        diffs = [fitness.evaluate(seeds[name], seed).fitness - dpo for seed, dpo in enumerate(dpo_scores)]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        print(f"  {name:8s} {statistics.mean(diffs):+.4f} ± {spread:.4f}  min {min(diffs):+.4f}")

    # 3. Every seed, variants and broken losses on seed 0.
    print("\nevaluation seed 0:")
    print(f"  {'loss':24s} {'fitness':>8s} {'kl':>6s} {'reward':>7s} {'acc':>5s} {'inst.std':>8s} {'sec':>5s}")
    losses = dict(seeds)
    losses.update(_variants())
    for name, fn in losses.items():
        start = time.perf_counter()
        try:
            score = fitness.evaluate(fn, 0)
        except GenomeError as exc:
            print(f"  {name:24s} {exc.status}: {exc}")
            continue
        m = score.metrics
        print(f"  {name:24s} {score.fitness:+8.4f} {m['kl']:6.1f} {m['reward_gain']:7.3f} "
              f"{m['train_accuracy']:5.2f} {m['instance_std']:8.3f} {time.perf_counter() - start:5.2f}")
    m = fitness.evaluate(seeds["dpo"], 0).metrics
    print(f"  (oracle: KL {m['oracle_kl']:.1f}, reward gain {m['oracle_gain'] + fitness.kl_coef * m['oracle_kl']:.3f}; "
          f"labels agreeing with the true reward {m['label_agreement']:.3f})")

    # 4. Descriptors and archive cells.
    print("\ndescriptors of the seeds (cell index per axis):")
    space = fitness.descriptor_space
    print("  " + f"{'seed':9s}" + "".join(f"{d.name:>20s}" for d in space) + "   cell")
    for name, fn in seeds.items():
        values = fitness.descriptors(fn)
        cell = tuple(
            min(d.bins - 1, max(0, int((values[d.name] - d.low) / (d.high - d.low) * d.bins))) for d in space
        )
        print(f"  {name:9s}" + "".join(f"{values[d.name]:20.3f}" for d in space) + f"   {cell}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
