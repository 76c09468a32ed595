"""Genomes are untrusted code: static safety check, restricted compilation and hashing.

The check runs on the AST only (the driver never executes a genome). A genome must be
exactly one function; module level may also hold a docstring and imports of the modules the
sandbox already provides (``torch``, ``torch.nn.functional as F``, ``math``), because
generated replies often include them. Inside the function only the parameters, its own
local names, ``torch``, ``F``, ``math`` and a small set of pure builtins may be named.

This is the first of three layers: the worker process that runs a genome also has a
wall-clock timeout, a memory limit and an environment without secrets
(:mod:`engine.executor`).
"""
from __future__ import annotations

import ast
import builtins
import functools
import hashlib
import math

#: Builtins a loss function may call; everything else (open, exec, getattr, ...) is absent.
SAFE_BUILTINS = {
    name: getattr(builtins, name)
    for name in (
        "abs", "all", "any", "bool", "dict", "enumerate", "float", "int", "len", "list",
        "max", "min", "pow", "range", "reversed", "round", "sorted", "sum", "tuple", "zip",
        "isinstance", "ValueError", "RuntimeError", "ZeroDivisionError", "True", "False", "None",
    )
    if hasattr(builtins, name)
}

#: Module names a genome may import (they are provided anyway) and what they bind.
ALLOWED_IMPORTS = {"torch": "torch", "math": "math", "torch.nn.functional": "F"}

#: Names that are always rejected, with the reason shown to the user (or LLM).
FORBIDDEN_NAMES = {
    "open", "exec", "eval", "compile", "getattr", "setattr", "delattr", "globals", "locals",
    "vars", "__import__", "input", "breakpoint", "help", "dir", "type", "object", "super",
    "memoryview", "bytearray", "bytes", "classmethod", "staticmethod", "property", "exit",
    "quit", "os", "sys", "subprocess", "socket", "builtins", "importlib", "ctypes", "shutil",
    "pathlib", "pickle", "numpy", "np",
}

#: Attributes never allowed on any object: routes to files, the network, native code,
#: process-global state or introspection.
FORBIDDEN_ATTRIBUTES = {
    # torch entry points that touch files, the network or native code
    "save", "load", "hub", "from_file", "utils", "ops", "jit", "os", "sys", "classes",
    "library", "backends", "distributed", "multiprocessing", "package", "serialization",
    "storage", "untyped_storage", "typed_storage", "compile", "fx", "export", "onnx",
    "profiler", "testing", "cuda", "mps", "xpu", "torch", "F", "math", "compiler", "inductor",
    "from_numpy", "frombuffer", "from_dlpack", "to_dlpack", "asarray", "tofile", "fromfile",
    "data_ptr", "share_memory_", "pin_memory", "set_", "ctypes", "numpy",
    "overrides", "quantization", "ao", "dynamo",
    # process-global state
    "manual_seed", "seed", "set_num_threads", "set_num_interop_threads", "set_default_dtype",
    "set_default_device", "set_default_tensor_type", "set_printoptions", "set_grad_enabled",
    "set_flush_denormal", "use_deterministic_algorithms", "set_rng_state", "register_hook",
    "autograd", "random",
    # introspection escapes (format strings reach attributes by name)
    "format", "format_map", "gi_frame", "gi_code", "f_globals", "f_locals", "f_back",
    "f_builtins", "tb_frame", "cr_frame", "ag_frame", "func_globals", "mro", "modules",
}

MAX_SOURCE_CHARS = 20_000
MAX_AST_NODES = 3_000


_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means an allocation failed (a MemoryError or torch's allocator)."""
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MARKERS)


class GenomeError(Exception):
    """A genome failed a check. ``status`` says how (``invalid`` for all static checks)."""

    def __init__(self, message: str, status: str = "invalid") -> None:
        super().__init__(message)
        self.status = status


