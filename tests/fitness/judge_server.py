"""A judge on 127.0.0.1 for the MT-Bench tests: OpenAI's ``POST /v1/chat/completions`` and
Anthropic's ``POST /v1/messages``, answering through a function of the request, so the real
``openai`` and ``anthropic`` clients can be pointed at it."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable


class JudgeServer:
    """``reply(request) -> (status, text)`` answers every request; ``requests`` records them."""

    def __init__(self, reply: Callable[[dict], tuple[int, str]]) -> None:
        self.reply = reply
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 - http.server's naming
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.requests.append(request)
                server.paths.append(self.path)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                status, text = server.reply(request)
                anthropic = self.path.rstrip("/").endswith("/v1/messages")
                if status != 200:
                    self._send(status, {"type": "error", "error": {"type": "api_error", "message": text}}
                               if anthropic else {"error": {"message": text, "type": "server_error"}})
                elif anthropic:
                    self._send(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": request["model"],
                                     "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                                     "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 5}})
                else:
                    self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                                     "model": request["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": text}}],
                                     "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
