"""Tests of the symbolic (AST) operator on the DiscoPOP paper's seed losses and a generic loss."""
from __future__ import annotations

import ast
import keyword
import random
import re
from types import SimpleNamespace

import pytest

from engine.candidate import Candidate
from engine.genome import GenomeError, check_genome, code_hash, compile_genome
from fitness.base import Interface
from operators.base import Context, Elite, Offspring, OperatorError
from operators.symbolic import CROSSOVERS, MUTATIONS, PRIMITIVES, SymbolicOperator
from tests.fixtures.losses import GENERIC, GENERIC_SEEDS, IPO, LRML, PREFERENCE, PREFERENCE_SEEDS, _preference



def candidates(seeds: dict[str, str]) -> list[Candidate]:
    return [Candidate(id=i, name=name, code=code) for i, (name, code) in enumerate(seeds.items())]


def context(interface=PREFERENCE, seed: int = 0, **kwargs) -> Context:
    return Context(interface=interface, rng=random.Random(seed), **kwargs)


def runtime_error(code: str, interface: Interface) -> str | None:
    """None if ``code`` compiles and passes the contract checks (shape (batch,), finite loss and
    gradient, a gradient that reaches the inputs), else the reason."""
    try:
        interface.check(compile_genome(code, interface.arg_counts))
    except GenomeError as exc:
        return str(exc)
    return None


def calls(code: str) -> list[str]:
    """Dotted names of the functions called in ``code`` (``F.logsigmoid``)."""
    return [ast.unparse(n.func) for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)]


def numbers(code: str) -> list[float]:
    return sorted(n.value for n in ast.walk(ast.parse(code))
                  if isinstance(n, ast.Constant) and type(n.value) in (int, float))


def additive_terms(code: str) -> int:
    return sum(isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub)) for n in ast.walk(ast.parse(code)))


def only(kind: str, **options) -> SymbolicOperator:
    if kind in MUTATIONS:
        return SymbolicOperator(mutations=[kind], **options)
    return SymbolicOperator(crossovers=[kind], **options)


# -- validity, diversity, determinism -----------------------------------------------------------
def test_offspring_mostly_pass_static_and_runtime_checks():
    operator = SymbolicOperator()
    ctx = context(seed=11)
    parents = candidates(PREFERENCE_SEEDS)
    mutants = [operator.mutate(ctx.rng.choice(parents), ctx) for _ in range(200)]
    children = [operator.crossover(*ctx.rng.sample(parents, 2), ctx) for _ in range(200)]
    for group in (mutants, children):
        valid = 0
        for offspring in group:
            check_genome(offspring.code, PREFERENCE.arg_counts)  # never statically invalid
            valid += runtime_error(offspring.code, PREFERENCE) is None
        assert valid / len(group) >= 0.9
        distinct = {code_hash(o.code) for o in group}
        assert len(distinct) / len(group) >= 0.5


def test_generic_interface_offspring_are_valid():
    operator = SymbolicOperator()
    ctx = context(GENERIC, seed=3)
    parents = candidates(GENERIC_SEEDS)
    made = [operator.mutate(ctx.rng.choice(parents), ctx) for _ in range(40)]
    made += [operator.crossover(*ctx.rng.sample(parents, 2), ctx) for _ in range(20)]
    valid = sum(runtime_error(o.code, GENERIC) is None for o in made)
    assert valid / len(made) >= 0.9
    assert all("self" not in o.code for o in made)


def test_same_seed_gives_same_offspring():
    def run(seed: int) -> list[Offspring]:
        operator = SymbolicOperator()
        ctx = context(seed=seed)
        parents = candidates(PREFERENCE_SEEDS)
        out = [operator.mutate(ctx.rng.choice(parents), ctx) for _ in range(10)]
        out += [operator.crossover(*ctx.rng.sample(parents, 2), ctx) for _ in range(10)]
        out += [operator.propose(ctx) for _ in range(3)]
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_global_random_is_not_used():
    operator = SymbolicOperator()
    random.seed(0)
    first = operator.mutate(candidates(PREFERENCE_SEEDS)[3], context(seed=2))
    random.seed(12345)
    second = operator.mutate(candidates(PREFERENCE_SEEDS)[3], context(seed=2))
    assert first == second


