"""Typed configuration for a training run, loadable from YAML and overridable from the CLI.

One field per flag: `ofsdpo train --max-steps 10` sets `max_steps`, and a YAML file given with `--config` uses the
same names (dashes or underscores). Validation happens in `__post_init__`, before any model is loaded, and every
message names the flag to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


ON_PROMPTS = "prompts"  # --on-policy given bare: the prompts of --prompts


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag."""


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient (usually a learning rate too high, or a
    model that overflows in its dtype); the run stopped with a checkpoint kept."""


def _help(text: str, **extra: Any) -> dict:
    return {"help": text, **extra}


def _describe_mismatch(value: Any, hint: Any) -> str | None:
    """What `value` should have been to fit the annotation `hint`, or None when it fits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _describe_mismatch(value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        return None if value in args else "one of " + ", ".join(map(str, args))
    if origin is list:
        ok = isinstance(value, list) and all(_describe_mismatch(v, args[0]) is None for v in value)
        return None if ok else f"a list of {args[0].__name__}"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None if isinstance(value, hint) else f"a {hint.__name__}"


def check_field_types(config: Any) -> None:
    """Every field against its annotation. A YAML file bypasses argparse's types and choices (`method: foo`
    would otherwise train something else), and the Python API has none; this check catches both, naming the flag.
    An integer given for a float field (`beta: 1`) becomes a float."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = _describe_mismatch(value, hints[f.name])
        if expected is not None:
            raise ConfigError(f"--{f.name.replace('_', '-')} must be {expected} (got {value!r}).")
        if hints[f.name] is float:
            setattr(config, f.name, float(value))


@dataclass
class TrainingOptions:
    """The options of one training run that `ofsdpo continual` passes to every stage: model, stream, method
    hyper-parameters, LoRA, optimiser, performance and output cadence. `OFSDPOConfig` adds what only `ofsdpo train`
    has (its data, method, step limit and output folder); `ContinualConfig` contains these instead."""

    # --- model -----------------------------------------------------------------------------------------------------
    model: Optional[str] = field(
        default=None,
        metadata=_help("Hub name or local path of the causal LM. Default: the embedded SmolLM2-135M-Instruct GGUF."),
    )
    gguf_file: Optional[str] = field(
        default=None, metadata=_help("GGUF file inside --model (a folder or hub repo), loaded through transformers.")
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Run model code shipped with the checkpoint. Off unless you trust it.")
    )
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | cuda:N | mps."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=_help("Weights dtype of the frozen base. auto: bfloat16 on a GPU that supports it, else float32."),
    )
    # --- data ------------------------------------------------------------------------------------------------------
    data_split: str = field(default="train", metadata=_help("Split to read when --data is a dataset."))
    eval_steps: int = field(
        default=0, metadata=_help("Score --eval-data every N steps and keep the best fast module in best_fast/ (0: off).")
    )
    max_length: int = field(default=512, metadata=_help("Max tokens of prompt + completion (completion cut first)."))
    max_prompt_length: Optional[int] = field(default=None, metadata=_help(
        "Max prompt tokens; longer prompts keep their end (default: 256, or half of --max-length if that is less)."))
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
        "Device of an hf:MODEL judge (default: the policy's)."))
    batch_size: Optional[int] = field(default=None, metadata=_help(
        "Pairs per micro-batch, per process (memory grows with it). Unset: 4, and ofs-dpo then runs its two modules "
        "on parts of 2 pairs (--module-batch-size), so its stacked batch is dpo's size."))
    grad_accum: Optional[int] = field(default=None, metadata=_help("Micro-batches per optimiser step. Unset: 1."))
    # --- method ----------------------------------------------------------------------------------------------------
    beta: float = field(default=0.1, metadata=_help("DPO temperature; larger keeps the policy closer to the base."))
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
                       "of this many, accumulated (the same pairs and gradient per step). Unset: half of "
                       "--batch-size when neither --batch-size nor --grad-accum is given (fused, the stacked batch "
                       "is then dpo's size, for dpo's activation memory), else --batch-size. dpo ignores it."),
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
                       "more forward per step (about +50% compute with LoRA); the gradients are the same."),
    )
    num_threads: Optional[int] = field(
        default=None,
        metadata=_help("CPU threads of this process (default: what torch picks, 1 per process under a multi-process "
                       "launch). On a machine shared with other jobs, 1 or 2 avoid a many-fold slowdown."),
    )
    malloc_mmap_threshold: int = field(
        default=0,
        metadata=_help("Linux CPU runs: glibc maps blocks of at least this many bytes (e.g. 65536) and gives them "
                       "back to the OS when torch frees them: peak RSS follows the live tensors, but steps are slower "
                       "(page faults; docs/performance.md measures both). 0, the default: --malloc-keep-freed "
                       "decides."),
    )
    malloc_keep_freed: bool = field(
        default=True,
        metadata=_help("Linux CPU runs: memory torch frees stays with the process and serves the next step's tensors "
                       "(glibc's heap, which then serves blocks up to 32 MiB, is never trimmed), as torch's CUDA "
                       "allocator keeps GPU memory: far fewer page faults on each step's fresh activations "
                       "(docs/performance.md); RSS stays near its high-water mark. --no-malloc-keep-freed: glibc's "
                       "own setting. --malloc-mmap-threshold, and MALLOC_* environment variables, win over it."),
    )
    # --- outputs ---------------------------------------------------------------------------------------------------
    save_steps: int = field(default=100, metadata=_help(
        "Checkpoint every N optimiser steps (0: only at the end; -1: never, not even on errors: the run cannot be "
        "resumed)."))
    save_total_limit: int = field(default=2, metadata=_help("Keep the newest N checkpoints."))
    report_to: Literal["none", "tensorboard", "wandb"] = field(
        default="none",
        metadata=_help("Also log to TensorBoard (needs tensorboard) or Weights & Biases (needs wandb; WANDB_MODE="
                       "offline works without an account)."),
    )
    regret: bool = field(
        default=True, metadata=_help("At the end, score the final module on the whole stream for the regret curve.")
    )
    progress: bool = field(default=True, metadata=_help("Show a progress bar."))

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
            import importlib.util

            need(importlib.util.find_spec("wandb") is not None,
                 "--report-to wandb needs the wandb package: pip install wandb (WANDB_MODE=offline needs no account).")
        self._resolve_round(need)

    def _resolve_batches(self, need) -> None:
        """Issue 16: by default ofs-dpo's fused forward runs on half micro-batches (the same pairs and gradient per
        step), so the stacked batch of both modules is dpo's size; a batch size or accumulation the user set is run
        exactly as asked. The resolved values are saved in config.yaml."""
        explicit = self.batch_size is not None or self.grad_accum is not None
        self.batch_size = 4 if self.batch_size is None else self.batch_size
        self.grad_accum = 1 if self.grad_accum is None else self.grad_accum
        if self.module_batch_size is None:
            self.module_batch_size = self.batch_size if explicit else -(-self.batch_size // 2)
        need(1 <= self.module_batch_size <= self.batch_size,
             f"--module-batch-size must be in [1, --batch-size] (got {self.module_batch_size}, --batch-size "
             f"{self.batch_size}).")

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
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

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
    output_dir: str = field(default="ofsdpo-output", metadata=_help("Where adapters, metrics and checkpoints go."))
    resume: bool = field(default=False, metadata=_help("Resume from the newest checkpoint in --output-dir."))
    resume_from: Optional[str] = field(
        default=None,
        metadata=_help("Resume from this checkpoint folder (checkpoints/checkpoint-N of --output-dir) instead of the "
                       "newest; the checkpoints after it are removed, like the metrics rows."),
    )
    overwrite: bool = field(default=False, metadata=_help("Allow writing into an --output-dir holding another run."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume_from is not None:
            self.resume = True  # --resume-from PATH implies --resume
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be -1 or >= 1 (got {self.max_steps}).")
        if self.prompts is not None and self.on_policy is None:
            self.on_policy = ON_PROMPTS  # --prompts implies --on-policy
        if self.on_policy is not None:
            from .domains import DOMAINS

            if self.on_policy == ON_PROMPTS:
                if self.prompts is None:
                    raise ConfigError("--on-policy without a domain name needs --prompts FILE (or name a built-in "
                                      f"domain: --on-policy {' | '.join(DOMAINS)}).")
            elif self.on_policy not in DOMAINS:
                raise ConfigError(f"--on-policy must name a built-in domain ({', '.join(DOMAINS)}), or be given bare "
                                  f"with --prompts FILE; got {self.on_policy!r}.")
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


# Options that change nothing a resumed run computes: `ofsdpo train --resume` may change them, not the others.
RESUME_MAY_CHANGE = {"resume", "overwrite", "progress", "save_steps", "save_total_limit", "report_to", "output_dir",
                     "device", "num_threads", "malloc_mmap_threshold", "malloc_keep_freed", "resume_from",
                     "gradient_checkpointing", "judge_device"}


def changed_options(saved: dict[str, Any], now: dict[str, Any], may_change: set[str]) -> list[str]:
    """The flags (as `--name`) whose saved and current values differ, but for those in `may_change`."""
    keys = sorted(k for k in set(saved) | set(now) if k not in may_change and saved.get(k) != now.get(k))
    return [f"--{k.replace('_', '-')} ({saved.get(k)!r} -> {now.get(k)!r})" for k in keys]


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# `ofsdpo train` options that a continual run sets per domain: each refused with what to use instead
TRAIN_ONLY = {
    "max_steps": "--max-steps-per-domain (optimiser steps per domain)",
    "data": "--domain NAME=TRAIN (once per domain)",
    "eval_data": "--domain NAME=TRAIN,heldout=PATH",
    "on_policy": "--domain NAME=prompts:PATH,judge=SPEC (an on-policy domain)",
    "prompts": "--domain NAME=prompts:PATH,judge=SPEC (an on-policy domain)",
    "judge": "--domain NAME=prompts:PATH,judge=SPEC (an on-policy domain)",
}


def refuse_train_only(keys, where: str = "") -> None:
    """`ofsdpo continual` sets these per stage; accepting them would silently overwrite them (issue of the past)."""
    for key in keys:
        name = key.lstrip("-").split("=")[0].replace("-", "_")
        if name in TRAIN_ONLY:
            raise ConfigError(f"{where}--{name.replace('_', '-')} is an `ofsdpo train` option; a continual run sets it "
                              f"per domain: use {TRAIN_ONLY[name]}.")


@dataclass
class DomainSpec:
    """One `--domain` of a continual run: its training pairs (`train`), or on-policy its prompts and judges."""

    name: str
    train: str
    heldout: str | None = None
    memory: str | None = None
    judge: list[str] = field(default_factory=list)

    FORM = "NAME=TRAIN[,heldout=PATH][,memory=PATH] or NAME=prompts:PATH,judge=SPEC[,judge=SPEC][,heldout=PATH]"

    @property
    def prompts(self) -> str | None:
        """The prompts source of an on-policy domain (`prompts:PATH`), else None."""
        return self.train[len("prompts:"):] if self.train.startswith("prompts:") else None

    @classmethod
    def parse(cls, text: str) -> "DomainSpec":
        name, sep, rest = text.partition("=")
        parts = rest.split(",") if sep else []
        if not name or not parts or not parts[0]:
            raise ConfigError(f"--domain {text!r}: expected {cls.FORM}.")
        spec = cls(name=name.strip(), train=parts[0].strip())
        if not SAFE_NAME.fullmatch(spec.name):  # the name becomes domains/<k>-<name>/: it must stay inside
            raise ConfigError(f"--domain {text!r}: the name {spec.name!r} must be letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit (it names a folder under --output-dir).")
        for part in parts[1:]:
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in ("heldout", "memory", "judge") or not value:
                raise ConfigError(f"--domain {text!r}: unknown part {part!r} (use heldout=PATH, memory=PATH or, with "
                                  "prompts:PATH, judge=SPEC).")
            if key == "judge":
                spec.judge.append(value.strip())
            else:
                setattr(spec, key, value.strip())
        if spec.prompts is not None and not spec.prompts:
            raise ConfigError(f"--domain {text!r}: prompts: needs a path (prompts:PATH).")
        if spec.judge and spec.prompts is None:
            raise ConfigError(f"--domain {text!r}: judge= labels on-policy samples: give prompts:PATH as the source.")
        if spec.prompts is not None and not spec.judge and not spec.prompts.startswith("builtin:"):
            raise ConfigError(f"--domain {text!r}: an on-policy domain needs judge=SPEC (a built-in name, "
                              "module:function, hf:MODEL or pairwise:module:function).")
        return spec


def resolve_search(search: str, init: str) -> str:
    """--search auto resolved: on the 3-domain chain the simplex search beat the pairwise recursion under --init fresh
    (memory and report loss, accuracy, forgetting; docs/results.md); under --init previous only the recursion ran."""
    if search == "auto":
        return "simplex" if init == "fresh" else "pairwise"
    return search


@dataclass
class ContinualOptions:
    """What `ofsdpo continual` adds to the training options: the domains, the method and how it combines."""

    method: Literal["cofs-dpo", "ofs-dpo", "dpo", "dpo-replay", "lora-merge"] = field(
        default="cofs-dpo", metadata=_help("cofs-dpo, or a sequential baseline: dpo, ofs-dpo, dpo-replay, lora-merge.")
    )
    domain: list[str] = field(
        default_factory=list,
        metadata=_help("NAME=TRAIN[,heldout=PATH][,memory=PATH], once per domain, in stream order; on-policy: "
                       "NAME=prompts:PATH,judge=SPEC[,heldout=PATH] (the stage samples and judges its own pairs)."),
    )
    max_steps_per_domain: int = field(default=-1, metadata=_help("Optimiser steps per domain (-1: its whole stream)."))
    memory_size: int = field(default=8, metadata=_help("Held-out pairs per domain kept in memory to choose λ."))
    heldout_size: int = field(
        default=32, metadata=_help("Pairs held out from the end of a domain's stream when it has no heldout file.")
    )
    combine: Literal["params", "delta"] = field(
        default="params", metadata=_help("params: combine LoRA A and B (literal); delta: combine ΔW = BA exactly.")
    )
    init: Literal["previous", "fresh"] = field(
        default="previous", metadata=_help("Start each domain from the previous served module, or from scratch.")
    )
    judge_prompts: int = field(
        default=0, metadata=_help("Held-out prompts judged per built-in domain after every stage (0: no judging).")
    )
    judge_max_new_tokens: int = field(
        default=0, metadata=_help("Cap on the judged samples' length (0: each domain's own); lower is faster.")
    )
    judge_samples: int = field(
        default=1, metadata=_help("Judged samples per held-out prompt (more samples, less judge noise).")
    )
    score_domains: Literal["all", "seen"] = field(
        default="all",
        metadata=_help("Domains each stage's served module is scored and judged on: all (the whole stage x domain "
                       "matrix, forward transfer too) or seen (those trained so far: all that forgetting needs, "
                       "fewer passes; the other cells stay empty, and each domain is judged in a call of its own)."),
    )
    selection: Literal["memory", "heldout"] = field(
        default="memory",
        metadata=_help("Pairs that choose each stage's best fast module and served module: the memory (never in the "
                       "report: unbiased) or the held-out pairs the report scores (the choice then flatters it)."),
    )
    lambda_grid: str = field(
        default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", metadata=_help("Comma-separated λ values in [0, 1].")
    )
    search: Literal["auto", "pairwise", "simplex"] = field(
        default="auto",
        metadata=_help("cofs-dpo weights: pairwise recursion θ ← λθ_prev + (1−λ)θ_new on --lambda-grid, or a search "
                       "over the whole simplex of the kept modules' weights (it also scores the pairwise candidates, "
                       "so it never does worse on the memory; costs up to --search-budget memory passes per stage). "
                       "auto: simplex with --init fresh, pairwise with --init previous (docs/results.md)."),
    )
    search_budget: int = field(default=60, metadata=_help("Most combinations scored per stage by --search simplex."))
    output_dir: str = field(default="ofsdpo-output", metadata=_help("Where the report, stages and served adapter go."))
    resume: bool = field(default=False, metadata=_help("Resume the run in --output-dir (finished stages are kept)."))
    overwrite: bool = field(default=False, metadata=_help("Allow writing into an --output-dir holding another run."))

    def __post_init__(self) -> None:
        check_field_types(self)
        if not self.domain:
            raise ConfigError("--domain is required (NAME=TRAIN, once per domain).")
        names = [s.name for s in self.domains]
        if len(set(names)) != len(names):
            raise ConfigError(f"--domain names must be unique (got {', '.join(names)}).")
        if self.memory_size < 1:
            raise ConfigError(f"--memory-size must be >= 1 (got {self.memory_size}).")
        if self.max_steps_per_domain != -1 and self.max_steps_per_domain < 1:
            raise ConfigError(f"--max-steps-per-domain must be -1 or >= 1 (got {self.max_steps_per_domain}).")
        if self.judge_samples < 1:
            raise ConfigError(f"--judge-samples must be >= 1 (got {self.judge_samples}).")
        if self.search_budget < 1:
            raise ConfigError(f"--search-budget must be >= 1 (got {self.search_budget}).")
        if not all(0.0 <= x <= 1.0 for x in self.lambdas):
            raise ConfigError(f"--lambda-grid values must lie in [0, 1] (got {self.lambda_grid}).")

    @property
    def search_method(self) -> str:
        return resolve_search(self.search, self.init)

    @property
    def domains(self) -> list[DomainSpec]:
        return [DomainSpec.parse(text) for text in self.domain]

    @property
    def lambdas(self) -> list[float]:
        try:
            return [float(x) for x in self.lambda_grid.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--lambda-grid: expected comma-separated numbers (got {self.lambda_grid!r}).") from None


@dataclass
class ContinualConfig(ContinualOptions):
    """`ofsdpo continual`: its own options plus the training options every stage runs with (contained, so that a
    train-only flag such as --max-steps cannot slip in and be overwritten per stage)."""

    training: TrainingOptions = field(default_factory=TrainingOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.training, TrainingOptions):
            raise ConfigError(f"ContinualConfig.training must be a TrainingOptions (got {type(self.training).__name__}).")
        super().__post_init__()

    @classmethod
    def own_field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(ContinualOptions)}

    @classmethod
    def flat_field_names(cls) -> set[str]:
        """Every key of the flat form (CLI flags, YAML, `from_flat`): the continual options and the training options."""
        return cls.own_field_names() | TrainingOptions.field_names()

    field_names = flat_field_names  # what read_config_file checks a YAML file against

    @classmethod
    def argument_classes(cls) -> tuple[type, ...]:
        """The dataclasses the command line parses into (one flat set of flags)."""
        return ContinualOptions, TrainingOptions

    @classmethod
    def from_parsed(cls, options: ContinualOptions, training: TrainingOptions) -> "ContinualConfig":
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(ContinualOptions)},
                   training=training)

    @classmethod
    def from_flat(cls, **values: Any) -> "ContinualConfig":
        """From one flat mapping of option names (as on the command line); train-only keys are refused."""
        refuse_train_only(values)
        unknown = set(values) - cls.flat_field_names()
        if unknown:
            raise ConfigError(f"unknown continual option(s): {', '.join(sorted(unknown))}.")
        own = {k: v for k, v in values.items() if k in cls.own_field_names()}
        training = TrainingOptions(**{k: v for k, v in values.items() if k not in own})
        return cls(**own, training=training)

    def to_dict(self) -> dict[str, Any]:
        """The flat form: saved as config.yaml and compared on --resume."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(ContinualOptions)}
        return {**own, **self.training.to_dict()}

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "ContinualConfig":
        return cls.from_flat(**{**read_config_file(path, cls), **overrides})

    @staticmethod
    def translate_yaml(values: dict) -> dict:
        """YAML may list `domains: [{name, train, heldout, memory}]` instead of `domain: [NAME=TRAIN, …]`."""
        refuse_train_only(values, "--config: ")
        if "domains" in values:
            items = values.pop("domains") or []
            values["domain"] = [item if isinstance(item, str) else
                                ",".join([f"{item['name']}={item['train']}"] +
                                         [f"{k}={item[k]}" for k in ("heldout", "memory") if item.get(k)])
                                for item in items]
        return values


