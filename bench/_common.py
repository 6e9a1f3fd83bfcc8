"""Shared pieces of the benchmarks: model shapes built from configs, synthetic pairs, stamps, memory and FLOPs.

No Hub access is assumed: every model is a randomly initialised Qwen2-shaped `AutoModelForCausalLM.from_config`,
and pairs are random token ids (throughput does not depend on what the tokens mean).
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run as `python bench/step.py` without installing the package

# the package's own choices (auto: a GPU when there is one; bfloat16 where the GPU supports it), and its atomic write
from ofsdpo import provenance  # noqa: E402
from ofsdpo.files import write_json  # noqa: E402
from ofsdpo.models import resolve_device, resolve_dtype  # noqa: E402

# Qwen2 shapes; 0.5b and 1.5b are Qwen2-0.5B / Qwen2-1.5B (tied embeddings, vocabulary 151936).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "70m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}

# Dense bf16/fp16 tensor-core peak (FLOP/s) for MFU; other dtypes and unknown GPUs get no MFU rather than a guess.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}

PAD_ID = 0


def build_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=PAD_ID, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # built in `dtype`: no fp32 peak on the way
    return model.to(device)


def matmul_params(model) -> int:
    """N of the FLOPs accounting: every weight a token is multiplied by (all but the input embedding lookup;
    the LM head counts once, tied or not)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total - embed.numel() + (head.numel() if head is embed else 0)


def random_pairs(count: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Pairs of token ids in our (and TRL's) tokenized format; ids avoid pad/bos/eos so nothing is special."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(prompt_len), "chosen_ids": ids(completion_len), "rejected_ids": ids(completion_len),
             "index": i} for i in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on a GPU; peak RSS of this process on CPU (each variant runs in its own process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def stamp(device: torch.device) -> dict:
    """The package's stamp (hardware, versions, commit) of this checkout; "unknown" outside git."""
    return {**provenance.stamp(device), "commit": provenance.git_commit(ROOT) or "unknown"}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
