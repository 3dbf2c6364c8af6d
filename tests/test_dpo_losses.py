"""Preference losses and their gradients against hand computations on fixed numbers."""

import math

import pytest
import torch

from posttrain.train.dpo import preference_loss
from posttrain.train.reward import bradley_terry_loss

PC = [-5.0, -12.3, -3.1, -20.0]
PR = [-6.2, -11.0, -9.9, -19.5]
RC = [-5.5, -12.0, -4.0, -21.0]
RR = [-5.9, -11.5, -8.0, -18.0]
NC = [4.0, 10.0, 3.0, 12.0]
NR = [5.0, 9.0, 7.0, 11.0]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand(loss_type, i, beta, eps=0.0, ratio=0.5):
    """One pair's loss and d loss / d (pc, pr), written out from the formulas."""
    pc, pr, rc, rr, nc, nr = PC[i], PR[i], RC[i], RR[i], NC[i], NR[i]
    if loss_type == "dpo":
        d = (pc - pr) - (rc - rr)
        loss = -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
        g = -beta * ((1 - eps) * sig(-beta * d) - eps * sig(beta * d))
        return loss, g, -g
    if loss_type == "dpo_norm":
        d = (pc / nc - pr / nr) - (rc / nc - rr / nr)
        loss = -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
        g = -beta * ((1 - eps) * sig(-beta * d) - eps * sig(beta * d))
        return loss, g / nc, -g / nr
    if loss_type == "simpo":
        z = beta * (pc / nc - pr / nr) - ratio * beta
        return -logsig(z), -beta * sig(-z) / nc, beta * sig(-z) / nr
    if loss_type == "ipo":
        d = (pc / nc - pr / nr) - (rc / nc - rr / nr)
        return (d - 1 / (2 * beta)) ** 2, 2 * (d - 1 / (2 * beta)) / nc, -2 * (d - 1 / (2 * beta)) / nr
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type, beta, eps", [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("dpo_norm", 5.0, 0.0),
                                                  ("dpo_norm", 2.0, 0.1), ("simpo", 2.0, 0.0), ("ipo", 0.1, 0.0),
                                                  ("ipo", 1.0, 0.0)])
def test_loss_and_gradient_match_hand_computation(loss_type, beta, eps):
    pc = torch.tensor(PC, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(PR, dtype=torch.float64, requires_grad=True)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    losses, _, _ = preference_loss(loss_type, pc, pr, t(RC), t(RR), t(NC), t(NR), beta, eps, 0.5)
    losses.sum().backward()
    for i in range(len(PC)):
        loss, gc, gr = hand(loss_type, i, beta, eps)
        assert float(losses[i]) == pytest.approx(loss, rel=1e-10, abs=1e-12)
        assert float(pc.grad[i]) == pytest.approx(gc, rel=1e-9, abs=1e-12)
        assert float(pr.grad[i]) == pytest.approx(gr, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["dpo", "dpo_norm"])
def test_rpo_adds_the_chosen_per_token_nll(loss_type):
    """RPO: L + alpha * (-pc / nc); d/dpc gains -alpha / nc, d/dpr is unchanged."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    pc = torch.tensor(PC, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(PR, dtype=torch.float64, requires_grad=True)
    losses, _, _ = preference_loss(loss_type, pc, pr, t(RC), t(RR), t(NC), t(NR), 0.5, rpo_alpha=0.7)
    losses.sum().backward()
    for i in range(len(PC)):
        loss, gc, gr = hand(loss_type, i, 0.5)
        assert float(losses[i]) == pytest.approx(loss + 0.7 * -PC[i] / NC[i], rel=1e-10)
        assert float(pc.grad[i]) == pytest.approx(gc - 0.7 / NC[i], rel=1e-9)
        assert float(pr.grad[i]) == pytest.approx(gr, rel=1e-9)


def test_implicit_rewards():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    _, c, r = preference_loss("dpo", t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), 0.1)
    assert c.tolist() == pytest.approx([0.1 * (a - b) for a, b in zip(PC, RC)])
    assert r.tolist() == pytest.approx([0.1 * (a - b) for a, b in zip(PR, RR)])
    _, c, _ = preference_loss("dpo_norm", t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), 5.0)
    assert c.tolist() == pytest.approx([5.0 * (a - b) / n for a, b, n in zip(PC, RC, NC)])
    _, c, _ = preference_loss("simpo", t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), 2.0)
    assert c.tolist() == pytest.approx([2.0 * a / n for a, n in zip(PC, NC)])


def test_bradley_terry():
    c = torch.tensor([1.5, -0.2, 3.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.5, 0.4, -1.0], dtype=torch.float64)
    loss = bradley_terry_loss(c, r)
    loss.sum().backward()
    for i in range(3):
        assert float(loss[i]) == pytest.approx(-logsig(float(c[i] - r[i])), rel=1e-12)
        assert float(c.grad[i]) == pytest.approx(-sig(-float(c[i] - r[i])), rel=1e-10)
