"""RL advantages (group, RLOO, REINFORCE++), k3 KL, the policy losses (clipped surrogate, GSPO, CISPO)
and their aggregations against hand computation, including exactness of the aggregation under any
split of a batch into micro-batches; DAPO's overlong penalty by hand."""

import math
import statistics

import pytest
import torch

from posttrain.train.rl.advantages import group as group_advantages
from posttrain.train.rl.grpo import aggregate, k3_kl, token_losses

REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 1.0, 0.3]


def test_group_advantages_by_hand():
    adv, varied = group_advantages(torch.tensor(REWARDS), group_size=4, scale_rewards="group", eps=1e-4)
    for g in range(3):
        group = REWARDS[4 * g:4 * g + 4]
        mean, std = statistics.mean(group), statistics.stdev(group)
        for j, r in enumerate(group):
            assert float(adv[4 * g + j]) == pytest.approx((r - mean) / (std + 1e-4), rel=1e-5, abs=1e-6)
            assert bool(varied[4 * g + j]) == (std > 0)
    centered, _ = group_advantages(torch.tensor(REWARDS), group_size=4, scale_rewards="none")
    assert centered.tolist() == pytest.approx([r - statistics.mean(REWARDS[i // 4 * 4:i // 4 * 4 + 4])
                                               for i, r in enumerate(REWARDS)], abs=1e-6)
    assert varied.tolist()[4:8] == [False] * 4


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    want = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert k3_kl(logp, ref).tolist() == pytest.approx(want)
    assert float(k3_kl(logp, ref)[2]) == 0.0 and all(x >= 0 for x in want)


def hand_token_loss(lp, old, a, eps, eps_high, beta, ref):
    ratio = math.exp(lp - old)
    clipped = min(max(ratio, 1 - eps), 1 + eps_high)
    loss = -min(ratio * a, clipped * a)
    return loss + beta * (math.exp(ref - lp) - (ref - lp) - 1)


@pytest.mark.parametrize("eps, eps_high, beta", [(0.2, None, 0.0), (0.2, 0.28, 0.04), (0.1, 0.3, 0.5)])
def test_token_losses_and_gradients_by_hand(eps, eps_high, beta):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.3
    ref = logp.detach() + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.2, -0.7, 0.4], dtype=torch.float64)
    losses = token_losses(logp, old, adv, eps, eps_high, beta, ref)
    high = eps if eps_high is None else eps_high
    for i in range(3):
        for t in range(5):
            want = hand_token_loss(float(logp[i, t]), float(old[i, t]), float(adv[i]), eps, high, beta, float(ref[i, t]))
            assert float(losses[i, t]) == pytest.approx(want, rel=1e-10, abs=1e-12)
    # gradient: the unclipped branch moves, the clipped one does not (plus the KL term's gradient)
    losses.sum().backward()
    for i in range(3):
        for t in range(5):
            lp, o, a, r = float(logp[i, t]), float(old[i, t]), float(adv[i]), float(ref[i, t])
            ratio = math.exp(lp - o)
            clipped = min(max(ratio, 1 - eps), 1 + high)
            grad = -ratio * a if ratio * a <= clipped * a else 0.0
            grad += beta * (-math.exp(r - lp) + 1)
            assert float(logp.grad[i, t]) == pytest.approx(grad, rel=1e-9, abs=1e-12)


def test_aggregations_by_hand_and_split_invariance():
    g = torch.Generator().manual_seed(1)
    losses = torch.randn(6, 7, generator=g, dtype=torch.float64)
    lengths = [7, 3, 5, 1, 6, 2]
    mask = torch.tensor([[t < n for t in range(7)] for n in lengths])
    per_seq = [sum(float(losses[i, t]) for t in range(n)) for i, n in enumerate(lengths)]
    want = {"token_mean": sum(per_seq) / sum(lengths),
            "sequence_mean": sum(s / n for s, n in zip(per_seq, lengths)) / 6,
            "dr_grpo": sum(per_seq) / (6 * 7)}
    counts = {"num_tokens": sum(lengths), "num_sequences": 6}
    for mode, value in want.items():
        num, key = aggregate(losses, mask, mode, max_completion_length=7)
        assert float(num) / counts[key] == pytest.approx(value, rel=1e-12)
        # split into micro-batches of 2: summed numerators over the global count give the same loss
        parts = sum(float(aggregate(losses[j:j + 2], mask[j:j + 2], mode, 7)[0]) for j in range(0, 6, 2))
        assert parts / counts[key] == pytest.approx(value, rel=1e-12)
    with pytest.raises(ValueError, match="unknown loss_type"):
        aggregate(losses, mask, "mean", 7)


