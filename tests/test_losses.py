"""Closed forms of the DPO loss and the chasing regulariser, worked out by hand in each docstring."""

import math

import pytest
import torch

from ofsdpo.losses import CHASE_FORMS, chase_loss, dpo_loss


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


def test_every_chase_form_is_a_config_choice_and_a_distinct_loss():
    """The forms the loss knows are exactly the --chase-form choices, and each is its own objective (minmax and
    symmetric share the leader's term and differ in the chaser's): no form silently falls back to another."""
    import typing

    from ofsdpo.config import TrainingOptions

    assert typing.get_args(typing.get_type_hints(TrainingOptions)["chase_form"]) == CHASE_FORMS
    g = torch.Generator().manual_seed(1)
    inputs = [-5 * torch.rand(4, generator=g, dtype=torch.float64) for _ in range(4)]
    gradients = []
    for form in CHASE_FORMS:
        leaves = [x.clone().requires_grad_() for x in inputs]
        leader, chaser, _ = chase_loss(*leaves, beta=0.5, form=form)
        (leader + chaser).sum().backward()
        gradients.append(torch.cat([x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]))
    for i in range(len(gradients)):
        for j in range(i + 1, len(gradients)):
            assert not torch.allclose(gradients[i], gradients[j]), (CHASE_FORMS[i], CHASE_FORMS[j])


def test_margin_only_forms_are_unchanged_bit_for_bit():
    """minmax and symmetric are exactly the formulas they were before `proximal` was added."""
    g = torch.Generator().manual_seed(0)
    pc, pr, qc, qr = (-10 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.1
    fs = -torch.nn.functional.logsigmoid(beta * ((pc - pr) - (qc - qr)))
    for form, chaser in [("minmax", torch.nn.functional.logsigmoid(beta * ((pc - pr) - (qc - qr)))),
                         ("symmetric", -torch.nn.functional.logsigmoid(beta * ((qc - qr) - (pc - pr))))]:
        leader_terms, chaser_terms, gap = chase_loss(pc, pr, qc, qr, beta, form)
        assert torch.equal(leader_terms, fs) and torch.equal(chaser_terms, chaser) and torch.equal(gap, fs)


def test_proximal_values_and_gradients_closed_form():
    """h_P = 2, h_Q = 1, β_c = 0.5: β_c(h_P − h_Q) = 0.5 ⇒ both terms ½·0.5² = 0.125; gap = −log σ(0.5).
    d(leader)/d log π_P(y_w) = β_c²(h_P − h_Q) = +0.25, d/d log π_P(y_l) = −0.25 (descent lowers h_P);
    d(chaser)/d log π_Q(y_w) = β_c²(h_Q − h_P) = −0.25, d/d log π_Q(y_l) = +0.25 (descent raises h_Q)."""
    leader, chaser, (leader_terms, chaser_terms, gap) = _chase_grads("proximal")
    assert leader_terms.item() == pytest.approx(0.125) and chaser_terms.item() == pytest.approx(0.125)
    assert gap.item() == pytest.approx(math.log1p(math.exp(-0.5))) and not gap.requires_grad
    (leader_terms + chaser_terms).sum().backward()
    assert [x.grad.item() for x in leader] == pytest.approx([0.25, -0.25])
    assert [x.grad.item() for x in chaser] == pytest.approx([-0.25, 0.25])


def test_proximal_stop_gradients():
    leader, chaser, (leader_terms, chaser_terms, _) = _chase_grads("proximal")
    leader_terms.sum().backward()
    assert all(x.grad is None for x in chaser)
    for x in leader:
        x.grad = None
    chaser_terms.sum().backward()
    assert all(x.grad is None for x in leader)


def _descent_step(form, leader_h, chaser_h, beta=0.1, lr=1.0):
    """One gradient-descent step on the chase terms alone, from margins split as chosen = h, rejected = 0.
    Returns the change of each module's margin, per example."""
    lc, lr_, cc, cr = t(*leader_h, grad=True), t(*[0.0] * len(leader_h), grad=True), \
        t(*chaser_h, grad=True), t(*[0.0] * len(chaser_h), grad=True)
    leader_terms, chaser_terms, _ = chase_loss(lc, lr_, cc, cr, beta, form)
    (leader_terms + chaser_terms).sum().backward()
    new_leader = (lc - lr * lc.grad) - (lr_ - lr * lr_.grad)
    new_chaser = (cc - lr * cc.grad) - (cr - lr * cr.grad)
    return (new_leader - lc.detach()).tolist(), (new_chaser - cc.detach()).tolist()


def test_proximal_pulls_the_module_that_is_ahead_back_and_the_one_behind_forward():
    """A hand-made batch: leader ahead by 3, equal, chaser ahead by 2 (before a swap). A descent step on the chase
    term lowers whichever margin is ahead and raises the one behind, by 2 β_c² |Δ| (h = chosen − rejected moves by
    twice the step on each log-prob); nothing moves where the margins are equal."""
    beta = 0.1
    d_leader, d_chaser = _descent_step("proximal", [5.0, 1.0, -1.0], [2.0, 1.0, 1.0], beta)
    assert d_leader[0] == pytest.approx(-2 * beta**2 * 3) and d_chaser[0] == pytest.approx(2 * beta**2 * 3)
    assert d_leader[1] == 0.0 and d_chaser[1] == 0.0
    assert d_leader[2] == pytest.approx(2 * beta**2 * 2) and d_chaser[2] == pytest.approx(-2 * beta**2 * 2)


@pytest.mark.parametrize("form", ["minmax", "symmetric"])
def test_margin_only_forms_always_raise_both_margins(form):
    """The contrast (SPEC §3): minmax and symmetric push each module's own margin up whatever the sign of the
    gap, by 2 β_c σ(·) with σ(·) within (0.42, 0.58) here (|Δ| ≤ 3 nats, β_c = 0.1) — a re-weighted DPO step."""
    d_leader, d_chaser = _descent_step(form, [5.0, 1.0, -1.0], [2.0, 1.0, 1.0], 0.1)
    for d in d_leader + d_chaser:
        assert 2 * 0.1 * 0.42 < d < 2 * 0.1 * 0.58


@pytest.mark.parametrize("form", CHASE_FORMS)
def test_gradient_at_equal_margins(form):
    """Δ = 0: proximal puts no gradient on either module; the margin-only forms give each module exactly
    β_c/2 · (−∇h), the direction of its own DPO gradient at the start (where DPO's is β/2 · (−∇h))."""
    leader = [t(-1.0, -4.0, grad=True), t(-3.0, -2.0, grad=True)]
    chaser = [t(-2.0, -5.0, grad=True), t(-4.0, -3.0, grad=True)]  # same margins (2, −2), other log-probs
    leader_terms, chaser_terms, gap = chase_loss(*leader, *chaser, beta=0.1, form=form)
    (leader_terms + chaser_terms).sum().backward()
    assert torch.allclose(gap, torch.full((2,), math.log(2), dtype=torch.float64))
    expected = 0.0 if form == "proximal" else 0.05
    for x in leader + chaser:
        sign = -1 if x is leader[0] or x is chaser[0] else 1
        assert torch.allclose(x.grad, torch.full((2,), sign * expected, dtype=torch.float64))


def test_loss_types_closed_forms_float64():
    """Each `--loss-type` on fixed log-probs (float64), worked by hand: h = (−1 − −2) − (−3 − −2.5) = 1.5 summed;
    ipo reads per-token log-ratios: 1/4 − (−0.5)/2 = 0.5."""
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.5))
    beta, eps, z = 0.1, 0.1, 0.15
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    expected = {"sigmoid": -logsig(z), "hinge": 1 - z, "ipo": (0.5 - 1 / (2 * beta)) ** 2,
                "robust": (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)}
    for loss_type, value in expected.items():
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            *args, beta=beta, loss_type=loss_type, label_smoothing=eps if loss_type == "robust" else 0.0,
            chosen_lengths=t(4), rejected_lengths=t(2))
        assert losses.item() == pytest.approx(value, rel=1e-12), loss_type
        assert chosen_rewards.item() == pytest.approx(0.1) and rejected_rewards.item() == pytest.approx(-0.05)
    conservative, *_ = dpo_loss(*args, beta=beta, label_smoothing=eps)  # cDPO: labels flipped with probability ε
    assert conservative.item() == pytest.approx(-(1 - eps) * logsig(z) - eps * logsig(-z), rel=1e-12)
    robust_at_zero, *_ = dpo_loss(*args, beta=beta, loss_type="robust")
    assert robust_at_zero.item() == pytest.approx(expected["sigmoid"], rel=1e-12)


