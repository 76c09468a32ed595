"""How genomes are made: the operator contract and the built-in operators."""
from operators.base import Context, Elite, Offspring, Operator, OperatorError

__all__ = ["Context", "Elite", "Offspring", "Operator", "OperatorError"]