def test_batch_loss_assembles_masks_and_the_global_denominator_by_hand():
    """Two rows: row 0 holds completions 0 (2 tokens) and 1 (1 token), row 1 completion 2 (2 tokens,
    dropped by ``keep``); ratio 1 everywhere, so L_it = -A_i (no clipping, beta 0)."""
    from posttrain.train.rl import ppo
    from posttrain.train.rl.grpo import COUNTS, batch_loss

    labels = torch.tensor([[3, -100, 5, 6, 7, -100], [3, 8, 9, -100, -100, -100]])  # [B, T]; targets are labels[:, 1:]
    seq = torch.tensor([[-1, 0, 0, 1, -1], [2, 2, -1, -1, -1]])  # target t belongs to completion seq[t]
    adv = torch.tensor([[0.0, 1.0, 1.0, -2.0, 0.0], [4.0, 4.0, 0.0, 0.0, 0.0]])
    keep = (seq >= 0) & (seq != 2)
    batch = {"labels": labels, "seq_index": seq, "advantages": adv, "old_logp": torch.zeros(2, 5),
             "keep": keep.float()}
    logp = torch.zeros(2, 5, requires_grad=True)
    kw = dict(max_completion_length=4, epsilon=0.2, epsilon_high=None, beta=0.0)
    # token_mean over a global count of 10 tokens: (-1 - 1 + 2) / 10 = 0
    loss, metrics = batch_loss(logp, batch, 10.0, loss_type="token_mean", **kw)
    assert float(loss) == 0.0 and metrics["tokens"] == 3.0 and metrics["clip_fraction"] == 0.0
    # sequence_mean over 4 sequences: completion 0 mean -1, completion 1 mean 2 -> (−1 + 2) / 4
    loss, _ = batch_loss(logp, batch, 4.0, loss_type="sequence_mean", **kw)
    assert float(loss) == pytest.approx(0.25)
    # dr_grpo: (sum of kept token losses) / max_completion_length / 4 sequences = 0
    loss, _ = batch_loss(logp, batch, 4.0, loss_type="dr_grpo", **kw)
    assert float(loss) == 0.0
    assert COUNTS == {"token_mean": "num_tokens", "sequence_mean": "num_sequences", "dr_grpo": "num_sequences",
                      "dapo": "num_tokens", "gspo": "num_sequences", "cispo": "num_tokens"}
    # PPO: policy loss + vf_coef * 0.5 (V - R)^2, over the kept tokens / the global token count 6
    values = torch.zeros(2, 5, requires_grad=True)
    ppo_batch = {**batch, "old_values": torch.zeros(2, 5), "returns": torch.full((2, 5), 2.0)}
    loss, metrics = ppo.batch_loss(logp, values, ppo_batch, 6.0, epsilon=0.2, epsilon_high=None, vf_coef=0.1,
                                   cliprange_value=0.2)
    # per kept token: -A + 0.1 * 0.5 * max((0 - 2)^2, (0 - 2)^2) = -A + 0.2; sum = 0 + 3 * 0.2 = 0.6
    assert float(loss) == pytest.approx(0.6 / 6) and metrics["value_loss"] == pytest.approx(6.0)
    assert ppo.COUNT == "num_tokens"


