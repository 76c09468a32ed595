"""The symbolic operator: AST-level variation of loss functions, offline and model-free.

Genomes are parsed with :mod:`ast`, transformed and written back with :func:`ast.unparse`, so
offspring stay readable Python. The operator knows nothing about a particular fitness plug-in:
from the interface it reads only ``arg_counts``, ``example`` (for ``propose``), which of
its sample inputs carry a gradient (so offspring keep depending on them) and ``beta`` if it
exposes one.

Every offspring is tidied (duplicate and dead assignments removed, ``--x`` and ``a + -b``
simplified, ``_b`` suffixes renumbered), must pass :func:`engine.genome.check_genome`, stay under
``max_nodes`` syntax nodes, differ from its parents by :func:`engine.genome.code_hash`, and keep
a gradient path to the inputs that carry one (a static check that also spots linear
cancellations such as ``(pc - pr) - (pc - pr)``, comparisons and ``.detach()``). The driver never
runs genome code; runtime failures (overflow, say) are left to the interface's checks.

Modules: :mod:`~operators.symbolic.operator` (:class:`SymbolicOperator`: options, drawing a
kind, checks, names), :mod:`~operators.symbolic.mutations` (the five mutation kinds),
:mod:`~operators.symbolic.crossovers` (``blend``, ``gate``, ``splice``),
:mod:`~operators.symbolic.simplify` (tidying and the gradient-liveness check),
:mod:`~operators.symbolic.sites` (where a loss can be varied: primitives, weight constants, the
returned loss, margins, sums) and :mod:`~operators.symbolic.ast_helpers` (parsing, rendering,
names, data flow).
"""
from operators.symbolic.crossovers import CROSSOVERS
from operators.symbolic.mutations import MUTATIONS
from operators.symbolic.operator import SymbolicOperator
from operators.symbolic.sites import PRIMITIVES

__all__ = ["CROSSOVERS", "MUTATIONS", "PRIMITIVES", "SymbolicOperator"]
