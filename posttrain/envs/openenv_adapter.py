"""OpenEnv environments (PyPI ``openenv-core``) behind posttrain's ``reset`` / ``step``, unchanged.

``env: openenv:<module>:<Class>`` (``env_args`` are the class's constructor arguments) makes one
instance of the OpenEnv ``Environment`` subclass per episode, in this process:

- ``reset(record)``: ``Environment.reset(seed=record.get("seed"))``; the prompt is the record's
  ``messages``, plus the first observation as a user turn when it carries any field besides ``done``,
  ``reward`` and ``metadata``. An MCP environment (``MCPEnvironment``) is asked for its tools
  (``ListToolsAction``); each becomes a function schema (``name``, ``description``, ``parameters``
  from its ``input_schema``) that the chat template renders.
- ``step(state, text)``: every tool call of the model's turn becomes a ``CallToolAction(tool_name,
  arguments)``; the observation's ``result`` (or its ``error``) is the ``tool`` turn. A turn without a
  call is sent as the environment's own action when ``text_action`` names it (``module:Class``, an
  ``Action`` with one string field; a text game), its observation coming back as a user turn;
  otherwise the turn is the final answer. The episode ends when an observation says ``done`` (its
  ``reward`` is the episode's reward) or the model answers; with no reward from the environment, the
  record's verifier scores the answer.

Supported: in-process ``Environment`` subclasses, MCP tools, text actions, ``done`` and ``reward``.
Not supported: environments behind an HTTP/WebSocket ``EnvClient`` or in containers (run them in
process instead), non-text observations (images), ``Transform`` rubrics beyond the ``reward`` an
observation carries, and async-only ``step_async`` implementations.
"""

from __future__ import annotations

import importlib
import json

from posttrain.data import tools as tool_format
from posttrain.envs.base import Final, Start, Step, ToolError, answer_calls
from posttrain.errors import UserError

RESERVED = {"done", "reward", "metadata"}


def load_class(spec: str, what: str):
    """``module:Class`` -> the class, or a UserError naming the spec."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UserError(f"{what} {spec!r}: expected module:Class")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise UserError(f"{what} {spec!r}: cannot import {module} ({e})") from None
    except AttributeError:
        raise UserError(f"{what} {spec!r}: {module} has no {name}") from None


def observation_text(obs) -> str:
    """An observation's own fields (not done/reward/metadata) as text: one string field as is, else JSON."""
    fields = {k: v for k, v in obs.model_dump().items() if k not in RESERVED and v not in (None, "", [], {})}
    if len(fields) == 1 and isinstance(next(iter(fields.values())), str):
        return next(iter(fields.values()))
    return json.dumps(fields, default=str, ensure_ascii=False) if fields else ""


def result_text(result) -> str:
    """A tool result (an MCP CallToolResult, plain data or text) as text."""
    if result is None:
        return "(no result)"
    data = getattr(result, "data", None)
    if data is not None:
        return data if isinstance(data, str) else json.dumps(data, default=str, ensure_ascii=False)
    content = getattr(result, "content", None)
    if isinstance(content, list):
        return "\n".join(str(getattr(c, "text", c)) for c in content)
    return result if isinstance(result, str) else json.dumps(result, default=str, ensure_ascii=False)


class OpenEnvAdapter:
    def __init__(self, spec: str, text_action: str | None = None, **kwargs):
        self.name = f"openenv:{spec}"
        self.cls = load_class(spec, "env openenv")
        self.kwargs = kwargs
        from openenv.core.env_server import mcp_types
        from openenv.core.env_server.types import Action

        self.mcp = mcp_types
        self.action = load_class(text_action, "text_action") if text_action else None
        if self.action is not None:
            if not (isinstance(self.action, type) and issubclass(self.action, Action)):
                raise UserError(f"text_action {text_action!r}: not an OpenEnv Action class")
            strings = [n for n, f in self.action.model_fields.items() if f.annotation is str]
            if len(strings) != 1:
                raise UserError(f"text_action {text_action!r}: needs exactly one string field, has {strings}")
            self.action_field = strings[0]

    def reset(self, record: dict) -> Start:
        env = self.cls(**self.kwargs)
        obs = env.reset(seed=record.get("seed"))
        messages = [dict(m) for m in record["messages"]]
        text = observation_text(obs)
        if text:
            messages.append({"role": "user", "content": text})
        tools = []
        if hasattr(env, "mcp_client") or hasattr(env, "mcp_server"):
            listed = env.step(self.mcp.ListToolsAction())
            tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                        "parameters": t.input_schema}} for t in listed.tools]
        return Start(messages, tools, {"env": env, "names": {t["function"]["name"] for t in tools}})

    def step(self, state: dict, text: str) -> Step:
        env = state["env"]
        parsed = tool_format.parse_tool_calls(text, state["names"]) if state["names"] else tool_format.Parsed(text)
        if not parsed.calls:
            if self.action is None:
                return Step([], done=True)
            obs = env.step(self.action(**{self.action_field: text}))
            if obs.done:
                return Step([], done=True, reward=None if obs.reward is None else float(obs.reward))
            return Step([{"role": "user", "content": observation_text(obs)}], done=False)
        return answer_calls(parsed, lambda name, arguments: self.call(env, name, arguments))

    def call(self, env, name: str, arguments: dict) -> str | Final:
        obs = env.step(self.mcp.CallToolAction(tool_name=name, arguments=arguments))
        error = getattr(obs, "error", None)
        if error is not None:
            raise ToolError(getattr(error, "message", error))
        content = result_text(obs.result)
        return Final(content, None if obs.reward is None else float(obs.reward)) if obs.done else content

    def close(self, state: dict | None) -> None:
        if state and hasattr(state.get("env"), "close"):
            state["env"].close()
