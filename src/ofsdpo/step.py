"""One optimiser step of DPO or OFS-DPO (SPEC §2-3).

For each micro-batch: the modules' concatenated forwards, the cached reference log-probs, the DPO losses, the
chasing regulariser, and one backward for everything. Each module then clips its own gradient and has its own
learning rate (one AdamW, a param group per module). A step whose loss or gradient is not finite moves nothing (no
parameter, optimiser or schedule update), as AMP's GradScaler does.

OFS-DPO's two modules (`--module-passes`, issue 16): `fused` (default) runs both in one forward of the micro-batch
stacked twice, `[fast rows; slow rows]`, each half through its own LoRA inside the same layer calls
(`modules.stacked`); `joint` runs one forward per module; `sequential` one graph at a time. All three give the same
losses and gradients (dropout aside: each module draws its own masks in every mode). `--module-batch-size` splits
each micro-batch into accumulated parts: every loss term is a per-pair sum divided by the step's pair count, so the
step's gradient is the same, with the activations of the smaller part alive at a time.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import get_scheduler

from .chasing import ChaseState
from .config import TrainingOptions
from .errors import ConfigError
from .data import PreferenceData, collate
from .logprobs import concatenated_forward, stacked_forward
from .methods import TrainingMethod, completion_lengths
from .modules import activate, can_stack, stacked
from .reference import ReferenceCache

logger = logging.getLogger(__name__)


# The memory rule (issue 31). Splitting a micro-batch into accumulated parts keeps the step's gradient but runs
# the host's work (kernel launches, Python, hooks) once per part: it pays only where the activations it saves
# matter. Activations kept for backward, per token and layer, are estimated as 10·hidden + 4·intermediate values
# (calibrated on the 70m bench shape: halving its 4-pair micro-batch saved 1.4 GiB, the estimate 1.1 GiB).
CPU_SPLIT_MIB = 256.0  # on a CPU, halve where that saves at least this much by the estimate


def activation_mib(model_config, pairs: int, tokens: int, modules: int, dtype_bytes: int) -> float:
    """Estimated activation memory (MiB) of one fused forward of `modules` LoRA modules over `pairs` pairs (two
    sequences each) of up to `tokens` tokens: an order-of-magnitude figure to size parts by, not a measurement."""
    hidden = getattr(model_config, "hidden_size", 0) or 0
    inner = getattr(model_config, "intermediate_size", None) or 4 * hidden
    layers = getattr(model_config, "num_hidden_layers", 0) or 0
    per_token = layers * (10 * hidden + 4 * inner)
    return modules * 2 * pairs * tokens * per_token * dtype_bytes / 2**20


def auto_part_size(model, cfg: TrainingOptions, modules: int) -> int:
    """Pairs per fused forward under the memory rule (`--module-batch-size 0`): with `--memory-budget-mib`, the
    largest part whose estimate fits (at least 1), on any device; else on a CPU half the micro-batch where that
    saves at least CPU_SPLIT_MIB, and the whole micro-batch otherwise (an accelerator: kernels are launch-bound at
    small sizes and a split halves every GEMM)."""
    first = next(model.parameters())
    config = getattr(model, "config", None)

    def estimate(pairs: int) -> float:
        return activation_mib(config, pairs, cfg.max_length, modules, first.element_size())

    batch = cfg.batch_size
    if cfg.memory_budget_mib is not None:
        return next((size for size in range(batch, 0, -1) if estimate(size) <= cfg.memory_budget_mib), 1)
    half = -(-batch // 2)
    if first.device.type == "cpu" and batch > 1 and estimate(batch) - estimate(half) >= CPU_SPLIT_MIB:
        return half
    return batch


def module_plan(model, names, cfg: TrainingOptions) -> tuple[str, int]:
    """(how the modules run, pairs per forward). One module: whole micro-batches. Several: `--module-passes`
    (fused falls back to joint, with a warning, where the LoRA layers are not plain linear ones) on parts of
    `--module-batch-size` pairs (0: `auto_part_size`; unset, the config resolves it: 0 by default)."""
    if len(names) < 2:
        return "joint", cfg.batch_size
    size = cfg.batch_size if cfg.module_batch_size is None else cfg.module_batch_size
    if size == 0:
        size = auto_part_size(model, cfg, len(names))
        logger.info("memory rule: %d of %d pairs per fused forward", size, cfg.batch_size)
    if not 1 <= size <= cfg.batch_size:
        raise ConfigError(f"--module-batch-size must be in [0, --batch-size {cfg.batch_size}] (got {size}).")
    passes = cfg.module_passes
    if passes == "fused" and not can_stack(model, names):
        logger.warning("--module-passes fused needs plain LoRA linear layers and no activation checkpointing; "
                       "running the modules one forward each (joint) instead.")
        passes = "joint"
    return passes, size


def lr_schedule(kind: str, warmup: int, total: int):
    """The learning-rate factor of step `step` (0-based): transformers' curve (`get_scheduler`: linear warm-up, then
    constant, linear or cosine decay to 0 at `total`), with the warm-up one step ahead. Transformers' warm-up step s
    trains at s / warmup, its first step at rate 0 (a step that moves nothing); ours at (s + 1) / warmup, as ofsdpo
    always has (golden runs, resumed runs), so warm-up step s reads transformers' curve at s + 1. Past the end the
    factor stays at 0 (transformers' cosine would rise again). tests/test_step.py checks it against the closed form."""
    # get_scheduler wraps its curve in a LambdaLR around an optimiser; the trainer's LambdaLR needs the curve alone
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    end = max(total, warmup + 1)  # a run shorter than its warm-up reaches the full rate, then ends (as before)
    name = "constant_with_warmup" if kind == "constant" else kind  # transformers' "constant" has no warm-up
    curve = get_scheduler(name, stand_in, num_warmup_steps=warmup, num_training_steps=end).lr_lambdas[0]

    def factor(step: int) -> float:
        return curve(step + 1 if step < warmup else min(step, end))

    return factor


class OptimiserStep:
    """The step function: `step(data, reference, indices, chase)` trains on the pairs `indices` of the global batch
    and returns the step's metrics row (means over its pairs, TRL's names) with `finite` (was the update applied)."""

    def __init__(self, model, method: TrainingMethod, optimizer, scheduler, processes, config: TrainingOptions, device,
                 pad_token_id: int):
        self.model, self.method, self.names, self.optimizer, self.scheduler = (model, method, method.adapters,
                                                                               optimizer, scheduler)
        self.processes, self.cfg, self.device, self.pad_token_id = processes, config, device, pad_token_id
        self.trained_params = [p for group in optimizer.param_groups for p in group["params"]]  # swaps move data only
        self.passes, self.part_size = module_plan(model, self.names, config)

    def batch(self, data: PreferenceData, indices: list[int]) -> dict:
        batch = collate([data.pairs[i] for i in indices], self.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def __call__(self, data: PreferenceData, reference: ReferenceCache, indices: list[int], chase: ChaseState) -> dict:
        sums = self._accumulate(data, reference, indices, chase)
        self.processes.sum_gradients(self.trained_params)
        keys = list(sums)
        totals = self.processes.sum(torch.stack([sums[k].detach().float() for k in keys]))
        norms = self._clip_gradients()
        values = torch.cat([totals, torch.stack([n.float() for n in norms])]).tolist()  # one device sync
        finite = all(math.isfinite(v) for v in values)  # losses, rewards, log-probs and gradient norms
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        summed = dict(zip(keys, values))
        tokens = int(summed.pop("num_tokens"))
        row = {k: v / len(indices) for k, v in summed.items()}
        grad_norms = dict(zip(self.names, values[len(keys):]))
        for group in self.optimizer.param_groups:
            row[self.method.key(group["name"], "learning_rate")] = group["lr"]
            row[self.method.key(group["name"], "grad_norm")] = grad_norms[group["name"]]
        # the norm over all modules, where no module's own norm is already named `grad_norm`
        row.setdefault("grad_norm", math.sqrt(sum(v * v for v in grad_norms.values())))
        row["num_tokens"], row["pairs"], row["finite"] = tokens, len(indices), finite
        return row

    def _clip_gradients(self) -> list[torch.Tensor]:
        """Each module clips its own gradient, as its own learner; the norms are before clipping."""
        max_norm = self.cfg.max_grad_norm or float("inf")
        return [torch.nn.utils.clip_grad_norm_(g["params"], max_norm) for g in self.optimizer.param_groups]

    def _accumulate(self, data, reference, indices: list[int], chase: ChaseState) -> dict[str, torch.Tensor]:
        """Forward and backward of every micro-batch of this process; the summed statistics."""
        cfg = self.cfg
        # every process holds every statistic, in the same order, even with no pairs this step: they are summed
        sums = {key: torch.zeros((), device=self.device) for key in self.method.step_stat_keys()}
        mine = self.processes.shard(indices, cfg.batch_size)  # this process's part of the global batch
        micro = [mine[start:start + cfg.batch_size] for start in range(0, len(mine), cfg.batch_size)]
        if self.processes.sharded:  # all-gathers inside forward and backward: every process runs as many as the
            micro += [[]] * (self.processes.micro_batches(indices, cfg.batch_size) - len(micro))  # busiest one
        size = self.part_size  # each micro-batch in parts of `size` pairs (--module-batch-size), as many everywhere
        parts = [m[start:start + size] for m in micro for start in range(0, cfg.batch_size, size)]
        if not self.processes.sharded:
            parts = [part for part in parts if part]
        for part in parts:  # an empty part runs a stand-in pair: its loss / inf is 0, and so is its gradient
            batch = self.batch(data, part or indices[:1])
            divisor = len(indices) if part else math.inf  # mean over the step's pairs: accumulation-invariant
            refs = reference.get(batch["index"], self.device)
            if self.passes == "sequential":
                total, stats = self._sequential_passes(batch, refs, divisor, chase)
            else:
                logps = (self._fused_forward(batch) if self.passes == "fused" else
                         {name: self._forward(name, batch) for name in self.names})
                total, stats = self.method.objective(logps, *refs, cfg, chase, completion_lengths(batch))
                (total / divisor).backward()
            if not part:
                continue
            for key, value in stats.items():
                sums[key] = sums[key] + value.sum()
            sums["num_tokens"] = sums["num_tokens"] + batch["attention_mask"].sum()
        return sums

    def _forward(self, name: str, batch: dict):
        activate(self.model, name, self.names)
        return concatenated_forward(self.model, batch, self.cfg.logprob_chunk_size)

    def _fused_forward(self, batch: dict) -> dict:
        """Both modules in one forward: `[chosen; rejected]` stacked once per module, each copy through its own LoRA
        (`modules.stacked`); the graph spans both modules until the one backward."""
        with stacked(self.model, self.names):
            logps = stacked_forward(self.model, batch, len(self.names), self.cfg.logprob_chunk_size)
        return dict(zip(self.names, logps))

    def _sequential_passes(self, batch: dict, refs, divisor: float, chase: ChaseState):
        """`--module-passes sequential`: the same gradients with one module's graph alive at a time. The modules
        meet only through each other's detached log-probs (the stop-gradients of SPEC §3), so each module's
        objective can be differentiated on its own once the other's values are known."""
        first, second = self.names
        with torch.no_grad():
            second_values = self._forward(second, batch)  # with LoRA dropout, a mask of its own (joint shares one)
        first_logps = self._forward(first, batch)
        lengths = completion_lengths(batch)
        total, _ = self.method.objective({first: first_logps, second: tuple(v.detach() for v in second_values)},
                                         *refs, self.cfg, chase, lengths)
        (total / divisor).backward()  # only `first` is live: its part of the objective
        first_values = tuple(v.detach() for v in first_logps)
        del first_logps, total  # free the first graph before the second is built
        total, stats = self.method.objective({first: first_values, second: self._forward(second, batch)}, *refs,
                                             self.cfg, chase, lengths)
        (total / divisor).backward()
        return total, stats
