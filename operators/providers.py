"""LLM clients behind the LLM operators: one small class per provider, all with
``complete(messages, max_tokens, temperature, seed) -> Reply`` and a start-up ``preflight()``.

- ``openai:MODEL`` and ``openai:MODEL@URL``: the official ``openai`` client (Chat Completions),
  for the OpenAI API or any OpenAI-compatible server (vLLM, Ollama, llama.cpp, LM Studio).
- ``anthropic:MODEL`` and ``anthropic:MODEL@URL``: the official ``anthropic`` client (Messages).
- ``hf:PATH``: a local transformers chat model loaded from a folder.
- ``replay:RUN``: the replies recorded in an earlier run's store (no network).

Retries with exponential backoff on 408/409/429/5xx, timeouts and connection errors are the
official clients' own (``max_retries``, ``timeout``; ``Retry-After`` is honoured). A call
that still fails raises :class:`ProviderError`; a missing key, an unreachable server or a bad
model folder raises :class:`ProviderSetupError` at start, before any work.
"""
from __future__ import annotations

import json
import os
import threading
import tomllib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

#: Providers named on the CLI as ``PROVIDER:...``.
PROVIDERS = ("openai", "anthropic", "hf", "replay")

#: USD per million tokens (input, output), from the providers' public price lists; a model
#: matches the longest key it starts with (``gpt-4o-2024-08-06`` -> ``gpt-4o``). Override or
#: extend with ``--llm-prices FILE.toml``.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o1": (15.00, 60.00),
    "o1-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "claude-opus-4": (15.00, 75.00),
    "claude-opus-4-5": (5.00, 25.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-opus": (15.00, 75.00),
    "claude-3-haiku": (0.25, 1.25),
}


class ProviderError(Exception):
    """A call failed after the client's own retries (the slot falls back to another operator)."""


class ProviderSetupError(Exception):
    """A provider cannot work at all: missing key or package, unreachable server, bad folder."""


class ReplayMiss(ProviderError):
    """The recorded run has no reply for this request (the re-run diverged or went further)."""


@dataclass(frozen=True)
class Reply:
    """One completion: its text and token counts (0 when the server does not say)."""

    text: str
    tokens_in: int = 0
    tokens_out: int = 0


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """``openai:MODEL@URL`` -> ``("openai", "MODEL", "URL")``. Model names may contain ``:``
    (Ollama's ``llama3:8b``); the URL follows the first ``@``."""
    provider, _, rest = spec.strip().partition(":")
    if provider not in PROVIDERS:
        raise ProviderSetupError(
            f"unknown LLM provider {provider!r} in {spec!r}; expected one of {', '.join(PROVIDERS)}")
    if not rest:
        what = {"hf": "PATH", "replay": "RUN"}.get(provider, "MODEL")
        raise ProviderSetupError(f"--operator {spec!r}: expected {provider}:{what}")
    if provider in ("hf", "replay"):
        return provider, rest, None
    model, at, url = rest.partition("@")
    if at:
        if not url.startswith(("http://", "https://")):
            raise ProviderSetupError(f"--operator {spec!r}: the server URL after '@' must start with http:// or https://")
        url = url.rstrip("/")
    if not model:
        raise ProviderSetupError(f"--operator {spec!r}: no model name before '@'")
    return provider, model, url or None


