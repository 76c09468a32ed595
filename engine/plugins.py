"""Finding plug-ins: built-in names, the ``evoloss.fitness`` entry-point group, ``path.py:Class``
and ``module:Class``; for operators also LLM providers (``openai:MODEL``, ``anthropic:MODEL``,
``hf:PATH``, ``replay:RUN``), recognised by their prefix before anything else so that
``openai:gpt-4o`` is never taken for ``module:Class``. Every failure names the spec, the file and
what is wrong."""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

#: Built-in fitness plug-ins (imported lazily so one broken plug-in cannot hide the others).
FITNESS_REGISTRY: dict[str, str] = {
    "synthetic-pref": "fitness.synthetic_pref:SyntheticPreference",
    "cifar10": "fitness.cifar10:Cifar10",
    "dpo": "fitness.dpo:DPOFitness",
}

#: Built-in operators.
OPERATOR_REGISTRY: dict[str, str] = {
    "symbolic": "operators.symbolic:SymbolicOperator",
}

#: LLM operator specs (``PROVIDER:...``), built by :mod:`operators.llm`.
LLM_PROVIDER_SPECS = ("openai:MODEL", "openai:MODEL@URL", "anthropic:MODEL", "anthropic:MODEL@URL", "hf:PATH",
                      "replay:RUN")

FITNESS_GROUP = "evoloss.fitness"
OPERATOR_GROUP = "evoloss.operators"


class PluginError(Exception):
    """A plug-in could not be found, imported or used."""


def _entry_points(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise PluginError(f"plug-in file {str(path)!r} not found")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    module_name = f"evoloss_plugin_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plug-in file {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginError(f"importing plug-in file {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def resolve_class(spec: str | type, base: type, registry: dict[str, str], group: str, kind: str) -> type:
    """Turn a plug-in spec into a class that subclasses ``base``."""
    if inspect.isclass(spec):
        target, where = spec, spec.__qualname__
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise PluginError(f"{kind} plug-in spec must be a non-empty string, got {spec!r}")
        spec = spec.strip()
        entry_points = _entry_points(group)
        if spec in registry:
            spec_text, where = registry[spec], spec
        elif spec in entry_points:
            try:
                target = entry_points[spec].load()
            except Exception as exc:
                raise PluginError(
                    f"loading {kind} entry point {spec!r} ({entry_points[spec].value}) failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            return _check_class(target, base, f"entry point {spec!r}", kind)
        elif ":" in spec:
            spec_text, where = spec, spec
        else:
            known = sorted(set(registry) | set(entry_points))
            raise PluginError(
                f"unknown {kind} {spec!r}; known: {', '.join(known) or 'none'}; or give path.py:Class or module:Class"
            )
        location, _, class_name = spec_text.rpartition(":")
        if location.endswith(".py") or "/" in location or "\\" in location:
            module = _import_file(Path(location))
        else:
            try:
                module = importlib.import_module(location)
            except Exception as exc:
                raise PluginError(
                    f"importing module {location!r} for {kind} {where!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
        target = getattr(module, class_name, None)
        if target is None:
            classes = [n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, base) and v is not base]
            raise PluginError(
                f"{location} has no class {class_name!r}" + (f" (found: {', '.join(classes)})" if classes else "")
            )
    return _check_class(target, base, where, kind)


def _check_class(target: Any, base: type, where: str, kind: str) -> type:
    if not inspect.isclass(target) or not issubclass(target, base):
        raise PluginError(
            f"{where} is not a {kind} plug-in: expected a subclass of {base.__module__}.{base.__qualname__}, "
            f"got {target!r}"
        )
    if inspect.isabstract(target):
        missing = ", ".join(sorted(getattr(target, "__abstractmethods__", ())))
        raise PluginError(f"{where} is abstract: it must implement {missing}")
    return target


def load_fitness(spec: str | type, options: dict[str, Any] | None = None):
    """Build the fitness plug-in named by ``spec`` with ``options`` and check its contract."""
    from fitness.base import Fitness, Interface

    cls = resolve_class(spec, Fitness, FITNESS_REGISTRY, FITNESS_GROUP, "fitness")
    try:
        plugin = cls(**(options or {}))
    except (TypeError, ValueError) as exc:
        raise PluginError(f"fitness {spec!r}: bad options {options or {}}: {exc}") from exc
    except Exception as exc:
        raise PluginError(f"fitness {spec!r}: constructing {cls.__qualname__} failed: {type(exc).__name__}: {exc}") from exc
    if not getattr(plugin, "name", ""):
        raise PluginError(f"fitness {spec!r}: class {cls.__qualname__} must set a non-empty 'name'")
    if not isinstance(getattr(plugin, "interface", None), Interface):
        raise PluginError(
            f"fitness {spec!r}: 'interface' must be an instance of fitness.Interface, got "
            f"{type(getattr(plugin, 'interface', None)).__name__}"
        )
    return plugin


def _is_llm_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip().partition(":")[0] in {s.partition(":")[0] for s in LLM_PROVIDER_SPECS} \
        and ":" in spec


def load_operators(config) -> list:
    """The run's operators from ``config.operator`` (comma-separated), in order. LLM operators
    share one budget, price table and reply checker, and are checked before any work starts
    (key set, server reachable, model folder loadable): a failure names the variable, URL or
    folder."""
    specs = [spec.strip() for spec in str(config.operator).split(",") if spec.strip()]
    operators, factory = [], None
    for spec in specs:
        if _is_llm_spec(spec):
            from operators.llm import LLMOperatorFactory
            from operators.providers import ProviderSetupError

            try:
                factory = factory or LLMOperatorFactory(config)
                operators.extend(factory.build(spec))
            except ProviderSetupError as exc:
                raise PluginError(str(exc)) from exc
        else:
            operators.append(load_operator(spec))
    for operator in operators:
        preflight = getattr(operator, "preflight", None)
        if callable(preflight):
            from operators.providers import ProviderSetupError

            try:
                preflight()
            except ProviderSetupError as exc:
                raise PluginError(str(exc)) from exc
    return operators


def load_operator(spec: str | type, options: dict[str, Any] | None = None):
    """Build one operator from its spec (``symbolic``, ``path.py:Class``, ``module:Class``, or an
    LLM provider such as ``openai:MODEL``; ``options`` may then hold ``config``, a RunConfig)."""
    from operators.base import Operator

    if _is_llm_spec(spec):
        from engine.config import RunConfig
        from operators.llm import LLMOperatorFactory
        from operators.providers import ProviderSetupError

        options = dict(options or {})
        config = options.pop("config", None) or RunConfig(**options)
        try:
            return LLMOperatorFactory(config).build(spec)[0]
        except ProviderSetupError as exc:
            raise PluginError(str(exc)) from exc
    cls = resolve_class(spec, Operator, OPERATOR_REGISTRY, OPERATOR_GROUP, "operator")
    try:
        return cls(**(options or {}))
    except Exception as exc:
        raise PluginError(f"operator {spec!r}: constructing {cls.__qualname__} failed: {type(exc).__name__}: {exc}") from exc


def available() -> dict[str, list[str]]:
    """Names of the fitness plug-ins and operators that can be used."""
    return {
        "fitness": sorted(set(FITNESS_REGISTRY) | set(_entry_points(FITNESS_GROUP))),
        "operators": sorted(set(OPERATOR_REGISTRY) | set(_entry_points(OPERATOR_GROUP))) + list(LLM_PROVIDER_SPECS),
    }
