"""The three record kinds and their validation (Hugging Face conventions).

- SFT:         ``{"messages": [{"role": "system|user|assistant|tool", "content": str}, ...], "tools": [...]}``
  (an assistant turn may carry ``tool_calls``; ``tool`` turns answer them; ``tools`` is optional:
  posttrain.data.tools has the format)
- Preference:  ``{"prompt": messages, "chosen": messages, "rejected": messages}`` where ``prompt``
  is the shared turns and ``chosen``/``rejected`` the assistant turn(s) that follow them.
- Verifiable:  ``{"messages": prompt turns, "ground_truth": ..., "verifier": name}``.

Each may also carry ``source``, ``license`` and ``id``. Every check raises ``UserError`` naming the
place (``file:line`` or ``dataset[split] record i``) and the field.
"""

from __future__ import annotations

from posttrain.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
PASSTHROUGH = ("source", "license", "id")


def check_tool_calls(calls, where: str, field: str) -> list[dict]:
    """An assistant turn's ``tool_calls`` as ``[{"type": "function", "function": {"name", "arguments": {...}}}]``
    (``arguments`` given as a JSON string, OpenAI's form, is decoded; an ``id`` is kept)."""
    import json

    if not isinstance(calls, list) or not calls:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of tool calls")
    out = []
    for j, c in enumerate(calls):
        f = f"{field}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            raise UserError(f"{where}: field '{f}.function' must be an object with 'name' and 'arguments'")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UserError(f"{where}: field '{f}.function.name' must be a non-empty string")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise UserError(f"{where}: field '{f}.function.arguments' is a string that is not JSON") from None
        if not isinstance(args, dict):
            raise UserError(f"{where}: field '{f}.function.arguments' must be a JSON object")
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def check_tools(tools, where: str) -> list[dict]:
    """A record's ``tools``: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``."""
    if not isinstance(tools, list):
        raise UserError(f"{where}: field 'tools' must be a list of tool schemas")
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UserError(f"{where}: field 'tools[{j}].function.name' must be a non-empty string")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise UserError(f"{where}: field 'tools[{j}].function.parameters' must be a JSON schema object")
    return tools


