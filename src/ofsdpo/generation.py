"""Sampling responses (batched, with a KV cache) and turning judged samples into preference pairs.

`make_pairs`: k samples per prompt, the judge scores each, the best and the worst form a pair (chosen, rejected);
prompts whose best and worst tie are skipped (and counted). Every pair records both scores. Chat domains give
TRL's conversational format, plain-text domains the standard one.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .domains import BuiltinDomain


def render_prompt(tokenizer, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], chat: bool, num_samples: int = 1, max_new_tokens: int = 32,
           temperature: float = 1.0, top_p: float = 0.95, batch_size: int = 16, reference: bool = False,
           progress: bool = False) -> list[list[str]]:
    """`num_samples` responses per prompt from the model (or from the reference: adapters disabled)."""
    texts = [render_prompt(tokenizer, p, chat) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[list[str]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="sampling", unit=" prompts", leave=False)
    try:
        adapters_off = model.disable_adapter() if reference and hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with adapters_off:
            for start in range(0, len(texts), batch_size):
                chunk = texts[start:start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
                generated = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                           max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                           pad_token_id=tokenizer.pad_token_id, use_cache=True)
                new = generated[:, enc["input_ids"].shape[1]:]
                decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
                for i in range(len(chunk)):
                    responses = decoded[i * num_samples:(i + 1) * num_samples]
                    outputs.append([r.strip() if chat else r for r in responses])
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        if bar is not None:
            bar.close()
    return outputs


def make_pairs(model, tokenizer, domain: BuiltinDomain, records: list[dict], samples_per_prompt: int = 4,
               temperature: float = 1.0, top_p: float = 0.95, batch_size: int = 16, progress: bool = False):
    """Judge-labelled pairs from samples of `model`; returns (pairs, number of prompts skipped as ties)."""
    prompts = [r["prompt"] for r in records]
    samples = sample(model, tokenizer, prompts, domain.chat, samples_per_prompt, domain.max_new_tokens,
                     temperature, top_p, batch_size, progress=progress)
    pairs, ties = [], 0
    for record, responses in zip(records, samples):
        scored = [(domain.judge(record["prompt"], r, record.get("meta", {})), r) for r in responses]
        best = max(scored, key=lambda s: s[0])
        worst = min(scored, key=lambda s: s[0])
        if best[0] == worst[0] or best[1] == worst[1]:
            ties += 1
            continue
        if domain.chat:
            row = {"prompt": [{"role": "user", "content": record["prompt"]}],
                   "chosen": [{"role": "assistant", "content": best[1]}],
                   "rejected": [{"role": "assistant", "content": worst[1]}]}
        else:
            row = {"prompt": record["prompt"], "chosen": best[1], "rejected": worst[1]}
        row.update(score_chosen=best[0], score_rejected=worst[0], domain=domain.name)
        pairs.append(row)
    return pairs, ties


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
