"""Seeded synthetic arithmetic: verifiable problems with exact answers and worked solutions.

Operations ``add`` (+), ``sub`` (-) and ``mul`` (*). ``problems(op, n, digits, seed)`` draws ``n``
distinct operand pairs with ``digits`` digits each at most (difficulty: more digits, more carries and
partial products). ``split_problems`` cuts one draw into disjoint train and held-out sets, and
``check_disjoint`` verifies that no held-out question appears in training data. Outputs:

- ``corpus_line``: a mid-training text document (question + worked solution);
- ``sft_record``: a chat record whose reply is the worked solution ending in ``#### <answer>``;
- ``rlvr_record``: a verifiable prompt (ground truth = the answer, verifier ``gsm8k``).

Worked solutions: addition column by column with carries; subtraction as the larger minus the
smaller with borrows (negated when the first operand is smaller); multiplication as one partial
product per digit of the second operand, then their sum.
"""

from __future__ import annotations

import random

SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
LICENSE = "CC0-1.0"


def problems(op: str, n: int, digits: int = 2, seed: int = 0, high: int | None = None) -> list[tuple[int, int]]:
    """``n`` distinct pairs of operands in ``[0, 10**digits)`` (or ``[0, high)``)."""
    if op not in SYMBOLS:
        raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(SYMBOLS)}")
    hi = high or 10**digits
    if n > hi * hi:
        raise ValueError(f"only {hi * hi} distinct {digits}-digit {op} problems exist, asked for {n}")
    rng = random.Random(f"{op}:{digits}:{seed}" if high is None else f"{op}:<{high}:{seed}")
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n:
        pair = (rng.randrange(hi), rng.randrange(hi))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def answer(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "sub" else a * b


def question(op: str, a: int, b: int) -> str:
    return f"What is {a} {SYMBOLS[op]} {b}?"


def _digits(x: int) -> list[int]:
    return [int(d) for d in reversed(str(x))]


def worked_solution(op: str, a: int, b: int) -> str:
    names = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]
    if op == "add":
        steps, carry = [], 0
        da, db = _digits(a), _digits(b)
        for i in range(max(len(da), len(db))):
            x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
            s = x + y + carry
            plus = f" + {carry}" if carry else ""
            steps.append(f"{names[min(i, 5)]}: {x} + {y}{plus} = {s}, write {s % 10}" + (", carry 1" if s >= 10 else ""))
            carry = s // 10
        if carry:
            steps.append("write the final carry 1")
    elif op == "sub":
        big, small = max(a, b), min(a, b)
        steps, borrow = ([f"{a} is smaller than {b}, so compute {b} - {a} and make it negative"] if a < b else []), 0
        db_, ds = _digits(big), _digits(small)
        for i in range(len(db_)):
            x, y = db_[i] - borrow, (ds[i] if i < len(ds) else 0)
            borrow = 1 if x < y else 0
            top = x + 10 * borrow
            steps.append(f"{names[min(i, 5)]}: {top} - {y} = {top - y}" + (", borrow 1" if borrow else ""))
    else:
        partials = [a * d * 10**i for i, d in enumerate(_digits(b))]
        steps = [f"{a} * {d * 10**i} = {p}" for i, (d, p) in enumerate(zip(_digits(b), partials))]
        if len(partials) > 1:
            steps.append(" + ".join(map(str, partials)) + f" = {sum(partials)}")
    return "\n".join(steps) + f"\nSo {a} {SYMBOLS[op]} {b} = {answer(op, a, b)}.\n#### {answer(op, a, b)}"


def split_problems(problems: list, n_heldout: int) -> tuple[list, list]:
    return problems[n_heldout:], problems[:n_heldout]


def check_disjoint(train_questions, heldout_questions) -> None:
    overlap = set(train_questions) & set(heldout_questions)
    if overlap:
        raise ValueError(f"{len(overlap)} held-out question(s) also in training data, e.g. {sorted(overlap)[0]!r}")


def corpus_line(op: str, a: int, b: int) -> str:
    return f"Question: {question(op, a, b)} Answer: " + worked_solution(op, a, b).replace("\n", " ")


def sft_record(op: str, a: int, b: int, worked: bool = True) -> dict:
    reply = worked_solution(op, a, b) if worked else str(answer(op, a, b))
    return {"messages": [{"role": "user", "content": question(op, a, b)}, {"role": "assistant", "content": reply}],
            "source": f"synthetic/{op}", "license": LICENSE}


def rlvr_record(op: str, a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": question(op, a, b)}], "ground_truth": str(answer(op, a, b)),
            "verifier": "gsm8k", "source": f"synthetic/{op}", "license": LICENSE}


# single-digit addition with bare answers: the embedded SFT demo and many tests
def addition_problems(n: int, digits: int = 2, seed: int = 0) -> list[tuple[int, int]]:
    return problems("add", n, digits, seed)


def addition_question(a: int, b: int) -> str:
    return question("add", a, b)


def addition_record(a: int, b: int) -> dict:
    """An SFT chat record whose answer is just the sum."""
    return sft_record("add", a, b, worked=False)


def addition_prompt(a: int, b: int) -> dict:
    """A verifiable-prompt record (RLVR, evaluation) for ``a + b``."""
    return rlvr_record("add", a, b)
