"""Multi-turn rollouts: episodes of an environment driven by any engine, as single token sequences.

``run_episodes(engine, env, records, sampling, max_turns, max_tokens)`` plays ``sampling.n`` episodes
per record (record-major, as ``Engine.generate``'s completions). Each turn, every episode still going
is one prompt of one ``engine.generate`` call (its whole token sequence so far, ``n = 1``; the
engine's per-completion seeds depend on those tokens and ``sampling.seed + turn``, so a run is
reproducible and an episode does not depend on the others of its call; the environment's steps of a
turn run in threads, each episode's in its own state). The model's tokens are kept
as sampled; the environment's answer is appended as the chat template renders it:

    ids  = prompt | model turn 1 | tail of turn 1 + tool turns + generation prompt | model turn 2 | ...
    mask =   --   |    1 ... 1   |                    0 ... 0                     |    1 ... 1   | ...

where the "tail" is what the template writes after the model's stop token (``"\\n"`` after ChatML's
``<|im_end|>``), found as the difference of two renderings (the template must be prefix-consistent).
An episode ends when the model answers without a tool call (``finish_reason`` ``stop``), when a turn
hits the token budget (``length``: ``max_tokens`` tokens after the prompt, tool tokens counted), or
after ``max_turns`` model turns without an answer (``turns``).

An ``Episode`` is a ``Completion`` (``text`` the final model turn, ``token_ids`` everything after the
prompt, ``logprobs`` the engine's for model tokens and 0 for the environment's), plus ``model_mask``,
the trajectory in record form (``messages``, tool calls as ``tool_calls``), the environment's reward
(None: the record's verifier scores ``text``), the summed per-turn ``shaping``, and counts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from posttrain.data import chat
from posttrain.data import tools as tool_format
from posttrain.envs.base import Environment
from posttrain.errors import UserError
from posttrain.inference.engine import Completion, SamplingParams


@dataclass
class Episode(Completion):
    model_mask: list[int] = field(default_factory=list, repr=False)
    messages: list[dict] = field(default_factory=list, repr=False)
    env_reward: float | None = None
    shaping: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    malformed: int = 0


@dataclass
class _Live:
    episode: Episode
    state: object
    tools: list[dict]
    prompt: list[int]
    conversation: list[dict]  # the messages as rendered so far (model turns as raw text)
    done: bool = False


def record_turn(text: str, tool_names: set[str] | None) -> dict:
    """A model turn in record form: ``tool_calls`` when every call in it can be read, else the raw text."""
    parsed = tool_format.parse_tool_calls(text, tool_names)
    if parsed.calls and all(c is not None for c in parsed.calls):
        return {"role": "assistant", "content": parsed.content, "tool_calls": tool_format.as_tool_calls(parsed.calls)}
    return {"role": "assistant", "content": text}


def continuation_ids(tokenizer, conversation: list[dict], text: str, stop_text: str, answer: list[dict],
                     tools: list[dict]) -> list[int]:
    """The tokens after a model turn (``text``, ended by ``stop_text``) that bring the conversation to the
    next generation prompt: the template's tail of the turn, the ``answer`` turns, the generation prompt."""
    before = chat.render(tokenizer, conversation, add_generation_prompt=True, tools=tools)
    turn = conversation + [{"role": "assistant", "content": text}]
    closed = chat.render(tokenizer, turn, tools=tools)
    after = chat.render(tokenizer, turn + answer, add_generation_prompt=True, tools=tools)
    if not (closed.startswith(before + text) and after.startswith(closed)):
        raise UserError("the chat template is not prefix-consistent (rendering more turns changes earlier text), so "
                        "an episode cannot continue its token sequence; set chat_template to chatml or tulu")
    tail = closed[len(before) + len(text):]
    if stop_text and tail.startswith(stop_text):
        tail = tail[len(stop_text):]  # the model wrote it already, as its stop token
    return tokenizer(tail + after[len(closed):], add_special_tokens=False)["input_ids"]


def run_episodes(engine, env: Environment, records: list[dict], sampling: SamplingParams, max_turns: int = 4,
                 max_tokens: int = 1024, workers: int = 8, tokenizer=None) -> list[Episode]:
    """``workers`` threads run the environment's steps of a turn (a sandboxed call waits on its process);
    ``tokenizer`` renders the conversation (default: the engine's; a trainer passes its own, which
    carries the run's chat template)."""
    tok = tokenizer or engine.tokenizer
    stop_ids = set(engine.stop_ids)
    live: list[_Live] = []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for i, rec in enumerate(records):
            for _ in range(sampling.n):
                start = env.reset(rec)
                prompt = chat.prompt_ids(tok, start.messages, start.tools)
                live.append(_Live(Episode("", [], "stop", prompt_index=i, messages=[dict(m) for m in start.messages]),
                                  start.state, start.tools, prompt, list(start.messages)))
        names = {id(x): {t["function"]["name"] for t in x.tools} or getattr(env, "tool_names", None) for x in live}
        for turn in range(max_turns):
            going = [x for x in live if not x.done]
            if not going:
                break
            # each episode is cut to its own room afterwards: its first tokens do not depend on the others'
            room = [max_tokens - len(x.episode.token_ids) for x in going]
            outs = engine.generate([x.prompt + x.episode.token_ids for x in going],
                                   replace(sampling, n=1, seed=sampling.seed + turn,
                                           max_new_tokens=max(1, min(sampling.max_new_tokens, max(room)))))
            list(pool.map(lambda job: _advance(*job, env, tok, stop_ids, names[id(job[0])], turn == max_turns - 1),
                          zip(going, outs, room)))
        for x in live:
            if not x.done:
                x.episode.finish_reason = "turns"
    finally:
        pool.shutdown()
        for x in live:
            env.close(x.state)
    return [x.episode for x in live]


def _advance(x: _Live, out: Completion, room: int, env: Environment, tok, stop_ids: set[int], names: set[str],
             last: bool) -> None:
    """One model turn of one episode: keep its tokens (cut to the episode's budget), then the
    environment's answer or the end."""
    ep = x.episode
    ids, logps = out.token_ids[:room], out.logprobs[:room]
    ep.token_ids += ids
    ep.logprobs += list(logps) + [0.0] * (len(ids) - len(logps))
    ep.model_mask += [1] * len(ids)
    ep.turns += 1
    ep.text = out.text
    stopped = out.finish_reason == "stop" and len(ids) == len(out.token_ids)
    ep.messages.append(record_turn(out.text, names))
    if not stopped:  # the budget ended the turn
        x.done, ep.finish_reason = True, "length"
        return
    step = env.step(x.state, out.text)
    ep.shaping += step.shaping
    for key in ("tool_calls", "tool_errors", "malformed"):
        setattr(ep, key, getattr(ep, key) + step.info.get(key, 0))
    if step.done:
        x.done, ep.finish_reason, ep.env_reward = True, "stop", step.reward
        return
    ep.messages += step.messages
    if last:
        return
    stop_text = tok.decode([ids[-1]]) if ids and ids[-1] in stop_ids else ""
    more = continuation_ids(tok, x.conversation, out.text, stop_text, step.messages, x.tools)
    x.conversation += [{"role": "assistant", "content": out.text}] + step.messages
    if len(more) >= room - len(ids):
        x.done, ep.finish_reason = True, "length"  # no room left for another model turn
        return
    ep.token_ids += more
    ep.logprobs += [0.0] * len(more)
    ep.model_mask += [0] * len(more)
