"""Helpers shared by the benchmarks: timing rates, the matmul rate, a tiny model, quiet libraries."""

from __future__ import annotations

import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def matmul_flops(n: int = 2048, repeats: int = 5, trials: int = 5) -> float:
    """FLOP/s of an fp32 ``n x n`` matmul on this machine: the best of ``trials`` timings of
    ``repeats`` products each (the machine's rate, not a moment of interference)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t))
    return best


def rate(points: list[tuple[float, float]]) -> float:
    """Units per second between the first and the last of ``[(seconds, cumulative units), ...]``
    (the first point is the end of the first step, so warm-up is left out)."""
    (t0, n0), (t1, n1) = points[0], points[-1]
    return (n1 - n0) / (t1 - t0)


def tiny_model(out: Path, texts: list[str]) -> str:
    """A 4-layer, d=256 Llama with a 2048-token BPE vocabulary trained on ``texts``."""
    from posttrain.models import build_tiny

    build_tiny(out, texts, vocab_size=2048, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, seed=0)
    return str(out)
