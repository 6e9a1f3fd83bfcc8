"""Sequence log-probs of completions: one concatenated forward, completion tokens only, chunked over the vocabulary.

A batch holds chosen and rejected sequences stacked as `[chosen; rejected]` (shape `(2B, T)`), so one forward pass
scores both and `.chunk(2)` splits them (SPEC §2 needs both for h). Only the positions whose next token is a
completion token go through the LM head, in chunks of `chunk_size` tokens, each upcast to fp32 on its own: the
fp32 log-softmax over the whole vocabulary never exists for the whole batch at once.

Backward through the head without recomputing it: with a frozen head (LoRA), d log p(y)/d logits = onehot(y) -
softmax, so each chunk's gradient with respect to its hidden states is computed in the forward, while the chunk's
logits are at hand, and kept (N x H, small); backward only scales it by the upstream gradient. Activation
checkpointing would run the head's vocabulary-wide matmul and log-softmax a second time in backward. A trainable
or unusual head falls back to checkpointing.

The positions to score come from `completion_mask` alone, so they are found before the backbone runs (on a GPU,
`nonzero` waits for the device: then, it waits for the input copy only, not for the forward) and are reused by the
next call on the same batch (OFS-DPO's second module).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
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


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax precision: fp32 at least (bf16/fp16 heads), fp64 kept (exact equivalence tests run in fp64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap, scale) -> torch.Tensor:
    """log p(label) for each row of `hidden` (N, H): LM head, then fp32 log-softmax of this chunk only."""
    logits = head(hidden)
    if scale is not None:
        logits = logits * scale
    logits = _upcast(logits)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _FrozenHeadLogps(torch.autograd.Function):
    """`_token_logps` of a plain frozen `nn.Linear` head, its hidden-state gradient computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, scale):
        logits = _upcast(F.linear(hidden, weight, bias))  # a new tensor (or fp32 already): free to overwrite below
        if scale is not None:
            logits.mul_(scale)
        tanh = None
        if softcap is not None:
            tanh = logits.div_(softcap).tanh_()
            logits = tanh.mul(softcap)
        lse = torch.logsumexp(logits, dim=-1)
        out = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
        # d out / d logits = onehot(label) - softmax, then the softcap and scale chain rule; in place over the logits
        grad = logits.sub_(lse.unsqueeze(-1)).exp_().neg_()
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad.new_ones(labels.shape[0], 1))
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1))
        if scale is not None:
            grad.mul_(scale)
        ctx.save_for_backward(grad.to(weight.dtype) @ weight)  # (N, H): d out_i / d hidden_i
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out.unsqueeze(-1).to(grad_hidden.dtype), None, None, None, None, None


def _frozen_linear(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def _chunk_logps(head, hidden, labels, softcap, scale) -> torch.Tensor:
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        with torch.no_grad():
            return _token_logps(head, hidden, labels, softcap, scale)
    if _frozen_linear(head):
        return _FrozenHeadLogps.apply(hidden, head.weight, head.bias, labels, softcap, scale)
    return checkpoint(_token_logps, head, hidden, labels, softcap, scale, use_reentrant=False)


def _gathered(head: torch.nn.Module):
    """The head's full weights for the duration: under DeepSpeed ZeRO-3 a head tied to the (partitioned) embeddings
    holds only this process's partition outside a module forward. A collective: every process enters it as many
    times (the sharded runs keep their forwards in lockstep)."""
    partitioned = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


_last_positions: tuple = (lambda: None, None)  # (weak ref to a completion_mask, its scored positions)


def completion_positions(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions t whose next token t+1 is a completion token; cached for the last mask seen."""
    global _last_positions
    if _last_positions[0]() is completion_mask:
        return _last_positions[1]
    positions = completion_mask[:, 1:].bool().nonzero(as_tuple=True)
    _last_positions = (weakref.ref(completion_mask), positions)
    return positions


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed log-probs of the completion tokens of each row, `(N,)` in fp32 (fp64 for a fp64 model).

    `completion_mask[i, t] = 1` where token t of row i is a completion token; prompt and padding are 0, so they add
    nothing whatever their logits are (padding-safe).
    """
    parts = _causal_lm_parts(model)
    if parts is None:  # an unusual architecture: fall back to full logits (same numbers, more memory)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return naive_sequence_logps(logits, input_ids, completion_mask)
    backbone, head, config = parts
    rows, cols = completion_positions(completion_mask)  # before the forward: see the module docstring
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    # position t predicts token t+1: score hidden[:, t] against input_ids[:, t+1] where t+1 is a completion token
    hidden = hidden[rows, cols]
    labels = input_ids[rows, cols + 1]
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    with _gathered(head):
        chunks = [_chunk_logps(head, hidden[start : start + chunk_size], labels[start : start + chunk_size], softcap,
                               scale) for start in range(0, hidden.shape[0], chunk_size)]
    token_logps = torch.cat(chunks) if chunks else _upcast(hidden.new_zeros(0))
    sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=input_ids.device)
    return sums.index_add(0, rows, token_logps)


def naive_sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Reference implementation: full fp32 log-softmax, then gather and masked sum. For tests and odd models."""
    logps = torch.log_softmax(_upcast(logits[:, :-1]), dim=-1)
    per_token_logps = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (per_token_logps * completion_mask[:, 1:]).sum(-1)


def concatenated_forward(model: torch.nn.Module, batch: dict, chunk_size: int = 1024):
    """One forward over `[chosen; rejected]`; returns `(chosen_logps, rejected_logps)`, each `(B,)`."""
    logps = sequence_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_size=chunk_size
    )
    return logps.chunk(2)


def stacked_forward(model: torch.nn.Module, batch: dict, copies: int, chunk_size: int = 1024) -> list[tuple]:
    """One forward over `[chosen; rejected]` stacked `copies` times along the batch (under `modules.stacked` each
    copy goes through its own LoRA module); returns each copy's `(chosen_logps, rejected_logps)`, `(B,)` each."""
    inputs = [torch.cat([batch[key]] * copies) for key in ("input_ids", "attention_mask", "completion_mask")]
    logps = sequence_logps(model, *inputs, chunk_size=chunk_size)
    return [part.chunk(2) for part in logps.chunk(copies)]