def test_loss_types_refuse_what_has_no_meaning():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="loss type must be one of"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="minmax chase has no maximum under the ipo"):
        chase_loss(x, x, x, x, beta=0.1, form="minmax", loss_type="ipo", chosen_lengths=x + 1, rejected_lengths=x + 1)


@pytest.mark.parametrize("loss_type", ["hinge", "robust", "ipo"])
def test_the_chase_uses_the_dpo_family_with_the_other_module_as_reference(loss_type):
    """L_FS(P, Q) = ℓ(h_P − h_Q): the leader's chase term is the DPO loss of P with Q in the reference's place; the
    symmetric chaser's is Q's with P as reference; gradients stop at the other module."""
    torch.manual_seed(0)
    leader = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    chaser = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3.0, 7, 2, 5, 4], dtype=torch.float64), torch.tensor([6.0, 1, 4, 2, 3], dtype=torch.float64)
    extra = {"loss_type": loss_type, "label_smoothing": 0.2 if loss_type == "robust" else 0.0,
             "chosen_lengths": lengths[0], "rejected_lengths": lengths[1]}
    lead, chase, _ = chase_loss(*leader, *chaser, beta=0.3, form="symmetric", **extra)
    as_dpo, _, _ = dpo_loss(*leader, *chaser.detach(), beta=0.3, **extra)
    chaser_as_dpo, _, _ = dpo_loss(*chaser, *leader.detach(), beta=0.3, **extra)
    torch.testing.assert_close(lead, as_dpo, rtol=0, atol=1e-12)
    torch.testing.assert_close(chase, chaser_as_dpo, rtol=0, atol=1e-12)
    lead.sum().backward()
    assert chaser.grad is None and leader.grad.abs().sum() > 0
    if loss_type != "ipo":
        lead_mm, chase_mm, _ = chase_loss(*leader, *chaser, beta=0.3, form="minmax", **extra)
        torch.testing.assert_close(chase_mm, -as_dpo.detach(), rtol=0, atol=1e-12)
