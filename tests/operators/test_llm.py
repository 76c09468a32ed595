"""LLM operators with the real openai and anthropic clients against a scripted local server."""
import json
import random
import sqlite3
import time

import pytest

pytest.importorskip("openai")
pytest.importorskip("anthropic")

pytestmark = pytest.mark.llm

from archives.store import RunStore  # noqa: E402
from engine.candidate import Candidate  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.executor import SerialExecutor  # noqa: E402
from engine.assembly import build_operators  # noqa: E402
from engine.plugins import PluginError, load_fitness, load_operator  # noqa: E402
from operators.base import BudgetExhausted, Context, Operator, OperatorError  # noqa: E402
from operators.llm import Budget  # noqa: E402
from tests.conftest import EXAMPLE_SPEC, JITTER_SPEC  # noqa: E402
from tests.operators.fake_llm import Answer, FakeLLM  # noqa: E402

CODE = "def abs_loss(pred, target):\n    return (pred - target).abs()\n"
SCALAR = "def mean_loss(pred, target):\n    return ((pred - target) ** 2).mean()\n"


def reply(code=CODE, name="abs_loss", thought="absolute error ignores outliers"):
    return json.dumps({"thought": thought, "name": name, "code": code})


def seeded_reply(request):
    """A distinct valid loss per request seed (OpenAI requests carry the seed)."""
    rng = random.Random(request.get("seed", len(json.dumps(request))))
    power, weight = round(rng.uniform(0.6, 2.4), 2), round(rng.uniform(0.5, 2.0), 2)
    name = f"p{int(power * 100)}_w{int(weight * 100)}"
    return reply(f"def {name}(pred, target):\n    return {weight} * (pred - target).abs() ** {power}\n", name,
                 f"power {power}")


@pytest.fixture
def fake():
    with FakeLLM() as server:
        yield server


@pytest.fixture
def interface():
    return load_fitness(EXAMPLE_SPEC).interface


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")


def make_operator(tmp_path, spec, **settings):
    config = RunConfig(fitness=EXAMPLE_SPEC, executor="serial", llm_http_retries=settings.pop("llm_http_retries", 2),
                       operator=spec, **settings)
    (operator,), _ = build_operators(config)
    store = RunStore.create(tmp_path / "run", config.to_dict())
    operator.attach(store)
    return operator, store


def context(interface, seed=0):
    return Context(interface=interface, rng=random.Random(seed))


PARENT = Candidate(0, "mse", "def mse(pred, target):\n    return (pred - target) ** 2\n")


# -- providers and parsing through real clients ------------------------------------------------------
def test_openai_good_reply_is_recorded_with_tokens_and_cost(tmp_path, fake, interface, keys):
    fake.push(Answer(reply(), tokens_in=1000, tokens_out=500))
    operator, store = make_operator(tmp_path, f"openai:gpt-4o@{fake.openai_url}")
    offspring = operator.mutate(PARENT, context(interface))
    assert (offspring.name, offspring.code) == ("abs_loss", CODE)
    request = fake.requests[0]
    assert request["model"] == "gpt-4o" and request["messages"][0]["role"] == "system"
    assert "def loss(pred, target)" in request["messages"][0]["content"]  # the exact signature
    assert "Improve this loss" in request["messages"][1]["content"] and "def mse" in request["messages"][1]["content"]
    (call,) = store.llm_calls()
    assert call["id"] in offspring.llm_calls and call["kind"] == "mutate" and call["attempt"] == 0
    assert (call["tokens_in"], call["tokens_out"]) == (1000, 500)
    assert call["cost_usd"] == pytest.approx((1000 * 2.5 + 500 * 10.0) / 1e6)  # gpt-4o's listed price
    assert json.loads(call["prompt"]) == request["messages"] and call["reply"] == reply()


