"""The training loop of DPO and OFS-DPO on an online stream of preference pairs, written out top to bottom.

Stream (SPEC §1): pairs are consumed in order, in rounds of `round_size` pairs. Before the learner updates on a
round, its loss on that round is recorded (the online-regret curve, SPEC §5). A round is one or more optimiser steps
of `batch_size x grad_accum` pairs.

Step (SPEC §2-3): for each micro-batch, one concatenated forward per module (`fast` then `slow`, or `default`),
the cached reference log-probs, the DPO losses, the chasing regulariser, and one backward for everything. Each
module then has its own gradient clipping and learning rate in one AdamW (a param group per module).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from transformers import set_seed

from . import checkpoint as ckpt
from .chasing import ChaseState
from .config import ConfigError, NonFiniteError, OFSDPOConfig
from .data import PreferenceData, collate, load_preference_data
from .distributed import Processes
from .domains import get_domain
from .scoring import pair_losses
from .generation import make_pairs
from .logprobs import concatenated_forward
from .losses import chase_loss, dpo_loss
from .metrics import MetricsLogger
from .models import load_model, load_tokenizer, resolve_device, resolve_model_name
from .modules import (DPO_ADAPTERS, OFS_ADAPTERS, activate, adapter_parameters, adapter_state, attach_adapters,
                      load_adapter_state, lora_config, reference_mode, save_adapter, swap_adapters,
                      write_adapter)
from .reference import ReferenceCache

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json")
logger = logging.getLogger(__name__)


def _schedule(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C (SIGINT) only sets a flag, read by the loop after each step, so that the checkpoint it then writes
    holds whole steps (never half an optimiser update). A second Ctrl-C interrupts at once.

    Yields a function telling whether an interrupt is pending. Only the main thread can own the handler, and a
    SIGINT that the shell ignores (a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    pending = []

    def on_sigint(signum, frame):
        pending.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(pending)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _write_atomic(path: Path, text: str) -> None:
    """A crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fingerprint(data: PreferenceData) -> str:
    """Hash of the tokenized stream: a resume on other data (same length) would silently lose or repeat pairs."""
    digest = hashlib.sha256()
    for pair in data.pairs:
        digest.update(json.dumps([pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]]).encode())
    return digest.hexdigest()