def load_prices(path: str | os.PathLike | None) -> dict[str, tuple[float, float]]:
    """The built-in price table updated from a TOML file: ``"model" = {input = 2.5, output = 10}``
    or ``"model" = [2.5, 10]`` (USD per million tokens), optionally under a ``[prices]`` table."""
    prices = dict(PRICES)
    if not path:
        return prices
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ProviderSetupError(f"--llm-prices: file {str(path)!r} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProviderSetupError(f"--llm-prices: {path} is not valid TOML: {exc}") from exc
    for model, value in data.get("prices", data).items():
        try:
            if isinstance(value, dict):
                pair = (float(value["input"]), float(value["output"]))
            else:
                first, second = value
                pair = (float(first), float(second))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderSetupError(
                f"--llm-prices {path}: model {model!r} needs input and output prices in USD per million "
                f"tokens, e.g. {model!r} = {{input = 2.5, output = 10}}; got {value!r}"
            ) from exc
        prices[model] = pair
    return prices


def price_of(model: str, prices: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The entry of the longest price-table key that ``model`` starts with, or None."""
    name = model.rsplit("/", 1)[-1]
    keys = [k for k in prices if name == k or name.startswith(k + "-") or name.startswith(k + "@")]
    return prices[max(keys, key=len)] if keys else None


class Provider(ABC):
    """A chat model reached one way. ``spec`` is how the CLI names it."""

    kind: ClassVar[str] = ""
    #: Whether calls cost money and count against ``--max-llm-calls`` (not so for replays).
    billed: ClassVar[bool] = True

    def __init__(self, spec: str, model: str, url: str | None = None,
                 prices: dict[str, tuple[float, float]] | None = None) -> None:
        self.spec = spec
        self.model = model
        self.url = url
        self.price = price_of(model, prices if prices is not None else PRICES) if self.billed else (0.0, 0.0)

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """Estimated USD of one call (0 when the model has no known price)."""
        if self.price is None:
            return 0.0
        return (tokens_in * self.price[0] + tokens_out * self.price[1]) / 1e6

    def preflight(self) -> None:
        """Fail now, naming the variable, URL or folder, if calls cannot work."""

    @abstractmethod
    def complete(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float, seed: int) -> Reply:
        """One chat completion for ``messages`` (``system``, then alternating ``user``/``assistant``)."""

    def close(self) -> None:
        pass


def _import(package: str, spec: str):
    try:
        return __import__(package)
    except ImportError as exc:
        raise ProviderSetupError(
            f"--operator {spec!r} needs the {package!r} package: pip install {package} "
            f"(or pip install -e '.[llm]')"
        ) from exc


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} ({type(cause).__name__}: {cause})" if cause and str(cause) not in text else text


class OpenAIProvider(Provider):
    """Chat Completions through the official ``openai`` client.

    Without ``@URL`` the key comes from ``OPENAI_API_KEY`` and the server from ``OPENAI_BASE_URL``
    (default: the OpenAI API). With ``@URL`` (an OpenAI-compatible server such as vLLM or Ollama)
    the key is optional: ``OPENAI_API_KEY`` if set, else a placeholder.
    """

    kind = "openai"
    KEY = "OPENAI_API_KEY"

    def __init__(self, spec: str, model: str, url: str | None, *, timeout: float, retries: int,
                 prices: dict[str, tuple[float, float]] | None = None) -> None:
        super().__init__(spec, model, url, prices)
        openai = _import("openai", spec)
        self.openai = openai
        key = os.environ.get(self.KEY)
        base_url = url or os.environ.get("OPENAI_BASE_URL") or None
        if not key and base_url is None:
            raise ProviderSetupError(
                f"--operator {spec!r} needs an API key: set {self.KEY} (or name an OpenAI-compatible server "
                f"as openai:{model}@http://HOST:PORT/v1)"
            )
        self.where = base_url or "https://api.openai.com/v1"
        self.timeout = timeout
        self.client = openai.OpenAI(api_key=key or "not-needed", base_url=base_url, timeout=timeout,
                                    max_retries=retries)

    def preflight(self) -> None:
        openai = self.openai
        try:
            self.client.with_options(timeout=min(15.0, self.timeout), max_retries=1).models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ProviderSetupError(
                f"--operator {self.spec!r}: {self.where} rejected the API key ({self.KEY}): {exc}") from exc
        except openai.APIConnectionError as exc:
            raise ProviderSetupError(f"--operator {self.spec!r}: cannot reach {self.where}: {_describe(exc)}") from exc
        except openai.APIStatusError:
            pass  # the server answered (some have no /models route): reachable

    def _reasoning(self) -> bool:
        return self.model.startswith(("o1", "o3", "o4", "gpt-5"))

    def complete(self, messages, *, max_tokens, temperature, seed):
        arguments: dict[str, Any] = {"model": self.model, "messages": messages, "seed": seed}
        if self._reasoning():  # these models take max_completion_tokens and no temperature
            arguments["max_completion_tokens"] = max_tokens
        else:
            arguments["max_tokens"] = max_tokens
            arguments["temperature"] = temperature
        try:
            response = self.client.chat.completions.create(**arguments)
        except self.openai.APIError as exc:
            raise ProviderError(f"{self.spec} at {self.where}: {_describe(exc)}") from exc
        if not response.choices:
            raise ProviderError(f"{self.spec}: the server returned no choices")
        usage = response.usage
        return Reply(response.choices[0].message.content or "",
                     int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))

    def close(self) -> None:
        self.client.close()


class AnthropicProvider(Provider):
    """Messages through the official ``anthropic`` client. The key comes from
    ``ANTHROPIC_API_KEY`` (optional with ``@URL``); ``URL`` is the server root (a trailing
    ``/v1`` is accepted and dropped, the client adds it)."""

    kind = "anthropic"
    KEY = "ANTHROPIC_API_KEY"

    def __init__(self, spec: str, model: str, url: str | None, *, timeout: float, retries: int,
                 prices: dict[str, tuple[float, float]] | None = None) -> None:
        super().__init__(spec, model, url, prices)
        anthropic = _import("anthropic", spec)
        self.anthropic = anthropic
        key = os.environ.get(self.KEY)
        base_url = url or os.environ.get("ANTHROPIC_BASE_URL") or None
        if base_url and base_url.endswith("/v1"):
            base_url = base_url[: -len("/v1")]
        if not key and base_url is None:
            raise ProviderSetupError(f"--operator {spec!r} needs an API key: set {self.KEY}")
        self.where = base_url or "https://api.anthropic.com"
        self.client = anthropic.Anthropic(api_key=key or "not-needed", base_url=base_url, timeout=timeout,
                                          max_retries=retries)
        # Recent SDK releases dropped sampling parameters from Messages; send them only where taken.
        import inspect

        self.takes_temperature = "temperature" in inspect.signature(self.client.messages.create).parameters

    def preflight(self) -> None:
        anthropic = self.anthropic
        try:
            self.client.with_options(timeout=15.0, max_retries=1).models.list(limit=1)
        except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as exc:
            raise ProviderSetupError(
                f"--operator {self.spec!r}: {self.where} rejected the API key ({self.KEY}): {exc}") from exc
        except anthropic.APIConnectionError as exc:
            raise ProviderSetupError(f"--operator {self.spec!r}: cannot reach {self.where}: {_describe(exc)}") from exc
        except anthropic.APIStatusError:
            pass

    def complete(self, messages, *, max_tokens, temperature, seed):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        arguments: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "messages": turns}
        if self.takes_temperature:
            arguments["temperature"] = min(temperature, 1.0)
        if system:
            arguments["system"] = system
        try:
            response = self.client.messages.create(**arguments)
        except self.anthropic.APIError as exc:
            raise ProviderError(f"{self.spec} at {self.where}: {_describe(exc)}") from exc
        text = "".join(getattr(block, "text", "") for block in response.content)
        usage = response.usage
        return Reply(text, int(getattr(usage, "input_tokens", 0) or 0), int(getattr(usage, "output_tokens", 0) or 0))

    def close(self) -> None:
        self.client.close()


class HFProvider(Provider):
    """A local transformers chat model from a folder (``save_pretrained`` layout), on the GPU if
    there is one. Loaded at start (preflight); calls are serialised (one model in memory).
    Sampling is seeded per request inside a forked RNG, so the driver's torch RNG is untouched."""

    kind = "hf"
    billed = False

    def __init__(self, spec: str, path: str, **_: Any) -> None:
        super().__init__(spec, Path(path).name or path)
        self.path = Path(path).expanduser()
        self.model_obj = None
        self.tokenizer = None
        self.lock = threading.Lock()

    def preflight(self) -> None:
        if not self.path.is_dir():
            raise ProviderSetupError(f"--operator {self.spec!r}: model folder {str(self.path)!r} not found")
        if not (self.path / "config.json").is_file():
            raise ProviderSetupError(
                f"--operator {self.spec!r}: {self.path} is not a transformers model folder (no config.json)")
        transformers = _import("transformers", self.spec)
        import torch

        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path))
            model = transformers.AutoModelForCausalLM.from_pretrained(str(self.path))
        except Exception as exc:
            raise ProviderSetupError(
                f"--operator {self.spec!r}: loading the model from {self.path} failed: {type(exc).__name__}: {exc}"
            ) from exc
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_obj = model.to(self.device).eval()

    def _prompt_ids(self, messages):
        if getattr(self.tokenizer, "chat_template", None):
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)
            return encoded["input_ids"], encoded.get("attention_mask")
        # No chat template: a plain transcript the model continues.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        encoded = self.tokenizer(text, return_tensors="pt")
        return encoded["input_ids"], encoded.get("attention_mask")

    def complete(self, messages, *, max_tokens, temperature, seed):
        if self.model_obj is None:
            self.preflight()
        import torch

        with self.lock:
            try:
                input_ids, mask = self._prompt_ids(messages)
                input_ids = input_ids.to(self.device)
                arguments: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
                if mask is not None:
                    arguments["attention_mask"] = mask.to(self.device)
                if temperature > 0:
                    arguments["temperature"] = temperature
                if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is not None:
                    arguments["pad_token_id"] = self.tokenizer.eos_token_id
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    torch.manual_seed(seed)
                    output = self.model_obj.generate(input_ids, **arguments)
            except Exception as exc:
                raise ProviderError(f"{self.spec}: generation failed: {type(exc).__name__}: {exc}") from exc
        new = output[0, input_ids.shape[1]:]
        return Reply(self.tokenizer.decode(new, skip_special_tokens=True), int(input_ids.shape[1]), int(new.shape[0]))


