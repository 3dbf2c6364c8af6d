"""What a step's completions train toward, computed before its updates (no gradients): the old
policy's log-probs recomputed by the trainer (vLLM or stale rollouts) and the truncated importance
weights against the engine's, the reference log-probs (``beta > 0``), and the advantages: GRPO's per
completion (posttrain.train.rl.advantages), PPO's per token with GAE and whitening (posttrain.train.rl.ppo).
"""

from __future__ import annotations

import math

import torch

from posttrain.config import RLVRConfig
from posttrain.train.loop import Run, reduce_sum
from posttrain.train.rl import advantages, ppo
from posttrain.train.rl.rows import micro_batches, model_inputs, split_tokens


@torch.no_grad()
def prepare_advantages(cfg: RLVRConfig, run: Run, reference, prompts: list[dict], records: list[dict],
                       scores: torch.Tensor, pad: int) -> dict:
    """Attach ``ref_logp`` (beta > 0), ``advantages`` (per token) and, for PPO, ``old_values`` and
    ``returns`` to the completion records (in place)."""
    device = run.accelerator.device
    size = cfg.per_device_train_batch_size
    metrics: dict[str, float] = {}
    forwards = []
    if cfg.engine == "vllm" or cfg.async_steps:  # the old policy's log-probs from the trainer's own forward (exact)
        for r in records:
            r["engine_logp"] = r["old_logp"]
        inner = run.accelerator.unwrap_model(run.module)
        forwards.append(("old_logp", inner.policy if cfg.algorithm == "ppo" else inner))
    if reference is not None:
        forwards.append(("ref_logp", reference))
    if cfg.algorithm == "ppo":
        forwards.append(("old_values", run.accelerator.unwrap_model(run.module).value))
    for key, net in forwards:
        was_training = net.training
        net.eval()
        for j, batch in enumerate(micro_batches(prompts, records, size, cfg.share_prompt, pad, ())):
            out = net(*model_inputs(batch, device))
            for r, values in split_tokens(out, batch, records[j * size:(j + 1) * size]):
                r[key] = values
        net.train(was_training)
    for r in records:  # an episode's environment tokens were not sampled: no engine log-prob to compare
        if "model_mask" in r and "engine_logp" in r:
            r["engine_logp"] = [e if m else o for e, o, m in zip(r["engine_logp"], r["old_logp"], r["model_mask"])]
    if cfg.engine == "vllm" or cfg.async_steps:
        metrics["engine_logprob_abs_diff"] = sum(abs(a - b) for r in records for a, b in zip(r["engine_logp"], r["old_logp"]))
    if cfg.vllm_importance_sampling_cap is not None:  # truncated importance sampling (posttrain.train.rl.grpo)
        log_cap = math.log(cap := cfg.vllm_importance_sampling_cap)
        capped = 0
        for r in records:
            log_ratios = [o - e for o, e in zip(r["old_logp"], r["engine_logp"])]
            r["is_weight"] = [math.exp(x) if x <= log_cap else cap for x in log_ratios]
            capped += sum(x > log_cap for x in log_ratios)
        metrics["importance_sampling_capped"] = float(capped)
    if cfg.algorithm == "grpo":
        G = cfg.num_generations
        if cfg.advantage == "group":
            adv, varied = advantages.group(scores, G, cfg.scale_rewards)
        elif cfg.advantage == "rloo":
            adv, varied = advantages.rloo(scores, G)
        else:
            adv, varied = advantages.reinforce_pp(scores, G, reduce_sum(run.accelerator, advantages.batch_stats(scores)))
        for r, a, keep in zip(records, adv.tolist(), varied.tolist()):
            r["advantages"] = [a] * len(r["token_ids"])
            keep = (keep or not cfg.drop_zero_variance) and not (cfg.mask_truncated and r["truncated"])
            if "model_mask" in r:  # an episode: the environment's tokens are out of the loss and its counts
                r["keep"] = [float(keep and m) for m in r["model_mask"]]
            elif cfg.drop_zero_variance or cfg.mask_truncated:  # out of the loss and of its denominator
                r["keep"] = [float(keep)] * len(r["token_ids"])
        metrics["zero_variance"] = float((~varied).sum())
        return metrics
    # PPO: per-token rewards with the KL penalty, GAE per completion, whitening over the global batch.
    # An episode's actions are the model's tokens: GAE runs over those alone, in order (the
    # environment's tokens are no step of the policy), and the rest get no advantage and no loss.
    steps = [[t for t, m in enumerate(r["model_mask"]) if m] if "model_mask" in r else range(len(r["token_ids"]))
             for r in records]
    n, width = len(records), max(max(len(s) for s in steps), 1)
    mask = torch.zeros((n, width), dtype=torch.bool)
    logp, values = torch.zeros((n, width)), torch.zeros((n, width))
    ref = torch.zeros((n, width)) if reference is not None else None
    for i, (r, at) in enumerate(zip(records, steps)):
        k = len(at)
        mask[i, :k] = True
        logp[i, :k] = torch.tensor([r["old_logp"][t] for t in at])
        values[i, :k] = torch.tensor([r["old_values"][t] for t in at])
        if ref is not None:
            ref[i, :k] = torch.tensor([r["ref_logp"][t] for t in at])
    rewards = ppo.token_rewards(scores, logp, ref, mask, cfg.beta)
    adv, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if ref is not None:
        metrics["kl"] = float(((logp - ref) * mask).sum())
    if cfg.whiten_advantages:
        adv = ppo.whiten(adv, mask, reduce_sum(run.accelerator, ppo.whiten_stats(adv, mask)))
    for i, (r, at) in enumerate(zip(records, steps)):
        if "model_mask" not in r:
            k = len(r["token_ids"])
            r["advantages"], r["returns"] = adv[i, :k].tolist(), returns[i, :k].tolist()
            continue
        r["advantages"], r["returns"] = [0.0] * len(r["token_ids"]), list(r["old_values"])
        for j, t in enumerate(at):
            r["advantages"][t], r["returns"][t] = float(adv[i, j]), float(returns[i, j])
        r["keep"] = [float(m) for m in r["model_mask"]]
    return metrics
