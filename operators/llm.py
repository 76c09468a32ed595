"""LLM operators: a chat model writes the next loss, as in the DiscoPOP paper (Lu et al. 2024,
"Discovering Preference Optimization Algorithms with and for Large Language Models",
arXiv:2406.08414), where the LLM reads earlier losses with their fitness and answers with a
JSON object holding "thought", "name" and "code".

One :class:`LLMOperator` per model (``openai:gpt-4o``, ``anthropic:claude-sonnet-4-5``,
``openai:MODEL@http://host:port/v1``, ``hf:/path/to/model``, ``replay:RUN``; the clients live
in :mod:`operators.providers`). For each offspring it

1. builds a prompt from the fitness plug-in's interface (problem description, exact signature,
   reply format) and the archive (best and most diverse elites with their fitness, in the
   configured count and order; recent failures with their errors), for a mutation (one
   parent), a crossover (two parents) or a fresh proposal; with ``--strategy sequential`` a
   proposal is the paper's single growing conversation instead (every earlier proposal and
   its fitness, "Please generate the next one");
2. parses the reply leniently (:func:`parse_reply`: JSON anywhere, fenced blocks, prose
   around it, escaped newlines, a bare Python function);
3. checks the code (static check, then the interface's unit tests, see
   :class:`operators.base.Services`: the run hands the operator its reply checker) and, on
   failure, re-prompts in the same conversation with "Code not valid. Error: ..." up to ``--llm-retries`` times;
4. records every attempt in the run store (prompt, reply, tokens, latency, cost, error),
   linked to the candidate it produced.

Calls count against a run-wide :class:`Budget` (``--max-llm-calls``, ``--max-cost-usd``);
once it is spent the operator raises :class:`operators.base.BudgetExhausted` and the engine
finishes the generation and stops. Each request's sampling seed comes from the slot's seeded
generator, so the prompts of a re-run are the same and ``replay:RUN`` can answer them.
"""
from __future__ import annotations

import ast
import json
import re
import textwrap
import threading
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any

from engine.candidate import Candidate, EvalResult
from engine.genome import GenomeError, check_genome
from operators.base import (
    BudgetExhausted, Context, Offspring, Operator, OperatorError, OperatorExhausted, RecordedRun, ReplyCheck, Services,
)
from operators.providers import (
    PROVIDERS, Provider, ProviderError, ProviderSetupError, ReplayMiss, ReplayProvider, load_prices, make_provider,
    parse_spec, prompt_key,
)

@dataclass(frozen=True)
class LLMSettings:
    """What the LLM operators read of the run's settings (the fields of the same names in
    :class:`engine.config.RunConfig`, which documents them; the defaults agree, by test)."""

    strategy: str = "population"
    context_order: str = "ascending"
    context_errors: int = 3
    llm_retries: int = 3
    llm_timeout: float = 120.0
    llm_http_retries: int = 4
    llm_temperature: float = 0.7
    llm_max_tokens: int = 2048
    llm_prices: str | None = None
    max_llm_calls: int = 0
    max_cost_usd: float = 0.0

    @classmethod
    def cut_from(cls, settings: Any) -> LLMSettings:
        """The fields of this class taken from a larger settings object (None: defaults)."""
        if settings is None:
            return cls()
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)})


RESPOND = 'Reply with one JSON object with the keys "thought", "name" and "code".'
RETRY = "Code not valid. Error: {error}\n\nFix the problem and reply again. " + RESPOND


# -- parsing ----------------------------------------------------------------------------------------
class ReplyError(ValueError):
    """A reply holds no usable code; the message is sent back to the model."""


@dataclass(frozen=True)
class ParsedReply:
    name: str
    code: str
    thought: str = ""


