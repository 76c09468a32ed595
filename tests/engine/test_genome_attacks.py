"""A catalogue of escape routes, each held by two layers on its own: the static check refuses
it, and with the check bypassed (``compile_genome(check=False)``) the restricted namespaces
refuse it at run time. Every attack aims at a marker file; none may appear."""
from pathlib import Path

import pytest
import torch

from engine.genome import GenomeError, check_genome, compile_genome, restricted_namespace

HEADER = "def loss(pred, target):"


def attack(line: str) -> str:
    return f"{HEADER}\n    {line}\n    return (pred - target) ** 2\n"


# (id, source with MARKER standing for the marker file's path, fragment of the static error)
ROUTES = [
    ("torch_builtins_open", attack("torch.builtins.open(MARKER, 'w').write('x')"), "'torch.builtins'"),
    ("torch_builtins_exec", attack("torch.builtins.exec(\"open(MARKER, 'w')\")"), "'torch.builtins'"),
    ("torch_importlib", attack("torch.importlib.import_module('os').system('touch ' + MARKER)"), "'torch.importlib'"),
    ("torch_inspect_attrgetter", attack("torch.inspect.attrgetter('__globals__')(F.relu)"), "'torch.inspect'"),
    ("numpy_savetxt", attack("F.np.savetxt(MARKER, [1.0])"), "'F.np'"),
    ("numpy_ctypeslib", attack("F.np.ctypeslib.load_library('libc.so.6', '/lib')"), "'F.np'"),
    ("posix_chain", attack("torch.importlib.metadata.zipfile.shutil.posix.system('touch ' + MARKER)"),
     "'torch.importlib'"),
    ("torch_os", attack("torch.os.system('touch ' + MARKER)"), "'torch.os'"),
    ("torch_sys_modules", attack("torch.sys.modules['os'].system('touch ' + MARKER)"), "'torch.sys'"),
    ("special_torch", attack("torch.special.torch.builtins.open(MARKER, 'w')"), "'torch.special.torch'"),
    ("linalg_chain", attack("torch.linalg.torch.save(pred, MARKER)"), "'torch.linalg.torch'"),
    ("functional_math_module", attack("F.math.sqrt(2)"), "'F.math'"),
    ("functional_spelled_out_np", attack("torch.nn.functional.np.savetxt(MARKER, [1.0])"),
     "'torch.nn.functional.np'"),
    ("torch_nn_modules", attack("torch.nn.modules.module.torch.save(pred, MARKER)"), "torch.nn.functional"),
    ("torch_save", attack("torch.save(pred, MARKER)"), "'torch.save'"),
    ("torch_empty", attack("x = torch.empty(1000)"), "'torch.empty'"),
    ("torch_serialization", attack("torch.serialization.save(pred, MARKER)"), "'torch.serialization'"),
    ("gc_via_torch", attack("torch.gc.get_objects()"), "'torch.gc'"),
    ("gc_via_functional", attack("F.importlib.import_module('gc').get_objects()"), "'F.importlib'"),
    ("format_attribute", attack("'{0.builtins}'.format(torch)"), "'format'"),
    ("format_globals", attack("'{0.__globals__}'.format(F.relu)"), "'format'"),
    ("getattr_builtin", attack("getattr(torch, 'save')(pred, MARKER)"), "'getattr'"),
    ("getattr_via_torch", attack("torch.getattr(torch, 'save')"), "'torch.getattr'"),
    ("alias_module", attack("t = torch\n    t.save(pred, MARKER)"), "'torch' may only be used as torch.<name>"),
    ("module_as_argument", attack("x = max([torch])\n    x.save(pred, MARKER)"), "may only be used as"),
    ("lambda_default", attack("f = lambda s=torch.save: s(pred, MARKER)\n    f()"), "lambda defaults"),
    ("lambda_body", attack("f = lambda: torch.save(pred, MARKER)\n    f()"), "'torch.save'"),
    ("default_argument", "def loss(pred, target, s=torch.save):\n    s(pred, MARKER)\n    return pred\n",
     "default arguments"),
    ("mutable_default", "def loss(pred, target, memo=[]):\n    memo.append(1)\n    return pred * len(memo)\n",
     "default arguments"),
    ("decorator", "@torch.save\ndef loss(pred, target):\n    return pred\n", "decorators"),
    ("class_definition", attack("class Escape:\n        pass"), "class definitions"),
    ("walrus", attack("(m := torch.builtins)"), "assignment expressions"),
    ("global_rebinding", attack("global torch\n    torch = pred"), "'global'"),
    ("nonlocal", f"{HEADER}\n    def inner():\n        nonlocal pred\n    return pred\n", "'nonlocal'"),
    ("star_import", "from os import *\n" + attack("pass"), "'from os import ...'"),
    ("star_import_torch", "from torch import *\n" + attack("pass"), "'from torch import ...'"),
    ("import_in_function", attack("import os"), "import of 'os'"),
    ("builtins_name", attack("__builtins__['open'](MARKER, 'w')"), "dunder name '__builtins__'"),
    ("builtins_via_proxy", attack("torch.__builtins__"), "dunder attribute"),
    ("module_dict", attack("torch.__dict__['load']"), "dunder attribute"),
    ("fstring_format_spec", attack("s = f'{pred:{torch.builtins}}'"), "f-strings"),
    ("fstring_conversion", attack("s = f'{torch.builtins!r}'"), "f-strings"),
    ("comprehension_alias", attack("x = [m.builtins for m in [torch]]"), "'builtins'"),
    ("comprehension_rebinds_module", attack("x = [pred for torch in [pred]]"), "cannot be rebound"),
    ("parameter_named_like_module", "def loss(pred, torch):\n    return pred\n", "cannot be rebound"),
    ("try_swallows_refusal", attack("try:\n        torch.builtins\n    except:\n        pass"), "try/except"),
    ("match_class_pattern", attack("match pred:\n        case float(real=r):\n            pass"), "match"),
    ("with_block", attack("with torch.no_grad():\n        pass"), "'with' blocks"),
    ("print_flood", attack("print('x' * 100)"), "'print'"),
    ("kwargs_unpacking", attack("F.relu(pred, **{'inplace': True})"), "'**' in a call"),
    ("out_keyword", attack("torch.add(pred, 1, out=target)"), "keyword 'out'"),
    ("inplace_keyword", attack("F.relu(target, inplace=True)"), "keyword 'inplace'"),
    ("in_place_method", attack("target.add_(1)"), "in-place method 'add_'"),
    ("grad_fn_walk", attack("pred.grad_fn.next_functions"), "autograd internals"),
    ("data_attribute", attack("pred.data.zero_()"), "autograd internals"),
    ("register_hook", attack("pred.register_hook(abs)"), "autograd internals"),
    ("storage", attack("pred.untyped_storage()"), "raw memory"),
    ("self_attribute_store", "def loss(self, pred, target):\n    self.beta = 0\n    return pred\n", "assigning"),
    ("self_unknown_attribute", "def loss(self, pred, target):\n    return pred * self.model\n",
     "'self.model' is not available"),
    ("proxy_attribute_store", attack("torch.exp = torch.log"), "assigning"),
]


