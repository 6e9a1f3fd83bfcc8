"""Held-out DPO loss and preference accuracy of one adapter, against the cached reference."""

from __future__ import annotations

import torch

from .data import PreferenceData, collate
from .logprobs import concatenated_forward
from .losses import dpo_loss
from .modules import activate
from .reference import ReferenceCache


@torch.no_grad()
def pair_losses(model, data: PreferenceData, reference: ReferenceCache, indices: list[int], adapter: str,
                pad_token_id: int, beta: float, batch_size: int = 8, chunk_size: int = 1024, trained=None):
    """Per-pair DPO loss and correctness (r(y_w) > r(y_l)) of `adapter` on `data[indices]`: no dropout, no grad."""
    reference.fill(model, data.pairs, indices, pad_token_id, batch_size, chunk_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    activate(model, adapter, trained)
    losses, correct = [], []
    for start in range(0, len(indices), batch_size):
        batch = collate([data.pairs[i] for i in indices[start:start + batch_size]], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        chosen, rejected = concatenated_forward(model, batch, chunk_size)
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, *reference.get(batch["index"], device), beta)
        losses.append(loss.float().cpu())
        correct.append((chosen_rewards > rejected_rewards).float().cpu())
    model.train(was_training)
    return torch.cat(losses), torch.cat(correct)


def heldout_scores(model, data: PreferenceData, reference: ReferenceCache, adapter: str, pad_token_id: int,
                   beta: float, batch_size: int = 8, chunk_size: int = 1024, trained=None) -> dict[str, float]:
    losses, correct = pair_losses(model, data, reference, list(range(len(data))), adapter, pad_token_id, beta,
                                  batch_size, chunk_size, trained)
    return {"loss": losses.mean().item(), "accuracy": correct.mean().item()}
