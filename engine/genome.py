"""Genomes are untrusted code: an allow-list static check, restricted compilation, inputs
detached from the caller's graph, hashing, and short error lines.

A genome is the source of exactly one function (a loss), written by an LLM or a symbolic
operator: adversarial input. Three layers stand between it and the process that scores it;
this module holds the first and the inner part of the third:

1. **The static check** (:func:`check_genome`) runs on the syntax tree only; the driver never
   executes a genome. Only ``torch.X``, ``torch.linalg.X``, ``torch.special.X``, ``F.X``
   (``torch.nn.functional``, also spelled ``torch.nn.functional.X``) and ``math.X`` from the
   curated lists of :mod:`engine.allowlist` may be named; ``torch``, ``F`` and ``math`` may
   appear nowhere else (no aliasing, no chains through modules such as ``torch.builtins``).
   Other attributes must be on the tensor allow-list (no autograd internals, storage, hooks
   or in-place methods), no name or attribute starts with ``_``, and a short list of
   constructs is refused outright (classes, decorators, ``try``, ``with``, ``global``, walrus,
   f-strings, ``match``, generators).
2. **Restricted namespaces** (:func:`compile_genome`): the compiled function sees ``torch``,
   ``F`` and ``math`` as read-only proxies that expose only the allow-listed names, and
   ``__builtins__`` holds only the safe builtins, so a gap in the checker still cannot reach
   ``torch.builtins`` or ``__import__``.
3. **Detached inputs**: the compiled callable hands the genome detached leaf copies of its
   tensor inputs (and a fresh record of plain hyper-parameters in place of any other object,
   such as the paper's ``self``) and relays the gradient back to the caller's graph through a
   custom :class:`torch.autograd.Function`. Nothing a genome holds leads to the model's
   parameters, an optimiser or the plug-in's objects.

The OS jail, the fresh process per genome and the deadlines live in the executors. Every
helper here that the driver calls on a genome (parse, check, normalise, hash, size) raises
only :class:`GenomeError`, whatever the input: a reply cannot crash the driver.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import hashlib
import math
import types
from typing import Any
from collections.abc import Callable

from engine.allowlist import (
    FORBIDDEN_KEYWORDS, FUNCTIONAL_FUNCTIONS, LINALG_FUNCTIONS, MATH_NAMES, MODULE_MEMBERS,
    SAFE_BUILTIN_NAMES, SELF_ATTRIBUTES, SPECIAL_FUNCTIONS, TORCH_SUBMODULES, VALUE_ATTRIBUTES,
)

#: Builtins a loss function may call; everything else (open, exec, getattr, ...) is absent.
SAFE_BUILTINS = {name: getattr(builtins, name) for name in SAFE_BUILTIN_NAMES if hasattr(builtins, name)}

#: Module names a genome may import (they are provided anyway) and what they bind.
ALLOWED_IMPORTS = {"torch": "torch", "math": "math", "torch.nn.functional": "F"}

#: The names that stand for the (restricted) modules inside a genome.
MODULE_NAMES = frozenset(MODULE_MEMBERS)

#: Names refused with a specific message (they are not in the namespace either way). Other
#: modules use this set to avoid generating such names.
FORBIDDEN_NAMES = frozenset({
    "open", "exec", "eval", "compile", "getattr", "setattr", "delattr", "hasattr", "globals",
    "locals", "vars", "__import__", "input", "print", "breakpoint", "help", "dir", "type",
    "object", "super", "memoryview", "bytearray", "bytes", "classmethod", "staticmethod",
    "property", "exit", "quit", "os", "sys", "subprocess", "socket", "builtins", "importlib",
    "inspect", "ctypes", "shutil", "pathlib", "pickle", "numpy", "np", "gc",
})

MAX_SOURCE_CHARS = 20_000
MAX_AST_NODES = 3_000
#: Deepest syntax tree accepted. Losses seen so far nest about 15 deep; the recursive
#: helpers (normalising, unparsing, compiling) stay far from Python's recursion limit here.
MAX_AST_DEPTH = 100

#: Statements and expressions a loss never needs, each refused with the reason shown.
_REFUSED_NODES: dict[type, str] = {
    ast.Global: "'global' statements are not allowed",
    ast.Nonlocal: "'nonlocal' statements are not allowed",
    ast.ClassDef: "class definitions are not allowed",
    ast.AsyncFunctionDef: "async code is not allowed",
    ast.Await: "async code is not allowed",
    ast.AsyncFor: "async code is not allowed",
    ast.AsyncWith: "async code is not allowed",
    ast.Yield: "generators are not allowed",
    ast.YieldFrom: "generators are not allowed",
    ast.With: "'with' blocks are not allowed",
    ast.Try: "try/except is not allowed in a loss function (let errors surface)",
    ast.NamedExpr: "assignment expressions (:=) are not allowed; use a plain assignment",
    ast.JoinedStr: "f-strings are not allowed in a loss function",
    ast.Match: "match statements are not allowed",
}
if hasattr(ast, "TryStar"):  # Python 3.11+
    _REFUSED_NODES[ast.TryStar] = _REFUSED_NODES[ast.Try]

#: Attributes that a genome might reach for to tamper with the model or the process, with
#: the reason; anything else missing from the allow-list gets the generic message.
_INTERNAL_ATTRIBUTES = {
    **dict.fromkeys(("grad_fn", "next_functions", "variable", "grad", "data", "requires_grad",
                     "is_leaf", "backward", "retain_grad", "register_hook",
                     "register_post_accumulate_grad_hook", "output_nr"),
                    "it reaches autograd internals (the loss must not touch the model's graph)"),
    **dict.fromkeys(("storage", "untyped_storage", "data_ptr", "as_strided", "new_empty",
                     "pin_memory", "numpy", "tofile"),
                    "it reaches raw memory or leaves torch"),
    **dict.fromkeys(("format", "format_map"), "format strings read attributes by name"),
}

_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means an allocation failed (a MemoryError or torch's allocator)."""
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MARKERS)


