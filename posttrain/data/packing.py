"""Padding-free packing: several tokenized samples per row, each with its own position ids.

Samples are placed in order, a new row starting when the next one does not fit in ``max_length``.
Position ids restart at 0 for every sample; the model (transformers' packed-sequence masking,
which applies when ``position_ids`` are given and ``attention_mask`` is not) then attends only
within each sample, so a packed row computes the same per-token log-probs as the samples alone.
"""

from __future__ import annotations


def pack(samples: list[dict], max_length: int) -> list[dict]:
    """``samples``: dicts with ``input_ids`` and ``labels_mask`` (each no longer than ``max_length``).
    Returns rows with ``input_ids``, ``labels_mask``, ``position_ids`` and ``num_samples``."""
    rows: list[dict] = []
    row = None
    for s in samples:
        n = len(s["input_ids"])
        if n > max_length:
            raise ValueError(f"sample of {n} tokens is longer than max_length {max_length}")
        if row is None or len(row["input_ids"]) + n > max_length:
            row = {"input_ids": [], "labels_mask": [], "position_ids": [], "num_samples": 0}
            rows.append(row)
        row["input_ids"] += s["input_ids"]
        row["labels_mask"] += s["labels_mask"]
        row["position_ids"] += list(range(n))
        row["num_samples"] += 1
    return rows


def unpacked(samples: list[dict]) -> list[dict]:
    """One sample per row, in the same row format as ``pack``."""
    return [{"input_ids": s["input_ids"], "labels_mask": s["labels_mask"],
             "position_ids": list(range(len(s["input_ids"]))), "num_samples": 1} for s in samples]
