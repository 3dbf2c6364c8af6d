"""Advantages of RL with one scalar reward per completion (``advantage`` in the RLVR config).

``rewards`` holds ``num_prompts * G`` values, the ``G`` completions of a prompt contiguous (a group).

- ``group`` (GRPO, Shao et al. 2024): ``A_i = (r_i − mean_g(r)) / (std_g(r) + eps)`` with
  ``scale_rewards: group`` (``std`` unbiased, as TRL), ``A_i = r_i − mean_g(r)`` with
  ``scale_rewards: none`` (Dr. GRPO, Liu et al. 2025).
- ``rloo`` (REINFORCE leave-one-out, Ahmadian et al. 2024): ``A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j``
  ``= G/(G−1) · (r_i − mean_g(r))``.
- ``reinforce_pp`` (REINFORCE++, Hu 2025): ``A_i = (r_i − mean_B(r)) / (std_B(r) + eps)`` over the
  global batch ``B`` (every process's completions), no per-prompt baseline. The batch statistics come
  in as sums (``batch_stats``: ``n``, ``Σr``, ``Σr²``) so that a caller can add them up over processes
  first.

Every function also returns ``varied``: False for the completions of a group whose rewards are all
equal (for ``group`` and ``rloo`` their advantage is 0; ``drop_zero_variance`` and dynamic sampling
leave them out).
"""

from __future__ import annotations

import torch

ADVANTAGES = ("group", "rloo", "reinforce_pp")


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    r = rewards.view(-1, group_size)
    return (r != r[:, :1]).any(dim=1, keepdim=True).expand_as(r).reshape(-1)


def group(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
          eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    r = rewards.view(-1, group_size).float()
    centered = r - r.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = centered / (std + eps)
    elif scale_rewards == "none":
        adv = centered
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected group or none")
    return adv.reshape(-1), varied_groups(rewards, group_size)


def rloo(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if group_size < 2:
        raise ValueError("rloo needs at least 2 completions per prompt")
    r = rewards.view(-1, group_size).float()
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others).reshape(-1), varied_groups(rewards, group_size)


def batch_stats(rewards: torch.Tensor) -> dict[str, float]:
    """``{"n", "sum", "sum_sq"}`` of the rewards, to be summed over processes before ``reinforce_pp``."""
    r = rewards.double()
    return {"n": float(r.numel()), "sum": float(r.sum()), "sum_sq": float((r * r).sum())}


def reinforce_pp(rewards: torch.Tensor, group_size: int, stats: dict[str, float] | None = None,
                 eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``stats``: the global batch's ``batch_stats`` (default: this batch's own). ``std_B`` is the
    unbiased standard deviation, as ``group``'s."""
    stats = stats or batch_stats(rewards)
    n, mean = stats["n"], stats["sum"] / stats["n"]
    var = max(stats["sum_sq"] - n * mean * mean, 0.0) / max(n - 1, 1)
    adv = (rewards.double() - mean) / (var ** 0.5 + eps)
    return adv.float(), varied_groups(rewards, group_size)