_FENCE = re.compile(r"```[ \t]*([\w.+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_DEF = re.compile(r"^([ \t]*)def[ \t]+(\w+)[ \t]*\(", re.M)


def parse_reply(text: str) -> ParsedReply:
    """The loss in an LLM reply.

    Looked for, in order: a JSON object with a ``code`` field (the whole reply, a fenced block,
    or an object anywhere in the prose; Python-dict syntax and trailing commas tolerated, a
    JSON-encoded string holding the object unwrapped), then a fenced Python block with a
    function, then a bare ``def`` in the text. Code with literal ``\\n`` escapes and no real
    newline is unescaped; fences inside the code are removed.

    Raises:
        ReplyError: saying what was missing, in words the model can act on.
    """
    if not isinstance(text, str) or not text.strip():
        raise ReplyError("the reply is empty. " + RESPOND)
    for obj in _objects(text):
        fields = {str(k).lower(): v for k, v in obj.items()}
        code = fields.get("code")
        if not isinstance(code, str) or "def" not in code:
            code = next((v for v in fields.values() if isinstance(v, str) and _DEF.search(_unescape(v))), None)
        if isinstance(code, str) and code.strip():
            code = _clean_code(code)
            name = fields.get("name")
            thought = fields.get("thought") or fields.get("reasoning") or ""
            return ParsedReply(_name(name, code), code, str(thought).strip())
    code, prose = _python_code(text)
    if code:
        return ParsedReply(_name(None, code), code, prose)
    raise ReplyError('the reply has no JSON object with a "code" field and no Python function. ' + RESPOND)


def _objects(text: str):
    """Dicts found in ``text``, most likely first."""
    candidates = [text.strip()] + [body.strip() for lang, body in _FENCE.findall(text)]
    first, last = text.find("{"), text.rfind("}")
    if 0 <= first < last:
        candidates.append(text[first:last + 1])
    for candidate in candidates:
        obj = _load(candidate)
        if obj is not None:
            yield obj
    decoder = json.JSONDecoder(strict=False)
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except (ValueError, RecursionError):  # nesting deeper than the interpreter's stack
            continue
        if isinstance(obj, dict):
            yield obj


def _load(candidate: str, depth: int = 0) -> dict | None:
    if not candidate or depth > 2:
        return None
    for attempt in (candidate, re.sub(r",\s*([}\]])", r"\1", candidate)):
        try:
            obj = json.loads(attempt, strict=False)
        except (ValueError, RecursionError):
            try:
                obj = ast.literal_eval(attempt)  # single quotes, triple-quoted code
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                continue
        if isinstance(obj, str):  # a JSON-encoded string holding the object
            return _load(obj.strip(), depth + 1)
        if isinstance(obj, dict):
            return obj
    return None


def _unescape(code: str) -> str:
    if "\n" not in code.strip() and "\\n" in code:
        code = (code.replace("\\r\\n", "\n").replace("\\n", "\n").replace("\\t", "\t")
                .replace('\\"', '"').replace("\\'", "'"))
    return code


def _clean_code(code: str) -> str:
    code = _unescape(code)
    fenced = [body for lang, body in _FENCE.findall(code) if "def" in body]
    if fenced:
        code = fenced[0]
    return textwrap.dedent(code).strip("\n").rstrip() + "\n"


def _python_code(text: str) -> tuple[str | None, str]:
    """A function in a fenced block, else a bare ``def`` block; and the prose around it."""
    for lang, body in _FENCE.findall(text):
        if _DEF.search(body) and lang.lower() in ("", "python", "py", "python3"):
            prose = _FENCE.sub("", text).strip()
            return _clean_code(body), prose[:2000]
    match = _DEF.search(text)
    if not match:
        return None, ""
    indent = len(match.group(1).expandtabs())
    lines = text[match.start():].splitlines()
    kept = [lines[0]]
    for line in lines[1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        kept.append(line)
    code = "\n".join(kept)
    prose = (text[:match.start()] + text[match.start() + len(code):]).strip()
    return _clean_code(code), prose[:2000]


def _name(name: Any, code: str) -> str:
    if isinstance(name, str) and name.strip():
        return name.strip()
    match = _DEF.search(code)
    return match.group(2) if match else "llm_loss"


# -- prompts ----------------------------------------------------------------------------------------
def system_prompt(interface) -> str:
    """The task: problem description, exact signature, an example, rules and the reply format."""
    example = (interface.example or "").strip()
    return (
        "You are a machine-learning researcher who designs new loss functions. We run an evolutionary "
        "search: every loss you write is trained with and scored, and the best ones are shown to you again.\n\n"
        f"Task:\n{interface.description.strip()}\n\n"
        f"The function must have exactly this signature (choose your own function name):\n    {interface.signature}\n"
        + (f"\nA baseline example:\n```python\n{example}\n```\n" if example else "")
        + "\nRules: write exactly one Python function; torch, F (torch.nn.functional) and math are available "
        "without imports; no other modules, files or network; keep it differentiable and finite for any inputs.\n\n"
        "Reply format: one JSON object and nothing else, for example\n"
        '{"thought": "the idea and why it should score well", "name": "short_snake_case_name", '
        '"code": "def short_snake_case_name(...):\\n    ..."}'
    )


def _fitness_text(value: float | None) -> str:
    return "not scored yet" if value is None else f"fitness {value:.4f}"


def _loss_block(heading: str, candidate: Candidate, fitness: float | None) -> str:
    lines = [f"### {heading}{candidate.name} ({_fitness_text(fitness)})"]
    if candidate.thought:
        lines.append(f"Idea: {_short(candidate.thought, 400)}")
    lines.append("```python\n" + candidate.code.strip() + "\n```")
    return "\n".join(lines)


def _short(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def context_prompt(context: Context, config: LLMSettings, exclude: set[int] = frozenset()) -> str:
    """The archive as the model sees it: elites with fitness, then recent failures."""
    shown, seen = [], set(exclude)
    for elite in list(context.best) + list(context.diverse):
        if elite.candidate.id not in seen:
            seen.add(elite.candidate.id)
            shown.append(elite)
    shown.sort(key=lambda e: e.fitness, reverse=config.context_order == "descending")
    parts = []
    if shown:
        order = "best first" if config.context_order == "descending" else "best last"
        parts.append(f"Losses evaluated so far (higher fitness is better; {order}):\n\n"
                     + "\n\n".join(_loss_block("", e.candidate, e.fitness) for e in shown))
    else:
        parts.append("No loss has been scored yet.")
    # Operator failures (named "provider:model", e.g. a timed-out request) mean nothing to the model.
    errors = [(name, message) for name, message in context.errors if ":" not in name]
    errors = errors[-config.context_errors:] if config.context_errors else []
    if errors:
        parts.append("Recent failures (avoid these mistakes):\n"
                     + "\n".join(f"- {name}: {_short(message, 300)}" for name, message in errors))
    return "\n\n".join(parts)


def user_prompt(kind: str, parents: tuple[Candidate, ...], context: Context, config: LLMSettings) -> str:
    """The request for a mutation, a crossover or a fresh proposal."""
    scores = {**{e.candidate.id: e.fitness for e in [*context.best, *context.diverse]}, **context.scores}
    intro = context_prompt(context, config, exclude={p.id for p in parents})
    if kind == "mutate":
        (parent,) = parents
        task = ("Improve this loss:\n\n" + _loss_block("", parent, scores.get(parent.id)) + "\n\nMake one focused "
                "change (its shape, a term, a weighting, a normalisation) that you expect to raise its fitness.")
    elif kind == "crossover":
        first, second = parents
        task = ("Combine the ideas of these two losses into one new loss that keeps the strengths of both:\n\n"
                + _loss_block("A: ", first, scores.get(first.id)) + "\n\n"
                + _loss_block("B: ", second, scores.get(second.id)))
    else:
        task = ("Propose a new loss function, different from the ones above, that you expect to score higher "
                "than all of them.")
    return f"{intro}\n\n{task}\n\n{RESPOND}"


def _feedback(result: EvalResult) -> str:
    if result.ok:
        return f"Fitness: {result.fitness:.4f}."
    if result.status == "duplicate":
        return f"This loss behaves exactly like an earlier one ({result.error}); it was not trained again."
    if result.status == "invalid":
        return f"Code not valid. Error: {result.error}"
    return f"Training with this loss failed ({result.status}): {result.error}"


def sequential_messages(context: Context, system: str) -> list[dict[str, str]]:
    """The paper's single chain: the seeds with their fitness, then every later proposal as the
    model's own turn followed by its fitness, ending with "Please generate the next one"."""
    seeds = [(c, r) for c, r in context.history if c.operator == "seed"]
    later = [(c, r) for c, r in context.history if c.operator != "seed"]
    listed = "\n\n".join(_loss_block("", c, r.fitness if r.ok else None) + ("" if r.ok else f"\n{_feedback(r)}")
                         for c, r in seeds) or "None yet."
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Here are the losses we have already evaluated, with their fitness (higher is "
                                    f"better):\n\n{listed}\n\nPropose a new loss that you expect to score higher "
                                    f"than all of them. {RESPOND}"},
    ]
    for candidate, result in later:
        messages.append({"role": "assistant", "content": json.dumps(
            {"thought": candidate.thought, "name": candidate.name, "code": candidate.code})})
        messages.append({"role": "user", "content": f"{_feedback(result)}\n\nPlease generate the next one. {RESPOND}"})
    return messages


# -- budget -----------------------------------------------------------------------------------------
class Budget:
    """Run-wide limits on LLM calls and estimated cost, shared by every LLM operator (0: none).

    Checked before each call: calls already in flight finish, so the cost can pass the cap by
    at most the cost of the calls running concurrently. A resumed run counts from what its
    store already recorded.
    """

    def __init__(self, max_calls: int = 0, max_cost_usd: float = 0.0) -> None:
        self.max_calls = max_calls
        self.max_cost_usd = max_cost_usd
        self.calls = 0
        self.cost_usd = 0.0
        self.lock = threading.Lock()
        self._stores: set[int] = set()

    def attach(self, store) -> None:
        with self.lock:
            if id(store) in self._stores:
                return
            self._stores.add(id(store))
            totals = store.llm_totals()
            self.calls += totals["calls"]
            self.cost_usd += totals["cost_usd"]

    def reserve(self) -> None:
        """Count one call, or raise :class:`BudgetExhausted` if none is left."""
        with self.lock:
            if self.max_calls and self.calls >= self.max_calls:
                raise BudgetExhausted(
                    f"LLM call budget spent: {self.calls} calls made (--max-llm-calls {self.max_calls})")
            if self.max_cost_usd and self.cost_usd >= self.max_cost_usd:
                raise BudgetExhausted(f"LLM cost budget spent: an estimated ${self.cost_usd:.4f} "
                                      f"(--max-cost-usd {self.max_cost_usd:g})")
            self.calls += 1

    def charge(self, cost_usd: float) -> None:
        with self.lock:
            self.cost_usd += cost_usd


# -- the operator -----------------------------------------------------------------------------------
class LLMOperator(Operator):
    """Mutation, crossover and proposal by a chat model (see the module docstring).

    Args:
        provider: The client (:mod:`operators.providers`).
        config: Its settings (prompt sizes, retries, temperature, strategy...).
        budget: The run's shared budget.
        check: Checks a reply's code, returning the error or None (the run's shared reply
            checker, handed over when the run is assembled); None checks statically only.
        name: The operator's name (default: the provider's spec).
    """

    concurrent = True

    spec_prefixes = PROVIDERS
    spec_forms = ("openai:MODEL", "openai:MODEL@URL", "anthropic:MODEL", "anthropic:MODEL@URL", "hf:PATH",
                  "replay:RUN")

    def __init__(self, provider: Provider, config: LLMSettings | None = None, budget: Budget | None = None,
                 check: ReplyCheck | None = None, name: str | None = None) -> None:
        self.provider = provider
        self.name = name or provider.spec
        self.config = config or LLMSettings()
        self.budget = budget or Budget(self.config.max_llm_calls, self.config.max_cost_usd)
        self.check = check
        self.store = None
        self.unsaved: list[dict[str, Any]] = []  # calls made before a run store was attached
        self._lock = threading.Lock()

    def attach(self, store) -> None:
        """Record calls in ``store`` (the engine calls this) and count its earlier calls."""
        self.store = store
        self.budget.attach(store)

    def preflight(self) -> None:
        self.provider.preflight()

    def close(self) -> None:
        self.provider.close()

    # -- the three variations -------------------------------------------------------------------
    def mutate(self, parent: Candidate, context: Context) -> Offspring:
        return self._generate("mutate", (parent,), context)

    def crossover(self, first: Candidate, second: Candidate, context: Context) -> Offspring:
        return self._generate("crossover", (first, second), context)

    def propose(self, context: Context) -> Offspring:
        return self._generate("propose", (), context)

    # -- internals ------------------------------------------------------------------------------
    def messages(self, kind: str, parents: tuple[Candidate, ...], context: Context) -> list[dict[str, str]]:
        system = system_prompt(context.interface)
        if kind == "propose" and self.config.strategy == "sequential" and context.history:
            return sequential_messages(context, system)
        return [{"role": "system", "content": system},
                {"role": "user", "content": user_prompt(kind, parents, context, self.config)}]

    def _generate(self, kind: str, parents: tuple[Candidate, ...], context: Context) -> Offspring:
        messages = self.messages(kind, parents, context)
        call_ids: list[int] = []
        last: ParsedReply | None = None
        problem = ""
        for attempt in range(self.config.llm_retries + 1):
            seed = context.rng.getrandbits(31)
            text, row = self._call(messages, kind, attempt, seed, context.generation)
            parsed = None
            try:
                parsed = parse_reply(text)
                self._check(parsed.code, context.interface)
            except (ReplyError, GenomeError) as exc:
                problem = str(exc)
                row["error"] = f"reply rejected: {problem}"
                last = parsed or last
                self._save(row, call_ids)
                messages = messages + [{"role": "assistant", "content": text},
                                       {"role": "user", "content": RETRY.format(error=problem)}]
                continue
            except Exception as exc:  # the checker itself broke (its worker could not start)
                row["error"] = f"checking the reply failed: {type(exc).__name__}: {exc}"
                self._save(row, call_ids)
                raise OperatorError(f"{self.name}: checking a reply failed: {type(exc).__name__}: {exc}") from exc
            self._save(row, call_ids)
            return Offspring(parsed.name, parsed.code, parsed.thought, llm_calls=tuple(call_ids))
        if last is not None:
            # The last code still fails: hand it over so it is recorded as an invalid candidate.
            return Offspring(last.name, last.code, last.thought, llm_calls=tuple(call_ids))
        raise OperatorError(f"{self.name}: no usable reply after {self.config.llm_retries + 1} attempts; "
                            f"last problem: {problem}")

    def _check(self, code: str, interface) -> None:
        """Raise :class:`GenomeError` when the reply's code fails the run's reply check."""
        if self.check is None:
            check_genome(code, interface.arg_counts)
            return
        error = self.check(code)
        if error is not None:
            raise GenomeError(error)

    @classmethod
    def factory(cls, services: Services):
        return LLMOperatorFactory(LLMSettings.cut_from(services.settings), services.check,
                                  services.recorded_run).build

    def _call(self, messages: list[dict[str, str]], kind: str, attempt: int, seed: int,
              generation: int) -> tuple[str, dict[str, Any]]:
        if self.provider.billed:
            self.budget.reserve()
        row: dict[str, Any] = {"operator": self.name, "model": self.provider.model, "kind": kind, "attempt": attempt,
                               "generation": generation, "request_seed": seed, "prompt": prompt_key(messages)}
        start = time.perf_counter()
        try:
            reply = self.provider.complete(messages, max_tokens=self.config.llm_max_tokens,
                                           temperature=self.config.llm_temperature, seed=seed)
        except ReplayMiss as exc:
            raise OperatorExhausted(str(exc)) from exc
        except ProviderError as exc:
            row.update(error=str(exc), latency_s=time.perf_counter() - start)
            self._save(row, [])
            raise OperatorError(str(exc)) from exc
        cost = self.provider.cost(reply.tokens_in, reply.tokens_out)
        self.budget.charge(cost)
        row.update(reply=reply.text, tokens_in=reply.tokens_in, tokens_out=reply.tokens_out,
                   latency_s=time.perf_counter() - start, cost_usd=cost)
        return reply.text, row

    def _save(self, row: dict[str, Any], call_ids: list[int]) -> None:
        if self.store is not None:
            call_ids.append(self.store.add_llm_call(**row))
        else:
            with self._lock:
                self.unsaved.append(dict(row))


# -- building operators from specs ----------------------------------------------------------------
def is_llm_spec(spec: Any) -> bool:
    """Whether ``spec`` names an LLM provider (checked before ``module:Class``)."""
    return isinstance(spec, str) and spec.strip().partition(":")[0] in PROVIDERS and ":" in spec


class LLMOperatorFactory:
    """Builds the run's LLM operators with one shared budget, price table and reply check.

    Args:
        settings: The LLM operators' settings.
        check: The run's reply check (None: static only).
        recorded_run: Opens an earlier run's recorded calls (needed by ``replay:RUN``).
    """

    def __init__(self, settings: LLMSettings | None = None, check: ReplyCheck | None = None,
                 recorded_run=None) -> None:
        self.config = settings or LLMSettings()
        self.check = check
        self.recorded_run = recorded_run
        self.budget = Budget(self.config.max_llm_calls, self.config.max_cost_usd)
        self.prices = load_prices(self.config.llm_prices)

    def build(self, spec: str) -> list[LLMOperator]:
        """The operator(s) of one spec; ``replay:RUN`` gives one per LLM operator of RUN."""
        provider, target, _ = parse_spec(spec)
        if provider == "replay":
            return [LLMOperator(p, self.config, self.budget, self.check, name=p.operator)
                    for p in self._replay_providers(spec, target)]
        client = make_provider(spec, timeout=self.config.llm_timeout, retries=self.config.llm_http_retries,
                               prices=self.prices)
        if client.billed and client.price is None and client.url is None:
            warnings.warn(f"--operator {spec!r}: no price known for model {client.model!r}; its cost counts as 0 "
                          "(give one with --llm-prices)", RuntimeWarning, stacklevel=2)
        return [LLMOperator(client, self.config, self.budget, self.check)]

    def _open(self, spec: str, run: str) -> RecordedRun:
        if self.recorded_run is None:
            raise ProviderSetupError(f"--operator {spec!r}: this run cannot read recorded runs")
        try:
            return self.recorded_run(run)
        except ProviderSetupError:
            raise
        except Exception as exc:  # noqa: BLE001 - a missing or damaged run folder, said plainly
            raise ProviderSetupError(f"--operator {spec!r}: {exc}") from exc

    def _recorded_llm_operators(self, spec: str, run: str, depth: int = 0) -> list[str]:
        """Names of the LLM operators of a recorded run, in its ``--operator`` order."""
        names: list[str] = []
        for recorded in self._open(spec, run).operator_specs:
            if not is_llm_spec(recorded):
                continue
            if recorded.startswith("replay:") and depth < 5:
                names.extend(self._recorded_llm_operators(spec, recorded.partition(":")[2], depth + 1))
            elif not recorded.startswith("replay:"):
                names.append(recorded)
        return names

    def _replay_providers(self, spec: str, run: str) -> list[ReplayProvider]:
        names = self._recorded_llm_operators(spec, run)
        recorded = self._open(spec, run)
        providers = []
        for name in names:
            calls = recorded.calls(name)
            if calls:
                providers.append(ReplayProvider(spec, name, calls[0]["model"], calls))
        if not providers:
            raise ProviderSetupError(f"--operator {spec!r}: {run} recorded no LLM calls to replay")
        return providers
