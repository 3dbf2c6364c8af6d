"""Answer extraction shared by the verifiers."""

from __future__ import annotations

import re

_FINAL = re.compile(r"final answer\s*(?:is)?\s*[:：]?\s*(.+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def final_answer_line(text: str) -> str | None:
    """What follows the last "Final Answer:" / "The final answer is" in ``text``, up to the line's end."""
    found = None
    for line in text.splitlines():
        m = _FINAL.search(line)
        if m:
            found = m.group(1).strip().rstrip(".").strip()
    return found or None