def check_messages(messages, where: str, field: str = "messages", need_assistant: bool = True,
                   allow_empty: bool = False, after_user: bool = False) -> list[dict]:
    """Validate a list of chat turns and return it as plain ``{"role", "content"}`` dicts.
    ``allow_empty`` lets empty assistant turns through (preference pairs report them instead);
    ``after_user``: the turns continue a prompt that has a user turn already."""
    if not isinstance(messages, list):
        raise UserError(f"{where}: field '{field}' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise UserError(f"{where}: field '{field}' is an empty list")
    out = []
    seen_user = after_user
    for i, m in enumerate(messages):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{where}: field '{f}' must be an object with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise UserError(f"{where}: field '{f}.role' is missing")
        role = m["role"]
        if role not in ROLES:
            raise UserError(f"{where}: field '{f}.role' must be one of {', '.join(ROLES)}, got {role!r}")
        if "content" not in m:
            raise UserError(f"{where}: field '{f}.content' is missing")
        content = m["content"]
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""  # OpenAI's form of a turn that only calls tools
        if not isinstance(content, str):
            raise UserError(f"{where}: field '{f}.content' must be a string, got {type(content).__name__}")
        turn = {"role": role, "content": content}
        if role == "assistant":
            if m.get("tool_calls") is not None:
                turn["tool_calls"] = check_tool_calls(m["tool_calls"], where, f"{f}.tool_calls")
            if not content.strip() and "tool_calls" not in turn and not allow_empty:
                raise UserError(f"{where}: field '{f}.content' is an empty assistant turn")
            if not seen_user:
                raise UserError(f"{where}: field '{f}' is an assistant turn before any user turn")
        if role == "tool":
            before = out[-1] if out else None
            if before is None or not (before.get("tool_calls") or before["role"] == "tool"):
                raise UserError(f"{where}: field '{f}' is a tool turn that answers no assistant tool call")
            for key in ("name", "tool_call_id"):
                if isinstance(m.get(key), str):
                    turn[key] = m[key]
        seen_user = seen_user or role == "user"
        out.append(turn)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: field '{field}' has no assistant turn to train on")
    return out


def _extras(rec: dict) -> dict:
    return {k: rec[k] for k in PASSTHROUGH if k in rec and rec[k] is not None}


def sft_record(rec: dict, where: str) -> dict:
    if "messages" not in rec:
        raise UserError(f"{where}: field 'messages' is missing (keys: {', '.join(map(str, rec)) or 'none'})")
    out = {"messages": check_messages(rec["messages"], where), **_extras(rec)}
    if rec.get("tools") is not None:
        out["tools"] = check_tools(rec["tools"], where)
    return out


def _as_turns(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, where, field, need_assistant=False, allow_empty=True, after_user=role == "assistant")


def preference_record(rec: dict, where: str) -> dict:
    """Normalise either preference form to ``{prompt, chosen, rejected}`` (see module docstring).

    With full conversations in ``chosen``/``rejected``, the prompt is their longest common prefix of
    turns; the rest of each side must be assistant turns (checked by ``preference_problem``)."""
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise UserError(f"{where}: field '{key}' is missing")
    if "prompt" in rec:
        prompt = _as_turns(rec["prompt"], "user", where, "prompt")
        chosen = _as_turns(rec["chosen"], "assistant", where, "chosen")
        rejected = _as_turns(rec["rejected"], "assistant", where, "rejected")
    else:
        full_c = check_messages(rec["chosen"], where, "chosen", need_assistant=False, allow_empty=True)
        full_r = check_messages(rec["rejected"], where, "rejected", need_assistant=False, allow_empty=True)
        n = 0
        while n < min(len(full_c), len(full_r)) - 1 and full_c[n] == full_r[n]:
            n += 1
        while n > 0 and full_c[n - 1]["role"] == "assistant" and full_c[n]["role"] == "assistant":
            n -= 1
        prompt, chosen, rejected = full_c[:n], full_c[n:], full_r[n:]
    if "prompt" in rec and (not prompt or prompt[-1]["role"] != "user"):
        raise UserError(f"{where}: field 'prompt' must end with a user turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **_extras(rec)}


def preference_problem(rec: dict) -> str | None:
    """Why a normalised pair cannot be trained on, or None: 'prompts differ', 'identical sides' or
    'empty chosen/rejected response'."""
    if not rec["prompt"] or rec["prompt"][-1]["role"] != "user":
        return "prompts differ"
    for side in ("chosen", "rejected"):
        if not rec[side] or any(m["role"] != "assistant" for m in rec[side]):
            return "prompts differ"
        if any(not m["content"].strip() for m in rec[side]):
            return f"empty {side} response"
    if rec["chosen"] == rec["rejected"]:
        return "identical sides"
    return None


def verifiable_record(rec: dict, where: str) -> dict:
    if "messages" not in rec:
        raise UserError(f"{where}: field 'messages' is missing")
    messages = check_messages(rec["messages"], where, need_assistant=False)
    if messages[-1]["role"] != "user":
        raise UserError(f"{where}: field 'messages' must end with a user turn (the prompt)")
    if "ground_truth" not in rec:
        raise UserError(f"{where}: field 'ground_truth' is missing")
    verifier = rec.get("verifier", rec.get("dataset"))  # open-instruct calls it 'dataset'
    if not isinstance(verifier, str) or not verifier:
        raise UserError(f"{where}: field 'verifier' (or 'dataset') must name a verifier")
    out = {"messages": messages, "ground_truth": rec["ground_truth"], "verifier": verifier, **_extras(rec)}
    if rec.get("tools") is not None:
        out["tools"] = check_tools(rec["tools"], where)
    return out
