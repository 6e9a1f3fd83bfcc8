"""The causal-LM layout and KV-cache helpers that scoring and sampling share (`ofsdpo.causal_lm`): the parts compose
to the whole model, a cache passed under `cache_key` continues a forward exactly, and windowed attention is seen."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ofsdpo.causal_lm import cache_key, cache_of, causal_lm_parts, full_attention
from ofsdpo.modules import DPO_ADAPTERS, adapter_parameters, attach_adapters, lora_config


def _llama(seed: int = 0) -> LlamaForCausalLM:
    """A two-layer Llama in float64 (exact comparisons), eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(torch.float64).eval()


def _peft_llama() -> torch.nn.Module:
    """The same Llama with a LoRA module whose B is random (non-zero), so the adapter changes the outputs."""
    model = attach_adapters(_llama(), lora_config(4, 8, 0.0, "all-linear"), DPO_ADAPTERS)
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("build", [_llama, _peft_llama], ids=["plain", "peft"])
def test_the_parts_compose_to_the_whole_model(build):
    """head(backbone(ids)) is the model's own logits (float64, the LoRA layers included for the peft model): what
    scoring and prefilling run instead of the whole model."""
    model = build()
    backbone, head, config = causal_lm_parts(model)
    assert config.vocab_size == 40 and head.out_features == 40
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = head(backbone(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_an_unknown_layout_has_no_parts():
    """A module that is not a transformers causal LM (no backbone under base_model_prefix, no output embeddings):
    None, so callers fall back to the whole model's logits."""
    assert causal_lm_parts(torch.nn.Linear(3, 3)) is None

    class Flat(torch.nn.Module):  # its own backbone: nothing separate to run
        base_model_prefix = ""

        def get_output_embeddings(self):
            return torch.nn.Linear(2, 2)

    assert causal_lm_parts(Flat()) is None


def test_a_cache_under_its_key_continues_a_forward_exactly():
    """The backbone over a prefix, then the rest of the row with the prefix's cache passed under `cache_key` and
    taken back with `cache_of`: the hidden states of one whole forward (float64). Without the cache the rest would
    see no prefix, and the states would differ (checked, so the test can fail)."""
    backbone, _, _ = causal_lm_parts(_llama())
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    key = cache_key(backbone)
    assert key in ("cache", "past_key_values")
    with torch.no_grad():
        whole = backbone(input_ids=ids).last_hidden_state
        cache = cache_of(backbone(input_ids=ids[:, :5], use_cache=True))
        assert cache is not None
        rest = backbone(input_ids=ids[:, 5:], position_ids=torch.arange(5, 9).expand(2, 4), use_cache=True,
                        **{key: cache}).last_hidden_state
        alone = backbone(input_ids=ids[:, 5:], position_ids=torch.arange(5, 9).expand(2, 4)).last_hidden_state
    torch.testing.assert_close(rest, whole[:, 5:], rtol=1e-12, atol=1e-12)
    assert (alone - whole[:, 5:]).abs().max() > 1e-3


def test_cache_of_reads_either_transformers_name():
    cache = object()
    assert cache_of(SimpleNamespace(cache=cache)) is cache  # transformers 5
    assert cache_of(SimpleNamespace(past_key_values=cache)) is cache  # before
    assert cache_of(SimpleNamespace(cache=None, past_key_values=cache)) is cache
    assert cache_of(SimpleNamespace()) is None


@pytest.mark.parametrize("config,full", [
    (LlamaConfig(), True),
    (SimpleNamespace(sliding_window=4096), False),  # Mistral: a window on every layer
    (SimpleNamespace(sliding_window=4096, use_sliding_window=False), True),  # Qwen2: a window declared, not used
    (SimpleNamespace(sliding_window=None), True),
    (SimpleNamespace(layer_types=["full_attention", "sliding_attention"], sliding_window=None), False),  # Gemma 2/3
    (SimpleNamespace(layer_types=["full_attention"] * 2, sliding_window=512), True),  # the layer types decide
    (SimpleNamespace(get_text_config=lambda: SimpleNamespace(sliding_window=8)), False),  # a multimodal wrapper
])
def test_full_attention_sees_a_sliding_window(config, full):
    assert full_attention(config) is full
