"""Rollouts from separately started vLLM servers (RLVR's ``vllm_servers: [URL, ...]``).

Each server is ``posttrain serve --model M --engine vllm --accept-weights --port P`` with an API key
(``POSTTRAIN_API_KEY``, which this client sends as its Bearer token), started on the same base model as the trainer (other processes or other machines). ``VLLMServers`` has the engine
interface (``generate``, ``encode``, ``tokenizer``, ``stop_ids``, ``progress``) plus ``load_weights``:

- **Requests.** Prompts are encoded here (the trainer's tokenizer and chat template); every
  completion gets its per-completion seed (``engine.completion_requests``), so what a
  completion is does not depend on which server draws it. The completions are cut into one
  contiguous share per live server and sent at once (``POST /posttrain/complete``).
- **Weights.** ``load_weights(model, version)`` sends the parameters as one safetensors file
  (``POST /posttrain/weights``, tied weights under every name) to every server, in parallel, before
  each step's rollouts. A server that was down and answers again gets the current weights and rejoins.
- **Failures.** A server that refuses, drops, times out or answers with an error during a push or a
  request is left out (a warning names it and why) and its share goes to the others. With none
  left the step stops with a one-line error; the run resumes from its last checkpoint when it is
  started again (rollouts are a function of the weights and the seeds, not of the server).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from posttrain.data import chat
from posttrain.errors import UserError
from posttrain.inference.engine import Completion, SamplingParams, completion_requests, encode_prompt
from posttrain.inference.api import KEY_ENV, ROLLOUT_SAMPLING
from posttrain.inference.vllm_engine import named_weights
from posttrain.util import log


class ServerFailed(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # an HTTP status, or None when the server did not answer


def refused(e: ServerFailed) -> bool:
    """A 4xx: the server is up and says the request is wrong; another server would say the same."""
    return e.status is not None and 400 <= e.status < 500


def call(url: str, route: str, body: bytes | None, timeout: float, headers: dict | None = None) -> dict:
    """One request to a server; the API key (``POSTTRAIN_API_KEY``), when set, as its Bearer token."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    if os.environ.get(KEY_ENV):
        headers["Authorization"] = f"Bearer {os.environ[KEY_ENV]}"
    request = urllib.request.Request(url.rstrip("/") + route, data=body, headers=headers,
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read())["error"]["message"]
        except Exception:
            detail = e.reason
        raise ServerFailed(f"HTTP {e.code}: {detail}", e.code) from None
    except (OSError, ValueError) as e:  # refused, reset, timed out, not JSON
        raise ServerFailed(str(e) or type(e).__name__) from None


def weights_file(model) -> bytes:
    """The parameters of a model (or ``(name, tensor)`` pairs) as safetensors bytes, tied ones under
    every name."""
    from safetensors.torch import save

    tensors, seen = {}, set()
    for name, t in named_weights(model):
        t = t.contiguous()
        if t.data_ptr() in seen:  # safetensors stores no shared memory
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    return save(tensors)


class VLLMServers:
    def __init__(self, urls: list[str], tokenizer, *, timeout: float = 600.0):
        if not urls:
            raise UserError("vllm_servers: give at least one server URL")
        self.urls, self.tokenizer, self.timeout = list(urls), tokenizer, timeout
        self.stop_ids = chat.stop_token_ids(tokenizer)
        self.progress: str | None = None
        self.live: list[str] = []
        self.version = 0
        for url in self.urls:
            try:
                info = call(url, "/health", None, 30.0)
            except ServerFailed as e:
                if e.status == 401:
                    raise UserError(f"vllm_servers: {url} refused the API key ({e}); set {KEY_ENV} to the servers' "
                                    "key") from None
                log(f"warning: vLLM server {url} does not answer ({e}); it joins when it does")
                continue
            if not info.get("rollouts"):
                raise UserError(f"vllm_servers: {url} is not a rollout server (start it with posttrain serve --engine vllm "
                                "--accept-weights)")
            if info.get("vocab_size") != len(tokenizer):
                raise UserError(f"vllm_servers: {url} serves a model with {info.get('vocab_size')} tokens, the trainer's "
                                f"tokenizer has {len(tokenizer)}")
            self.live.append(url)
        if not self.live:
            raise UserError(f"vllm_servers: none of {', '.join(self.urls)} answers at /health")

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def _drop(self, url: str, why: str) -> None:
        if url in self.live:
            self.live.remove(url)
            log(f"warning: vLLM server {url} left out ({why}); {len(self.live)} left")

    def _none_left(self) -> UserError:
        return UserError(f"vllm_servers: no server left of {', '.join(self.urls)}; restart them and run the same "
                         "command again: the run resumes from its last checkpoint")

    def load_weights(self, model, version: int | None = None) -> None:
        """Push the weights to every server (down ones too: one that answers again rejoins)."""
        self.version = self.version + 1 if version is None else version
        body = weights_file(model)
        headers = {"Content-Type": "application/octet-stream", "X-Weights-Version": str(self.version)}

        def push(url):
            try:
                call(url, "/posttrain/weights", body, self.timeout, headers)
                return url, None
            except ServerFailed as e:
                if refused(e):
                    raise UserError(f"vllm_servers: {url} refused the weights ({e})") from None
                return url, str(e)

        with ThreadPoolExecutor(len(self.urls)) as pool:
            results = list(pool.map(push, self.urls))
        for url, error in results:
            if error is None and url not in self.live:
                log(f"vLLM server {url} answers again and has the weights of version {self.version}: it rejoins")
                self.live.append(url)
            elif error is not None:
                self._drop(url, f"weight push: {error}")
        self.live.sort(key=self.urls.index)
        if not self.live:
            raise self._none_left()

    def generate(self, prompts: list, sampling: SamplingParams | None = None) -> list[Completion]:
        sampling = sampling or SamplingParams()
        requests = completion_requests(self.tokenizer, prompts, sampling)
        given = {key: getattr(sampling, key) for key in ROLLOUT_SAMPLING}
        results: list[Completion | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        while todo:
            if not self.live:
                raise self._none_left()
            k = len(self.live)
            shares = [(url, todo[len(todo) * s // k:len(todo) * (s + 1) // k]) for s, url in enumerate(self.live)]

            def send(share):
                url, idx = share
                if not idx:
                    return url, idx, [], None
                body = json.dumps({"prompts": [requests[i][1] for i in idx], "seeds": [requests[i][2] for i in idx],
                                   "sampling": given}).encode()
                try:
                    out = call(url, "/posttrain/complete", body, self.timeout)
                    if len(out.get("completions", [])) != len(idx):
                        raise ServerFailed(f"{len(out.get('completions', []))} completions for {len(idx)} prompts")
                    return url, idx, out["completions"], None
                except ServerFailed as e:
                    if refused(e):
                        raise UserError(f"vllm_servers: {url} refused the rollout request ({e})") from None
                    return url, idx, [], str(e)
                except (KeyError, TypeError) as e:
                    return url, idx, [], f"malformed answer ({e!r})"

            with ThreadPoolExecutor(k) as pool:
                answers = list(pool.map(send, shares))
            todo = []
            for url, idx, outs, error in answers:
                if error is not None:
                    self._drop(url, f"rollouts: {error}")
                    todo.extend(idx)
                    continue
                for i, o in zip(idx, outs):
                    results[i] = Completion(text=o["text"], token_ids=o["token_ids"], finish_reason=o["finish_reason"],
                                            prompt_index=requests[i][0], logprobs=o["logprobs"])
            todo.sort()
        return results  # type: ignore[return-value]
