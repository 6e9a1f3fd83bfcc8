"""A tiny randomly initialised Llama with the real SmolLM2 tokenizer (from the embedded GGUF), saved to a folder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ofsdpo.models import embedded_model, load_tokenizer


def build_tiny_model(folder: Path, seed: int = 0, tied: bool = False) -> Path:
    name, gguf = embedded_model()
    tokenizer = load_tokenizer(name, gguf)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
