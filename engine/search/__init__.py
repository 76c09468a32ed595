"""The search: a population, its elites and a breeder, driven generation by generation or in
steady state. :class:`engine.engine.Engine` composes them."""
from engine.search.breeder import Breeder, BreedingSettings, Plan
from engine.search.elites import ElitePool, EliteSettings, Individual
from engine.search.generational import Generational
from engine.search.population import Population, Tally, identifier
from engine.search.steady import SteadyState

__all__ = ["Breeder", "BreedingSettings", "ElitePool", "EliteSettings", "Generational", "Individual", "Plan",
           "Population", "SteadyState", "Tally", "identifier"]
