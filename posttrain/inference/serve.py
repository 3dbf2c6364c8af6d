"""``posttrain serve``: local models behind an OpenAI-compatible HTTP API (``/v1/chat/completions``,
``/v1/models``), for people, judges, synthetic data and ``OpenAIEngine`` tests; with ``--engine vllm``
also a rollout server for RLVR's ``vllm_servers`` (posttrain.inference.vllm_servers).

``GET /`` is a chat page (``web/chat.html``: streaming replies, system prompt, sampling and
budget-forcing controls, 1-4 models side by side, markdown and code rendered, export as JSON).

Several models can be served at once (``{name: engine}``); a request names one in ``model`` (one
served model answers whatever name is asked). Requests run one at a time per model (the ``TransformersEngine``
or ``VLLMEngine``), each in its own thread: concurrent clients wait for the model, never share a batch.
Supported request fields: ``messages``, ``max_tokens`` (or ``max_completion_tokens``), ``temperature``
(default 1), ``top_p``, ``top_k``, ``seed``, ``stop``, ``n``, ``logprobs`` (the sampled tokens'
log-probabilities at the sampling temperature, in OpenAI's ``choices[i].logprobs.content`` form),
``stream`` (server-sent events of ``chat.completion.chunk`` objects, token by token on the
transformers engine, ending with ``data: [DONE]``), and s1's budget forcing as extra body fields
(posttrain.inference.budget_forcing): ``max_thinking_tokens``, ``min_thinking_tokens``, ``num_wait``
(and ``think_start``, ``think_end``, ``wait``, ``answer_prefix``); a budget-forced choice also carries
``thinking_tokens``, ``waits`` and ``forced_stop``. A malformed request gets HTTP 400 with an
OpenAI-style error body; an unknown model 404.

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
from pathlib import Path

from posttrain.inference.engine import SamplingParams

ROLLOUT_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "stop")
CHAT_PAGE = Path(__file__).parent / "web" / "chat.html"  # one static file: no build step, nothing from the network
BUDGET_NUMBERS = ("max_thinking_tokens", "min_thinking_tokens", "num_wait")
BUDGET_STRINGS = ("think_start", "think_end", "wait", "answer_prefix")


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


def budget_from(body: dict, max_tokens: int):
    """s1's budget forcing from the request's extra fields, or None when none of them is set."""
    from posttrain.inference.budget_forcing import BudgetForcing

    given = {k: body[k] for k in BUDGET_NUMBERS + BUDGET_STRINGS if body.get(k) is not None}
    if not any(k in given for k in BUDGET_NUMBERS):
        return None
    for k in BUDGET_NUMBERS:
        if k in given and (isinstance(given[k], bool) or not isinstance(given[k], int) or given[k] < 0):
            raise BadRequest(f"'{k}' must be an integer >= 0")
    for k in BUDGET_STRINGS:
        if k in given and not isinstance(given[k], str):
            raise BadRequest(f"'{k}' must be a string")
    return BudgetForcing(max_answer_tokens=max_tokens, **given)


def logprobs_content(tokenizer, token_ids: list[int], logprobs: list[float]) -> dict:
    return {"content": [{"token": tokenizer.decode([t]), "logprob": lp, "bytes": list(tokenizer.decode([t]).encode()),
                         "top_logprobs": []} for t, lp in zip(token_ids, logprobs)]}


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


def make_server(engine, model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                faults: list | None = None, fault_delay: float = 5.0, accept_weights: bool = False) -> ThreadingHTTPServer:
    """``engine``: one engine (served as ``model_name``) or ``{name: engine}``, the first the default."""
    engines = dict(engine) if isinstance(engine, dict) else {model_name: engine}
    model_name = next(iter(engines))
    engine = engines[model_name]
    locks = {name: threading.Lock() for name in engines}
    lock = locks[model_name]  # the rollout routes: the first model
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
            if self.path.split("?")[0] in ("/", "/chat", "/index.html"):  # the chat page
                data = CHAT_PAGE.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path.rstrip("/") == "/health":
                self._send(200, {"model": model_name, "engine": type(engine).__name__, "vocab_size": vocab_size,
                                 "weights_version": served["weights_version"], "rollouts": rollouts})
            elif self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "posttrain"}
                                                            for name in engines]})
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
                budget = budget_from(body, sampling.max_new_tokens)
            except (BadRequest, ValueError) as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            name = body.get("model") if len(engines) > 1 else model_name
            if name not in engines:
                self._send(404, {"error": {"message": f"model {name!r} is not served here; served: {', '.join(engines)}",
                                           "type": "invalid_request_error", "code": "model_not_found"}})
                return
            self._complete(name, messages, sampling, budget, bool(body.get("stream")), bool(body.get("logprobs")))

        def _complete(self, name: str, messages: list[dict], sampling: SamplingParams, budget, stream: bool,
                      logprobs: bool) -> None:
            eng = engines[name]
            head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": name}
            on_text = None
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                self.close_connection = True

                def event(choices: list[dict], **extra) -> None:
                    chunk = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()

                event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                       for i in range(sampling.n)])
                streamed = [""] * sampling.n

                def on_text(j: int, delta: str) -> None:
                    streamed[j] += delta
                    event([{"index": j, "delta": {"content": delta}, "finish_reason": None}])

            try:
                with locks[name]:
                    if budget is not None:
                        from posttrain.inference.budget_forcing import generate as forced

                        outs = forced(eng, [messages], budget, sampling)
                    elif on_text is not None and hasattr(eng, "model"):  # the transformers engine streams tokens
                        outs = eng.generate([messages], sampling, on_text=on_text)
                    else:
                        outs = eng.generate([messages], sampling)
                    served["completions"] += len(outs)
                choices = []
                for i, o in enumerate(outs):
                    finish = getattr(o, "finish_reason", None) or getattr(o, "answer_finish_reason", "stop")
                    choice = {"index": i, "message": {"role": "assistant", "content": o.text}, "finish_reason": finish}
                    if budget is not None:
                        choice.update(thinking_tokens=o.thinking_tokens, waits=o.waits, forced_stop=o.forced_stop)
                    elif logprobs:
                        choice["logprobs"] = logprobs_content(eng.tokenizer, o.token_ids, o.logprobs)
                    choices.append(choice)
                tokens = sum(len(o.token_ids) if budget is None else
                             len(eng.tokenizer(o.text, add_special_tokens=False)["input_ids"]) for o in outs)
                usage = {"completion_tokens": tokens, "prompt_tokens": 0, "total_tokens": tokens}
                if not stream:
                    self._send(200, {**head, "object": "chat.completion", "choices": choices, "usage": usage})
                    return
                for c in choices:  # what the tokens did not carry (a stop string's cut, budget forcing: all)
                    text = c["message"]["content"]
                    rest = text[len(streamed[c["index"]]):] if text.startswith(streamed[c["index"]]) else ""
                    extra = {k: c[k] for k in ("thinking_tokens", "waits", "forced_stop", "logprobs") if k in c}
                    event([{"index": c["index"], "delta": {"content": rest} if rest else {},
                            "finish_reason": c["finish_reason"], **extra}])
                event([], usage=usage)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client left mid-stream
                self.close_connection = True


    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.served = served  # type: ignore[attr-defined]
    return server


def models_of_run(run_dir: str) -> dict[str, str]:
    """``{name: model directory}`` of a ``posttrain run`` / ``posttrain demo`` output: ``base`` (the first
    training stage's starting model) and every stage that wrote a model, in the run's order."""
    from posttrain.errors import UserError

    stages_file = Path(run_dir) / "stages.json"
    if not stages_file.is_file():
        raise UserError(f"--run {run_dir}: no stages.json (the output directory of posttrain run or posttrain demo)")
    out: dict[str, str] = {}
    for st in json.loads(stages_file.read_text()):
        model_dir = Path(st.get("output_dir", ""))
        if not (model_dir / "config.json").is_file():
            continue
        if not out and (model_dir / "manifest.json").is_file():
            start = json.loads((model_dir / "manifest.json").read_text()).get("config", {}).get("model")
            if start:
                out["base"] = start
        out[st["stage"]] = str(model_dir)
    if not out:
        raise UserError(f"--run {run_dir}: no stage of it wrote a model")
    return out


def parse_models(specs: list[str], run: str | None = None) -> dict[str, str]:
    """``--model DIR`` / ``--model NAME=DIR`` (repeatable) and ``--run RUN_DIR`` -> ``{name: path}``."""
    from posttrain.errors import UserError

    out = models_of_run(run) if run else {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec and not spec.startswith(("/", ".")) else (spec, "", spec)
        if name in out:
            raise UserError(f"--model {spec}: the name {name!r} is given twice")
        out[name] = path or name
    if not out:
        raise UserError("give --model DIR (or NAME=DIR, repeatable) or --run RUN_DIR")
    return out


def serve(models: dict[str, str], host: str, port: int, batch_size: int = 8, engine: str = "transformers",
          accept_weights: bool = False) -> None:
    """Serve ``{name: model path}`` (the first is the default model)."""
    from posttrain.inference.open import local_engine
    from posttrain.util import log

    engines = {name: local_engine(path, engine, batch_size) for name, path in models.items()}
    server = make_server(engines, host=host, port=port, accept_weights=accept_weights)
    url = f"http://{host}:{server.server_address[1]}"
    log(f"serving {', '.join(f'{n} ({p})' for n, p in models.items())} with the {engine} engine on {url}/v1"
        + (" and the rollout routes /posttrain/*" if engine == "vllm" else ""))
    try:
        server.serve_forever()
    finally:
        server.server_close()
