"""Is a loss that beats DPO within reach? Published losses and DPO's near neighbours scored on
pref-suite's meta-train tasks only (the meta-test split is refused: it is for validation).

Each loss is trained and scored in this process (trusted code, one thread) on every task of the
meta-train pool for ``--seeds`` evaluation seeds (default 100-105, seeds no run uses for
selection), paired with DPO on the same task and seed. Printed per loss: the mean gain over tasks
and the suite's fitness rule over all of them (the mean gain, pulled down by a task more than
``worst_tolerance`` below DPO: what a run selects on, there over the tasks of each seed, and what
the end-of-run validation reports), each as mean ± standard error over seeds, and the gain per task.
With ``--synthetic`` also the paired gain on ``synthetic-pref`` (seeds 100-103) and the Spearman
rank correlation of the two, over all losses and over DPO's near neighbours.

Sources of the published forms: DPO (Rafailov et al. 2023); cDPO / label smoothing (Mitchell
2023, "A note on DPO with noisy preferences"); robust DPO (Chowdhury et al. 2024, "Provably
robust DPO"); SLiC / hinge (Zhao et al. 2023); IPO (Azar et al. 2023); RPO, DPO with an NLL
term on the chosen response (Pang et al. 2024, "Iterative reasoning preference optimization");
a target margin inside the log-sigmoid (ODPO, Amini et al. 2024, with a constant offset; SimPO's
gamma, Meng et al. 2024). The rest are simple variants: beta scaled by ``c``, blends with the
hinge, smoothed hinges, clamped margins.

    python benchmarks/meta_train_losses.py [--seeds 100 101 102 103 104 105] [--only dpo,hinge] [--synthetic]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.genome import compile_genome  # noqa: E402
from engine.plugins import load_fitness  # noqa: E402
from fitness.suites import aggregate  # noqa: E402

HEAD = ("def {name}(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, "
        "reference_rejected_logps):\n"
        "    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)\n"
        "    z = self.beta * logits\n")

#: name -> (body, where it comes from)
LOSSES: dict[str, tuple[str, str]] = {
    "dpo": ("    return -F.logsigmoid(z)\n", "Rafailov et al. 2023"),
    "cdpo_0.1": ("    return 0.9 * -F.logsigmoid(z) + 0.1 * -F.logsigmoid(-z)\n", "Mitchell 2023, eps 0.1"),
    "cdpo_0.2": ("    return 0.8 * -F.logsigmoid(z) + 0.2 * -F.logsigmoid(-z)\n", "Mitchell 2023, eps 0.2"),
    "rdpo_0.1": ("    return (0.9 * -F.logsigmoid(z) - 0.1 * -F.logsigmoid(-z)) / 0.8\n", "Chowdhury et al. 2024, eps 0.1"),
    "hinge": ("    return torch.relu(1 - z)\n", "Zhao et al. 2023 (SLiC)"),
    "ipo": ("    return (logits - 1 / (2 * self.beta)) ** 2\n", "Azar et al. 2023"),
    "rpo_0.1": ("    return -F.logsigmoid(z) - 0.1 * self.beta * policy_chosen_logps\n", "Pang et al. 2024, alpha 0.1"),
    "rpo_1": ("    return -F.logsigmoid(z) - 1.0 * self.beta * policy_chosen_logps\n", "Pang et al. 2024, alpha 1"),
    "dpo_c0.5": ("    return -F.logsigmoid(0.5 * z)\n", "beta scaled"),
    "dpo_c0.7": ("    return -F.logsigmoid(0.7 * z)\n", "beta scaled"),
    "dpo_c0.8": ("    return -F.logsigmoid(0.8 * z)\n", "beta scaled"),
    "dpo_c0.9": ("    return -F.logsigmoid(0.9 * z)\n", "beta scaled"),
    "dpo_c1.1": ("    return -F.logsigmoid(1.1 * z)\n", "beta scaled"),
    "dpo_c1.4": ("    return -F.logsigmoid(1.4 * z)\n", "beta scaled"),
    "dpo_c2": ("    return -F.logsigmoid(2.0 * z)\n", "beta scaled"),
    "margin0.1": ("    return -F.logsigmoid(z - 0.1)\n", "target margin (ODPO / SimPO form)"),
    "margin0.15": ("    return -F.logsigmoid(z - 0.15)\n", "target margin"),
    "margin0.25": ("    return -F.logsigmoid(z - 0.25)\n", "target margin"),
    "margin0.5": ("    return -F.logsigmoid(z - 0.5)\n", "target margin"),
    "margin1": ("    return -F.logsigmoid(z - 1.0)\n", "target margin"),
    "margin-0.5": ("    return -F.logsigmoid(z + 0.5)\n", "negative margin"),
    "margin_beta": ("    return -F.logsigmoid(z - self.beta)\n", "margin of 1 nat of log-ratio"),
    "margin_2beta": ("    return -F.logsigmoid(z - 2 * self.beta)\n", "margin of 2 nats"),
    "margin_4beta": ("    return -F.logsigmoid(z - 4 * self.beta)\n", "margin of 4 nats"),
    "margin0.25_c0.9": ("    return -F.logsigmoid(0.9 * z - 0.25)\n", "margin and scale"),
    "margin0.5_c0.9": ("    return -F.logsigmoid(0.9 * z - 0.5)\n", "margin and scale"),
    "margin0.5_c1.1": ("    return -F.logsigmoid(1.1 * z - 0.5)\n", "margin and scale"),
    "dpo_hinge_25": ("    return 0.75 * -F.logsigmoid(z) + 0.25 * torch.relu(1 - z)\n", "blend"),
    "dpo_hinge_50": ("    return 0.5 * -F.logsigmoid(z) + 0.5 * torch.relu(1 - z)\n", "blend"),
    "hinge_m0.5": ("    return torch.relu(0.5 - z)\n", "hinge, margin 0.5"),
    "hinge_m2": ("    return torch.relu(2 - z)\n", "hinge, margin 2"),
    "softhinge_t0.5": ("    return 0.5 * F.softplus((1 - z) / 0.5)\n", "smoothed hinge"),
    "softhinge_t0.25": ("    return 0.25 * F.softplus((1 - z) / 0.25)\n", "smoothed hinge"),
    "sq_hinge": ("    return torch.relu(1 - z) ** 2\n", "squared hinge"),
    "exp": ("    return torch.exp(-z)\n", "exponential"),
    "dpo_plus_exp": ("    return 0.5 * -F.logsigmoid(z) + 0.5 * torch.exp(-z)\n", "CELL form"),
    "sigmoid": ("    return torch.sigmoid(-z)\n", "smoothed 0-1"),
    "dpo_ipo_mix": ("    return -F.logsigmoid(z) + 0.1 * (z - 0.5) ** 2\n", "DPO plus an IPO term"),
    "dpo_sq_small": ("    return -F.logsigmoid(z) + 0.01 * z ** 2\n", "DPO plus a small quadratic"),
    "clip-1": ("    return -F.logsigmoid(z.clamp(min=-1))\n", "gives up on pairs below z = -1"),
    "clip-2": ("    return -F.logsigmoid(z.clamp(min=-2))\n", "gives up below -2"),
    "clip-3": ("    return -F.logsigmoid(z.clamp(min=-3))\n", "gives up below -3"),
    "clip-5": ("    return -F.logsigmoid(z.clamp(min=-5))\n", "gives up below -5"),
    "cap2": ("    return -F.logsigmoid(z.clamp(max=2))\n", "stops at z = 2"),
    "cap4": ("    return -F.logsigmoid(z.clamp(max=4))\n", "stops at z = 4"),
}
#: DPO's near neighbours: one or two small parametric moves away.
NEAR = ("dpo_c0.8", "dpo_c0.9", "dpo_c1.1", "margin0.1", "margin0.15", "margin0.25", "margin0.5", "margin-0.5",
        "margin_beta", "margin_2beta", "margin0.25_c0.9", "margin0.5_c1.1", "dpo_hinge_25", "clip-3", "clip-5",
        "cap4", "dpo_sq_small")


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, index in enumerate(order):
            out[index] = float(rank)
        return out
    ra, rb = ranks(a), ranks(b)
    return statistics.correlation(ra, rb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(100, 106)))
    parser.add_argument("--only", default=None, help="comma-separated loss names (default: all)")
    parser.add_argument("--synthetic", action="store_true", help="also the paired gain on synthetic-pref")
    parser.add_argument("--dump", default=None, metavar="FILE",
                        help="write every (loss, task, seed) result as JSON lines, to re-aggregate without re-running")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.only.split(",") if args.only else list(LOSSES)
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        parser.error(f"unknown loss(es) {', '.join(unknown)}; known: {', '.join(LOSSES)}")
    suite = load_fitness("pref-suite", {"split": "train"})
    synthetic = load_fitness("synthetic-pref") if args.synthetic else None

    def compile_loss(name: str):
        identifier = name.replace(".", "_").replace("-", "m")
        return compile_genome(HEAD.format(name=identifier) + LOSSES[name][0], suite.interface.arg_counts)

    def synthetic_scores(fn) -> list[float]:
        return [synthetic.score(synthetic.train(fn, s), s).fitness for s in range(100, 104)]

    base_synthetic = synthetic_scores(compile_loss("dpo")) if synthetic else None
    print(f"pref-suite meta-train ({len(suite.tasks)} tasks), seeds {args.seeds}: gain over dpo, mean ± SE over seeds")
    for task in suite.tasks:
        print(f"  {task.name}")
    rows = {}
    for name in names:
        fn = compile_loss(name)
        start = time.perf_counter()
        results = suite.evaluate_many(fn, args.seeds)
        if args.dump:
            with open(args.dump, "a") as out:
                for r in results:
                    out.write(json.dumps({"loss": name, **r.as_record()}) + "\n")
        per_seed = [aggregate([r for r in results if r.seed == s], suite.worst_weight, suite.worst_tolerance, suite.gain_clip) for s in args.seeds]
        mean_gain = mean_se([p["mean_gain"] for p in per_seed])
        robust = mean_se([p["fitness"] for p in per_seed])
        per_task = " ".join(f"{e['gain']:+.3f}" for e in aggregate(results)["per_task"].values())
        line = (f"{name:16s} mean gain {mean_gain[0]:+.4f} ± {mean_gain[1]:.4f}   robust {robust[0]:+.4f} ± "
                f"{robust[1]:.4f}   per task [{per_task}]")
        rows[name] = (mean_gain[0], robust[0])
        if synthetic:
            diffs = [a - b for a, b in zip(synthetic_scores(fn), base_synthetic)]
            gain, se = mean_se(diffs)
            rows[name] += (gain,)
            line += f"   synthetic-pref {gain:+.4f} ± {se:.4f}"
        print(f"{line}   ({LOSSES[name][1]}; {time.perf_counter() - start:.0f} s)", flush=True)
    if synthetic:
        others = [n for n in rows if n != "dpo"]
        near = [n for n in others if n in NEAR]
        for label, group in (("all", others), ("near neighbours of dpo", near)):
            if len(group) > 2:
                rho = spearman([rows[n][2] for n in group], [rows[n][0] for n in group])
                print(f"Spearman(synthetic-pref gain, meta-train mean gain), {label} ({len(group)}): {rho:+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