def test_truncated_importance_sampling_weights_the_policy_term_only_by_hand():
    """``w = min(exp(old - engine), C)`` per token multiplies the clipped term, not the KL term; its
    gradient is w times the unweighted one. GRPO and PPO."""
    from posttrain.train.rl import ppo
    from posttrain.train.rl.grpo import batch_loss, k3_kl

    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    engine = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    cap = 1.5
    w = torch.exp(old - engine).clamp(max=cap)  # e^0.5 = 1.65 -> capped at 1.5; e^-1 = 0.37; 1
    assert w[0].tolist() == pytest.approx([1.5, math.exp(-1.0), 1.0], abs=1e-15)
    ref = torch.tensor([[-1.2, -1.8, -0.4]], dtype=torch.float64)
    logp = old.clone().requires_grad_(True)  # ratio 1: the clipped term is -A per token, d/dlogp = -A
    batch = {"labels": torch.tensor([[1, 2, 3, 4]]), "advantages": torch.tensor([2.0], dtype=torch.float64),
             "old_logp": old, "ref_logp": ref, "is_weight": w}
    loss, _ = batch_loss(logp, batch, 3.0, loss_type="token_mean", max_completion_length=3, epsilon=0.2,
                         epsilon_high=None, beta=0.1)
    want = (-(2.0 * w) + 0.1 * k3_kl(old, ref)).sum() / 3
    assert float(loss) == pytest.approx(float(want), abs=1e-15)
    loss.backward()
    d_kl = -(torch.exp(ref - old) - 1)  # d/dlogp of k3 = -(e^(ref - logp) - 1)
    assert logp.grad[0].tolist() == pytest.approx(((-2.0 * w + 0.1 * d_kl) / 3)[0].tolist(), abs=1e-15)
    values = torch.zeros(1, 3, dtype=torch.float64)
    ppo_batch = {**batch, "advantages": torch.full((1, 3), 2.0, dtype=torch.float64), "old_values": values,
                 "returns": values}
    loss, _ = ppo.batch_loss(old, values, ppo_batch, 3.0, epsilon=0.2, epsilon_high=None, vf_coef=0.1, cliprange_value=0.2)
    assert float(loss) == pytest.approx(float(-(2.0 * w).sum() / 3), abs=1e-15)


