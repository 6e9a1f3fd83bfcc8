"""Data parallelism across the processes of `accelerate launch` (or torchrun), for the hand-written loop.

Why not wrap the model in DDP: an OFS-DPO step runs two forwards through the same network with different adapters
active and then one backward, which DDP's bucketed reducer does not expect. The trainable state is only the LoRA
matrices (a few MB), so after the backward we sum their gradients across processes ourselves, in one flat
all-reduce per step. Every process then takes the same optimiser step and the replicas never drift, so the run is
the same as one process with the same global batch (the multi-process test checks this).

FSDP (`distributed_type: FSDP`, `fsdp_version: 2`, configs/accelerate/fsdp.yaml) shards the frozen base instead of
replicating it: `fully_shard` on each decoder layer, so a process holds 1/N of the layers' weights and all-gathers
one layer at a time inside its forward and backward. The LoRA parameters are left out of FSDP (`ignored_params`):
they stay plain replicated tensors, so their gradients, the flat all-reduce, clipping, the optimiser, swaps and
checkpoints are exactly those of the replicated case (and FSDP's gradient averaging never touches them). The
embeddings, final norm and LM head stay replicated too: the chunked LM head (ofsdpo.logprobs) uses the head's
weight outside any module forward, where a sharded weight would be a DTensor. What FSDP adds is a constraint:
the all-gathers are collectives, so every process must run the same number of forwards and backwards
(`micro_batches`; the trainer pads a process's short share with zero-weight stand-in pairs).

DeepSpeed ZeRO-3 (`distributed_type: DEEPSPEED`, `zero_stage: 3`, configs/accelerate/deepspeed-zero3.yaml) is the
other way to shard the base: `partition_base` hands the frozen backbone to DeepSpeed before the LoRA modules are
attached, so every backbone weight (embeddings and final norm included) is partitioned and all-gathered module by
module inside forward and backward, by an engine that has no optimiser. DeepSpeed never sees a LoRA parameter: as
under FSDP they stay replicated, with our all-reduce, clipping, optimiser, swaps and checkpoints, and the same
lockstep constraint holds. A LM head tied to the embeddings is partitioned with them; ofsdpo.logprobs gathers it
around the chunked head. ZeRO-1/2 would shard only the gradients and optimiser state of what is trained, the few
MB of LoRA: such a launch runs as the replicated case (with a warning), which computes the same update.

accelerate's `PartialState` reads the launcher's environment, picks the device (`cuda:<local rank>`, or the CPU
with gloo) and sets up the process group; one process without a launcher is the plain single-process case.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import set_seed

from .causal_lm import causal_lm_parts
from .errors import ConfigError
from .modules import adapter_parameters, attach_adapters

logger = logging.getLogger(__name__)


def _env_flag(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).lower() == "true"


def _check_fsdp_settings() -> None:
    """Refuse the accelerate FSDP settings that ofsdpo does not implement, naming the key to change."""
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("FSDP version 1 is not supported: set `fsdp_version: 2` in the accelerate config's "
                          "fsdp_config (as configs/accelerate/fsdp.yaml does).")
    for flag, key in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                      ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing")):
        if _env_flag(flag):
            raise ConfigError(f"FSDP: `{key}: true` is not supported by ofsdpo; set it to false.")


def _check_deepspeed_settings() -> int:
    """The ZeRO stage of an accelerate DeepSpeed launch; refuses the settings ofsdpo does not implement, naming the
    key to change. ofsdpo keeps its own optimiser, clipping and accumulation (see the module docstring)."""
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file.lower() not in ("", "none"):
        raise ConfigError(f"DeepSpeed: a deepspeed_config_file ({config_file}) is not supported by ofsdpo; set "
                          "zero_stage in the accelerate config's deepspeed_config instead (as "
                          "configs/accelerate/deepspeed-zero3.yaml does).")
    for variable, key in (("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "offload_param_device"),
                          ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "offload_optimizer_device")):
        value = os.environ.get(variable, "none")
        if value.lower() != "none":
            raise ConfigError(f"DeepSpeed: `{key}: {value}` is not supported by ofsdpo; set it to none.")
    for variable, key, neutral, flag in (
            ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps", "1", "--grad-accum"),
            ("ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", "none", "--max-grad-norm")):
        value = os.environ.get(variable, neutral)
        if value.lower() != neutral:
            raise ConfigError(f"DeepSpeed: `{key}: {value}` is not supported in the accelerate config; remove it "
                              f"and use ofsdpo's {flag}.")
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    if stage not in ("0", "1", "2", "3"):
        raise ConfigError(f"DeepSpeed: zero_stage must be 0, 1, 2 or 3 in the accelerate config's deepspeed_config "
                          f"(got {stage or 'none'}).")
    return int(stage)


def _managed(param: torch.Tensor) -> bool:
    """Whether FSDP (a DTensor) or DeepSpeed ZeRO-3 (a `ds_id`) owns this parameter's storage."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or hasattr(param, "ds_id")


