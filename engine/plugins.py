"""Finding plug-ins: built-in names, the ``evoloss.fitness`` / ``evoloss.operators`` entry-point
groups, ``path.py:Class`` and ``module:Class``. An operator class may also declare spec prefixes
(:attr:`operators.base.Operator.spec_prefixes`: the LLM operators declare ``openai``,
``anthropic``, ``hf``, ``replay``); a spec with such a prefix is built by that class's factory,
matched before anything else so that ``openai:gpt-4o`` is never taken for ``module:Class``.
Every failure names the spec, the file and what is wrong."""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any

#: Built-in fitness plug-ins (imported lazily so one broken plug-in cannot hide the others).
FITNESS_REGISTRY: dict[str, str] = {
    "synthetic-pref": "fitness.synthetic_pref:SyntheticPreference",
    "cifar10": "fitness.cifar10:Cifar10",
    "dpo": "fitness.dpo:DPOFitness",
    "pref-suite": "fitness.suites.pref_suite:PreferenceSuite",
    "cls-suite": "fitness.suites.cls_suite:ClassificationSuite",
}

#: Built-in operators (a class that declares spec prefixes is also found by them).
OPERATOR_REGISTRY: dict[str, str] = {
    "symbolic": "operators.symbolic:SymbolicOperator",
    "llm": "operators.llm:LLMOperator",
}

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
            classes = [n for n, v in vars(module).items()
                       if inspect.isclass(v) and issubclass(v, base) and v is not base]
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
        raise PluginError(
            f"fitness {spec!r}: constructing {cls.__qualname__} failed: {type(exc).__name__}: {exc}") from exc
    if not getattr(plugin, "name", ""):
        raise PluginError(f"fitness {spec!r}: class {cls.__qualname__} must set a non-empty 'name'")
    if not isinstance(getattr(plugin, "interface", None), Interface):
        raise PluginError(
            f"fitness {spec!r}: 'interface' must be an instance of fitness.Interface, got "
            f"{type(getattr(plugin, 'interface', None)).__name__}"
        )
    return plugin


def _prefixed_classes() -> list[type]:
    """Registered and entry-point operator classes that build operators from prefixed specs."""
    from operators.base import Operator

    classes = []
    for name in list(OPERATOR_REGISTRY) + sorted(set(_entry_points(OPERATOR_GROUP)) - set(OPERATOR_REGISTRY)):
        try:
            cls = resolve_class(name, Operator, OPERATOR_REGISTRY, OPERATOR_GROUP, "operator")
        except PluginError:
            continue  # a broken plug-in is reported when it is named, not when another is
        if cls.spec_prefixes:
            classes.append(cls)
    return classes


def prefix_class(spec: Any) -> type | None:
    """The operator class whose declared prefix ``spec`` starts with (``openai:...``), or None."""
    if not isinstance(spec, str) or ":" not in spec:
        return None
    prefix = spec.strip().partition(":")[0]
    if not prefix or "." in prefix or "/" in prefix or "\\" in prefix:
        return None
    return next((cls for cls in _prefixed_classes() if prefix in cls.spec_prefixes), None)


def load_operators(specs: str | list[str], services=None) -> list:
    """The run's operators from ``specs`` (a list or a comma-separated string), in order.

    Specs with a declared prefix are built by their class's factory, one factory per class
    per call, so that the operators of one family share what they must (the LLM operators'
    budget); ``services`` is what the run hands them (:class:`operators.base.Services`). Each
    operator's ``preflight()`` runs before any work starts (key set, server reachable, model
    folder loadable), and its setup errors name the variable, URL or folder."""
    from operators.base import Services

    if isinstance(specs, str):
        specs = [spec.strip() for spec in specs.split(",") if spec.strip()]
    services = services or Services()
    operators, factories = [], {}
    for spec in specs:
        cls = prefix_class(spec)
        if cls is None:
            operators.append(load_operator(spec))
            continue
        try:
            if cls not in factories:
                factories[cls] = cls.factory(services)
            operators.extend(factories[cls](spec))
        except Exception as exc:
            raise PluginError(_setup_message(spec, exc)) from exc
    for operator in operators:
        preflight = getattr(operator, "preflight", None)
        if callable(preflight):
            try:
                preflight()
            except Exception as exc:
                raise PluginError(_setup_message(getattr(operator, "name", "?"), exc)) from exc
    return operators