def parse_genome(code: str) -> tuple[ast.Module, ast.FunctionDef]:
    """Parse ``code`` and return the module and its single function.

    Raises:
        GenomeError: not a string, too long, a syntax error, or not exactly one function.
    """
    if not isinstance(code, str):
        raise GenomeError(f"genome code must be a string, got {type(code).__name__}")
    if len(code) > MAX_SOURCE_CHARS:
        raise GenomeError(f"genome is {len(code)} characters long; the limit is {MAX_SOURCE_CHARS}")
    try:
        module = ast.parse(code)
    except SyntaxError as exc:
        raise GenomeError(f"syntax error on line {exc.lineno}: {exc.msg}") from exc
    except (ValueError, RecursionError, MemoryError) as exc:
        raise GenomeError(f"cannot parse genome: {type(exc).__name__}: {exc}") from exc
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


def check_genome(code: str, arg_counts: tuple[int, ...] | None = None) -> ast.FunctionDef:
    """Run every static safety check on ``code`` and return its function definition.

    Args:
        code: The genome's source.
        arg_counts: Allowed numbers of positional parameters, if the interface fixes them.

    Raises:
        GenomeError: with a message that names the line and the rule broken.
    """
    if not isinstance(code, str):
        raise GenomeError(f"genome code must be a string, got {type(code).__name__}")
    # Operators and the engine check the same source several times; passing checks are cached.
    _check_cached(code, tuple(arg_counts) if arg_counts is not None else None)
    return parse_genome(code)[1]


@functools.lru_cache(maxsize=4096)
def _check_cached(code: str, arg_counts: tuple[int, ...] | None) -> None:
    _check_uncached(code, arg_counts)


def _check_uncached(code: str, arg_counts: tuple[int, ...] | None = None) -> ast.FunctionDef:
    """The checks behind :func:`check_genome`."""
    module, function = parse_genome(code)
    nodes = list(ast.walk(module))
    if len(nodes) > MAX_AST_NODES:
        raise GenomeError(f"genome has {len(nodes)} syntax nodes; the limit is {MAX_AST_NODES}")
    if arg_counts is not None:
        n_args = len(function.args.posonlyargs) + len(function.args.args)
        if n_args not in arg_counts or function.args.vararg or function.args.kwarg:
            expected = " or ".join(str(n) for n in arg_counts)
            raise GenomeError(
                f"function {function.name!r} takes {n_args} positional parameters; the interface "
                f"expects {expected} (and no *args/**kwargs)"
            )
    allowed = set(SAFE_BUILTINS) | {"torch", "F", "math"} | _bound_names(function)
    for node in nodes:
        _check_node(node, allowed)
    return function


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(
        node.value.value, str
    )


def _check_import(node: ast.Import | ast.ImportFrom) -> None:
    if isinstance(node, ast.ImportFrom):
        if node.module == "torch.nn" and all(a.name == "functional" and a.asname in ("F", None) for a in node.names):
            if all(a.asname == "F" for a in node.names):
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
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _check_node(node: ast.AST, allowed: set[str]) -> None:
    line = getattr(node, "lineno", "?")
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        _check_import(node)
    elif isinstance(node, (ast.Global, ast.Nonlocal)):
        raise GenomeError(f"line {line}: '{type(node).__name__.lower()}' statements are not allowed")
    elif isinstance(node, (ast.AsyncFunctionDef, ast.Await, ast.AsyncFor, ast.AsyncWith, ast.Yield, ast.YieldFrom)):
        raise GenomeError(f"line {line}: async code and generators are not allowed")
    elif isinstance(node, ast.ClassDef):
        raise GenomeError(f"line {line}: class definitions are not allowed")
    elif isinstance(node, ast.With):
        raise GenomeError(f"line {line}: 'with' blocks are not allowed")
    elif isinstance(node, ast.FunctionDef):
        if node.decorator_list:
            raise GenomeError(f"line {line}: decorators are not allowed (function {node.name!r})")
        if node.returns is not None and not _is_plain_annotation(node.returns):
            raise GenomeError(f"line {line}: return annotations may only name types")
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            if not _is_literal(default):
                raise GenomeError(
                    f"line {line}: default arguments must be literal constants (function {node.name!r})"
                )
        for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
            if arg.annotation is not None and not _is_plain_annotation(arg.annotation):
                raise GenomeError(f"line {line}: parameter annotations may only name types")
    elif isinstance(node, ast.Lambda):
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            if not _is_literal(default):
                raise GenomeError(f"line {line}: lambda defaults must be literal constants")
    elif isinstance(node, ast.Name):
        if node.id.startswith("__"):
            raise GenomeError(f"line {line}: dunder name {node.id!r} is not allowed")
        if node.id in FORBIDDEN_NAMES:
            raise GenomeError(f"line {line}: name {node.id!r} is not allowed in a loss function")
        if isinstance(node.ctx, ast.Load) and node.id not in allowed:
            raise GenomeError(
                f"line {line}: name {node.id!r} is not defined; a genome may use its parameters, "
                "its own variables, torch, F (torch.nn.functional), math and basic builtins"
            )
    elif isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            raise GenomeError(f"line {line}: private or dunder attribute {node.attr!r} is not allowed")
        if node.attr in FORBIDDEN_ATTRIBUTES or node.attr.startswith("set_"):
            raise GenomeError(
                f"line {line}: attribute {node.attr!r} is not allowed (it reaches files, the network, "
                "native code or process-wide state)"
            )
        if not isinstance(node.ctx, ast.Load):
            raise GenomeError(f"line {line}: assigning or deleting attributes ({node.attr!r}) is not allowed")
    elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
        # Item assignment on a local tensor is fine; on a module or self it is not.
        root = node.value
        while isinstance(root, (ast.Subscript, ast.Attribute)):
            root = root.value
        if isinstance(root, ast.Name) and root.id in {"torch", "F", "math", "self"}:
            raise GenomeError(f"line {line}: item assignment on {root.id!r} is not allowed")
    elif isinstance(node, ast.Constant) and isinstance(node.value, bytes):
        raise GenomeError(f"line {line}: bytes literals are not allowed")