def prompt_key(messages: list[dict[str, str]]) -> str:
    """How a prompt is stored in the run store (and matched by ``replay:RUN``)."""
    return json.dumps(messages, ensure_ascii=False)


class ReplayProvider(Provider):
    """Answers from an earlier run's recorded calls of one operator, matched by the exact
    prompt and request seed (both reproducible for the same settings), so a re-run with the
    same settings makes the same candidates with no network. A recorded failure replays as a
    failure."""

    kind = "replay"
    billed = False

    def __init__(self, spec: str, operator: str, model: str, calls: list[dict[str, Any]]) -> None:
        super().__init__(spec, model)
        self.operator = operator
        self.answers: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
        for call in calls:
            self.answers.setdefault((call["prompt"], call["request_seed"]), []).append(call)
        self.lock = threading.Lock()

    def complete(self, messages, *, max_tokens, temperature, seed):
        with self.lock:
            recorded = self.answers.get((prompt_key(messages), seed))
            call = recorded.pop(0) if recorded else None
        if call is None:
            raise ReplayMiss(f"{self.spec}: no recorded reply of {self.operator} for this request (the re-run has "
                             "left the recorded one: other settings, or more generations than recorded)")
        if call["reply"] is None:
            raise ProviderError(call["error"] or "recorded call failed")
        return Reply(call["reply"], int(call["tokens_in"] or 0), int(call["tokens_out"] or 0))


def make_provider(spec: str, *, timeout: float = 120.0, retries: int = 4,
                  prices: dict[str, tuple[float, float]] | None = None) -> Provider:
    """The provider named by ``spec`` (not ``replay:``, which :mod:`operators.llm` expands)."""
    provider, model, url = parse_spec(spec)
    if provider == "openai":
        return OpenAIProvider(spec, model, url, timeout=timeout, retries=retries, prices=prices)
    if provider == "anthropic":
        return AnthropicProvider(spec, model, url, timeout=timeout, retries=retries, prices=prices)
    if provider == "hf":
        return HFProvider(spec, model)
    raise ProviderSetupError(f"make_provider cannot build {spec!r}; replay specs are expanded by operators.llm")
