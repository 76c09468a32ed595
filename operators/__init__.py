"""How genomes are made: the operator contract and the built-in operators."""
from operators.base import (
    BudgetExhausted, Context, Elite, Offspring, Operator, OperatorError, OperatorExhausted, RecordedRun,
    ReplyCheck, Services,
)

__all__ = [
    "BudgetExhausted", "Context", "Elite", "Offspring", "Operator", "OperatorError", "OperatorExhausted", "RecordedRun",
    "ReplyCheck", "Services",
]