@pytest.mark.parametrize("code,fragment", [(c, f) for _, c, f in ROUTES], ids=[i for i, _, _ in ROUTES])
def test_the_static_check_refuses_every_route(code, fragment):
    with pytest.raises(GenomeError) as info:
        check_genome(code.replace("MARKER", "'/tmp/evoloss-marker'"))
    assert fragment in str(info.value)
    assert str(info.value).startswith("line ") or "exactly one function" in str(info.value)
    assert info.value.status == "invalid"


# Routes that are plain syntax with no run-time reach (they only matter to the static rules):
# bypassing the check, they run harmlessly or fail for their own reasons.
STATIC_ONLY = {
    "global_rebinding", "nonlocal", "try_swallows_refusal", "match_class_pattern", "mutable_default",
    "parameter_named_like_module", "comprehension_rebinds_module", "self_unknown_attribute",
    "kwargs_unpacking", "out_keyword", "inplace_keyword", "in_place_method", "grad_fn_walk", "data_attribute",
    "register_hook", "storage", "self_attribute_store", "lambda_body_ok",
}
# Dunder routes: the static rule against names starting with "_" is what holds them (with the
# check off, Python's introspection reaches everything); the jail is the layer below.
DUNDER = {"torch_inspect_attrgetter", "builtins_via_proxy", "module_dict", "format_globals"}
RUN_TIME = [(i, c) for i, c, _ in ROUTES if i not in STATIC_ONLY | DUNDER]


