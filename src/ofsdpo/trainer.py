"""The training loop of DPO and OFS-DPO on an online stream of preference pairs, written out top to bottom.

`train()` is the loop: for each round of the stream (`stream.py`, SPEC §1) fill the reference cache and record the
round's loss before any update on it (the online-regret curve, SPEC §5); for each optimiser step run the step
function (`step.py`, SPEC §2-3), log, evaluate, let the modules swap (`chasing.py`), checkpoint. The resumable
state is one dataclass (`state.py`); the modules are scored (`scoring.PairScorer`), the served module chosen and the
regret computed in `scoring.py`.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from . import checkpoint as ckpt
from .config import OFSDPOConfig
from .distributed import Processes
from .errors import ConfigError, JudgeError, NonFiniteError
from .files import write_atomic
from .methods import training_method
from .metrics import open_run_metrics
from .models import (check_target_modules, configure_cpu_allocator, load_model, load_tokenizer, resolve_device,
                     resolve_model_name, set_num_threads)
from .modules import adapter_parameters, adapter_state, lora_config
from .data import PreferenceData
from .reference import ReferenceCache
from .rundir import (check_once, check_output_dir, check_same_run, claim_output_dir, config_yaml,
                     drop_checkpoints_after, name_sources, resume_checkpoint)
from .scoring import PairScorer, regret_curve
from .signals import RunInterrupted, deferred_interrupt, stop_signal
from .state import TrainerState, TrainResult, run_summary
from .step import OptimiserStep, lr_schedule
from .stream import load_pairs, open_stream


@contextlib.contextmanager
def loading_bars(shown: bool):
    """transformers' own bars (loading weights, checkpoint shards) follow --progress / --no-progress, then are as
    they were."""
    before = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before and not shown:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _flushed(metrics):
    """The steps of an unfinished --logging-steps window are written however the loop ends (a stop, an error)."""
    try:
        yield
    finally:
        if metrics is not None:
            metrics.flush()


class OFSDPOTrainer:
    """Train the LoRA modules of a training method (`methods.py`: `dpo`, `ofs-dpo`) on a stream of preference pairs.

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
        training_method(cfg.method).check(cfg)  # options the method cannot train with: refused before anything
        self.output_dir = Path(cfg.output_dir)
        self.processes = Processes(cfg.device)  # one, or those of `accelerate launch` (data parallel)
        check_once(self.processes, check_output_dir, self.output_dir, cfg.resume, cfg.overwrite, cfg.resume_from)
        self.device = self.processes.device or resolve_device(cfg.device)
        set_num_threads(cfg.num_threads, self.processes.count)
        configure_cpu_allocator(cfg.malloc_keep_freed, cfg.malloc_mmap_threshold, self.device)
        loaded = not (model is None or isinstance(model, (str, Path)))
        self.model_name, self.gguf_file = ((model.config._name_or_path, cfg.gguf_file) if loaded else
                                           resolve_model_name(str(model) if model else cfg.model, cfg.gguf_file))
        check_target_modules(cfg.target_module_list, model if loaded else self.model_name, self.gguf_file,
                             cfg.trust_remote_code)  # before the (slow) load (GGUF: after it, in _attach)
        self.tokenizer = tokenizer or load_tokenizer(self.model_name, self.gguf_file, cfg.trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.method = training_method(cfg.method)  # what is trained and how: asked, never compared by name
        self.names = self.method.adapters
        # tokenizer and data before the model: bad data fails fast
        self.stream = open_stream(cfg, self.tokenizer, train_data, on_policy_domain, self.device,
                                  self.output_dir / "rounds" if self.processes.is_main else None)
        self.data = self.stream.data
        self.eval = load_pairs(eval_data if eval_data is not None else cfg.eval_data, self.tokenizer, cfg)
        self.model = self._attach(model if loaded else None)
        lrs = self.method.learning_rates(cfg)
        groups = [{"params": adapter_parameters(self.model, n), "lr": lrs[n], "name": n} for n in self.names]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.total_steps = self.stream.total_steps(cfg.pairs_per_step, cfg.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(cfg.lr_scheduler, cfg.warmup_steps, self.total_steps))
        self.step_fn = OptimiserStep(self.model, self.method, self.optimizer, self.scheduler, self.processes, cfg,
                                     self.device, self.tokenizer.pad_token_id)
        self.scorer = PairScorer(self.model, cfg, self.tokenizer.pad_token_id, self.names,
                                 prompt_once=not self.processes.sharded)  # sharded: the forwards of the other ranks
        if train_reference is not None and cfg.max_completion_length is not None and not isinstance(
                train_data, PreferenceData):  # tokenized pairs are used as they are: load_pairs checks their cut
            raise ConfigError("--max-completion-length cuts the pairs this run tokenizes, but the π_ref cache passed "
                              "in (train_reference) may hold scores of the uncut pairs: drop one of the two.")
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
    def _attach(self, loaded):
        """The frozen base (loaded here unless given) with the LoRA modules, on this process's device or shard."""
        cfg, sharded = self.config, self.processes.sharded  # sharded: the base stays on the CPU, one layer moves
        if loaded is None:                                    # at a time
            with loading_bars(cfg.progress):
                base = load_model(self.model_name, self.gguf_file, cfg.dtype,
                                  torch.device("cpu") if sharded else self.device, cfg.trust_remote_code,
                                  dtype_device=self.device)
        else:
            base = loaded if sharded else loaded.to(self.device)
        check_target_modules(cfg.target_module_list, base)
        lora = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_module_list)
        return self.processes.attach_policy(base, self.names, lora, cfg.seed, cfg.gradient_checkpointing)

    # --- the loop --------------------------------------------------------------------------------------------------
    def train(self, on_step=None) -> TrainResult:
        """Run the stream to its end; returns the run's summary, served module and trained modules (`TrainResult`).
        `on_step(trainer, row)`, if given, runs after each optimiser step with the step's metrics row (an
        experiment's checkpoint ladder judges the modules there); a dict it returns joins the row."""
        cfg, main = self.config, self.processes.is_main
        with claim_output_dir(self.output_dir, cfg.resume, cfg.overwrite, self.processes):  # locked to the end
            if cfg.resume:
                self._resume()
            state = self.state
            if main:  # only the main process writes outputs and logs
                write_atomic(self.output_dir / "config.yaml", config_yaml(cfg.to_dict(), self.source_notes))
            metrics = open_run_metrics(self.output_dir, cfg, state.step if cfg.resume else None) if main else None
            bar = tqdm(total=self.total_steps, initial=state.step, disable=not (cfg.progress and main), desc=cfg.method,
                       unit="step")
            self._started = time.perf_counter() - state.train_seconds  # a resumed run counts its earlier part
            with deferred_interrupt() as interrupted, _flushed(metrics):
                while state.step < self.total_steps:
                    row: dict[str, Any] = {}
                    began, one_step_round = time.perf_counter(), False
                    if state.position >= state.round_end:  # a new round: score it before any update on it (SPEC §5)
                        one_step_round = self._open_round(row, metrics, bar)
                        if one_step_round is None:
                            break  # the prompts ran out (on-policy rounds can be all ties)
                    indices = self.stream.step_indices(state, cfg.pairs_per_step)
                    tick = time.perf_counter()
                    row.update(self.step_fn(self.data, self.reference, indices, state.chase))
                    if one_step_round:  # its training forward ran before the update: that is the pre-update loss
                        row.update(self._record_online({n: row[self.method.key(n, "loss")] for n in self.names}))
                    state.step += 1
                    state.position += len(indices)
                    row.update(self._after_step(row, time.perf_counter() - tick))
                    if self.stream.on_policy is not None:  # pairs_per_second counts the step alone; this, the
                        # round's sampling, judging and π_ref scoring too (they land on the step that starts it)
                        row["pairs_per_second_with_sampling"] = row["pairs"] / max(time.perf_counter() - began, 1e-9)
                    if on_step is not None:
                        row.update(on_step(self, row) or {})
                    if metrics is not None:
                        metrics.log(row)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
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
            self.stream.check_learnt(state)  # on-policy, no silent "done" when every prompt tied
            self._save_checkpoint()
            return self._finish(time.perf_counter() - self._started)

    def _open_round(self, row: dict, metrics, bar) -> bool | None:
        """Start the next round, its statistics and pre-update loss into `row`; whether it is one step, or None when
        the stream ended (rounds of ties only sampled then get a metrics row of their own). The progress bar names
        the on-policy phase running (sampling, judging)."""
        cfg, phases = self.config, []

        def show(phase: str) -> None:
            phases.append(phase)
            bar.set_description(f"{cfg.method} ({phase})")

        round_indices = self._start_round(show)
        if phases:
            bar.set_description(cfg.method)
        stats = self.stream.last_round  # on-policy: what the round(s) sampled and judged
        if not round_indices:
            if stats is not None and metrics is not None:
                metrics.write({"step": self.state.step, **stats.metrics()})
            return None
        if stats is not None:
            row.update(stats.metrics())
        if len(round_indices) <= cfg.pairs_per_step:
            return True  # its loss before the update is the step's own (`train`)
        row.update(self._record_online(self.scorer.mean_losses(self.data, self.reference, round_indices, self.names)))
        return False

    def _start_round(self, on_phase=None) -> list[int]:
        """The next round's stream indices, with their reference log-probs cached; `on_phase(name)` is told each
        on-policy phase as it starts."""
        state = self.state
        try:
            indices = self.stream.next_round(state, self.model, self.method.sampling_module(state), self.names,
                                             on_phase)
        except JudgeError as err:  # the round is undone (prompts, RNG): a resume redoes it exactly
            saved = self._save_checkpoint("fix the judge, then continue with --resume")
            raise JudgeError(f"{err}. {saved[0].upper()}{saved[1:]}.", str(err)) from None
        if indices:
            self.reference.grow_to(len(self.data))  # on-policy rounds add pairs
            state.round_end = state.position + len(indices)
            cfg = self.config  # with several processes each scores a share of π_ref, then all share all
            self.reference.fill_shared(self.model, self.data.pairs, indices, self.processes,
                                       self.tokenizer.pad_token_id, self.scorer.batch_size, cfg.logprob_chunk_size,
                                       lambda part: self.step_fn.batch(self.data, part))
        return indices

    def _after_step(self, row: dict, seconds: float) -> dict:
        """Counters, throughput, the non-finite streak, and the method's own bookkeeping (ofs-dpo: the chase)."""
        cfg, state = self.config, self.state
        state.num_tokens += row["num_tokens"]
        finite = row.pop("finite")
        state.count_finite(finite, cfg.max_nonfinite_steps)
        extra = {"step": state.step, "epoch": state.position / len(self.data), "pairs_seen": state.position,
                 "num_tokens": state.num_tokens, "tokens_per_second": row["num_tokens"] / max(seconds, 1e-9),
                 "pairs_per_second": row["pairs"] / max(seconds, 1e-9),
                 "nonfinite_steps_skipped": state.nonfinite_skipped}
        return {**extra, **self.method.after_step(state, row, finite, cfg, self.model, self.optimizer)}

    def _stop_on_nonfinite(self) -> None:
        """Keep a checkpoint (the weights are those of the last finite step) and stop with an error."""
        saved = self._save_checkpoint("try a lower --lr or --dtype float32, then --resume")
        state = self.state
        what = (f"steps {state.step - state.nonfinite_in_a_row + 1}-{state.step}: {state.nonfinite_in_a_row} "
                f"optimiser steps in a row had a non-finite loss or gradient (--max-nonfinite-steps "
                f"{self.config.max_nonfinite_steps}); stopped")
        raise NonFiniteError(f"{what}. {saved[0].upper()}{saved[1:]}.", what)

    # --- evaluation ------------------------------------------------------------------------------------------------
    def _record_online(self, losses: dict[str, float]) -> dict:
        """Keep the round's pre-update loss of every module (SPEC §5)."""
        self.state.online_losses.append({"round": len(self.state.online_losses) + 1, "position": self.state.position,
                                         **losses})
        return {self.method.key(name, "online/loss"): value for name, value in losses.items()}

    def _track_best(self) -> None:
        """Keep the best fast module on the held-out pairs seen during training (COFS-DPO keeps it, SPEC §4)."""
        name = self.names[0]  # `fast`, or dpo's only module
        losses, correct = self.scorer.pair_losses(self.eval, self.eval_reference, list(range(len(self.eval))), name)
        loss, accuracy = losses.mean().item(), correct.mean().item()
        self._eval_losses = {"step": self.state.step, name: loss}
        if self.state.best is None or loss < self.state.best["loss"]:
            self.state.best = {"step": self.state.step, "loss": loss, "accuracy": accuracy}
            self.best_state = adapter_state(self.model, name)

    # --- checkpoints -----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, then: str = "") -> str:
        """Write a checkpoint of this step (none under --save-steps -1); returns what happened, for a message
        (`then`: what the user may do next with it)."""
        if self.config.save_steps < 0:
            return "no checkpoint written (--save-steps -1): this run cannot be resumed"
        state, seconds = self.state, time.perf_counter() - self._started if hasattr(self, "_started") else 0.0
        state.num_pairs, state.reference_computed_pairs, state.train_seconds = (len(self.data),
                                                                                self.reference.computed_pairs, seconds)
        state.generated_pairs = self.data.pairs if self.stream.on_policy is not None else None
        ckpt.save_run(self.output_dir / "checkpoints", state, lambda: {n: adapter_state(self.model, n) for n in
                      self.names}, self.best_state, self.optimizer, self.scheduler, self.reference, self.processes,
                      self.config.save_total_limit)
        where = f"checkpoint of step {state.step} written to {self.output_dir / 'checkpoints'}"
        return f"{where}; {then}" if then else where

    def _resume(self) -> None:
        path = resume_checkpoint(self.output_dir, self.config.resume_from)
        saved = ckpt.load_checkpoint(path)
        state = TrainerState.from_dict(saved["state"])
        self.stream.restore(state.generated_pairs)
        self.reference.grow_to(len(self.data))
        check_same_run(path, state, self.state, self.config, len(self.data))
        self.best_state = ckpt.restore(saved, path, state, self.model, self.names, self.optimizer, self.scheduler,
                                       self.reference, self.processes)
        self.state = state
        if self.processes.is_main:  # --resume-from an older one: the newer ones belong to the abandoned branch
            drop_checkpoints_after(self.output_dir, path)

    # --- outputs ---------------------------------------------------------------------------------------------------
    def _finish(self, seconds: float) -> TrainResult:
        cfg, state = self.config, self.state
        served, basis, scores = self.method.serve(self._final_eval_losses(), state, cfg)
        regret = self._regret(served) if cfg.regret and state.online_losses else []
        inputs = {"data": vars(self.data.stats), "reference_pairs_computed": self.reference.computed_pairs}
        summary = run_summary(state, {"method": cfg.method, "model": self.model_name, "gguf_file": self.gguf_file},
                              seconds, (served, basis, scores), regret, inputs, self.processes.describe(),
                              self.stream.on_policy, len(self.data))
        summary.update(self.method.summary(state))
        if self.processes.is_main:
            best = None if self.best_state is None else (self.names[0], self.best_state)
            ckpt.write_outputs(self.output_dir, self.model, served, self.method.saved_modules(), best,
                               self.tokenizer, regret, summary)
        self.processes.barrier()  # the outputs are complete when any process returns
        return TrainResult(summary, self.output_dir, self.names,
                           None if state.best is None else {**state.best, "state": self.best_state},
                           state.online_losses, self.data.pairs)

    def _final_eval_losses(self) -> dict[str, float] | None:
        """Every module's mean loss on --eval-data now; the fast module's from the last `_track_best` when it ran
        at this step (the same weights, the same pairs: the same number)."""
        if not self.eval:
            return None
        known = self._eval_losses if self._eval_losses.get("step") == self.state.step else {}
        fresh = self.scorer.mean_losses(self.eval, self.eval_reference, list(range(len(self.eval))),
                                        [name for name in self.names if name not in known])
        return {name: known[name] if name in known else fresh[name] for name in self.names}

    def _regret(self, served: str) -> list[dict]:
        order, position = self.stream.order, self.state.position
        seen = sorted(set(order[:position]))
        final_losses = torch.full((len(self.data),), float("nan"))
        final_losses[seen] = self.scorer.pair_losses(self.data, self.reference, seen, served)[0]
        return regret_curve(self.state.online_losses, order, position, final_losses, served)
