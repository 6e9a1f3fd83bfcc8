"""What ofsdpo needs to know about a (peft-wrapped) transformers causal LM: its parts and its KV cache.

Scoring (`logprobs`) runs the backbone alone and the LM head on the scored positions only; sampling
(`generation`) prefills prompts through the backbone. Both need the same layout (backbone, head, text config),
the same test for attention over the whole context, and the same KV-cache handling across transformers versions.
They live here, below both, so neither reaches into the other.
"""

from __future__ import annotations

import inspect

import torch


def causal_lm_parts(model: torch.nn.Module):
    """(backbone, lm_head, text_config) of a (peft-wrapped) causal LM, or None where the layout is unknown."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is lm:
        return None
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return backbone, head, config


def full_attention(config) -> bool:
    """Every layer attends to the whole context: a sliding window counts padding in the middle of a row as context,
    so prompts share a prefix (or a cached prompt is reused) only without one."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return all(k == "full_attention" for k in kinds)
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


def cache_key(module: torch.nn.Module) -> str:
    """The name of the KV-cache argument: `cache` from transformers 5, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward returned, under either transformers name (see `cache_key`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