def test_anthropic_prose_wrapped_reply(tmp_path, fake, interface, keys):
    fake.push("Here is my proposal:\n```json\n" + reply() + "\n```\nIt should be robust.")
    operator, store = make_operator(tmp_path, f"anthropic:claude-sonnet-4-6@{fake.anthropic_url}")
    offspring = operator.propose(context(interface))
    assert offspring.code == CODE
    request = fake.requests[0]
    assert "def loss(pred, target)" in request["system"]  # the system prompt goes in its own field
    assert [m["role"] for m in request["messages"]] == ["user"]
    assert store.llm_calls()[0]["cost_usd"] == pytest.approx((100 * 3 + 50 * 15) / 1e6)


def test_prose_without_code_then_invalid_code_then_a_fixed_reply(tmp_path, fake, interface, keys):
    fake.push("I would use a Huber loss here.",
              reply("import os\ndef bad(pred, target):\n    return pred - target\n", "bad"),
              reply())
    operator, store = make_operator(tmp_path, f"openai:test-model@{fake.openai_url}")
    offspring = operator.crossover(PARENT, PARENT, context(interface))
    assert offspring.code == CODE
    second, third = fake.requests[1]["messages"], fake.requests[2]["messages"]
    assert second[-2] == {"role": "assistant", "content": "I would use a Huber loss here."}
    assert second[-1]["content"].startswith("Code not valid. Error: ") and '"code"' in second[-1]["content"]
    assert "'os'" in third[-1]["content"] and len(third) == len(second) + 2  # one conversation
    calls = store.llm_calls()
    assert [c["attempt"] for c in calls] == [0, 1, 2]
    assert calls[0]["error"].startswith("reply rejected") and calls[2]["error"] is None
    assert list(offspring.llm_calls) == [c["id"] for c in calls]


def test_a_scalar_loss_fails_the_unit_tests_and_is_re_prompted(tmp_path, fake, interface, keys):
    fake.push(reply(SCALAR, "mean_loss"), reply())
    operator, store = make_operator(tmp_path, f"openai:test-model@{fake.openai_url}")
    assert operator.propose(context(interface)).code == CODE
    assert "returned a scalar" in fake.requests[1]["messages"][-1]["content"]


def test_with_static_checks_only_a_scalar_loss_is_handed_on(tmp_path, fake, interface, keys):
    fake.push(reply(SCALAR, "mean_loss"))
    operator, _ = make_operator(tmp_path, f"openai:test-model@{fake.openai_url}", llm_check="static")
    assert operator.propose(context(interface)).code == SCALAR  # the worker's check will record it invalid
    assert len(fake.requests) == 1


def test_retries_exhausted_hand_on_the_last_code_or_fail(tmp_path, fake, interface, keys):
    fake.push(reply(SCALAR, "mean_loss"), reply(SCALAR, "mean_loss"))
    operator, _ = make_operator(tmp_path, f"openai:test-model@{fake.openai_url}", llm_retries=1)
    assert operator.propose(context(interface)).code == SCALAR
    fake.push("no code", "still none")
    with pytest.raises(OperatorError, match="no usable reply after 2 attempts"):
        operator.propose(context(interface))


# -- reliability ------------------------------------------------------------------------------------
def test_429_then_success_uses_the_clients_retries(tmp_path, fake, interface, keys):
    fake.push(Answer("slow down", status=429, headers={"retry-after-ms": "10"}), reply())
    operator, store = make_operator(tmp_path, f"openai:test-model@{fake.openai_url}")
    assert operator.propose(context(interface)).code == CODE
    assert len(fake.requests) == 2 and len(store.llm_calls()) == 1


def test_persistent_500s_fail_the_call_and_are_recorded(tmp_path, fake, interface, keys):
    fake.default = Answer("boom", status=500, headers={"retry-after-ms": "10"})
    operator, store = make_operator(tmp_path, f"anthropic:claude-sonnet-4-6@{fake.anthropic_url}",
                                    llm_http_retries=2)
    with pytest.raises(OperatorError, match="500|boom"):
        operator.propose(context(interface))
    assert len(fake.requests) == 3  # one try and two retries
    (call,) = store.llm_calls()
    assert call["reply"] is None and "boom" in call["error"]
    assert store.llm_totals()["failed_calls"] == 1


