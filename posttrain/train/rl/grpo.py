"""GRPO: group-relative advantages and the clipped surrogate with a KL penalty.

For a prompt with ``G`` sampled completions and rewards ``r_1..r_G``:

- advantages, ``scale_rewards: group``: ``A_i = (r_i − mean(r)) / (std(r) + eps)`` (``std`` unbiased,
  as TRL); ``scale_rewards: none``: ``A_i = r_i − mean(r)`` (Dr. GRPO). A group whose rewards are all
  equal has ``A = 0``; ``drop_zero_variance`` masks such groups out of the loss entirely.
- per token ``t`` of completion ``i``, with ``ρ = exp(logp − logp_old)``:
  ``L_it = −min(ρ·A_i, clip(ρ, 1 − epsilon, 1 + epsilon_high)·A_i) + β·KL_it``, where
  ``KL_it = exp(logp_ref − logp) − (logp_ref − logp) − 1`` (the k3 estimator; ``β = 0`` needs no
  reference model).
- truncated importance sampling (rollouts from another engine, ``vllm_importance_sampling_cap C``):
  the policy term is weighted by ``w_it = min(exp(logp_old − logp_engine), C)`` (no gradient), the
  trainer's old policy over the engine's sampling distribution for the sampled token (as TRL,
  open-instruct and verl): ``L_it = −w_it·min(...) + β·KL_it``.
- aggregation over the completions ``i`` and their tokens ``t`` (``|o_i|`` tokens each) of a global
  batch of ``N`` completions:
  ``token_mean``: ``Σ_it L_it / Σ_i |o_i|``;
  ``sequence_mean``: ``(1/N) Σ_i (Σ_t L_it / |o_i|)``;
  ``dr_grpo``: ``Σ_it L_it / (N · max_completion_length)`` (a constant denominator).

``aggregate`` returns the *numerator* for a micro-batch and names the count the training loop must
sum over the whole global batch for the denominator (``COUNTS``: the only source of it), so that
gradient accumulation and several processes give exactly the loss above (one division, by the global
count). ``batch_loss`` assembles it for a collated batch of RL rows (posttrain.train.rl.rows):
the mask of completion tokens (less those of dropped zero-variance groups), the per-token losses, the
aggregation and the division by the loop's global count.
"""

from __future__ import annotations

import torch

from posttrain.inference.logprobs import IGNORE

# the batch count the loop sums over the global batch for each aggregation's denominator
COUNTS = {"token_mean": "num_tokens", "sequence_mean": "num_sequences", "dr_grpo": "num_sequences"}


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``rewards``: ``[num_prompts * group_size]``, groups contiguous. Returns advantages and a mask
    that is False for completions of zero-variance groups."""
    r = rewards.view(-1, group_size).float()
    centered = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    if scale_rewards == "group":
        adv = centered / (std + eps)
    elif scale_rewards == "none":
        adv = centered
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected group or none")
    varied = (std > 0).expand_as(r)
    return adv.reshape(-1), varied.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(ref − logp) − (ref − logp) − 1`` (non-negative, unbiased for KL(π‖π_ref))."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                 epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                 ref_logp: torch.Tensor | None = None, is_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``L_it`` for ``logp``, ``old_logp``, ``ref_logp``, ``is_weight`` (``w_it``) of shape ``[N, T]`` and
    ``advantages [N]`` (one per sequence, GRPO) or ``[N, T]`` (one per token, PPO)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1) if advantages.ndim == 1 else advantages
    high = epsilon if epsilon_high is None else epsilon_high
    loss = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + high) * a)
    if is_weight is not None:
        loss = loss * is_weight
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        loss = loss + beta * k3_kl(logp, ref_logp)
    return loss


AGGREGATIONS = tuple(COUNTS)


def aggregate(losses: torch.Tensor, mask: torch.Tensor, mode: str, max_completion_length: int,
              seq_index: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """Numerator of the aggregated loss over this micro-batch, and the batch count to divide by
    (summed over the global batch by the loop): ``"num_tokens"`` or ``"num_sequences"``; for
    ``dr_grpo`` the numerator is already divided by ``max_completion_length``. ``seq_index`` names
    the completion of every token when a row holds several (default: one completion per row)."""
    if mode not in COUNTS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGGREGATIONS}")
    m = mask.to(losses.dtype)
    if mode == "token_mean":
        return (losses * m).sum(), COUNTS[mode]
    if mode == "dr_grpo":
        return (losses * m).sum() / max_completion_length, COUNTS[mode]
    if seq_index is None:
        return ((losses * m).sum(1) / m.sum(1).clamp(min=1)).sum(), COUNTS[mode]
    ids = seq_index[mask]
    n = int(ids.max()) + 1 if ids.numel() else 0
    sums = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, ids, losses[mask])
    counts = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, ids, m[mask])
    return (sums[counts > 0] / counts[counts > 0]).sum(), COUNTS[mode]


def completion_mask(batch: dict) -> torch.Tensor:
    """``[B, T-1]``: the completion tokens of a batch of RL rows that enter the loss (``keep`` drops
    the tokens of zero-variance groups)."""
    mask = batch["labels"][:, 1:] != IGNORE
    return mask & (batch["keep"] > 0) if "keep" in batch else mask


@torch.no_grad()
def update_metrics(logp: torch.Tensor, batch: dict, mask: torch.Tensor, epsilon: float,
                   epsilon_high: float | None) -> dict[str, float]:
    """Sums for logging: clipped tokens, tokens, and the k3 KL when the batch has reference log-probs."""
    ratio = torch.exp(logp - batch["old_logp"])
    high = epsilon if epsilon_high is None else epsilon_high
    clipped = ((ratio < 1 - epsilon) | (ratio > 1 + high)) & mask
    out = {"clip_fraction": float(clipped.sum()), "tokens": float(mask.sum())}
    if "ref_logp" in batch:
        out["kl"] = float((k3_kl(logp, batch["ref_logp"]) * mask).sum())
    return out


def batch_loss(logp: torch.Tensor, batch: dict, num_items: float, *, loss_type: str, max_completion_length: int,
               epsilon: float, epsilon_high: float | None, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of one micro-batch divided by the global count ``num_items`` (of ``COUNTS[loss_type]``),
    and its metric sums."""
    mask = completion_mask(batch)
    per_token = token_losses(logp, batch["old_logp"], batch["advantages"], epsilon, epsilon_high, beta,
                             batch.get("ref_logp"), batch.get("is_weight"))
    numerator, _ = aggregate(per_token, mask, loss_type, max_completion_length, batch.get("seq_index"))
    return numerator / num_items, update_metrics(logp, batch, mask, epsilon, epsilon_high)
