"""A scripted LLM server on 127.0.0.1 for the tests: OpenAI's ``POST /v1/chat/completions``
and Anthropic's ``POST /v1/messages`` (plus ``GET /v1/models`` for the start-up check), so
the real ``openai`` and ``anthropic`` clients can be pointed at it."""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from collections.abc import Callable


@dataclass
class Answer:
    """One scripted response: a reply text (status 200) or an error status, after ``delay`` s."""

    text: str = ""
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    tokens_in: int = 100
    tokens_out: int = 50


class FakeLLM:
    """Serves scripted answers in order; ``default`` answers once the script is used up.

    Attributes:
        requests: Every chat/messages request body received, in order.
    """

    def __init__(self, default: str | Answer | Callable[[dict], Any] | None = None) -> None:
        self.script: deque = deque()
        self.default = default
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path.rstrip("/").endswith("/v1/models"):
                    self._send(200, {"object": "list", "data": [{"id": "test-model", "object": "model",
                                     "type": "model", "created": 0, "created_at": "2024-01-01T00:00:00Z",
                                     "display_name": "test", "owned_by": "test"}],
                                     "has_more": False, "first_id": "test-model", "last_id": "test-model"})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                anthropic = self.path.rstrip("/").endswith("/v1/messages")
                if not anthropic and not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with fake.lock:
                    fake.requests.append(request)
                    entry = fake.script.popleft() if fake.script else fake.default
                if callable(entry):
                    entry = entry(request)
                if entry is None:
                    entry = Answer(status=500, text="the fake server has no scripted answer left")
                if isinstance(entry, str):
                    entry = Answer(entry)
                if entry.delay:
                    fake.stopping.wait(entry.delay)
                if entry.status != 200:
                    error = ({"type": "error", "error": {"type": "api_error", "message": entry.text or "error"}}
                             if anthropic else {"error": {"message": entry.text or "error", "type": "server_error"}})
                    self._send(entry.status, error, entry.headers)
                    return
                model = request.get("model", "test-model")
                if anthropic:
                    self._send(200, {
                        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                        "content": [{"type": "text", "text": entry.text}], "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": entry.tokens_in, "output_tokens": entry.tokens_out},
                    }, entry.headers)
                else:
                    self._send(200, {
                        "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                        "model": model,
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": entry.text}}],
                        "usage": {"prompt_tokens": entry.tokens_in, "completion_tokens": entry.tokens_out,
                                  "total_tokens": entry.tokens_in + entry.tokens_out},
                    }, entry.headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, *entries: str | Answer | Callable[[dict], Any]) -> FakeLLM:
        with self.lock:
            self.script.extend(entries)
        return self

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