def test_rloo_and_reinforce_pp_advantages_by_hand():
    from posttrain.train.rl import advantages

    r = torch.tensor(REWARDS)
    adv, varied = advantages.rloo(r, 4)
    for i, x in enumerate(REWARDS):
        g = REWARDS[i // 4 * 4:i // 4 * 4 + 4]
        assert float(adv[i]) == pytest.approx(x - (sum(g) - x) / 3, abs=1e-6)
    assert varied.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    adv, _ = advantages.reinforce_pp(r, 4)
    mean, std = statistics.mean(REWARDS), statistics.stdev(REWARDS)
    assert adv.tolist() == pytest.approx([(x - mean) / (std + 1e-4) for x in REWARDS], abs=1e-6)
    # the statistics of a global batch, summed from two halves, give the same advantages for each half
    halves = [advantages.batch_stats(r[:4]), advantages.batch_stats(r[4:])]
    total = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    assert advantages.reinforce_pp(r[4:], 4, total)[0].tolist() == pytest.approx(adv[4:].tolist(), abs=1e-6)


def test_gspo_uses_one_clipped_sequence_ratio_by_hand():
    """s_i = exp(mean_t(logp − old)) over each completion's own tokens; L_it = −min(s_i A_i, clip(s_i) A_i);
    with sequence-mean aggregation d loss / d logp_it = −A_i s_i / |o_i| / N unclipped, 0 clipped."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -9.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.1, -2.05, -0.5], [-0.4, -0.2, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.5, -2.0], dtype=torch.float64)
    s = [math.exp((0.1 + 0.05 + 0.0) / 3), math.exp(0.1 / 2)]  # 1.0513, 1.0513
    losses = token_losses(logp, old, adv, 0.2, 0.04, loss_type="gspo", mask=mask)
    want = [-min(s[0] * 1.5, min(s[0], 1.04) * 1.5), -min(s[1] * -2.0, min(s[1], 1.04) * -2.0)]
    assert losses[0].tolist() == pytest.approx([want[0]] * 3, abs=1e-12)
    assert losses[1, :2].tolist() == pytest.approx([want[1]] * 2, abs=1e-12)
    num, key = aggregate(losses, mask, "gspo", 3)
    assert key == "num_sequences"
    (num / 2).backward()
    # sequence 0: A > 0 and s above 1 + 0.04, clipped: no gradient; sequence 1: A < 0, unclipped branch
    assert logp.grad[0].tolist() == [0.0, 0.0, 0.0]
    assert logp.grad[1].tolist() == pytest.approx([2.0 * s[1] / 2 / 2, 2.0 * s[1] / 2 / 2, 0.0], abs=1e-12)
    # two completions sharing a row (seq_index) give the ratios of separate rows
    row = token_losses(logp.detach().reshape(1, 6), old.reshape(1, 6), torch.tensor([[1.5] * 3 + [-2.0] * 3],
                       dtype=torch.float64), 0.2, 0.04, loss_type="gspo", mask=mask.reshape(1, 6),
                       seq_index=torch.tensor([[0, 0, 0, 1, 1, -1]]))
    assert row[0, :5].tolist() == pytest.approx([want[0]] * 3 + [want[1]] * 2, abs=1e-12)


def test_cispo_keeps_every_tokens_gradient_with_a_capped_weight_by_hand():
    """L_it = −sg(min(ρ_it, 1 + ε_h)) A_i logp_it: d/dlogp_it = −min(ρ, 1 + ε_h) A_i, never 0."""
    logp = torch.tensor([[-1.0, -0.5, -2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -0.5, -1.0]], dtype=torch.float64)  # ratios e^0.5 = 1.65, 1, e^-1 = 0.37
    losses = token_losses(logp, old, torch.tensor([2.0], dtype=torch.float64), 0.2, 0.28, loss_type="cispo")
    w = [1.28, 1.0, math.exp(-1.0)]
    assert losses[0].tolist() == pytest.approx([-wi * 2.0 * lp for wi, lp in zip(w, [-1.0, -0.5, -2.0])], abs=1e-12)
    losses.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-wi * 2.0 for wi in w], abs=1e-12)


def test_dapo_is_the_global_token_mean_with_clip_higher():
    from posttrain.config import RLVRConfig
    from posttrain.config_io import load_config

    base = {"model": "m", "output_dir": "o", "datasets": [{"path": "p"}]}
    cfg = load_config(RLVRConfig, base={**base, "loss_type": "dapo"})
    assert (cfg.epsilon_high, cfg.clip_high) == (None, 0.28)  # validate() leaves the config as given
    assert load_config(RLVRConfig, base={**base, "loss_type": "dapo", "epsilon_high": 0.3}).clip_high == 0.3
    assert load_config(RLVRConfig, base={**base, "epsilon": 0.1}).clip_high == 0.1
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(2, 4, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    dapo = aggregate(token_losses(logp, old, adv, 0.2, 0.28, loss_type="dapo"), mask, "dapo", 4)
    token = aggregate(token_losses(logp, old, adv, 0.2, 0.28), mask, "token_mean", 4)
    assert dapo[1] == "num_tokens" and float(dapo[0]) == float(token[0])


def test_overlong_penalty_by_hand():
    """DAPO's soft overlong punishment with L_max 10, buffer 4, penalty 0.5: lengths 3, 6, 8, 10 ->
    0, 0, 0.5 * 2/4, 0.5; subtracted from the verifier's score."""
    from posttrain.inference.engine import Completion
    from posttrain.rewards.combine import Scorer

    completions = [Completion("#### 1", [5] * n, "stop" if n < 10 else "length", 0) for n in (3, 6, 8, 10)]
    scorer = Scorer(["gsm8k"], overlong_buffer=4, overlong_penalty=0.5, max_completion_length=10)
    scores, sums = scorer([{"verifier": "gsm8k", "ground_truth": "1", "messages": []}], completions)
    assert scores.tolist() == pytest.approx([1.0, 1.0, 0.75, 0.5])
    assert sums["overlong"] == pytest.approx(0.75)
