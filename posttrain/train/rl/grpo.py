"""The policy losses of RL with group-sampled completions (GRPO and its published variants), with a KL
penalty, selected by ``loss_type``. Advantages come from posttrain.train.rl.advantages.

Per token ``t`` of completion ``i`` (``|o_i|`` tokens), with ``ρ_it = exp(logp_it − logp_old_it)``,
``ε_l = epsilon``, ``ε_h = epsilon_high`` (default ``epsilon``; ``dapo`` defaults it to 0.28 in the
config) and advantage ``A_i`` (or ``A_it``, PPO):

- ``token_mean``, ``sequence_mean``, ``dr_grpo``, ``dapo`` (the PPO clipped surrogate, GRPO):
  ``L_it = −min(ρ_it·A_i, clip(ρ_it, 1 − ε_l, 1 + ε_h)·A_i)``.
- ``gspo`` (Zheng et al. 2025, sequence-level ratio): ``s_i = exp((1/|o_i|) Σ_t (logp_it − logp_old_it))``,
  the geometric mean of the token ratios, clipped per sequence:
  ``L_it = −min(s_i·A_i, clip(s_i, 1 − ε_l, 1 + ε_h)·A_i)`` (the same for every token of ``i``; the
  paper's ε are small, 3e-4 / 4e-4).
- ``cispo`` (MiniMax-M1, 2025): the importance weight clipped from above and without gradient
  multiplies every token's log-prob, so no token's gradient is ever clipped away:
  ``L_it = −sg(min(ρ_it, 1 + ε_h))·A_i·logp_it``.

Plus ``β·KL_it`` with ``KL_it = exp(logp_ref − logp) − (logp_ref − logp) − 1`` (the k3 estimator;
``β = 0`` needs no reference model). With truncated importance sampling (rollouts from another engine
or from stale weights, ``vllm_importance_sampling_cap C``) the policy term is weighted by
``w_it = min(exp(logp_old − logp_engine), C)`` (no gradient): the trainer's old policy over the
sampling distribution for the sampled token (as TRL, open-instruct and verl).

Aggregation over the completions of a global batch of ``N`` completions:
``token_mean``, ``dapo``, ``cispo``: ``Σ_it L_it / Σ_i |o_i|`` (one token mean over the global batch);
``sequence_mean``, ``gspo``: ``(1/N) Σ_i (Σ_t L_it / |o_i|)``;
``dr_grpo``: ``Σ_it L_it / (N · max_completion_length)`` (a constant denominator).

``aggregate`` returns the *numerator* for a micro-batch and names the count the training loop must
sum over the whole global batch for the denominator (``COUNTS``: the only source of it), so that
gradient accumulation and several processes give exactly the loss above (one division, by the global
count). ``batch_loss`` assembles it for a collated batch of RL rows (posttrain.train.rl.rows):
the mask of completion tokens (less those of dropped completions), the per-token losses, the
aggregation and the division by the loop's global count.
"""

from __future__ import annotations

import torch

from posttrain.logprobs import IGNORE

# how each loss type averages its token losses, and the batch count the loop sums over the global
# batch for the denominator
MEANS = {"token_mean": "token", "sequence_mean": "sequence", "dr_grpo": "constant", "dapo": "token",
         "gspo": "sequence", "cispo": "token"}
COUNTS = {name: "num_tokens" if mean == "token" else "num_sequences" for name, mean in MEANS.items()}
LOSS_TYPES = tuple(MEANS)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(ref − logp) − (ref − logp) − 1`` (non-negative, unbiased for KL(π‖π_ref))."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def sequence_sums(values: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion named by ``seq_index``: the sum of ``values`` over its masked tokens, and their count."""
    n = max(int(seq_index.max()) + 1 if seq_index.numel() else 0, 1)
    ids = seq_index[mask]
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, ids, values[mask])
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, ids, mask.to(values.dtype)[mask])
    return sums, counts


