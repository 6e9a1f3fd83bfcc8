"""The training loop of DPO and OFS-DPO on an online stream of preference pairs, written out top to bottom.

`train()` is the loop: for each round of the stream (`stream.py`, SPEC §1) fill the reference cache and record the
round's loss before any update on it (the online-regret curve, SPEC §5); for each optimiser step run the step
function (`step.py`, SPEC §2-3), log, evaluate, let the modules swap (`chasing.py`), checkpoint. The resumable
state is one dataclass (`state.py`); the served module and the regret come from `scoring.py`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from . import checkpoint as ckpt
from .config import OFSDPOConfig
from .data import PreferenceData, load_preference_data
from .distributed import Processes
from .domains import on_policy_domain
from .errors import ConfigError, JudgeError, NonFiniteError
from .files import write_atomic, write_json, write_jsonl
from .metrics import MetricsLogger, module_key
from .models import (check_target_modules, configure_cpu_allocator, load_model, load_tokenizer, resolve_device,
                     resolve_model_name, set_num_threads)
from .modules import (DPO_ADAPTERS, OFS_ADAPTERS, adapter_parameters, adapter_state, attach_adapters,
                      load_adapter_state, lora_config, save_adapter, swap_adapters, write_adapter)
from .reference import ReferenceCache
from .rounds import RoundSettings
from .rundir import (check_output_dir, check_same_run, claim_output_dir, config_yaml, drop_checkpoints_after,
                     name_sources, resume_checkpoint)
from .scoring import pair_losses, regret_curve, select_served
from .signals import RunInterrupted, deferred_interrupt, stop_signal
from .state import TrainerState
from .step import OptimiserStep, lr_schedule
from .stream import Stream
logger = logging.getLogger(__name__)


class OFSDPOTrainer:
    """Train `dpo` or `ofs-dpo` LoRA modules on a stream of preference pairs.

    `model` is a loaded causal LM or a name/path (default: `config.model`); `train_data` is a path, a dataset name,
    a `datasets.Dataset`, an iterable of rows or a `PreferenceData` (default: `config.data`). `eval_reference`
    may hold the eval pairs' reference log-probs already (a continual run scores them once for every stage).
    On-policy, the prompts and judge come from `config.on_policy` / `config.prompts` / `config.judge`, or from
    `on_policy_domain` (a `domains.PromptDomain`, e.g. with judge functions of your own).
    """

    def __init__(self, model: Any = None, config: OFSDPOConfig | None = None, train_data: Any = None,
                 tokenizer: Any = None, eval_data: Any = None, eval_reference: ReferenceCache | None = None,
                 on_policy_domain: Any = None, train_reference: ReferenceCache | None = None):
        cfg, self.source_notes = name_sources(config or OFSDPOConfig(), model, train_data)  # for config.yaml
        self.config = cfg
        self.output_dir = Path(cfg.output_dir)
        self.processes = Processes(cfg.device)  # one, or those of `accelerate launch` (data parallel)
        check_output_dir(self.output_dir, cfg.resume, cfg.overwrite, cfg.resume_from)
        self.device = self.processes.device or resolve_device(cfg.device)
        set_num_threads(cfg.num_threads, self.processes.count)
        configure_cpu_allocator(cfg.malloc_keep_freed, cfg.malloc_mmap_threshold, self.device)
        loaded = not (model is None or isinstance(model, (str, Path)))
        self.model_name, self.gguf_file = ((model.config._name_or_path, cfg.gguf_file) if loaded else
                                           resolve_model_name(str(model) if model else cfg.model, cfg.gguf_file))
        check_target_modules(cfg.target_module_list, model if loaded else self.model_name, self.gguf_file,
                             cfg.trust_remote_code)  # before the (slow) load (GGUF: after it, in _attach)
        self.on_policy_domain = on_policy_domain  # a continual stage's on-policy domain (else from the config)
        self.tokenizer = tokenizer or load_tokenizer(self.model_name, self.gguf_file, cfg.trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stream = self._make_stream(train_data)  # tokenizer and data before the model: bad data fails fast
        self.data = self.stream.data
        self.eval = self._load(eval_data if eval_data is not None else cfg.eval_data, None)
        self.names = OFS_ADAPTERS if cfg.method == "ofs-dpo" else DPO_ADAPTERS
        self.model = self._attach(model if loaded else None)
        lrs = {"default": cfg.lr, "fast": cfg.lr, "slow": cfg.lr * cfg.slow_lr_ratio}  # η_F, η_S (SPEC §3)
        groups = [{"params": adapter_parameters(self.model, n), "lr": lrs[n], "name": n} for n in self.names]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.total_steps = self.stream.total_steps(cfg.pairs_per_step, cfg.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(cfg.lr_scheduler, cfg.warmup_steps, self.total_steps))
        self.step_fn = OptimiserStep(self.model, self.names, self.optimizer, self.scheduler, self.processes,
                                     cfg.method, cfg, self.device, self.tokenizer.pad_token_id)
        # a continual run's stream may come with its π_ref cache, shared with runs over the same pairs and base
        self.reference = train_reference if train_reference is not None else ReferenceCache(len(self.data))
        if len(self.reference.chosen) != len(self.data):
            raise ValueError(f"train_reference holds {len(self.reference.chosen)} pairs; the stream has "
                             f"{len(self.data)}")
        self.eval_reference = eval_reference or (ReferenceCache(len(self.eval)) if self.eval is not None else None)
        if cfg.eval_steps and self.eval is None:  # no silent no-op
            warnings.warn(f"--eval-steps {cfg.eval_steps} does nothing without --eval-data: no best fast module is "
                          "tracked (give --eval-data held-out pairs, or drop --eval-steps).", UserWarning, stacklevel=2)
        self.state = TrainerState(method=cfg.method, data_fingerprint=self.stream.fingerprint())
        self.best_state: dict | None = None  # weights of the best fast (or dpo) module on --eval-data
        self._eval_losses: dict = {}  # the last `_track_best` loss on --eval-data: {"step": s, module: loss}

    # --- set-up ----------------------------------------------------------------------------------------------------
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

    def _make_stream(self, train_data: Any) -> Stream:
        cfg = self.config
        if cfg.on_policy or self.on_policy_domain is not None:  # pairs generated round by round from the policy
            domain = self.on_policy_domain or on_policy_domain(cfg, str(self.device))
            settings = RoundSettings(cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                     cfg.missing_eos_penalty, cfg.generation_batch_size)
            return Stream(PreferenceData(pairs=[], source=f"on-policy:{domain.name}"), cfg.epochs, cfg.round_size,
                          domain, settings, self.tokenizer,
                          lambda rows: load_preference_data(rows, self.tokenizer, cfg.max_length,
                                                            cfg.max_prompt_length),
                          self.output_dir / "rounds" if self.processes.is_main else None)
        data = self._load(train_data if train_data is not None else cfg.data, "--data")
        return Stream(data, cfg.epochs, cfg.round_size)

    def _attach(self, loaded):
        """The frozen base (loaded here unless given) with the LoRA modules, on this process's device or shard."""
        cfg, sharded = self.config, self.processes.sharded  # sharded: the base stays on the CPU, one layer moves
        if loaded is None:                                    # at a time
            base = load_model(self.model_name, self.gguf_file, cfg.dtype,
                              torch.device("cpu") if sharded else self.device, cfg.trust_remote_code,
                              dtype_device=self.device)
        else:
            base = loaded if sharded else loaded.to(self.device)
        if self.processes.zero3:  # before the LoRA modules exist: DeepSpeed would partition them too
            self.processes.partition_base(base)
        check_target_modules(cfg.target_module_list, base)
        set_seed(cfg.seed)  # the same LoRA init for `default` (dpo) and `fast` (ofs-dpo): both draw first
        model = attach_adapters(base, lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                                  cfg.target_module_list), self.names)
        if cfg.gradient_checkpointing:  # the base's activations recomputed in the backward (peft's input hook)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if sharded:
            self.processes.shard_model(model)
        model.train()
        self.processes.broadcast([p for n in self.names for p in adapter_parameters(model, n)])
        if self.processes.distributed:  # each process its own dropout masks, as one big batch would have
            torch.manual_seed(cfg.seed + self.processes.index)
        return model

    # --- the loop --------------------------------------------------------------------------------------------------
    def train(self, on_step=None) -> dict:
        """Run the stream to its end. `on_step(trainer, row)`, if given, runs after each optimiser step with the
        step's metrics row (an experiment's checkpoint ladder judges the modules there); a dict it returns joins
        the row."""
        cfg, main = self.config, self.processes.is_main
        with claim_output_dir(self.output_dir, cfg.resume, cfg.overwrite, self.processes):  # locked to the end
            if cfg.resume:
                self._resume()
            state = self.state
            metrics = self._open_metrics() if main else None  # only the main process writes outputs and logs
            bar = tqdm(total=self.total_steps, initial=state.step, disable=not (cfg.progress and main), desc=cfg.method,
                       unit="step")
            self._started = time.perf_counter() - state.train_seconds  # a resumed run counts its earlier part
            with deferred_interrupt() as interrupted:
                while state.step < self.total_steps:
                    row: dict[str, Any] = {}
                    one_step_round = False
                    if state.position >= state.round_end:  # a new round: score it before any update on it (SPEC §5)
                        round_indices = self._start_round()
                        if not round_indices:
                            break  # the prompts ran out (on-policy rounds can be all ties)
                        if self.stream.last_round is not None:  # on-policy: what the round sampled and judged
                            row.update(self.stream.last_round.metrics())
                        one_step_round = len(round_indices) <= cfg.pairs_per_step
                        if not one_step_round:
                            row.update(self._record_online(self._evaluate(self.data, self.reference, round_indices)))
                    indices = self.stream.step_indices(state, cfg.pairs_per_step)
                    tick = time.perf_counter()
                    row.update(self.step_fn(self.data, self.reference, indices, state.chase))
                    if one_step_round:  # its training forward ran before the update: that is the pre-update loss
                        row.update(self._record_online({n: row[module_key(cfg.method, n, "loss")] for n in self.names}))
                    state.step += 1
                    state.position += len(indices)
                    row.update(self._after_step(row, time.perf_counter() - tick))
                    if on_step is not None:
                        row.update(on_step(self, row) or {})
                    if metrics is not None:
                        metrics.log(row)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
                    if self.eval is not None and cfg.eval_steps and (state.step % cfg.eval_steps == 0
                                                                      or state.step == self.total_steps):
                        self._track_best()
                    if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                        self._stop_on_nonfinite()
                    if cfg.save_steps > 0 and state.step % cfg.save_steps == 0 and state.step < self.total_steps:
                        self._save_checkpoint()
                    signum = stop_signal(self.processes, interrupted())  # every process stops at the same step
                    if signum:
                        raise RunInterrupted(signum, self._save_checkpoint("continue with --resume"))
            bar.close()
            if metrics is not None:
                metrics.close()
            if state.step == 0 and self.stream.on_policy is not None:  # no silent "done": nothing was learnt
                raise ConfigError(f"every sampled prompt tied under the judge ({state.ties_skipped} of "
                                  f"{state.prompt_position} prompts): nothing to learn; raise --samples-per-prompt "
                                  "or --temperature, or use a judge that separates the samples.")
            self._save_checkpoint()
            return self._finish(time.perf_counter() - self._started)

    def _open_metrics(self) -> MetricsLogger:
        cfg, out = self.config, self.output_dir
        write_atomic(out / "config.yaml", config_yaml(cfg.to_dict(), self.source_notes))
        return MetricsLogger(out / "metrics.jsonl", out / "runs" if cfg.report_to == "tensorboard" else None,
                             self.state.step if cfg.resume else None,
                             wandb_config=cfg.to_dict() if cfg.report_to == "wandb" else None)

    def _start_round(self) -> list[int]:
        """The next round's stream indices, with their reference log-probs cached."""
        state = self.state
        try:
            indices = self.stream.next_round(state, self.model, state.chase.leader if len(self.names) > 1 else "default",
                                             self.names)
        except JudgeError as err:  # the round is undone (prompts, RNG): a resume redoes it exactly
            saved = self._save_checkpoint("fix the judge, then continue with --resume")
            raise JudgeError(f"{err}. {saved[0].upper()}{saved[1:]}.") from None
        if indices:
            self.reference.grow_to(len(self.data))  # on-policy rounds add pairs
            state.round_end = state.position + len(indices)
            cfg = self.config  # with several processes each scores a share of π_ref, then all share all
            self.reference.fill_shared(self.model, self.data.pairs, indices, self.processes,
                                       self.tokenizer.pad_token_id, self._eval_batch_size, cfg.logprob_chunk_size,
                                       lambda part: self.step_fn.batch(self.data, part))
        return indices

    def _after_step(self, row: dict, seconds: float) -> dict:
        """Counters, throughput, the non-finite streak, and (ofs-dpo) the chase window and a swap (SPEC §3)."""
        cfg, state = self.config, self.state
        state.num_tokens += row["num_tokens"]
        finite = row.pop("finite")
        if not state.count_finite(finite):
            logger.warning("step %d: non-finite loss or gradient; the update was skipped (%d in a row, %d in all; the "
                           "run stops at %d in a row, --max-nonfinite-steps)", state.step, state.nonfinite_in_a_row,
                           state.nonfinite_skipped, cfg.max_nonfinite_steps)
        extra = {"step": state.step, "epoch": state.position / len(self.data), "pairs_seen": state.position,
                 "num_tokens": state.num_tokens, "tokens_per_second": row["num_tokens"] / max(seconds, 1e-9),
                 "pairs_per_second": row["pairs"] / max(seconds, 1e-9),
                 "nonfinite_steps_skipped": state.nonfinite_skipped}
        if cfg.method == "ofs-dpo":
            if finite:  # a NaN would decide the next leader comparison
                state.chase.record({n: row[f"{n}/loss"] for n in self.names})
            if state.chase.end_of_window(state.step, cfg.chase_interval, cfg.swap) and cfg.swap == "params":
                swap_adapters(self.model, "fast", "slow", self.optimizer)
            extra.update({"chase/leader": state.chase.leader, "chase/swaps": state.chase.swaps})
        return extra

    def _stop_on_nonfinite(self) -> None:
        """Keep a checkpoint (the weights are those of the last finite step) and stop with an error."""
        saved = self._save_checkpoint("try a lower --lr or --dtype float32, then --resume")
        state = self.state
        raise NonFiniteError(
            f"steps {state.step - state.nonfinite_in_a_row + 1}-{state.step}: {state.nonfinite_in_a_row} optimiser "
            f"steps in a row had a non-finite loss or gradient (--max-nonfinite-steps "
            f"{self.config.max_nonfinite_steps}); stopped. {saved[0].upper()}{saved[1:]}.")

    # --- evaluation ------------------------------------------------------------------------------------------------
    @property
    def _eval_batch_size(self) -> int:
        return self.config.eval_batch_size or 2 * self.config.batch_size

    def pair_losses(self, data: PreferenceData, reference: ReferenceCache, indices: list[int], name: str):
        """Per-pair DPO loss and preference correctness of module `name` (no dropout, no gradient)."""
        cfg = self.config
        return pair_losses(self.model, data, reference, indices, name, self.tokenizer.pad_token_id, cfg.beta,
                           self._eval_batch_size, cfg.logprob_chunk_size, self.names,
                           prompt_once=not self.processes.sharded)  # sharded: the forwards of the other ranks

    def _evaluate(self, data: PreferenceData, reference: ReferenceCache, indices: list[int]) -> dict[str, float]:
        return {name: self.pair_losses(data, reference, indices, name)[0].mean().item() for name in self.names}

    def _record_online(self, losses: dict[str, float]) -> dict:
        """Keep the round's pre-update loss of every module (SPEC §5)."""
        self.state.online_losses.append({"round": len(self.state.online_losses) + 1, "position": self.state.position,
                                         **losses})
        return {module_key(self.config.method, name, "online/loss"): value for name, value in losses.items()}

    def _track_best(self) -> None:
        """Keep the best fast module on the held-out pairs seen during training (COFS-DPO keeps it, SPEC §4)."""
        name = self.names[0]  # `fast`, or dpo's only module
        losses, correct = self.pair_losses(self.eval, self.eval_reference, list(range(len(self.eval))), name)
        loss, accuracy = losses.mean().item(), correct.mean().item()
        self._eval_losses = {"step": self.state.step, name: loss}
        if self.state.best is None or loss < self.state.best["loss"]:
            self.state.best = {"step": self.state.step, "loss": loss, "accuracy": accuracy}
            self.best_state = adapter_state(self.model, name)

    @property
    def best(self) -> dict | None:
        """The best fast module: its step, loss, accuracy and weights (`state`), or None."""
        return None if self.state.best is None else {**self.state.best, "state": self.best_state}

    # --- checkpoints -----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, then: str = "") -> str:
        """Write a checkpoint of this step (none under --save-steps -1); returns what happened, for a message
        (`then`: what the user may do next with it)."""
        if self.config.save_steps < 0:
            return "no checkpoint written (--save-steps -1): this run cannot be resumed"
        rng = ckpt.rng_state()
        if self.processes.distributed:  # every process's RNG (its dropout masks), the rest is the same everywhere
            rng = {"processes": self.processes.gather(rng)}
        if self.processes.is_main:
            adapters = {n: adapter_state(self.model, n) for n in self.names}
            if self.best_state is not None:
                adapters["best"] = self.best_state
            state = self.state
            state.num_pairs, state.reference_computed_pairs = len(self.data), self.reference.computed_pairs
            state.train_seconds = time.perf_counter() - self._started if hasattr(self, "_started") else 0.0
            state.generated_pairs = self.data.pairs if self.stream.on_policy is not None else None
            ckpt.save_checkpoint(self.output_dir / "checkpoints", state.step, adapters, self.optimizer,
                                 self.scheduler, self.reference.state_dict(), state.to_dict(),
                                 self.config.save_total_limit, rng=rng)
        self.processes.barrier()  # nobody reads a checkpoint before it is in place
        where = f"checkpoint of step {self.state.step} written to {self.output_dir / 'checkpoints'}"
        return f"{where}; {then}" if then else where

    def _resume(self) -> None:
        path = resume_checkpoint(self.output_dir, self.config.resume_from)
        saved = ckpt.load_checkpoint(path)
        state = TrainerState.from_dict(saved["state"])
        self.stream.restore(state.generated_pairs)
        self.reference.grow_to(len(self.data))
        check_same_run(path, state, self.state, self.config, len(self.data))
        missing = [name for name in self.names if name not in saved["adapters"]]
        if missing:  # a checkpoint missing a file: the message of any unreadable checkpoint
            raise ConfigError(f"--resume: cannot read checkpoint {path} (no adapter-{missing[0]}.safetensors); remove "
                              "it to resume from an older one.")
        for name in self.names:
            load_adapter_state(self.model, name, saved["adapters"][name])
        self.best_state = saved["adapters"].get("best") if state.best else None
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.reference.load_state_dict(saved["reference"])
        self.reference.computed_pairs = state.reference_computed_pairs
        self.state = state
        ckpt.set_rng_state(ckpt.own_rng(saved["rng"], path, self.processes))
        if self.processes.is_main:  # --resume-from an older one: the newer ones belong to the abandoned branch
            drop_checkpoints_after(self.output_dir, path)

    # --- outputs ---------------------------------------------------------------------------------------------------
    def _finish(self, seconds: float) -> dict:
        cfg, state = self.config, self.state
        served, basis, scores = select_served(self.names, self._final_eval_losses(), state.online_losses,
                                              cfg.chase_interval, state.chase.leader)
        regret = self._regret(served) if cfg.regret and state.online_losses else []
        summary = {
            "method": cfg.method, "model": self.model_name, "gguf_file": self.gguf_file, "steps": state.step,
            "pairs_seen": state.position, "rounds": len(state.online_losses), "num_tokens": state.num_tokens,
            "train_runtime": seconds, "served_module": served, "served_by": basis, "module_scores": scores,
            "data": vars(self.data.stats), "reference_pairs_computed": self.reference.computed_pairs,
            "online_regret": regret[-1]["regret"] if regret else None, "num_processes": self.processes.count,
            "sharded_base": self.processes.sharded, "sharding": self.processes.sharding,
            "zero_stage": self.processes.zero_stage, "base_partition": self.processes.base_partition,
            "nonfinite_steps_skipped": state.nonfinite_skipped,
        }
        if self.stream.on_policy is not None:
            summary["on_policy"] = {"domain": self.stream.on_policy.name, "prompts_used": state.prompt_position,
                                    "pairs_generated": len(self.data), "ties_skipped": state.ties_skipped}
        if state.best is not None:
            summary["best_fast"] = dict(state.best)
        if cfg.method == "ofs-dpo":
            summary.update({"chase/swaps": state.chase.swaps, "chase/leader": state.chase.leader})
        if self.processes.is_main:
            self._write_outputs(served, regret, summary)
        self.processes.barrier()  # the outputs are complete when any process returns
        return summary

    def _final_eval_losses(self) -> dict[str, float] | None:
        """Every module's mean loss on --eval-data now; the fast module's from the last `_track_best` when it ran
        at this step (the same weights, the same pairs: the same number)."""
        if not self.eval:
            return None
        known = self._eval_losses if self._eval_losses.get("step") == self.state.step else {}
        every = list(range(len(self.eval)))
        return {name: known[name] if name in known else
                self.pair_losses(self.eval, self.eval_reference, every, name)[0].mean().item() for name in self.names}

    def _regret(self, served: str) -> list[dict]:
        order, position = self.stream.order, self.state.position
        seen = sorted(set(order[:position]))
        final_losses = torch.full((len(self.data),), float("nan"))
        final_losses[seen] = self.pair_losses(self.data, self.reference, seen, served)[0]
        return regret_curve(self.state.online_losses, order, position, final_losses, served)

    def _write_outputs(self, served: str, regret: list[dict], summary: dict) -> None:
        out = self.output_dir
        try:
            save_adapter(self.model, served, out)  # the module to serve, at the root, as a plain peft adapter
            if self.config.method == "ofs-dpo":
                for name in self.names:
                    save_adapter(self.model, name, out / name)
            if self.best_state is not None:
                write_adapter(self.model.peft_config[self.names[0]], self.best_state, out / "best_fast")
            with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-tokenizer-") as staging:  # whole files or none
                for path in self.tokenizer.save_pretrained(staging):
                    if os.path.isfile(path):
                        os.replace(path, out / Path(path).name)
            if regret:
                write_jsonl(out / "regret.jsonl", regret)
            write_json(out / "summary.json", summary)
        except (OSError, RuntimeError) as err:
            raise ckpt.write_error(Path(getattr(err, "filename", None) or out), "the run's outputs", err) from None
