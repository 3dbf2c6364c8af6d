"""s1's budget forcing: control how long a model thinks, at test time.

The response is ``think_start`` + thinking + ``think_end`` + ``answer_prefix`` + answer. Thinking is
generated with the engine in rounds, each stopping at ``think_end`` (a string), at an end-of-turn
token, or at the remaining budget:

- ``max_thinking_tokens``: the thinking segment never exceeds this many tokens. When a round reaches
  it, thinking stops there and ``think_end`` + ``answer_prefix`` are appended ("forced stop").
- ``min_thinking_tokens`` / ``num_wait``: when the model ends thinking (writes ``think_end`` or an
  end-of-turn token) before it has thought ``min_thinking_tokens`` tokens, or before ``num_wait``
  extensions were made, the end is suppressed (its tokens dropped) and ``wait`` is appended instead;
  thinking continues. ``num_wait`` extensions are made whenever the model tries to stop, s1's "Wait"
  scaling.
- then ``think_end`` + ``answer_prefix`` and the answer (up to ``max_answer_tokens``).

Counts are in tokens of the thinking segment: the model's own tokens plus the inserted ``wait``
tokens (reported apart as well). When ``think_end`` is not a single token, the tokens that spell it
(and any partial prefix of it at the end of the thinking) are removed from the thinking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.inference.engine import SamplingParams


@dataclass
class BudgetForcing:
    think_start: str = "<think>"
    think_end: str = "</think>"
    answer_prefix: str = "\nFinal Answer:"
    max_thinking_tokens: int | None = None
    min_thinking_tokens: int = 0
    num_wait: int = 0
    wait: str = "Wait"
    max_answer_tokens: int = 64


@dataclass
class ForcedCompletion:
    text: str  # everything after the prompt: think_start, thinking, think_end, answer_prefix, answer
    thinking: str
    answer: str
    thinking_tokens: int  # tokens of the thinking segment (model tokens + inserted waits)
    waits: int  # extensions made
    forced_stop: bool  # thinking was cut at max_thinking_tokens
    prompt_index: int = 0
    answer_finish_reason: str = "stop"
    thinking_ids: list[int] = field(default_factory=list, repr=False)


def strip_delimiter(tokens: list[int], delimiter: str, tokenizer) -> list[int]:
    """``tokens`` up to where ``delimiter`` begins in their text (the delimiter's own tokens, and a
    token that holds text before it together with part of it, removed)."""
    for j in range(len(tokens)):
        if delimiter in tokenizer.decode(tokens[:j + 1]):
            break
    else:
        return tokens
    i = j
    while i > 0 and tokenizer.decode(tokens[i:j + 1]).find(delimiter) < 0:
        i -= 1
    return tokens[:i]


def generate(engine, prompts: list, bf: BudgetForcing, sampling: SamplingParams | None = None) -> list[ForcedCompletion]:
    """Budget-forced completions of ``prompts`` (chat messages, strings or token ids), one per prompt
    and per ``sampling.n`` sample."""
    sampling = sampling or SamplingParams()
    tok = engine.tokenizer
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    start, wait_ids = encode(bf.think_start) if bf.think_start else [], encode(bf.wait)
    states = [{"prompt": engine.encode(p), "index": i, "thinking": [], "waits": 0, "model_tokens": 0, "forced": False}
              for i, p in enumerate(prompts) for _ in range(sampling.n)]
    active = list(states)
    round_ = 0
    while active:
        budget = [None if bf.max_thinking_tokens is None else bf.max_thinking_tokens - len(s["thinking"]) for s in active]
        longest = max((b for b in budget if b is not None), default=sampling.max_new_tokens)
        params = SamplingParams(max_new_tokens=max(1, longest), temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k, seed=sampling.seed + 7919 * round_, stop=[bf.think_end])
        outs = engine.generate([s["prompt"] + start + s["thinking"] for s in active], params)
        round_ += 1
        still = []
        for s, out, b in zip(active, outs, budget):
            ids = strip_delimiter([t for t in out.token_ids if t not in engine.stop_ids], bf.think_end, tok)
            ended = out.finish_reason == "stop"
            if b is not None and len(ids) >= b:
                s["thinking"] += ids[:b]
                s["model_tokens"] += b
                s["forced"] = True
                continue
            s["thinking"] += ids
            s["model_tokens"] += len(ids)
            if not ended:  # stopped by the engine's own length limit with no budget: treat as done
                continue
            if s["waits"] < bf.num_wait or len(s["thinking"]) < bf.min_thinking_tokens:
                room = None if bf.max_thinking_tokens is None else bf.max_thinking_tokens - len(s["thinking"])
                if room is not None and room <= len(wait_ids):
                    s["forced"] = True
                    continue
                s["thinking"] += wait_ids
                s["waits"] += 1
                still.append(s)
        active = still
    tail = encode(bf.think_end + bf.answer_prefix)
    answers = engine.generate([s["prompt"] + start + s["thinking"] + tail for s in states],
                              SamplingParams(max_new_tokens=bf.max_answer_tokens, temperature=sampling.temperature,
                                             top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed + 1))
    out = []
    for s, a in zip(states, answers):
        thinking = tok.decode(s["thinking"], skip_special_tokens=True)
        out.append(ForcedCompletion(
            text=f"{bf.think_start}{thinking}{bf.think_end}{bf.answer_prefix}{a.text}", thinking=thinking, answer=a.text,
            thinking_tokens=len(s["thinking"]), waits=s["waits"], forced_stop=s["forced"], prompt_index=s["index"],
            answer_finish_reason=a.finish_reason, thinking_ids=s["thinking"]))
    return out
