"""`ofsdpo train`'s config: the training options a continual stage receives too (`TrainingOptions`), and the run's
own data, method, step limit and output folder (`OFSDPOConfig`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ..errors import ConfigError
from .base import (CADENCE, DTYPES, OUTPUT, RUNTIME, ModelOptions, _help, check_field_types, field_names,
                   read_config_file, write_yaml)

ON_PROMPTS = "prompts"  # --on-policy given bare: the prompts of --prompts


@dataclass
class TrainingOptions:
    """The options of one training run that `ofsdpo continual` passes to every stage: model, stream, method
    hyper-parameters, LoRA, optimiser, performance and output cadence. `OFSDPOConfig` adds what only `ofsdpo train`
    has (its data, method, step limit and output folder); `ContinualConfig` contains these instead."""

    # --- model -----------------------------------------------------------------------------------------------------
    model: Optional[str] = ModelOptions.model()
    gguf_file: Optional[str] = ModelOptions.gguf_file()
    trust_remote_code: bool = ModelOptions.trust_remote_code()
    device: str = ModelOptions.device()
    dtype: DTYPES = ModelOptions.dtype()
    # --- data ------------------------------------------------------------------------------------------------------
    data_split: str = field(default="train", metadata=_help("Split to read when --data is a dataset."))
    eval_steps: int = field(
        default=0,
        metadata=_help("Score --eval-data every N steps and keep the best fast module in best_fast/ (0: off)."),
    )
    max_length: int = field(default=512, metadata=_help("Max tokens of prompt + completion (completion cut first)."))
    max_prompt_length: Optional[int] = field(default=None, metadata=_help(
        "Max prompt tokens; longer prompts keep their end (default: 256, or half of --max-length if that is less)."))
    max_completion_length: Optional[int] = field(default=None, metadata=_help(
        "Max tokens of each completion (TRL's name): chosen and rejected are cut to it before --max-length applies "
        "(unset: only --max-length cuts them); every pairs file, held-out and on-policy pairs alike. Shorter "
        "completions make cheaper steps but lose their ends."))
    # --- the online stream -----------------------------------------------------------------------------------------
    round_size: Optional[int] = field(
        default=None,
        metadata=_help("Pairs per online round (default: one optimiser step, batch-size x processes x grad-accum "
                       "pairs)."),
    )
    epochs: int = field(default=1, metadata=_help("Passes over the stream; 1 is online (each pair seen once)."))
    # --- on-policy rounds (train --on-policy / --prompts, continual prompts: domains) ---------------------------
    samples_per_prompt: int = field(default=4, metadata=_help("On-policy samples per prompt (best vs worst)."))
    max_new_tokens: int = field(default=0, metadata=_help(
        "On-policy: most tokens per sampled response (0: the built-in domain's own, 64 for --prompts)."))
    temperature: float = field(default=1.0, metadata=_help("On-policy sampling temperature."))
    top_p: float = field(default=0.95, metadata=_help("On-policy nucleus sampling threshold."))
    missing_eos_penalty: Optional[float] = field(default=None, metadata=_help(
        "On-policy: subtract this from the judge score of a response that did not end (no EOS), as TRL does."))
    generation_batch_size: int = field(default=64, metadata=_help(
        "On-policy: responses (prompts x samples) per generate call; lower it if sampling runs out of memory."))
    judge_device: Optional[str] = field(default=None, metadata=_help(
        "Device of an hf:MODEL judge (default: the policy's).", role=RUNTIME))
    batch_size: Optional[int] = field(default=None, metadata=_help(
        "Pairs per micro-batch, per process (memory grows with it). Unset: 4, and ofs-dpo then sizes the parts its two "
        "modules run on by the memory rule (--module-batch-size 0)."))
    grad_accum: Optional[int] = field(default=None, metadata=_help("Micro-batches per optimiser step. Unset: 1."))
    # --- method ----------------------------------------------------------------------------------------------------
    beta: float = field(default=0.1, metadata=_help("DPO temperature; larger keeps the policy closer to the base."))
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = field(
        default="sigmoid",
        metadata=_help("The per-pair loss, TRL's names and formulas: sigmoid (DPO), ipo (on per-token log-ratios), "
                       "hinge (SLiC), robust (rDPO, with --label-smoothing). ofs-dpo's chase term uses the same "
                       "family with the other module as the reference (SPEC 3)."))
    label_smoothing: float = field(default=0.0, metadata=_help(
        "The probability that a pair's labels are flipped: robust's noise rate in [0, 0.5); with sigmoid, "
        "conservative DPO. 0 for ipo and hinge."))
    lr: float = field(default=1e-4, metadata=_help("Learning rate of the fast module (and of the dpo module)."))
    slow_lr_ratio: float = field(default=0.5, metadata=_help("Slow learning rate = lr x this, in (0, 1]."))
    alpha: float = field(default=0.1, metadata=_help("Weight of the chasing regulariser L_FS; 0 turns it off."))
    chase_form: Literal["minmax", "symmetric", "proximal"] = field(
        default="minmax",
        metadata=_help("minmax: the chaser maximises L_FS; symmetric: it minimises L_FS(Q, P); proximal: each module "
                       "is pulled toward the other's margin (the one ahead is pulled back; SPEC 3)."),
    )
    chase_beta: Optional[float] = field(
        default=None,
        metadata=_help("Temperature of the chasing term L_FS (default: --beta). A larger one lets the chase act on "
                       "smaller margin gaps."),
    )
    chase_interval: int = field(
        default=10, metadata=_help("Steps between leader/chaser comparisons (a swap happens if the chaser leads).")
    )
    swap: Literal["roles", "params", "off"] = field(
        default="roles",
        metadata=_help("roles: labels swap; params: weights and optimiser states swap so the leader trains fast."),
    )
    module_passes: Literal["fused", "joint", "sequential"] = field(
        default="fused",
        metadata=_help("ofs-dpo memory/speed: fused runs both modules in one forward of the batch stacked twice (each "
                       "half through its own LoRA, one base GEMM per layer), then one backward (8N FLOPs per token); "
                       "joint runs one forward per module, then one backward (8N); sequential runs one module's "
                       "graph at a time after a no-grad forward of the other (10N, about dpo's activation memory)."),
    )
    module_batch_size: Optional[int] = field(
        default=None,
        metadata=_help("ofs-dpo: pairs per forward of the two modules; each --batch-size micro-batch runs in parts "
                       "of this many, accumulated (the same pairs and gradient per step). 0: sized by the memory rule "
                       "(`step.auto_part_size`: on a CPU, halves where that saves >= 256 MiB of activations by its "
                       "estimate; under --memory-budget-mib, the largest part that fits; else whole micro-batches). "
                       "Unset: 0 when neither --batch-size nor --grad-accum is given, else --batch-size. dpo ignores "
                       "it."),
    )
    memory_budget_mib: Optional[float] = field(
        default=None,
        metadata=_help("ofs-dpo, with the memory rule (--module-batch-size 0, the default): the activation memory "
                       "one fused forward may use, in MiB (an estimate from the model's shape and --max-length); "
                       "each micro-batch runs in the largest parts that fit, on any device.", role=RUNTIME),
    )
    # --- LoRA ------------------------------------------------------------------------------------------------------
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling numerator (scale = alpha / r)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA input; 0 makes runs exact."))
    target_modules: str = field(
        default="all-linear", metadata=_help("Comma-separated module names, or all-linear.")
    )
    # --- optimiser -------------------------------------------------------------------------------------------------
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata=_help("Schedule after warm-up; constant suits an open-ended stream.")
    )
    warmup_steps: int = field(default=0, metadata=_help("Linear warm-up steps."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay on LoRA weights."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip each module's gradient norm (0: no clipping)."))
    seed: int = field(default=42, metadata=_help("Seed of LoRA init, dropout and everything random."))
    max_nonfinite_steps: int = field(
        default=5,
        metadata=_help("A step with a non-finite loss or gradient is skipped (no update) and counted; this many in a "
                       "row stop the run with a checkpoint kept (exit status 2)."),
    )
    # --- performance -----------------------------------------------------------------------------------------------
    logprob_chunk_size: int = field(
        default=1024, metadata=_help("Completion tokens per LM-head chunk; smaller lowers peak memory.")
    )
    eval_batch_size: Optional[int] = field(default=None, metadata=_help("Pairs per no-grad forward (default 2x)."))
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help("Recompute the base's activations in the backward instead of keeping them: less memory, one "
                       "more forward per step (about +50% compute with LoRA); the gradients are the same.",
                       role=RUNTIME),
    )
    num_threads: Optional[int] = field(
        default=None,
        metadata=_help("CPU threads of this process (default: what torch picks, 1 per process under a multi-process "
                       "launch). On a machine shared with other jobs, 1 or 2 avoid a many-fold slowdown.",
                       role=RUNTIME),
    )
    malloc_mmap_threshold: int = field(
        default=0,
        metadata=_help("Linux CPU runs: glibc maps blocks of at least this many bytes (e.g. 65536) and gives them "
                       "back to the OS when torch frees them: peak RSS follows the live tensors, but steps are slower "
                       "(page faults; docs/performance.md measures both). 0, the default: --malloc-keep-freed "
                       "decides.", role=RUNTIME),
    )
    malloc_keep_freed: bool = field(
        default=True,
        metadata=_help("Linux CPU runs: memory torch frees stays with the process and serves the next step's tensors "
                       "(glibc's heap, which then serves blocks up to 32 MiB, is never trimmed), as torch's CUDA "
                       "allocator keeps GPU memory: far fewer page faults on each step's fresh activations "
                       "(docs/performance.md); RSS stays near its high-water mark. --no-malloc-keep-freed: glibc's "
                       "own setting. --malloc-mmap-threshold, and MALLOC_* environment variables, win over it.",
                       role=RUNTIME),
    )
    # --- outputs ---------------------------------------------------------------------------------------------------
    save_steps: int = field(default=100, metadata=_help(
        "Checkpoint every N optimiser steps (0: only at the end; -1: never, not even on errors: the run cannot be "
        "resumed).", role=CADENCE))
    save_total_limit: int = field(default=2, metadata=_help("Keep the newest N checkpoints.", role=CADENCE))
    report_to: Literal["none", "tensorboard", "wandb"] = field(
        default="none",
        metadata=_help("Also log to TensorBoard (needs tensorboard) or Weights & Biases (needs wandb; WANDB_MODE="
                       "offline works without an account).", role=OUTPUT),
    )
    regret: bool = field(
        default=True, metadata=_help("At the end, score the final module on the whole stream for the regret curve.")
    )
    logging_steps: int = field(default=1, metadata=_help(
        "Write a metrics row every N optimiser steps (TRL's name), each the mean of its N steps' metrics (counters "
        "such as step, pairs_seen and num_tokens: the last step's); the last step is always written. Larger N "
        "gives smaller logs and smoother curves, and hides single-step spikes.", role=OUTPUT))
    progress: bool = field(default=True, metadata=_help(
        "Show a progress bar.", role=OUTPUT,
        negative_help="Hide every progress bar: the run's, the data's tokenizing and transformers' weight loading."))

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check_field_types(self)
        self._resolve_batches(need)
        need(0 < self.beta < math.inf, f"--beta must be > 0 (got {self.beta}).")
        need(self.chase_beta is None or 0 < self.chase_beta < math.inf,
             f"--chase-beta must be > 0 (got {self.chase_beta}).")
        need(0 < self.lr < math.inf, f"--lr must be > 0 (got {self.lr}).")
        self._check_loss_type(need)
        need(0 < self.slow_lr_ratio <= 1, f"--slow-lr-ratio must be in (0, 1] (got {self.slow_lr_ratio}).")
        need(0 <= self.alpha < math.inf, f"--alpha must be >= 0 (got {self.alpha}).")
        need(self.max_nonfinite_steps >= 1, f"--max-nonfinite-steps must be >= 1 (got {self.max_nonfinite_steps}).")
        need(self.chase_interval >= 1, f"--chase-interval must be >= 1 (got {self.chase_interval}).")
        need(self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size}).")
        need(self.grad_accum >= 1, f"--grad-accum must be >= 1 (got {self.grad_accum}).")
        need(self.epochs >= 1, f"--epochs must be >= 1 (got {self.epochs}).")
        need(self.lora_r >= 1, f"--lora-r must be >= 1 (got {self.lora_r}).")
        need(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1) (got {self.lora_dropout}).")
        need(self.max_length >= 2, f"--max-length must be >= 2 (got {self.max_length}).")
        need(self.max_completion_length is None or self.max_completion_length >= 1,
             f"--max-completion-length must be >= 1 (got {self.max_completion_length}).")
        need(self.logging_steps >= 1, f"--logging-steps must be >= 1 (got {self.logging_steps}).")
        if self.max_prompt_length is None:  # fits any --max-length: room for the completion
            self.max_prompt_length = min(256, self.max_length // 2)
        need(
            1 <= self.max_prompt_length < self.max_length,
            f"--max-prompt-length must be in [1, --max-length) (got {self.max_prompt_length}, "
            f"--max-length {self.max_length}): completions need room.",
        )
        need(self.eval_steps >= 0, f"--eval-steps must be >= 0 (got {self.eval_steps}).")
        need(self.save_steps >= -1, f"--save-steps must be >= -1 (got {self.save_steps}).")
        need(self.save_total_limit >= 1, f"--save-total-limit must be >= 1 (got {self.save_total_limit}).")
        need(self.logprob_chunk_size >= 1, f"--logprob-chunk-size must be >= 1 (got {self.logprob_chunk_size}).")
        need(self.warmup_steps >= 0, f"--warmup-steps must be >= 0 (got {self.warmup_steps}).")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (got {self.max_grad_norm}).")
        need(self.num_threads is None or self.num_threads >= 1, f"--num-threads must be >= 1 (got {self.num_threads}).")
        need(self.malloc_mmap_threshold >= 0,
             f"--malloc-mmap-threshold must be >= 0 (got {self.malloc_mmap_threshold}).")
        self._check_sampling(need)
        if self.report_to == "wandb":
            need(importlib.util.find_spec("wandb") is not None,
                 "--report-to wandb needs the wandb package: pip install wandb (WANDB_MODE=offline needs no account).")
        self._resolve_round(need)

    def _check_loss_type(self, need) -> None:
        smoothing = self.label_smoothing
        if self.loss_type in ("ipo", "hinge"):
            need(smoothing == 0, f"--label-smoothing applies to --loss-type robust or sigmoid, not {self.loss_type} "
                                 f"(got {smoothing}).")
        need(0 <= smoothing < 0.5, f"--label-smoothing must be in [0, 0.5) (got {smoothing}).")
        # a method with a chase refuses ipo under the minmax form itself (`methods.OFSDPO.check`)

    def _resolve_batches(self, need) -> None:
        """By default ofs-dpo's parts are sized by the memory rule (`--module-batch-size 0`, issue 31: split where
        that saves memory that matters, else the whole micro-batch fused); a batch size or accumulation the user set
        is run exactly as asked. The resolved values are saved in config.yaml."""
        explicit = self.batch_size is not None or self.grad_accum is not None
        self.batch_size = 4 if self.batch_size is None else self.batch_size
        self.grad_accum = 1 if self.grad_accum is None else self.grad_accum
        if self.module_batch_size is None:
            self.module_batch_size = self.batch_size if explicit else 0
        need(0 <= self.module_batch_size <= self.batch_size,
             f"--module-batch-size must be in [0, --batch-size] (0: the memory rule; got {self.module_batch_size}, "
             f"--batch-size {self.batch_size}).")
        need(self.memory_budget_mib is None or self.memory_budget_mib > 0,
             f"--memory-budget-mib must be > 0 (got {self.memory_budget_mib}).")

    def _resolve_round(self, need) -> None:
        """A round (what is scored before any update on it) is a whole number of optimiser steps; one by default."""
        step_pairs = self.pairs_per_step
        if self.round_size is None:
            self.round_size = step_pairs
        need(
            self.round_size >= 1 and self.round_size % step_pairs == 0,
            f"--round-size ({self.round_size}) must be a positive multiple of --batch-size x processes x --grad-accum "
            f"({step_pairs}), so that every round is a whole number of optimiser steps.",
        )

    def _check_sampling(self, need) -> None:
        """The on-policy round controls (they apply only when a run samples, but a bad value is an error anyway)."""
        need(self.samples_per_prompt >= 2, f"--samples-per-prompt must be >= 2 (got {self.samples_per_prompt}).")
        need(self.max_new_tokens >= 0, f"--max-new-tokens must be >= 0 (got {self.max_new_tokens}).")
        need(0 < self.temperature < math.inf, f"--temperature must be > 0 (got {self.temperature}).")
        need(0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p}).")
        need(self.missing_eos_penalty is None or math.isfinite(self.missing_eos_penalty),
             f"--missing-eos-penalty must be a finite number (got {self.missing_eos_penalty}).")
        need(self.generation_batch_size >= 1,
             f"--generation-batch-size must be >= 1 (got {self.generation_batch_size}).")

    # --- helpers ---------------------------------------------------------------------------------------------------
    @property
    def num_processes(self) -> int:
        """Processes of this run: `accelerate launch` / torchrun set WORLD_SIZE (ofsdpo.distributed)."""
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def pairs_per_step(self) -> int:
        """The global batch of one optimiser step: --batch-size is per process."""
        return self.batch_size * self.num_processes * self.grad_accum

    @property
    def target_module_list(self) -> str | list[str]:
        names = [n.strip() for n in self.target_modules.split(",") if n.strip()]
        return "all-linear" if names == ["all-linear"] else names

    @property
    def chase_temperature(self) -> float:
        return self.beta if self.chase_beta is None else self.chase_beta

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        write_yaml(self.to_dict(), path)

    field_names = classmethod(field_names)  # the flags, and the keys its YAML may hold

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any):
        return cls(**{**read_config_file(path, cls), **overrides})


@dataclass
class OFSDPOConfig(TrainingOptions):
    """`ofsdpo train`: the training options plus the run's own data, method, step limit and output folder."""

    data: Optional[str] = field(
        default=None,
        metadata=_help("Preference pairs: a .jsonl/.json/.parquet file, a saved HF dataset folder, or a hub name."),
    )
    eval_data: Optional[str] = field(
        default=None,
        metadata=_help("Held-out pairs used to pick the served module of ofs-dpo (else the latest online loss)."),
    )
    on_policy: Optional[str] = field(
        default=None,
        metadata=_help("On-policy (true online DPO): each round, the current policy answers the next prompts and the "
                       "judge labels best vs worst. A built-in domain name, or bare with --prompts FILE. Replaces "
                       "--data; --round-size counts prompts.", nargs="?", const=ON_PROMPTS),
    )
    prompts: Optional[str] = field(default=None, metadata=_help(
        "On-policy prompts: .jsonl/.json/.parquet, a saved dataset folder, a hub name or builtin:NAME[:SPLIT]; "
        "TRL's prompt-only formats (standard or conversational); other columns reach the judge as the row's meta."))
    judge: list[str] = field(default_factory=list, metadata=_help(
        "On-policy judge: a built-in name, module:function (pointwise or batched), hf:MODEL (reward model) or "
        "pairwise:module:function; several, each with a trailing :WEIGHT, are summed (--judge a:0.7 b:0.3)."))
    max_steps: int = field(default=-1, metadata=_help("Stop after this many optimiser steps (-1: whole stream)."))
    method: Literal["dpo", "ofs-dpo"] = field(
        default="ofs-dpo", metadata=_help("dpo: one LoRA module. ofs-dpo: fast and slow modules chasing (SPEC 3).")
    )
    output_dir: str = field(default="ofsdpo-output", metadata=_help("Where adapters, metrics and checkpoints go.",
                                                                    role=OUTPUT))
    resume: bool = field(default=False, metadata=_help("Resume from the newest checkpoint in --output-dir.",
                                                       role=OUTPUT))
    resume_from: Optional[str] = field(
        default=None,
        metadata=_help("Resume from this checkpoint folder (checkpoints/checkpoint-N of --output-dir) instead of the "
                       "newest; the checkpoints after it are removed, like the metrics rows.", role=OUTPUT),
    )
    overwrite: bool = field(default=False, metadata=_help("Allow writing into an --output-dir holding another run.",
                                                          role=OUTPUT))
    run_name: Optional[str] = field(default=None, metadata=_help(
        "The run's name in TensorBoard (its folder under runs/) and Weights & Biases (TRL's name; default: the "
        "--output-dir folder's name).", role=OUTPUT))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume_from is not None:
            self.resume = True  # --resume-from PATH implies --resume
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be -1 or >= 1 (got {self.max_steps}).")
        if self.prompts is not None and self.on_policy is None:
            self.on_policy = ON_PROMPTS  # --prompts implies --on-policy
        if self.on_policy is not None:  # a domain's name is checked where it loads (`domains.on_policy_domain`)
            if self.on_policy == ON_PROMPTS:
                if self.prompts is None:
                    raise ConfigError("--on-policy without a domain name needs --prompts FILE (or name a built-in "
                                      "domain: --on-policy sentiment, critic, ...).")
            elif self.prompts is not None:
                raise ConfigError(f"--on-policy {self.on_policy} uses that domain's prompts: drop --prompts, or give "
                                  f"--on-policy bare with --prompts {self.prompts}.")
            if self.data is not None:
                raise ConfigError("--on-policy generates the pairs: drop --data.")
            if self.num_processes != 1:
                raise ConfigError("--on-policy runs in one process: each process would sample pairs of its own. "
                                  "Launch it without data parallelism.")
        elif self.judge:
            raise ConfigError("--judge labels on-policy samples: add --prompts FILE (or --on-policy DOMAIN).")

    def training_options(self) -> dict[str, Any]:
        """The fields shared with `TrainingOptions` (what a continual stage would receive)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingOptions)}

