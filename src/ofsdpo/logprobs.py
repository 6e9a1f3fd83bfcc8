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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from .causal_lm import cache_key, cache_of, causal_lm_parts, full_attention
from .data import collate


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
    parts = causal_lm_parts(model)
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


# --- responses after shared prompts (judging) ------------------------------------------------------------------------
# A scored pair holds two responses after one prompt (and a prompt's samples share it too). Each distinct prompt is
# forwarded once here (its KV cache and last hidden state kept) and only the responses run after it.

@dataclass
class PromptState:
    """A prompt's KV cache (per layer (keys, values), each (1, heads, tokens, dim)) and its last hidden state, which
    predicts a response's first token (scored through the head)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    last_hidden: torch.Tensor


def _prompt_states(backbone, prompts: list[tuple[int, ...]], batch_size: int, device) -> dict[tuple, PromptState]:
    """Each prompt's KV cache and last hidden state, `batch_size` prompts per forward (left-padded: at a few rows
    a forward costs about what reading the weights does, so one forward for many short prompts), in a fixed order,
    so the same prompts always give the same numbers (a module equal to the base ties the reference)."""
    states = {}
    ordered = sorted(prompts, key=lambda p: (len(p), p))
    for start in range(0, len(ordered), batch_size):
        group = ordered[start:start + batch_size]
        width = len(group[-1])
        ids = torch.zeros((len(group), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for j, prompt in enumerate(group):
            ids[j, width - len(prompt):] = torch.tensor(prompt, device=device)
            mask[j, width - len(prompt):] = 1
        out = backbone(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=True)
        layers = [(layer.keys, layer.values) for layer in cache_of(out).layers]
        for j, prompt in enumerate(group):
            n = len(prompt)
            states[prompt] = PromptState([(k[j:j + 1, :, width - n:], v[j:j + 1, :, width - n:]) for k, v in layers],
                                         last_hidden=out.last_hidden_state[j, -1])
    return states


def _after_prompts(backbone, head, config, key: str, rows: list[tuple[PromptState, int, list[int]]], device,
                   chunk_size: int = 1024):
    """Summed log-probs of each (prompt state, prompt length, response ids) row: one forward of the responses
    (right-padded) after the prompts' caches (left-padded), at each row's own positions."""
    width, span = max(n for _, n, _ in rows), max(len(r) for _, _, r in rows)
    mask = torch.zeros((len(rows), width + span), dtype=torch.long, device=device)
    responses = torch.zeros((len(rows), span), dtype=torch.long, device=device)
    layers = []
    for layer, (k0, v0) in enumerate(rows[0][0].layers):
        keys = k0.new_zeros((len(rows), k0.shape[1], width, k0.shape[3]))
        values = v0.new_zeros((len(rows), v0.shape[1], width, v0.shape[3]))
        for i, (state, n, _) in enumerate(rows):
            keys[i, :, width - n:], values[i, :, width - n:] = state.layers[layer][0][0], state.layers[layer][1][0]
        layers.append((keys, values))
    for i, (_, n, response) in enumerate(rows):
        mask[i, width - n:width] = 1
        mask[i, width:width + len(response)] = 1
        responses[i, :len(response)] = torch.tensor(response, device=device)
    positions = torch.tensor([n for _, n, _ in rows], device=device)[:, None] + torch.arange(span, device=device)
    hidden = backbone(input_ids=responses, attention_mask=mask, position_ids=positions, use_cache=True,
                      **{key: DynamicCache(ddp_cache_data=layers)}).last_hidden_state
    # response token t is predicted at the position before it: the prompt's last one for t = 0
    last = torch.stack([state.last_hidden for state, _, _ in rows])
    scored = torch.cat([last[:, None], hidden[:, :-1]], dim=1)
    at, cols = mask[:, width:].nonzero(as_tuple=True)
    hidden, labels = scored[at, cols], responses[at, cols]
    softcap, scale = getattr(config, "final_logit_softcapping", None), getattr(config, "logit_scale", None)
    with _gathered(head):  # the head's logits `chunk_size` tokens at a time, as `sequence_logps`
        token_logps = torch.cat([_token_logps(head, hidden[s:s + chunk_size], labels[s:s + chunk_size], softcap, scale)
                                 for s in range(0, labels.shape[0], chunk_size)])
    return torch.zeros(len(rows), dtype=token_logps.dtype, device=device).index_add(0, at, token_logps)


@torch.no_grad()
def prompt_cached_logps(model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: list[list[int]],
                        batch_size: int = 16, chunk_size: int = 1024) -> torch.Tensor | None:
    """log π(response | prompt) summed over each response's tokens, the numbers `sequence_logps` gives for prompt +
    response, with each distinct prompt forwarded once. Rows of similar lengths run together, `batch_size` at a
    time. None where this does not apply (an unknown layout, windowed attention, no rows, an empty prompt or
    response): score whole sequences."""
    parts = causal_lm_parts(model)
    if parts is None or not full_attention(parts[2]) or not all(prompt_ids) or not all(response_ids):
        return None
    backbone, head, config = parts
    device, key = next(model.parameters()).device, cache_key(backbone)
    keys = [tuple(p) for p in prompt_ids]
    out = None
    # prompts are kept only for a block of rows at a time (prompt-major callers keep a prompt's samples together):
    # memory stays bounded for any number of prompts
    block = 16 * batch_size
    for first in range(0, len(keys), block):
        ids = range(first, min(first + block, len(keys)))
        store = _prompt_states(backbone, list({keys[i] for i in ids}), batch_size, device)
        order = sorted(ids, key=lambda i: (len(keys[i]), len(response_ids[i])))  # similar rows pad little
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            sums = _after_prompts(backbone, head, config, key,
                                  [(store[keys[i]], len(keys[i]), response_ids[i]) for i in chunk], device,
                                  chunk_size)
            if out is None:
                out = sums.new_zeros(len(keys))
            out[chunk] = sums
    return out


@torch.no_grad()
def pair_logps(model: torch.nn.Module, pairs: list[dict], pad_token_id: int, batch_size: int = 8,
               chunk_size: int = 1024, prompt_once: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs of tokenized pairs, no grad: each pair's prompt forwarded once and both
    responses scored after it (`prompt_cached_logps`, `2 x batch_size` rows a forward), the numbers of
    `concatenated_forward` up to float rounding, in about half the prompt work. Where that does not apply (or
    without `prompt_once`: processes in lockstep that must run the same forwards), one `concatenated_forward` per
    `batch_size` pairs."""
    if not pairs:
        return torch.zeros(0), torch.zeros(0)
    n, prompts = len(pairs), [p["prompt_ids"] for p in pairs]
    cached = None
    if prompt_once:
        responses = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
        cached = prompt_cached_logps(model, prompts + prompts, responses, 2 * batch_size, chunk_size)
    if cached is not None:
        return cached[:n], cached[n:]
    device, chosen, rejected = next(model.parameters()).device, [], []
    for start in range(0, n, batch_size):
        batch = collate(pairs[start:start + batch_size], pad_token_id)
        c, r = concatenated_forward(model, {k: v.to(device) for k, v in batch.items()}, chunk_size)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


