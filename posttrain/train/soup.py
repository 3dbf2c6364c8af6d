"""Model soups: the weighted average of several checkpoints of one architecture (OLMo 2 averaged
anneal runs that saw different data orders). ``θ = Σ_i w_i θ_i / Σ_i w_i`` for every parameter,
computed in float32 and stored in the first checkpoint's dtype; config and tokenizer come from the
first checkpoint. Writes a ``save_pretrained`` directory and a ``manifest.json`` naming the sources."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from posttrain.atomic import publish_dir, write_json
from posttrain.errors import UserError
from posttrain.models import load_model, load_tokenizer, resolve


def state(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(resolve(path)).glob("model*.safetensors"))
    if not files:
        raise UserError(f"{path}: no model*.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def soup(paths: list[str], out: str | Path, weights: list[float] | None = None) -> Path:
    if len(paths) < 2:
        raise UserError("soup: give at least two checkpoints")
    weights = weights or [1.0] * len(paths)
    if len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"soup: {len(paths)} checkpoints need as many non-negative weights with a positive sum")
    started = time.time()
    total: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    for i, (path, w) in enumerate(zip(paths, weights)):
        sd = state(path)
        if i == 0:
            first = sd
            total = {k: v.float() * w for k, v in sd.items()}
            continue
        if sd.keys() != total.keys():
            raise UserError(f"soup: {path} has different parameters from {paths[0]} "
                            f"({len(sd.keys() ^ total.keys())} names differ)")
        for k, v in sd.items():
            if v.shape != total[k].shape:
                raise UserError(f"soup: {path}: parameter {k} has shape {tuple(v.shape)}, {paths[0]} has {tuple(total[k].shape)}")
            total[k] += v.float() * w
    model = load_model(paths[0])
    averaged = {k: (v / sum(weights)).to(first[k].dtype) for k, v in total.items()}
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    if unexpected:
        raise UserError(f"soup: {paths[0]}: unexpected parameters {unexpected[:3]}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"
    model.save_pretrained(tmp)
    load_tokenizer(paths[0]).save_pretrained(tmp)
    write_json(tmp / "manifest.json", {"stage": "soup", "sources": paths, "weights": weights,
                                       "seconds": round(time.time() - started, 2)})
    publish_dir(tmp, out)
    return out