class OFSDPOTrainer:
    """Train `dpo` or `ofs-dpo` LoRA modules on a stream of preference pairs.

    `model` is a loaded causal LM or a name/path (default: `config.model`); `train_data` is a path, a dataset name,
    a `datasets.Dataset`, an iterable of rows or a `PreferenceData` (default: `config.data`).
    """

    def __init__(self, model: Any = None, config: OFSDPOConfig | None = None, train_data: Any = None,
                 tokenizer: Any = None, eval_data: Any = None):
        self.config = cfg = config or OFSDPOConfig()
        self.output_dir = Path(cfg.output_dir)
        self.processes = Processes(cfg.device)  # one, or those of `accelerate launch` (data parallel)
        self._check_output_dir()
        self.device = self.processes.device or resolve_device(cfg.device)
        if model is None or isinstance(model, (str, Path)):  # tokenizer and data first: bad data fails fast
            self.model_name, self.gguf_file = resolve_model_name(str(model) if model else cfg.model, cfg.gguf_file)
            self.tokenizer = tokenizer or load_tokenizer(self.model_name, self.gguf_file, cfg.trust_remote_code)
        else:
            self.model_name, self.gguf_file = model.config._name_or_path, cfg.gguf_file
            self.tokenizer = tokenizer or load_tokenizer(self.model_name, cfg.gguf_file, cfg.trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.on_policy = get_domain(cfg.on_policy) if cfg.on_policy else None
        if self.on_policy is not None:  # pairs are generated round by round from the policy itself
            self.prompts = self.on_policy.prompts("train") * cfg.epochs
            self.data = PreferenceData(pairs=[], source=f"on-policy:{cfg.on_policy}")
        else:
            self.data = self._load(train_data if train_data is not None else cfg.data, "--data")
        self.eval = self._load(eval_data if eval_data is not None else cfg.eval_data, None)
        sharded = self.processes.sharded  # the base stays on the CPU until sharded: one layer at a time moves
        if model is None or isinstance(model, (str, Path)):
            base = load_model(self.model_name, self.gguf_file, cfg.dtype,
                              torch.device("cpu") if sharded else self.device, cfg.trust_remote_code,
                              dtype_device=self.device)
        else:
            base = model if sharded else model.to(self.device)
        if self.processes.zero3:  # before the LoRA modules exist: DeepSpeed would partition them too
            self.processes.partition_base(base)
        self.names = OFS_ADAPTERS if cfg.method == "ofs-dpo" else DPO_ADAPTERS
        set_seed(cfg.seed)  # the same LoRA init for `default` (dpo) and `fast` (ofs-dpo): both draw first
        self.model = attach_adapters(base, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                                       cfg.target_module_list), self.names)
        if sharded:
            self.processes.shard_model(self.model)
        self.model.train()
        self.processes.broadcast([p for n in self.names for p in adapter_parameters(self.model, n)])
        if self.processes.distributed:  # each process its own dropout masks, as one big batch would have
            torch.manual_seed(cfg.seed + self.processes.index)
        lrs = {"default": cfg.lr, "fast": cfg.lr, "slow": cfg.lr * cfg.slow_lr_ratio}  # η_F, η_S (SPEC §3)
        groups = [{"params": adapter_parameters(self.model, n), "lr": lrs[n], "name": n} for n in self.names]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self._trained_params = [p for group in groups for p in group["params"]]  # fixed: swaps move data only
        self.order = list(range(len(self.data))) * cfg.epochs
        steps = math.ceil(len(self.order) / cfg.pairs_per_step)
        if self.on_policy is not None:  # at most: ties shrink rounds
            steps = math.ceil(len(self.prompts) / cfg.round_size) * (cfg.round_size // cfg.pairs_per_step)
        self.total_steps = steps if cfg.max_steps == -1 else min(steps, cfg.max_steps)
        self.prompt_position, self.ties_skipped, self.round_end = 0, 0, 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(cfg.lr_scheduler, cfg.warmup_steps, self.total_steps))
        self.reference = ReferenceCache(len(self.data))
        self.eval_reference = ReferenceCache(len(self.eval)) if self.eval is not None else None
        self.chase = ChaseState()
        self.step, self.position, self.num_tokens, self.online_losses = 0, 0, 0, []
        self.nonfinite_skipped, self.nonfinite_in_a_row = 0, 0  # steps skipped for a non-finite loss or gradient
        self.data_fingerprint = _fingerprint(self.data) if self.on_policy is None else None
        self.best: dict[str, Any] | None = None  # best fast (or dpo) module on --eval-data, with --eval-steps

    # --- set-up ----------------------------------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        """Refuse a directory we must not write to; nothing is written here (bad data may still stop the run)."""
        cfg = self.config
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ConfigError(f"--output-dir {self.output_dir} is a file, not a directory.")
        held = [m for m in RUN_MARKERS if (self.output_dir / m).exists()]
        if held and not (cfg.resume or cfg.overwrite):
            raise ConfigError(f"--output-dir {self.output_dir} holds another run ({', '.join(held)}); "
                              "pass --resume to continue it or --overwrite to replace it.")
        if cfg.resume and not ckpt.list_checkpoints(self.output_dir / "checkpoints"):
            raise ConfigError(f"--resume: no checkpoint in {self.output_dir / 'checkpoints'}.")

    def _prepare_output_dir(self) -> None:
        """Create the directory; with --overwrite, remove the other run only now that data and model have loaded."""
        if not self.processes.is_main:  # only the main process writes
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.config.overwrite and not self.config.resume:
            for marker in RUN_MARKERS:
                path = self.output_dir / marker
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def _load(self, source: Any, flag: str | None) -> PreferenceData | None:
        if source is None:
            if flag:
                raise ConfigError(f"{flag} is required: a .jsonl/.json/.parquet file or a dataset.")
            return None
        if isinstance(source, PreferenceData):
            return source
        cfg = self.config
        return load_preference_data(source, self.tokenizer, cfg.max_length, cfg.max_prompt_length,
                                    split=cfg.data_split, progress=cfg.progress)

    # --- the loop --------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, out, main = self.config, self.output_dir, self.processes.is_main
        self._prepare_output_dir()
        resume_step = self._resume() if cfg.resume else None
        metrics = None
        if main:  # only the main process writes outputs and logs
            _write_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            metrics = MetricsLogger(out / "metrics.jsonl", out / "runs" if cfg.report_to == "tensorboard" else None,
                                    resume_step)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and main), desc=cfg.method,
                   unit="step")
        started = time.perf_counter()
        with _deferred_interrupt() as interrupted:
            self._run_stream(metrics, bar, interrupted)
        bar.close()
        if metrics is not None:
            metrics.close()
        self._save_checkpoint()
        return self._finish(time.perf_counter() - started)

    def _run_stream(self, metrics: MetricsLogger | None, bar, interrupted) -> None:
        """Round after round, step after step, until the stream or --max-steps ends."""
        cfg = self.config
        while self.step < self.total_steps:
            row: dict[str, Any] = {}
            one_step_round = False
            if self.position >= self.round_end:  # a new round: score it before any update on it (SPEC §5)
                round_indices = self._next_round()
                if not round_indices:
                    break  # the prompts ran out (on-policy rounds can be all ties)
                self.round_end = self.position + len(round_indices)
                self._fill_reference(round_indices)
                one_step_round = len(round_indices) <= cfg.pairs_per_step
                if not one_step_round:
                    row.update(self._record_online(self._evaluate(self.data, self.reference, round_indices)))
            indices = self.order[self.position:min(self.position + cfg.pairs_per_step, self.round_end)]
            tick = time.perf_counter()
            row.update(self._training_step(indices))
            if one_step_round:  # its training forward ran before the update: that is the pre-update loss
                row.update(self._record_online({n: row[self._loss_key(n)] for n in self.names}))
            self.step += 1
            self.position += len(indices)
            seconds = time.perf_counter() - tick
            row.update(self._after_step(row, seconds))
            if metrics is not None:
                metrics.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
            if self.eval is not None and cfg.eval_steps and (self.step % cfg.eval_steps == 0
                                                              or self.step == self.total_steps):
                self._track_best()
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                self._stop_on_nonfinite()
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self._save_checkpoint()
            if self.processes.any(interrupted()):  # every process stops at the same step
                self._save_checkpoint()
                raise KeyboardInterrupt(f"checkpoint of step {self.step} written to {self.output_dir / 'checkpoints'}; "
                                        "continue with --resume")

    def _next_round(self) -> list[int]:
        """Stream indices of the next round: the next pairs of the stream, or fresh on-policy pairs."""
        if self.on_policy is None:
            return self.order[self.position:self.position + self.config.round_size]
        cfg = self.config
        while self.prompt_position < len(self.prompts):
            records = self.prompts[self.prompt_position:self.prompt_position + cfg.round_size]
            self.prompt_position += len(records)
            activate(self.model, self.chase.leader if cfg.method == "ofs-dpo" else "default", self.names)
            rows, ties = make_pairs(self.model, self.tokenizer, self.on_policy, records, cfg.samples_per_prompt,
                                    batch_size=self._eval_batch_size)
            self.ties_skipped += ties
            if rows:
                new = load_preference_data(rows, self.tokenizer, cfg.max_length, cfg.max_prompt_length).pairs
                start = len(self.data.pairs)
                self.data.pairs += [{**p, "index": start + i} for i, p in enumerate(new)]
                self.reference.extend(len(new))
                self.order += list(range(start, start + len(new)))
                return self.order[self.position:]
        return []

    def _fill_reference(self, indices: list[int]) -> None:
        """Cache π_ref of the round's new pairs; with several processes each scores a share, then all share all."""
        cfg, processes = self.config, self.processes
        todo = self.reference.missing(indices)
        mine = todo[processes.index::processes.count]
        self.reference.fill(self.model, self.data.pairs, mine, self.tokenizer.pad_token_id, self._eval_batch_size,
                            cfg.logprob_chunk_size)
        if processes.sharded and todo:  # the base's all-gathers: as many forwards as process 0 (the largest share)
            batches = [math.ceil(len(share) / self._eval_batch_size) for share in (todo[0::processes.count], mine)]
            with reference_mode(self.model):
                for _ in range(batches[0] - batches[1]):  # stand-ins, their values unused
                    concatenated_forward(self.model, self._batch(self.data, todo[:1]), cfg.logprob_chunk_size)
        if processes.distributed and todo:
            scored = torch.stack([self.reference.chosen[todo], self.reference.rejected[todo]]).nan_to_num(0.0)
            scored = processes.sum(scored)  # each pair was scored by exactly one process
            self.reference.set(todo, scored[0], scored[1])
            self.reference.computed_pairs += len(todo) - len(mine)

    def _training_step(self, indices: list[int]) -> dict:
        cfg = self.config
        # every process holds every statistic, in the same order, even with no pairs this step: they are summed
        sums = {key: torch.zeros((), device=self.device) for key in self._stat_keys()}
        mine = self.processes.shard(indices, cfg.batch_size)  # this process's part of the global batch
        parts = [mine[start:start + cfg.batch_size] for start in range(0, len(mine), cfg.batch_size)]
        if self.processes.sharded:  # all-gathers inside forward and backward: every process runs as many as the
            parts += [[]] * (self.processes.micro_batches(indices, cfg.batch_size) - len(parts))  # busiest one
        for part in parts:  # an empty part runs a stand-in pair: its loss / inf is 0, and so is its gradient
            batch = self._batch(self.data, part or indices[:1])
            divisor = len(indices) if part else math.inf  # mean over the step's pairs: accumulation-invariant
            ref_chosen, ref_rejected = self.reference.get(batch["index"], self.device)
            if cfg.method == "ofs-dpo" and cfg.module_passes == "sequential":
                total, stats = self._sequential_passes(batch, ref_chosen, ref_rejected, divisor)
            else:
                logps = {}
                for name in self.names:
                    activate(self.model, name, self.names)
                    logps[name] = concatenated_forward(self.model, batch, cfg.logprob_chunk_size)
                total, stats = self._objective(logps, ref_chosen, ref_rejected)
                (total / divisor).backward()
            if not part:
                continue
            if cfg.method == "ofs-dpo":
                sums["loss"] = sums["loss"] + total.detach()
            for key, value in stats.items():
                sums[key] = sums[key] + value.sum()
            sums["num_tokens"] = sums["num_tokens"] + batch["attention_mask"].sum()
        self.processes.sum_gradients(self._trained_params)
        keys = list(sums)
        totals = self.processes.sum(torch.stack([sums[k].detach().float() for k in keys]))
        grad_norms = self._clip_gradients()
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        values = torch.cat([totals, torch.stack([grad_norms[n].float() for n in self.names])]).tolist()  # one sync
        finite = all(math.isfinite(v) for v in values)  # losses, rewards, log-probs and gradient norms
        if finite:  # else skip: no parameter, optimiser or schedule moves on a NaN/inf (AMP's GradScaler does so)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        summed = dict(zip(keys, values))
        tokens = int(summed.pop("num_tokens"))
        row = {k: v / len(indices) for k, v in summed.items()}
        norms = dict(zip(self.names, values[len(keys):]))
        if cfg.method == "dpo":
            row.update(learning_rate=lrs["default"], grad_norm=norms["default"])
        else:
            for name in self.names:
                row[f"{name}/learning_rate"], row[f"{name}/grad_norm"] = lrs[name], norms[name]
            row["grad_norm"] = math.sqrt(sum(v * v for v in norms.values()))
        row["num_tokens"], row["pairs"], row["finite"] = tokens, len(indices), finite
        return row

    def _sequential_passes(self, batch: dict, ref_chosen, ref_rejected, divisor: float):
        """`--module-passes sequential`: the same gradients with one module's graph alive at a time. The modules
        meet only through each other's detached log-probs (the stop-gradients of SPEC §3), so each module's
        objective can be differentiated on its own once the other's values are known."""
        cfg, (first, second) = self.config, self.names

        def forward(name: str):
            activate(self.model, name, self.names)
            return concatenated_forward(self.model, batch, cfg.logprob_chunk_size)

        with torch.no_grad():
            second_values = forward(second)  # with LoRA dropout, a mask of its own (joint mode shares one)
        first_logps = forward(first)
        total, _ = self._objective({first: first_logps, second: tuple(v.detach() for v in second_values)},
                                   ref_chosen, ref_rejected)
        (total / divisor).backward()  # only `first` is live: its part of the objective
        first_values = tuple(v.detach() for v in first_logps)
        del first_logps, total  # free the first graph before the second is built
        total, stats = self._objective({first: first_values, second: forward(second)}, ref_chosen, ref_rejected)
        (total / divisor).backward()
        return total, stats

    def _stat_keys(self) -> list[str]:
        """The summed statistics of a step, in a fixed order: `_objective`'s per-module ones, then the rest."""
        per_module = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected"]
        if self.config.method == "dpo":
            return per_module + ["num_tokens"]
        return ["loss"] + [f"{n}/{k}" for n in self.names for k in per_module] + ["chase/loss", "num_tokens"]

    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        """Each module clips its own gradient, as its own learner; the norms are before clipping."""
        max_norm = self.config.max_grad_norm or float("inf")
        return {g["name"]: torch.nn.utils.clip_grad_norm_(g["params"], max_norm) for g in self.optimizer.param_groups}

    def _objective(self, logps: dict, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor):
        """Sum over the micro-batch of the modules' DPO losses plus α·(chasing terms); per-example stats."""
        cfg, stats, total = self.config, {}, 0.0
        for name, (chosen, rejected) in logps.items():
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta)
            total = total + losses.sum()
            prefix = "" if cfg.method == "dpo" else f"{name}/"
            stats.update({
                f"{prefix}loss": losses.detach(),
                f"{prefix}rewards/chosen": chosen_rewards,
                f"{prefix}rewards/rejected": rejected_rewards,
                f"{prefix}rewards/margins": chosen_rewards - rejected_rewards,
                f"{prefix}rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                f"{prefix}logps/chosen": chosen.detach(),
                f"{prefix}logps/rejected": rejected.detach(),
            })
        if cfg.method == "ofs-dpo":
            leader, chaser = self.chase.leader, self.chase.chaser
            leader_terms, chaser_terms, gap = chase_loss(*logps[leader], *logps[chaser], cfg.beta, cfg.chase_form)
            if cfg.alpha > 0:  # SPEC §3: L_DPO(P) + α L_FS(P, sg Q) and L_DPO(Q) ∓ α L_FS(·) in one backward
                total = total + cfg.alpha * (leader_terms.sum() + chaser_terms.sum())
            stats["chase/loss"] = gap
        return total, stats

    def _after_step(self, row: dict, seconds: float) -> dict:
        cfg = self.config
        self.num_tokens += row["num_tokens"]
        finite = row.pop("finite")
        self._count_nonfinite(finite)
        extra = {"step": self.step, "epoch": self.position / len(self.data), "pairs_seen": self.position,
                 "num_tokens": self.num_tokens, "tokens_per_second": row["num_tokens"] / max(seconds, 1e-9),
                 "pairs_per_second": row["pairs"] / max(seconds, 1e-9),
                 "nonfinite_steps_skipped": self.nonfinite_skipped}
        if cfg.method == "ofs-dpo":
            if finite:  # a NaN would decide the next leader comparison
                self.chase.record({n: row[f"{n}/loss"] for n in self.names})
            if self.chase.end_of_window(self.step, cfg.chase_interval, cfg.swap) and cfg.swap == "params":
                swap_adapters(self.model, "fast", "slow", self.optimizer)
            extra.update({"chase/leader": self.chase.leader, "chase/swaps": self.chase.swaps})
        return extra

    def _count_nonfinite(self, finite: bool) -> None:
        if finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        logger.warning("step %d: non-finite loss or gradient; the update was skipped (%d in a row, %d in all; the "
                       "run stops at %d in a row, --max-nonfinite-steps)", self.step, self.nonfinite_in_a_row,
                       self.nonfinite_skipped, self.config.max_nonfinite_steps)

    def _stop_on_nonfinite(self) -> None:
        """Keep a checkpoint (the weights are those of the last finite step) and stop with an error."""
        self._save_checkpoint()
        first = self.step - self.nonfinite_in_a_row + 1
        raise NonFiniteError(
            f"steps {first}-{self.step}: {self.nonfinite_in_a_row} optimiser steps in a row had a non-finite loss or "
            f"gradient (--max-nonfinite-steps {self.config.max_nonfinite_steps}); stopped. The checkpoint of step "
            f"{self.step} is in {self.output_dir / 'checkpoints'}: try a lower --lr or --dtype float32, then --resume.")

    # --- evaluation ------------------------------------------------------------------------------------------------
    @property
    def _eval_batch_size(self) -> int:
        return self.config.eval_batch_size or 2 * self.config.batch_size

    def _loss_key(self, name: str) -> str:
        return "loss" if self.config.method == "dpo" else f"{name}/loss"

    def _batch(self, data: PreferenceData, indices: list[int]) -> dict:
        batch = collate([data.pairs[i] for i in indices], self.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def pair_losses(self, data: PreferenceData, reference: ReferenceCache, indices: list[int], name: str):
        """Per-pair DPO loss and preference correctness of module `name` (no dropout, no gradient)."""
        cfg = self.config
        return pair_losses(self.model, data, reference, indices, name, self.tokenizer.pad_token_id, cfg.beta,
                           self._eval_batch_size, cfg.logprob_chunk_size, self.names)

    def _evaluate(self, data: PreferenceData, reference: ReferenceCache, indices: list[int]) -> dict[str, float]:
        return {name: self.pair_losses(data, reference, indices, name)[0].mean().item() for name in self.names}

    def _record_online(self, losses: dict[str, float]) -> dict:
        """Keep the round's pre-update loss of every module (SPEC §5)."""
        self.online_losses.append({"round": len(self.online_losses) + 1, "position": self.position, **losses})
        if self.config.method == "dpo":
            return {"online/loss": losses["default"]}
        return {f"{name}/online/loss": value for name, value in losses.items()}

    def _track_best(self) -> None:
        """Keep the best fast module on the held-out pairs seen during training (COFS-DPO keeps it, SPEC §4)."""
        name = self.names[0]  # `fast`, or dpo's only module
        losses, correct = self.pair_losses(self.eval, self.eval_reference, list(range(len(self.eval))), name)
        loss, accuracy = losses.mean().item(), correct.mean().item()
        if self.best is None or loss < self.best["loss"]:
            self.best = {"step": self.step, "loss": loss, "accuracy": accuracy,
                         "state": adapter_state(self.model, name)}

    def _select_served(self) -> tuple[str, str, dict[str, float]]:
        """SPEC §3: serve the module with the better held-out DPO loss (eval data, else the latest online rounds)."""
        if len(self.names) == 1:
            scores = self._evaluate(self.eval, self.eval_reference, list(range(len(self.eval)))) if self.eval else {}
            return self.names[0], "only module", scores
        if self.eval is not None:
            scores, basis = self._evaluate(self.eval, self.eval_reference, list(range(len(self.eval)))), "eval_data"
        else:
            finite = [r for r in self.online_losses if all(math.isfinite(r[n]) for n in self.names)]
            recent = finite[-self.config.chase_interval:]  # rounds whose loss was NaN cannot rank the modules
            if not recent:
                return self.chase.leader, "chasing leader (no round with a finite loss)", {}
            scores = {n: sum(r[n] for r in recent) / len(recent) for n in self.names}
            basis = f"online loss of the last {len(recent)} rounds"
        return min(self.names, key=lambda n: scores[n]), basis, scores

    def _regret_curve(self, served: str) -> list[dict]:
        """Empirical online regret (SPEC §5): cumulative pre-update round loss minus the final module's on it."""
        seen = sorted(set(self.order[:self.position]))
        final_losses = torch.full((len(self.data),), float("nan"))
        final_losses[seen] = self.pair_losses(self.data, self.reference, seen, served)[0]
        curve, regret = [], 0.0
        for i, record in enumerate(self.online_losses):
            end = self.online_losses[i + 1]["position"] if i + 1 < len(self.online_losses) else self.position
            hindsight = final_losses[self.order[record["position"]:end]].mean().item()
            regret += record[served] - hindsight
            curve.append({"round": record["round"], "online_loss": record[served], "final_loss": hindsight,
                          "regret": regret})
        return curve

    # --- checkpoints and outputs -----------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"step": self.step, "position": self.position, "num_tokens": self.num_tokens,
                "online_losses": self.online_losses, "chase": self.chase.state_dict(),
                "reference_computed_pairs": self.reference.computed_pairs, "method": self.config.method,
                "num_pairs": len(self.data), "round_end": self.round_end,
                "prompt_position": self.prompt_position, "ties_skipped": self.ties_skipped,
                "nonfinite_skipped": self.nonfinite_skipped, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "data_fingerprint": self.data_fingerprint,
                "generated_pairs": self.data.pairs if self.on_policy is not None else None,
                "best": {k: v for k, v in self.best.items() if k != "state"} if self.best else None}

    def _save_checkpoint(self) -> None:
        rng = ckpt.rng_state()
        if self.processes.distributed:  # every process's RNG (its dropout masks), the rest is the same everywhere
            rng = {"processes": self.processes.gather(rng)}
        if self.processes.is_main:
            adapters = {n: adapter_state(self.model, n) for n in self.names}
            if self.best is not None:
                adapters["best"] = self.best["state"]
            ckpt.save_checkpoint(self.output_dir / "checkpoints", self.step, adapters, self.optimizer,
                                 self.scheduler, self.reference.state_dict(), self._trainer_state(),
                                 self.config.save_total_limit, rng=rng)
        self.processes.barrier()  # nobody reads a checkpoint before it is in place

    def _resume(self) -> int:
        path = ckpt.list_checkpoints(self.output_dir / "checkpoints")[-1]
        saved = ckpt.load_checkpoint(path)
        state = saved["state"]
        if state["generated_pairs"] is not None:  # on-policy: the pairs generated so far are part of the state
            self.data.pairs = state["generated_pairs"]
            self.order = list(range(len(self.data.pairs)))
            self.reference.extend(len(self.data.pairs))
        if state["method"] != self.config.method or state["num_pairs"] != len(self.data):
            raise ConfigError(f"--resume: {path} was written by a {state['method']} run on {state['num_pairs']} pairs; "
                              f"this run is {self.config.method} on {len(self.data)} pairs.")
        if state.get("data_fingerprint", self.data_fingerprint) != self.data_fingerprint:
            raise ConfigError(f"--resume: {path} was written by a run on other data (same number of pairs, different "
                              "tokens); resuming would lose or repeat pairs of the stream.")
        for name in self.names:
            load_adapter_state(self.model, name, saved["adapters"][name])
        if state.get("best"):
            self.best = {**state["best"], "state": saved["adapters"]["best"]}
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.reference.load_state_dict(saved["reference"])
        self.reference.computed_pairs = state["reference_computed_pairs"]
        self.step, self.position, self.num_tokens = state["step"], state["position"], state["num_tokens"]
        self.online_losses = state["online_losses"]
        self.round_end, self.prompt_position = state["round_end"], state["prompt_position"]
        self.ties_skipped = state["ties_skipped"]
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.chase = ChaseState.from_state_dict(state["chase"])
        ckpt.set_rng_state(self._own_rng(saved["rng"], path))
        return self.step

    def _own_rng(self, rng: dict, path: Path) -> dict:
        saved_processes = len(rng["processes"]) if "processes" in rng else 1
        if saved_processes != self.processes.count:
            raise ConfigError(f"--resume: {path} was written by {saved_processes} process(es); this run has "
                              f"{self.processes.count}. Resume with the same number of processes.")
        return rng["processes"][self.processes.index] if "processes" in rng else rng

    def _finish(self, seconds: float) -> dict:
        cfg = self.config
        served, basis, scores = self._select_served()
        regret = self._regret_curve(served) if cfg.regret and self.online_losses else []
        summary = {
            "method": cfg.method, "model": self.model_name, "gguf_file": self.gguf_file, "steps": self.step,
            "pairs_seen": self.position, "rounds": len(self.online_losses), "num_tokens": self.num_tokens,
            "train_runtime": seconds, "served_module": served, "served_by": basis, "module_scores": scores,
            "data": vars(self.data.stats), "reference_pairs_computed": self.reference.computed_pairs,
            "online_regret": regret[-1]["regret"] if regret else None, "num_processes": self.processes.count,
            "sharded_base": self.processes.sharded, "sharding": self.processes.sharding,
            "zero_stage": self.processes.zero_stage, "base_partition": self.processes.base_partition,
            "nonfinite_steps_skipped": self.nonfinite_skipped,
        }
        if self.on_policy is not None:
            summary["on_policy"] = {"domain": self.on_policy.name, "prompts_used": self.prompt_position,
                                    "pairs_generated": len(self.data), "ties_skipped": self.ties_skipped}
        if self.best is not None:
            summary["best_fast"] = {k: v for k, v in self.best.items() if k != "state"}
        if cfg.method == "ofs-dpo":
            summary.update({"chase/swaps": self.chase.swaps, "chase/leader": self.chase.leader})
        if self.processes.is_main:
            self._write_outputs(served, regret, summary)
        self.processes.barrier()  # the outputs are complete when any process returns
        return summary

    def _write_outputs(self, served: str, regret: list[dict], summary: dict) -> None:
        out = self.output_dir
        save_adapter(self.model, served, out)  # the module to serve, at the root, as a plain peft adapter
        if self.config.method == "ofs-dpo":
            for name in self.names:
                save_adapter(self.model, name, out / name)
        if self.best is not None:
            write_adapter(self.model.peft_config[self.names[0]], self.best["state"], out / "best_fast")
        self.tokenizer.save_pretrained(out)
        if regret:
            (out / "regret.jsonl").write_text("".join(json.dumps(r) + "\n" for r in regret), encoding="utf-8")
        _write_atomic(out / "summary.json", json.dumps(summary, indent=1))