def test_names_are_short_identifiers_that_keep_the_root():
    operator = SymbolicOperator()
    ctx = context(seed=4)
    parent = candidates(PREFERENCE_SEEDS)[0]
    other = candidates(PREFERENCE_SEEDS)[1]
    for generation in range(30):
        if generation % 5 == 4:
            try:
                offspring = operator.crossover(parent, other, ctx)
            except OperatorError:  # allowed: e.g. the parents together exceed max_nodes
                continue
        else:
            offspring = operator.mutate(parent, ctx)
        assert offspring.name.isidentifier() and not keyword.iskeyword(offspring.name)
        assert len(offspring.name) <= 40
        assert offspring.name.startswith("dpo")
        assert ast.parse(offspring.code).body[0].name == offspring.name
        assert offspring.thought.endswith(".") and offspring.thought[0].isupper()
        parent = Candidate(id=100 + generation, name=offspring.name, code=offspring.code)


def test_repeated_variation_stays_small_and_readable():
    operator = SymbolicOperator(max_nodes=150)
    ctx = context(seed=8)
    population = candidates(PREFERENCE_SEEDS)
    for step in range(40):
        if ctx.rng.random() < 0.5:
            first, second = ctx.rng.sample(population, 2)
            try:
                offspring = operator.crossover(first, second, ctx)
            except OperatorError:
                continue
        else:
            offspring = operator.mutate(ctx.rng.choice(population), ctx)
        module = ast.parse(offspring.code)
        size = sum(1 for n in ast.walk(module) if not isinstance(n, (ast.expr_context, ast.operator,
                                                                      ast.unaryop, ast.cmpop, ast.boolop)))
        assert size <= 150 + 40  # the cap, or smaller than an over-size parent
        assert len(offspring.name) <= 40
        population[ctx.rng.randrange(len(population))] = Candidate(id=step + 10, name=offspring.name,
                                                                   code=offspring.code)


# -- each mutation kind does what it says -------------------------------------------------------
def test_swap_replaces_a_primitive_with_another():
    operator = only("swap")
    ctx = context(seed=1)
    seen = set()
    for _ in range(20):
        offspring = operator.mutate(candidates(PREFERENCE_SEEDS)[0], ctx)
        called = calls(offspring.code)
        assert "F.logsigmoid" not in called
        new = [c for c in called if c.split(".")[-1] in PRIMITIVES]
        assert len(new) == 1
        seen.add(new[0])
        assert runtime_error(offspring.code, PREFERENCE) is None
        # -logsigmoid(z) is a penalty of -z: it becomes prim(-z), not -prim(z)
        assert "losses = -" not in offspring.code and "-self.beta * logits" in offspring.code
    assert len(seen) >= 4


@pytest.mark.parametrize("code", [
    "def f(x, y):\n    return torch.nn.functional.logsigmoid(x - y)\n",
    "def f(x, y):\n    return (x - y).exp()\n",
    "def f(x, y):\n    return F.sigmoid(x) * torch.relu(y)\n",
])
def test_swap_recognises_all_spellings(code):
    offspring = only("swap").mutate(Candidate(id=0, name="f", code=code), context(GENERIC))
    assert code_hash(offspring.code) != code_hash(code)
    assert offspring.thought.startswith("Swapped ")


def test_constant_perturbation_changes_one_weight_and_keeps_exponents():
    operator = only("constant")
    ctx = context(seed=2)
    parent = candidates(PREFERENCE_SEEDS)[2]  # ipo: 1 / (2 * beta), exponent 2
    for _ in range(10):
        offspring = operator.mutate(parent, ctx)
        before, after = numbers(IPO), numbers(offspring.code)
        assert len(before) == len(after) and before != after
        changed = [v for v in after if v not in before]
        assert len(changed) == 1 and changed[0] > 0
        assert len(f"{changed[0]:g}".replace("0.", "").lstrip("0")) <= 4  # 3 significant digits
        assert "** 2" in offspring.code
        assert re.fullmatch(r"ipo_c\d[\dp]*", offspring.name)


