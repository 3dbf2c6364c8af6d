"""Self-RAG's critique-guided decoding (Asai et al., 2024, section 3.3).

An answer is written segment by segment, at most ``max_segments``. For each of the ``beam`` best
partial answers ``y`` of an instruction ``x``, at each step:

1. **End or go on.** Over ``[Retrieval]``, ``[No Retrieval]``, ``[Continue to Use Evidence]``, the
   utility tokens and end of turn, the most likely next token ends the answer when it is a utility
   token or end of turn (not before the first segment).
2. **Retrieve or not.** ``mode="adaptive"`` retrieves when
   ``p([Retrieval]) / (p([Retrieval]) + p([No Retrieval])) > threshold``; ``always`` and ``never``
   force it. The query is ``x`` for the first segment and ``x`` + the answer so far after it; when
   it finds no passage, the segment is written without one.
3. **Segments.** Without retrieval, one greedy segment after ``[No Retrieval]`` (or
   ``[Continue to Use Evidence]`` once evidence was read). With retrieval, ``k`` segments in parallel,
   the ``i``-th a greedy continuation of ``y [Retrieval]<paragraph>d_i</paragraph>``. A segment ends at
   a support, utility or retrieval token, end of turn, or ``max_segment_tokens``. Its score::

       S = exp(mean log p(segment tokens)) + w_rel * s_rel + w_sup * s_sup + w_use * s_use
       s_rel = p([Relevant]) / (p([Relevant]) + p([Irrelevant]))                  after the passage
       s_sup = (p(full) + 0.5 p(partial)) / (p(full) + p(partial) + p(no support))  after the segment
       s_use = sum_u c_u p([Utility:u]) / sum_u p([Utility:u]),  c = (-1, -0.5, 0, 0.5, 1)
                                                                   after the most likely support token

   (the terms of Self-RAG's ``run_short_form``; without retrieval only the first and last terms).
   The segment is followed by its most likely support token (after a passage).
4. **Beam.** The candidates of every beam of an instruction are ranked by the mean score of their
   segments; the best ``beam`` go on. Finished answers stay in the ranking.

The result per instruction: ``text`` (reflection tokens and passages removed), ``raw`` (as
generated), ``retrieved`` (whether any segment retrieved), ``passages`` (the passage each retrieving
segment read, in order), ``score``. The engine must offer ``next_token_logprobs`` (the local
transformers engine does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from posttrain.errors import UserError
from posttrain.rag import selfrag as sr

UTILITY_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
SEGMENT_STOPS = [sr.RETRIEVAL, sr.NO_RETRIEVAL, sr.CONTINUE, *sr.SUPPORT.values(), *sr.UTILITY]


@dataclass
class Beam:
    instruction: int
    prefix: str  # prompt + everything generated so far, reflection tokens included
    answer: str = ""  # the segments' text only
    scores: list[float] = field(default_factory=list)
    passages: list[dict] = field(default_factory=list)
    evidence: bool = False
    finished: bool = False

    @property
    def score(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("-inf")


def normalized(logprobs: list[float]) -> list[float]:
    """Probabilities of a few candidate tokens renormalised among themselves."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return [w / sum(weights) for w in weights]


def support_score(p_full: float, p_partial: float, p_none: float) -> float:
    return (p_full + 0.5 * p_partial) / (p_full + p_partial + p_none)


def utility_score(probs: list[float]) -> float:
    return sum(c * p for c, p in zip(UTILITY_WEIGHTS, probs)) / sum(probs)


