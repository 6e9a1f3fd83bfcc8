"""`ofsdpo experiment CONFIG`: one experiment of `experiments/*.yaml`, repeated over seeds, then aggregated.

An experiment is a list of *variants* (a method plus any fields of the run's config) run on built-in domains:

- `kind: in-domain`: each variant trains (`ofsdpo train`: dpo or ofs-dpo) on each domain's stream on its own; at
  the end the served module is scored (`evaluation.evaluate`, as `ofsdpo eval` scores: held-out DPO loss and accuracy,
  judge score, win rate, KL, length); the online learning curve and the online-regret curve come from the trainer.
- `kind: continual`: each variant runs `ofsdpo continual` over the domains in order (the demo's pipeline): the
  stage × domain judge-score matrix, the average final score and the forgetting.

Protocol (issue 12). Each domain's pairs are sampled from the base model ONCE (seed `pair_seed`) and cached in
`data_dir`, so every seed, variant and experiment trains on the same stream: the seeds vary the LoRA initialisation,
dropout and the judged samples, not the data. Three disjoint sets per domain (pair indices and prompts apart):
- the training stream: the first pairs of the training prompts (`steps x batch_size` of them);
- the selection set: the last `selection` pairs of the training prompts. It chooses the served module and the best
  fast module, and holds the continual memory (λ search). Never trained on, never reported;
- the report set: pairs sampled on the held-out prompts (`report_rounds` rounds of `samples` per prompt), whose DPO
  loss and preference accuracy are reported and never used for any choice.
Judging: `judge_prompts` held-out prompts x `judge_samples` samples per arm, with common random numbers for every
seed: the reference's samples are drawn under the run's own seed, so a module equal to the base ties it exactly.
The headline is paired: per seed, each variant minus the baseline variant (and the file's `compare` pairs), with t
and bootstrap intervals. Work that does not depend on the run is done once per process and shared by its runs: the
base model, π_ref's log-probs of the report pairs (continual runs: of every pair set), the reference's judged
samples of each seed.

Output: `runs/<cell>/seed-<s>/` (the run and its `result.json`; a finished cell is kept and skipped on rerun; an
unfinished one, stopped by a kill or a signal, resumes where its last checkpoint left it: `cell_result`),
`aggregate.json` (mean, sample standard deviation and values over seeds of every number, by cell), `aggregate.md`
(the tables) and plots.
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import shutil
import time
import random
import resource
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import set_seed

from ..checkpoint import list_checkpoints
from ..config import EXPERIMENT_KINDS as KINDS
from ..config import (COMPUTED, IN_DOMAIN_METHODS, RUNTIME, ContinualConfig, ExperimentConfig, OFSDPOConfig,
                      option_roles, read_config_file, resolve_search)
from ..continual import ContinualRunner
from ..continual.persistence import remove_outputs, stage_finished
from ..data import check_row, load_preference_data, read_rows
from ..domains import builtin_name, get_domain, prompt_domain, require_builtin
from ..errors import ConfigError, JudgeError, NonFiniteError
from ..evaluation import EvalOptions, EvalSet, evaluate
from ..files import read_json, write_atomic, write_json, write_jsonl
from ..losses import preference_loss
from ..metrics import continual_loss_curve
from ..models import load_model_and_tokenizer, resolve_device
from ..reference import ReferenceCache
from ..reuse import SharedWork
from ..rundir import LOCK_NAME, STAGE_FOLDER, STAGE_RECORD, lock_holder, output_dir_lock, refuse_if_locked
from ..rounds import RoundSettings, judged_pairs
from ..scoring import common_random_numbers, reference_samples
from ..signals import RunInterrupted
from ..trainer import OFSDPOTrainer
from .experiment_report import aggregate, fmt, mean_std, write_aggregate

__all__ = ["IN_DOMAIN_METHODS", "KINDS", "ExperimentConfig", "ExperimentRunner", "aggregate", "fmt", "mean_std",
           "parse_seeds", "run_experiment", "select_variants", "write_aggregate"]


# what "kl" means in a result: "exact", Σ_t KL(π(·|y<t) ‖ π_ref(·|y<t)) over the whole vocabulary along each judged
# sample (`logprobs.sequence_kl`). A result without the field (runs before it) holds the sampled log-ratio
# log π(y) − log π_ref(y) of top-k / top-p samples, which is not a KL; the report labels it so
KL_ESTIMATOR = "exact"


# --- run keys -------------------------------------------------------------------------------------------------------
# A run key holds the options that can change the result (their role, `config.base`: computed, or how it runs) when
# they differ from their default, so that a finished run stays recognised when options are added or moved. The keys of
# the shipped results fixed one more thing, frozen here as a format and never extended: the options a key held when
# keys were introduced (those of `ofsdpo train` then, and a continual run's own) enter at their value even when it is
# the default, and at `ofsdpo train`'s default when a config no longer holds them (a continual config has no --data
# or --max-steps). Their roles do not matter (--save-steps, --resume and --report-to are in it); the ones a key never
# held are not: the output folder, --progress, --overwrite (roles: output) and --domain (the pairs' bytes stand in).
KEY_FORMAT = frozenset({
    "model", "gguf_file", "trust_remote_code", "device", "dtype", "data", "data_split", "eval_data", "eval_steps",
    "on_policy", "samples_per_prompt", "max_length", "max_prompt_length", "round_size", "epochs", "max_steps",
    "batch_size", "grad_accum", "method", "beta", "lr", "slow_lr_ratio", "alpha", "chase_form", "chase_interval",
    "swap", "module_passes", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr_scheduler", "warmup_steps",
    "weight_decay", "max_grad_norm", "seed", "max_nonfinite_steps", "logprob_chunk_size", "eval_batch_size",
    "save_steps", "save_total_limit", "resume", "report_to", "regret"})
CONTINUAL_KEY_FORMAT = frozenset({"max_steps_per_domain", "memory_size", "heldout_size", "combine", "init",
                                  "judge_prompts", "judge_max_new_tokens", "lambda_grid"})
# A run checkpoints every RESUME_EVERY steps (and on SIGTERM/SIGINT, as `ofsdpo train` does) and writes its key to
# RUN_KEY_FILE when it starts: a rerun finds an unfinished run of the same key and resumes it (in-domain: from its
# newest checkpoint, the ladder's judged points kept in LADDER_FILE; continual: its finished stages read back, the
# interrupted stage from its newest checkpoint), ending as the uninterrupted run would
RESUME_EVERY = 4
RUN_KEY_FILE, LADDER_FILE = "run_key", "ladder.json"
# when the current attempt at a run started (epoch seconds) and the wall time of its earlier attempts, each counted up
# to its last saved progress (the work after it is done again): a resumed run's wall_seconds counts the run whole
ATTEMPT_FILE = "attempt.json"
KEYED_ROLES = (COMPUTED, RUNTIME)  # an option of these roles, set to other than its default, enters the key
# a continual run's paired headline numbers (`experiment_report.PAIRED_CONTINUAL`) and the report's per-unit values
# whose mean each one is (`continual.headline_units`): what the bootstrap resamples
CONTINUAL_UNITS = {"avg_final_judge": "cl/avg_judge_score", "avg_forgetting_judge": "cl/avg_forgetting_judge",
                   "avg_final_loss": "cl/avg_loss", "avg_final_accuracy": "cl/avg_accuracy", "bwt_accuracy": "cl/bwt"}


def option_defaults() -> dict:
    """The default of every option of `ofsdpo train` and `ofsdpo continual` (flat)."""
    defaults = {}
    for config_class in (ContinualConfig, OFSDPOConfig):  # train's default wins for a name both have
        for f in dataclasses.fields(config_class):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
    defaults.pop("training", None)
    return defaults


def key_options(options: dict, kind: str) -> dict:
    """A run's flat options in the form its key has always had (see KEY_FORMAT)."""
    covered = KEY_FORMAT | (CONTINUAL_KEY_FORMAT if kind == "continual" else frozenset())
    roles, defaults = option_roles(ContinualConfig, OFSDPOConfig), option_defaults()
    keyed = {k for k, role in roles.items() if role in KEYED_ROLES} - {"domain"}
    if options.get("module_batch_size") == options.get("batch_size"):  # whole micro-batches: as before the option
        options = {k: v for k, v in options.items() if k != "module_batch_size"}
    if kind == "continual":  # the search that runs (auto's depends on --init); pairwise, once the default, as then
        search = resolve_search(options.get("search", defaults["search"]), options.get("init", defaults["init"]))
        options = {k: v for k, v in options.items() if k != "search"} | ({} if search == "pairwise" else
                                                                          {"search": search})
    run = {k: v for k, v in options.items() if k in covered or (k in keyed and v != defaults[k])}
    run.update({k: defaults[k] for k in covered - set(run)})
    return run