def _setup_message(spec: str, exc: Exception) -> str:
    """A set-up error as the user reads it: the operator's own message when it raised one of its
    set-up errors (those already name the spec), else the spec and the exception."""
    if type(exc).__name__.endswith("SetupError"):
        return str(exc)
    return f"operator {spec!r}: {type(exc).__name__}: {exc}"


def load_operator(spec: str | type, options: dict[str, Any] | None = None):
    """Build one operator from its spec (``symbolic``, ``path.py:Class``, ``module:Class``, or a
    prefixed spec such as ``openai:MODEL``; ``options`` may then hold ``services``)."""
    from operators.base import Operator

    if prefix_class(spec) is not None:
        return load_operators([spec], (options or {}).get("services"))[0]
    cls = resolve_class(spec, Operator, OPERATOR_REGISTRY, OPERATOR_GROUP, "operator")
    try:
        return cls(**(options or {}))
    except Exception as exc:
        raise PluginError(
            f"operator {spec!r}: constructing {cls.__qualname__} failed: {type(exc).__name__}: {exc}") from exc


def _is_prefixed_only(name: str) -> bool:
    """Whether a registered name stands for a family built only from prefixed specs (``llm``)."""
    from operators.base import Operator

    try:
        return bool(resolve_class(name, Operator, OPERATOR_REGISTRY, OPERATOR_GROUP, "operator").spec_prefixes)
    except PluginError:
        return False


def fitness_takes(spec: str | type, option: str) -> bool:
    """Whether the fitness plug-in named by ``spec`` takes keyword option ``option`` (a named
    parameter of its constructor): ``--data-dir`` reaches only plug-ins that take ``data_dir``."""
    from fitness.base import Fitness

    cls = resolve_class(spec, Fitness, FITNESS_REGISTRY, FITNESS_GROUP, "fitness")
    try:
        return option in inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read (a C extension class)
        return False


def _first_line(cls: type) -> str:
    """The first line of a class's own docstring (not one inherited from the base class)."""
    lines = (cls.__dict__.get("__doc__") or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def describe() -> dict[str, list[tuple[str, str]]]:
    """One line about each fitness plug-in and operator that can be used: ``(name, line)``
    pairs, the line being the first line of the class docstring (or why the class cannot be
    loaded). An operator family built from prefixed specs is one entry naming its forms."""
    from fitness.base import Fitness
    from operators.base import Operator

    def line(name: str, base: type, registry: dict[str, str], group: str, kind: str) -> str:
        try:
            with warnings.catch_warnings():  # importing to read a docstring is not loading it for a run
                warnings.simplefilter("ignore")
                return _first_line(resolve_class(name, base, registry, group, kind))
        except PluginError as exc:
            return f"(cannot be loaded: {exc})"

    names = available()
    fitness = [(n, line(n, Fitness, FITNESS_REGISTRY, FITNESS_GROUP, "fitness")) for n in names["fitness"]]
    prefixed = _prefixed_classes()
    forms = {form for cls in prefixed for form in cls.spec_forms}
    operators = [(n, line(n, Operator, OPERATOR_REGISTRY, OPERATOR_GROUP, "operator"))
                 for n in names["operators"] if n not in forms]
    operators += [(", ".join(cls.spec_forms), _first_line(cls)) for cls in prefixed if cls.spec_forms]
    return {"fitness": fitness, "operators": operators}


def available() -> dict[str, list[str]]:
    """Names of the fitness plug-ins and operators that can be used."""
    return {
        "fitness": sorted(set(FITNESS_REGISTRY) | set(_entry_points(FITNESS_GROUP))),
        "operators": sorted(name for name in set(OPERATOR_REGISTRY) | set(_entry_points(OPERATOR_GROUP))
                            if not _is_prefixed_only(name))
        + [form for cls in _prefixed_classes() for form in cls.spec_forms],
    }
