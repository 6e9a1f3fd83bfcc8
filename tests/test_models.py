"""Loading models: the de-quantized GGUF cache."""

import pytest
import torch

import ofsdpo.models as models
from ofsdpo.models import dequantized_gguf, embedded_model, gguf_cache_root, load_model, load_tokenizer


def test_the_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OFSDPO_CACHE", str(tmp_path / "c"))
    assert gguf_cache_root() == tmp_path / "c"
    monkeypatch.delenv("OFSDPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache_root() == tmp_path / "xdg" / "ofsdpo"
    monkeypatch.setenv("OFSDPO_CACHE", "0")
    assert gguf_cache_root() is None


def test_no_cache_when_off_too_large_or_missing(tmp_path, monkeypatch):
    name, gguf = embedded_model()
    monkeypatch.setenv("OFSDPO_CACHE", "0")
    assert dequantized_gguf(name, gguf) is None
    monkeypatch.setenv("OFSDPO_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "GGUF_CACHE_MAX_BYTES", 1024)
    assert dequantized_gguf(name, gguf) is None
    assert dequantized_gguf(str(tmp_path), "missing.gguf") is None
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
def test_the_cached_model_equals_the_gguf_load(tmp_path, monkeypatch):
    """~1.5 min: the embedded model de-quantized by transformers, once straight from the GGUF and once through the
    cache (filled, then read), gives the same weights, config and tokens."""
    name, gguf = embedded_model()
    monkeypatch.setenv("OFSDPO_CACHE", "0")
    direct, direct_tok = load_model(name, gguf, "float32", torch.device("cpu")), load_tokenizer(name, gguf)
    monkeypatch.setenv("OFSDPO_CACHE", str(tmp_path))
    cached_tok = load_tokenizer(name, gguf)  # fills the cache
    folder = dequantized_gguf(name, gguf)
    assert folder is not None and (tmp_path / "gguf").is_dir() and folder.startswith(str(tmp_path))
    cached = load_model(name, gguf, "float32", torch.device("cpu"))
    assert cached.config._name_or_path == direct.config._name_or_path == name  # adapters name the user's base
    assert vars(cached).get("name_or_path") == vars(direct).get("name_or_path") == name  # what peft records
    assert cached_tok.name_or_path == name
    a, b = direct.state_dict(), cached.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the same config but for the GGUF quantizer's mark (the cached weights are plain float32) and what
    # save_pretrained writes of its own (the architecture's class name)
    ignored = ("quantization_config", "architectures", "_name_or_path")
    assert ({k: v for k, v in cached.config.to_diff_dict().items() if k not in ignored}
            == {k: v for k, v in direct.config.to_diff_dict().items() if k not in ignored})
    assert not getattr(cached, "is_quantized", False)
    chat = [{"role": "user", "content": "Write one upbeat line about rain."}]
    assert (cached_tok.apply_chat_template(chat, add_generation_prompt=True)
            == direct_tok.apply_chat_template(chat, add_generation_prompt=True))
    text = "Déjà vu: 3 tokens, émojis 🙂 and\ttabs."
    assert cached_tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    assert (cached_tok.eos_token_id, cached_tok.pad_token_id) == (direct_tok.eos_token_id, direct_tok.pad_token_id)


def test_a_hub_name_with_no_network_fails_at_once_or_uses_the_cache(monkeypatch):
    """One probe through huggingface_hub: a connection failure is one line naming the flag (no retries), unless
    the repo is in the local cache, which is then used offline; an answer from the Hub (say, not found) is left to
    the real load."""
    import huggingface_hub
    from huggingface_hub import constants

    from ofsdpo.models import ModelError, check_hub

    class ConnectError(Exception):  # httpx's name for it
        pass

    def unreachable(*args, **kwargs):
        raise RuntimeError("request failed") from ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "repo_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ModelError, match=r"--model owner/name: the Hugging Face Hub could not be reached .* "
                                         r"owner/name is not in the local cache; .*HF_HUB_OFFLINE=1"):
        check_hub("owner/name", "--model owner/name")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_hub("owner/name", "--model owner/name")
    assert constants.HF_HUB_OFFLINE is True  # the cached copy, offline

    def not_found(*args, **kwargs):
        raise ValueError("404 Repository Not Found")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "repo_info", not_found)
    check_hub("owner/name", "--model owner/name")  # the Hub answered: the load reports it