# --- the runs --------------------------------------------------------------------------------------------------------
class ExperimentRunner:
    """Runs every (cell, seed) not yet finished, then writes the aggregate. The model loads only if a run is due."""

    def __init__(self, config: ExperimentConfig, output_dir: str | Path, progress: bool = True, verbose: bool = True,
                 reuse_twins: bool = True):
        """`reuse_twins`: a cell finished in another experiment's folder (the same run key) is reused, not rerun
        (`--overwrite` turns it off: it reruns everything)."""
        if config.builtin_domains:
            require_builtin([builtin_name(d) for d in config.domains], f"experiment '{config.name}': domains")
        self.config, self.out, self.progress, self.verbose = config, Path(output_dir), progress, verbose
        self.reuse_twins = reuse_twins
        self._base = self._tokenizer = self._model_name = None
        self._pairs: dict[str, Path] = {}
        self._report: dict[str, tuple] = {}
        # by seed (in-domain) or (seed, score_domains) (continual: drawn in the runner's calls), then domain
        self._reference_scores: dict = {}
        self._reference_logps: dict = {}  # π_ref's log-probs of each domain's pairs, for every run
        self._shared: dict = {}  # continual: the stages and scores this seed's variants share (`reuse`)
        self._domains: dict = {}  # the user's held-out prompts and judge, by domain name (`domain`)
        self._splits: dict = {}  # each domain's three sets (`split`)

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"[experiment {self.config.name}] {text}", flush=True)

    def run(self) -> dict:
        results: dict[str, dict[int, dict]] = {}
        total, done, spent = len(self.config.seeds) * len(self.config.cells()), 0, []
        for seed in self.config.seeds:  # seeds outermost: an interrupted run has whole seeds, not whole cells
            for cell, variant, domain in self.config.cells():
                started = time.perf_counter()
                results.setdefault(cell, {})[seed] = self.cell_result(cell, variant, domain, seed)
                done += 1
                if "wall_seconds" in results[cell][seed] and time.perf_counter() - started > 1:  # it ran now
                    spent.append(time.perf_counter() - started)
                if spent and done < total:
                    left = (total - done) * sum(spent) / len(spent) / 60
                    self.say(f"{done} of {total} runs done; about {left:.0f} min left")
        return write_aggregate(self.out, self.config, results)

    def cell_result(self, cell: str, variant: dict, domain: str | None, seed: int) -> dict:
        """One run's result: read back (finished here, or the same run finished in another experiment), or run here,
        resumed when an earlier call left it unfinished. The run's folder is locked from the decision to the end, so
        a second call on the same run is refused at once rather than reading or clearing what this one writes (the
        lock is beside the folder, `cell_lock`: the folder itself is cleared, and the training locks it too)."""
        run_dir, key = self.run_dir(cell, seed), self.run_key(variant, domain, seed)
        step, found = self.next_step(run_dir, key, domain)
        if step == "finished":
            return found
        with output_dir_lock(cell_lock(run_dir)):  # refused at once while another call holds it
            step, found = self.next_step(run_dir, key, domain)  # again: the folder may have changed before the lock
            if step == "running":  # a process that holds the run's own folder only (`ofsdpo train/continual`)
                refuse_if_locked(run_dir)
            if step == "finished":
                drop_resume_state(run_dir)  # a kill between the result and its clean-up left them
                return found
            if step == "reuse":  # the same run in another experiment (an ablation's baseline): reuse it
                shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished attempt's checkpoints and ladder: not needed
                result = {**read_json(found, f"remove {found.parent} to run it again."), "reused_from": str(found)}
                write_json(run_dir / "result.json", result)
                self.say(f"{cell}, seed {seed}: reused {found}")
                return result
            return self.train_cell(cell, variant, domain, seed, run_dir, key, resume=step == "resume")

    def train_cell(self, cell: str, variant: dict, domain: str | None, seed: int, run_dir: Path, key: str,
                   resume: bool) -> dict:
        """Train one run in `run_dir` (held by this call), from its start or resumed, and keep its result."""
        self.say(f"{cell}, seed {seed}: resuming the unfinished run …" if resume else f"{cell}, seed {seed} …")
        if not resume:  # a folder of another key, or one with nothing to resume from: nothing of it may be read
            shutil.rmtree(run_dir, ignore_errors=True)
            write_atomic(run_dir / RUN_KEY_FILE, key)
        earlier = earlier_attempts_seconds(run_dir) if resume else 0.0
        write_atomic(run_dir / ATTEMPT_FILE, json.dumps({"started": time.time(), "seconds_before": earlier}))
        started = time.perf_counter()
        cuda = self._reset_peak_memory()
        try:
            if self.config.kind == "in-domain":
                result = self.in_domain(variant, domain, seed, run_dir, resume)
            else:
                result = self.continual(variant, seed, run_dir, resume)
        except NonFiniteError as err:  # the run's own end, not an interruption: a rerun starts it again, never past it
            (run_dir / RUN_KEY_FILE).unlink(missing_ok=True)
            raise NonFiniteError(f"{cell}, seed {seed}: {err.what}. Set a lower lr (or dtype: float32) for this "
                                 "variant in the experiment's file: a rerun of the same file starts this run again "
                                 "and stops the same way.", err.what) from None
        except RunInterrupted as err:  # the trainer's advice (--resume) is another command's: say what a rerun does
            raise RunInterrupted(err.signum, f"{cell}, seed {seed}: run the same command again: "
                                             f"{self.rerun_does(run_dir, key, domain)}.") from err
        except JudgeError as err:  # the same (the judge may fail before the first checkpoint: then it starts again)
            raise JudgeError(f"{cell}, seed {seed}: {err.what}. Fix the judge, then run the same command again: "
                             f"{self.rerun_does(run_dir, key, domain)}.", err.what) from err
        result.update(wall_seconds=earlier + time.perf_counter() - started, run_key=key, **self._peak_memory(cuda),
                      **({"resumed": True} if resume else {}))
        write_json(run_dir / "result.json", result)  # first: a kill during the clean-up below loses nothing
        drop_resume_state(run_dir)
        self.say(f"{cell}, seed {seed}: done in {result['wall_seconds']:.0f} s")
        return result

    def rerun_does(self, run_dir: Path, key: str, domain: str | None) -> str:
        """What a rerun of the same command does with a run that stopped, read from disk as the rerun will."""
        if self.unfinished(run_dir, key, domain):
            return f"it resumes this run ({resumes_from(run_dir, self.config.kind).replace('resumes from', 'from')})"
        return "it starts this run again (it stopped before its first checkpoint)"

    def run_dir(self, cell: str, seed: int) -> Path:
        return self.out / "runs" / cell / f"seed-{seed}"

    def next_step(self, run_dir: Path, key: str, domain: str | None) -> tuple[str, Any]:
        """What a call does next with the run of `key` in `run_dir`, read from disk (nothing written), in the order
        `cell_result` acts: ("finished", its result), ("running", who holds it: another call), ("reuse", a finished
        twin's result.json in another experiment), ("resume", None) or ("start", None)."""
        result = finished_result(run_dir, key)
        if result is not None:
            return "finished", result
        holder = next((h for d in (cell_lock(run_dir), run_dir) if d.is_dir() and (h := lock_holder(d)) is not None),
                      None)
        if holder is not None:
            return "running", holder
        twin = self.find_run(key) if self.reuse_twins else None
        if twin is not None:
            return "reuse", twin
        return ("resume" if self.unfinished(run_dir, key, domain) else "start"), None

    def status(self) -> list[dict]:
        """Where each run (cell, seed) stands, read from disk without loading the model or sampling anything, as
        `next_step` says a rerun would act: `finished` (or reused from another experiment), `running` (another call
        holds it), `unfinished` (and what it resumes from), `to run` (and a twin it will reuse), or `damaged` (its
        result.json cannot be read)."""
        cfg, rows = self.config, []
        for seed in cfg.seeds:
            for cell, variant, domain in cfg.cells():
                run_dir, row = self.run_dir(cell, seed), {"cell": cell, "seed": seed}
                missing = [d for d in ([domain] if domain else cfg.domains) if not self.sampled(self.source(d))]
                if missing:
                    rows.append({**row, "state": "to run", "detail": f"pairs of {', '.join(missing)} not sampled yet"})
                    continue
                try:
                    step, found = self.next_step(run_dir, self.run_key(variant, domain, seed), domain)
                except ConfigError as err:  # a damaged result.json: shown, not the end of the listing
                    rows.append({**row, "state": "damaged", "detail": str(err)})
                    continue
                if step == "finished":
                    resumed = ", resumed" if found.get("resumed") else ""
                    where = (f"reused from {found['reused_from']}" if found.get("reused_from") else
                             f"{found.get('wall_seconds', 0) / 60:.1f} min{resumed}")
                    rows.append({**row, "state": "finished", "detail": where})
                elif step == "running":
                    detail = resumes_from(run_dir, cfg.kind).replace("resumes from", "last checkpoint at")
                    rows.append({**row, "state": "running", "detail": detail})
                elif step == "resume":
                    rows.append({**row, "state": "unfinished", "detail": resumes_from(run_dir, cfg.kind)})
                else:
                    rows.append({**row, "state": "to run", "detail": f"will reuse {found}" if found else ""})
        return rows

    def sampled(self, domain: str) -> bool:
        """Whether the domain's pairs are on disk (the user's file, or sampled earlier into data_dir)."""
        cfg = self.config
        if cfg.data is not None or cfg.data_files:
            return Path(cfg.data_files.get(domain) or cfg.data).is_file()
        return self.pairs_path(domain).is_file()

    def pairs_path(self, domain: str) -> Path:
        """Where a built-in domain's pairs sampled from the base are kept (`data_dir`)."""
        cfg = self.config
        several = f"-m{cfg.pairs_per_prompt}" if cfg.pairs_per_prompt > 1 else ""
        return Path(cfg.data_dir) / f"{domain}-p{cfg.prompts}-k{cfg.samples}{several}-seed{cfg.pair_seed}.jsonl"

    def unfinished(self, run_dir: Path, key: str, domain: str | None) -> bool:
        """Whether `run_dir` holds an unfinished run of this key that can be resumed: started under the key, and
        (in-domain) with a checkpoint, and the ladder's points where the run has a ladder (judged checkpoints on a
        domain with a judge), or (continual) with its config written."""
        marker = run_dir / RUN_KEY_FILE
        if not marker.is_file() or marker.read_text(encoding="utf-8").strip() != key:
            return False
        if self.config.kind == "continual":
            return (run_dir / "config.yaml").is_file()
        return bool(list_checkpoints(run_dir / "checkpoints")) and (not self.has_ladder(domain)
                                                                      or (run_dir / LADDER_FILE).is_file())

    def has_ladder(self, domain: str | None) -> bool:
        """Whether an in-domain run judges its checkpoints (`CheckpointLadder`): the file lists some, and the
        domain has a judge."""
        return bool(self.config.checkpoints) and self.domain(domain) is not None

    @staticmethod
    def _reset_peak_memory() -> bool:
        """Start counting a run's peak accelerator memory (CUDA: per run); returns whether there is CUDA."""

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return True
        return False

    @staticmethod
    def _peak_memory(cuda: bool) -> dict:
        """The run's peak memory: CUDA's peak allocation during the run; on the CPU the process's peak resident
        memory so far (the OS keeps one high-water mark per process, so a later run reports at least an earlier
        one's)."""


        out = {"peak_process_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if cuda:
            out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    def run_key(self, variant: dict, domain: str | None, seed: int) -> str:
        """A hash of everything a run's result depends on: its resolved config (paths aside), the pairs' bytes and
        the judging set-up. Equal keys mean the same computation."""
        cfg = self.config
        domains = [domain] if domain else cfg.domains
        run = key_options(cfg.run_config(variant, seed, "", [f"{d}=pairs" for d in domains]).to_dict(), cfg.kind)
        pairs = [hashlib.sha256(self.pairs(self.source(d)).read_bytes()).hexdigest() for d in domains]
        if cfg.data is not None or cfg.data_files:  # the user's pairs, split by prompt (judged: their prompts, judge)
            pairs.append([cfg.selection, cfg.report_size, cfg.heldout_prompts, cfg.judge])
        ingredients = {"kind": cfg.kind, "run": run, "domains": domains, "pairs": pairs, "pair_seed": cfg.pair_seed,
                       "judge_prompts": cfg.judge_prompts, "protocol": [2, cfg.selection, cfg.report_rounds,
                                                                         cfg.judge_samples]}
        if cfg.pairs_per_prompt > 1 or cfg.checkpoints:  # absent otherwise: the keys of earlier runs stay valid
            ingredients.update(pairs_per_prompt=cfg.pairs_per_prompt, checkpoints=cfg.checkpoints)
        return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def source(self, domain: str) -> str:
        """Whose pairs a domain of the file trains on: its own, or a revisit's (`sentiment.2`) built-in domain's."""
        return builtin_name(domain) if self.config.builtin_domains else domain

    def find_run(self, key: str) -> Path | None:
        """A finished run with this key under any experiment beside this one."""
        for path in sorted(self.out.parent.glob("*/runs/**/result.json")):
            try:
                found = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # another experiment's damaged file: not this run's twin
                continue
            if isinstance(found, dict) and found.get("run_key") == key:
                return path
        return None

    # --- shared inputs -----------------------------------------------------------------------------------------------
    def model(self):
        if self._base is None:

            cfg = self.config
            self._base, self._tokenizer, self._model_name, _ = load_model_and_tokenizer(
                cfg.model, cfg.gguf_file, "auto", resolve_device(cfg.device))
        return self._base, self._tokenizer

    def pairs(self, domain: str) -> Path:
        """The domain's pairs sampled from the base (cached across seeds, variants and experiments); the user's
        file for an experiment over their data (`config.data`)."""
        if domain in self._pairs:
            return self._pairs[domain]
        cfg = self.config
        if cfg.data is not None or cfg.data_files:
            self._pairs[domain] = Path(cfg.data_files.get(domain) or cfg.data)
            return self._pairs[domain]
        path = self.pairs_path(domain)
        info_path = path.with_suffix(".info.json")
        if not path.is_file():
            info = self._sample_pairs(domain, path)
            write_json(info_path, info)
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info["model"] != [cfg.model, cfg.gguf_file]:
            raise ConfigError(f"{path} was sampled from model {info['model']}, not {[cfg.model, cfg.gguf_file]}: "
                              "give this experiment another data_dir.")
        need = cfg.selection + cfg.steps * cfg.batch_size
        if info["pairs"] < need:
            raise ConfigError(f"'{domain}' gave {info['pairs']} pairs ({info['ties']} ties) from {cfg.prompts} "
                              f"prompts; this experiment needs at least {need} (selection + steps x batch_size): "
                              "raise prompts, or lower steps or selection.")
        self._pairs[domain] = path
        return path

    def _sample_pairs(self, domain_name: str, path: Path, split: str = "train", rounds: int = 1) -> dict:


        cfg, (base, tokenizer) = self.config, self.model()
        domain = get_domain(domain_name)
        records = domain.prompts(split)[:cfg.prompts] if split == "train" else domain.prompts(split)
        started, pairs, ties = time.perf_counter(), [], 0
        for r in range(rounds):  # a round: every prompt once; rounds differ by their seed only
            seed = cfg.pair_seed + (0 if split == "train" else 1000 + r)
            self.say(f"sampling {len(records)} x {cfg.samples} responses on '{domain_name}' {split} prompts "
                     f"(seed {seed}) …")
            set_seed(seed)  # per domain: a domain's pairs do not depend on which others were sampled first
            with torch.inference_mode():
                settings = RoundSettings(samples_per_prompt=cfg.samples, batch_size=16 * cfg.samples,
                                         pairs_per_prompt=cfg.pairs_per_prompt if split == "train" else 1)
                made, stats = judged_pairs(base, tokenizer, domain, records, settings, progress=self.progress)
            pairs, ties = pairs + made, ties + stats.ties
        write_jsonl(path, pairs)  # atomic: never a half-written file under the final name
        return {"domain": domain_name, "split": split, "prompts": len(records), "samples": cfg.samples,
                "rounds": rounds, "pairs": len(pairs), "ties": ties, "seed": cfg.pair_seed,
                "model": [cfg.model, cfg.gguf_file], "seconds": time.perf_counter() - started}

    def report_pairs(self, domain: str) -> Path:
        """The report set: pairs sampled on the domain's held-out prompts (cached like the training pairs)."""
        key = f"report-{domain}"
        if key not in self._pairs:
            cfg = self.config
            name = f"{domain}-heldout-k{cfg.samples}-r{cfg.report_rounds}-seed{cfg.pair_seed}.jsonl"
            path = Path(cfg.data_dir) / name
            if not path.is_file():
                write_json(path.with_suffix(".info.json"), self._sample_pairs(domain, path, "heldout",
                                                                               cfg.report_rounds))
            self._pairs[key] = path
        return self._pairs[key]

    def split(self, domain: str) -> dict[str, list[dict]]:
        """The domain's three disjoint sets (see the module docstring), as rows, and where they came from: pair
        indices count the training prompts' pairs first, then the report pairs. Read once per domain: every run
        of the process uses the same sets."""
        if domain not in self._splits:
            self._splits[domain] = self._read_split(domain)
        return self._splits[domain]

    def _read_split(self, domain: str) -> dict[str, list[dict]]:

        cfg = self.config
        if cfg.data is not None or cfg.data_files:
            return split_by_prompt(str(self.pairs(domain)), cfg.selection, cfg.report_size,
                                   cfg.steps * cfg.batch_size)
        rows = [row for _, row in read_rows(str(self.pairs(domain)), "train")[1]]
        report = [row for _, row in read_rows(str(self.report_pairs(domain)), "train")[1]]
        stream, n = cfg.steps * cfg.batch_size, len(rows)
        if cfg.pairs_per_prompt > 1:
            train, selection = self._split_by_prompt(domain, rows, stream)
        else:
            train, selection = list(range(stream)), list(range(n - cfg.selection, n))
        return {"train": [rows[i] for i in train], "selection": [rows[i] for i in selection], "report": report,
                "indices": {"train": train, "selection": selection, "report": list(range(n, n + len(report)))}}

    def _split_by_prompt(self, domain: str, rows: list[dict], stream: int) -> tuple[list[int], list[int]]:
        """Several pairs per prompt: the selection set is the first (best vs worst) pair of each of the last
        `selection` prompts, the stream `stream` pairs of the other prompts in an order shuffled by `pair_seed`
        (a batch mixes prompts and pair ranks), each pair once."""

        cfg, prompts = self.config, list(dict.fromkeys(str(r["prompt"]) for r in rows))  # in file order
        held = set(prompts[-cfg.selection:])
        selection = [next(i for i, r in enumerate(rows) if str(r["prompt"]) == p) for p in prompts[-cfg.selection:]]
        train = [i for i, r in enumerate(rows) if str(r["prompt"]) not in held]
        random.Random(cfg.pair_seed).shuffle(train)
        if len(prompts) <= cfg.selection or len(train) < stream:
            raise ConfigError(f"'{domain}' gave {len(rows)} pairs on {len(prompts)} prompts; this experiment needs "
                              f"{cfg.selection} prompts for selection and {stream} pairs (steps x batch_size) on "
                              "the others: raise prompts, samples or pairs_per_prompt, or lower steps.")
        return train[:stream], selection

    def split_files(self, domain: str) -> dict[str, Path]:
        """The sets as files (continual domains read files): written once beside the cached pairs; the user's
        pairs' sets under the output folder (split/)."""
        parts = self.split(domain)
        if self.config.data_files:
            return {name: write_jsonl(self.out / "split" / f"{domain}-{name}.jsonl", parts[name])
                    for name in ("train", "selection", "report")}
        stem = self.pairs(domain).with_suffix("")
        files = {}
        for name in ("train", "selection"):
            files[name] = Path(f"{stem}-{name}-s{self.config.selection}-n{self.config.steps * self.config.batch_size}"
                               ".jsonl")
            if not files[name].is_file():
                write_jsonl(files[name], parts[name])
        files["report"] = self.report_pairs(domain)
        return files

    def report_data(self, domain: str):
        """The report pairs tokenized, with their reference log-probs cached once for every seed and variant."""

        if domain not in self._report:
            cfg, (_, tokenizer) = self.config, self.model()
            data = load_preference_data(self.split(domain)["report"], tokenizer, cfg.max_length,
                                        cfg.max_prompt_length)
            self._report[domain] = (data, ReferenceCache(len(data)))
        return self._report[domain]

    def stream_references(self, domain: str, parts: dict, run_config) -> dict:
        """π_ref's log-probs of the domain's training stream and selection set (`parts`, from `split`), filled by the
        first run over them and read by every later one (as the report set's are): the reference never changes."""

        key = ("in-domain", domain, run_config.max_length, run_config.max_prompt_length,
               run_config.max_completion_length)  # the pairs tokenized alike
        if key not in self._reference_logps:
            self._reference_logps[key] = {name: ReferenceCache(len(parts[name])) for name in ("train", "selection")}
        return self._reference_logps[key]

    def domain(self, name: str):
        """The domain judged samples come from: a built-in one, or for the user's data (`config.data`) their
        held-out prompts and judge (`config.heldout_prompts`, `config.judge`), None without them (no judging)."""

        cfg = self.config
        if cfg.data is None:
            return get_domain(name)
        if not cfg.heldout_prompts:
            return None
        if name not in self._domains:
            mine = prompt_domain(cfg.heldout_prompts, cfg.judge or None, name=name, split=None)
            mine.heldout, mine.records = mine.records, []  # every prompt held out: judged, never trained on
            self._domains[name] = mine
        return self._domains[name]

    def reference_scores(self, domain_name: str, seed: int) -> tuple[list[dict], list[float]]:
        """The judged held-out prompts and the reference's scores on them, drawn under the run's seed (common
        random numbers: every variant of this seed samples with the same draws), once per (domain, seed)."""

        cfg, domain = self.config, self.domain(domain_name)
        if domain is None:
            return [], []
        records = domain.prompts("heldout")[:cfg.judge_prompts]
        scores = self._reference_scores.setdefault(seed, {})
        if domain_name not in scores:
            base, tokenizer = self.model()
            with common_random_numbers(seed, next(base.parameters()).device):
                scores[domain_name] = reference_samples(base, tokenizer, domain, records,
                                                        samples_per_prompt=cfg.judge_samples)
        return records, scores[domain_name]

    # --- one run -----------------------------------------------------------------------------------------------------
    def in_domain(self, variant: dict, domain_name: str, seed: int, run_dir: Path, resume: bool = False) -> dict:

        cfg, parts, domain = self.config, self.split(domain_name), self.domain(domain_name)
        records, ref_scores = self.reference_scores(domain_name, seed)
        report, report_reference = self.report_data(domain_name)
        base, tokenizer = self.model()
        run_config = cfg.run_config(variant, seed, run_dir, [], progress=self.progress, save_steps=RESUME_EVERY,
                                    resume=resume)
        on_policy = run_config.on_policy is not None  # then the stream is sampled from the policy, round by round
        caches = self.stream_references(domain_name, parts, run_config)
        trainer = OFSDPOTrainer(base, run_config, train_data=None if on_policy else parts["train"],
                                tokenizer=tokenizer, eval_data=parts["selection"],  # selection: the served module
                                # a cut stream is scored by its own run: the trainer cannot check a cache's cut
                                train_reference=None if on_policy or run_config.max_completion_length else
                                caches["train"],
                                eval_reference=caches["selection"])
        ladder = (CheckpointLadder(cfg.checkpoints, domain, records, ref_scores, report, report_reference, seed,
                                   cfg.judge_samples, run_dir / LADDER_FILE, resume)
                  if self.has_ladder(domain_name) else None)
        result = trainer.train(on_step=ladder)
        summary, served, model = result.summary, result.served_module, trainer.model
        # the report pairs, and the held-out prompts judged with the reference's draws (the user's data without
        # prompts and a judge: the pair metrics only)
        judged, = evaluate(model, tokenizer, served, [EvalSet(domain_name, report, report_reference, domain, records)],
                           EvalOptions.of_run(run_config, judge_samples=cfg.judge_samples), {domain_name: ref_scores},
                           trained=result.modules, per_pair=True)
        losses, correct = judged["per_pair"]["loss"], judged["per_pair"]["correct"]
        model.unload()  # the same base object, LoRA layers removed, for the next run
        regret = [json.loads(line) for line in (run_dir / "regret.jsonl").read_text().splitlines() if line.strip()]
        return {"domain": domain_name, "method": run_config.method, "served_module": served, "steps": summary["steps"],
                "judge_score": judged.get("judge_score"), "win_rate": judged.get("win_rate"), "kl": judged.get("kl"),
                "kl_estimator": KL_ESTIMATOR, "response_words": judged.get("response_words"),
                "base_judge_score": judged.get("reference_judge_score"),
                "judged_samples": judged.get("judged_samples", 0), "report_loss": judged["loss"],
                "report_accuracy": judged["accuracy"], "report_pairs": len(report),
                "selection_loss": summary["module_scores"].get(served), "online_regret": summary["online_regret"],
                "swaps": summary.get("chase/swaps", 0), "pairs_seen": summary["pairs_seen"],
                "online_loss_curve": [r[served] for r in result.online_losses],
                "online_loss_total": sum(r[served] for r in result.online_losses),
                "independent_judge_score": judged.get("independent_judge_score"),
                **({"frontier": ladder.points, "train_loss_curve": ladder.train_loss} if ladder else {}),
                "regret_curve": [r["regret"] for r in regret], "train_seconds": summary["train_runtime"],
                "units": {"report_loss": losses, "report_accuracy": correct, **judged.get("per_prompt", {})},
                "sets": {**parts["indices"], "train": [] if on_policy else parts["indices"]["train"]},
                **({"on_policy": summary["on_policy"]} if on_policy else {})}

    def continual(self, variant: dict, seed: int, run_dir: Path, resume: bool = False) -> dict:

        cfg = self.config
        # the report pairs are the held-out file: reported; a revisit (`sentiment.2`) reads its domain's files again
        files = {d: self.split_files(self.source(d)) for d in cfg.domains}
        specs = [f"{d}={f['train']},heldout={f['report']},memory={f['selection']}" for d, f in files.items()]
        base, tokenizer = self.model()
        run_config = cfg.run_config(variant, seed, run_dir, specs, progress=self.progress, save_steps=RESUME_EVERY,
                                    resume=resume)
        if resume:  # the run key vouches for the pairs' bytes; their files may have moved since (data_dir, the
            adopt_domain_paths(run_dir / "config.yaml", run_config)  # output folder): the runner checks the rest
        # the first variant of this seed draws the reference's samples (in the calls the runner judges its served
        # modules with: every domain in one, or one each under score_domains seen); the other variants of the seed
        # share them: the same draws for every variant
        shared = self._reference_scores.setdefault((seed, run_config.score_domains), {})
        self._shared = {seed: self._shared.get(seed) or SharedWork()}  # seeds run one after another: one kept
        runner = ContinualRunner(run_config, model=base, tokenizer=tokenizer, reference_scores=shared,
                                 shared=self._shared[seed], reference_caches=self._reference_logps)
        report = runner.run()
        names, matrix = report["domains"], report["matrix"]
        judged = "judge_score" in matrix  # the user's pairs files (ofsdpo compare --domain): pair metrics only
        forgetting = report.get("cl/forgetting_judge", {})
        curve = continual_loss_curve(run_dir, names)
        return {"method": report["method"], "domains": names, "judge_matrix": matrix.get("judge_score"),
                "kl_estimator": KL_ESTIMATOR,
                "kl_matrix": matrix.get("kl"), "win_rate_matrix": matrix.get("win_rate"),
                "accuracy_matrix": matrix["accuracy"], "loss_matrix": matrix["loss"],
                "final_judge": dict(zip(names, matrix["judge_score"][-1])) if judged else {},
                "avg_final_judge": report.get("cl/avg_judge_score"), "forgetting_judge": forgetting,
                "avg_forgetting_judge": sum(forgetting.values()) / len(forgetting) if forgetting else None,
                "avg_final_kl": sum(matrix["kl"][-1]) / len(names) if judged else None,
                "avg_final_accuracy": report["cl/avg_accuracy"], "forgetting_accuracy": report["cl/forgetting"],
                "bwt_accuracy": report["cl/bwt"], "lambdas": report["lambdas"][1:],
                "avg_final_loss": report["cl/avg_loss"], "final_loss": dict(zip(names, matrix["loss"][-1])),
                "forgetting_loss": report["cl/forgetting_loss"], "base_report_loss": base_report_loss(run_config),
                "weights": [stage.get("weights") for stage in report["stages"]],
                "searches": [stage.get("search") for stage in report["stages"][1:]],
                "base_judge_score": report.get("base_judge_score", {}), "train_loss_curve": curve,
                "units": {name: report["units"][key] for name, key in CONTINUAL_UNITS.items()
                          if key in report["units"]}}


def base_report_loss(config: ContinualConfig) -> float:
    """The report DPO loss of the base model itself: it is its own reference, so every pair's margin is 0 (log 2
    under plain DPO). The zero of the `multitask` gap's share kept (`experiment_report.multitask_gap`)."""
    training = config.training
    return float(preference_loss(torch.zeros(1, dtype=torch.float64), training.beta, training.loss_type,
                                 training.label_smoothing))


def split_by_prompt(data: str, selection: int, report_size: int, stream: int) -> dict:
    """A user's pairs file as the three sets of the protocol, disjoint by prompt, in file order: the report set is
    the pairs of the last prompts (whole prompts, until at least `report_size` pairs), the selection set those of
    the prompts before (until at least `selection`), the stream the first `stream` pairs of the rest (every one,
    for `stream` < 0). A clear error, naming the counts, where the file is too small."""

    name, rows = read_rows(data, "train")
    rows = [row for _, row in rows]
    keys = []
    for number, row in enumerate(rows, start=1):
        checked = check_row(row, name, number)
        keys.append(json.dumps(checked[0] if checked else row.get("prompt"), sort_keys=True, default=str))
    prompts = list(dict.fromkeys(keys))
    sets: dict[str, list[int]] = {"report": [], "selection": []}
    taken = len(prompts)
    for part, need in (("report", report_size), ("selection", selection)):
        while len(sets[part]) < need and taken > 1:
            taken -= 1
            sets[part] += [i for i, k in enumerate(keys) if k == prompts[taken]]
    held = set(prompts[taken:])
    train = [i for i, k in enumerate(keys) if k not in held]
    if len(sets["report"]) < report_size or len(sets["selection"]) < selection or not train or len(train) < stream:
        raise ConfigError(
            f"{name}: {len(rows)} pairs on {len(prompts)} prompts is too few for a report set of at least "
            f"{report_size} pairs, a selection set of {selection} and a training stream of "
            f"{max(stream, 1)} (got {len(sets['report'])}, {len(sets['selection'])} and {len(train)}): lower "
            "--report-size / --selection-size / --max-steps, or add pairs.")
    train = train if stream < 0 else train[:stream]
    return {"train": [rows[i] for i in train], "selection": [rows[i] for i in sets["selection"]],
            "report": [rows[i] for i in sets["report"]],
            "indices": {"train": train, "selection": sets["selection"], "report": sets["report"]}}


class CheckpointLadder:
    """`OFSDPOTrainer.train(on_step=...)`: at each of `steps`, every trained module (dpo's one; ofs-dpo's fast and
    slow) is judged on the held-out prompts with the reference's random numbers (judge score, win rate, exact KL,
    the independent judge where the domain has one) and scored on the report pairs and the selection pairs; the
    module with the lower selection loss is the one served there. The global RNG is left as it was, so the
    training that follows is the training without the ladder.

    What it has so far is written to `path` after every step; a resumed run (`resume`) reads it back and keeps what
    came before the checkpoint it resumes from (its first call tells which step that was)."""

    def __init__(self, steps: list[int], domain, records: list[dict], ref_scores: list[float], report, report_reference,
                 seed: int, samples_per_prompt: int, path: Path | None = None, resume: bool = False):
        self.steps, self.domain, self.records, self.ref_scores = set(steps), domain, records, ref_scores
        self.report, self.report_reference, self.seed, self.samples = report, report_reference, seed, samples_per_prompt
        self.path, self._resumed = path, resume
        saved = (read_json(path, "remove the run's folder to start it again.") if resume and path is not None
                 else {})
        self.points: list[dict] = saved.get("points", [])
        self.train_loss: dict[str, list[float]] = saved.get("train_loss", {})  # each module's, step by step

    def __call__(self, trainer, row: dict) -> dict | None:

        step = trainer.state.step
        if self._resumed:  # the first step after the checkpoint: what the ladder saved after it is redone
            self._resumed = False
            self.points = [p for p in self.points if p["step"] < step]
            self.train_loss = {name: losses[:step - 1] for name, losses in self.train_loss.items()}
        for name in trainer.names:
            self.train_loss.setdefault(name, []).append(row.get(trainer.method.key(name, "loss")))
        if step not in self.steps:
            self._save()
            return None
        tick, model, modules = time.perf_counter(), trainer.model, {}
        options = EvalOptions.of_run(trainer.config, seed=self.seed, judge_samples=self.samples)
        held_out = EvalSet(self.domain.name, self.report, self.report_reference, self.domain, self.records)
        for name in trainer.names:  # the report pairs and the judged prompts as the run's end scores them
            judged, = evaluate(model, trainer.tokenizer, name, [held_out], options, {self.domain.name: self.ref_scores},
                               trained=trainer.names)
            selection = (trainer.scorer.mean_losses(trainer.eval, trainer.eval_reference,
                                                    list(range(len(trainer.eval))), [name])[name]
                         if trainer.eval is not None else None)
            modules[name] = {"judge_score": judged["judge_score"], "win_rate": judged["win_rate"], "kl": judged["kl"],
                             "independent_judge_score": judged.get("independent_judge_score"),
                             "response_words": judged["response_words"], "report_loss": judged["loss"],
                             "selection_loss": selection, "per_prompt": judged["per_prompt"]}
        trainer.model.train()
        scored = [n for n in trainer.names if modules[n]["selection_loss"] is not None]
        served = min(scored, key=lambda n: modules[n]["selection_loss"]) if scored else trainer.names[0]
        since = self.points[-1]["step"] if self.points else 0
        for name in trainer.names:  # the training loss over the steps since the last checkpoint
            recent = [x for x in self.train_loss[name][since:] if x is not None]
            modules[name]["train_loss"] = sum(recent) / len(recent) if recent else None
        self.points.append({"step": step, "pairs_seen": trainer.state.position, "modules": modules, "served": served,
                            "seconds": time.perf_counter() - tick})
        self._save()
        return {f"ladder/{n}/{k}": modules[n][k] for n in modules for k in ("judge_score", "kl", "report_loss")}

    def _save(self) -> None:
        if self.path is not None:
            write_atomic(self.path, json.dumps({"points": self.points, "train_loss": self.train_loss}))


def adopt_domain_paths(saved_path: Path, config: ContinualConfig) -> None:
    """Before a continual run resumes: the domains its saved config lists (`NAME=TRAIN,heldout=…,memory=…`) written
    as they are now, where only their files' paths differ, so that the runner's --resume check (every computed
    option the same) does not refuse a run whose pairs moved with their folder. Moved means: the same domains and
    parts, each changed file of the same name, and of the same bytes where the old one is still there (the report
    pairs are not in the run key); anything else is left for the runner to refuse."""
    saved = read_config_file(saved_path, ContinualConfig)
    before, now = saved.get("domain") or [], list(config.domain)

    def parts(spec: str) -> list[list[str]]:  # [[name, train file], [heldout, file], [memory, file]]
        return [part.split("=", 1) for part in spec.split(",")]

    def moved(old: list[str], new: list[str]) -> bool:
        was, is_now = Path(old[-1]), Path(new[-1])
        return (old[0] == new[0] and was.name == is_now.name and is_now.is_file()
                and (not was.is_file() or filecmp.cmp(was, is_now, shallow=False)))

    pairs = [(a, b) for old, new in zip(before, now) for a, b in zip(parts(old), parts(new))]
    if (before != now and len(before) == len(now) and all(len(parts(a)) == len(parts(b)) for a, b in zip(before, now))
            and all(a == b or moved(a, b) for a, b in pairs)):
        write_atomic(saved_path, yaml.safe_dump({**saved, "domain": now}, sort_keys=False))


def drop_resume_state(run_dir: Path) -> None:
    """What a finished run no longer needs: its checkpoints (the optimiser's moments), the ladder's points (in the
    result now) and its attempts' times."""
    for checkpoints in run_dir.rglob("checkpoints"):
        shutil.rmtree(checkpoints, ignore_errors=True)
    for done_with in (LADDER_FILE, ATTEMPT_FILE):
        (run_dir / done_with).unlink(missing_ok=True)


def cell_lock(run_dir: Path) -> Path:
    """The folder whose lock a call holds while it runs the run in `run_dir` (beside it, not in it)."""
    return run_dir.with_name(f".{run_dir.name}.lock")


def finished_result(run_dir: Path, key: str) -> dict | None:
    """The result a run saved in `run_dir` when it finished, if it ran under `key` (the experiment's file may have
    changed the run since: then it runs again)."""
    done = run_dir / "result.json"
    if not done.is_file():
        return None
    result = read_json(done, f"remove {run_dir} to run it again.")
    return result if result.get("run_key") == key else None


def resumes_from(run_dir: Path, kind: str) -> str:
    """What an unfinished run resumes from, in words: its newest checkpoint's step (in-domain), or its finished
    stages and the interrupted stage's newest checkpoint (continual)."""
    def newest(folder: Path) -> str:
        found = list_checkpoints(folder / "checkpoints")
        return f"step {found[-1].name.removeprefix('checkpoint-')}" if found else "its start"

    if kind != "continual":
        return f"resumes from {newest(run_dir)}"
    stages = sorted(p for p in (run_dir / "domains").glob("*") if p.is_dir())
    finished = [p for p in stages if stage_finished(p)]
    current = next((p for p in stages if p not in finished), None)
    return (f"{len(finished)} stage(s) finished" +
            (f"; {current.name} resumes from {newest(current)}" if current is not None else ""))


def earlier_attempts_seconds(run_dir: Path) -> float:
    """The wall time of a run's earlier attempts (`ATTEMPT_FILE`): the last one counted from its start to the newest
    progress it saved (a checkpoint, a finished stage), after which its work is done again."""
    try:
        attempt = json.loads((run_dir / ATTEMPT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0.0  # started before attempts were kept: its earlier time is unknown
    # whole checkpoints only (a `.tmp-` one being written is not progress: the resume redoes its steps)
    progress = [c / "trainer_state.json" for root in run_dir.rglob("checkpoints") for c in list_checkpoints(root)]
    progress += run_dir.glob(f"**/{STAGE_FOLDER}/{STAGE_RECORD}")
    saved = [p.stat().st_mtime for p in progress if p.is_file()]
    return attempt["seconds_before"] + max([t - attempt["started"] for t in saved] + [0.0])


# --- the command ----------------------------------------------------------------------------------------------------
# what `ExperimentRunner` writes into its folder, besides the plots `<name>-*.png` (`experiment_report`); the sampled
# pairs live in the experiment's data_dir, shared with other experiments, and stay
EXPERIMENT_OUTPUTS = ("runs", "split", "aggregate.json", "aggregate.md")


def clear_experiment(out: Path, name: str) -> None:
    """`ofsdpo experiment --overwrite`: everything an earlier call wrote into `out` removed (a file of the user's
    stays), or one line naming what cannot go; refused while a run of another call still trains there (its lock)."""
    for lock in sorted(out.glob(f"runs/**/{LOCK_NAME}")):
        refuse_if_locked(lock.parent)
    remove_outputs([out / part for part in EXPERIMENT_OUTPUTS] + sorted(out.glob(f"{name}-*.png")))


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers (got {text!r}).") from None


def select_variants(config: ExperimentConfig, text: str | None) -> list[dict]:
    """The file's variants named in `text` (comma-separated), in that order; all of them without it."""
    if not text:
        return config.variants
    by_name = {v["name"]: v for v in config.variants}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(f"--variants: expected distinct names among {', '.join(by_name)} (got {text!r}).")
    return [by_name[n] for n in names]


def format_status(rows: list[dict]) -> str:
    """`ofsdpo experiment --status`: one line a run, then the counts."""
    width = max([len(r["cell"]) for r in rows] + [4])
    lines = [f"{'cell':<{width}}  seed  {'state':<10}  detail"]
    lines += [f"{r['cell']:<{width}}  {r['seed']:>4}  {r['state']:<10}  {r['detail']}".rstrip() for r in rows]
    counts = {state: sum(r["state"] == state for r in rows) for state in ("finished", "running", "unfinished",
                                                                          "to run")}
    damaged = sum(r["state"] == "damaged" for r in rows)
    lines.append(f"{counts['finished']} of {len(rows)} runs finished, {counts['running']} running, "
                 f"{counts['unfinished']} unfinished (a rerun resumes them), {counts['to run']} to run"
                 + (f", {damaged} damaged (a rerun stops on them: remove their folders)." if damaged else "."))
    return "\n".join(lines) + "\n"


def run_experiment(config_path: str, seeds: str | None = None, output_dir: str | None = None,
                   progress: bool = True, variants: str | None = None, overwrite: bool = False,
                   status: bool = False) -> dict:
    config = ExperimentConfig.from_yaml(config_path)
    config.seeds = parse_seeds(seeds) or config.seeds
    config.variants = select_variants(config, variants)
    out = Path(output_dir or Path("experiments-output") / config.name)
    if status:  # nothing runs, nothing loads
        rows = ExperimentRunner(config, out, progress).status()
        print(format_status(rows), end="")
        return {"status": rows}
    if overwrite:
        clear_experiment(out, config.name)
    # progress lines are printed either way
    summary = ExperimentRunner(config, out, progress, reuse_twins=not overwrite).run()
    print((out / "aggregate.md").read_text(encoding="utf-8"))
    return summary
