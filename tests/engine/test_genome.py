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
    "def loss(pred: Tensor, target: Tensor) -> Tensor:\n    x: Tensor = pred - target\n    return x ** 2\n",
    "def loss(pred, target):\n    return torch.nn.functional.softplus(pred - target) + torch.special.expit(pred)\n",
    "def loss(pred, target):\n    eps = torch.finfo(pred.dtype).eps\n"
    "    return torch.log((pred - target).abs() + eps) * 0 + torch.linalg.vector_norm(pred) + pred\n",
    "def loss(pred, target):\n    sq = lambda v, p=2: v ** p\n    parts = []\n    for i in range(2):\n"
    "        parts.append(sq(pred - target) / (i + 1))\n    return torch.stack(parts).sum(dim=0)\n",
    "def loss(pred, target):\n    best = torch.stack([pred, target]).max(dim=0).values\n"
    "    return torch.where(pred > target, best, -best) * math.pi\n",
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


# -- every shipped seed passes the allow-list ---------------------------------------------------
def shipped_seeds():
    """(label, interface, code) for the seeds of every plug-in and the symbolic fixtures."""
    import importlib.util

    from engine.plugins import FITNESS_REGISTRY, load_fitness
    from fitness.cifar10 import ClassificationInterface, classification_seeds
    from tests.conftest import ROOT
    from tests.fixtures.losses import GENERIC_SEEDS, PREFERENCE_SEEDS, GenericFixture, PreferenceFixture

    found = []
    for name in FITNESS_REGISTRY:
        if name == "cifar10":  # needs its data folder to start; its seeds are listed below
            continue
        fitness = load_fitness(name)
        found += [(f"{name}:{s.name}", fitness.interface, s.code) for s in fitness.seeds()]
    found += [(f"cifar10:{s.name}", ClassificationInterface(), s.code) for s in classification_seeds()]
    spec = importlib.util.spec_from_file_location("robust_regression", ROOT / "examples" / "robust_regression.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    found += [(f"example:{s.name}", example.RegressionInterface(), s.code) for s in example.RobustRegression().seeds()]
    found += [(f"fixture:{k}", PreferenceFixture(), c) for k, c in PREFERENCE_SEEDS.items()]
    found += [(f"fixture:{k}", GenericFixture(), c) for k, c in GENERIC_SEEDS.items()]
    return found


def test_every_shipped_seed_passes_the_check_and_its_contract():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seeds = shipped_seeds()
    labels = {label.split(":")[0] for label, _, _ in seeds}
    assert {"synthetic-pref", "dpo", "cifar10", "example", "fixture"} <= labels
    for label, interface, code in seeds:
        try:
            check_genome(code, interface.arg_counts)
            interface.check(compile_genome(code, interface.arg_counts))  # runs in the restricted namespace
        except GenomeError as exc:
            raise AssertionError(f"seed {label}: {exc}") from exc


# -- the driver never crashes on a genome -----------------------------------------------------
DPO = ("def dpo(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, "
       "reference_rejected_logps):\n"
       "    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)\n"
       "    return {minus}F.logsigmoid(self.beta * logits)\n")


def test_six_hundred_unary_minus_signs_are_invalid_not_a_recursion_error():
    from engine.genome import code_size, function_name, parse_genome

    code = DPO.format(minus="-" * 600)
    for helper in (check_genome, code_hash, normalise, code_size, function_name, parse_genome):
        with pytest.raises(GenomeError, match="nests 100\\+ levels deep") as info:
            helper(code)
        assert info.value.status == "invalid"
    with pytest.raises(GenomeError):
        compile_genome(code)


def test_a_genome_just_inside_the_depth_limit_passes_every_helper():
    from engine.genome import code_size

    code = DPO.format(minus="-" * 90)
    check_genome(code, (5,))
    assert code_hash(code) and normalise(code) and code_size(code) > 90
    assert compile_genome(code, (5,)) is not None


@pytest.mark.parametrize("code", [
    "def f(a, b):\n    return " + "(" * 300 + "a" + ")" * 300 + "\n",  # the parser's own nesting limit
    "def f(a, b):\n    return a" + " + a" * 3000 + "\n",  # too many nodes
    "def f(a, b):\n    return 1" + "0" * 5000 + "\n",
    "\x00",
])
def test_hostile_source_is_invalid_through_every_helper(code):
    for helper in (check_genome, code_hash, normalise):
        with pytest.raises(GenomeError):
            helper(code)


@pytest.mark.parametrize("error", [RecursionError("deep"), MemoryError(), TypeError("odd"), ValueError("x\ny")])
def test_any_exception_inside_a_helper_becomes_invalid(monkeypatch, error):
    import engine.genome as genome

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(genome.ast, "unparse", boom)
    monkeypatch.setattr(genome._Checker, "run", boom)
    genome._check_cached.cache_clear()
    genome._code_hash.cache_clear()
    code = "def weird_loss(a, b):\n    return a - b\n"
    for helper in (genome.check_genome, genome.code_hash):
        with pytest.raises(GenomeError) as info:
            helper(code)
        assert info.value.status == "invalid" and "\n" not in str(info.value)


# -- short error lines ----------------------------------------------------------------------
def test_short_error_keeps_the_type_the_first_line_and_the_genome_line(tmp_path):
    import torch

    from engine.genome import short_error

    secret = tmp_path / "hostname"
    secret.write_text("first-line\nSECRET-SECOND-LINE\n" + "x" * 5000)
    code = (f"import pathlib\ndef loss(pred, target):\n    text = pathlib.Path({str(secret)!r}).read_text()\n"
            "    raise ValueError(text)\n")
    fn = compile_genome(code, check=False, restrict=False)
    with pytest.raises(ValueError) as info:
        fn(torch.ones(2), torch.ones(2))
    line = short_error(info.value)
    assert line == "ValueError: first-line (genome line 4)"
    assert "SECRET" not in line and str(tmp_path) not in line and "genome.py" not in line


def test_short_error_is_bounded_and_printable():
    from engine.genome import short_error

    long = short_error(RuntimeError("\n\n  " + "a\x1b[31m" * 500 + "\nsecond"))
    assert len(long) <= 200 and long.startswith("RuntimeError: a") and long.endswith("...")
    assert "\x1b" not in long and "second" not in long
    assert short_error(ZeroDivisionError()) == "ZeroDivisionError"
    assert short_error(GenomeError("line 3: 'torch.save' is not on the allow-list")) == \
        "line 3: 'torch.save' is not on the allow-list"

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    assert short_error(Unprintable()) == "Unprintable"


def test_short_error_finds_the_genome_line_through_a_wrapping_error():
    import torch

    from engine.genome import short_error

    fn = compile_genome("def loss(pred, target):\n    x = pred * 2\n    return x.reshape(5)\n")
    try:
        fn(torch.ones(3), torch.ones(3))
    except RuntimeError as exc:
        try:
            raise GenomeError(f"raised {type(exc).__name__}: {exc}") from exc
        except GenomeError as wrapped:
            line = short_error(wrapped)
    assert line.startswith("raised RuntimeError: shape '[5]' is invalid") and line.endswith("(genome line 3)")
    assert len(line) <= 200


# -- inputs the genome cannot follow back to the model ----------------------------------------
def tiny_policy():
    """A linear policy whose summed log-probabilities are the genome's first two inputs."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    features = torch.randn(2, 6, 4)
    chosen, rejected = model(features).squeeze(-1)  # (6,) each, attached to the model
    return model, chosen, rejected, -torch.rand(6) * 10, -torch.rand(6) * 10


GRAPH_WALKER = """
FOUND = []

def walker(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    losses = -F.logsigmoid(self.beta * logits)
    stack = [losses.grad_fn, policy_chosen_logps.grad_fn, policy_rejected_logps.grad_fn]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            FOUND.append(node.variable)
        stack.extend(child for child, _ in node.next_functions)
    return losses
"""


def test_a_genome_walking_grad_fn_finds_no_parameter_of_the_model():
    from types import SimpleNamespace

    fn = compile_genome(GRAPH_WALKER, check=False, restrict=False)
    found = fn.__wrapped__.__globals__["FOUND"]
    model, chosen, rejected, ref_chosen, ref_rejected = tiny_policy()
    parameters = list(model.parameters())
    storages = {p.untyped_storage().data_ptr() for p in parameters}

    # Called directly, the walk reaches the trained parameters: the probe works.
    fn.__wrapped__(SimpleNamespace(beta=0.1), chosen, rejected, ref_chosen, ref_rejected)
    assert any(t is p for t in found for p in parameters)
    found.clear()

    losses = fn(SimpleNamespace(beta=0.1), chosen, rejected, ref_chosen, ref_rejected)
    assert found  # the genome's own leaves, nothing more
    assert not any(t is p for t in found for p in parameters)
    assert not {t.untyped_storage().data_ptr() for t in found} & storages
    losses.sum().backward()  # and the gradient still reaches the model
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in parameters)


TAMPERER = """
def tamper(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    policy_chosen_logps.data.mul_(0)
    reference_chosen_logps.add_(1000)
    reference_rejected_logps[0] = 5
    self.beta = 100.0
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    return -F.logsigmoid(self.beta * logits), sorted(vars(self))
"""


def test_a_tampering_genome_changes_only_its_own_copies():
    import torch

    fn = compile_genome(TAMPERER, check=False, restrict=False)

    class Trainer:  # what a careless plug-in might pass as self
        def __init__(self, model):
            self.beta, self.label_smoothing, self.model, self._secret = 0.1, 0.0, model, "key"
            self.callback = print

    model, chosen, rejected, ref_chosen, ref_rejected = tiny_policy()
    before = [p.detach().clone() for p in model.parameters()]
    inputs = [t.detach().clone() for t in (chosen, rejected, ref_chosen, ref_rejected)]
    trainer = Trainer(model)
    first, names = fn(trainer, chosen, rejected, ref_chosen, ref_rejected)
    second, _ = fn(trainer, chosen, rejected, ref_chosen, ref_rejected)
    assert names == ["beta", "label_smoothing"]  # no model, no callback, nothing private
    assert trainer.beta == 0.1
    assert torch.equal(first, second)
    for original, now in zip(inputs, (chosen, rejected, ref_chosen, ref_rejected)):
        assert torch.equal(original, now)
    for original, parameter in zip(before, model.parameters()):
        assert torch.equal(original, parameter)


def test_seeds_give_exactly_the_values_and_gradients_of_a_direct_call():
    import torch

    from fitness.preference import PreferenceHparams, preference_seeds

    generator = torch.Generator().manual_seed(3)
    for seed in preference_seeds():
        fn = compile_genome(seed.code, (4, 5))
        tensors = [-(20 + 100 * torch.rand(16, generator=generator)) for _ in range(4)]
        results = []
        for call in (fn, fn.__wrapped__):
            inputs = [t.clone().requires_grad_(i < 2) for i, t in enumerate(tensors)]
            losses = call(PreferenceHparams(beta=0.05), *inputs)
            losses.sum().backward()
            results.append((losses.detach(), inputs[0].grad, inputs[1].grad))
        for wrapped, direct in zip(*results):
            assert torch.equal(wrapped, direct), seed.name


def test_tuple_outputs_keep_their_shape_and_their_gradient():
    import torch

    code = ("def trl(self, pc, pr, rc, rr):\n"
            "    logits = (pc - pr) - (rc - rr)\n"
            "    losses = -F.logsigmoid(self.beta * logits)\n"
            "    return losses, self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()\n")
    fn = compile_genome(code, (5,))
    from fitness.preference import PreferenceHparams

    pc, pr = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = fn(PreferenceHparams(), pc, pr, torch.randn(4), torch.randn(4))
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward(retain_graph=True)
    once = pc.grad.clone()
    losses.sum().backward()  # a caller that backpropagates twice gets the same gradient twice
    assert torch.allclose(pc.grad, 2 * once) and torch.allclose(pr.grad, -pc.grad)


def test_without_gradients_the_genome_still_sees_copies():
    import torch

    fn = compile_genome(TAMPERER, check=False, restrict=False)
    from types import SimpleNamespace

    tensors = [torch.randn(3) for _ in range(4)]
    originals = [t.clone() for t in tensors]
    with torch.no_grad():
        losses, _ = fn(SimpleNamespace(beta=0.1), *tensors)
    assert not losses.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(tensors, originals))


def test_warm_up_builds_the_shared_tables_once():
    from engine import genome

    genome.warm_up()
    tables, relay = genome._view_bodies(), genome._relay()
    genome.warm_up()
    assert genome._view_bodies() is tables and genome._relay() is relay


def test_tensor_subclasses_reach_the_genome_as_plain_tensors():
    import torch

    seen = []

    class Spy(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    fn = compile_genome("FOUND = []\ndef loss(pred, target):\n    FOUND.append(type(pred))\n    return pred * target\n",
                        check=False, restrict=False)
    pred = torch.nn.Parameter(torch.ones(3))
    target = torch.ones(3).as_subclass(Spy)
    seen.clear()
    fn(pred, target).sum().backward()
    assert fn.__wrapped__.__globals__["FOUND"] == [torch.Tensor]
    assert not any("mul" in getattr(f, "__name__", "") for f in seen)  # the genome's ops ran on plain copies
    assert torch.equal(pred.grad, torch.ones(3))
