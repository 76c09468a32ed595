"""The search: a population, its elites and a breeder, driven generation by generation
(:mod:`engine.search.generational`) or in steady state (:mod:`engine.search.steady`), with
noise-aware ranking (:mod:`engine.search.racing`). :class:`engine.engine.Engine` composes them.

Submodules are imported on first use, so that reading a run back (which needs only the racing
estimates) does not import the engine."""
from importlib import import_module

_WHERE = {
    "Breeder": "breeder", "BreedingSettings": "breeder", "Plan": "breeder",
    "ElitePool": "elites", "EliteSettings": "elites", "Individual": "elites",
    "Generational": "generational", "Population": "population", "Tally": "population", "identifier": "population",
    "Racing": "racing", "RacingSettings": "racing", "Estimate": "racing", "SteadyState": "steady",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"engine.search.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'engine.search' has no attribute {name!r}")
