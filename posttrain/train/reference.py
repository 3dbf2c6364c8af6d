"""Reference log-probabilities, computed once before training and cached on disk.

The reference policy of DPO-style training is the starting policy. One pass of it over the
tokenized pairs gives, per pair, ``[logp(chosen), logp(rejected)]`` (summed over response tokens). The result is stored under
``$POSTTRAIN_CACHE/ref_logps/<key>.safetensors`` where the key hashes the model (path and weight
files' sizes and modification times, or the hub id), the exact token ids and masks of every pair
(so data, chat template and truncation are all in it) and the loss settings. Any change gives a
new key; a hit skips the pass. During training no reference model is kept in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from posttrain.logprobs import TokenLogProbs, collate, per_sample
from posttrain.models import resolve
from posttrain.util import cache_root, model_fingerprint


def cache_key(model_name: str, rows: list[dict], settings: dict) -> str:
    h = hashlib.sha256(model_fingerprint(resolve(model_name)).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for r in rows:
        h.update(json.dumps([r["input_ids"], r["labels_mask"], r["position_ids"], r["pair_index"]]).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute(model, rows: list[dict], num_pairs: int, pad_id: int, batch_size: int) -> torch.Tensor:
    """``[num_pairs, 2]``: chosen and rejected log-prob sums under ``model``."""
    policy = TokenLogProbs(model)
    was_training = model.training
    model.eval()
    out = torch.zeros(num_pairs, 2, dtype=torch.float64)
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i:i + batch_size], pad_id)
        device = model.device
        logp = policy(b["input_ids"].to(device), b["position_ids"].to(device), b["labels"].to(device))
        sums = per_sample(logp, b["sample_ids"].to(device), b["num_samples"]).double().cpu()
        out[b["pair_index"]] = torch.stack([sums[0::2], sums[1::2]], dim=1)
    model.train(was_training)
    return out


def load_or_compute(model_name: str, model, rows: list[dict], num_pairs: int, pad_id: int, batch_size: int,
                    settings: dict) -> tuple[torch.Tensor, Path, bool]:
    """The cached reference values for these rows, computing and storing them on a miss.
    Returns ``(values, cache file, hit)``."""
    from safetensors.torch import load_file, save_file

    path = cache_root() / "ref_logps" / f"{cache_key(model_name, rows, settings)}.safetensors"
    if path.is_file():
        return load_file(str(path))["ref"], path, True
    values = compute(model, rows, num_pairs, pad_id, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({"ref": values}, tmp)
    os.replace(tmp, path)
    return values, path, False
