"""Rerankers: ``reranker(query, passages) -> scores`` (higher first), for OpenScholar's second stage.

- ``CrossEncoderReranker(model)``: a sentence-transformers cross-encoder scores each (query, passage)
  pair jointly (OpenScholar's reranker is one, fine-tuned from BGE).
- ``EngineReranker(engine)``: a language model asked whether the passage helps answer the question;
  the score is ``p(Yes) / (p(Yes) + p(No))`` at the answer's first token when the engine gives
  next-token probabilities (the local transformers engine), else 1 for a reply starting with yes, 0
  otherwise.
"""

from __future__ import annotations

import math

from posttrain.rag.selfrag import passage_text

PROMPT = ("Does the passage help answer the question? Answer Yes or No.\n\nQuestion: {query}\n\nPassage: {passage}")


class CrossEncoderReranker:
    def __init__(self, model: str, batch_size: int = 32):
        from sentence_transformers import CrossEncoder

        self.model, self.batch_size = CrossEncoder(model, device="cpu"), batch_size

    def __call__(self, query: str, passages: list[dict]) -> list[float]:
        if not passages:
            return []
        scores = self.model.predict([(query, passage_text(p)) for p in passages], batch_size=self.batch_size,
                                    show_progress_bar=False)
        return [float(s) for s in scores]


class EngineReranker:
    def __init__(self, engine):
        self.engine = engine

    def _prompts(self, query: str, passages: list[dict]) -> list[list[dict]]:
        return [[{"role": "user", "content": PROMPT.format(query=query, passage=passage_text(p))}] for p in passages]

    def __call__(self, query: str, passages: list[dict]) -> list[float]:
        if not passages:
            return []
        prompts = self._prompts(query, passages)
        if hasattr(self.engine, "next_token_logprobs"):
            tok = self.engine.tokenizer
            ids = [tok("Yes", add_special_tokens=False)["input_ids"][0], tok("No", add_special_tokens=False)["input_ids"][0]]
            out = []
            for yes, no in self.engine.next_token_logprobs(prompts, ids):
                top = max(yes, no)
                out.append(math.exp(yes - top) / (math.exp(yes - top) + math.exp(no - top)))
            return out
        from posttrain.inference.engine import SamplingParams

        replies = self.engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0))
        return [1.0 if r.text.strip().lower().startswith("yes") else 0.0 for r in replies]