def sequence_means(values: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]``: at every token, the mean of ``values`` over the masked tokens of its completion (one
    completion per row, or ``seq_index`` naming each token's completion); arbitrary where unmasked."""
    if seq_index is None:
        m = mask.to(values.dtype)
        return ((values * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)).expand_as(values)
    sums, counts = sequence_sums(values, mask, seq_index)
    return (sums / counts.clamp(min=1))[seq_index.clamp(min=0)]


def token_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                 epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                 ref_logp: torch.Tensor | None = None, is_weight: torch.Tensor | None = None,
                 loss_type: str = "token_mean", mask: torch.Tensor | None = None,
                 seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """``L_it`` for ``logp``, ``old_logp``, ``ref_logp``, ``is_weight`` (``w_it``) of shape ``[N, T]`` and
    ``advantages [N]`` (one per sequence, GRPO) or ``[N, T]`` (one per token, PPO). ``gspo`` needs the
    ``mask`` of completion tokens (and ``seq_index`` when a row holds several completions)."""
    if loss_type not in MEANS:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    a = advantages.unsqueeze(1) if advantages.ndim == 1 else advantages
    high = epsilon if epsilon_high is None else epsilon_high
    if loss_type == "cispo":
        weight = torch.exp(logp - old_logp).clamp(max=1 + high).detach()
        loss = -weight * a * logp
    else:
        if loss_type == "gspo":
            if mask is None:
                raise ValueError("gspo needs the completion mask")
            ratio = torch.exp(sequence_means(logp - old_logp, mask, seq_index))
        else:
            ratio = torch.exp(logp - old_logp)
        loss = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + high) * a)
    if is_weight is not None:
        loss = loss * is_weight
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        loss = loss + beta * k3_kl(logp, ref_logp)
    return loss


def aggregate(losses: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
              seq_index: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """Numerator of the aggregated loss over this micro-batch, and the batch count to divide by
    (summed over the global batch by the loop): ``"num_tokens"`` or ``"num_sequences"``; for
    ``dr_grpo`` the numerator is already divided by ``max_completion_length``. ``seq_index`` names
    the completion of every token when a row holds several (default: one completion per row)."""
    if loss_type not in MEANS:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    m = mask.to(losses.dtype)
    mean = MEANS[loss_type]
    if mean == "token":
        return (losses * m).sum(), COUNTS[loss_type]
    if mean == "constant":
        return (losses * m).sum() / max_completion_length, COUNTS[loss_type]
    if seq_index is None:
        return ((losses * m).sum(1) / m.sum(1).clamp(min=1)).sum(), COUNTS[loss_type]
    sums, counts = sequence_sums(losses, mask, seq_index)
    return (sums[counts > 0] / counts[counts > 0]).sum(), COUNTS[loss_type]


def completion_mask(batch: dict) -> torch.Tensor:
    """``[B, T-1]``: the completion tokens of a batch of RL rows that enter the loss (``keep`` drops
    the tokens of zero-variance groups and of truncated completions)."""
    mask = batch["labels"][:, 1:] != IGNORE
    return mask & (batch["keep"] > 0) if "keep" in batch else mask


@torch.no_grad()
def update_metrics(logp: torch.Tensor, batch: dict, mask: torch.Tensor, epsilon: float,
                   epsilon_high: float | None, loss_type: str = "token_mean") -> dict[str, float]:
    """Sums for logging: clipped tokens (the ratio the loss clips: per sequence for ``gspo``; for
    ``cispo`` the tokens whose weight was capped), tokens, and the k3 KL when the batch has reference
    log-probs."""
    ratio = torch.exp(logp - batch["old_logp"])
    if loss_type == "gspo":
        ratio = torch.exp(sequence_means(logp - batch["old_logp"], mask, batch.get("seq_index")))
    high = epsilon if epsilon_high is None else epsilon_high
    low = 0.0 if loss_type == "cispo" else 1 - epsilon
    clipped = ((ratio < low) | (ratio > 1 + high)) & mask
    out = {"clip_fraction": float(clipped.sum()), "tokens": float(mask.sum())}
    if "ref_logp" in batch:
        out["kl"] = float((k3_kl(logp, batch["ref_logp"]) * mask).sum())
    return out


def batch_loss(logp: torch.Tensor, batch: dict, num_items: float, *, loss_type: str, max_completion_length: int,
               epsilon: float, epsilon_high: float | None, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch divided by the global count ``num_items`` (of ``COUNTS[loss_type]``),
    and its metric sums."""
    mask = completion_mask(batch)
    per_token = token_losses(logp, batch["old_logp"], batch["advantages"], epsilon, epsilon_high, beta,
                             batch.get("ref_logp"), batch.get("is_weight"), loss_type, mask, batch.get("seq_index"))
    numerator, _ = aggregate(per_token, mask, loss_type, max_completion_length, batch.get("seq_index"))
    return numerator / num_items, update_metrics(logp, batch, mask, epsilon, epsilon_high, loss_type)
