"""`ofsdpo export RUN --out DIR`: the module a run serves, merged into its base and saved as a standalone
transformers model (safetensors weights, config, generation config, tokenizer with its chat template), for servers
that take a plain model (vLLM, TGI, llama.cpp's converters). Any run whose folder holds a served peft adapter:
`ofsdpo train` (dpo, ofs-dpo) and `ofsdpo continual` (a COFS-DPO `delta` combination is a stacked-rank LoRA, so
it merges exactly like any other). peft does the merge (`merge_and_unload`), in float32; `--dtype` is the saved
weights'. For the embedded GGUF base the saved weights are the de-quantized float32 ones (then cast to --dtype).
The folder is written beside --out and renamed into place: a failed export leaves no half-written model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from peft import PeftModel

from ..config import ExportConfig
from ..errors import ConfigError
from ..models import load_model_and_tokenizer, require_safetensors


def base_of(run: Path) -> tuple[str | None, str | None]:
    """The run's base model (model, gguf_file) from its config.yaml (None, None: the embedded default)."""
    path = run / "config.yaml"
    if not path.is_file():
        return None, None
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return values.get("model"), values.get("gguf_file")


def export(cfg: ExportConfig) -> Path:
    run, out = Path(cfg.run), Path(cfg.out)
    require_safetensors(run, "run")
    if not (run / "adapter_config.json").is_file():
        raise ConfigError(f"{run}: no served adapter (adapter_config.json); give the --output-dir of a finished "
                          "train or continual run.")
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out.")
    model, gguf = (cfg.model, cfg.gguf_file) if cfg.model else base_of(run)
    base, tokenizer, _, _ = load_model_and_tokenizer(model, gguf, "float32", torch.device("cpu"),
                                                     cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(run)).merge_and_unload()
    merged = merged.to(getattr(torch, cfg.dtype))
    merged.config.torch_dtype = cfg.dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out