class GenomeError(Exception):
    """A genome failed a check. ``status`` says how (``invalid`` for all static checks)."""

    def __init__(self, message: str, status: str = "invalid") -> None:
        super().__init__(message)
        self.status = status


def _never_raises_else(helper: Callable) -> Callable:
    """Make ``helper`` raise only :class:`GenomeError` (status ``invalid``): the driver calls
    it on untrusted source, and a RecursionError or MemoryError there must not end the run."""

    @functools.wraps(helper)
    def guarded(*args, **kwargs):
        try:
            return helper(*args, **kwargs)
        except GenomeError:
            raise
        except RecursionError as exc:
            raise GenomeError("the genome is nested too deeply to analyse (RecursionError)") from exc
        except MemoryError as exc:
            raise GenomeError("out of memory while analysing the genome (MemoryError)") from exc
        except Exception as exc:  # noqa: BLE001 - any other failure on hostile input is the genome's
            raise GenomeError(f"cannot analyse the genome: {short_error(exc)}") from exc

    return guarded


# -- parsing -------------------------------------------------------------------------------
def _parse(code: Any) -> ast.Module:
    """Parse and bound the size of ``code``; no recursion deeper than :data:`MAX_AST_DEPTH`
    happens after this returns."""
    if not isinstance(code, str):
        raise GenomeError(f"genome code must be a string, got {type(code).__name__}")
    if len(code) > MAX_SOURCE_CHARS:
        raise GenomeError(f"genome is {len(code)} characters long; the limit is {MAX_SOURCE_CHARS}")
    try:
        module = ast.parse(code)
    except SyntaxError as exc:
        raise GenomeError(f"syntax error on line {exc.lineno}: {exc.msg}") from exc
    except (ValueError, RecursionError, MemoryError) as exc:
        raise GenomeError(f"cannot parse genome: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if code in _WITHIN_BOUNDS:  # the same source parses to the same tree: bounded once is enough
        return module
    # Iterative walk: counting must not itself recurse on a hostile tree.
    stack, count = [(module, 1)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_AST_DEPTH:
            raise GenomeError(
                f"line {getattr(node, 'lineno', '?')}: the genome nests {MAX_AST_DEPTH}+ levels deep "
                f"(expressions inside expressions); the limit is {MAX_AST_DEPTH}: use intermediate variables"
            )
        if count > MAX_AST_NODES:
            raise GenomeError(f"genome has over {MAX_AST_NODES} syntax nodes; the limit is {MAX_AST_NODES}")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    if len(_WITHIN_BOUNDS) >= 4096:
        _WITHIN_BOUNDS.clear()
    _WITHIN_BOUNDS.add(code)
    return module


_WITHIN_BOUNDS: set[str] = set()  # sources whose trees passed the size and depth bounds


def _parse_genome(code: str) -> tuple[ast.Module, ast.FunctionDef]:
    module = _parse(code)
    functions = []
    for node in module.body:
        if isinstance(node, ast.FunctionDef):
            functions.append(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            _check_import(node)
        elif _is_docstring(node):
            continue
        else:
            raise GenomeError(
                f"line {node.lineno}: only one function (plus imports of torch, "
                f"torch.nn.functional as F, math) may appear at module level, found "
                f"{type(node).__name__}"
            )
    if len(functions) != 1:
        found = ", ".join(f.name for f in functions) or "none"
        raise GenomeError(f"a genome must define exactly one function, found {len(functions)} ({found})")
    return module, functions[0]


@_never_raises_else
def parse_genome(code: str) -> tuple[ast.Module, ast.FunctionDef]:
    """Parse ``code`` and return the module and its single function.

    Raises:
        GenomeError: not a string, too long or too deep, a syntax error, or not exactly one
            function (plus imports of the provided modules and a docstring).
    """
    return _parse_genome(code)


# -- the static check -----------------------------------------------------------------------
@_never_raises_else
def check_genome(code: str, arg_counts: tuple[int, ...] | None = None) -> ast.FunctionDef:
    """Run every static safety check on ``code`` and return its function definition.

    Args:
        code: The genome's source.
        arg_counts: Allowed numbers of positional parameters, if the interface fixes them.

    Raises:
        GenomeError: with a message that names the line and the rule broken.
    """
    return _checked(code, arg_counts)[1]


def _checked(code: str, arg_counts: tuple[int, ...] | None) -> tuple[ast.Module, ast.FunctionDef]:
    """The checks of :func:`check_genome`; the module and its function, parsed afresh."""
    if not isinstance(code, str):
        raise GenomeError(f"genome code must be a string, got {type(code).__name__}")
    # Operators and the engine check the same source several times; passing checks are cached.
    _check_cached(code, tuple(arg_counts) if arg_counts is not None else None)
    return _parse_genome(code)


_checked_module = _never_raises_else(_checked)  # for compile_genome, which needs the module too


@functools.lru_cache(maxsize=4096)
def _check_cached(code: str, arg_counts: tuple[int, ...] | None) -> None:
    _check_uncached(code, arg_counts)


def _check_uncached(code: str, arg_counts: tuple[int, ...] | None = None) -> ast.FunctionDef:
    """The checks behind :func:`check_genome`."""
    module, function = _parse_genome(code)
    if arg_counts is not None:
        n_args = len(function.args.posonlyargs) + len(function.args.args)
        if n_args not in arg_counts or function.args.vararg or function.args.kwarg:
            expected = " or ".join(str(n) for n in arg_counts)
            raise GenomeError(
                f"function {function.name!r} takes {n_args} positional parameters; the interface "
                f"expects {expected} (and no *args/**kwargs)"
            )
    _Checker(module, function).run()
    return function


class _Checker:
    """One pass over a parsed genome that applies the allow-list rules to every node."""

    def __init__(self, module: ast.Module, function: ast.FunctionDef) -> None:
        self.module = module
        self.bound = _bound_names(function)
        self.allowed = set(SAFE_BUILTINS) | self.bound
        self.parents: dict[ast.AST, ast.AST] = {}
        # Annotations are never evaluated (compile_genome strips them); inside them only the
        # rules against private and forbidden names apply.
        self.annotation_nodes: set[int] = set()

    def run(self) -> None:
        # Each construct is looked at as a whole first (check_structure), then its parts,
        # children before their parent, in source order, so that the innermost problem is
        # reported (``torch.builtins`` rather than the ``.open`` read from it).
        stack: list[tuple[ast.AST, bool]] = [(self.module, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                self.check(node)
                continue
            self.check_structure(node)
            stack.append((node, True))
            children = list(ast.iter_child_nodes(node))
            for child in children:
                self.parents[child] = node
            stack.extend((child, False) for child in reversed(children))

    def line(self, node: ast.AST) -> Any:
        while node is not None and getattr(node, "lineno", None) is None:
            node = self.parents.get(node)
        return getattr(node, "lineno", "?")

    def check_structure(self, node: ast.AST) -> None:
        """Rules about a construct as a whole, applied before its parts are looked at."""
        annotation = None
        if isinstance(node, ast.arg):
            annotation = node.annotation
        elif isinstance(node, ast.FunctionDef):
            annotation = node.returns
        elif isinstance(node, ast.AnnAssign):
            annotation = node.annotation
        if annotation is not None:
            self.annotation_nodes.update(id(n) for n in ast.walk(annotation))
        refused = _REFUSED_NODES.get(type(node))
        if refused:
            raise GenomeError(f"line {self.line(node)}: {refused}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            _check_import(node)
        elif isinstance(node, ast.FunctionDef):
            self.check_function(node, self.line(node))
        elif isinstance(node, ast.Lambda):
            for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                if not _is_immutable_literal(default):
                    raise GenomeError(
                        f"line {self.line(node)}: lambda defaults must be constant numbers, strings or tuples")

    def check(self, node: ast.AST) -> None:
        """Rules about names, attributes, calls and literals."""
        line = self.line(node)
        if isinstance(node, ast.arg):
            self.check_binding(node.arg, line)
        elif isinstance(node, ast.Name):
            self.check_name(node, line)
        elif isinstance(node, ast.Attribute):
            self.check_attribute(node, line)
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg is None:
                    raise GenomeError(f"line {line}: '**' in a call is not allowed; pass keywords by name")
                if keyword.arg in FORBIDDEN_KEYWORDS:
                    raise GenomeError(
                        f"line {line}: keyword {keyword.arg!r} is not allowed: it writes into an existing "
                        "tensor; use the function's return value"
                    )
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            # Item assignment on a local tensor is fine (the inputs are copies); on self it is not.
            root = node.value
            while isinstance(root, (ast.Subscript, ast.Attribute)):
                root = root.value
            if isinstance(root, ast.Name) and root.id in MODULE_NAMES | {"self"}:
                raise GenomeError(f"line {line}: item assignment on {root.id!r} is not allowed")
        elif isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            raise GenomeError(f"line {line}: bytes literals are not allowed")

    def check_function(self, node: ast.FunctionDef, line: Any) -> None:
        self.check_binding(node.name, line)
        if node.decorator_list:
            raise GenomeError(f"line {line}: decorators are not allowed (function {node.name!r})")
        if node.returns is not None and not _is_plain_annotation(node.returns):
            raise GenomeError(f"line {line}: return annotations may only name types")
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            if not _is_immutable_literal(default):
                raise GenomeError(
                    f"line {line}: default arguments must be constant numbers, strings or tuples "
                    f"(function {node.name!r})"
                )
        arguments = node.args
        for arg in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg):
            if arg is not None and arg.annotation is not None and not _is_plain_annotation(arg.annotation):
                raise GenomeError(f"line {line}: parameter annotations may only name types")

    def check_binding(self, name: str, line: Any) -> None:
        if name.startswith("__"):
            raise GenomeError(f"line {line}: dunder name {name!r} is not allowed")
        if name in FORBIDDEN_NAMES:
            raise GenomeError(f"line {line}: name {name!r} is not allowed in a loss function")
        if name in MODULE_NAMES:
            raise GenomeError(f"line {line}: {name!r} names a provided module and cannot be rebound")

    def check_name(self, node: ast.Name, line: Any) -> None:
        if not isinstance(node.ctx, ast.Load):
            self.check_binding(node.id, line)
            return
        if node.id.startswith("__"):
            raise GenomeError(f"line {line}: dunder name {node.id!r} is not allowed")
        if node.id in FORBIDDEN_NAMES:
            raise GenomeError(f"line {line}: name {node.id!r} is not allowed in a loss function")
        if id(node) in self.annotation_nodes:
            return  # never evaluated: ``pred: Tensor`` needs no name ``Tensor``
        if node.id in MODULE_NAMES:
            parent = self.parents.get(node)
            if not (isinstance(parent, ast.Attribute) and parent.value is node):
                raise GenomeError(
                    f"line {line}: {node.id!r} may only be used as {node.id}.<name> (a function from "
                    "the allow-list), not as a value"
                )
            return
        if node.id not in self.allowed:
            raise GenomeError(
                f"line {line}: name {node.id!r} is not defined; a genome may use its parameters, "
                "its own variables, torch, F (torch.nn.functional), math and basic builtins"
            )

    def check_attribute(self, node: ast.Attribute, line: Any) -> None:
        attr = node.attr
        if attr.startswith("_"):
            raise GenomeError(f"line {line}: private or dunder attribute {attr!r} is not allowed")
        if not isinstance(node.ctx, ast.Load):
            raise GenomeError(f"line {line}: assigning or deleting attributes ({attr!r}) is not allowed")
        if id(node) in self.annotation_nodes:
            return
        base = node.value
        if isinstance(base, ast.Name) and base.id in MODULE_NAMES:
            if base.id == "torch" and attr in TORCH_SUBMODULES:
                parent = self.parents.get(node)
                if not (isinstance(parent, ast.Attribute) and parent.value is node):
                    raise GenomeError(
                        f"line {line}: torch.{attr} may only be used as torch.{attr}.<function>, not as a value"
                    )
                return  # the function name is checked on the parent node
            if base.id == "torch" and attr == "nn":
                # torch.nn.functional.<function> is accepted as another spelling of F.<function>.
                parent = self.parents.get(node)
                grandparent = self.parents.get(parent)
                if not (isinstance(parent, ast.Attribute) and parent.value is node and parent.attr == "functional"
                        and isinstance(grandparent, ast.Attribute) and grandparent.value is parent):
                    raise GenomeError(
                        f"line {line}: only torch.nn.functional.<function> may be used from torch.nn "
                        "(or F.<function>, F is provided)"
                    )
                return
            if attr not in MODULE_MEMBERS[base.id]:
                raise GenomeError(
                    f"line {line}: '{base.id}.{attr}' is not on the allow-list of {_MODULE_LABELS[base.id]} "
                    "a loss may use (tensor maths, reductions, comparison and shape functions only)"
                )
            return
        if (isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "torch"
                and base.attr in TORCH_SUBMODULES):
            if attr not in TORCH_SUBMODULES[base.attr]:
                raise GenomeError(f"line {line}: 'torch.{base.attr}.{attr}' is not on the allow-list")
            return
        if _is_torch_nn(base):
            return  # torch.nn.functional, checked on the parent node
        if isinstance(base, ast.Attribute) and _is_torch_nn(base.value) and base.attr == "functional":
            if attr not in FUNCTIONAL_FUNCTIONS:
                raise GenomeError(
                    f"line {line}: 'torch.nn.functional.{attr}' is not on the allow-list of "
                    f"{_MODULE_LABELS['F']} a loss may use"
                )
            return
        if isinstance(base, ast.Name) and base.id == "self" and "self" in self.bound:
            if attr not in SELF_ATTRIBUTES:
                offered = ", ".join(f"self.{name}" for name in sorted(SELF_ATTRIBUTES))
                raise GenomeError(f"line {line}: 'self.{attr}' is not available; self offers {offered}")
            return
        if attr in VALUE_ATTRIBUTES:
            return
        if attr in _INTERNAL_ATTRIBUTES:
            raise GenomeError(f"line {line}: attribute {attr!r} is not allowed: {_INTERNAL_ATTRIBUTES[attr]}")
        if attr.endswith("_") and attr[:-1] in VALUE_ATTRIBUTES:
            raise GenomeError(
                f"line {line}: in-place method {attr!r} is not allowed; use the out-of-place {attr[:-1]!r} "
                "and its return value"
            )
        raise GenomeError(
            f"line {line}: attribute {attr!r} is not on the allow-list of tensor methods and properties "
            "(it may reach files, the network, native code, process-wide state or the autograd graph)"
        )


def _is_torch_nn(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "nn" and isinstance(node.value, ast.Name)
            and node.value.id == "torch")


_MODULE_LABELS = {"torch": "torch functions", "F": "torch.nn.functional (F) functions", "math": "math functions"}


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(
        node.value.value, str
    )


def _check_import(node: ast.Import | ast.ImportFrom) -> None:
    if isinstance(node, ast.ImportFrom):
        if node.module == "torch.nn" and all(a.name == "functional" and a.asname == "F" for a in node.names):
            return
        raise GenomeError(
            f"line {node.lineno}: 'from {node.module} import ...' is not allowed; torch, "
            "F (torch.nn.functional) and math are already available"
        )
    for alias in node.names:
        expected = ALLOWED_IMPORTS.get(alias.name)
        bound = alias.asname or alias.name
        if expected is None or (bound != expected and not (alias.name == "torch.nn.functional" and bound == "torch")):
            raise GenomeError(
                f"line {node.lineno}: import of {alias.name!r} is not allowed; only torch, "
                "torch.nn.functional as F and math may be used"
            )


def _bound_names(function: ast.FunctionDef) -> set[str]:
    """Names the genome binds itself: parameters, assignments, loop targets, comprehensions."""
    names: set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
    return names


_IMMUTABLE = (int, float, complex, str, bool, type(None))


def _is_immutable_literal(node: ast.AST) -> bool:
    """A default value that cannot carry state from one call to the next."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False

    def immutable(v: Any) -> bool:
        return isinstance(v, _IMMUTABLE) or (isinstance(v, tuple) and all(immutable(x) for x in v))

    return immutable(value)


def _is_plain_annotation(node: ast.AST) -> bool:
    """An annotation that only names things (``torch.Tensor``, ``float``, a string)."""
    return all(
        isinstance(n, (ast.Name, ast.Attribute, ast.Constant, ast.Load, ast.Subscript, ast.Tuple, ast.BinOp, ast.BitOr))
        for n in ast.walk(node)
    )


# -- compilation -----------------------------------------------------------------------------
def compile_genome(code: str, arg_counts: tuple[int, ...] | None = None, *, check: bool = True,
                   restrict: bool = True) -> Callable:
    """Check ``code`` statically, then build its function in a restricted namespace.

    Only call this inside an evaluation worker: building the function runs no genome code
    when the check is on (module level holds only imports and the ``def``), but calling it
    does. The function returned takes the same arguments as the genome and hands it detached
    copies (see :func:`isolate_inputs`); it carries its source as ``__evoloss_source__``.

    Args:
        code: The genome's source.
        arg_counts: Allowed numbers of positional parameters, if the interface fixes them.
        check: Run the static check. Off only for tests of the other layers and for a
            jail-only mode: module-level code then runs here.
        restrict: Bind ``torch``, ``F``, ``math`` and ``__builtins__`` to the allow-listed
            views. Off only for a jail-only mode (plain Python with full builtins and imports).

    Raises:
        GenomeError: the check failed, or the module could not be built.
    """
    if check:
        module, function = _checked_module(code, arg_counts)
    else:
        module, function = _parse_unchecked(code)
    module = _Executable(drop_imports=restrict).visit(module)
    namespace = restricted_namespace() if restrict else _plain_namespace()
    try:
        exec(compile(ast.fix_missing_locations(module), "<genome>", "exec"), namespace)  # noqa: S102
    except BaseException as exc:  # noqa: BLE001 - with the check off, module level may raise anything
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise GenomeError(f"cannot build function: {short_error(exc)}") from exc
    raw = namespace.get(function.name)
    if not callable(raw):
        raise GenomeError(f"cannot build function: {function.name!r} is not defined after running the module")
    fn = isolate_inputs(raw)
    # The source travels with the function: a plug-in that trains in other processes (the dpo
    # plug-in's accelerate launcher) compiles it there again from this text.
    fn.__evoloss_source__ = code
    return fn


@_never_raises_else
def _parse_unchecked(code: str) -> tuple[ast.Module, ast.FunctionDef]:
    """Parse without the static check: any module-level code, exactly one top-level ``def``."""
    module = _parse(code)
    functions = [n for n in module.body if isinstance(n, ast.FunctionDef)]
    if len(functions) != 1:
        found = ", ".join(f.name for f in functions) or "none"
        raise GenomeError(f"a genome must define exactly one function, found {len(functions)} ({found})")
    return module, functions[0]


class _Executable(ast.NodeTransformer):
    """The tree that is compiled: annotations removed (never evaluated, so they cannot run
    code or need names outside the allow-list) and, in the restricted namespace, the imports
    of the provided modules replaced by ``pass`` (the names are bound already; any other
    import fails there because ``__import__`` is absent)."""

    def __init__(self, drop_imports: bool) -> None:
        self.drop_imports = drop_imports

    def _provided(self, node: ast.Import | ast.ImportFrom) -> bool:
        try:
            _check_import(node)
        except GenomeError:
            return False
        return True

    def visit_Import(self, node: ast.Import) -> ast.AST:
        return ast.copy_location(ast.Pass(), node) if self.drop_imports and self._provided(node) else node

    visit_ImportFrom = visit_Import

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.returns = None
        self.generic_visit(node)
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.annotation = None
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        self.generic_visit(node)
        if node.value is None:
            return ast.copy_location(ast.Pass(), node)
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


def _plain_namespace() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    return {"__builtins__": builtins, "torch": torch, "F": F, "math": math, "__name__": "genome"}


def restricted_namespace() -> dict[str, Any]:
    """Globals for a genome: read-only allow-listed views of ``torch`` (with ``linalg`` and
    ``special``), ``F`` and ``math``, and the safe builtins. Built fresh for each genome, so
    nothing one genome does to its namespace is seen by another."""
    torch_members, functional_members, math_members, linalg_members, special_members = _view_bodies()
    functional_view = _read_only_view("F", functional_members)
    torch_view = _read_only_view("torch", {
        **torch_members,
        "linalg": staticmethod(_read_only_view("torch.linalg", linalg_members)),
        "special": staticmethod(_read_only_view("torch.special", special_members)),
        # torch.nn.functional.<function> is another spelling of F.<function>.
        "nn": _read_only_view("torch.nn", {"functional": staticmethod(functional_view)}),
    })
    return {
        "__builtins__": dict(SAFE_BUILTINS),
        "__name__": "genome",
        "torch": torch_view,
        "F": functional_view,
        "math": _read_only_view("math", math_members),
    }


def warm_up() -> None:
    """Build, once per process, what every compiled genome shares: the allow-listed member
    tables and the relay's autograd Function. A warm worker calls this before it forks a
    process per genome, so that no genome's evaluation pays for it."""
    _view_bodies()
    _relay()


@functools.lru_cache(maxsize=1)
def _resolved_members() -> tuple[dict[str, Any], ...]:
    """The allow-listed objects themselves, looked up once per process. A name the
    installed torch lacks is left out (the allow-list test reports it)."""
    import torch
    import torch.nn.functional as F

    def members(module: Any, names: frozenset[str]) -> dict[str, Any]:
        found = {name: getattr(module, name, None) for name in sorted(names)}
        return {name: value for name, value in found.items()
                if value is not None and not isinstance(value, types.ModuleType)}

    return (
        members(torch, MODULE_MEMBERS["torch"]), members(F, FUNCTIONAL_FUNCTIONS), members(math, MATH_NAMES),
        members(torch.linalg, LINALG_FUNCTIONS), members(torch.special, SPECIAL_FUNCTIONS),
    )


@functools.lru_cache(maxsize=1)
def _view_bodies() -> tuple[dict[str, Any], ...]:
    """The class bodies of the views: each member wrapped so that reading it from an
    instance gives the member itself (a Python function would otherwise bind as a method).
    Built once per process (wrapping ~400 members costs milliseconds); the classes that hold
    them are made fresh for each genome."""
    return tuple({name: staticmethod(value) for name, value in members.items()} for members in _resolved_members())


_REFUSAL = compile(
    "def __getattr__(self, name):\n"
    "    raise AttributeError(LABEL + '.' + name + ' is not available to a genome (not on the allow-list)')\n",
    "<allow-list>", "exec",
)


def _read_only_view(label: str, body: dict[str, Any]) -> Any:
    """An object whose attributes are exactly the members in ``body``: no ``__dict__``, no
    attribute assignment, and nothing on it (its class, its ``__getattr__`` and that
    function's globals) refers to the module the members were taken from."""
    # The refusal runs against a globals dict of its own, not this module's (which holds
    # modules such as builtins).
    scope: dict[str, Any] = {"__builtins__": {}, "AttributeError": AttributeError, "LABEL": label}
    exec(_REFUSAL, scope)  # noqa: S102 - fixed source
    namespace = dict(body)
    namespace.update(__slots__=(), __getattr__=scope["__getattr__"], __module__="genome",
                     __doc__=f"The allow-listed names of {label} a genome may use (read-only).")
    return type(label, (), namespace)()


# -- inputs detached from the caller's graph ---------------------------------------------------
class _Slot:
    """Where the ``index``-th tensor argument goes back in."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


_PLAIN = (bool, int, float, complex, str, type(None))


def isolate_inputs(genome: Callable) -> Callable:
    """Wrap ``genome`` so that it only ever sees copies of what it is called with.

    Each tensor argument becomes a detached leaf copy (requiring grad like the original);
    plain values pass as they are; any other object (the paper's ``self``) becomes a fresh
    :class:`types.SimpleNamespace` of its public plain attributes (numbers, strings, tuples of
    them, tensors as detached copies). When the caller needs a gradient, the genome runs
    inside a custom :class:`torch.autograd.Function` whose backward relays the gradient of the
    genome's outputs with respect to the copies onto the originals, so the values and
    gradients are those of calling the genome directly, but nothing the genome holds
    (``losses.grad_fn.next_functions``...) leads past its own inputs. Tensors the genome
    returns are detached from its own graph; a tuple (TRL-style ``(losses, chosen_rewards,
    rejected_rewards)``) keeps its shape. Double backward is not supported.

    ``inspect.signature`` of the wrapper is the genome's (through ``__wrapped__``).
    """

    @functools.wraps(genome)
    def call(*args: Any, **kwargs: Any) -> Any:
        import torch

        tensors: list[torch.Tensor] = []
        arg_template = [_template(value, tensors) for value in args]
        kwarg_template = {key: _template(value, tensors) for key, value in kwargs.items()}

        def run(leaves: list[torch.Tensor]) -> Any:
            return genome(*(_fill(v, leaves) for v in arg_template),
                          **{key: _fill(v, leaves) for key, v in kwarg_template.items()})

        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return run([_plain_tensor(t) for t in tensors])
        shape: list[Any] = []

        def flat_run(leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            result = run(leaves)
            flat, structure = _flatten_output(result)
            shape.append(structure)
            return flat

        outputs = _relay().apply(flat_run, *tensors)
        return _rebuild_output(shape[0], outputs)

    return call


def _template(value: Any, tensors: list) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_template(v, tensors) for v in value)
    if type(value) is dict:
        return {key: _template(v, tensors) for key, v in value.items() if isinstance(key, _PLAIN)}
    return _hyperparameters(value)


def _fill(template: Any, leaves: list) -> Any:
    if isinstance(template, _Slot):
        return leaves[template.index]
    if isinstance(template, (list, tuple)):
        return type(template)(_fill(v, leaves) for v in template)
    if type(template) is dict:
        return {key: _fill(v, leaves) for key, v in template.items()}
    return template


def _hyperparameters(source: Any) -> types.SimpleNamespace:
    """A fresh record of ``source``'s public plain attributes (the paper's ``self.beta``)."""
    try:
        items = dict(vars(source))
    except TypeError:  # no __dict__: a slotted dataclass gives its fields, anything else nothing
        items = {}
        if dataclasses.is_dataclass(source) and not isinstance(source, type):
            items = {f.name: getattr(source, f.name, None) for f in dataclasses.fields(source)}
    record = {}
    for name, value in items.items():
        if isinstance(name, str) and name.isidentifier() and not name.startswith("_"):
            plain = _plain_copy(value)
            if plain is not _NOT_PLAIN:
                record[name] = plain
    return types.SimpleNamespace(**record)


_NOT_PLAIN = object()


def _plain_copy(value: Any) -> Any:
    import torch

    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return _plain_tensor(value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        items = tuple(_plain_copy(v) for v in value)
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


def _plain_tensor(tensor: Any) -> Any:
    """A detached copy of ``tensor`` as a plain :class:`torch.Tensor` (a subclass, such as a
    Parameter or one whose ``__torch_function__`` runs the caller's code, is not passed on)."""
    import torch

    copy = tensor.detach()
    if type(copy) is not torch.Tensor:
        copy = copy.as_subclass(torch.Tensor)
    return copy.clone()


def _flatten_output(result: Any) -> tuple[tuple, tuple]:
    import torch

    if isinstance(result, torch.Tensor):
        return (result,), ("tensor",)
    if isinstance(result, (tuple, list)):
        positions = [i for i, v in enumerate(result) if isinstance(v, torch.Tensor)]
        return tuple(result[i] for i in positions), ("sequence", result, positions)
    return (), ("other", result)


def _rebuild_output(structure: tuple, outputs: tuple) -> Any:
    kind = structure[0]
    if kind == "tensor":
        return outputs[0]
    if kind == "other":
        return structure[1]
    _, original, positions = structure
    items = list(original)
    for position, tensor in zip(positions, outputs):
        items[position] = tensor
    if isinstance(original, tuple) and hasattr(original, "_fields"):
        return type(original)(*items)
    return type(original)(items)


@functools.lru_cache(maxsize=1)
def _relay() -> type:
    """The autograd Function that runs a genome on detached copies (built on first use, so
    that importing this module does not import torch)."""
    import torch
    from torch.autograd.function import once_differentiable

    class GenomeRelay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run, *tensors):  # autograd's signature
            leaves = [_plain_tensor(t).requires_grad_(True) if t.requires_grad else _plain_tensor(t) for t in tensors]
            with torch.enable_grad():
                outputs = run(leaves)
            ctx.set_materialize_grads(False)
            ctx.leaves = leaves
            ctx.outputs = outputs
            detached = tuple(o.detach() for o in outputs)
            frozen = [d for d, o in zip(detached, outputs) if not o.requires_grad]
            if frozen:
                ctx.mark_non_differentiable(*frozen)
            return detached

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            pairs = [(o, g) for o, g in zip(ctx.outputs, grads) if g is not None and o.requires_grad]
            wanted = [i for i, leaf in enumerate(ctx.leaves) if leaf.requires_grad]
            result: list = [None] * len(ctx.leaves)
            if pairs and wanted:
                # The genome's graph is kept as long as the caller's (retain_graph), so a
                # caller that backpropagates twice with retain_graph=True gets the same answer.
                found = torch.autograd.grad(
                    [o for o, _ in pairs], [ctx.leaves[i] for i in wanted], [g for _, g in pairs],
                    retain_graph=True, allow_unused=True,
                )
                for i, grad in zip(wanted, found):
                    result[i] = grad
            return (None, *result)

    return GenomeRelay


# -- normalisation and hashing ---------------------------------------------------------------
class _Normaliser(ast.NodeTransformer):
    """Renames the function, its parameters and locals canonically and drops docstrings."""

    def __init__(self, local_names: set[str]) -> None:
        self.mapping: dict[str, str] = {}
        self.local_names = local_names

    def _name(self, name: str) -> str:
        if name not in self.local_names:
            return name
        return self.mapping.setdefault(name, f"v{len(self.mapping)}")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.name = "genome"
        node.returns = None
        if node.body and _is_docstring(node.body[0]) and len(node.body) > 1:
            node.body = node.body[1:]
        self.generic_visit(node)
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.arg = self._name(node.arg)
        node.annotation = None
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node.id = self._name(node.id)
        return node


@_never_raises_else
def normalise(code: str) -> str:
    """Canonical source of a genome: no comments, docstrings or imports; names renamed."""
    module, function = _parse_genome(code)
    module.body = [function]
    local = _bound_names(function) - {"self"}
    normalised = _Normaliser(local).visit(module)
    return ast.unparse(ast.fix_missing_locations(normalised))


@_never_raises_else
def code_hash(code: str) -> str:
    """Hash of the normalised AST: equal for genomes that differ only in names and layout."""
    if not isinstance(code, str):
        raise GenomeError(f"genome code must be a string, got {type(code).__name__}")
    return _code_hash(code)


@functools.lru_cache(maxsize=4096)
def _code_hash(code: str) -> str:
    return hashlib.sha256(normalise(code).encode()).hexdigest()[:16]


@_never_raises_else
def function_name(code: str) -> str:
    return _parse_genome(code)[1].name


@_never_raises_else
def code_size(code: str) -> int:
    """Syntax nodes of the normalised genome (a generic complexity descriptor). Counted
    without unparsing and parsing again: normalising only renames (the count is unchanged)
    and drops imports, a leading docstring and annotations, which are left out here."""
    _, function = _parse_genome(code)
    body = function.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        function.body = body[1:]
    function.returns = None
    arguments = function.args
    for argument in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg):
        if argument is not None:
            argument.annotation = None
    return 1 + sum(1 for _ in ast.walk(function))  # 1: the module node


# -- error text ------------------------------------------------------------------------------
SHORT_ERROR_CHARS = 200


def genome_line(exc: BaseException) -> int | None:
    """The line of the genome's own source where ``exc`` (or the error it was raised from)
    went through, innermost first; None when the genome's code is not on the traceback."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        line = None
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<genome>":
                line = tb.tb_lineno
            tb = tb.tb_next
        if line is not None:
            return line
        current = current.__cause__ or current.__context__
    return None


def short_error(exc: BaseException, limit: int = SHORT_ERROR_CHARS) -> str:
    """One bounded line for an exception, safe to store and to show an LLM.

    The exception's type (left out for a :class:`GenomeError`, whose message says what
    failed), the first non-empty line of its message with control characters replaced, cut
    so that the whole line is at most ``limit`` characters, then `` (genome line N)`` when the
    genome's own code is on the traceback. Nothing else from the traceback (no file names, no
    other frames) and nothing past the first line of the message (a genome that raises
    ``ValueError(open(path).read())`` gets one line of that file through, at most).
    """
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a hostile __str__ must not break error reporting
        text = ""
    first = ""
    for candidate in text[: 16 * limit].splitlines():
        if candidate.strip():
            first = candidate.strip()
            break
    first = "".join(ch if ch.isprintable() else " " for ch in first)
    head = first if isinstance(exc, GenomeError) and first else (
        f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
    line = genome_line(exc)
    suffix = f" (genome line {line})" if line is not None else ""
    if suffix and head.endswith(suffix):  # a GenomeError that already quotes its cause's line
        suffix = ""
    room = max(limit - len(suffix), 20)
    if len(head) > room:
        head = head[: room - 3] + "..."
    return head + suffix
