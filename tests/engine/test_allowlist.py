"""The allow-lists against torch's own namespaces: every name exists and is what it should be
(a function, or one of the listed constants and value types), never a module or a class that
leads to one, so that a torch upgrade cannot silently widen what a genome reaches."""
import dataclasses
import inspect
import math
import types

import pytest
import torch
import torch.nn.functional as F

from engine import allowlist
from engine.genome import SAFE_BUILTINS, restricted_namespace
from fitness.preference import PreferenceHparams

FUNCTION_LISTS = [
    ("torch", torch, allowlist.TORCH_FUNCTIONS),
    ("torch.linalg", torch.linalg, allowlist.LINALG_FUNCTIONS),
    ("torch.special", torch.special, allowlist.SPECIAL_FUNCTIONS),
    ("F", F, allowlist.FUNCTIONAL_FUNCTIONS),
    ("math", math, allowlist.MATH_NAMES - {"pi", "e", "tau", "inf", "nan"}),
]

#: Names that must never be allowed anywhere, whatever a list says.
NEVER = {
    "grad_fn", "next_functions", "variable", "grad", "data", "_version", "register_hook", "storage",
    "untyped_storage", "data_ptr", "numpy", "backward", "requires_grad", "is_leaf", "retain_grad",
    "register_post_accumulate_grad_hook", "save", "load", "from_file", "from_numpy", "frombuffer", "empty",
    "empty_like", "as_strided", "set_", "manual_seed", "seed", "set_default_dtype", "compile", "jit", "hub",
    "utils", "ops", "library", "classes", "builtins", "importlib", "inspect", "os", "sys", "np", "gc",
    "format", "format_map", "tofile", "share_memory_", "pin_memory", "autograd", "nn", "Tensor", "tensor_split_",
}


def is_function(value) -> bool:
    return isinstance(value, (types.BuiltinFunctionType, types.FunctionType)) and not inspect.isclass(value)


@pytest.mark.parametrize("label,module,names", FUNCTION_LISTS, ids=[label for label, _, _ in FUNCTION_LISTS])
def test_every_allowed_function_exists_and_is_a_plain_function(label, module, names):
    public = {name for name in dir(module) if not name.startswith("_")}
    missing = sorted(names - public)
    assert not missing, f"not in {label} any more: {missing}"
    wrong = sorted(name for name in names if not is_function(getattr(module, name)))
    assert not wrong, f"not plain functions in {label}: {[(n, type(getattr(module, n)).__name__) for n in wrong]}"


def test_torch_constants_are_dtypes_or_floats():
    for name in allowlist.TORCH_CONSTANTS:
        assert isinstance(getattr(torch, name), (torch.dtype, float)), name
    for name in ("pi", "e", "tau", "inf", "nan"):
        assert isinstance(getattr(math, name), float)


def test_value_types_reach_no_module():
    for name in allowlist.TORCH_TYPES:
        cls = getattr(torch, name)
        assert inspect.isclass(cls)
        for attribute in dir(cls):
            if not attribute.startswith("_"):
                assert not isinstance(getattr(cls, attribute), types.ModuleType), (name, attribute)
    info = torch.finfo(torch.float32)
    for attribute in allowlist.INFO_ATTRIBUTES:
        assert isinstance(getattr(info, attribute), (int, float)), attribute


def test_tensor_attributes_exist_and_exclude_internals_and_in_place_methods():
    missing = sorted(name for name in allowlist.TENSOR_ATTRIBUTES if not hasattr(torch.Tensor, name))
    assert not missing
    assert not {name for name in allowlist.TENSOR_ATTRIBUTES if name.endswith("_") or name.startswith("_")}
    for name in allowlist.TENSOR_ATTRIBUTES:
        assert not isinstance(getattr(torch.Tensor, name), types.ModuleType), name


def test_no_list_holds_a_forbidden_name():
    lists = {
        "torch": allowlist.MODULE_MEMBERS["torch"], "F": allowlist.FUNCTIONAL_FUNCTIONS, "math": allowlist.MATH_NAMES,
        "linalg": allowlist.LINALG_FUNCTIONS, "special": allowlist.SPECIAL_FUNCTIONS,
        "values": allowlist.VALUE_ATTRIBUTES, "self": allowlist.SELF_ATTRIBUTES,
    }
    for label, names in lists.items():
        assert not (names & NEVER), (label, sorted(names & NEVER))
        assert not {n for n in names if n.startswith("_") or n.endswith("_")}, label


def test_no_allowed_name_is_a_module_anywhere():
    for _, module, names in FUNCTION_LISTS:
        for name in names:
            assert not isinstance(getattr(module, name, None), types.ModuleType), name
    for name in allowlist.MODULE_MEMBERS["torch"]:
        assert not isinstance(getattr(torch, name), types.ModuleType), name


def test_self_attributes_are_the_preference_hyperparameters():
    assert {f.name for f in dataclasses.fields(PreferenceHparams)} == allowlist.SELF_ATTRIBUTES


def test_safe_builtins_exclude_everything_that_reaches_out():
    assert set(SAFE_BUILTINS) <= set(allowlist.SAFE_BUILTIN_NAMES)
    for name in ("open", "exec", "eval", "compile", "getattr", "setattr", "__import__", "globals", "vars", "dir",
                 "type", "object", "print", "input", "breakpoint", "memoryview", "__build_class__"):
        assert name not in SAFE_BUILTINS


def test_run_time_views_expose_exactly_the_allow_lists():
    namespace = restricted_namespace()

    def exposed(view):
        return {name for name in vars(type(view)) if not name.startswith("__")}

    assert exposed(namespace["torch"]) == allowlist.MODULE_MEMBERS["torch"] | {"linalg", "special", "nn"}
    assert exposed(namespace["torch"].linalg) == allowlist.LINALG_FUNCTIONS
    assert exposed(namespace["torch"].special) == allowlist.SPECIAL_FUNCTIONS
    assert exposed(namespace["torch"].nn) == {"functional"}
    assert namespace["torch"].nn.functional is namespace["F"]
    assert exposed(namespace["F"]) == allowlist.FUNCTIONAL_FUNCTIONS
    assert exposed(namespace["math"]) == allowlist.MATH_NAMES
    # The views hand out the real functions (so results are exactly torch's).
    assert namespace["torch"].exp is torch.exp and namespace["F"].relu is F.relu and namespace["math"].pi == math.pi
