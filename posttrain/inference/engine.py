"""The generation interface: ``Engine.generate(prompts, sampling) -> list[Completion]``.

``TransformersEngine`` is the local engine. A prompt is a list of chat messages (rendered with the
tokenizer's chat template and its generation prompt), a plain string (used as is) or a list of token ids. Prompts are
sorted by length and cut into batches of ``batch_size`` (less padding), left-padded, and decoded by
``StaticDecoder`` (a preallocated KV cache, see static_decoder.py; each distinct prompt of a batch is
prefilled once, however many samples it has) for Llama-family models, or by
``model.generate`` for any other model; results come back in prompt order. Generation ends at the
tokenizer's stop ids (``chat.stop_token_ids``), at the end of one of ``SamplingParams.stop`` strings
(the text is cut before it), or after ``max_new_tokens``. With ``n > 1`` the result holds ``n``
completions per prompt, prompt-major.

Sampling follows ``generate``: logits / temperature, then top-k, then top-p (nucleus: the smallest
set of tokens whose probability reaches ``top_p``), then a draw. ``temperature = 0`` is greedy. The
draws of a completion come from its own stream of uniforms, seeded by ``(SamplingParams.seed, the
prompt's tokens, its occurrence among equal prompts of the call, the sample index)``: a completion
does not depend on which other prompts share the call or the batch (as vLLM's per-request seeds), so
a batch split across processes samples what one process would (for the static decoder; other models
draw through ``model.generate`` from a generator seeded with ``seed``). The global RNG is left alone.

``Completion.logprobs[k]`` is the log-probability of ``token_ids[k]`` under the model's
distribution at the sampling temperature (``log_softmax(logits / T)``, ``T = 1`` for greedy),
before top-k/top-p truncation: the quantity RL needs as the "old" policy's log-probs. The static
decoder computes them while decoding; after ``model.generate`` one forward over prompt + completion
does (keeping every step's logits would take ``steps x vocab`` floats per row).

The public interface every engine offers (what budget forcing, evaluation and rollouts use):
``generate(prompts, sampling)``, ``encode(prompt) -> token ids``, ``tokenizer``, ``stop_ids``, and
``progress``: a label, or None; with a label every ``generate`` call shows a progress bar with an ETA
on stderr (evaluation, test-time scaling and the data commands set one; RL rollouts do not).
The local engine also offers ``next_token_logprobs(prompts, token_ids)`` (Self-RAG's reflection-token
probabilities).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.data import chat
from posttrain.inference import static_decoder


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    n: int = 1
    seed: int = 0
    stop: list[str] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # ends with the stop token when generation stopped on one
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens)
    prompt_index: int = 0
    logprobs: list[float] = field(default_factory=list, repr=False)


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A prompt's token ids: chat messages rendered with the chat template and its generation prompt,
    a plain string as is, token ids unchanged."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return list(prompt)
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return chat.prompt_ids(tokenizer, prompt)


def completion_seed(seed: int, prompt_ids: list[int], occurrence: int, sample: int) -> int:
    """The seed of one completion's stream of uniforms (see the module docstring)."""
    key = hashlib.sha256(json.dumps([seed, list(prompt_ids), occurrence, sample]).encode()).digest()
    return int.from_bytes(key[:8], "little") >> 1


def completion_requests(tokenizer, prompts: list, sampling: SamplingParams) -> list[tuple[int, list[int], int]]:
    """One ``(prompt index, prompt token ids, seed)`` per completion to draw: ``sampling.n`` per prompt,
    each with its own ``completion_seed`` (every engine samples the same completions' streams)."""
    out, seen = [], Counter()
    for i, p in enumerate(prompts):
        ids = encode_prompt(tokenizer, p)
        occurrence = seen[tuple(ids)]
        seen[tuple(ids)] += 1
        out.extend((i, ids, completion_seed(sampling.seed, ids, occurrence, j)) for j in range(sampling.n))
    return out


def progress_bar(label: str | None, total: int):
    """A tqdm bar (count, rate, ETA) on stderr labelled ``label``; a silent one when ``label`` is None."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="completion", disable=label is None, dynamic_ncols=True)


def truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with the tokens outside top-k and outside the top-p nucleus set to ``-inf``."""
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        scaled = scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scaled


FINISHED = -1  # the token slot of a row that has already stopped