def _replicas_to(model: torch.nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer that FSDP or DeepSpeed does not manage to `device`, in place: the optimiser,
    peft and FSDP keep references to the parameter objects, so only their data moves."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not _managed(param) and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and not isinstance(buffer, DTensor) and buffer.device != device:
                module._buffers[name] = buffer.to(device)


class Processes:
    """This process's place among the launched processes, and the few collectives the trainer needs."""

    def __init__(self, device: str = "auto"):
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.fsdp = launched and _env_flag("ACCELERATE_USE_FSDP")  # one process has nothing to shard across
        if self.fsdp:
            _check_fsdp_settings()
        self.zero_stage = _check_deepspeed_settings() if launched and _env_flag("ACCELERATE_USE_DEEPSPEED") else None
        self.zero3 = self.zero_stage == 3
        if self.zero3:
            try:
                import deepspeed  # noqa: F401
            except ImportError as err:
                raise ConfigError(f"DeepSpeed ZeRO-3 needs the deepspeed package ({err}); see the README's "
                                  "accelerate section for its install, or launch with configs/accelerate/fsdp.yaml.")
        self._zero_engine = None  # DeepSpeed's ZeRO-3 engine, kept alive with its hooks
        self.base_partition = None  # ZeRO-3: this process's share of the base's weights (numbers of elements)
        if launched:
            state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
            self.index, self.count, self.device = state.process_index, state.num_processes, state.device
        else:
            self.index, self.count, self.device = 0, 1, None  # the trainer resolves --device itself
        if self.zero_stage is not None and not self.zero3 and self.is_main:
            logger.warning("DeepSpeed ZeRO-%d shards only what is trained, here the LoRA modules' gradients and "
                           "optimiser state (a few MB): ofsdpo runs it as plain data parallelism (the base "
                           "replicated, one all-reduce of the LoRA gradients per step), which computes the same "
                           "update. Use zero_stage: 3 (configs/accelerate/deepspeed-zero3.yaml) to partition the "
                           "base.", self.zero_stage)

    def attach_policy(self, base, names, lora, seed: int, gradient_checkpointing: bool):
        """The frozen `base` with the LoRA modules `names`, placed for this launch: the base partitioned before the
        modules exist (ZeRO-3: DeepSpeed would partition them too), the model sharded (FSDP), the same initial
        modules on every process and each process its own dropout masks, as one big batch would have."""
        if self.zero3:
            self.partition_base(base)
        set_seed(seed)  # the same LoRA init for `default` (dpo) and `fast` (ofs-dpo): both draw first
        model = attach_adapters(base, lora, names)
        if gradient_checkpointing:  # the base's activations recomputed in the backward (peft's input hook)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.sharded:
            self.shard_model(model)
        model.train()
        self.broadcast([p for n in names for p in adapter_parameters(model, n)])
        if self.distributed:
            torch.manual_seed(seed + self.index)
        return model

    def describe(self) -> dict:
        """The launch, for summary.json."""
        return {"num_processes": self.count, "sharded_base": self.sharded, "sharding": self.sharding,
                "zero_stage": self.zero_stage, "base_partition": self.base_partition}

    @property
    def sharded(self) -> bool:
        """Whether the frozen base is split across the processes (FSDP2 or ZeRO-3): every process must then run as
        many forwards and backwards as the others (the all-gathers are collectives)."""
        return self.fsdp or self.zero3

    @property
    def sharding(self) -> str | None:
        return "fsdp2" if self.fsdp else "zero3" if self.zero3 else None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.count > 1

    def shard(self, indices: list[int], batch_size: int, index: int | None = None) -> list[int]:
        """This process's pairs of one optimiser step (or process `index`'s): in each global micro-batch of
        `batch_size x count` pairs, the `index`-th slice of `batch_size`. One process with batch
        `batch_size x count` sees the same pairs."""
        if not self.distributed:
            return indices
        index = self.index if index is None else index
        width = batch_size * self.count
        mine = []
        for start in range(0, len(indices), width):
            micro = indices[start:start + width]
            share = -(-len(micro) // self.count)  # ceil: a short last micro-batch is still split across processes
            mine += micro[index * share:(index + 1) * share]
        return mine

    def micro_batches(self, indices: list[int], batch_size: int) -> int:
        """The most micro-batches of `batch_size` that any process's `shard` of `indices` makes. With a sharded base
        every process runs this many; it needs no communication, each share being a function of the process index."""
        return max(-(-len(self.shard(indices, batch_size, i)) // batch_size) for i in range(self.count))

    def shard_model(self, model: torch.nn.Module) -> None:
        """FSDP2: shard the frozen weights of each decoder layer across the processes, then put what stays replicated
        (LoRA, embeddings, final norm, LM head, buffers) on this process's device. The model comes in on the CPU, so
        no process ever holds the whole base on its accelerator: `fully_shard` moves one layer at a time.

        The root FSDP module is the backbone (what ofsdpo.logprobs and generation call), holding no parameter of its
        own: FSDP takes the first module to run forward as the root, and it must contain every sharded layer."""
        if self.zero3:  # the base was partitioned before LoRA came (partition_base): place what stays replicated
            _replicas_to(model, self.device)
            return
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import FSDPModule, fully_shard
        except ImportError:
            fully_shard = None
        if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ConfigError(f"FSDP needs a torch whose fully_shard takes ignored_params (2.7 or later); this is "
                              f"torch {torch.__version__}. Upgrade torch, or launch with configs/accelerate/ddp.yaml.")

        parts = causal_lm_parts(model)
        if parts is not None and isinstance(parts[0], FSDPModule):  # a continual stage: the previous one sharded it
            _replicas_to(model, self.device)  # (its new LoRA modules are not FSDP's: replicated, as wanted)
            return
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        layer_classes = set(getattr(lm, "_no_split_modules", None) or [])
        layers, inside = [], set()  # the outermost modules of those classes (a layer may list its own blocks too)
        for module in parts[0].modules() if parts else []:
            if type(module).__name__ in layer_classes and id(module) not in inside:
                layers.append(module)
                inside.update(id(m) for m in module.modules())
        if not layers:
            raise ConfigError(f"FSDP: found no decoder layers to shard in {type(lm).__name__} (its _no_split_modules "
                              f"is {sorted(layer_classes)}). Launch with configs/accelerate/ddp.yaml instead.")
        backbone = parts[0]
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        mesh = init_device_mesh(self.device.type, (self.count,))
        trained = {p for p in model.parameters() if p.requires_grad}  # LoRA: replicated, see the module docstring
        reshard = _env_flag("FSDP_RESHARD_AFTER_FORWARD", default=True)
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard,
                        ignored_params=trained & set(layer.parameters()))
        in_layers = {p for layer in layers for p in layer.parameters()}
        fully_shard(backbone, mesh=mesh, ignored_params=set(backbone.parameters()) - in_layers | trained)
        _replicas_to(model, self.device)

    def partition_base(self, lm: torch.nn.Module) -> None:
        """DeepSpeed ZeRO-3: partition the frozen backbone (embeddings, decoder layers, final norm) of the causal LM
        `lm` across the processes, before any LoRA module is attached: DeepSpeed turns every parameter of the module
        it is given into a partitioned one, and the LoRA parameters must stay plain replicated tensors. An engine
        without an optimiser (ZeRO-Inference) installs the hooks that all-gather a module's weights for its forward
        and again for its backward; the LoRA modules peft then wraps around the partitioned linears have no hooks.

        The backbone is the module ofsdpo.logprobs calls, so each of its forwards starts DeepSpeed's step. An untied
        LM head stays replicated; a head tied to the embeddings is partitioned with them, and ofsdpo.logprobs
        gathers it for the chunked head. The base comes in on the CPU: partitions go to this process's device."""
        parts = causal_lm_parts(lm)
        if parts is None:
            raise ConfigError(f"DeepSpeed ZeRO-3: ofsdpo does not know the layout of {type(lm).__name__} (no backbone "
                              "and output embeddings). Launch with configs/accelerate/ddp.yaml instead.")
        backbone, _, text_config = parts
        if any(hasattr(p, "ds_id") for p in backbone.parameters()):  # a continual stage: the first one partitioned it
            self._record_partition(lm)
            return
        import deepspeed

        lm.requires_grad_(False)  # frozen, as attach_adapters leaves it: only the LoRA modules train
        hidden = getattr(text_config, "hidden_size", 0) or 0
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {  # what accelerate's "auto" values give for this hidden size
                      "stage": 3, "stage3_param_persistence_threshold": 10 * hidden,
                      "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)}}
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # partitions onto this process's device, one weight at a time; without DeepSpeed's global replacement of
        # torch.nn.functional.linear (mem_efficient_linear), which would reach every linear of the process
        deepspeed.zero.Init(module=backbone, config_dict_or_path=config, mem_efficient_linear=False)
        self._zero_engine, *_ = deepspeed.initialize(model=backbone, config=config)
        self._record_partition(lm)

    def _record_partition(self, lm: torch.nn.Module) -> None:
        def stored(p):  # a small weight below DeepSpeed's persistence threshold stays whole on every process
            if not hasattr(p, "ds_id"):
                return p.numel()
            return p.ds_numel if getattr(p, "ds_persist", False) else p.ds_tensor.numel()

        base = [p for name, p in lm.named_parameters() if "lora_" not in name]  # (a continual stage's LoRA: not base)
        self.base_partition = {"held": sum(stored(p) for p in base),
                               "of": sum(getattr(p, "ds_numel", p.numel()) for p in base)}

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (a copy; the input is left as it was)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(tensor.device)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over processes, in one flat all-reduce."""
        if not self.distributed:
            return
        for p in params:  # a module may have had no pairs on this process: its gradient is then zero, not None
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def broadcast(self, params: list[torch.Tensor]) -> None:
        """Copy the main process's values into every replica (identical starting adapters, whatever the seed)."""
        if self.distributed:
            for p in params:
                dist.broadcast(p.data, src=0)

    def gather(self, obj) -> list:
        """Every process's `obj`, in process order, on every process."""
        if not self.distributed:
            return [obj]
        out = [None] * self.count
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (e.g. a Ctrl-C that reached only some of them)."""
        if not self.distributed:
            return flag
        return bool(self.sum(torch.tensor([float(flag)])).item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
