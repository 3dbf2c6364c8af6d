"""Verifiers: ``score(response, ground_truth) -> float in [0, 1]``, registered by name.

``get_verifier(name)`` returns the callable. Registered now: ``gsm8k`` (final number), ``math``
(boxed answer, equivalence by math-verify), ``code`` (HumanEval-style tests, run only in the
sandbox of ``posttrain.rewards.sandbox``), ``ifeval`` / ``ifeval_loose`` (the 25 IFEval instruction types, partial
credit), ``think_format`` (a ``<think>...</think>`` block then an answer). Each module's docstring states its extraction rules.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.errors import UserError
from posttrain.rewards import code, gsm8k, ifeval, math
from posttrain.rewards import format as format_reward

Verifier = Callable[[str, object], float]

VERIFIERS: dict[str, Verifier] = {
    "code": code.score,
    "gsm8k": gsm8k.score,
    "ifeval": ifeval.score,
    "ifeval_loose": ifeval.score_loose,
    "math": math.score,
    "think_format": format_reward.score,
}


def get_verifier(name: str) -> Verifier:
    """Names are matched case-insensitively (open-instruct's data says ``MATH``)."""
    try:
        return VERIFIERS[name if name in VERIFIERS else name.lower()]
    except KeyError:
        raise UserError(f"unknown verifier {name!r}; known: {', '.join(sorted(VERIFIERS))}") from None
