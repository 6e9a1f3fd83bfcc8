"""Preference losses as pure functions of summed sequence log-probs.

Every argument is a `(B,)` tensor of summed completion log-probs; every function returns per-example `(B,)`
tensors, so the caller chooses the reduction. No model, device or config lives here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
"""`--loss-type`: the per-pair loss ℓ of a preference margin, TRL's names and formulas (`DPOTrainer`, trl 1.16)."""


def preference_loss(margins: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """ℓ(h) per pair, for a `(B,)` margin h (a difference of log-ratios; per token under ipo, see `dpo_loss`):

      - sigmoid: −(1 − ε) log σ(βh) − ε log σ(−βh)  (DPO, Rafailov et al. 2023, eq. 7; ε > 0: conservative DPO,
        the labels flipped with probability ε)
      - robust:  [−(1 − ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)  (rDPO, Chowdhury et al. 2024, eq. 12: unbiased under
        label noise ε; ε ∈ [0, 0.5))
      - hinge:   max(0, 1 − βh)  (SLiC, Zhao et al. 2023)
      - ipo:     (h − 1/(2β))²  (IPO, Azar et al. 2023, eq. 17, β as its τ)
    At ε = 0 robust equals sigmoid.
    """
    if loss_type == "sigmoid" and label_smoothing == 0:
        return -F.logsigmoid(beta * margins)  # the plain DPO loss, bit for bit as before loss types existed
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * margins) - label_smoothing * F.logsigmoid(-beta * margins)
    if loss_type == "robust":
        clean, flipped = F.logsigmoid(beta * margins), F.logsigmoid(-beta * margins)
        return (-(1 - label_smoothing) * clean + label_smoothing * flipped) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * margins)
    if loss_type == "ipo":
        return (margins - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss type must be one of {', '.join(map(repr, LOSS_TYPES))}; got {loss_type!r}")


def per_token(logps: torch.Tensor, lengths: torch.Tensor | None, loss_type: str) -> torch.Tensor:
    """Summed log-probs as IPO reads them: divided by the completion's token count (TRL's normalisation, which the
    IPO authors confirmed); unchanged for every other loss type."""
    if loss_type != "ipo":
        return logps
    if lengths is None:
        raise ValueError("the ipo loss needs the completions' token counts (chosen_lengths, rejected_lengths)")
    return logps / lengths.clamp(min=1).to(logps.dtype)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (SPEC §2): L = ℓ(h), h = [log π(y_w) - log π_ref(y_w)] - [log π(y_l) - log π_ref(y_l)]; ℓ is
    `preference_loss` (by default −log σ(β·h)). Under ipo each log-ratio is divided by its completion's token count
    (`chosen_lengths`, `rejected_lengths`: `(B,)`, required then).

    Returns `(losses, chosen_rewards, rejected_rewards)`, each `(B,)`, as TRL does. The rewards are the implicit
    rewards r = β(log π - log π_ref) of the summed log-probs under every loss type, detached: they are for logging,
    never for gradients.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margins = (per_token(chosen_logratios, chosen_lengths, loss_type)
               - per_token(rejected_logratios, rejected_lengths, loss_type))
    losses = preference_loss(margins, beta, loss_type, label_smoothing)
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
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
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

    Loss types (`--loss-type`, SPEC §3): L_FS is the DPO family's own ℓ with the other module as the reference,
    L_FS(A, B) = ℓ(h_A − h_B) (`preference_loss`; per token under ipo, as its DPO term), so minmax's leader is
    ℓ(Δ) and its chaser −ℓ(Δ), symmetric's chaser ℓ(−Δ). Minmax with ipo is refused: −(Δ − 1/(2β_c))² has no
    maximum (the chaser would gain by moving either way). Proximal and `gap_losses` are as above under every type.

    Why minmax and symmetric barely act (they only re-weight each module's own DPO gradient, by σ(·) near ½ while
    the modules are close) and proximal can (its weight changes sign with the gap): SPEC §3.
    """
    if form not in CHASE_FORMS:
        raise ValueError(f"chase form must be one of {', '.join(map(repr, CHASE_FORMS))}; got {form!r}")
    if form == "minmax" and loss_type == "ipo":
        raise ValueError("the minmax chase has no maximum under the ipo loss; use chase form symmetric or proximal")
    h_leader = preference_margin(per_token(leader_chosen_logps, chosen_lengths, loss_type),
                                 per_token(leader_rejected_logps, rejected_lengths, loss_type))
    h_chaser = preference_margin(per_token(chaser_chosen_logps, chosen_lengths, loss_type),
                                 per_token(chaser_rejected_logps, rejected_lengths, loss_type))
    if form == "proximal":
        leader_losses = 0.5 * (beta * (h_leader - h_chaser.detach())) ** 2
        chaser_losses = 0.5 * (beta * (h_chaser - h_leader.detach())) ** 2
    else:
        leader_losses = preference_loss(h_leader - h_chaser.detach(), beta, loss_type, label_smoothing)
        if form == "minmax":
            chaser_losses = -preference_loss(h_leader.detach() - h_chaser, beta, loss_type, label_smoothing)
        else:
            chaser_losses = preference_loss(h_chaser - h_leader.detach(), beta, loss_type, label_smoothing)
    gap_losses = -F.logsigmoid(beta * (h_leader - h_chaser)).detach()
    return leader_losses, chaser_losses, gap_losses