def test_add_term_extends_the_returned_loss_with_a_scaled_margin_term():
    operator = only("add_term")
    ctx = context(seed=3)
    for parent in candidates(PREFERENCE_SEEDS):
        offspring = operator.mutate(parent, ctx)
        assert additive_terms(offspring.code) >= additive_terms(parent.code) + 1
        assert len(calls(offspring.code)) == len(calls(parent.code)) + 1
        assert "self.beta *" in offspring.code
        assert runtime_error(offspring.code, PREFERENCE) is None


def test_add_term_prefers_the_logits_local():
    operator = only("add_term")
    ctx = context(seed=9)
    texts = [operator.mutate(candidates(PREFERENCE_SEEDS)[0], ctx).code for _ in range(20)]
    assert sum("self.beta * logits)" in t.splitlines()[-2] for t in texts) >= 8


def test_drop_term_removes_a_term():
    operator = only("drop_term")
    ctx = context(seed=4)
    for parent in candidates(PREFERENCE_SEEDS):
        offspring = operator.mutate(parent, ctx)
        assert additive_terms(offspring.code) < additive_terms(parent.code)
        assert offspring.thought.startswith("Dropped ")
        check_genome(offspring.code, (5,))


def test_drop_term_keeps_a_gradient_path():
    operator = only("drop_term")
    ctx = context(seed=5)
    for _ in range(30):
        offspring = operator.mutate(candidates(PREFERENCE_SEEDS)[0], ctx)
        assert runtime_error(offspring.code, PREFERENCE) is None


def test_reweight_multiplies_one_term_of_a_sum():
    operator = only("reweight")
    ctx = context(seed=6)
    for parent in candidates(PREFERENCE_SEEDS):
        offspring = operator.mutate(parent, ctx)
        assert additive_terms(offspring.code) == additive_terms(parent.code)
        assert numbers(offspring.code) != numbers(parent.code)
        assert re.search(r"_w\d", offspring.name)


def test_tune_makes_small_moves_around_dpo_which_has_no_constant():
    operator = only("tune")
    ctx = context(seed=7)
    parent = candidates(PREFERENCE_SEEDS)[0]  # dpo: -F.logsigmoid(self.beta * logits), no number
    assert numbers(parent.code) == []
    with pytest.raises(OperatorError):
        only("constant").mutate(parent, ctx)
    seen = set()
    for _ in range(20):
        offspring = operator.mutate(parent, ctx)
        assert runtime_error(offspring.code, PREFERENCE) is None
        (value,) = numbers(offspring.code)
        assert 0.05 <= value <= 1.4
        assert re.fullmatch(r"dpo_[so]\d[\dp]*", offspring.name)
        seen.add(offspring.name[4])
    assert seen == {"s", "o"}  # scales and shifts both occur


def test_repeated_tunes_adjust_their_constants_instead_of_stacking_them():
    operator = only("tune")
    ctx = context(seed=8)
    parent = candidates(PREFERENCE_SEEDS)[0]
    for i in range(30):
        offspring = operator.mutate(parent, ctx)
        assert runtime_error(offspring.code, PREFERENCE) is None
        parent = Candidate(id=i + 1, name=offspring.name, code=offspring.code)
    assert len(numbers(parent.code)) <= 2  # one scale and one offset at most

def test_tuple_returns_are_mutated_in_their_first_element():
    code = _preference(
        "trl_dpo",
        "    losses = -F.logsigmoid(self.beta * logits)\n"
        "    chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()\n"
        "    rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()\n"
        "    return losses, chosen_rewards, rejected_rewards\n",
    )
    offspring = only("add_term").mutate(Candidate(id=0, name="trl_dpo", code=code), context())
    assert offspring.code.rstrip().endswith("return (losses, chosen_rewards, rejected_rewards)")
    assert runtime_error(offspring.code, PREFERENCE) is None