class TransformersEngine:
    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.progress: str | None = None
        self.stop_ids = chat.stop_token_ids(tokenizer)
        self._packed: dict = {}

    @classmethod
    def load(cls, path: str, batch_size: int = 8) -> "TransformersEngine":
        """The engine for a model directory (or anything ``posttrain.models`` loads), in eval mode."""
        from posttrain.models import load_model, load_tokenizer

        return cls(load_model(path).eval(), load_tokenizer(path), batch_size=batch_size)

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    @property
    def max_model_len(self) -> int | None:
        """The longest prompt plus completion the model's positions allow."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def generate(self, prompts: list, sampling: SamplingParams | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Completions in request order (``n`` per prompt). ``on_text(j, delta)`` receives the new text of
        completion ``j`` as it is decoded (token by token on the static decoder; in one piece otherwise;
        not at all for a stop string's overshoot: the final ``text`` is authoritative)."""
        sampling = sampling or SamplingParams()
        requests = completion_requests(self.tokenizer, prompts, sampling)
        encoded, keys = [(i, ids) for i, ids, _ in requests], [seed for _, _, seed in requests]
        order = sorted(range(len(encoded)), key=lambda j: (len(encoded[j][1]), j))
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator(device=self.model.device).manual_seed(sampling.seed)
        results: list[Completion | None] = [None] * len(encoded)
        # weights packed for the decode steps once per call: they may have been trained since the last one
        # (an in-place fused optimizer step does not even bump the parameters' version counters)
        self._packed = static_decoder.pack_linears(self.model, min(self.batch_size, len(encoded)))
        bar = progress_bar(self.progress, len(encoded))
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                stream = self._streamer(chunk, on_text) if on_text is not None else None
                new, logprobs = self._batch([encoded[j][1] for j in chunk], sampling, generator, [keys[j] for j in chunk],
                                            stream)
                for r, j in enumerate(chunk):
                    results[j] = self._completion(new[r], logprobs[r], encoded[j][0], sampling.stop)
                bar.update(len(chunk))
        finally:
            bar.close()
            self.model.train(was_training)
            self._packed = {}
        return results

    @torch.no_grad()
    def next_token_logprobs(self, prompts: list, token_ids: list[int]) -> list[list[float]]:
        """``log p(t | prompt)`` for each ``t`` of ``token_ids``, at the position after each prompt
        (temperature 1): one forward per batch, the output head at the last position only."""
        was_training = self.model.training
        self.model.eval()
        out: list[list[float]] = []
        try:
            for start in range(0, len(prompts), self.batch_size):
                input_ids, attention = self._left_padded([self.encode(p) for p in prompts[start:start + self.batch_size]])
                positions = (attention.cumsum(1) - 1).clamp(min=0)
                logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                    logits_to_keep=1).logits[:, -1].float()
                out += torch.log_softmax(logits, -1)[:, token_ids].tolist()
        finally:
            self.model.train(was_training)
        return out

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, ids in enumerate(prompts):
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            attention[r, width - len(ids):] = 1
        return input_ids.to(self.model.device), attention.to(self.model.device)

    def _streamer(self, chunk: list[int], on_text: Callable[[int, str], None]) -> Callable[[torch.Tensor], None]:
        """A callback for the tokens decoded so far (``[rows, steps]``): the new text of each row, to
        ``on_text`` (held back while it ends in an incomplete character)."""
        sent = [""] * len(chunk)
        stops = set(self.stop_ids)

        def stream(history: torch.Tensor) -> None:
            for r, j in enumerate(chunk):
                ids = [t for t in history[r].tolist() if t >= 0 and t not in stops]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if len(text) > len(sent[r]) and text.startswith(sent[r]) and not text.endswith("\ufffd"):
                    on_text(j, text[len(sent[r]):])
                    sent[r] = text

        return stream

    def _batch(self, prompts: list[list[int]], sampling: SamplingParams, generator, keys: list[int],
               stream: Callable[[torch.Tensor], None] | None = None) -> tuple[list, list]:
        width = max(len(ids) for ids in prompts)
        if static_decoder.supports(self.model, width + sampling.max_new_tokens):
            distinct: dict[tuple, int] = {}
            rows = torch.tensor([distinct.setdefault(tuple(ids), len(distinct)) for ids in prompts])
            input_ids, attention = self._left_padded([list(ids) for ids in distinct])
            uniforms = None
            if sampling.temperature > 0:
                uniforms = torch.stack([torch.rand(sampling.max_new_tokens, dtype=torch.float64,
                                                   generator=torch.Generator().manual_seed(k)) for k in keys])
            return self._decode_static(input_ids, attention, sampling, uniforms, rows.to(self.model.device), stream)
        new, logprobs = self._decode_generate(*self._left_padded(prompts), sampling, generator)
        if stream is not None and not sampling.stop:
            stream(torch.tensor([row + [FINISHED] * (max(map(len, new)) - len(row)) for row in new]))
        return new, logprobs

    def _decode_static(self, input_ids, attention, sampling: SamplingParams, uniforms, rows,
                       stream: Callable[[torch.Tensor], None] | None = None) -> tuple[list, list]:
        B = rows.shape[0]
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        stop_ids = torch.tensor(self.stop_ids, device=input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        steps: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        longest_stop = max((len(s) for s in sampling.stop), default=0)

        def pick(logits: torch.Tensor):
            scaled = logits / temperature
            if sampling.temperature > 0:  # inverse CDF at each completion's own uniform
                cdf = truncate(scaled, sampling.top_k, sampling.top_p).softmax(-1).double().cumsum(-1)
                u = uniforms[:, len(steps)].to(cdf.device)[:, None] * cdf[:, -1:]
                tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
            else:
                tokens = logits.argmax(-1)
            logprobs.append(torch.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(1))
            tokens = tokens.masked_fill(done, FINISHED)
            steps.append(tokens)
            done.logical_or_(torch.isin(tokens, stop_ids))
            if stream is not None and not longest_stop:  # with stop strings the text may still be cut
                stream(torch.stack(steps, 1))
            if longest_stop:
                history = torch.stack(steps, 1)
                for r in (~done).nonzero().flatten().tolist():
                    tail = self.tokenizer.decode(history[r, -(longest_stop + 2):].tolist(), skip_special_tokens=True)
                    if any(s in tail for s in sampling.stop):
                        done[r] = True
            return tokens, done

        new = static_decoder.StaticDecoder(self.model, self._packed).decode(
            input_ids, attention, sampling.max_new_tokens, pick, rows)
        return new.tolist(), torch.stack(logprobs, 1).tolist()

    def _decode_generate(self, input_ids, attention, sampling: SamplingParams, generator) -> tuple[list, list]:
        if sampling.temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            kwargs = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k or None)
        else:
            kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
        sequences = self.model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=sampling.max_new_tokens,
                                        eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **kwargs)
        new = sequences[:, input_ids.shape[1]:]
        # generate pads a row after its stop token: mark those slots finished (a sampled pad id stays a token)
        stops = torch.isin(new, torch.tensor(self.stop_ids, device=new.device)).long()
        new = new.masked_fill((stops.cumsum(1) - stops) > 0, FINISHED)
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        return new.tolist(), self._scored(input_ids, attention, new, temperature).tolist()

    @torch.no_grad()
    def _scored(self, input_ids, attention, new, temperature: float) -> torch.Tensor:
        """The log-probs of the ``new`` tokens (``[B, steps]``, 0 on finished slots) from one forward over
        prompt + completion, rather than logits kept at every step of ``generate`` (``[B, steps, vocab]``:
        17 GB for 32 x 512 tokens of a 262k vocabulary); the head runs chunked (posttrain.logprobs)."""
        from posttrain.logprobs import IGNORE, TokenLogProbs

        live = new != FINISHED
        ids = torch.cat([input_ids, new.masked_fill(~live, self.pad_id)], 1)
        keys = torch.cat([attention, live.long()], 1)  # a padding mask: the model adds causal and sliding windows
        labels = torch.full_like(ids, IGNORE)
        labels[:, input_ids.shape[1]:] = new.masked_fill(~live, IGNORE)
        positions = (keys.cumsum(1) - 1).clamp(min=0)
        logp = TokenLogProbs(self.model, temperature)(ids, positions, labels, attention_mask=keys)
        return logp[:, input_ids.shape[1] - 1:]

    def _completion(self, new: list[int], logprobs: list[float], prompt_index: int, stops: list[str]) -> Completion:
        """The sampled tokens up to and including the first stop id (as vLLM returns them: a trainer
        needs the end-of-turn token to teach stopping), or up to the ``FINISHED`` slots after a row that
        stopped on a stop string. The text leaves the stop token out and is cut before the first stop
        string; the tokens keep everything sampled, so their log-probs stay aligned."""
        end = next((j for j, t in enumerate(new) if t in self.stop_ids or t == FINISHED), None)
        stopped_on_token = end is not None and new[end] in self.stop_ids
        tokens = new if end is None else new[:end + 1] if stopped_on_token else new[:end]
        text = self.tokenizer.decode(new[:end] if end is not None else new, skip_special_tokens=True)
        reason = "length" if end is None else "stop"
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return Completion(text=text, token_ids=tokens, finish_reason=reason, prompt_index=prompt_index,
                          logprobs=logprobs[:len(tokens)])
