"""Prompt files for the data commands: any record with user text, ground truth optional.

A record becomes ``{"messages": [..., user turn], "ground_truth": ... or None, "verifier": ...,
"id": ..., "source": ...}`` from ``messages`` (ending in a user turn; a trailing assistant turn is
dropped), a ``prompt`` (string or messages), or ``question`` / ``problem`` / ``instruction`` (with
GSM8K's ``answer`` or MATH's ``answer``/``solution`` as the ground truth when present).
"""

from __future__ import annotations

from posttrain.data.adapters import gsm8k_final_answer, math_answer
from posttrain.data.io import read_records
from posttrain.data.records import check_messages
from posttrain.errors import UserError


def prompt_record(raw: dict, where: str, verifier: str | None = None) -> dict:
    truth = raw.get("ground_truth")
    if "messages" in raw or isinstance(raw.get("prompt"), list):
        messages = check_messages(raw.get("messages", raw.get("prompt")), where, need_assistant=False)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise UserError(f"{where}: field 'messages' has no user turn to answer")
    else:
        text = next((raw[k] for k in ("prompt", "question", "problem", "instruction") if isinstance(raw.get(k), str)), None)
        if not text or not text.strip():
            raise UserError(f"{where}: no prompt: expected 'messages', 'prompt', 'question', 'problem' or "
                            f"'instruction' (fields present: {', '.join(sorted(raw)) or 'none'})")
        messages = [{"role": "user", "content": text}]
        if truth is None and isinstance(raw.get("answer"), str) and "question" in raw:
            truth = gsm8k_final_answer(raw["answer"])
        elif truth is None and "problem" in raw and ("answer" in raw or "solution" in raw):
            truth = math_answer(raw, where)
    out = {"messages": messages, "ground_truth": truth,
           "verifier": raw.get("verifier", raw.get("dataset")) or verifier}
    for key in ("id", "source", "license", "persona", "domain"):
        if raw.get(key) is not None:
            out[key] = raw[key]
    return out


def read_prompts(paths: list[str] | str, verifier: str | None = None) -> list[dict]:
    """Every record of every file as a prompt record; ``source`` defaults to the file."""
    out = []
    for path in [paths] if isinstance(paths, str) else paths:
        for raw, where in read_records(path):
            rec = prompt_record(raw, where, verifier)
            rec.setdefault("source", path)
            out.append(rec)
    if not out:
        raise UserError(f"{', '.join([paths] if isinstance(paths, str) else paths)}: no prompts")
    return out


def user_text(messages: list[dict]) -> str | None:
    """The last user turn's text."""
    return next((m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
