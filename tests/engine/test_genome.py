"""The static safety check against a catalogue of hostile and broken genomes."""
import pytest

from engine.genome import GenomeError, check_genome, code_hash, compile_genome, normalise

OK = "def loss(pred, target):\n    return (pred - target) ** 2\n"


def body(line: str, header: str = "def loss(pred, target):") -> str:
    return f"{header}\n    {line}\n    return (pred - target) ** 2\n"


# (id, code, a fragment the error message must contain)
HOSTILE = [
    ("module_import_os", "import os\n" + OK, "import of 'os'"),
    ("function_import_os", body("import os"), "import of 'os'"),
    ("from_import", body("from os import system"), "from os import"),
    ("import_subprocess", body("import subprocess"), "subprocess"),
    ("import_socket", body("import socket"), "socket"),
    ("dunder_import", body("__import__('os').system('ls')"), "__import__"),
    ("open_file", body("open('/etc/passwd').read()"), "'open'"),
    ("eval", body("eval('1 + 1')"), "'eval'"),
    ("exec", body("exec('x = 1')"), "'exec'"),
    ("compile", body("compile('1', 'f', 'eval')"), "'compile'"),
    ("getattr_save", body("getattr(torch, 'save')(pred, '/tmp/x')"), "'getattr'"),
    ("globals", body("globals()['x'] = 1"), "'globals'"),
    ("torch_save", body("torch.save(pred, '/tmp/x.pt')"), "'torch.save' is not on the allow-list"),
    ("torch_load", body("torch.load('/tmp/x.pt')"), "'torch.load' is not on the allow-list"),
    ("torch_hub", body("torch.hub.list('user/repo')"), "'torch.hub' is not on the allow-list"),
    ("torch_from_file", body("torch.from_file('/etc/passwd', size=10)"), "'torch.from_file'"),
    ("storage_from_file", body("torch.UntypedStorage.from_file('/etc/passwd', False, 10)"), "'torch.UntypedStorage'"),
    ("cpp_extension", body("torch.utils.cpp_extension.load_inline('x', '')"), "'torch.utils'"),
    ("ops_load_library", body("torch.ops.load_library('/tmp/evil.so')"), "'torch.ops'"),
    ("classes", body("torch.classes.load_library('/tmp/evil.so')"), "'torch.classes'"),
    ("library", body("torch.library.Library('x', 'DEF')"), "'torch.library'"),
    ("jit", body("torch.jit.script(pred)"), "'torch.jit'"),
    ("torch_os", body("torch.os.system('ls')"), "'torch.os'"),
    ("functional_torch", body("F.torch.sum(pred)"), "'F.torch'"),
    ("dunder_class", body("pred.__class__"), "__class__"),
    ("subclasses", body("().__class__.__bases__[0].__subclasses__()"), "dunder attribute"),
    ("private_attr", body("torch._C"), "'_C'"),
    ("format_escape", body("'{0.__class__}'.format(pred)"), "'format'"),
    ("numpy_tofile", body("pred.detach().numpy()"), "'numpy'"),
    ("distributed", body("torch.distributed.init_process_group('gloo')"), "'torch.distributed'"),
    ("multiprocessing", body("torch.multiprocessing.spawn(pred)"), "'torch.multiprocessing'"),
    ("manual_seed", body("torch.manual_seed(0)"), "'torch.manual_seed'"),
    ("set_num_threads", body("torch.set_num_threads(64)"), "'torch.set_num_threads'"),
    ("compile_fn", body("torch.compile(pred)"), "'torch.compile'"),
    ("sys_modules", body("sys.exit(0)"), "'sys'"),
    ("breakpoint", body("breakpoint()"), "'breakpoint'"),
    ("type_call", body("type(pred)"), "'type'"),
    ("attribute_store", body("torch.pi = 3"), "assigning"),
    ("global_stmt", body("global counter"), "global"),
    ("decorator", "@torch.no_grad()\ndef loss(pred, target):\n    return (pred - target) ** 2\n", "decorators"),
    ("default_arg_call", "def loss(pred, target=open('/etc/passwd')):\n    return pred\n", "default arguments"),
    ("annotation_call", "def loss(pred: open('/x'), target):\n    return pred\n", "annotations"),
    ("module_level_code", "x = print('hi')\n" + OK, "module level"),
    ("module_level_call", OK + "loss(1, 2)\n", "module level"),
    ("two_functions", OK + "\ndef other(pred, target):\n    return pred\n", "exactly one function"),
    ("no_function", "x = 1\n", "module level"),
    ("empty", "", "exactly one function"),
    ("syntax_error", "def loss(pred, target)\n    return pred\n", "syntax error"),
    ("class_def", body("class A: pass"), "class"),
    ("generator", body("yield pred"), "generators"),
    ("async_def", "async def loss(pred, target):\n    return pred\n", "module level"),
    ("unknown_name", body("x = undefined_helper(pred)"), "not defined"),
    ("bytes", body("x = b'payload'"), "bytes"),
    ("wrong_arity", "def loss(pred):\n    return pred\n", "positional parameters"),
    ("varargs", "def loss(*args):\n    return args[0]\n", "positional parameters"),
    ("too_long", OK + "#" + "x" * 30_000, "characters long"),
]


@pytest.mark.parametrize("code,fragment", [(c, f) for _, c, f in HOSTILE], ids=[i for i, _, _ in HOSTILE])
def test_hostile_genome_is_rejected_with_a_clear_message(code, fragment):
    with pytest.raises(GenomeError) as info:
        check_genome(code, arg_counts=(2,))
    assert fragment in str(info.value)
    assert info.value.status == "invalid"


def test_catalogue_is_large():
    assert len(HOSTILE) >= 20


def test_non_string_genome_is_rejected():
    with pytest.raises(GenomeError, match="must be a string"):
        check_genome(b"def f(a, b): return a")


@pytest.mark.parametrize("code", [
    OK,
    "import torch\nimport torch.nn.functional as F\nimport math\n\n" + OK,
    '"""Docstring."""\n' + OK,
    "def loss(pred, target):\n    d = pred - target\n    return torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5)\n",
    "def loss(pred, target):\n    return F.smooth_l1_loss(pred, target, reduction='none') * math.log(2)\n",
    "def loss(pred, target):\n    out = torch.zeros_like(pred)\n    for i in range(3):\n        out = out + (pred - target).abs() / (i + 1)\n    return out\n",
    "def loss(pred, target, scale=2.0):\n    return scale * (pred - target) ** 2\n",
    "def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:\n    return (pred - target) ** 2\n",
])
def test_ordinary_losses_pass(code):
    check_genome(code, arg_counts=(2, 3))
    fn = compile_genome(code, arg_counts=(2, 3))
    import torch

    assert fn(torch.ones(3), torch.zeros(3)).shape == (3,)


def test_compiled_genome_has_no_dangerous_builtins():
    fn = compile_genome("def loss(pred, target):\n    return pred\n")
    genome_globals = fn.__wrapped__.__globals__
    assert "open" not in genome_globals["__builtins__"]
    assert "__import__" not in genome_globals["__builtins__"]


def test_code_hash_ignores_names_comments_and_layout():
    a = "def dpo(x, y):\n    # margin\n    d = x - y\n    return d ** 2\n"
    b = 'import torch\n\ndef other(p, q):\n    """Doc."""\n    margin = p - q\n    return margin ** 2\n'
    c = "def dpo(x, y):\n    d = y - x\n    return d ** 2\n"
    assert code_hash(a) == code_hash(b)
    assert code_hash(a) != code_hash(c)
    assert "genome" in normalise(a)