# -- crossover ----------------------------------------------------------------------------------
def test_blend_contains_both_parents_and_a_convex_weight():
    dpo, hinge = candidates(PREFERENCE_SEEDS)[:2]
    offspring = only("blend").crossover(dpo, hinge, context())
    called = calls(offspring.code)
    assert "F.logsigmoid" in called and "torch.relu" in called
    weights = re.search(r"return ([\d.]+) \* \w+ \+ ([\d.]+) \* \w+", offspring.code)
    assert weights and 0.2 <= float(weights[1]) <= 0.8
    assert float(weights[1]) + float(weights[2]) == pytest.approx(1.0)
    assert offspring.name == "dpo_x_hinge_blend"
    assert offspring.code.count("logits =") == 1  # the shared preamble is computed once
    assert runtime_error(offspring.code, PREFERENCE) is None


def test_crossover_renames_clashing_locals_of_the_second_parent():
    ipo, dpo = candidates(PREFERENCE_SEEDS)[2], candidates(PREFERENCE_SEEDS)[0]
    offspring = only("blend").crossover(ipo, dpo, context())
    assert "    losses = (logits - 1 / (2 * self.beta)) ** 2" in offspring.code
    assert "    losses_b = -F.logsigmoid(self.beta * logits)" in offspring.code
    assert re.search(r"return [\d.]+ \* losses \+ [\d.]+ \* losses_b", offspring.code)


def test_gate_switches_between_parents_with_a_sigmoid_of_the_margin():
    dpo, ipo = candidates(PREFERENCE_SEEDS)[0], candidates(PREFERENCE_SEEDS)[2]
    offspring = only("gate").crossover(dpo, ipo, context(seed=2))
    assert re.search(r"gate = torch\.sigmoid\(.+ / [\d.]+\)", offspring.code)
    assert "F.logsigmoid" in calls(offspring.code) and "** 2" in offspring.code
    assert "DiscoPOP" in offspring.thought
    assert runtime_error(offspring.code, PREFERENCE) is None


def test_crossover_renames_the_second_parents_parameters_to_the_firsts():
    dpo, short = candidates(PREFERENCE_SEEDS)[0], candidates(PREFERENCE_SEEDS)[4]
    offspring = only("blend").crossover(dpo, short, context())
    function = check_genome(offspring.code, (5,))
    assert [a.arg for a in function.args.args][1:] == [
        "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"]
    assert " pc " not in offspring.code and "(pc" not in offspring.code
    assert runtime_error(offspring.code, PREFERENCE) is None


def test_repeated_crossovers_compute_shared_values_once():
    dpo, hinge, ipo = candidates(PREFERENCE_SEEDS)[:3]
    operator = only("blend")
    first = operator.crossover(dpo, hinge, context(seed=1))
    child = Candidate(id=9, name=first.name, code=first.code)
    second = operator.crossover(child, ipo, context(seed=2))
    assert second.code.count("pi_logratios") == 2  # defined once, read once
    assert "pi_logratios_b" not in second.code and "logits_b" not in second.code
    assert runtime_error(second.code, PREFERENCE) is None


def _subtrees(code: str) -> set[str]:
    """Dumps of the expressions in ``code`` with ``_b`` suffixes and short parameter names
    mapped to the long ones, so that material can be traced to a parent."""
    aliases = dict(zip(["pc", "pr", "rc", "rr"], ["policy_chosen_logps", "policy_rejected_logps",
                                                  "reference_chosen_logps", "reference_rejected_logps"]))
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            node.id = aliases.get(node.id, re.sub(r"_b\d*$", "", node.id))
    return {ast.dump(n) for n in ast.walk(tree) if isinstance(n, (ast.Call, ast.BinOp))}


def test_splice_takes_material_from_both_parents():
    operator = only("splice")
    ctx = context(seed=7)
    parents = candidates(PREFERENCE_SEEDS)
    for _ in range(20):
        first, second = ctx.rng.sample(parents, 2)
        try:
            offspring = operator.crossover(first, second, ctx)
        except OperatorError:
            continue
        mine, theirs, child = _subtrees(first.code), _subtrees(second.code), _subtrees(offspring.code)
        assert child & (theirs - mine), (first.code, second.code, offspring.code)
        assert child & mine
        assert code_hash(offspring.code) not in {code_hash(first.code), code_hash(second.code)}
        assert offspring.name.endswith("_splice")


