"""An engine for any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, ``posttrain serve``,
hosted APIs), behind the same ``generate(prompts, sampling)`` as the local engine.

- Each sample is one request (``seed = sampling.seed + sample index``), sent by up to ``concurrency``
  threads.
- Retries: 429, 5xx, timeouts, dropped connections and malformed answers (a body that is not a chat
  completion) are retried up to ``max_retries`` times with
  exponential backoff (``backoff * 2^attempt``, at most ``max_backoff`` s, plus up to 25% jitter; a
  ``Retry-After`` header is honoured). Other errors (400, 401, 404, ...) stop the run with a
  ``UserError`` naming the endpoint and the status.
- Cache: with ``cache_dir``, every response is stored (atomically) as soon as it arrives, under a hash
  of the model name, messages, sampling parameters and sample index (not the URL: the same model moved
  to another server keeps its cache), and a cached request is never sent again: an interrupted run
  loses nothing.

Completions carry ``text`` and ``finish_reason`` (``stop`` or ``length``); ``token_ids`` and
``logprobs`` are empty (an API does not share the tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from posttrain.atomic import write_json
from posttrain.errors import UserError
from posttrain.inference.engine import Completion, SamplingParams, progress_bar

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIEngine:
    def __init__(self, model: str, base_url: str, api_key: str | None = None, concurrency: int = 8,
                 max_retries: int = 6, timeout: float = 120.0, backoff: float = 0.5, max_backoff: float = 30.0,
                 cache_dir: str | Path | None = None):
        from openai import OpenAI

        self.model, self.base_url = model, base_url.rstrip("/")
        self.client = OpenAI(base_url=self.base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                             max_retries=0, timeout=timeout)
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}
        self._lock = threading.Lock()
        self.progress: str | None = None  # a label: show a progress bar (see posttrain.inference.engine)

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> "OpenAIEngine":
        """``openai:<model>@<base_url>``, the form data commands take."""
        body = spec.removeprefix("openai:")
        model, sep, url = body.partition("@")
        if not spec.startswith("openai:") or not sep or not model or not url:
            raise UserError(f"engine {spec!r}: expected openai:<model>@<base_url>")
        return cls(model, url, **kwargs)

    def generate(self, prompts: list, sampling: SamplingParams | None = None) -> list[Completion]:
        sampling = sampling or SamplingParams()
        jobs = [(i, j, self._messages(p)) for i, p in enumerate(prompts) for j in range(sampling.n)]
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        bar = progress_bar(self.progress, len(jobs))
        try:
            futures = [pool.submit(self._one, i, j, messages, sampling) for i, j, messages in jobs]
            for f in as_completed(futures):
                f.result()
                bar.update(1)
            return [f.result() for f in futures]
        finally:  # on an error, requests not started yet are dropped; finished ones are in the cache
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _messages(prompt) -> list[dict]:
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return prompt
        raise UserError("an OpenAI-compatible engine takes chat messages or strings, not token ids")

    def _request(self, messages: list[dict], sampling: SamplingParams, sample: int) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed + sample}
        if sampling.stop:
            body["stop"] = sampling.stop
        if sampling.top_k:
            body["extra_body"] = {"top_k": sampling.top_k}
        return body

    def _cache_path(self, body: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def _one(self, index: int, sample: int, messages: list[dict], sampling: SamplingParams) -> Completion:
        body = self._request(messages, sampling, sample)
        path = self._cache_path(body)
        if path is not None and path.is_file():
            with self._lock:
                self.stats["cache_hits"] += 1
            got = json.loads(path.read_text())
        else:
            got = self._send(body)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, got)
        return Completion(text=got["text"], token_ids=[], finish_reason=got["finish_reason"], prompt_index=index)

    def _send(self, body: dict) -> dict:
        import openai

        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.stats["requests"] += 1
            wait = None
            try:
                r = self.client.chat.completions.create(**body)
                choice = r.choices[0]
                return {"text": choice.message.content or "",
                        "finish_reason": "length" if choice.finish_reason == "length" else "stop"}
            except openai.APIStatusError as e:
                if e.status_code not in RETRYABLE_STATUS:
                    raise UserError(f"{self.base_url}: HTTP {e.status_code} for model {self.model!r}: "
                                    f"{str(e.message)[:200]}") from None
                error = f"HTTP {e.status_code}"
                retry_after = e.response.headers.get("retry-after") if e.response is not None else None
                if retry_after:
                    try:
                        wait = min(float(retry_after), self.max_backoff)
                    except ValueError:
                        wait = None
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                error = type(e).__name__
            except (openai.APIResponseValidationError, ValueError, AttributeError, IndexError, TypeError) as e:
                error = f"malformed response: {type(e).__name__}"  # a 200 whose body is not a completion
            if attempt == self.max_retries:
                raise UserError(f"{self.base_url}: gave up after {self.max_retries + 1} attempts ({error})")
            with self._lock:
                self.stats["retries"] += 1
            delay = wait if wait is not None else min(self.backoff * 2 ** attempt, self.max_backoff)
            time.sleep(delay * (1 + 0.25 * random.random()))
        raise AssertionError("unreachable")