# --- KL(π ‖ π_ref) along sampled responses (judged evaluation) -----------------------------------------------------
# The exact per-token KL over the whole vocabulary, summed along each response: Σ_t Σ_v π(v|y<t) (log π(v|y<t) −
# log π_ref(v|y<t)). Each position's KL is a KL of two distributions, so it is ≥ 0 whatever the response; the
# responses only choose the prefixes y<t at which it is taken (the policy's judged samples).

def _vocab_logps(head: torch.nn.Module, hidden: torch.Tensor, softcap, scale) -> torch.Tensor:
    """log-softmax over the vocabulary of the head's logits for `hidden` (N, H), fp32 at least."""
    logits = head(hidden)
    if scale is not None:
        logits = logits * scale
    logits = _upcast(logits)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1)


def _kl_rows(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log q) per row; where p and q are equal it is 0 exactly. A true KL is ≥ 0: what rounding
    leaves below 0 (≈ 1e-7 for close fp32 distributions) is clamped."""
    return (policy_logps.exp() * (policy_logps - reference_logps)).sum(-1).clamp_min(0)


def naive_sequence_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor,
                      completion_mask: torch.Tensor) -> torch.Tensor:
    """Reference implementation: full log-softmax of both models' logits, per-position KL, masked sum (tests)."""
    kl = _kl_rows(torch.log_softmax(_upcast(policy_logits[:, :-1]), -1),
                  torch.log_softmax(_upcast(reference_logits[:, :-1]), -1))
    return (kl * completion_mask[:, 1:]).sum(-1)


@torch.no_grad()
def sequence_kl(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_mask: torch.Tensor, reference, chunk_size: int = 1024) -> torch.Tensor:
    """KL(π ‖ π_ref) summed over the completion tokens of each row, `(N,)`: one forward with the model as it is
    (π) and one inside `reference()` (a context manager under which the model is π_ref: `modules.reference_mode`).
    Only the hidden states of the scored positions are kept; the two vocabulary-wide log-softmaxes exist
    `chunk_size` positions at a time."""
    parts = causal_lm_parts(model)
    if parts is None:  # an unusual architecture: full logits (same numbers, more memory)
        policy = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        with reference():
            ref = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return naive_sequence_kl(policy, ref, completion_mask)
    backbone, head, config = parts
    rows, cols = completion_positions(completion_mask)
    hidden = {}
    for side, context in (("policy", contextlib.nullcontext), ("reference", reference)):
        with context():
            hidden[side] = backbone(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state[rows, cols]
    softcap, scale = getattr(config, "final_logit_softcapping", None), getattr(config, "logit_scale", None)
    with _gathered(head):
        chunks = [_kl_rows(_vocab_logps(head, hidden["policy"][s:s + chunk_size], softcap, scale),
                           _vocab_logps(head, hidden["reference"][s:s + chunk_size], softcap, scale))
                  for s in range(0, rows.shape[0], chunk_size)]
    token_kl = torch.cat(chunks) if chunks else _upcast(hidden["policy"].new_zeros(0))
    return torch.zeros(input_ids.shape[0], dtype=token_kl.dtype, device=input_ids.device).index_add(0, rows, token_kl)
