"""Data parallelism across the processes of `accelerate launch` (or torchrun), for the hand-written loop.

Why not wrap the model in DDP: an OFS-DPO step runs two forwards through the same network with different adapters
active and then one backward, which DDP's bucketed reducer does not expect. The trainable state is only the LoRA
matrices (a few MB), so after the backward we sum their gradients across processes ourselves, in one flat
all-reduce per step. Every process then takes the same optimiser step and the replicas never drift, so the run is
the same as one process with the same global batch (the multi-process test checks this).

accelerate's `PartialState` reads the launcher's environment, picks the device (`cuda:<local rank>`, or the CPU
with gloo) and sets up the process group; one process without a launcher is the plain single-process case.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import ConfigError


class Processes:
    """This process's place among the launched processes, and the few collectives the trainer needs."""

    def __init__(self, device: str = "auto"):
        for flag, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
            if os.environ.get(flag, "false").lower() == "true":  # refuse rather than silently replicate the model
                raise ConfigError(f"{what} is not supported yet: ofsdpo trains its LoRA modules data-parallel, each "
                                  "process holding the whole base. Launch with configs/accelerate/ddp.yaml.")
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if launched:
            from accelerate import PartialState

            state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
            self.index, self.count, self.device = state.process_index, state.num_processes, state.device
        else:
            self.index, self.count, self.device = 0, 1, None  # the trainer resolves --device itself

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.count > 1

    def shard(self, indices: list[int], batch_size: int) -> list[int]:
        """This process's pairs of one optimiser step: in each global micro-batch of `batch_size x count` pairs,
        the `index`-th slice of `batch_size`. One process with batch `batch_size x count` sees the same pairs."""
        if not self.distributed:
            return indices
        width = batch_size * self.count
        mine = []
        for start in range(0, len(indices), width):
            micro = indices[start:start + width]
            share = -(-len(micro) // self.count)  # ceil: a short last micro-batch is still split across processes
            mine += micro[self.index * share:(self.index + 1) * share]
        return mine

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
