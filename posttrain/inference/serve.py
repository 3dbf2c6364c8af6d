"""``posttrain serve``: a local model behind an OpenAI-compatible HTTP API (``/v1/chat/completions``,
``/v1/models``), for judges, synthetic data and ``OpenAIEngine`` tests; with ``--engine vllm`` also a
rollout server for RLVR's ``vllm_servers`` (posttrain.inference.vllm_servers).

Requests run one at a time on the engine (``TransformersEngine`` or ``VLLMEngine``). Supported request
fields: ``messages``, ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (default 1), ``top_p``,
``top_k``, ``seed``, ``stop``, ``n``. A malformed request gets HTTP 400 with an OpenAI-style error body.

Rollout routes (``--engine vllm``; the transformers engine answers them with 404):

- ``GET /health`` (either engine): ``{"model", "engine", "rollouts", "vocab_size", "weights_version"}``.
- ``POST /posttrain/complete``: ``{"prompts": [[token ids], ...], "seeds": [...], "sampling": {...}}`` (one
  completion per prompt, each with its seed; ``sampling``: ``max_new_tokens``, ``temperature``, ``top_p``,
  ``top_k``, ``stop``) -> ``{"completions": [{"text", "token_ids", "finish_reason", "logprobs"}]}``.
- ``POST /posttrain/weights``: the body is a safetensors file of the model's parameters by their
  transformers names, header ``X-Weights-Version``; loaded in place (``VLLMEngine.load_weights``). Only
  with ``--accept-weights``: anyone who can reach the port can then replace the model.

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

from posttrain.inference.engine import SamplingParams

ROLLOUT_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "stop")


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


def rollout_sampling(body: dict) -> SamplingParams:
    given = body.get("sampling")
    if not isinstance(given, dict) or set(given) - set(ROLLOUT_SAMPLING):
        raise BadRequest(f"'sampling' must be an object with keys among {', '.join(ROLLOUT_SAMPLING)}")
    try:
        return SamplingParams(**given)
    except TypeError as e:
        raise BadRequest(f"'sampling': {e}") from None


def check_rollout_request(body: dict, vocab_size: int) -> tuple[list[list[int]], list[int], SamplingParams]:
    prompts, seeds = body.get("prompts"), body.get("seeds")
    if not isinstance(prompts, list) or not isinstance(seeds, list) or len(prompts) != len(seeds):
        raise BadRequest("'prompts' (lists of token ids) and 'seeds' must be lists of the same length")
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not p or not all(isinstance(t, int) and 0 <= t < vocab_size for t in p):
            raise BadRequest(f"prompts[{i}] must be a non-empty list of token ids below {vocab_size}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise BadRequest("'seeds' must be integers")
    return prompts, seeds, rollout_sampling(body)


def make_server(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                faults: list | None = None, fault_delay: float = 5.0, accept_weights: bool = False) -> ThreadingHTTPServer:
    lock = threading.Lock()
    pending = list(faults or [])
    served = {"completions": 0, "weights_version": 0}
    rollouts = hasattr(engine, "complete")  # the vLLM engine: per-completion seeds and weight loads
    vocab_size = len(engine.tokenizer) if rollouts else None

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
            if self.path.rstrip("/") == "/health":
                self._send(200, {"model": model_name, "engine": type(engine).__name__, "vocab_size": vocab_size,
                                 "weights_version": served["weights_version"], "rollouts": rollouts})
            elif self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "posttrain"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def _rollout(self, route: str) -> None:
            if not rollouts:
                self._send(404, {"error": {"message": f"{route} needs serve --engine vllm", "type": "not_found"}})
                return
            length = int(self.headers.get("Content-Length", "0"))
            if route == "/posttrain/weights":
                if not accept_weights:
                    self._send(403, {"error": {"message": "weight loads need serve --accept-weights", "type": "forbidden"}})
                    return
                from safetensors.torch import load

                try:
                    weights = load(self.rfile.read(length))
                    version = int(self.headers.get("X-Weights-Version", "0"))
                    with lock:
                        engine.load_weights(weights.items())
                        served["weights_version"] = version
                except Exception as e:  # a file that is not safetensors, or names/shapes the model lacks
                    self._send(400, {"error": {"message": f"weights not loaded: {str(e).splitlines()[0] if str(e) else e!r}",
                                               "type": "invalid_request_error"}})
                    return
                self._send(200, {"weights_version": version})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                prompts, seeds, sampling = check_rollout_request(body, vocab_size)
            except (BadRequest, ValueError) as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            with lock:
                outs = engine.complete(prompts, seeds, sampling)
                served["completions"] += len(outs)
            self._send(200, {"completions": [{"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                                              "logprobs": o.logprobs} for o in outs]})

        def do_POST(self):
            if self.path.rstrip("/") in ("/posttrain/complete", "/posttrain/weights"):
                self._rollout(self.path.rstrip("/"))
                return
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


def serve(model_path: str, host: str, port: int, batch_size: int = 8, name: str | None = None,
          engine: str = "transformers", accept_weights: bool = False) -> None:
    from posttrain.inference.open import local_engine
    from posttrain.util import log

    server = make_server(local_engine(model_path, engine, batch_size), name or model_path, host, port,
                         accept_weights=accept_weights)
    log(f"serving {model_path} as {name or model_path!r} ({engine}) on http://{host}:{server.server_address[1]}/v1"
        + (" and the rollout routes /posttrain/*" if engine == "vllm" else ""))
    try:
        server.serve_forever()
    finally:
        server.server_close()