def _is_literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _is_plain_annotation(node: ast.AST) -> bool:
    """An annotation that only names things (``torch.Tensor``, ``float``, a string)."""
    return all(
        isinstance(n, (ast.Name, ast.Attribute, ast.Constant, ast.Load, ast.Subscript, ast.Tuple, ast.BinOp, ast.BitOr))
        for n in ast.walk(node)
    )


def compile_genome(code: str, arg_counts: tuple[int, ...] | None = None):
    """Check ``code`` statically, then build its function in a restricted namespace.

    Only call this inside an evaluation worker: building the function runs no genome code
    (module level holds only imports and the ``def``), but calling it does.
    """
    import torch
    import torch.nn.functional as F

    function = check_genome(code, arg_counts)
    namespace = {"__builtins__": dict(SAFE_BUILTINS), "torch": torch, "F": F, "math": math,
                 "__name__": "genome"}
    module = ast.parse(code)
    # Imports are dropped: the names they bind are already in the namespace.
    module.body = [n for n in module.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
    try:
        exec(compile(module, "<genome>", "exec"), namespace)  # noqa: S102 - checked above
    except Exception as exc:  # the def itself cannot raise, but be explicit about failure
        raise GenomeError(f"cannot build function: {type(exc).__name__}: {exc}") from exc
    fn = namespace[function.name]
    # The source travels with the function: a plug-in that trains in other processes (the dpo
    # plug-in's accelerate launcher) compiles it there again from this text.
    fn.__evoloss_source__ = code
    return fn


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


def normalise(code: str) -> str:
    """Canonical source of a genome: no comments, docstrings or imports; names renamed."""
    module, function = parse_genome(code)
    module.body = [function]
    local = _bound_names(function) - {"self"}
    normalised = _Normaliser(local).visit(module)
    return ast.unparse(ast.fix_missing_locations(normalised))


def code_hash(code: str) -> str:
    """Hash of the normalised AST: equal for genomes that differ only in names and layout."""
    if not isinstance(code, str):
        raise GenomeError(f"genome code must be a string, got {type(code).__name__}")
    return _code_hash(code)


@functools.lru_cache(maxsize=4096)
def _code_hash(code: str) -> str:
    """Hash of the normalised AST: equal for genomes that differ only in names and layout."""
    return hashlib.sha256(normalise(code).encode()).hexdigest()[:16]


def function_name(code: str) -> str:
    return parse_genome(code)[1].name


def code_size(code: str) -> int:
    """Syntax nodes of the normalised genome (a generic complexity descriptor). Counted
    without unparsing and parsing again: normalising only renames (the count is unchanged)
    and drops imports, a leading docstring and annotations, which are left out here."""
    _, function = parse_genome(code)
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
