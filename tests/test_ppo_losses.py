"""PPO pieces against hand-computed values and a plain-Python GAE."""

import pytest
import torch

from posttrain.train.rl import ppo


def python_gae(rewards, values, gamma, lam):
    """GAE for one completion, written out as in the PPO paper (V after the last token is 0)."""
    T = len(rewards)
    adv = [0.0] * T
    running = 0.0
    for t in reversed(range(T)):
        nxt = values[t + 1] if t + 1 < T else 0.0
        running = rewards[t] + gamma * nxt - values[t] + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def test_token_rewards_put_the_score_on_the_last_completion_token():
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [-0.5, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [-1.0, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    r = ppo.token_rewards(torch.tensor([10.0, 0.0]), logp, ref, mask, beta=0.1)
    # -beta * (logp - ref) on completion tokens, + score on the last one
    assert r.flatten().tolist() == pytest.approx([0.0, -0.05, 0.1 + 10.0, 0.0, -0.05, 0.0, 0.0, 0.0])
    no_kl = ppo.token_rewards(torch.tensor([1.0, 2.0]), logp, None, mask, beta=0.1)
    assert no_kl.flatten().tolist() == pytest.approx([0, 0, 1, 0, 0, 2, 0, 0])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_the_textbook_recursion(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    spans = [(0, 7), (2, 5), (4, 5)]  # completions start anywhere in a row, as in the training layout
    for i, (a, b) in enumerate(spans):
        mask[i, a:b] = True
    rewards = rewards * mask
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for i, (a, b) in enumerate(spans):
        want_adv, want_ret = python_gae(rewards[i, a:b].tolist(), values[i, a:b].tolist(), gamma, lam)
        assert adv[i, a:b].tolist() == pytest.approx(want_adv, abs=1e-5)
        assert ret[i, a:b].tolist() == pytest.approx(want_ret, abs=1e-5)
        assert float(adv[i][~mask[i]].abs().sum()) == 0.0


def test_gae_hand_computed():
    # rewards [0, 1], values [0.5, 0.2], gamma 1, lam 0.5:
    # d1 = 1 - 0.2 = 0.8; A1 = 0.8; d0 = 0 + 0.2 - 0.5 = -0.3; A0 = -0.3 + 0.5 * 0.8 = 0.1
    adv, ret = ppo.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.tensor([[True, True]]), 1.0, 0.5)
    assert adv.flatten().tolist() == pytest.approx([0.1, 0.8])
    assert ret.flatten().tolist() == pytest.approx([0.6, 1.0])


def test_whiten_uses_the_masked_global_statistics():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    stats = ppo.whiten_stats(x, mask)
    assert stats == {"sum": 6.0, "sumsq": 14.0, "count": 3.0}
    w = ppo.whiten(x, mask, stats)
    sd = (2 / 3) ** 0.5  # biased variance of 1, 2, 3
    assert w[mask].tolist() == pytest.approx([-1 / sd, 0.0, 1 / sd], abs=1e-5)
    assert w[~mask].tolist() == [0.0, 0.0, 0.0]
    # two halves all-reduced give the same as the whole
    a, b = ppo.whiten_stats(x[:1], mask[:1]), ppo.whiten_stats(x[1:], mask[1:])
    assert {k: a[k] + b[k] for k in a} == stats


def test_clipped_value_loss():
    v, old, ret = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 0.5, 2.0]), torch.tensor([0.0, 1.0, 2.5])
    got = ppo.value_losses(v, old, ret, cliprange=0.2)
    # 1: clipped to 0.7 -> max(1.0, 0.49) = 1.0 -> 0.5; 2: clipped 0.3 -> max(1, 0.49) -> 0.5; 3: 0.125
    assert got.tolist() == pytest.approx([0.5, 0.5, 0.125])
    v2 = torch.tensor([0.6])  # inside the clip range: the plain squared error
    assert ppo.value_losses(v2, torch.tensor([0.5]), torch.tensor([0.0]), 0.2).tolist() == pytest.approx([0.18])
