"""Seeded synthetic arithmetic: verifiable problems with exact answers.

``addition_problems`` draws distinct ``(a, b)`` pairs with ``a, b`` in ``[0, 10**digits)``;
``split_problems`` cuts one draw into disjoint train and held-out sets, so no held-out question is
ever trained on.
"""

from __future__ import annotations

import random


def addition_problems(n: int, digits: int = 2, seed: int = 0) -> list[tuple[int, int]]:
    hi = 10**digits
    if n > hi * hi:
        raise ValueError(f"only {hi * hi} distinct {digits}-digit additions exist, asked for {n}")
    rng = random.Random(f"addition:{digits}:{seed}")
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n:
        pair = (rng.randrange(hi), rng.randrange(hi))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def split_problems(problems: list, n_heldout: int) -> tuple[list, list]:
    return problems[n_heldout:], problems[:n_heldout]


def addition_question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def addition_record(a: int, b: int) -> dict:
    """An SFT chat record whose answer is just the sum."""
    return {"messages": [{"role": "user", "content": addition_question(a, b)},
                         {"role": "assistant", "content": str(a + b)}],
            "source": "synthetic/addition", "license": "CC0-1.0"}


def addition_prompt(a: int, b: int) -> dict:
    """A verifiable-prompt record (RLVR, evaluation): the question, the sum as ground truth, checked
    by the ``gsm8k`` verifier (the last number of the response)."""
    return {"messages": [{"role": "user", "content": addition_question(a, b)}], "ground_truth": str(a + b),
            "verifier": "gsm8k", "source": "synthetic/addition", "license": "CC0-1.0"}
