"""Closed forms of the DPO loss and the chasing regulariser, worked out by hand in each docstring."""

import math

import pytest
import torch

from ofsdpo.losses import chase_loss, dpo_loss


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def test_dpo_loss_is_log2_at_zero_margin():
    """policy == reference ⇒ h = 0 ⇒ -log σ(0) = log 2, and both rewards are 0."""
    losses, chosen, rejected = dpo_loss(t(-3.0, -7.0), t(-5.0, -2.0), t(-3.0, -7.0), t(-5.0, -2.0), beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2), dtype=torch.float64))
    assert torch.equal(chosen, torch.zeros(2, dtype=torch.float64)) and torch.equal(rejected, chosen)


def test_dpo_loss_closed_form_and_rewards():
    """h = (−1 − (−2)) − (−4 − (−3)) = 1 + 1 = 2; β = 0.5 ⇒ loss = −log σ(1) = log(1 + e^−1)."""
    losses, chosen, rejected = dpo_loss(t(-1.0), t(-4.0), t(-2.0), t(-3.0), beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)


def test_dpo_loss_tends_to_log2_as_beta_vanishes():
    losses, _, _ = dpo_loss(t(-1.0), t(-9.0), t(-5.0), t(-5.0), beta=1e-8)
    assert losses.item() == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_gradient_matches_hand_derivation():
    """dL/d log π(y_w) = −β σ(−βh), dL/d log π(y_l) = +β σ(−βh); rewards carry no gradient."""
    pc, pr = t(-1.0, grad=True), t(-4.0, grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, t(-2.0), t(-3.0), beta=0.5)
    losses.sum().backward()
    s = 1 / (1 + math.exp(1.0))  # σ(−βh) with βh = 1
    assert pc.grad.item() == pytest.approx(-0.5 * s)
    assert pr.grad.item() == pytest.approx(0.5 * s)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def _chase_grads(form):
    leader = [t(-1.0, grad=True), t(-3.0, grad=True)]  # h_P = 2
    chaser = [t(-2.0, grad=True), t(-3.0, grad=True)]  # h_Q = 1
    return leader, chaser, chase_loss(*leader, *chaser, beta=0.5, form=form)


@pytest.mark.parametrize("form", ["minmax", "symmetric"])
def test_stop_gradients_really_stop(form):
    """The leader's term puts no gradient on the chaser, and the chaser's term none on the leader."""
    leader, chaser, (leader_terms, chaser_terms, gap) = _chase_grads(form)
    leader_terms.sum().backward(retain_graph=True)
    assert all(x.grad is None or x.grad.abs().sum() == 0 for x in chaser)
    assert all(x.grad.abs().sum() > 0 for x in leader)
    for x in leader:
        x.grad = None
    chaser_terms.sum().backward()
    assert all(x.grad is None or x.grad.abs().sum() == 0 for x in leader)
    assert all(x.grad.abs().sum() > 0 for x in chaser)
    assert not gap.requires_grad


def test_chase_loss_values_and_gradients_minmax():
    """β(h_P − h_Q) = 0.5 ⇒ L_FS = −log σ(0.5); minmax chaser term = log σ(0.5) = −L_FS.
    d(chaser)/d log π_Q(y_w) = −β σ(−0.5): descent raises the chaser's margin toward the leader's."""
    leader, chaser, (leader_terms, chaser_terms, gap) = _chase_grads("minmax")
    l_fs = -math.log(1 / (1 + math.exp(-0.5)))
    assert leader_terms.item() == pytest.approx(l_fs) and gap.item() == pytest.approx(l_fs)
    assert chaser_terms.item() == pytest.approx(-l_fs)
    chaser_terms.sum().backward()
    s = 1 / (1 + math.exp(0.5))
    assert chaser[0].grad.item() == pytest.approx(-0.5 * s)
    assert chaser[1].grad.item() == pytest.approx(0.5 * s)


def test_chase_loss_symmetric_is_non_saturating():
    """symmetric chaser term −log σ(β(h_Q − h_P)) = −log σ(−0.5); gradient −β σ(0.5) on log π_Q(y_w):
    larger than minmax's −β σ(−0.5) whenever the chaser is behind."""
    leader, chaser, (_, chaser_terms, _) = _chase_grads("symmetric")
    assert chaser_terms.item() == pytest.approx(math.log1p(math.exp(0.5)))
    chaser_terms.sum().backward()
    assert chaser[0].grad.item() == pytest.approx(-0.5 / (1 + math.exp(-0.5)))


def test_leader_gradient_closed_form():
    """d L_FS(P, sg Q)/d log π_P(y_w) = −β σ(−β(h_P − h_Q)) = −0.5 σ(−0.5)."""
    leader, chaser, (leader_terms, _, _) = _chase_grads("minmax")
    leader_terms.sum().backward()
    assert leader[0].grad.item() == pytest.approx(-0.5 / (1 + math.exp(0.5)))
    assert leader[1].grad.item() == pytest.approx(0.5 / (1 + math.exp(0.5)))


def test_chase_loss_rejects_unknown_form():
    with pytest.raises(ValueError, match="minmax"):
        chase_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, form="other")
