"""Think/answer structure: 1.0 when the response is one ``<think>...</think>`` block with
non-empty reasoning, followed by a non-empty answer, and no other think tags; else 0.0."""

from __future__ import annotations

import re

_SHAPE = re.compile(r"^\s*<think>(.+?)</think>(.+)$", re.DOTALL)


def score(response: str, ground_truth=None) -> float:
    m = _SHAPE.match(response)
    if not m or not m.group(1).strip() or not m.group(2).strip():
        return 0.0
    if "<think>" in m.group(2) or "</think>" in m.group(2) or "<think>" in m.group(1):
        return 0.0
    return 1.0
