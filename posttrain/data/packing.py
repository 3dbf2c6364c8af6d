"""Padding-free packing: several tokenized samples per row, each with its own position ids.

Rows are filled best-fit decreasing: samples are taken longest first (ties in input order) and
each goes into the row with the least free space that still holds it, or a new row. This fills
rows more tightly than packing in input order; the training loop shuffles rows every epoch.
Position ids restart at 0 for every sample; the model (transformers' packed-sequence masking,
which applies when ``position_ids`` are given and ``attention_mask`` is not) then attends only
within each sample, so a packed row computes the same per-token log-probs as the samples alone.
"""

from __future__ import annotations

import bisect


def pack(samples: list[dict], max_length: int) -> list[dict]:
    """``samples``: dicts with ``input_ids`` and ``labels_mask`` (each no longer than ``max_length``).
    Returns rows with ``input_ids``, ``labels_mask``, ``position_ids`` and ``num_samples``.

    A sample may itself be several sequences (a preference pair: chosen then rejected), given by
    its own ``position_ids`` and ``num_samples``; its ``pair_index`` is carried into the row."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
    rows: list[dict] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted
    for i in order:
        s = samples[i]
        n = len(s["input_ids"])
        if n > max_length:
            raise ValueError(f"sample of {n} tokens is longer than max_length {max_length}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = max_length, len(rows)
            rows.append(_empty_row())
        _append(rows[r], s)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def _empty_row() -> dict:
    return {"input_ids": [], "labels_mask": [], "position_ids": [], "num_samples": 0, "pair_index": []}


def _append(row: dict, s: dict) -> None:
    row["input_ids"] += s["input_ids"]
    row["labels_mask"] += s["labels_mask"]
    row["position_ids"] += s.get("position_ids") or list(range(len(s["input_ids"])))
    row["num_samples"] += s.get("num_samples", 1)
    if "pair_index" in s:
        row["pair_index"].append(s["pair_index"])


def unpacked(samples: list[dict]) -> list[dict]:
    """One sample per row, in the same row format as ``pack``."""
    rows = []
    for s in samples:
        rows.append(_empty_row())
        _append(rows[-1], s)
    return rows
