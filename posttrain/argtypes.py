"""argparse types for the command line's numbers: a bad value is argparse's one-line error and exit 2."""

from __future__ import annotations

import argparse
import math


def integer(low: int, high: int | None = None, what: str = "an integer"):
    """An argparse type: an integer from ``low`` (to ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else (f"> {low - 1}" if low == 1 else f">= {low}")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite number within ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            bound = "" if low is None else f" {'>' if low_open else '>='} {low:g}" if high is None else \
                f" from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text}")
        return value

    return parse


positive_int = integer(1)
natural_int = integer(0)
port = integer(0, 65535, "a port number")  # 0: any free port
finite_float = number()
natural_float = number(0.0)
positive_float = number(0.0, low_open=True)
fraction = number(0.0, 1.0)