class SelfRAG:
    def __init__(self, engine, retriever, *, k: int = 3, mode: str = "adaptive", threshold: float = 0.2,
                 beam: int = 2, max_segments: int = 3, max_segment_tokens: int = 64, w_rel: float = 1.0,
                 w_sup: float = 1.0, w_use: float = 0.5):
        if mode not in ("adaptive", "always", "never"):
            raise UserError(f"--retrieval must be adaptive, always or never; got {mode!r}")
        if not hasattr(engine, "next_token_logprobs"):
            raise UserError("Self-RAG decoding reads reflection-token probabilities: use the local transformers engine")
        self.engine, self.retriever, self.k, self.mode, self.threshold = engine, retriever, k, mode, threshold
        self.beam, self.max_segments, self.max_segment_tokens = beam, max_segments, max_segment_tokens
        self.w = (w_rel, w_sup, w_use)
        tok = engine.tokenizer
        missing = [t for t in sr.TOKENS if t not in tok.get_vocab()]
        if missing:
            raise UserError(f"the model's vocabulary lacks Self-RAG's reflection tokens ({', '.join(missing[:3])}, ...): "
                            "train it with add_tokens: [selfrag]")
        self.ids = {t: tok.convert_tokens_to_ids(t) for t in sr.TOKENS}
        self.end_ids = list(engine.stop_ids)

    def _logprobs(self, prefixes: list[str], tokens: list[str]) -> list[list[float]]:
        return self.engine.next_token_logprobs(prefixes, [self.ids[t] for t in tokens]) if prefixes else []

    def answer(self, instructions: list[str]) -> list[dict]:
        from posttrain.data.chat import render

        prompts = [render(self.engine.tokenizer, [{"role": "user", "content": x}], add_generation_prompt=True)
                   for x in instructions]
        beams = [Beam(i, p) for i, p in enumerate(prompts)]
        for step in range(self.max_segments):
            live = [b for b in beams if not b.finished]
            if not live:
                break
            candidates = [b for b in beams if b.finished] + self._step(live, instructions, first=step == 0)
            beams = []
            for i in range(len(instructions)):
                mine = sorted((c for c in candidates if c.instruction == i), key=lambda c: -c.score)
                beams += mine[:self.beam]
        out = []
        for i in range(len(instructions)):
            best = max((b for b in beams if b.instruction == i), key=lambda b: b.score)
            out.append({"text": sr.strip_tokens(best.answer), "raw": best.prefix[len(prompts[i]):],
                        "retrieved": bool(best.passages), "passages": best.passages, "score": best.score})
        return out

    def _step(self, live: list[Beam], instructions: list[str], first: bool) -> list[Beam]:
        decision = [sr.RETRIEVAL, sr.NO_RETRIEVAL, sr.CONTINUE, *sr.UTILITY]
        lps = self._logprobs([b.prefix for b in live], decision)
        ends = self.engine.next_token_logprobs([b.prefix for b in live], self.end_ids) if not first else []
        out, jobs = [], []  # jobs: (beam, passage or None, prefix to continue)
        for j, b in enumerate(live):
            best = max(range(len(decision)), key=lambda t: lps[j][t])
            if not first and (decision[best] in sr.UTILITY or max(ends[j]) > lps[j][best]):
                use = sr.UTILITY[max(range(5), key=lambda u: lps[j][3 + u])]
                out.append(Beam(b.instruction, b.prefix + use, b.answer, b.scores, b.passages, b.evidence, True))
                continue
            p_ret = normalized(lps[j][:2])[0]
            hits = []
            if self.mode == "always" or (self.mode == "adaptive" and p_ret > self.threshold):
                x = instructions[b.instruction]
                hits = self.retriever.search(f"{x} {sr.strip_tokens(b.answer)}" if b.answer else x, k=self.k)
            for hit in hits:  # none found: the segment is written without a passage
                jobs.append((b, hit, f"{b.prefix}{sr.RETRIEVAL}{sr.OPEN}{sr.passage_text(hit)}{sr.CLOSE}"))
            if not hits:
                jobs.append((b, None, b.prefix + (sr.CONTINUE if b.evidence else sr.NO_RETRIEVAL)))
        return out + self._segments(jobs)

    def _segments(self, jobs: list[tuple]) -> list[Beam]:
        from posttrain.inference.engine import SamplingParams

        if not jobs:
            return []
        tok = self.engine.tokenizer
        rel = self._logprobs([prefix for b, hit, prefix in jobs if hit is not None], [sr.RELEVANT, sr.IRRELEVANT])
        outs = self.engine.generate([prefix for _, _, prefix in jobs],
                                    SamplingParams(max_new_tokens=self.max_segment_tokens, temperature=0.0,
                                                   stop=SEGMENT_STOPS))
        texts = [o.text for o in outs]
        sup = self._logprobs([p + t for (_, hit, p), t in zip(jobs, texts) if hit is not None], list(sr.SUPPORT.values()))
        sup_it, rel_it = iter(sup), iter(rel)
        after = []  # the prefix the utility probabilities are read at, per job
        support_tokens = []
        for (b, hit, prefix), text in zip(jobs, texts):
            token = ""
            if hit is not None:
                probs = normalized(next(sup_it))
                token = list(sr.SUPPORT.values())[max(range(3), key=lambda s: probs[s])]
                support_tokens.append((probs, token))
            after.append(prefix + text + token)
        use = self._logprobs(after, list(sr.UTILITY))
        w_rel, w_sup, w_use = self.w
        sup_it = iter(support_tokens)
        out = []
        for (b, hit, prefix), o, text, here, u in zip(jobs, outs, texts, after, use):
            n = max(len(o.token_ids), 1)
            score = math.exp(sum(o.logprobs) / n) + w_use * utility_score(normalized(u))
            tail = tok.decode(o.token_ids, skip_special_tokens=True)[len(text):]
            finished = o.finish_reason == "length" or not tail or tail.startswith(sr.UTILITY)
            segment = sr.strip_tokens(text)
            passages = b.passages
            if hit is not None:
                probs, token = next(sup_it)
                s_rel = normalized(next(rel_it))[0]
                score += w_rel * s_rel + w_sup * support_score(*probs)
                passages = b.passages + [hit]
            if finished and tail.startswith(sr.UTILITY):
                here += tail[:len(sr.UTILITY[0])]
            out.append(Beam(b.instruction, here, f"{b.answer} {segment}".strip(), b.scores + [score], passages,
                            b.evidence or hit is not None, finished))
        return out
