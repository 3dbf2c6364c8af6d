"""The generation interface: ``Engine.generate(prompts, sampling) -> list[Completion]``.

``TransformersEngine`` is the local engine: batched, left-padded, KV-cached ``model.generate``.
A prompt is a list of chat messages (rendered with the tokenizer's chat template and its
generation prompt) or a plain string (used as is). Generation ends at the tokenizer's stop ids
(``chat.stop_token_ids``), at the end of one of ``SamplingParams.stop`` strings (the text is cut
before it), or after ``max_new_tokens``. With ``n > 1`` the result holds ``n`` completions per
prompt, prompt-major.

``Completion.logprobs[k]`` is the log-probability of ``token_ids[k]`` under the model's
distribution at the sampling temperature (``log_softmax(logits / T)``, ``T = 1`` for greedy),
before top-k/top-p truncation: the quantity RL needs as the "old" policy's log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.data import chat


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
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens)
    prompt_index: int = 0
    logprobs: list[float] = field(default_factory=list, repr=False)


class TransformersEngine:
    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = chat.stop_token_ids(tokenizer)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return chat.prompt_ids(self.tokenizer, prompt)

    @torch.no_grad()
    def generate(self, prompts: list, sampling: SamplingParams | None = None) -> list[Completion]:
        sampling = sampling or SamplingParams()
        encoded = [(i, self._encode(p)) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        was_training = self.model.training
        self.model.eval()
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        out: list[Completion] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            width = max(len(ids) for _, ids in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (_, ids) in enumerate(chunk):
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                attention[r, width - len(ids):] = 1
            if sampling.temperature > 0:
                kwargs = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                              top_k=sampling.top_k or None)
            else:
                kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            if sampling.stop:
                kwargs.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
            gen = self.model.generate(input_ids=input_ids.to(self.model.device), attention_mask=attention.to(self.model.device),
                                      max_new_tokens=sampling.max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=pad, output_logits=True, return_dict_in_generate=True, **kwargs)
            logits = torch.stack(gen.logits, dim=1).float() / temperature  # [B, new, V]
            new_tokens = gen.sequences[:, width:]
            token_logprobs = torch.log_softmax(logits, -1).gather(-1, new_tokens[:, :logits.shape[1], None]).squeeze(-1)
            for r, (pi, _) in enumerate(chunk):
                out.append(self._completion(new_tokens[r].tolist(), token_logprobs[r].tolist(), pi, sampling.stop))
        self.model.train(was_training)
        return out

    def _completion(self, new: list[int], logprobs: list[float], prompt_index: int, stops: list[str]) -> Completion:
        """Tokens up to the first stop id (or the padding after a row that stopped early); the text
        also cut before the first stop string. The tokens keep what was sampled up to the point
        generation stopped (a stop string's own tokens included), so their log-probs stay aligned."""
        pad = self.tokenizer.pad_token_id
        end = next((j for j, t in enumerate(new) if t in self.stop_ids or t == pad), None)
        tokens = new if end is None else new[:end]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        reason = "length" if end is None else "stop"
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return Completion(text=text, token_ids=tokens, finish_reason=reason, prompt_index=prompt_index,
                          logprobs=logprobs[:len(tokens)])
