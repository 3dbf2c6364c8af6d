"""PPO pieces: per-token rewards with a KL penalty, GAE, advantage whitening, the clipped value loss.

For a completion of ``T`` tokens with values ``V_t`` (the value head at the state before token ``t``),
log-probs ``logp_t`` (rollout policy) and ``ref_t`` (initial policy), and a sequence score ``s``:

- rewards: ``r_t = −β (logp_t − ref_t)`` for every token, plus ``s`` on the last token (the KL
  penalty in the reward, as in Tulu 3 / TRL's PPO; ``β = 0`` drops it).
- GAE (``γ``, ``λ``), with ``V_T = 0`` after the last token:
  ``δ_t = r_t + γ V_{t+1} − V_t``, ``A_t = δ_t + γλ A_{t+1}``, returns ``R_t = A_t + V_t``.
- whitening: ``A ← (A − mean(A)) / sqrt(var(A) + 1e−8)`` over every token of the batch (biased
  variance, as TRL's ``masked_whiten``). ``whiten_stats`` gives the sums a multi-process run
  all-reduces so that the mean and variance are those of the global batch.
- value loss per token: ``½ max((V − R)², (clip(V, V_old − c, V_old + c) − R)²)``.

The policy loss is GRPO's clipped surrogate (``grpo.token_losses``) with per-token advantages; the
loss of a batch (``batch_loss``) is ``Σ_t (L^clip_t + vf_coef · L^V_t) / N_tokens`` over the global
batch's completion tokens (``grpo.aggregate``'s ``token_mean``). Tensors are ``[N, T]`` with a mask of
the completion tokens, which are contiguous within a row
(they may start at any column: the recursion is reset by the mask).
"""

from __future__ import annotations

import torch

from posttrain.train.rl import grpo

COUNT = grpo.COUNTS["token_mean"]  # the batch count of the loss's denominator


def token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """``[N, T]`` rewards: the KL penalty on every token plus ``score [N]`` on each row's last token."""
    m = mask.to(logp.dtype)
    rewards = torch.zeros_like(logp) if ref_logp is None or not beta else -beta * (logp - ref_logp) * m
    last = (m * torch.arange(m.shape[1], device=m.device, dtype=m.dtype)).argmax(1)
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (``[N, T]``, zero outside ``mask``)."""
    m = mask.to(values.dtype)
    values = values * m
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + values) * m


def whiten_stats(x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    m = mask.to(x.dtype)
    return {"sum": float((x * m).sum()), "sumsq": float((x * x * m).sum()), "count": float(m.sum())}


def whiten(x: torch.Tensor, mask: torch.Tensor, stats: dict[str, float]) -> torch.Tensor:
    """Whiten with the (possibly all-reduced) ``whiten_stats``."""
    n = max(stats["count"], 1.0)
    mean = stats["sum"] / n
    var = max(stats["sumsq"] / n - mean * mean, 0.0)
    return (x - mean) / (var + 1e-8) ** 0.5 * mask.to(x.dtype)


def value_losses(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange: float) -> torch.Tensor:
    clipped = old_values + (values - old_values).clamp(-cliprange, cliprange)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def batch_loss(logp: torch.Tensor, values: torch.Tensor, batch: dict, num_items: float, *, epsilon: float,
               epsilon_high: float | None, vf_coef: float, cliprange_value: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy + value loss of one micro-batch divided by the global token count ``num_items``, and
    its metric sums."""
    mask = grpo.completion_mask(batch)
    pg = grpo.token_losses(logp, batch["old_logp"], batch["advantages"], epsilon, epsilon_high,
                           is_weight=batch.get("is_weight"))
    vf = value_losses(values, batch["old_values"], batch["returns"], cliprange_value)
    numerator, _ = grpo.aggregate(pg + vf_coef * vf, mask, "token_mean", 0)
    metrics = grpo.update_metrics(logp, batch, mask, epsilon, epsilon_high)
    metrics["value_loss"] = float((vf.detach() * mask).sum())
    return numerator / num_items, metrics
