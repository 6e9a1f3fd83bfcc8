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


CHASE_FORMS = ("minmax", "symmetric", "proximal")
"""The accepted `form`s of `chase_loss` (SPEC §3); config's `chase_form` choices."""


def chase_loss(
    leader_chosen_logps: torch.Tensor,
    leader_rejected_logps: torch.Tensor,
    chaser_chosen_logps: torch.Tensor,
    chaser_rejected_logps: torch.Tensor,
    beta: float,
    form: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast-slow chasing regulariser of OFS-DPO (SPEC §3), with its stop-gradients.

    `beta` is the chase temperature β_c (`--chase-beta`, by default the DPO β). With margins
    h = log π(y_w) − log π(y_l) (π_ref cancels, so no reference log-probs are needed) and Δ = h_P − h_Q:

        L_FS(A, B) = −log σ(β_c (h_A − h_B))

    Returns `(leader_losses, chaser_losses, gap_losses)`, each `(B,)`; the leader's term has gradient only on the
    leader P, the chaser's only on the chaser Q:
      - minmax:    leader  L_FS(P, sg Q) = −log σ(β_c Δ);   chaser −L_FS(sg P, Q) = log σ(β_c Δ)
                   (Q maximises the shared objective: the min-max game)
      - symmetric: leader  L_FS(P, sg Q);                    chaser  L_FS(Q, sg P) = −log σ(−β_c Δ)
                   (Q tries to be preferred over P; non-saturating)
      - proximal:  leader  ½ (β_c (h_P − sg h_Q))²;          chaser  ½ (β_c (h_Q − sg h_P))²
                   (each module is pulled toward the other: d/dh_self = β_c² (h_self − h_other), so the module
                   that is ahead is pulled back and the one behind pulled forward; zero gradient when equal)
      - gap_losses = L_FS(P, Q) = −log σ(β_c Δ), detached, for every form: the value to log as `chase/loss`
        (below log 2 while the leader is ahead), comparable across forms.
    The caller adds α·(leader_losses + chaser_losses) to the two modules' DPO losses and calls backward once.

    Why a form that can change sign: minmax and symmetric are functions of Δ only, so each module's gradient is
    its own margin gradient ∇h times a weight of one fixed sign, the sign of its own DPO weight −β σ(−β h)
    (leader −β_c σ(−β_c Δ); chaser −β_c σ(−β_c Δ) in minmax, −β_c σ(β_c Δ) in symmetric: always "raise your
    own margin"): a per-example re-weighting of the DPO gradient, σ(·) ∈ (0.43, 0.57) while |Δ| < 3 nats at
    β_c = 0.1. At the start both modules equal π_ref (Δ = 0 and every DPO margin 0), so the first gradient is
    exactly the α = 0 gradient times 1 + α β_c / β (the same Adam step). The proximal weight
    β_c² (h_self − h_other) has the sign of the gap; it is 0 at the start and grows as the modules part.
    """
    if form not in CHASE_FORMS:
        raise ValueError(f"chase form must be one of {', '.join(map(repr, CHASE_FORMS))}; got {form!r}")
    h_leader = preference_margin(leader_chosen_logps, leader_rejected_logps)
    h_chaser = preference_margin(chaser_chosen_logps, chaser_rejected_logps)
    if form == "proximal":
        leader_losses = 0.5 * (beta * (h_leader - h_chaser.detach())) ** 2
        chaser_losses = 0.5 * (beta * (h_chaser - h_leader.detach())) ** 2
    else:
        leader_losses = -F.logsigmoid(beta * (h_leader - h_chaser.detach()))
        if form == "minmax":
            chaser_losses = F.logsigmoid(beta * (h_leader.detach() - h_chaser))
        else:
            chaser_losses = -F.logsigmoid(beta * (h_chaser - h_leader.detach()))
    gap_losses = -F.logsigmoid(beta * (h_leader - h_chaser)).detach()
    return leader_losses, chaser_losses, gap_losses
