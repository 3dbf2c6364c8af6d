"""The generation interface: ``Engine.generate(prompts, sampling) -> list[Completion]``.

``TransformersEngine`` is the local engine: batched, left-padded, KV-cached ``model.generate``.
A prompt is a list of chat messages (rendered with the tokenizer's chat template and its
generation prompt) or a plain string (used as is). Generation stops at the tokenizer's stop ids
(``chat.stop_token_ids``) or after ``max_new_tokens``. With ``n > 1`` the result holds ``n``
completions per prompt, prompt-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data import chat


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1
    seed: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    prompt_index: int = 0


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
        out: list[Completion] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            width = max(len(ids) for _, ids in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (_, ids) in enumerate(chunk):
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                attention[r, width - len(ids):] = 1
            kwargs = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p) \
                if sampling.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            gen = self.model.generate(input_ids=input_ids.to(self.model.device), attention_mask=attention.to(self.model.device),
                                      max_new_tokens=sampling.max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=pad, **kwargs)
            for r, (pi, _) in enumerate(chunk):
                new = gen[r, width:].tolist()
                stop_at = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
                tokens = new if stop_at is None else new[:stop_at]
                out.append(Completion(text=self.tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens,
                                      finish_reason="length" if stop_at is None else "stop", prompt_index=pi))
        self.model.train(was_training)
        return out
