"""The requests ``posttrain serve`` accepts, checked against its limits before anything reaches a model.

Every check raises ``BadRequest(param, message)``: the server answers HTTP 400 with an OpenAI-style
body naming the field (``{"error": {"message", "type": "invalid_request_error", "param"}}``). Parsing
is plain ``json`` with the limits applied around it: a body over ``max_body_bytes`` is refused before
it is read (413), one nested deeper than ``max_json_depth`` (or too deep for the parser), with
``NaN``/``Infinity`` or a number past 4,300 digits is a 400, and every number is checked for its
type (``true`` is not 1, ``4.0`` is not a token count) and range (``max_tokens: 1e400`` is out of
range, ``seed`` must fit in 63 bits).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from posttrain.inference.engine import SamplingParams

KEY_ENV = "POSTTRAIN_API_KEY"  # the server's API key, and what its clients send
ROLLOUT_SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "stop")
BUDGET_NUMBERS = ("max_thinking_tokens", "min_thinking_tokens", "num_wait")
BUDGET_STRINGS = ("think_start", "think_end", "wait", "answer_prefix")
ROLES = ("system", "user", "assistant")
MAX_SEED = 2**63 - 1
MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_WAITS = 64  # budget forcing's num_wait
MAX_STRING = 1000  # stop strings and budget-forcing markers, in characters


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``posttrain serve --limit-*``)."""

    max_body_bytes: int = 8 * 2**20  # a JSON request body
    max_weights_bytes: int = 16 * 2**30  # a POST /posttrain/weights body (safetensors)
    max_json_depth: int = 32  # nesting of arrays and objects
    max_tokens: int = 4096  # max_tokens (chat) and max_new_tokens (rollouts)
    max_n: int = 16  # completions per chat request
    max_prompts: int = 1024  # prompts per /posttrain/complete request


class BadRequest(ValueError):
    def __init__(self, param: str | None, message: str):
        super().__init__(f"'{param}': {message}" if param else message)
        self.param = param


def _no_constants(name: str):
    raise BadRequest(None, f"the body is not JSON: {name} is not a JSON number")


def parse_json(body: bytes, limits: Limits) -> dict:
    """The request body as a JSON object within ``limits.max_json_depth``."""
    try:
        value = json.loads(body or b"{}", parse_constant=_no_constants)
    except RecursionError:
        raise BadRequest(None, f"the body is nested deeper than {limits.max_json_depth} levels") from None
    except ValueError as e:  # not JSON, not UTF-8, an integer of more than 4,300 digits
        if isinstance(e, BadRequest):
            raise
        raise BadRequest(None, f"the body is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    todo, depth = [value], 1
    while todo:  # breadth first, one level at a time
        if depth > limits.max_json_depth:
            raise BadRequest(None, f"the body is nested deeper than {limits.max_json_depth} levels")
        todo = [v for c in todo for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, (dict, list))]
        depth += 1
    return value


