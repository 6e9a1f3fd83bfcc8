"""LoRA modules on one frozen base, keyed by name: `default` for dpo, `fast` and `slow` for OFS-DPO (SPEC §3).

Known trap: peft's `set_adapter` (and leaving `disable_adapter()`) sets `requires_grad=False` on every inactive
adapter, and autograd skips leaves that are frozen at backward time, so switching adapters between the two
forwards and the single backward would silently drop a module's gradients. `activate` switches the active adapter
and then makes every trained adapter trainable again; `reference_mode` does the same on its way out.

Switching without walking the model (issue 16): peft's `set_adapter` visits every module and re-flags every LoRA
parameter on each call. The LoRA layers and each adapter's parameters are found once per model (`_lora_layers`,
checked on every call against the adapters that exist, rebuilt when one is added or replaced), and `activate` then
sets the layers' active adapter and flips only the `requires_grad` flags that change.

One forward for several modules (`stacked`): the batch is stacked once per module and each LoRA layer runs its
frozen base once over all the rows (one GEMM of k times the rows), then adds to the i-th block of rows the LoRA
term of the i-th module, B_i (scale_i A_i dropout_i(x_i)), the sum peft's layer computes for one active adapter
(peft scales B_i A_i x_i; scaling the rank-r product is the same sum and spares a pass over the output), written
by one batched `result + Z @ B` for all blocks. Each module draws its own dropout mask (its own `lora_dropout`
module, its own rows).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

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
    """Wrap `base_model` with one LoRA adapter per name, all starting from the first adapter's weights.

    `base_model` may be a PeftModel this function made before (a continual run's previous stage): if it holds the
    same adapters, configured alike, and the RNG is where it was then (the same seed), the adapters are reset to
    the weights that attaching drew, and the RNG moved to where attaching left it: the same model and the same
    random numbers afterwards, without injecting LoRA layers into every target module again (peft's injection
    walks the model; 2.6 s for fast and slow on SmolLM2). Otherwise its LoRA layers are stripped and it is
    attached anew."""
    if isinstance(base_model, PeftModel):
        reset = _reset_adapters(base_model, config, names)
        if reset is not None:
            return reset
        base_model = base_model.unload()
    rng, key = torch.get_rng_state(), _attach_key(config, names)
    config = copy.deepcopy(config)  # peft fills in the config it gets (the base's name, the target modules resolved)
    base_model.requires_grad_(False)
    model = get_peft_model(base_model, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
        copy_adapter(model, names[0], name)
    model.set_adapter(names[0])
    set_trainable(model, names)
    _FRESH[model] = (key, rng, adapter_state(model, names[0]), torch.get_rng_state())
    return model


def _attach_key(config: LoraConfig, names) -> str:
    return repr((sorted(config.to_dict().items(), key=lambda kv: kv[0]), tuple(names)))


def _reset_adapters(model: PeftModel, config: LoraConfig, names) -> PeftModel | None:
    """`model` as `attach_adapters(config, names)` would make it, or None when it was not attached with them."""
    record = _FRESH.get(model)
    if record is None:
        return None
    key, rng, initial, rng_after = record
    if key != _attach_key(config, names) or not torch.equal(rng, torch.get_rng_state()):
        return None
    for extra in [n for n in model.peft_config if n not in names]:  # slots a stage added for scoring
        activate(model, names[0])
        model.delete_adapter(extra)
    if tuple(model.peft_config) != tuple(names):
        return None
    for name in names:
        load_adapter_state(model, name, initial)
    activate(model, names[0])
    torch.set_rng_state(rng_after)
    return model


class _LoraLayers:
    """A PeftModel's LoRA layers and each adapter's parameters, found in one walk of the model."""

    def __init__(self, model: PeftModel):
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.names = tuple(model.peft_config)
        self.params = {name: adapter_parameters(model, name) for name in self.names}
        # each adapter's parameters under the keys of its saved state (peft's: the adapter's name left out)
        self.by_key = {name: {n.replace(f".{name}.", ".", 1): p for n, p in model.named_parameters()
                              if f".{name}." in n and "lora_" in n} for name in self.names}
        # per adapter: whether peft's saved state has exactly the keys of `by_key` (`adapter_state`), once checked
        self.same_keys: dict[str, bool] = {}
        # what peft's set_adapter would do besides the two things `activate` does: then `activate` calls it
        self.plain = bool(self.layers) and all(
            isinstance(m, LoraLinear) and not m.merged and not getattr(m, "frozen_peft_weight_names", None)
            for m in self.layers) and not any(isinstance(m, AuxiliaryTrainingWrapper) for m in model.modules())
        # one weight of each adapter: an adapter deleted and added again under the same name has new parameters
        self.probe = {name: next((m.lora_A[name].weight for m in self.layers if name in m.lora_A), None)
                      for name in self.names}

    def current(self, model: PeftModel) -> bool:
        if tuple(model.peft_config) != self.names:
            return False
        return all(probe is None or next((m.lora_A[name].weight for m in self.layers if name in m.lora_A),
                                         None) is probe for name, probe in self.probe.items())

    def fusable(self, names) -> bool:
        """Plain LoRA linear layers (no DoRA or other variant, no LoRA bias) holding every one of `names`."""
        return self.plain and all(
            all(n in m.lora_A and not m.lora_variant.get(n) and m.lora_B[n].bias is None for n in names)
            or not any(n in m.lora_A for n in names) for m in self.layers)


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, _LoraLayers]" = weakref.WeakKeyDictionary()
# what `attach_adapters` did to each model: (config and names, RNG before, the drawn weights, RNG after)
_FRESH: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _lora_layers(model: PeftModel) -> _LoraLayers:
    cached = _CACHE.get(model)
    if cached is None or not cached.current(model):
        cached = _CACHE[model] = _LoraLayers(model)
    return cached


def _set_active(model: PeftModel, layers: _LoraLayers, active) -> None:
    """What peft's set_adapter records as active, on the model and every LoRA layer (`active`: a list of names)."""
    for layer in layers.layers:
        layer._active_adapter = active
    model.base_model.active_adapter = active[0] if len(active) == 1 else active
    model.active_adapter = active[0] if len(active) == 1 else active


def activate(model: PeftModel, name: str, trained=None) -> None:
    """Route forwards through adapter `name`, keeping every trained adapter's parameters trainable: `name` and
    `trained` (default: every adapter) train, the others are frozen, as `set_adapter` + `set_trainable` did."""
    if name not in model.peft_config:
        raise ValueError(f"Adapter {name} not found.")
    layers = _lora_layers(model)
    if not layers.plain:  # an unusual wrapping: peft's own walk
        model.set_adapter(name)
        set_trainable(model, trained or list(model.peft_config))
        return
    _set_active(model, layers, [name])
    trainable = set(trained or layers.names) | {name}
    for adapter, params in layers.params.items():
        flag = adapter in trainable
        for p in params:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def can_stack(model: PeftModel, names) -> bool:
    """Whether `stacked(model, names)` can run: plain LoRA linear layers, no activation checkpointing (a recomputed
    forward in backward would run outside the context)."""
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return False
    return _lora_layers(model).fusable(names)


@contextlib.contextmanager
def stacked(model: PeftModel, names):
    """Forwards inside run a batch stacked `len(names)` times along dim 0: the i-th block of rows goes through
    adapter `names[i]`, all blocks through the frozen base together (one GEMM per linear layer). The active
    adapter and every `requires_grad` flag are as before on the way out; gradients flow to every module in `names`
    through the one backward, which may run after the context."""
    layers = _lora_layers(model)
    if not layers.fusable(names):
        raise ValueError("stacked(): the model has LoRA layers that are not plain linear ones; use one forward per "
                         "module (--module-passes joint).")
    names = tuple(names)
    before = [layer._active_adapter for layer in layers.layers]
    model_before = (model.active_adapter, model.base_model.active_adapter)

    def add_lora_terms(layer, args, kwargs, result):
        x = args[0] if args else kwargs["x"]
        if not any(n in layer.lora_A for n in names):
            return None
        rows, left = divmod(x.shape[0], len(names))
        if left:
            raise ValueError(f"stacked(): {x.shape[0]} rows are not {len(names)} equal blocks")
        # as peft's Linear.forward for one active adapter, on each block of rows, with two changes that leave the
        # sum the same: the scale multiplies the rank-r activations, not the output, and one batched
        # `result + z @ B` writes the output (no LoRA output, scaled copy, concatenation and sum of the output's
        # size: memory passes that cost as much as the rank-r GEMMs on a CPU)
        low_rank = []
        for i, name in enumerate(names):
            lora_a = layer.lora_A[name]
            part = layer._cast_input_dtype(x[i * rows:(i + 1) * rows], lora_a.weight.dtype)
            low_rank.append(lora_a(layer.lora_dropout[name](part)) * layer.scaling[name])
        z = torch.stack(low_rank).flatten(1, -2)  # (modules, rows x tokens, r)
        b = torch.stack([layer.lora_B[name].weight.t() for name in names])  # (modules, r, out)
        blocks = result.reshape(len(names), -1, result.shape[-1]).to(z.dtype)
        return torch.baddbmm(blocks, z, b).view(result.shape).to(result.dtype)

    handles = []
    try:
        for layer in layers.layers:
            layer._active_adapter = []  # the layer runs its base only; the hook adds each block's LoRA term
            handles.append(layer.register_forward_hook(add_lora_terms, with_kwargs=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for layer, active in zip(layers.layers, before):
            layer._active_adapter = active
        model.active_adapter, model.base_model.active_adapter = model_before


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """`model.disable_adapter()`: forwards run the frozen base. For plain LoRA layers this flips the cached layers'
    flag; peft's context walks the model twice and builds its status report on every entry (a large share of
    scoring time on small batches). Anything else goes through peft. A model without adapters is left as it is."""
    if not isinstance(model, PeftModel):
        yield model
        return
    layers = _lora_layers(model)
    if not layers.plain:
        with model.disable_adapter():
            yield model
        return
    before, was_disabled = [layer._disable_adapters for layer in layers.layers], model._adapters_disabled
    try:
        for layer in layers.layers:
            layer._disable_adapters = True
        model._adapters_disabled = True
        yield model
    finally:
        for layer, flag in zip(layers.layers, before):
            layer._disable_adapters = flag
        model._adapters_disabled = was_disabled


@contextlib.contextmanager
def reference_mode(model: PeftModel):
    """The reference π_ref: the base with adapters disabled, no gradients, no dropout (SPEC §2)."""
    was_training, active = model.training, model.active_adapter
    model.eval()
    try:
        with adapters_disabled(model), torch.no_grad():
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


def _peft_state(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    # LoRA never trains the embeddings: without the flag peft looks for the base config to decide (and warns on GGUF)
    return get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)


def adapter_state(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """A copy of adapter `name`'s weights under peft's saved-state keys. peft's getter walks the whole model's state
    dict (54 ms on SmolLM2, a run saves and snapshots adapters dozens of times); the cached LoRA parameters give the
    same tensors once peft's keys were checked to be exactly theirs. One process only: a sharded or partitioned
    model (FSDP, ZeRO-3) needs peft's gathering."""
    layers = _lora_layers(model) if name in getattr(model, "peft_config", {}) else None
    if layers is not None and layers.plain and not torch.distributed.is_initialized():
        targets = layers.by_key[name]
        if name not in layers.same_keys:
            layers.same_keys[name] = _peft_state(model, name).keys() == targets.keys()
        if layers.same_keys[name]:
            return {k: p.detach().clone() for k, p in targets.items()}
    return {k: v.detach().clone() for k, v in _peft_state(model, name).items()}


def load_adapter_state(model: PeftModel, name: str, state: dict[str, torch.Tensor]) -> None:
    """Adapter `name` takes the weights of `state` (keys as `adapter_state` gives them). Plain LoRA layers holding
    exactly those keys and shapes are copied into directly; peft's loader walks the whole model's state dict on
    every call (the λ search loads a candidate per point). Anything else goes through peft."""
    layers = _lora_layers(model) if name in model.peft_config else None
    targets = layers.by_key.get(name) if layers is not None and layers.plain else None
    if targets is not None and targets.keys() == state.keys() and all(
            targets[k].shape == v.shape for k, v in state.items()):
        with torch.no_grad():
            for key, value in state.items():
                targets[key].copy_(value)
        return
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter '{name}': unexpected keys in saved state: {unexpected[:3]}")


def write_adapter(config: LoraConfig, state: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """Write saved adapter weights (keys as `adapter_state` returns them) as a standalone peft adapter."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config.inference_mode = True
    config.save_pretrained(str(directory))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, directory / "adapter_model.safetensors")
    return directory


def save_adapter(model: PeftModel, name: str, directory: str | Path) -> Path:
    """Write adapter `name` of `model` as a standalone peft adapter (adapter_config.json + adapter_model.safetensors):
    the one writer, `write_adapter`, given the adapter's config and weights."""
    return write_adapter(model.peft_config[name], adapter_state(model, name), directory)
