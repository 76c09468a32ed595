"""How often the symbolic operator's offspring are valid and new.

Applies many mutations and crossovers (and proposals) to seed losses with a seeded RNG, then
reports the share of offspring that pass the static check (``check_genome``), the share that
also pass the runtime contract check (compile, call on sample inputs: per-example shape,
finite values, a gradient that reaches the inputs), the share of distinct ``code_hash``es, and
the operator's failure rate. ``--evolve`` also runs a steady-state loop in which offspring
replace random members of the population, to show validity and size after many generations.

Usage::

    python benchmarks/symbolic_validity.py                    # built-in fixtures, 500 each
    python benchmarks/symbolic_validity.py --seeds plugin     # fitness.preference seeds
    python benchmarks/symbolic_validity.py -n 200 --evolve 300 --seed 3
"""
from __future__ import annotations

import argparse
import ast
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from engine.candidate import Candidate  # noqa: E402
from engine.genome import GenomeError, check_genome, code_hash, compile_genome  # noqa: E402
from fitness.base import Interface  # noqa: E402
from operators.base import Context, OperatorError  # noqa: E402
from operators.symbolic import SymbolicOperator  # noqa: E402
from tests.fixtures.losses import GENERIC_SEEDS, PREFERENCE_SEEDS, GenericFixture, PreferenceFixture  # noqa: E402

FIXTURES = PREFERENCE_SEEDS
GENERIC_FIXTURES = GENERIC_SEEDS


def suites(which: str) -> list[tuple[str, Interface, dict[str, str]]]:
    if which == "plugin":
        try:
            from fitness.preference import PreferenceInterface, preference_seeds
        except ImportError as exc:
            raise SystemExit(f"--seeds plugin needs fitness/preference.py: {exc}") from exc
        return [("preference plug-in seeds", PreferenceInterface(), {s.name: s.code for s in preference_seeds()})]
    return [("preference fixtures", PreferenceFixture(), FIXTURES), ("generic fixtures", GenericFixture(), GENERIC_FIXTURES)]


def verdict(code: str, interface: Interface) -> str:
    """``static`` / ``runtime`` for the first failed check, ``ok`` otherwise."""
    try:
        check_genome(code, interface.arg_counts)
    except GenomeError:
        return "static"
    try:
        interface.check(compile_genome(code, interface.arg_counts))
    except GenomeError:
        return "runtime"
    return "ok"


def size(code: str) -> int:
    skip = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
    return sum(1 for n in ast.walk(ast.parse(code)) if not isinstance(n, skip))


def report(label: str, offspring: list, failures: int, interface: Interface, seconds: float) -> None:
    if not offspring:
        print(f"  {label:<10} no offspring ({failures} operator failures)")
        return
    verdicts = [verdict(o.code, interface) for o in offspring]
    n = len(offspring)
    static = sum(v != "static" for v in verdicts) / n
    runtime = verdicts.count("ok") / n
    distinct = len({code_hash(o.code) for o in offspring}) / n
    sizes = sorted(size(o.code) for o in offspring)
    names = max(len(o.name) for o in offspring)
    print(
        f"  {label:<10} n={n:<4} static ok {static:6.1%}   runtime ok {runtime:6.1%}   distinct {distinct:6.1%}"
        f"   operator failures {failures / (n + failures):5.1%}   nodes median {sizes[n // 2]} max {sizes[-1]}"
        f"   longest name {names}   {1000 * seconds / (n + failures):.1f} ms/call"
    )


def run_suite(title: str, interface: Interface, seeds: dict[str, str], n: int, evolve: int, seed: int) -> None:
    operator = SymbolicOperator()
    context = Context(interface=interface, rng=random.Random(seed))
    parents = [Candidate(id=i, name=name, code=code) for i, (name, code) in enumerate(seeds.items())]
    rng = context.rng
    print(f"{title} ({len(parents)} seeds: {', '.join(seeds)}), seed {seed}")

    def collect(make, count):
        made, failures, start = [], 0, time.perf_counter()
        for _ in range(count):
            try:
                made.append(make())
            except OperatorError:
                failures += 1
        return made, failures, time.perf_counter() - start

    made = collect(lambda: operator.mutate(rng.choice(parents), context), n)
    report("mutate", made[0], made[1], interface, made[2])
    if len(parents) >= 2:
        made = collect(lambda: operator.crossover(*rng.sample(parents, 2), context), n)
        report("crossover", made[0], made[1], interface, made[2])
    made = collect(lambda: operator.propose(context), max(n // 5, 1))
    report("propose", made[0], made[1], interface, made[2])
    if evolve:
        population = list(parents)
        offspring, failures, start = [], 0, time.perf_counter()
        for step in range(evolve):
            try:
                if rng.random() < 0.5 and len(population) >= 2:
                    child = operator.crossover(*rng.sample(population, 2), context)
                else:
                    child = operator.mutate(rng.choice(population), context)
            except OperatorError:
                failures += 1
                continue
            offspring.append(child)
            if verdict(child.code, interface) == "ok":  # a crude survival rule, enough to churn
                population[rng.randrange(len(population))] = Candidate(id=1000 + step, name=child.name, code=child.code)
        report("evolve", offspring, failures, interface, time.perf_counter() - start)
        best = max(population, key=lambda c: size(c.code))
        print(f"  largest genome after {evolve} steps ({size(best.code)} nodes):")
        print("    " + best.code.rstrip().replace("\n", "\n    "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500, help="mutations and crossovers per suite (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    parser.add_argument("--evolve", type=int, default=0, help="steps of a steady-state loop (default 0: off)")
    parser.add_argument("--seeds", choices=("fixtures", "plugin"), default="fixtures",
                        help="built-in fixtures (default) or the fitness.preference plug-in's seeds")
    args = parser.parse_args(argv)
    for title, interface, seeds in suites(args.seeds):
        run_suite(title, interface, seeds, args.n, args.evolve, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