@pytest.mark.parametrize("code", [c for _, c in RUN_TIME], ids=[i for i, _ in RUN_TIME])
def test_with_the_check_bypassed_the_restricted_namespaces_refuse(tmp_path, code):
    marker = tmp_path / "marker"
    source = code.replace("MARKER", repr(str(marker)))
    with pytest.raises((GenomeError, AttributeError, NameError, KeyError, ImportError, TypeError)) as info:
        fn = compile_genome(source, check=False)
        fn(torch.ones(3, requires_grad=True), torch.zeros(3))
    assert not marker.exists()
    text = str(info.value)
    assert any(reason in text for reason in (
        "is not available to a genome", "is not defined", "not found", "__build_class__", "'open'",
        "object has no attribute", "read-only", "__import__"
    )), text


def test_the_proxies_refuse_by_name_and_do_not_lead_back_to_the_modules():
    namespace = restricted_namespace()
    view = namespace["torch"]
    for name in ("builtins", "importlib", "inspect", "os", "sys", "save", "load", "empty", "nn_", "Tensor",
                 "autograd", "utils", "serialization", "_C", "__dict__", "__builtins__", "__loader__", "__spec__"):
        with pytest.raises(AttributeError, match="is not available to a genome"):
            getattr(view, name)
    with pytest.raises(AttributeError):
        view.exp = torch.log  # read-only
    with pytest.raises(TypeError):
        vars(view)
    # Nothing reachable from the view's class or its refusal is a module.
    import types

    reachable = list(vars(type(view)).values()) + list(type(view).__getattr__.__globals__.values())
    assert not [v for v in reachable if isinstance(v, types.ModuleType)]
    assert not any(isinstance(v, types.ModuleType) for v in namespace.values())
    assert set(namespace["__builtins__"]).isdisjoint({"open", "exec", "eval", "__import__", "getattr",
                                                      "__build_class__", "globals", "print"})
    for module_name in ("F", "math"):
        with pytest.raises(AttributeError, match="is not available"):
            getattr(namespace[module_name], "np" if module_name == "F" else "sys")


def test_each_genome_gets_its_own_namespace():
    # A genome (with the check off) that rebinds a name in its namespace changes nothing for
    # the next genome.
    hostile = "def loss(pred, target):\n    global torch\n    torch = None\n    return pred\n"
    compile_genome(hostile, check=False)(torch.ones(2), torch.ones(2))
    fine = compile_genome("def loss(pred, target):\n    return torch.exp(pred)\n")
    assert torch.equal(fine(torch.zeros(2), torch.zeros(2)), torch.ones(2))
    first, second = restricted_namespace(), restricted_namespace()
    assert first["torch"] is not second["torch"] and type(first["torch"]) is not type(second["torch"])


def test_a_default_argument_cannot_carry_state_between_calls_even_unchecked():
    # The static check refuses mutable defaults; this shows why (the list would persist).
    fn = compile_genome("def loss(pred, target, memo=[]):\n    memo.append(1)\n    return pred * len(memo)\n",
                        check=False)
    assert fn(torch.ones(1), torch.ones(1)).item() == 1 and fn(torch.ones(1), torch.ones(1)).item() == 2
    with pytest.raises(GenomeError, match="default arguments"):
        check_genome("def loss(pred, target, memo=[]):\n    return pred\n")
    check_genome("def loss(pred, target, scale=(1.0, 2.0)):\n    return pred * scale[0]\n")


def test_with_namespaces_off_a_genome_is_plain_python(tmp_path):
    # restrict=False is the jail-only testing mode: nothing here holds, the OS jail must.
    marker = tmp_path / "marker"
    code = f"import pathlib\ndef loss(pred, target):\n    pathlib.Path({str(marker)!r}).write_text('x')\n    return pred\n"
    compile_genome(code, check=False, restrict=False)(torch.ones(1), torch.ones(1))
    assert marker.exists()


@pytest.mark.parametrize("code", [
    "import os\ndef loss(pred, target):\n    return pred\n",
    "from os import system\ndef loss(pred, target):\n    return pred\n",
    "x = open('/etc/hostname')\ndef loss(pred, target):\n    return pred\n",
    "def loss(pred, target):\n    return pred\nclass Escape:\n    pass\n",
])
def test_module_level_code_cannot_import_or_open_without_the_check(code):
    with pytest.raises(GenomeError, match="cannot build function"):
        compile_genome(code, check=False)


def test_marker_paths_are_real(tmp_path):
    # The run-time tests would pass vacuously if the attacks could not write at all: the same
    # write through the real module does create the marker.
    marker = tmp_path / "marker"
    code = attack("torch.builtins.open(MARKER, 'w').write('x')").replace("MARKER", repr(str(marker)))
    compile_genome(code, check=False, restrict=False)(torch.ones(1), torch.ones(1))
    assert Path(marker).read_text() == "x"