def test_every_kind_is_used_by_default():
    operator = SymbolicOperator()
    ctx = context(seed=12)
    parents = candidates(PREFERENCE_SEEDS)
    names = [operator.mutate(ctx.rng.choice(parents), ctx).name for _ in range(60)]
    names += [operator.crossover(*ctx.rng.sample(parents, 2), ctx).name for _ in range(30)]
    tags = {name.rsplit("_", 1)[-1] for name in names}
    assert {"drop", "blend", "gate", "splice"} <= tags
    assert any(t.startswith("c") and t[1:2].isdigit() for t in tags)
    assert any(t.startswith("w") and t[1:2].isdigit() for t in tags)
    assert any(t in PRIMITIVES for t in tags)
    assert any(t.startswith("p") and t[1:] in PRIMITIVES for t in tags)


# -- propose ------------------------------------------------------------------------------------
def test_propose_mutates_the_interface_example_when_the_archive_is_empty():
    offspring = SymbolicOperator().propose(context(seed=3))
    assert "example dpo" in offspring.thought
    assert offspring.name.startswith("dpo_")
    assert runtime_error(offspring.code, PREFERENCE) is None


def test_propose_starts_from_an_elite():
    elite = Elite(candidate=Candidate(id=4, name="lrml", code=LRML), fitness=0.75)
    offspring = SymbolicOperator().propose(context(seed=3, best=[elite]))
    assert "elite lrml (fitness 0.75)" in offspring.thought
    assert offspring.name.startswith("lrml_")
    assert code_hash(offspring.code) != code_hash(LRML)


# -- errors and options -------------------------------------------------------------------------
def test_operator_error_when_no_mutation_applies():
    code = "def f(x, y):\n    return x * y\n"
    with pytest.raises(OperatorError, match="no symbolic mutation"):
        SymbolicOperator(mutations=["constant", "swap", "drop_term"]).mutate(
            Candidate(id=0, name="f", code=code), context(GENERIC))


def test_operator_error_for_unparsable_or_incompatible_parents():
    operator = SymbolicOperator()
    with pytest.raises(OperatorError, match="cannot parse"):
        operator.mutate(Candidate(id=0, name="bad", code="def f(:\n"), context())
    with pytest.raises(OperatorError, match="parameter"):
        operator.crossover(candidates(PREFERENCE_SEEDS)[0], candidates(GENERIC_SEEDS)[0], context())
    dpo = candidates(PREFERENCE_SEEDS)[0]
    with pytest.raises(OperatorError, match="identical"):
        operator.crossover(dpo, dpo, context())
    empty = SimpleNamespace(example="", arg_counts=None)
    with pytest.raises(OperatorError, match="nothing to propose"):
        operator.propose(Context(interface=empty, rng=random.Random(0)))


def test_size_cap_rejects_large_offspring():
    operator = SymbolicOperator(crossovers=["blend", "gate"], max_nodes=60)
    lrml = candidates(PREFERENCE_SEEDS)[3]
    with pytest.raises(OperatorError, match="max_nodes"):
        operator.crossover(lrml, candidates(PREFERENCE_SEEDS)[2], context())


@pytest.mark.parametrize("options, message", [
    ({"mutation": ["swap"]}, "unknown option"),
    ({"mutations": ["shuffle"]}, "unknown kind"),
    ({"mutations": {"swap": -1}}, "weight"),
    ({"mutations": []}, "at least one"),
    ({"crossovers": {"blend": 0}}, "at least one"),
    ({"max_nodes": 5}, "max_nodes"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"constant_factor": (2.0, 0.5)}, "must not exceed"),
    ({"constant_factor": (0.0, 2.0)}, "positive"),
    ({"blend_weight": (0.2, 1.5)}, "within"),
    ({"gate_temperature": "fast"}, "two finite numbers"),
    ({"propose_steps": (1.5, 3)}, "integers"),
])
def test_bad_options_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message):
        SymbolicOperator(**options)


def test_options_accept_weights_and_lists():
    operator = SymbolicOperator(mutations={"swap": 2, "constant": 1}, crossovers=["gate"],
                                constant_factor=[0.8, 1.25], propose_steps=[1, 1])
    assert operator.name == "symbolic"
    assert [k for k, _ in operator.mutations] == ["constant", "swap"]
    assert set(MUTATIONS) >= {"constant", "swap"} and "gate" in CROSSOVERS
