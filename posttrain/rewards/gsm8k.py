"""GSM8K-style numeric answers.

Extraction, in order: the first number after the last ``####``; else the last number in the
last ``\\boxed{...}``; else the last number of the whole response. A number is digits with an
optional sign, thousands commas and decimals; ``$``, ``%``, units and a trailing period around it
are ignored. The score is 1.0 when it equals the ground truth as a number (``"72"``, ``"72.0"``
and ``"$72."`` all equal ``72``), else 0.0; 0.0 when there is no number.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from posttrain.rewards.extract import last_boxed

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract(response: str) -> str | None:
    """The final number of a response as a plain string (no commas), or None."""
    if "####" in response:
        found = _NUMBER.findall(response.rsplit("####", 1)[1])[:1]
    else:
        boxed = last_boxed(response)
        found = _NUMBER.findall(boxed if boxed is not None else response)
    return found[-1].replace(",", "") if found else None


def number(text: str) -> Decimal | None:
    """A number as written in an answer (``1,000``, ``$5``, ``3.``), or None."""
    try:
        return Decimal(text.replace(",", "").replace("$", "").strip().rstrip("."))
    except InvalidOperation:
        return None


def equivalent(a: str, b: str) -> bool:
    """Two extracted answers that are the same number."""
    value = number(a)
    return value is not None and value == number(b)


def score(response: str, ground_truth) -> float:
    pred = extract(response)
    gold = number(str(ground_truth))
    if pred is None or gold is None:
        return 0.0
    value = number(pred)
    return 1.0 if value is not None and value == gold else 0.0
