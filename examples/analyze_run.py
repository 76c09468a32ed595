"""Read a finished run with the pandas API: the best losses, fitness per generation, the
operators' success and (optionally) a plot.

Usage: python examples/analyze_run.py RUN [--plot fitness.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from archives import load_run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (holding run.sqlite)")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--plot", help="write best and mean fitness per generation to this PNG")
    args = parser.parse_args(argv)

    run = load_run(args.run)
    print(run)
    print("\nTop losses:")
    print(run.best(args.top)[["name", "fitness", "generation", "operator"]].to_string())

    print("\nBest and mean fitness per generation:")
    print(run.generations[["generation", "best", "max", "mean", "coverage"]].to_string(index=False))

    candidates = run.candidates[run.candidates["operator"] != "seed"]
    if not candidates.empty:
        operators = candidates.groupby("operator").agg(
            made=("id", "size"), valid=("status", lambda s: (s != "invalid").mean()), improved=("improved", "mean"))
        print("\nOperators (share valid, share improving on a parent):")
        print(operators.round(2).to_string())

    best_id = run.best(1).index[0]
    chain = run.lineage(best_id)[["depth", "name", "fitness", "operator"]]
    print(f"\nLineage of the best loss ({run.candidates.loc[best_id, 'name']}):")
    print(chain.to_string())

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        axis = run.generations.plot(x="generation", y=["best", "mean"], marker="o", figsize=(6, 4))
        axis.set_ylabel(f"fitness ({run.fitness_name})")
        plt.tight_layout()
        plt.savefig(args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
