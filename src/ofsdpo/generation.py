"""Sampling responses: batched, with a KV cache, the active LoRA merged.

Fast sampling (issue 14; measured in docs/performance.md, "Sampling: merged LoRA"):

- the active LoRA adapter is merged into the base weights while sampling (`merged`): a forward is the plain
  base's, no LoRA branch in any layer. The touched base weights are saved first and copied back afterwards, so
  they come back bit for bit (peft's unmerge subtracts the delta again, which rounds: in bf16, a drift of the
  frozen base that would grow round after round);
- no prompt token is run twice: the prompts' common prefix (a chat template's system turn) once for all of
  them, each prompt's rest once for all its samples, where `generate` with `num_return_sequences` prefills every
  sample; then all rows (prompts x samples, `batch_size` at a time) decode together, a row leaving the batch at EOS;
- top-k, top-p and the draw work on the k best tokens only: `generate` sorts, soft-maxes and draws over the whole
  vocabulary at every step, a quarter of its time with SmolLM2's 49k tokens.

Judging the samples and pairing best against worst is `rounds.judged_pairs`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear, LoraLayer
from tqdm.auto import tqdm

from .causal_lm import cache_key, cache_of, causal_lm_parts, full_attention
from .modules import adapters_disabled


Prompt = str | list[dict]  # text, or conversational messages [{"role": ..., "content": ...}, ...]
ROWS_PER_CALL = 64  # rows (prompts x samples) decoded together when the caller does not say


@dataclass(frozen=True)
class Sample:
    """One sampled response: its text, its new tokens up to and including EOS, and whether it emitted EOS."""

    text: str
    num_tokens: int
    finished: bool


class Samples(list):
    """One group's samples from `sample_groups`: per prompt (in prompt order) its list of `Sample`s, and in
    `seconds` the wall time of the call (tokenizing, merging, generating, decoding)."""

    seconds: float = 0.0


def render_prompt(tokenizer, prompt: Prompt, chat: bool) -> str:
    """A message list through the chat template; a string as is, or with `chat` as one user message."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


# --- merging the active adapter ----------------------------------------------------------------------------------
def _plain_weights(module: torch.nn.Module) -> bool:
    """Dense floating-point weights held whole by this process: not quantized, not sharded (FSDP's DTensor,
    DeepSpeed ZeRO-3's partitions), not on the meta device. Merging anything else would not be exact."""
    params = list(module.parameters(recurse=False))
    return bool(params) and all(
        p.dtype.is_floating_point and type(p.data) is torch.Tensor and not hasattr(p, "ds_id")
        and p.device.type != "meta" for p in params)


def _mergeable(model: torch.nn.Module) -> list:
    """(LoRA layer, adapter) pairs to merge: every LoRA layer holding its one active adapter, adapters enabled, not
    merged already. Empty for a model without LoRA layers, or with adapters disabled (then the base is sampled)."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(m.disable_adapters or m.merged for m in layers):
        return []
    pairs = []
    for layer in layers:
        active = layer.active_adapters
        if len(active) != 1:  # several adapters summed at once: leave the layers as peft runs them
            return []
        name = active[0]
        if (name in layer.lora_A or name in layer.lora_embedding_A) and _plain_weights(layer.get_base_layer()):
            pairs.append((layer, name))
    return pairs


def _plain_lora(layer, name: str, base: torch.nn.Module) -> bool:
    """A plain LoRA linear layer: ΔW = scale B A, nothing else to merge (no variant such as DoRA, no LoRA bias,
    no transposed weights), adapter and base in one dtype."""
    return (isinstance(layer, LoraLinear) and type(base) is torch.nn.Linear and not layer.fan_in_fan_out
            and getattr(layer, "lora_variant", {}).get(name) is None and not getattr(layer, "lora_bias", {}).get(name)
            and layer.lora_A[name].weight.dtype == base.weight.dtype)


def _merge_into_new_tensors(layer, name: str, base: torch.nn.Module) -> None:
    """Adapter `name` of one LoRA layer merged into new base tensors (the old ones are left as they are)."""
    if _plain_lora(layer, name, base):
        # W + scale B A in one GEMM into a new tensor: a third of the time of peft's safe merge (measured)
        base.weight.data = torch.addmm(base.weight, layer.lora_B[name].weight, layer.lora_A[name].weight,
                                       alpha=layer.scaling[name])
        layer.merged_adapters.append(name)  # peft's record: its forward now runs the base layer alone
    else:
        layer.merge(safe_merge=True, adapter_names=[name])  # peft's own merge, into new tensors too


@contextlib.contextmanager
def merged(model: torch.nn.Module):
    """The active LoRA adapter merged into the base weights for the duration: forwards run the base layers only.

    Only the active adapter is merged (the others stay as they are); with adapters disabled, or no LoRA layers,
    nothing happens. W + ΔW goes into new tensors and the original ones are held aside and put back on the way
    out, so the base comes back bit for bit, in any dtype, for one weight-sized copy. peft's unmerge would
    subtract ΔW again, which rounds: (W + ΔW) - ΔW != W, in bf16 a drift of the frozen base that would grow
    round after round. Every layer's `merged` is False afterwards."""
    held = []
    try:
        with torch.no_grad():
            for layer, name in _mergeable(model):
                base = layer.get_base_layer()
                held.append((layer, name, [(p, p.data) for p in base.parameters(recurse=False)]))
                _merge_into_new_tensors(layer, name, base)
        yield model
    finally:
        for layer, name, originals in reversed(held):
            if layer.merged and getattr(layer, "lora_variant", {}).get(name) is not None:
                layer.unmerge()  # a variant (DoRA, ...) keeps state that only its own unmerge clears
            layer.merged_adapters.clear()  # nothing merged any more once the original tensors are back
            for param, data in originals:
                param.data = data


