"""Tool calls in records, in chat templates and in model output (the Hugging Face / OpenAI format).

A record's assistant turn may carry ``tool_calls``: ``[{"type": "function", "function": {"name": str,
"arguments": {...}}}]`` (``arguments`` an object, or a JSON string of one as OpenAI sends it), with
``content`` possibly empty; each result comes back as a ``{"role": "tool", "content": str, "name": str}``
turn (``tool_call_id`` optional). The record's ``tools`` lists the tools as JSON schemas:
``[{"type": "function", "function": {"name", "description", "parameters"}}]``.

How a conversation with tools becomes text:

- A **tool-aware template** (one that reads ``tool_calls``, as Qwen's, Hermes' or SmolLM3's do) gets the
  messages as they are and ``tools=`` (``apply_chat_template(..., tools=[...])``): the model's own format.
- **Any other template** (the built-in ``tulu``, ``chatml``, ``gemma``, SmolLM2's) gets the documented
  default: the tool list in the system turn (``tools_prompt``), each call written into the assistant's
  text as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (``call_text``), and each
  result as a ``tool`` turn, or, when the template drops that role, as a user turn holding
  ``<tool_response>\\n...\\n</tool_response>``.

The model's output is read back with ``parse_tool_calls`` (the ``<tool_call>`` JSON form, which the
default and those tool-aware templates share): calls, the text around them, and a one-line problem
for every call that cannot be read (the environment answers it as an error turn, never a crash).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_SPAN = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)
_PROBE = "\x1fposttrain-tool-probe\x1f"


def call_text(name: str, arguments: dict) -> str:
    """One call in the default format."""
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def tools_prompt(tools: list[dict]) -> str:
    """The default system text that lists the tools and the call format."""
    schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call tools. To call one, write\n"
            f'{CALL_OPEN}\n{{"name": <tool name>, "arguments": <arguments as a JSON object>}}\n{CALL_CLOSE}\n'
            "and stop; its result comes back in the next turn. When you have the answer, reply without a tool call.\n"
            f"<tools>\n{schemas}\n</tools>")


def arguments_of(call: dict) -> dict:
    """A call's arguments as an object (OpenAI sends them as a JSON string)."""
    args = call["function"].get("arguments", {})
    return json.loads(args) if isinstance(args, str) else args


def assistant_text(message: dict) -> str:
    """An assistant turn's text in the default format: its content, then its calls."""
    calls = [call_text(c["function"]["name"], arguments_of(c)) for c in message.get("tool_calls") or []]
    return "\n".join(([message["content"]] if message.get("content") else []) + calls)


def tool_aware(template: str | None) -> bool:
    """Whether a chat template renders ``tool_calls`` itself."""
    return bool(template) and "tool_calls" in template


def _keeps_tool_role(tokenizer) -> bool:
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
             {"role": "tool", "content": _PROBE}]
    try:
        return _PROBE in tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that raises on an unknown role (e.g. one enforcing alternation)
        return False


def default_format(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The messages as plain ``{role, content}`` turns in the default format (module docstring)."""
    out = []
    tool_role = None
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": assistant_text(m)})
        elif m["role"] == "tool":
            if tool_role is None:
                tool_role = _keeps_tool_role(tokenizer)
            out.append({"role": "tool", "content": m["content"]} if tool_role else
                       {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        listing = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


@dataclass
class Parsed:
    """A model turn read back: the text outside the calls, the calls (``{"name", "arguments"}``) and a
    one-line problem per call that could not be read (``None`` in ``calls`` keeps their order)."""

    content: str
    calls: list[dict | None] = field(default_factory=list)
    problems: list[str | None] = field(default_factory=list)


def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> Parsed:
    """Read ``<tool_call>`` blocks out of a model's turn. A block that is not a JSON object with a string
    ``name`` and an object ``arguments``, names an unknown tool, or is left open, is a problem, not an
    exception."""
    out = Parsed(content="")
    pieces, pos = [], 0
    for m in CALL_SPAN.finditer(text):
        pieces.append(text[pos:m.start()])
        pos = m.end()
        call, problem = _read_call(m.group(1), tool_names)
        out.calls.append(call)
        out.problems.append(problem)
    rest = text[pos:]
    if CALL_OPEN in rest:  # an unterminated call (the turn hit its token limit, or the model forgot to close it)
        pieces.append(rest[:rest.index(CALL_OPEN)])
        out.calls.append(None)
        out.problems.append(f"a {CALL_OPEN} without its {CALL_CLOSE}")
    else:
        pieces.append(rest)
    out.content = "".join(pieces).strip()
    return out


def _read_call(body: str, tool_names: set[str] | None) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as e:
        return None, f"the tool call is not valid JSON ({str(e).splitlines()[0][:120]})"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None, 'the tool call must be a JSON object with a string "name"'
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return None, f'the "arguments" of {data["name"]!r} are a string that is not JSON'
    if not isinstance(args, dict):
        return None, f'the "arguments" of {data["name"]!r} must be a JSON object'
    if tool_names is not None and data["name"] not in tool_names:
        known = ", ".join(sorted(tool_names)) or "none"
        return None, f"unknown tool {data['name'][:80]!r} (tools: {known})"
    return {"name": data["name"], "arguments": args}, None


def as_tool_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls in the record format (``tool_calls`` of an assistant turn)."""
    return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
