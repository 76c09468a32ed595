"""The project's layers, checked over its import graph (every import, also those inside
functions): imports flow one way and there are no circles. docs/architecture.md draws them.

A new module must be given a layer in ``LAYERS`` (the first pattern that matches wins); the
test names any module that has none.
"""
from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "operators", "fitness", "archives")

#: (pattern, layer, family). Lower layers never import higher ones; within the plug-in layer
#: one family never imports another (operators, fitness plug-ins and the archive are peers).
LAYERS: list[tuple[str, int, str]] = [
    # leaves: records, genome safety, contracts, process helpers
    ("engine.candidate", 0, "leaf"), ("engine.statuses", 0, "leaf"), ("engine.genome", 0, "leaf"),
    ("engine.allowlist", 0, "leaf"), ("engine.processes", 0, "leaf"), ("engine.settings", 0, "leaf"),
    ("engine.helpers", 0, "leaf"),
    ("fitness.base", 0, "leaf"), ("operators.base", 0, "leaf"),
    # plug-ins and the archive: import only the leaves
    ("operators", 1, "operators"), ("operators.*", 1, "operators"),
    ("fitness", 1, "fitness"), ("fitness.*", 1, "fitness"),
    ("archives.store", 1, "archives"), ("archives.grid", 1, "archives"), ("archives.elites", 1, "archives"),
    ("archives.reading", 1, "archives"),
    # the runtime: executors, workers, evaluation, the plug-in registry, the reply checker, the jail
    ("engine.executor", 2, "runtime"), ("engine.executors", 2, "runtime"), ("engine.ray_executor", 2, "runtime"),
    ("engine.worker", 2, "runtime"), ("engine.evaluation", 2, "runtime"), ("engine.plugins", 2, "runtime"),
    ("engine.reply_checker", 2, "runtime"), ("engine.jail", 2, "runtime"), ("engine.sandbox", 2, "runtime"),
    ("engine.child", 2, "runtime"), ("engine.artefacts", 2, "runtime"), ("engine.judging", 2, "runtime"),
    ("engine.confine", 2, "runtime"),
    # the search: population, elites, breeder, drivers, ladder, config, assembly
    ("engine.search", 3, "search"), ("engine.search.*", 3, "search"), ("engine.engine", 3, "search"),
    ("engine.steady", 3, "search"), ("engine.ladder", 3, "search"), ("engine.config", 3, "search"),
    ("engine.assembly", 3, "search"), ("engine.validation", 3, "search"), ("engine.racing", 3, "search"),
    # the roof: command line and analysis
    ("engine", 4, "roof"), ("engine.*", 4, "roof"), ("archives", 4, "roof"), ("archives.*", 4, "roof"),
]


def layer_of(module: str) -> tuple[int, str]:
    for pattern, layer, family in LAYERS:
        if fnmatch(module, pattern):
            return layer, family
    raise LookupError(module)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports (the longest known prefix of each import)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from package import module`` imports the module; ``from module import name`` the module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for name in names:
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in known:
                    if candidate != module:
                        found.add(candidate)
                    break
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    missing = []
    for module in graph:
        try:
            layer_of(module)
        except LookupError:
            missing.append(module)
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def _is_package_init(module: str, target: str) -> bool:
    # A package's curated __init__ re-exports its own modules.
    return target.startswith(module + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        layer, family = layer_of(module)
        for target in targets:
            if _is_package_init(module, target):
                continue
            target_layer, target_family = layer_of(target)
            if target_layer > layer:
                wrong.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
            elif layer == target_layer == 1 and family != target_family:
                wrong.append(f"{module} ({family}) imports {target} ({target_family}): plug-in families are peers")
    return sorted(wrong)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    # A package's __init__ importing its own modules is no circle, but a module importing its own
    # package (``from fitness.dpo import scorers`` inside fitness.dpo) closes one through that __init__.
    edges = {m: {t for t in ts if not _is_package_init(m, t)} for m, ts in graph.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if seen.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in seen:
                visit(target)
        stack.pop()
        seen[node] = 2

    for node in sorted(edges):
        if node not in seen:
            visit(node)
    return cycles


def test_imports_flow_one_way(graph):
    wrong = violations(graph)
    assert not wrong, "\n".join(wrong)


def test_there_are_no_import_circles(graph):
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_catch_what_main_had_before_the_layers():
    # The five-file circle and the upward imports that the layers removed.
    before = {
        "engine.executor": {"engine.plugins"}, "engine.plugins": {"operators.llm"},
        "operators.llm": {"operators.checking", "engine.config", "archives.store"},
        "operators.checking": {"engine.executor"}, "fitness.dpo.launch": {"engine.worker"},
    }
    assert ["engine.executor", "engine.plugins", "operators.llm", "operators.checking", "engine.executor"] in circles(before)
    wrong = violations(before)
    assert "operators.llm (layer 1) imports engine.config (layer 3)" in wrong
    assert "operators.llm (operators) imports archives.store (archives): plug-in families are peers" in wrong
    assert "fitness.dpo.launch (layer 1) imports engine.worker (layer 2)" in wrong


def test_the_graph_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from engine.executor import ProcessExecutor\n    import fitness.base\n")
    assert imports_of("operators.m", path, {"engine.executor", "fitness.base", "fitness"}) == {
        "engine.executor", "fitness.base"}
