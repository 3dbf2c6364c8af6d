"""The environment interface: an episode is model turns, tool calls and tool results.

``reset(record) -> Start(messages, tools, state)``: the prompt turns the model first sees, the tools it
may call (JSON schemas, rendered by the chat template: posttrain.data.tools) and the episode's state.
``step(state, text) -> Step(messages, done, reward, shaping, info)``: ``text`` is the model's turn; the
answer is the ``tool`` turns that come back (``messages``), or ``done`` when the model answered
without a call. ``reward`` is the environment's own final reward, or None when the record's verifier
scores the final answer (``Verifier(text, ground_truth)``, as in single-turn RLVR). ``shaping`` is an
optional per-turn term (a penalty for a malformed call or a tool error). ``close(state)`` frees what
the episode held (a sandbox process).

``ToolEnv`` is the common case: tools are functions ``call(state, name, arguments) -> str``; every call
of a turn runs in order; a call that cannot be read (posttrain.data.tools.parse_tool_calls) or names an
unknown tool is answered with an error turn, and a tool that raises ``ToolError`` (or any exception)
answers with its message: a model's output never stops the run. The environment knows nothing of
training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

from posttrain.data import tools as tool_format


class ToolError(Exception):
    """A tool's failure, shown to the model as the tool's answer."""


@dataclass
class Start:
    messages: list[dict]
    tools: list[dict]
    state: object = None


@dataclass
class Step:
    messages: list[dict]
    done: bool
    reward: float | None = None
    shaping: float = 0.0
    info: dict = field(default_factory=dict)  # counts of this turn: tool_calls, tool_errors, malformed


class Environment(Protocol):
    name: str

    def reset(self, record: dict) -> Start: ...

    def step(self, state, text: str) -> Step: ...

    def close(self, state) -> None: ...


@dataclass
class Final:
    """A tool's answer that ends the episode, with the environment's reward (None: the verifier's)."""

    content: str
    reward: float | None = None


def answer_calls(parsed: tool_format.Parsed, run) -> Step:
    """The tool turns that answer a model turn's calls, in order: ``run(name, arguments)`` gives a call's
    text (or a ``Final``, which ends the episode there); a call that could not be read, a ``ToolError``
    or any other exception is answered ``Error: ...`` and counted."""
    out, errors, malformed = [], 0, 0
    info = lambda: {"tool_calls": len(parsed.calls), "tool_errors": errors, "malformed": malformed}  # noqa: E731
    for call, problem in zip(parsed.calls, parsed.problems):
        if problem is not None:
            malformed += 1
            out.append({"role": "tool", "content": f"Error: {problem}"})
            continue
        try:
            result = run(call["name"], call["arguments"])
        except ToolError as e:
            errors += 1
            result = f"Error: {e}"
        except Exception as e:  # a tool's own bug or a bad argument: the model is told, the run goes on
            errors += 1
            result = f"Error: {type(e).__name__}: {str(e)[:500]}"
        if isinstance(result, Final):
            out.append({"role": "tool", "name": call["name"], "content": result.content})
            return Step(out, done=True, reward=result.reward, info=info())
        out.append({"role": "tool", "name": call["name"], "content": result})
    return Step(out, done=False, info=info())


class ToolEnv(ABC):
    """A tool-calling environment: subclasses set ``name``, ``tools`` (schemas) and ``call``."""

    name = "tools"
    tools: list[dict] = []
    system_prompt: str | None = None

    def __init__(self, malformed_penalty: float = 0.0, tool_error_penalty: float = 0.0, system_prompt: str | None = None,
                 list_tools: bool = True):
        """``system_prompt``: the system turn an episode starts with when its record has none (None: the
        environment's own; "": none); ``list_tools: false``: the prompt does not list the tools (a model
        trained to call them needs no listing; calls are parsed the same)."""
        self.malformed_penalty, self.tool_error_penalty = malformed_penalty, tool_error_penalty
        if system_prompt is not None:
            self.system_prompt = system_prompt or None
        self.list_tools = list_tools

    @property
    def tool_names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def reset(self, record: dict) -> Start:
        messages = [dict(m) for m in record["messages"]]
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return Start(messages, (record.get("tools") or self.tools) if self.list_tools else [], self.new_state(record))

    def new_state(self, record: dict):
        return None

    @abstractmethod
    def call(self, state, name: str, arguments: dict) -> str:
        """The tool ``name``'s answer to ``arguments`` (raise ``ToolError`` for a failure the model should read)."""

    def step(self, state, text: str) -> Step:
        parsed = tool_format.parse_tool_calls(text, self.tool_names)
        if not parsed.calls:
            return Step([], done=True)
        step = answer_calls(parsed, lambda name, arguments: self.call(state, name, arguments))
        step.shaping = -self.malformed_penalty * step.info["malformed"] - self.tool_error_penalty * step.info["tool_errors"]
        return step

    def close(self, state) -> None:
        pass
