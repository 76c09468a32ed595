"""Re-scoring a run's losses on another fitness plug-in or preset: held-out transfer, as the
DiscoPOP paper (Lu et al. 2024, sec. 5) checked its discovered losses on Alpaca Eval,
TL;DR summarisation and IMDb after discovering them on MT-Bench.

The scores go into the same run store (``evaluations`` with ``fitness_name`` set to a label
naming the plug-in, its options and seed), so ``replay`` shows them beside the run's own
fitness and a repeated call only scores what is still missing.
"""
from __future__ import annotations

from collections.abc import Callable

from archives.reading import RunData
from archives.store import RunStore
from engine.candidate import Candidate, EvalResult




def choose(data: RunData, top: int | None = None, elites: bool = False,
           ids: list[int] | None = None) -> list[Candidate]:
    """The candidates to re-score: explicit ``ids``, the archive's ``elites``, or the ``top``
    best by the run's own ranking (the lower confidence bound where it re-measured; in that order of
    precedence), best first.

    Raises:
        ValueError: An id the run does not hold.
    """
    if ids:
        missing = [i for i in ids if i not in data.candidates]
        if missing:
            raise ValueError(f"--ids: the run has no candidate {missing}")
        return [data.candidates[i] for i in ids]
    if elites:
        return [data.candidates[e["id"]] for e in data.elites() if e["id"] in data.candidates]
    from engine.search.racing import ranked

    return [candidate for candidate, _ in ranked(data)[: top or 0]]


def reevaluate(store: RunStore, label: str, candidates: list[Candidate], executor, seed: int,
               on_result: Callable[[EvalResult], None] | None = None) -> list[EvalResult]:
    """Score ``candidates`` with ``executor`` (whose plug-in is the other fitness) and store
    each result under ``label`` as it finishes."""
    results: list[EvalResult] = []

    def record(result: EvalResult) -> None:
        store.add_evaluation(result, label)
        results.append(result)
        if on_result is not None:
            on_result(result)

    executor.run([(c.id, c.code) for c in candidates], seed, None, record)
    return results