def read_config_file(path: str | Path, config_class: type = OFSDPOConfig) -> dict[str, Any]:
    """Read a YAML config into a dict of field values; unknown keys are an error naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:  # one line: where, and what the parser expected
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"--config {path}: not valid YAML{where}: {what}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values.")
    if hasattr(config_class, "translate_yaml"):
        raw = config_class.translate_yaml(dict(raw))
    known = config_class.field_names()
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = [k for k in sorted(known) if k.split("_")[0] == name.split("_")[0]]
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key '{key}'.{hint}")
        values[name] = value
    if "judge" in values:  # a judge file named in the YAML is found beside the YAML, wherever the run starts
        values["judge"] = _judges_beside(values["judge"], path.parent)
    return values


def _judges_beside(specs, folder: Path):
    """Judge specs `path/to/file.py:function[:weight]` with a relative path that exists under `folder` (the YAML's),
    made absolute; every other spec as it is."""
    def resolve(spec):
        if not isinstance(spec, str):
            return spec
        file, sep, rest = spec.partition(".py:")
        if not sep or Path(file + ".py").is_absolute() or not (folder / (file + ".py")).is_file():
            return spec
        return f"{(folder / (file + '.py')).resolve()}:{rest}"
    return [resolve(s) for s in specs] if isinstance(specs, list) else resolve(specs)


@dataclass
class GenerateConfig:
    domain: str = field(default="sentiment", metadata=_help("Built-in domain: sentiment, critic, concise, safety."))
    out: str = field(default="pairs.jsonl", metadata=_help("Where to write the judged pairs (JSONL)."))
    overwrite: bool = field(default=False, metadata=_help("Replace --out if it exists (else the run is refused)."))
    model: Optional[str] = field(default=None, metadata=_help("Model to sample from (default: the embedded one)."))
    adapter: Optional[str] = field(default=None, metadata=_help(
        "A peft adapter folder (e.g. a run's --output-dir, or its fast/ or slow/ module) to sample from, on --model."))
    max_new_tokens: int = field(default=0, metadata=_help(
        "Most tokens per sample (0: the domain's own, 24-40); a sample cut here may end mid-sentence."))
    num_threads: Optional[int] = field(default=None, metadata=_help("CPU threads (default: what torch picks)."))
    gguf_file: Optional[str] = field(default=None, metadata=_help("GGUF file inside --model."))
    trust_remote_code: bool = field(default=False, metadata=_help("Run model code shipped with the checkpoint."))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | mps."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata=_help("Weights dtype."))
    split: Literal["train", "heldout", "all"] = field(default="train", metadata=_help("Which prompts to use."))
    num_prompts: int = field(default=64, metadata=_help("Prompts to sample for (in the fixed order; -1: all)."))
    samples_per_prompt: int = field(default=4, metadata=_help("Samples per prompt; best and worst form a pair."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature."))
    top_p: float = field(default=0.95, metadata=_help("Nucleus sampling threshold."))
    batch_size: int = field(default=16, metadata=_help("Prompts per generate call."))
    seed: int = field(default=0, metadata=_help("Sampling seed."))
    progress: bool = field(default=True, metadata=_help("Show a progress bar."))

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.samples_per_prompt < 2:
            raise ConfigError(f"--samples-per-prompt must be >= 2 to form a pair (got {self.samples_per_prompt}).")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 (got {self.temperature}).")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1] (got {self.top_p}).")
        if self.num_prompts == 0 or self.num_prompts < -1:
            raise ConfigError(f"--num-prompts must be -1 or >= 1 (got {self.num_prompts}).")
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0 (got {self.max_new_tokens}).")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"--num-threads must be >= 1 (got {self.num_threads}).")


@dataclass
class ExportConfig:
    """`ofsdpo export RUN --out DIR`: a run's served module merged into its base, saved as a standalone model."""

    run: Optional[str] = field(default=None, metadata=_help(
        "A run's --output-dir (train or continual): its served adapter and config.yaml; the first positional argument."))
    out: Optional[str] = field(default=None, metadata=_help(
        "Folder for the merged model (safetensors, config, tokenizer, chat template)."))
    model: Optional[str] = field(default=None, metadata=_help(
        "The base the adapter was trained on (default: the run's config.yaml, else the embedded model)."))
    gguf_file: Optional[str] = field(default=None, metadata=_help("With --model: its GGUF file."))
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata=_help(
        "Dtype of the saved weights (the merge itself runs in float32)."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow the base's own modelling code."))
    overwrite: bool = field(default=False, metadata=_help("Replace an existing --out folder."))

    def __post_init__(self) -> None:
        check_field_types(self)
        if not self.run:
            raise ConfigError("the run folder is required: ofsdpo export RUN --out DIR")
        if not self.out:
            raise ConfigError("--out DIR is required: the folder for the merged model.")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


@dataclass
class EvalConfig:
    """`ofsdpo eval`: score the base model and each adapter on built-in domains and on your own prompts and judge
    (held-out pairs and judged samples)."""

    model: Optional[str] = field(default=None, metadata=_help("Base model the adapters were trained on (default: "
                                                              "the embedded one)."))
    gguf_file: Optional[str] = field(default=None, metadata=_help("GGUF file inside --model."))
    trust_remote_code: bool = field(default=False, metadata=_help("Run model code shipped with the checkpoint."))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | mps."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata=_help("Weights dtype."))
    adapter: list[str] = field(default_factory=list, metadata=_help(
        "A peft adapter folder, once per adapter (the base model is always scored too, as the row 'base')."))
    domain: list[str] = field(default_factory=list, metadata=_help("Built-in domain to score on, once per domain."))
    prompts: Optional[str] = field(default=None, metadata=_help(
        "Your own domain: prompts to judge (.jsonl/.json/.parquet, a dataset folder, a hub name; NAME=SOURCE names "
        "the domain, else the file's stem), scored by --judge; its held-out pairs from --data NAME=PATH."))
    judge: list[str] = field(default_factory=list, metadata=_help(
        "Judge of --prompts: a built-in name, module:function, hf:MODEL or pairwise:module:function (:WEIGHT each)."))
    judge_device: Optional[str] = field(default=None, metadata=_help("Device of an hf:MODEL judge (default: the model's)."))
    data: list[str] = field(default_factory=list, metadata=_help(
        "Held-out pairs for the DPO loss: NAME=PATH (or PATH, in --domain order). A domain without a file gets "
        "pairs sampled from the base model on its held-out prompts and judged."))
    pair_prompts: int = field(default=16, metadata=_help("Held-out prompts sampled for pairs when --data lacks one."))
    samples_per_prompt: int = field(default=4, metadata=_help("Samples per prompt for generated pairs."))
    judge_prompts: int = field(default=16, metadata=_help("Held-out prompts judged per domain (0: no judging)."))
    judge_samples: int = field(default=1, metadata=_help(
        "Judged samples per prompt (every row draws the same random numbers: a module equal to the base ties it)."))
    beta: float = field(default=0.1, metadata=_help("DPO temperature of the held-out loss (use the training one)."))
    max_length: int = field(default=512, metadata=_help("Max tokens of prompt + completion."))
    max_prompt_length: int = field(default=256, metadata=_help("Max prompt tokens."))
    batch_size: int = field(default=8, metadata=_help("Pairs per forward, prompts per generate call."))
    seed: int = field(default=0, metadata=_help("Seed of pair sampling; every row's judged samples start from it."))
    json: Optional[str] = field(default=None, metadata=_help("Also write the results here (JSON)."))
    progress: bool = field(default=True, metadata=_help("Show progress bars."))

    def __post_init__(self) -> None:
        from .domains import DOMAINS

        if not self.domain and self.prompts is None:
            raise ConfigError("--domain (a built-in domain, once per domain) or --prompts FILE --judge SPEC is required.")
        if self.prompts is not None and not self.judge and not self.prompts_source.startswith("builtin:"):
            raise ConfigError(f"--prompts {self.prompts}: give --judge SPEC to score the samples.")
        if self.judge and self.prompts is None:
            raise ConfigError("--judge scores --prompts: give --prompts FILE (built-in domains keep their own judges).")
        for name in self.domain:
            if name not in DOMAINS:
                raise ConfigError(f"--domain: unknown domain '{name}': built-in domains are {', '.join(DOMAINS)}.")
        for path in self.adapter:
            if not (Path(path) / "adapter_config.json").is_file():
                raise ConfigError(f"--adapter {path}: not a peft adapter folder (no adapter_config.json).")
        for name, path in self.data_files.items():
            if not Path(path).exists():
                raise ConfigError(f"--data {name}={path}: no such file.")
        if self.judge_prompts < 0 or self.pair_prompts < 1 or self.batch_size < 1 or self.judge_samples < 1:
            raise ConfigError("--judge-prompts must be >= 0, --pair-prompts, --batch-size and --judge-samples >= 1.")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"--samples-per-prompt must be >= 2 to form a pair (got {self.samples_per_prompt}).")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0 (got {self.beta}).")

    @property
    def prompts_name(self) -> str | None:
        """The domain name of --prompts: NAME of NAME=SOURCE, else the source's stem."""
        if self.prompts is None:
            return None
        name, sep, _ = self.prompts.partition("=")
        source = self.prompts_source
        return name if sep else (source.split(":")[1] if source.startswith("builtin:") else Path(source).stem)

    @property
    def prompts_source(self) -> str | None:
        return None if self.prompts is None else self.prompts.partition("=")[2] or self.prompts

    @property
    def domain_names(self) -> list[str]:
        return self.domain + ([self.prompts_name] if self.prompts is not None else [])

    @property
    def data_files(self) -> dict[str, str]:
        """{domain: path} from `NAME=PATH` entries, or bare paths matched to the domains (--domain, then --prompts)
        in order."""
        files, names = {}, self.domain_names
        for i, entry in enumerate(self.data):
            name, sep, path = entry.partition("=")
            if not sep:
                if i >= len(names):
                    raise ConfigError(f"--data {entry}: more files than domains; write NAME=PATH.")
                name, path = names[i], entry
            if name not in names:
                raise ConfigError(f"--data {entry}: '{name}' is not one of the domains ({', '.join(names)}).")
            files[name] = path
        return files


# --- ofsdpo demo and ofsdpo experiment ---------------------------------------------------------------------------------
DEMO_DOMAINS = ("sentiment", "critic", "concise")


@dataclass(frozen=True)
class DemoSettings:
    """The scale of the demo (and the defaults of an experiment)."""

    prompts: int  # training prompts sampled per domain
    samples: int  # samples per prompt
    steps: int  # optimiser steps per domain
    batch_size: int
    judge_prompts: int  # held-out prompts judged per domain after every stage
    heldout: int
    memory: int
    lambda_grid: str
    eval_steps: int  # how often the best fast module is looked for
    max_new_tokens: int = 0  # cap on sampled responses, pairs and judging (0: each domain's own)
    # the in-domain frontier on the first domain: dpo, ofs-dpo and dpo at the slow learning rate (0 steps: none)
    frontier_steps: int = 0  # optimiser steps of each frontier run
    frontier_checkpoints: tuple[int, ...] = ()  # steps at which every module is judged, with the exact KL
    frontier_judge_prompts: int = 0  # held-out prompts judged per module and checkpoint (fewer: cheaper, noisier)


DEMO_FULL = DemoSettings(prompts=40, samples=4, steps=8, batch_size=4, judge_prompts=16, heldout=8, memory=4,
                         lambda_grid="0,0.25,0.5,0.75,1", eval_steps=4, frontier_steps=8, frontier_checkpoints=(4, 8),
                         frontier_judge_prompts=8)
DEMO_QUICK = DemoSettings(prompts=12, samples=2, steps=2, batch_size=2, judge_prompts=4, heldout=2, memory=2,
                          lambda_grid="0,0.5,1", eval_steps=2, max_new_tokens=16, frontier_steps=2,
                          frontier_checkpoints=(1, 2), frontier_judge_prompts=2)


@dataclass
class DemoConfig:
    """`ofsdpo demo`: sequential DPO, sequential OFS-DPO and COFS-DPO on the built-in domains."""

    quick: bool = field(default=False, metadata=_help("A smaller run (a few minutes on a laptop CPU)."))
    output_dir: str = field(default="demo-output", metadata=_help("Where data, runs and report.md go."))
    model: Optional[str] = field(default=None, metadata=_help("Another model instead of the embedded SmolLM2."))
    gguf_file: Optional[str] = field(default=None, metadata=_help("GGUF file inside --model."))
    device: str = field(default="auto", metadata=_help("auto picks a GPU when there is one."))
    seed: int = field(default=0, metadata=_help("Seed of sampling and training."))
    lr: float = field(default=5e-4, metadata=_help("Learning rate of the fast (and dpo) module."))

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be > 0 (got {self.lr}).")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


EXPERIMENT_KINDS = ("in-domain", "continual")
IN_DOMAIN_METHODS = ("dpo", "ofs-dpo")


@dataclass
class ExperimentConfig:
    """One experiment of `experiments/*.yaml` (the file's schema): variants run on built-in domains over seeds."""

    name: str = "experiment"
    kind: Literal["in-domain", "continual"] = "in-domain"
    description: str = ""
    domains: list[str] = field(default_factory=lambda: list(DEMO_DOMAINS))
    # each: {name: ..., method: ..., any other field of OFSDPOConfig (in-domain) or ContinualConfig (continual)}
    variants: list[dict] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    model: Optional[str] = None  # default: the embedded SmolLM2-135M-Instruct
    gguf_file: Optional[str] = None
    device: str = "auto"
    data_dir: str = "experiments-output/pairs"  # shared by experiments: pairs are sampled once per domain
    pair_seed: int = 0
    # the scale; defaults are the demo's (`DEMO_FULL`)
    prompts: int = DEMO_FULL.prompts  # training prompts sampled per domain
    samples: int = DEMO_FULL.samples  # samples per prompt (best vs worst form the pair)
    # distinct pairs per training prompt, from its ranked samples: best vs worst, second best vs second worst, …
    # (at most samples // 2). Above 1, the sets are split by prompt: the selection pairs come from the last
    # prompts, the stream from the others, shuffled (seed `pair_seed`)
    pairs_per_prompt: int = 1
    steps: int = DEMO_FULL.steps  # optimiser steps (per domain)
    batch_size: int = DEMO_FULL.batch_size
    lr: float = 5e-4
    judge_prompts: int = DEMO_FULL.judge_prompts  # held-out prompts judged per domain
    judge_samples: int = 1  # judged samples per held-out prompt, for every arm and the reference alike
    # three disjoint sets per domain (issue 12): the training stream; the selection pairs (the last `selection`
    # pairs of the training prompts: they choose the served and best fast module, and hold the continual memory);
    # the report pairs, sampled on the held-out prompts in `report_rounds` rounds and never used for a choice
    selection: int = 16
    report_rounds: int = 1
    memory: int = DEMO_FULL.memory  # continual: selection pairs per domain kept in memory to choose λ
    baseline: Optional[str] = None  # the variant paired differences are taken against (default: `dpo`, else first)
    # further paired differences beside each variant − baseline: [variant, against] pairs (e.g. two COFS searches)
    compare: list[list[str]] = field(default_factory=list)
    lambda_grid: str = DEMO_FULL.lambda_grid
    eval_steps: int = DEMO_FULL.eval_steps  # continual: how often the best fast module is looked for
    max_length: int = 160
    max_prompt_length: int = 96
    train: dict = field(default_factory=dict)  # fields set for every variant (a variant's own keys win)
    # in-domain: the steps at which every trained module is judged (judge score, exact KL, report loss), a
    # checkpoint ladder that traces each arm's reward–KL frontier; and the KL budgets (nats) at which the report
    # compares the arms' judge scores, each seed's frontier interpolated
    checkpoints: list[int] = field(default_factory=list)
    kl_budgets: list[float] = field(default_factory=list)
    # a user's pairs instead of a built-in domain's (`ofsdpo compare`): the one domain is this file, split by prompt
    # (`experiment.split_by_prompt`: at least `report_size` report pairs, `selection` selection pairs, the rest the
    # stream); judged samples only with held-out prompts and a judge (`heldout_prompts`, `judge`)
    data: Optional[str] = None
    data_files: dict = field(default_factory=dict)  # continual over the user's pairs: {domain: file}, in order
    report_size: int = 32
    heldout_prompts: Optional[str] = None
    judge: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from .domains import DOMAINS

        if self.kind not in EXPERIMENT_KINDS:
            raise ConfigError(f"experiment '{self.name}': kind must be one of {', '.join(EXPERIMENT_KINDS)} "
                              f"(got {self.kind!r}).")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if self.data is not None:  # the user's pairs: one domain, named after them
            if len(self.domains) != 1 or self.kind != "in-domain":
                raise ConfigError(f"experiment '{self.name}': a data file is one in-domain domain (got {self.domains}).")
            unknown = []
        if self.data_files:  # the user's pairs, one file per domain, in stream order
            if list(self.data_files) != list(self.domains) or self.kind != "continual":
                raise ConfigError(f"experiment '{self.name}': data_files are a continual experiment's domains in "
                                  f"order (got {list(self.data_files)} for domains {self.domains}).")
            unknown = []
        if unknown or not self.domains:
            raise ConfigError(f"experiment '{self.name}': domains must be built-in ({', '.join(DOMAINS)}); "
                              f"got {self.domains}.")
        names = [v.get("name") for v in self.variants]
        if not names or None in names or len(set(names)) != len(names):
            raise ConfigError(f"experiment '{self.name}': variants need unique names (got {names}).")
        if not self.seeds:
            raise ConfigError(f"experiment '{self.name}': seeds must not be empty.")
        if self.baseline is not None and self.baseline not in names:
            raise ConfigError(f"experiment '{self.name}': baseline '{self.baseline}' is not a variant ({names}).")
        if not isinstance(self.compare, list):
            raise ConfigError(f"experiment '{self.name}': compare is a list of [variant, against] pairs "
                              f"(got {self.compare!r}).")
        for pair in self.compare:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or pair[0] == pair[1] or set(pair) - set(names):
                raise ConfigError(f"experiment '{self.name}': each compare entry is [variant, against], two different "
                                  f"variants of {names} (got {pair!r}).")
        if self.selection < 1 or self.report_rounds < 1 or self.judge_samples < 1:
            raise ConfigError(f"experiment '{self.name}': selection, report_rounds and judge_samples must be >= 1.")
        if not 1 <= self.pairs_per_prompt <= max(1, self.samples // 2):
            raise ConfigError(f"experiment '{self.name}': pairs_per_prompt must be between 1 and samples // 2 "
                              f"({self.samples // 2}); got {self.pairs_per_prompt}.")
        if sorted(set(self.checkpoints)) != list(self.checkpoints) or any(not 1 <= c <= self.steps
                                                                           for c in self.checkpoints):
            raise ConfigError(f"experiment '{self.name}': checkpoints are increasing steps within 1..{self.steps} "
                              f"(got {self.checkpoints}).")
        if self.checkpoints and self.kind != "in-domain":
            raise ConfigError(f"experiment '{self.name}': checkpoints are for in-domain experiments.")
        if self.kl_budgets and not self.checkpoints:
            raise ConfigError(f"experiment '{self.name}': kl_budgets compare frontiers: give checkpoints too.")
        if self.kind == "continual" and self.memory > self.selection:
            raise ConfigError(f"experiment '{self.name}': memory ({self.memory}) is carved from the selection pairs "
                              f"({self.selection}): raise selection.")
        for variant in self.variants:  # a bad variant fails now, not after an hour of the others
            self.run_config(variant, self.seeds[0], "unused", [f"{d}=unused" for d in self.domains])

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ExperimentConfig":
        values = read_config_file(path, cls)
        try:
            return cls(**values)
        except ConfigError as err:  # a value the file holds: say which file
            raise ConfigError(f"{path}: {err}") from None

    def run_config(self, variant: dict, seed: int, output_dir: str | Path, specs: list[str], progress: bool = True):
        """The OFSDPOConfig (in-domain) or ContinualConfig (continual) of one variant and seed."""
        common = dict(lr=self.lr, batch_size=self.batch_size, max_length=self.max_length, seed=seed,
                      max_prompt_length=self.max_prompt_length, save_steps=0, device=self.device,
                      output_dir=str(output_dir), overwrite=True, model=self.model, gguf_file=self.gguf_file,
                      progress=progress)
        if self.kind == "in-domain":
            values, accepted = dict(common, max_steps=self.steps, regret=True), OFSDPOConfig.field_names()
        else:
            values = dict(common, domain=specs, max_steps_per_domain=self.steps, memory_size=self.memory,
                          judge_prompts=self.judge_prompts, judge_samples=self.judge_samples,
                          lambda_grid=self.lambda_grid, eval_steps=self.eval_steps, regret=False, selection="memory")
            accepted = ContinualConfig.flat_field_names()
        values.update(self.train)
        values.update({k: v for k, v in variant.items() if k != "name"})
        if self.kind == "in-domain" and values.get("method") not in IN_DOMAIN_METHODS:
            raise ConfigError(f"variant '{variant['name']}': in-domain methods are {', '.join(IN_DOMAIN_METHODS)}.")
        unknown = set(values) - set(accepted)
        if unknown:
            raise ConfigError(f"variant '{variant['name']}': unknown field(s) {', '.join(sorted(unknown))}.")
        return OFSDPOConfig(**values) if self.kind == "in-domain" else ContinualConfig.from_flat(**values)

    @property
    def baseline_variant(self) -> str:
        names = [v["name"] for v in self.variants]
        return self.baseline or ("dpo" if "dpo" in names else names[0])

    def cells(self) -> list[tuple[str, dict, str | None]]:
        """(cell name, variant, domain): a variant per domain in-domain, a variant over all domains otherwise."""
        if self.kind == "continual":
            return [(v["name"], v, None) for v in self.variants]
        return [(f"{v['name']}/{d}", v, d) for v in self.variants for d in self.domains]


@dataclass
class CompareOptions:
    """`ofsdpo compare`: which methods to compare on the user's pairs, over how many seeds, on which sets."""

    data: Optional[str] = field(default=None, metadata=_help(
        "Your preference pairs (.jsonl/.json/.parquet, TRL's format), split by prompt into a training stream, a "
        "selection set and a report set."))
    domain: list[str] = field(default_factory=list, metadata=_help(
        "The continual form: NAME=PATH, once per domain in stream order (each file split by prompt as --data is); "
        "methods cofs-dpo, dpo, ofs-dpo, dpo-replay, lora-merge."))
    methods: str = field(default="dpo,ofs-dpo", metadata=_help("Comma-separated methods, each an arm: dpo, ofs-dpo."))
    variant: list[str] = field(default_factory=list, metadata=_help(
        "NAME:--flag=value,--flag=value: one more arm with its own training options (repeatable), e.g. "
        "lr2x:--lr=1e-3; --method=... picks its method (default: the first of --methods)."))
    baseline: Optional[str] = field(default=None, metadata=_help(
        "The arm the others are compared with (default: dpo if it is an arm, else the first)."))
    seeds: int = field(default=5, metadata=_help("Seeds 0..N-1 per arm (initialisation, dropout, judged samples)."))
    report_size: int = field(default=32, metadata=_help(
        "At least this many report pairs (the last prompts' pairs): reported, never used for a choice."))
    selection_size: int = field(default=16, metadata=_help(
        "Selection pairs (the prompts before the report set's): they choose OFS-DPO's served module."))
    prompts: Optional[str] = field(default=None, metadata=_help(
        "Held-out prompts to judge samples on (a file, saved dataset, hub name or builtin:NAME); with --judge. "
        "Without them only the pair metrics are compared."))
    judge: list[str] = field(default_factory=list, metadata=_help(
        "Judge of the samples (as ofsdpo train --judge; repeatable)."))
    judge_prompts: int = field(default=48, metadata=_help("Held-out prompts judged per arm and seed."))
    judge_samples: int = field(default=2, metadata=_help("Samples per judged prompt."))
    max_steps: int = field(default=-1, metadata=_help("Optimiser steps per arm (-1: the whole stream once)."))
    output_dir: str = field(default="compare-output", metadata=_help(
        "Where the runs (each arm's served adapter), compare.json and compare.md go; rerun to resume."))


@dataclass
class CompareConfig(CompareOptions):
    """`ofsdpo compare`: its own options plus the training options every arm runs with."""

    training: TrainingOptions = field(default_factory=TrainingOptions)

    def __post_init__(self) -> None:
        check_field_types(self)
        if bool(self.data) == bool(self.domain):
            raise ConfigError("give --data PAIRS (one stream) or --domain NAME=PATH once per domain (continual), "
                              "not both.")
        if self.domain and self.prompts:
            raise ConfigError("--prompts/--judge: the continual form compares the pair metrics only.")
        if self.seeds < 2:
            raise ConfigError(f"--seeds {self.seeds}: a paired comparison needs at least 2 seeds (5 recommended).")
        if self.report_size < 1 or self.selection_size < 1 or self.judge_prompts < 1 or self.judge_samples < 1:
            raise ConfigError("--report-size, --selection-size, --judge-prompts and --judge-samples must be >= 1.")
        if bool(self.prompts) != bool(self.judge) and not (self.prompts or "").startswith("builtin:"):
            raise ConfigError("--prompts and --judge go together: judged samples need held-out prompts and a judge.")

    @classmethod
    def own_field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(CompareOptions)}

    @classmethod
    def field_names(cls) -> set[str]:
        return cls.own_field_names() | TrainingOptions.field_names()

    @classmethod
    def argument_classes(cls) -> tuple[type, ...]:
        return CompareOptions, TrainingOptions

    @classmethod
    def from_parsed(cls, options: CompareOptions, training: TrainingOptions) -> "CompareConfig":
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(CompareOptions)},
                   training=training)


@dataclass
class ExperimentCommandConfig:
    """`ofsdpo experiment FILE`: how to run an experiment's file (the file itself is an ExperimentConfig)."""

    experiment: Optional[str] = field(
        default=None, metadata=_help("The experiment's YAML file (experiments/*.yaml); the first positional argument.")
    )
    seeds: Optional[str] = field(
        default=None, metadata=_help("Comma-separated seeds (default: the file's, else 0,1,2).")
    )
    variants: Optional[str] = field(default=None, metadata=_help(
        "Comma-separated variant names to run, in this order (default: the file's, all). Runs are shared by name, so "
        "processes may split the variants or their order; the aggregate covers what this call ran: rerun whole."))
    output_dir: Optional[str] = field(default=None, metadata=_help("Default: experiments-output/<name>."))
    progress: bool = field(default=True, metadata=_help("Show progress bars (--no-progress hides them)."))

    def __post_init__(self) -> None:
        check_field_types(self)
        if not self.experiment:
            raise ConfigError("the experiment's YAML file is required: ofsdpo experiment experiments/NAME.yaml")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}