# --- sampling ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    temperature: float
    top_k: int  # 0: no top-k
    top_p: float
    max_new_tokens: int
    min_new_tokens: int
    eos: tuple[int, ...]
    pad: int


def _encode(tokenizer, prompts: list[Prompt], chat: bool) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each rendered prompt, and whether it went through the chat template (which writes its own
    special tokens, and whose answers are stripped)."""
    ids, conversational = [], []
    for i, prompt in enumerate(prompts):
        templated = chat or isinstance(prompt, list)
        tokens = tokenizer(render_prompt(tokenizer, prompt, chat), add_special_tokens=not templated)["input_ids"]
        if not tokens:
            raise ValueError(f"prompt {i} tokenizes to no tokens: nothing to sample from")
        ids.append(tokens)
        conversational.append(templated)
    return ids, conversational


def _common_prefix(rows: list[list[int]]) -> int:
    """Tokens every prompt starts with (a chat template's system turn, say), leaving each prompt one token."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def _layout(rows: list[list[int]], pad_id: int, device, share: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, shared): with `share`, the prompts' common prefix (`shared` tokens) first, then
    each prompt's rest padded on its left; without, plain left padding (`shared` 0). Generation appends on the
    right. Padding in the middle is masked like any padding, and positions count real tokens only, so each row
    computes what it would alone."""
    shared = _common_prefix(rows) if share and len(rows) > 1 else 0
    rests = [r[shared:] for r in rows]
    width = max(len(r) for r in rests)
    ids = torch.full((len(rows), shared + width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
    ids[:, :shared] = torch.tensor(rows[0][:shared], dtype=torch.long)
    mask[:, :shared] = 1
    for i, r in enumerate(rests):
        ids[i, shared + width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, shared + width - len(r):] = 1
    return ids.to(device), mask.to(device), shared


def _eos_ids(lm, given) -> tuple[int, ...]:
    """`given` (the tokenizer's EOS: what training appends) and those of the model's generation config (a chat
    model's end of turn): a row stops at any of them."""
    ids = [int(t) for t in given]
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return tuple(ids)


def _default_top_k(lm) -> int:
    """The model's generation config's top-k, else transformers' default (50): what `generate` applied."""
    top_k = getattr(getattr(lm, "generation_config", None), "top_k", None)
    return 50 if top_k is None else int(top_k)


def _prefill(lm, ids: torch.Tensor, mask: torch.Tensor, shared: int, copies: int):
    """The KV cache of every prompt token but the last, each computed once (the backbone alone: no logits): the
    `shared` prefix for one row, copied to every prompt; each prompt's rest once, copied to its `copies` samples
    (adjacent rows, as `num_return_sequences` lays them out), where `generate` would prefill every sample.
    None for one-token prompts (the first decoding step then starts the cache)."""
    if ids.shape[1] < 2:
        return None
    parts = causal_lm_parts(lm)
    module = parts[0] if parts is not None else lm  # an unknown layout: the whole model, logits and all
    key = cache_key(module)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only: padding does not move a row's positions
    cache = None
    if shared:
        cache = cache_of(module(input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared],
                                position_ids=positions[:1, :shared], use_cache=True))
        cache.batch_repeat_interleave(ids.shape[0])
    if ids.shape[1] - 1 > shared:
        cache = cache_of(module(input_ids=ids[:, shared:-1], attention_mask=mask[:, :-1],
                                position_ids=positions[:, shared:-1], use_cache=True, **{key: cache}))
    if copies > 1:
        cache.batch_repeat_interleave(copies)
    return cache


def _candidates(logits: torch.Tensor, settings: _Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of the `top_k` most likely tokens after temperature and top-p, as transformers'
    warpers leave them: top-p drops a token when it and every less likely token hold at most 1 - top_p of the
    mass, the most likely token always stays. Computed over the k candidates only: no sort, softmax or draw over
    the whole vocabulary (a quarter of `generate`'s time with SmolLM2's 49k tokens, measured)."""
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    k = min(settings.top_k or logits.shape[-1], logits.shape[-1])
    values, tokens = logits.topk(k, dim=-1)  # descending
    probs = values.softmax(dim=-1)
    if settings.top_p < 1.0:
        tail = probs.flip(-1).cumsum(-1).flip(-1)  # mass of each token and all less likely ones
        drop = tail <= 1 - settings.top_p
        drop[:, 0] = False
        probs = probs.masked_fill(drop, 0.0)
    return probs, tokens


def _draw(probs: torch.Tensor, candidates: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One candidate per row, drawn with probability proportional to `probs` (unnormalised): the argmax of
    probs / E with E ~ Exp(1) noise, what torch.multinomial does for one sample, here with the noise given."""
    return candidates.gather(-1, (probs / noise).argmax(-1, keepdim=True)).squeeze(-1)


def _decode(lm, ids: torch.Tensor, mask: torch.Tensor, shared: int, copies: int, settings: _Settings,
            generator: torch.Generator, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample `copies` continuations of each prompt, at most `limits[i]` new tokens for prompt i; returns (new
    tokens (rows, steps), each row's new tokens up to and including EOS, whether it emitted EOS), rows
    prompt-major. A row that emits EOS or reaches its limit leaves the batch (its cache rows dropped); each step
    draws the random numbers of every row, finished or not, so row j's draws do not depend on when the other rows
    stop (common random numbers between models: `scoring`)."""
    key = cache_key(lm)
    cache = _prefill(lm, ids, mask, shared, copies)
    rows = ids.shape[0] * copies
    device = ids.device
    tokens = ids[:, -1].repeat_interleave(copies)
    mask = mask.repeat_interleave(copies, dim=0)
    positions = mask.sum(-1) - 1
    active = torch.arange(rows, device=device)
    out = torch.full((rows, settings.max_new_tokens), settings.pad, dtype=torch.long, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    limits = limits.to(device).repeat_interleave(copies)
    eos = torch.tensor(settings.eos, dtype=torch.long, device=device)
    for step in range(settings.max_new_tokens):
        result = lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                    **{key: cache})
        cache = cache_of(result)
        logits = result.logits[:, -1].float()
        if step < settings.min_new_tokens and len(eos):
            logits[:, eos] = float("-inf")
        probs, candidates = _candidates(logits, settings)
        noise = torch.empty((rows, probs.shape[-1]), device=device).exponential_(generator=generator)[active]
        tokens = _draw(probs, candidates, noise)
        out[active, step] = tokens
        lengths[active] += 1
        ended = torch.isin(tokens, eos)
        finished[active[ended]] = True
        done = ended | (lengths[active] >= limits[active])
        if done.any():
            if done.all():
                break
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, tokens, mask, positions = active[keep], tokens[keep], mask[keep], positions[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        positions = positions + 1
    return out, lengths, finished


def _chunk_generator(device: torch.device) -> torch.Generator:
    """A generator for one decoding call, seeded from the global RNG by one draw: every call consumes the global
    RNG alike however long its rows ran, so a later call's draws line up between models too."""
    seed = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator(device=device).manual_seed(seed)


@torch.inference_mode()
def sample_token_ids(model, prompt_ids: list[list[int]], num_samples: int = 1, max_new_tokens: int | list[int] = 32,
                     temperature: float = 1.0, top_p: float = 0.95, top_k: int | None = None,
                     batch_size: int = ROWS_PER_CALL, eos_token_ids=(), pad_token_id: int = 0,
                     min_new_tokens: int = 0, reference: bool = False, merge: bool = True,
                     progress: bool = False) -> list[list[tuple[list[int], bool]]]:
    """`num_samples` continuations of each prompt (token ids), sampled from the model's active adapter (or, with
    `reference`, from the base: adapters disabled): per prompt, per sample, (its new token ids up to and including
    the first of `eos_token_ids` (and those of the model's generation config), whether it emitted one).
    `max_new_tokens` is one limit for every prompt or one per prompt (prompts of several tasks decoded together).

    Sampling is temperature, then top-k (None: the model's generation config's, else transformers' 50, as
    `generate` did), then top-p; the generation config's other processors (repetition penalty, ...) are not
    applied. `batch_size` is rows (prompts x samples) decoded together: as many whole prompts as fit, at least
    one. `merge` merges the active adapter into the base meanwhile (`merged`); `merge=False` runs peft's
    unmerged layers (the same distribution). `min_new_tokens` forbids EOS before that many new tokens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft injects LoRA in place
    device = next(model.parameters()).device
    limits = [max_new_tokens] * len(prompt_ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompt_ids) or min(limits, default=1) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, one for all prompts or one per prompt (got {max_new_tokens})")
    settings = _Settings(temperature, _default_top_k(lm) if top_k is None else top_k, top_p, max(limits, default=1),
                         min_new_tokens, _eos_ids(lm, eos_token_ids), pad_token_id)
    per_call = max(1, batch_size // num_samples)
    share = full_attention(lm.config)
    was_training = model.training
    model.eval()
    outputs = []
    bar = None
    if progress:
        bar = tqdm(total=len(prompt_ids), desc="sampling", unit=" prompts", leave=False)
    try:
        if reference and hasattr(model, "disable_adapter"):
            weights = adapters_disabled(model)  # the base: nothing to merge
        else:
            weights = merged(model) if merge else contextlib.nullcontext()
        with weights:
            for first in range(0, len(prompt_ids), per_call):
                chunk = prompt_ids[first:first + per_call]
                new, lengths, finished = _decode(lm, *_layout(chunk, pad_token_id, device, share), num_samples,
                                                 settings, _chunk_generator(device),
                                                 torch.tensor(limits[first:first + per_call]))
                rows = [(t[:n], f) for t, n, f in zip(new.cpu().tolist(), lengths.tolist(), finished.tolist())]
                outputs.extend(rows[i:i + num_samples] for i in range(0, len(rows), num_samples))
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return outputs


def sample_groups(model, tokenizer, groups: list[tuple[list[Prompt], bool, int]], num_samples: int = 1,
                  temperature: float = 1.0, top_p: float = 0.95, batch_size: int = ROWS_PER_CALL,
                  reference: bool = False, progress: bool = False, merge: bool = True, min_new_tokens: int = 0,
                  top_k: int | None = None) -> list[Samples]:
    """`num_samples` responses per prompt as `Sample`s (text, new tokens up to and including EOS, whether it ended)
    for several groups of prompts at once, each (prompts, chat, max_new_tokens), sampled as `sample_token_ids`
    says (`batch_size`: rows). Every group's prompts decode in the same batches (one call instead of one per group:
    at a few rows a decoding step costs the same as at many, its time is reading the weights), each row stopping at
    EOS or at its own group's limit. Returns each group's `Samples`, all with the call's wall time. Models sampled
    with the same groups and seed draw the same random numbers row for row (common random numbers: `scoring`).

    A prompt is a string (with `chat`, sent as one user message through the chat template) or a list of messages
    (always through the chat template, whose answers are stripped of surrounding white space)."""
    start = time.perf_counter()
    ids, conversational, limits = [], [], []
    for prompts, chat, max_new_tokens in groups:
        group_ids, group_conversational = _encode(tokenizer, prompts, chat)
        ids += group_ids
        conversational += group_conversational
        limits += [max_new_tokens] * len(group_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    rows = sample_token_ids(model, ids, num_samples, limits, temperature, top_p, top_k, batch_size, eos,
                            pad, min_new_tokens, reference, merge, progress)
    outputs = [Samples() for _ in groups]
    at = 0
    for out, (prompts, _, _) in zip(outputs, groups):
        for group, strip in zip(rows[at:at + len(prompts)], conversational[at:at + len(prompts)]):
            texts = tokenizer.batch_decode([tokens for tokens, _ in group], skip_special_tokens=True)
            out.append([Sample(t.strip() if strip else t, len(tokens), done)
                        for t, (tokens, done) in zip(texts, group)])
        at += len(prompts)
    seconds = time.perf_counter() - start
    for out in outputs:
        out.seconds = seconds
    return outputs

