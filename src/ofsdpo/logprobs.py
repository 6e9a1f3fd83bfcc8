"""Sequence log-probs of completions: one concatenated forward, completion tokens only, chunked over the vocabulary.

A batch holds chosen and rejected sequences stacked as `[chosen; rejected]` (shape `(2B, T)`), so one forward pass
scores both and `.chunk(2)` splits them (SPEC §2 needs both for h). Only the positions whose next token is a
completion token go through the LM head, in chunks of `chunk_size` tokens, each upcast to fp32 on its own and
recomputed in backward (activation checkpointing): the fp32 log-softmax over the whole vocabulary never exists
for the whole batch at once.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _causal_lm_parts(model: torch.nn.Module):
    """(backbone, lm_head, text_config) of a (peft-wrapped) causal LM, or None where the layout is unknown."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is lm:
        return None
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return backbone, head, config


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap, scale) -> torch.Tensor:
    """log p(label) for each row of `hidden` (N, H): LM head, then fp32 log-softmax of this chunk only."""
    logits = head(hidden)
    if scale is not None:
        logits = logits * scale
    logits = logits.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed log-probs of the completion tokens of each row, `(N,)` in fp32.

    `completion_mask[i, t] = 1` where token t of row i is a completion token; prompt and padding are 0, so they add
    nothing whatever their logits are (padding-safe).
    """
    parts = _causal_lm_parts(model)
    if parts is None:  # an unusual architecture: fall back to full logits (same numbers, more memory)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return naive_sequence_logps(logits, input_ids, completion_mask)
    backbone, head, config = parts
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # position t predicts token t+1: score hidden[:, t] against input_ids[:, t+1] where t+1 is a completion token
    target_mask = completion_mask[:, 1:].bool()
    rows, cols = target_mask.nonzero(as_tuple=True)
    hidden = hidden[:, :-1][rows, cols]
    labels = input_ids[:, 1:][rows, cols]
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    chunks = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            chunks.append(checkpoint(_token_logps, head, h, y, softcap, scale, use_reentrant=False))
        else:
            chunks.append(_token_logps(head, h, y, softcap, scale))
    token_logps = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return sums.index_add(0, rows, token_logps)


def naive_sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Reference implementation: full fp32 log-softmax, then gather and masked sum. For tests and odd models."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token_logps = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (per_token_logps * completion_mask[:, 1:]).sum(-1)


def concatenated_forward(model: torch.nn.Module, batch: dict, chunk_size: int = 1024):
    """One forward over `[chosen; rejected]`; returns `(chosen_logps, rejected_logps)`, each `(B,)`."""
    logps = sequence_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_size=chunk_size
    )
    return logps.chunk(2)
