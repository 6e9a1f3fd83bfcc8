"""Preference losses as pure functions of summed sequence log-probs.

Every argument is a `(B,)` tensor of summed completion log-probs; every function returns per-example `(B,)`
tensors, so the caller chooses the reduction. No model, device or config lives here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (SPEC §2): L = -log σ(β·h), h = [log π(y_w) - log π_ref(y_w)] - [log π(y_l) - log π_ref(y_l)].

    Returns `(losses, chosen_rewards, rejected_rewards)`, each `(B,)`, as TRL does. The rewards are the implicit
    rewards r = β(log π - log π_ref), detached: they are for logging, never for gradients.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def preference_margin(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """log π(y_w) - log π(y_l): h without the reference, which cancels in every difference of two modules' h."""
    return chosen_logps - rejected_logps


def chase_loss(
    leader_chosen_logps: torch.Tensor,
    leader_rejected_logps: torch.Tensor,
    chaser_chosen_logps: torch.Tensor,
    chaser_rejected_logps: torch.Tensor,
    beta: float,
    form: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast-slow chasing regulariser of OFS-DPO (SPEC §3), with its stop-gradients.

    L_FS(A, B) = -log σ(β(h_A - h_B)); π_ref cancels, so no reference log-probs are needed.

    Returns `(leader_losses, chaser_losses, gap_losses)`, each `(B,)`:
      - leader_losses = L_FS(P, sg Q): gradient only on the leader P (it wants to stay preferred over Q).
      - chaser_losses, gradient only on the chaser Q:
          minmax:    -L_FS(sg P, Q) = log σ(β(h_P - h_Q))   (Q maximises the shared objective: min-max game)
          symmetric:  L_FS(Q, sg P) = -log σ(β(h_Q - h_P))  (Q tries to be preferred over P; non-saturating)
      - gap_losses = L_FS(P, Q), detached: the value to log as `chase/loss`.
    The caller adds α·(leader_losses + chaser_losses) to the two modules' DPO losses and calls backward once.
    """
    if form not in ("minmax", "symmetric"):
        raise ValueError(f"chase form must be 'minmax' or 'symmetric', got {form!r}")
    h_leader = preference_margin(leader_chosen_logps, leader_rejected_logps)
    h_chaser = preference_margin(chaser_chosen_logps, chaser_rejected_logps)
    leader_losses = -F.logsigmoid(beta * (h_leader - h_chaser.detach()))
    if form == "minmax":
        chaser_losses = F.logsigmoid(beta * (h_leader.detach() - h_chaser))
    else:
        chaser_losses = -F.logsigmoid(beta * (h_chaser - h_leader.detach()))
    gap_losses = -F.logsigmoid(beta * (h_leader - h_chaser)).detach()
    return leader_losses, chaser_losses, gap_losses
