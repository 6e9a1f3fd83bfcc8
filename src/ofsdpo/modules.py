"""LoRA modules on one frozen base, keyed by name: `default` for dpo, `fast` and `slow` for OFS-DPO (SPEC §3).

Known trap: peft's `set_adapter` (and leaving `disable_adapter()`) sets `requires_grad=False` on every inactive
adapter, and autograd skips leaves that are frozen at backward time, so switching adapters between the two
forwards and the single backward would silently drop a module's gradients. `activate` switches the active adapter
and then makes every trained adapter trainable again; `reference_mode` does the same on its way out.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

DPO_ADAPTERS = ("default",)
OFS_ADAPTERS = ("fast", "slow")


def lora_config(r: int, alpha: int, dropout: float, target_modules) -> LoraConfig:
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none", task_type="CAUSAL_LM"
    )


def adapter_parameters(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """Parameters of adapter `name`, in a fixed order (peft names them `...lora_A.<name>.weight`)."""
    return [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]


def set_trainable(model: torch.nn.Module, names) -> None:
    for name in names:
        for p in adapter_parameters(model, name):
            p.requires_grad_(True)


def attach_adapters(base_model: torch.nn.Module, config: LoraConfig, names) -> PeftModel:
    """Wrap `base_model` with one LoRA adapter per name, all starting from the first adapter's weights."""
    base_model.requires_grad_(False)
    model = get_peft_model(base_model, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
        copy_adapter(model, names[0], name)
    model.set_adapter(names[0])
    set_trainable(model, names)
    return model


def activate(model: PeftModel, name: str, trained=None) -> None:
    """Route forwards through adapter `name`, keeping every trained adapter's parameters trainable."""
    model.set_adapter(name)
    set_trainable(model, trained or list(model.peft_config))


@contextlib.contextmanager
def reference_mode(model: PeftModel):
    """The reference π_ref: the base with adapters disabled, no gradients, no dropout (SPEC §2)."""
    was_training, active = model.training, model.active_adapter
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        activate(model, active)


@torch.no_grad()
def copy_adapter(model: PeftModel, source: str, target: str) -> None:
    for src, dst in zip(adapter_parameters(model, source), adapter_parameters(model, target), strict=True):
        dst.copy_(src)


@torch.no_grad()
def swap_adapters(model: PeftModel, first: str, second: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Exchange two adapters' weights and, with an optimizer, their optimiser states (`swap: params`)."""
    for a, b in zip(adapter_parameters(model, first), adapter_parameters(model, second), strict=True):
        held = a.detach().clone()
        a.copy_(b)
        b.copy_(held)
        if optimizer is not None:
            state_a, state_b = optimizer.state.get(a), optimizer.state.get(b)
            if state_a is not None or state_b is not None:
                optimizer.state[a], optimizer.state[b] = state_b or {}, state_a or {}


def adapter_state(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    # LoRA never trains the embeddings: without the flag peft looks for the base config to decide (and warns on GGUF)
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in state.items()}


def load_adapter_state(model: PeftModel, name: str, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter '{name}': unexpected keys in saved state: {unexpected[:3]}")


def write_adapter(config: LoraConfig, state: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """Write saved adapter weights (keys as `adapter_state` returns them) as a standalone peft adapter."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config.inference_mode = True
    config.save_pretrained(str(directory))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, directory / "adapter_model.safetensors")
    return directory


def save_adapter(model: PeftModel, name: str, directory: str | Path) -> Path:
    """Write adapter `name` as a standalone peft adapter (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    # LoRA never trains the embeddings: no need for peft to look for the base config to decide (it warns on GGUF)
    model.save_pretrained(staging, selected_adapters=[name], safe_serialization=True, save_embedding_layers=False)
    written = staging if name == "default" else staging / name  # peft nests non-default adapters
    for file in written.iterdir():
        if file.is_file():
            shutil.move(str(file), directory / file.name)
    shutil.rmtree(staging, ignore_errors=True)
    return directory