def integer(body: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(key, f"must be an integer from {low} to {high}, got {json.dumps(value)[:40]}")
    return value


def real(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or not (low < value if low_open else low <= value) or value > high:
        side = "(" if low_open else "["
        raise BadRequest(key, f"must be a number in {side}{low}, {high}], got {json.dumps(value)[:40]}")
    return float(value)


def strings(body: dict, key: str, most: int) -> list[str]:
    value = body.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and 0 < len(s) <= MAX_STRING for s in value) \
            or len(value) > most:
        raise BadRequest(key, f"must be a string or a list of at most {most} non-empty strings of at most "
                              f"{MAX_STRING} characters")
    return value


def flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(key, "must be true or false")
    return value


def top_k(body: dict, vocab_size: int | None) -> int:
    """``-1`` and ``0`` (vLLM's and our "no top-k") are 0."""
    return max(0, integer(body, "top_k", 0, -1, vocab_size or 2**31 - 1))


def sampling_from(body: dict, limits: Limits, vocab_size: int | None = None) -> SamplingParams:
    """A chat request's sampling fields (OpenAI's names, temperature default 1)."""
    if body.get("max_completion_tokens") is not None:
        max_tokens = integer(body, "max_completion_tokens", None, 1, limits.max_tokens)
    else:
        max_tokens = integer(body, "max_tokens", min(256, limits.max_tokens), 1, limits.max_tokens)
    return SamplingParams(max_new_tokens=max_tokens, temperature=real(body, "temperature", 1.0, 0.0, 2.0),
                          top_p=real(body, "top_p", 1.0, 0.0, 1.0, low_open=True), top_k=top_k(body, vocab_size),
                          n=integer(body, "n", 1, 1, limits.max_n), seed=integer(body, "seed", 0, 0, MAX_SEED),
                          stop=strings(body, "stop", MAX_STOP))


def messages_from(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}]", "must be an object with a role (system, user, assistant) and string "
                                               "content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def budget_from(body: dict, max_tokens: int, limits: Limits):
    """s1's budget forcing from the request's extra fields, or None when none of them is set."""
    from posttrain.inference.budget_forcing import BudgetForcing

    if all(body.get(k) is None for k in BUDGET_NUMBERS):
        return None
    given = {k: integer(body, k, None, 0, MAX_WAITS if k == "num_wait" else limits.max_tokens)
             for k in BUDGET_NUMBERS if body.get(k) is not None}
    for k in BUDGET_STRINGS:
        if body.get(k) is not None:
            if not isinstance(body[k], str) or len(body[k]) > MAX_STRING:
                raise BadRequest(k, f"must be a string of at most {MAX_STRING} characters")
            given[k] = body[k]
    return BudgetForcing(max_answer_tokens=max_tokens, **given)


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    sampling: SamplingParams
    budget: object  # a BudgetForcing, or None
    stream: bool
    logprobs: bool
    max_tokens_given: bool = True


def chat_request(body: dict, limits: Limits, vocab_size: int | None = None) -> ChatRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model", "must be a string")
    messages, sampling = messages_from(body), sampling_from(body, limits, vocab_size)
    return ChatRequest(model=model, messages=messages, sampling=sampling,
                       budget=budget_from(body, sampling.max_new_tokens, limits), stream=flag(body, "stream"),
                       logprobs=flag(body, "logprobs"),
                       max_tokens_given=body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None)


def rollout_request(body: dict, limits: Limits, vocab_size: int) -> tuple[list[list[int]], list[int], SamplingParams]:
    """``POST /posttrain/complete``: ``{"prompts": [[token ids]], "seeds": [...], "sampling": {...}}``."""
    prompts, seeds = body.get("prompts"), body.get("seeds")
    if not isinstance(prompts, list) or not 0 < len(prompts) <= limits.max_prompts:
        raise BadRequest("prompts", f"must be a list of 1 to {limits.max_prompts} lists of token ids")
    if not isinstance(seeds, list) or len(seeds) != len(prompts):
        raise BadRequest("seeds", "must be a list of integers, one per prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not p or not all(type(t) is int and 0 <= t < vocab_size for t in p):
            raise BadRequest(f"prompts[{i}]", f"must be a non-empty list of token ids below {vocab_size}")
    for i, s in enumerate(seeds):
        if type(s) is not int or not 0 <= s <= MAX_SEED:
            raise BadRequest(f"seeds[{i}]", f"must be an integer from 0 to {MAX_SEED}")
    given = body.get("sampling")
    if not isinstance(given, dict) or set(given) - set(ROLLOUT_SAMPLING):
        raise BadRequest("sampling", f"must be an object with keys among {', '.join(ROLLOUT_SAMPLING)}")
    try:
        sampling = SamplingParams(
            max_new_tokens=integer(given, "max_new_tokens", min(256, limits.max_tokens), 1, limits.max_tokens),
            temperature=real(given, "temperature", 0.0, 0.0, 2.0), top_p=real(given, "top_p", 1.0, 0.0, 1.0, True),
            top_k=top_k(given, vocab_size), stop=strings(given, "stop", MAX_STOP))
    except BadRequest as e:
        raise BadRequest(f"sampling.{e.param}", str(e).split(": ", 1)[1]) from None
    return prompts, seeds, sampling


def logprobs_content(tokenizer, token_ids: list[int], logprobs: list[float]) -> dict:
    """OpenAI's ``choices[i].logprobs``: the sampled tokens' log-probabilities."""
    return {"content": [{"token": tokenizer.decode([t]), "logprob": lp, "bytes": list(tokenizer.decode([t]).encode()),
                         "top_logprobs": []} for t, lp in zip(token_ids, logprobs)]}