def test_a_hanging_server_times_out(tmp_path, fake, interface, keys):
    fake.default = Answer(reply(), delay=30)
    operator, store = make_operator(tmp_path, f"openai:test-model@{fake.openai_url}", llm_timeout=0.5,
                                    llm_http_retries=0)
    started = time.perf_counter()
    with pytest.raises(OperatorError, match="(?i)timed out|timeout"):
        operator.propose(context(interface))
    assert time.perf_counter() - started < 5
    assert "time" in store.llm_calls()[0]["error"].lower()


def test_budget_of_calls_raises_budget_exhausted(tmp_path, fake, interface, keys):
    fake.default = reply()
    operator, _ = make_operator(tmp_path, f"openai:test-model@{fake.openai_url}", max_llm_calls=2)
    operator.propose(context(interface))
    operator.propose(context(interface))
    with pytest.raises(BudgetExhausted, match="--max-llm-calls 2"):
        operator.propose(context(interface))
    assert len(fake.requests) == 2


def test_cost_budget_counts_estimated_cost():
    budget = Budget(max_cost_usd=0.01)
    budget.reserve()
    budget.charge(0.02)
    with pytest.raises(BudgetExhausted, match="--max-cost-usd 0.01"):
        budget.reserve()


# -- start-up checks --------------------------------------------------------------------------------
def test_llm_specs_are_not_taken_for_module_class(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(PluginError, match="OPENAI_API_KEY"):
        load_operator("openai:gpt-4o")
    assert load_operator(JITTER_SPEC).name == "jitter"  # path.py:Class still works


def test_missing_key_is_reported_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    out = tmp_path / "run"
    assert main(["run", "--fitness", EXAMPLE_SPEC, "--operator", "anthropic:claude-sonnet-4-6", "--out", str(out),
                 "--quiet"]) == 2
    assert "ANTHROPIC_API_KEY" in capsys.readouterr().err and not out.exists()


def test_unreachable_server_is_reported_naming_the_url(tmp_path, capsys):
    url = "http://127.0.0.1:9/v1"
    assert main(["run", "--fitness", EXAMPLE_SPEC, "--operator", f"openai:m@{url}", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    assert f"cannot reach {url}" in capsys.readouterr().err


def test_prices_file_overrides_the_table(tmp_path, fake, interface, keys):
    prices = tmp_path / "prices.toml"
    prices.write_text('"test-model" = {input = 1.0, output = 2.0}\n')
    fake.push(Answer(reply(), tokens_in=1_000_000, tokens_out=1_000_000))
    operator, store = make_operator(tmp_path, f"openai:test-model@{fake.openai_url}", llm_prices=str(prices))
    operator.propose(context(interface))
    assert store.llm_calls()[0]["cost_usd"] == pytest.approx(3.0)


# -- the engine with LLM operators ------------------------------------------------------------------
class Broken(Operator):
    """Always fails, like a provider that is down."""

    name = "broken"

    def propose(self, context):
        raise OperatorError("server down")

    mutate = lambda self, parent, context: self.propose(context)  # noqa: E731
    crossover = lambda self, a, b, context: self.propose(context)  # noqa: E731


def test_a_failing_operator_falls_back_to_another(tmp_path):
    config = RunConfig(fitness=EXAMPLE_SPEC, executor="serial", out=str(tmp_path / "run"), pop=4, gens=1)
    store = RunStore.create(config.out, config.to_dict())
    engine = Engine(config, load_fitness(EXAMPLE_SPEC), [Broken(), load_operator(JITTER_SPEC)], store)
    engine.run(SerialExecutor(EXAMPLE_SPEC))
    offspring = [c for c in store.candidates() if c.operator != "seed"]
    assert len(offspring) == 2 + 4 and all(c.operator == "jitter" for c in offspring)
    assert engine.counters["operator_failures"] >= 1 and ("broken", "OperatorError: server down") in engine.errors


def test_a_generations_llm_calls_run_concurrently(tmp_path, fake, keys):
    fake.default = lambda request: Answer(seeded_reply(request), delay=0.5)
    config = RunConfig(fitness=EXAMPLE_SPEC, operator=f"openai:test-model@{fake.openai_url}", executor="serial",
                       out=str(tmp_path / "run"), pop=6, gens=1)
    store = RunStore.create(config.out, config.to_dict())
    engine = Engine(config, load_fitness(EXAMPLE_SPEC), build_operators(config)[0], store)
    started = time.perf_counter()
    batch = engine.ask()
    assert len(batch) == 6 and time.perf_counter() - started < 4 * 0.5  # 4 LLM slots (+ 2 seeds), 0.5 s each
    linked = store._db.execute("SELECT count(*) FROM llm_calls WHERE candidate_id IS NOT NULL").fetchone()[0]
    assert linked == 4


def run_cli(fake, out, *extra, operator=None):
    return main(["run", "--fitness", EXAMPLE_SPEC, "--operator", operator or f"openai:test-model@{fake.openai_url}",
                 "--pop", "4", "--gens", "2", "--executor", "serial", "--out", str(out), "--quiet", *extra])


def test_end_to_end_run_then_replay_json_reports_llm_usage(tmp_path, fake, keys, capsys):
    fake.default = seeded_reply
    out = tmp_path / "run"
    assert run_cli(fake, out, operator=f"symbolic,openai:test-model@{fake.openai_url}") == 0
    capsys.readouterr()
    assert main(["replay", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    calls = RunStore.open(out, readonly=True).llm_calls()
    assert summary["llm_calls"] == len(calls) == len(fake.requests) > 0
    assert summary["llm_tokens_in"] == 100 * len(calls) and summary["llm_tokens_out"] == 50 * len(calls)
    assert summary["llm_cost_usd"] == 0.0  # a local model has no price
    made = {name for name in summary["operators"] if name.startswith("openai:")}
    assert made and all(c["candidate_id"] is not None for c in calls)


def test_budget_stops_the_run_cleanly_and_resume_goes_on(tmp_path, fake, keys, capsys):
    fake.default = seeded_reply
    out = tmp_path / "run"
    assert run_cli(fake, out, "--max-llm-calls", "3") == 0
    assert "--max-llm-calls 3" in capsys.readouterr().err
    store = RunStore.open(out, readonly=True)
    assert len(store.llm_calls()) == 3 and store.meta("stopped")["generation"] == 1
    assert len(store.generations()) == 2  # generation 1 finished with what it had, then the run stopped
    store.close()
    assert main(["run", "--resume", str(out), "--max-llm-calls", "100", "--quiet"]) == 0
    store = RunStore.open(out, readonly=True)
    assert len(store.generations()) == 3 and store.meta("stopped") is None
    assert len(store.llm_calls()) == 3 + 4


def test_replay_reproduces_a_runs_candidates_exactly(tmp_path, keys):
    with FakeLLM(default=seeded_reply) as fake:
        # One bad reply makes the recorded run include a re-prompt.
        fake.push("no code here, sorry")
        assert run_cli(fake, tmp_path / "original", operator=f"symbolic,openai:test-model@{fake.openai_url}") == 0
    # The server is gone: the replay needs no network.
    assert main(["run", "--fitness", EXAMPLE_SPEC, "--operator", f"symbolic,replay:{tmp_path / 'original'}",
                 "--pop", "4", "--gens", "2", "--executor", "serial", "--out", str(tmp_path / "again"), "--quiet"]) == 0

    def made(run):
        return [(c.name, c.code, c.parents, c.operator, c.generation)
                for c in RunStore.open(run, readonly=True).candidates()]

    assert made(tmp_path / "again") == made(tmp_path / "original")
    assert any(op.startswith("openai:") for *_, op, _ in made(tmp_path / "again"))


def test_sequential_strategy_feeds_the_whole_history_back(tmp_path, fake, keys):
    fake.default = seeded_reply
    out = tmp_path / "run"
    assert run_cli(fake, out, "--strategy", "sequential", "--gens", "3") == 0
    store = RunStore.open(out, readonly=True)
    candidates = store.candidates()
    assert [c.generation for c in candidates] == [0, 0, 1, 2, 3]  # two seeds, then one proposal per generation
    assert all(c.variation == "propose" for c in candidates[2:])
    last = fake.requests[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert last[-1]["content"].startswith("Fitness: ") and "Please generate the next one" in last[-1]["content"]
    assert "mse" in last[1]["content"] and "mae" in last[1]["content"]  # the seeds with their fitness


def test_store_without_llm_table_reads_as_no_calls(tmp_path):
    store = RunStore.create(tmp_path / "old", {})
    store.close()
    sqlite3.connect(tmp_path / "old" / "run.sqlite").execute("DROP TABLE llm_calls").connection.commit()
    old = RunStore.open(tmp_path / "old", readonly=True)
    assert old.llm_calls() == [] and old.llm_totals()["calls"] == 0


def test_prompts_show_elites_with_fitness_in_the_configured_order_and_recent_failures(interface):
    from operators.base import Elite
    from operators.llm import system_prompt, user_prompt

    good = Candidate(1, "good", CODE, thought="robust")
    bad = Candidate(2, "bad", "def bad(pred, target):\n    return (pred - target) ** 4\n")
    ctx = Context(interface=interface, rng=random.Random(0), best=[Elite(good, 0.9), Elite(bad, 0.1)],
                  errors=[("broken_one", "returned a scalar"), ("openai:m", "APITimeoutError")], scores={0: 0.5})
    ascending = user_prompt("crossover", (PARENT, good), ctx, RunConfig())
    assert "A: mse (fitness 0.5000)" in ascending and "B: good (fitness 0.9000)" in ascending
    assert "bad (fitness 0.1000)" in ascending and "broken_one: returned a scalar" in ascending
    assert "APITimeoutError" not in ascending  # transport failures are not the model's business
    descending = user_prompt("propose", (), ctx, RunConfig(context_order="descending"))
    assert descending.index("good (fitness") < descending.index("bad (fitness")
    assert user_prompt("propose", (), ctx, RunConfig()).index("bad (fitness") < ascending.index("good (fitness")
    system = system_prompt(interface)
    assert interface.signature in system and interface.description.strip() in system and '"code"' in system


def test_async_run_with_an_llm_operator_stops_at_its_budget_and_resumes(tmp_path, fake, keys, capsys):
    fake.default = seeded_reply
    out = tmp_path / "run"
    assert run_cli(fake, out, "--async", "--max-llm-calls", "3") == 0
    assert "--max-llm-calls 3" in capsys.readouterr().err
    store = RunStore.open(out, readonly=True)
    assert len(store.llm_calls()) == 3 and store.meta("stopped") is not None
    made = len(store.candidates())
    assert made < 4 + 4 * 2 and len(list(store.evaluations())) == made  # what was made is scored
    store.close()
    assert main(["run", "--resume", str(out), "--max-llm-calls", "100", "--quiet"]) == 0
    store = RunStore.open(out, readonly=True)
    assert len(store.candidates()) == 4 + 4 * 2 == len(list(store.evaluations()))
    assert all(c["candidate_id"] is not None for c in store.llm_calls() if c["error"] is None)


def test_llm_settings_defaults_agree_with_the_run_config():
    from dataclasses import fields

    from operators.llm import LLMSettings

    defaults = RunConfig()
    for setting in fields(LLMSettings):
        assert getattr(LLMSettings(), setting.name) == getattr(defaults, setting.name), setting.name
    cut = LLMSettings.cut_from(RunConfig(llm_retries=7, strategy="sequential"))
    assert (cut.llm_retries, cut.strategy) == (7, "sequential")
