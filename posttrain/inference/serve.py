"""``posttrain serve``: local models behind an OpenAI-compatible HTTP API (``/v1/chat/completions``,
``/v1/models``) on FastAPI and uvicorn, for people, judges, synthetic data and ``OpenAIEngine``; with
``--engine vllm`` also a rollout server for RLVR's ``vllm_servers`` (posttrain.inference.vllm_servers).

``GET /`` is a chat page (``web/chat.html``: streaming replies, system prompt, sampling and
budget-forcing controls, 1-4 models side by side, markdown and code rendered, export as JSON).

Who may ask, body and stream limits, timeouts: posttrain.inference.serve_http (an API key, the
Origin and Host checks; every bad request a JSON 4xx naming the field). What a request may ask for:
posttrain.inference.api (``Limits``). Each model generates for one request at a time (a lock per
model) in a worker thread, so the event loop never waits on a model; a streamed reply is generated
into a queue, so a client that stops reading holds nothing but its own connection (cut after
``--timeout-write``); a client that leaves a stream stops its generation at the next token.

Request fields of ``/v1/chat/completions``: ``messages``, ``max_tokens`` (or ``max_completion_tokens``),
``temperature`` (default 1), ``top_p``, ``top_k`` (0 or -1: none), ``seed``, ``stop``, ``n``,
``logprobs`` (the sampled tokens' log-probabilities at the sampling temperature, in OpenAI's
``choices[i].logprobs.content`` form), ``stream`` (server-sent events of ``chat.completion.chunk``
objects, token by token on the transformers engine, ending with ``data: [DONE]``), and s1's budget
forcing (posttrain.inference.budget_forcing): ``max_thinking_tokens``, ``min_thinking_tokens``,
``num_wait`` (and ``think_start``, ``think_end``, ``wait``, ``answer_prefix``); a budget-forced choice
also carries ``thinking_tokens``, ``waits`` and ``forced_stop``. Several models can be served at once;
a request names one in ``model`` (a single served model answers whatever name is asked; 404 otherwise).

Rollout routes (``--engine vllm``; the transformers engine answers them with 404):

- ``GET /health`` (either engine): ``{"model", "engine", "rollouts", "vocab_size", "weights_version"}``.
- ``POST /posttrain/complete``: ``{"prompts": [[token ids], ...], "seeds": [...], "sampling": {...}}``
  (one completion per prompt, each with its seed; ``sampling``: ``max_new_tokens``, ``temperature``,
  ``top_p``, ``top_k``, ``stop``) -> ``{"completions": [{"text", "token_ids", "finish_reason", "logprobs"}]}``.
- ``POST /posttrain/weights`` (``--accept-weights``, which needs a key): the body is a safetensors
  file of the model's parameters by their transformers names, header ``X-Weights-Version``; loaded
  in place (``VLLMEngine.load_weights``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from posttrain.errors import UserError
from posttrain.inference.api import BadRequest, Limits, chat_request, logprobs_content, rollout_request
from posttrain.inference.serve_http import (Access, Guard, Refused, RunningServer, Timeouts, TimedStream,
                                            check_access, error_body, is_loopback, json_body, listening_socket,
                                            logger, read_body, uvicorn_server)

CHAT_PAGE = Path(__file__).parent / "web" / "chat.html"  # one static file: no build step, nothing from the network


class ClientGone(Exception):
    """Raised in the generating thread when the client of a streamed reply has left."""


@dataclass
class Served:
    engine: object
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one generation at a time per model
    vocab_size: int | None = field(init=False)

    def __post_init__(self):
        tokenizer = getattr(self.engine, "tokenizer", None)
        self.vocab_size = len(tokenizer) if tokenizer is not None else None

    def check_prompt(self, req) -> None:
        """A prompt and ``max_tokens`` that fit the model's context (a ``max_tokens`` not asked for is cut
        to what is left)."""
        context = getattr(self.engine, "max_model_len", None)
        if context is None or not hasattr(self.engine, "encode"):
            return
        prompt, sampling = len(self.engine.encode(req.messages)), req.sampling
        if not req.max_tokens_given and prompt < context:
            sampling.max_new_tokens = min(sampling.max_new_tokens, context - prompt)
        if prompt + sampling.max_new_tokens > context:
            raise BadRequest("max_tokens" if prompt < context else "messages",
                             f"the prompt is {prompt} tokens and max_tokens {sampling.max_new_tokens}; the model's "
                             f"context is {context} tokens")


def generate(served: Served, req, on_text=None, started=None) -> list:
    """Completions for one chat request (in a worker thread, holding the model's lock); ``started()``
    once the prompt is known to fit."""
    served.check_prompt(req)
    if started is not None:
        started()
    if req.budget is not None:
        from posttrain.inference.budget_forcing import generate as forced

        return forced(served.engine, [req.messages], req.budget, req.sampling)
    if on_text is not None and hasattr(served.engine, "model"):  # the transformers engine streams tokens
        return served.engine.generate([req.messages], req.sampling, on_text=on_text)
    return served.engine.generate([req.messages], req.sampling)


RUNNING: set = set()  # tasks the event loop holds only weakly


def background(coro) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    RUNNING.add(task)
    task.add_done_callback(RUNNING.discard)
    return task


async def locked(served: Served, fn, *args):
    """``fn(*args)`` in a worker thread holding the model's lock; shielded: a client that leaves does not
    release the lock while the thread still runs."""

    async def run():
        async with served.lock:
            return await asyncio.to_thread(fn, *args)

    try:
        return await asyncio.shield(background(run()))
    except (BadRequest, Refused, ClientGone):
        raise
    except Exception as e:  # the engine failed: logged here, a 500 without its internals to the client
        logger.exception("the model failed")
        raise Refused(500, f"the model failed ({type(e).__name__}); the server's log has the details",
                      "server_error") from None


def choices_of(engine, req, outs: list) -> tuple[list[dict], dict]:
    choices = []
    for i, o in enumerate(outs):
        finish = getattr(o, "finish_reason", None) or getattr(o, "answer_finish_reason", "stop")
        choice = {"index": i, "message": {"role": "assistant", "content": o.text}, "finish_reason": finish}
        if req.budget is not None:
            choice.update(thinking_tokens=o.thinking_tokens, waits=o.waits, forced_stop=o.forced_stop)
        elif req.logprobs:
            choice["logprobs"] = logprobs_content(engine.tokenizer, o.token_ids, o.logprobs)
        choices.append(choice)
    tokens = sum(len(o.token_ids) if req.budget is None else
                 len(engine.tokenizer(o.text, add_special_tokens=False)["input_ids"]) for o in outs)
    return choices, {"completion_tokens": tokens, "prompt_tokens": 0, "total_tokens": tokens}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def make_app(engines: dict, access: Access = Access(), limits: Limits = Limits(), timeouts: Timeouts = Timeouts()):
    """The ASGI app serving ``{name: engine}`` (the first is the default and the rollout routes' model)."""
    models = {name: Served(engine) for name, engine in engines.items()}
    default = next(iter(models))
    first = models[default]
    rollouts = hasattr(first.engine, "complete")  # the vLLM engine: per-completion seeds and weight loads
    app = FastAPI(title="posttrain serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = {"completions": 0, "weights_version": 0}

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        return JSONResponse(e.body, e.status, headers=e.headers)

    @app.exception_handler(BadRequest)
    async def bad_request(request, e: BadRequest):
        return JSONResponse(error_body(str(e), param=e.param), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, kind), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"the server failed: {type(e).__name__}", "server_error"), 500)

    @app.get("/", include_in_schema=False)
    @app.get("/chat", include_in_schema=False)
    @app.get("/index.html", include_in_schema=False)
    async def page():
        return HTMLResponse(CHAT_PAGE.read_bytes(), headers={"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                                                           "Referrer-Policy": "no-referrer"})

    @app.get("/health")
    async def health():
        return {"model": default, "engine": type(first.engine).__name__, "vocab_size": first.vocab_size if rollouts
                else None, "weights_version": app.state.served["weights_version"], "rollouts": rollouts}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "posttrain"} for name in models]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request, limits, timeouts)
        name = body.get("model") if len(models) > 1 else default
        if name not in models:
            raise Refused(404, f"model {name!r} is not served here; served: {', '.join(models)}", param="model",
                          code="model_not_found")
        served = models[name]
        req = chat_request(body, limits, served.vocab_size)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": name}
        if not req.stream:
            outs = await locked(served, generate, served, req)
            app.state.served["completions"] += len(outs)
            choices, usage = choices_of(served.engine, req, outs)
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage}
        return await stream_reply(served, req, head)

    async def stream_reply(served: Served, req, head: dict):
        loop, queue, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def on_text(j: int, delta: str) -> None:
            if gone.is_set():
                raise ClientGone
            loop.call_soon_threadsafe(queue.put_nowait, ("text", j, delta))

        def started():
            loop.call_soon_threadsafe(queue.put_nowait, ("started",))

        async def produce():
            try:
                queue.put_nowait(("done", await locked(served, generate, served, req, on_text, started)))
            except Exception as e:  # noqa: BLE001 - the reply carries it
                queue.put_nowait(("error", e))

        background(produce())
        try:
            first_event = await queue.get()
        except asyncio.CancelledError:  # the client left while waiting for the model
            gone.set()
            raise
        if first_event[0] == "error":
            raise first_event[1]
        n = req.sampling.n

        def chunk(choices: list[dict], **extra) -> bytes:
            return sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

        async def events():
            try:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(n)])
                streamed = [""] * n
                while True:
                    kind, *rest = await queue.get()
                    if kind == "text":
                        j, delta = rest
                        streamed[j] += delta
                        yield chunk([{"index": j, "delta": {"content": delta}, "finish_reason": None}])
                    elif kind == "error":
                        logger.error("a streamed reply failed: %r", rest[0])
                        yield sse(error_body(f"generation failed: {type(rest[0]).__name__}", "server_error"))
                        return
                    else:
                        outs = rest[0]
                        app.state.served["completions"] += len(outs)
                        choices, usage = choices_of(served.engine, req, outs)
                        for c in choices:  # what the tokens did not carry (a stop string's cut, budget forcing: all)
                            text, sent = c["message"]["content"], streamed[c["index"]]
                            tail = text[len(sent):] if text.startswith(sent) else ""
                            extra = {k: c[k] for k in ("thinking_tokens", "waits", "forced_stop", "logprobs") if k in c}
                            yield chunk([{"index": c["index"], "delta": {"content": tail} if tail else {},
                                          "finish_reason": c["finish_reason"], **extra}])
                        yield chunk([], usage=usage)
                        yield b"data: [DONE]\n\n"
                        return
            finally:
                gone.set()  # the generating thread stops at its next token if it still runs

        return TimedStream(events(), timeouts.write, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/posttrain/complete")
    async def complete(request: Request):
        if not rollouts:
            raise Refused(404, "/posttrain/complete needs serve --engine vllm", "not_found")
        prompts, seeds, sampling = rollout_request(await json_body(request, limits, timeouts), limits, first.vocab_size)
        outs = await locked(first, first.engine.complete, prompts, seeds, sampling)
        app.state.served["completions"] += len(outs)
        return {"completions": [{"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                                 "logprobs": o.logprobs} for o in outs]}

    @app.post("/posttrain/weights")
    async def weights(request: Request):
        if not rollouts:
            raise Refused(404, "/posttrain/weights needs serve --engine vllm", "not_found")
        if not access.accept_weights:
            raise Refused(403, "weight loads need serve --accept-weights", "forbidden")
        version = request.headers.get("x-weights-version", "0")
        if not version.isdigit() or len(version) > 18:
            raise Refused(400, "X-Weights-Version must be a non-negative integer", param="X-Weights-Version")
        data = await read_body(request, limits.max_weights_bytes, timeouts.request, idle=True)

        def load():
            from safetensors.torch import load as load_safetensors

            try:
                first.engine.load_weights(load_safetensors(data).items())
            except Exception as e:  # not safetensors, or names/shapes the model lacks
                raise BadRequest("body", f"weights not loaded: {str(e).splitlines()[0] if str(e) else repr(e)}") from None

        await locked(first, load)
        app.state.served["weights_version"] = int(version)
        return {"weights_version": int(version)}

    inner = app
    if access.allowed_origins:
        inner = CORSMiddleware(app, allow_origins=list(access.allowed_origins), allow_methods=["GET", "POST"],
                               allow_headers=["authorization", "content-type", "x-weights-version"])
    guarded = Guard(inner, access)
    guarded.state = app.state  # type: ignore[attr-defined]
    return guarded




def start_server(engine, model_name: str | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, allowed_origins: tuple[str, ...] = (), accept_weights: bool = False,
                 limits: Limits = Limits(), timeouts: Timeouts = Timeouts(), limit_concurrency: int = 512) -> RunningServer:
    """Serve ``engine`` (as ``model_name``) or ``{name: engine}`` (the first the default) in a thread."""
    engines = dict(engine) if isinstance(engine, dict) else {model_name: engine}
    access = Access(api_key, tuple(allowed_origins), accept_weights, is_loopback(host))
    check_access(host, access)
    return RunningServer(make_app(engines, access, limits, timeouts), host, port, timeouts, limit_concurrency)


def models_of_run(run_dir: str) -> dict[str, str]:
    """``{name: model directory}`` of a ``posttrain run`` / ``posttrain demo`` output: ``base`` (the first
    training stage's starting model) and every stage that wrote a model, in the run's order."""
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
          access: Access = Access(), limits: Limits = Limits(), timeouts: Timeouts = Timeouts(),
          limit_concurrency: int = 512) -> None:
    """Serve ``{name: model path}`` (the first is the default model) until interrupted."""
    from posttrain.inference.open import local_engine
    from posttrain.util import log

    check_access(host, access)
    sock = listening_socket(host, port)  # before the models load: a taken port is an error at once
    engines = {name: local_engine(path, engine, batch_size) for name, path in models.items()}
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    log(f"serving {', '.join(f'{n} ({p})' for n, p in models.items())} with the {engine} engine on {url}/v1"
        + (" and the rollout routes /posttrain/*" if engine == "vllm" else "")
        + f"; chat page: {url}/" + (" (it asks for the API key; or open it as /#key=KEY)" if access.api_key else ""))
    try:
        uvicorn_server(make_app(engines, access, limits, timeouts), timeouts, limit_concurrency).run(sockets=[sock])
    finally:
        sock.close()
