"""Finding plug-ins: registry names, entry points, path.py:Class and module:Class."""
import importlib.metadata
import sys

import pytest

from engine import plugins
from engine.plugins import PluginError, available, load_fitness, load_operator
from fitness.base import Fitness
from tests.conftest import EXAMPLE_SPEC


class FakeEntryPoint:
    def __init__(self, name, target):
        self.name, self.value, self._target = name, f"fake:{name}", target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


@pytest.fixture
def entry_points(monkeypatch):
    registered = {}

    def fake(group=None):
        return [FakeEntryPoint(n, t) for (g, n), t in registered.items() if g == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    return registered


def example_class():
    return plugins.resolve_class(EXAMPLE_SPEC, Fitness, {}, plugins.FITNESS_GROUP, "fitness")


def test_entry_point_plugin_is_found_and_listed(entry_points):
    entry_points[("evoloss.fitness", "regression")] = example_class()
    assert "regression" in available()["fitness"]
    assert load_fitness("regression").name == "robust-regression"


def test_broken_entry_point_names_itself(entry_points):
    entry_points[("evoloss.fitness", "broken")] = ImportError("no module named torchvision")
    with pytest.raises(PluginError, match="entry point 'broken'.*torchvision"):
        load_fitness("broken")


def test_module_and_class_spec(monkeypatch, tmp_path):
    (tmp_path / "my_task_module.py").write_text(
        f"import importlib.util\nspec = importlib.util.spec_from_file_location('ex', {EXAMPLE_SPEC.split(':')[0]!r})\n"
        "module = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(module)\n"
        "Task = module.RobustRegression\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_fitness("my_task_module:Task").name == "robust-regression"
    sys.modules.pop("my_task_module", None)


def test_class_object_is_accepted():
    assert load_fitness(example_class()).name == "robust-regression"


@pytest.mark.parametrize("source,fragment", [
    ("raise RuntimeError('bad plug-in')\n", "importing plug-in file .*RuntimeError: bad plug-in"),
    ("class Other:\n    pass\n", "has no class 'Plugin'"),
    ("Plugin = 42\n", "is not a fitness plug-in"),
    ("from fitness import Fitness\nclass Plugin(Fitness):\n    name = 'x'\n", "is abstract: it must implement"),
    ("from fitness import Fitness\nclass Plugin(Fitness):\n    name = 'x'\n    interface = 'not an interface'\n"
     "    def seeds(self): return []\n    def evaluate(self, fn, seed): return None\n",
     "'interface' must be an instance of fitness.Interface"),
])
def test_broken_plugin_gets_a_clear_message(write_plugin, source, fragment):
    spec = write_plugin(source)
    with pytest.raises(PluginError, match=fragment):
        load_fitness(spec)


def test_bad_options_name_the_plugin():
    with pytest.raises(PluginError, match="bad options"):
        load_fitness(EXAMPLE_SPEC, {"nonsense": 1})


def test_operator_registry():
    assert load_operator("symbolic").name == "symbolic"
    with pytest.raises(PluginError, match="unknown operator 'gpt'"):
        load_operator("gpt")
