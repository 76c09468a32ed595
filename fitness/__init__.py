"""How genomes are scored: the fitness plug-in contract and the built-in plug-ins."""
from fitness.base import Descriptor, Fitness, Interface, Score, Seed

__all__ = ["Descriptor", "Fitness", "Interface", "Score", "Seed"]
