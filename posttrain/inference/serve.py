"""``posttrain serve``: a local model behind an OpenAI-compatible HTTP API (``/v1/chat/completions``,
``/v1/models``), for judges, synthetic data and ``OpenAIEngine`` tests.

Requests run one at a time on the local engine (``TransformersEngine``). Supported request fields:
``messages``, ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (default 1), ``top_p``,
``top_k``, ``seed``, ``stop``, ``n``. A malformed request gets HTTP 400 with an OpenAI-style error body.

``faults`` (tests only) is a list consumed one item per request: an HTTP status to answer with,
``"timeout"`` (answer after ``fault_delay`` seconds), ``"drop"`` (close the connection unanswered) or
``"garbage"`` (a 200 whose body is not JSON).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from posttrain.inference.engine import SamplingParams, TransformersEngine


class BadRequest(ValueError):
    pass


def sampling_from(body: dict) -> SamplingParams:
    def number(key, default, kind=float):
        value = body.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"'{key}' must be a number")
        return kind(value)

    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    max_tokens = number("max_completion_tokens", None, int) or number("max_tokens", 256, int)
    if max_tokens <= 0:
        raise BadRequest("'max_tokens' must be > 0")
    return SamplingParams(max_new_tokens=max_tokens, temperature=number("temperature", 1.0), top_p=number("top_p", 1.0),
                          top_k=number("top_k", 0, int), n=number("n", 1, int), seed=number("seed", 0, int), stop=stop)


def check_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        good = isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        if not good:
            raise BadRequest(f"messages[{i}] must be an object with a role (system, user, assistant) and string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def make_server(engine: TransformersEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                faults: list | None = None, fault_delay: float = 5.0) -> ThreadingHTTPServer:
    lock = threading.Lock()
    pending = list(faults or [])
    served = {"completions": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to answer
                self.close_connection = True

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "posttrain"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            with lock:
                fault = pending.pop(0) if pending else None
            if fault == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if fault == "garbage":  # a 200 whose body is not a completion
                data = b"<html>upstream hiccup</html>"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if fault == "timeout":
                time.sleep(fault_delay)
            elif isinstance(fault, int):
                self._send(fault, {"error": {"message": f"injected fault {fault}", "type": "injected"}})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                messages, sampling = check_messages(body), sampling_from(body)
            except (BadRequest, ValueError) as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            with lock:
                outs = engine.generate([messages], sampling)
                served["completions"] += len(outs)
            choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "finish_reason": o.finish_reason}
                       for i, o in enumerate(outs)]
            tokens = sum(len(o.token_ids) for o in outs)
            self._send(200, {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                             "model": model_name, "choices": choices,
                             "usage": {"completion_tokens": tokens, "prompt_tokens": 0, "total_tokens": tokens}})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.served = served  # type: ignore[attr-defined]
    return server


def serve(model_path: str, host: str, port: int, batch_size: int = 8, name: str | None = None) -> None:
    from posttrain.util import log

    engine = TransformersEngine.load(model_path, batch_size)
    server = make_server(engine, name or model_path, host, port)
    log(f"serving {model_path} as {name or model_path!r} on http://{host}:{server.server_address[1]}/v1")
    try:
        server.serve_forever()
    finally:
        server.server_close()
