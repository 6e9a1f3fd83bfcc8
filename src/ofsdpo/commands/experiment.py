"""`ofsdpo experiment CONFIG`: one experiment of `experiments/*.yaml`, repeated over seeds, then aggregated.

An experiment is a list of *variants* (a method plus any fields of the run's config) run on built-in domains:

- `kind: in-domain`: each variant trains (`ofsdpo train`: dpo or ofs-dpo) on each domain's stream on its own; at
  the end the served module is scored (`commands.eval.evaluate_adapter`: held-out DPO loss and accuracy, judge score,
  win rate, KL, length); the online learning curve and the online-regret curve come from the trainer.
- `kind: continual`: each variant runs `ofsdpo continual` over the domains in order (the demo's pipeline): the
  stage × domain judge-score matrix, the average final score and the forgetting.

Each domain's pairs are sampled from the base model ONCE (seed `pair_seed`) and cached in `data_dir`, so every seed,
variant and experiment trains on the same stream: the seeds vary the LoRA initialisation, dropout and the judged
samples, not the data. Reference samples (the other side of every win rate) are also drawn once per domain.

Output: `runs/<cell>/seed-<s>/` (the run and its `result.json`; a finished cell is kept and skipped on rerun),
`aggregate.json` (mean, sample standard deviation and values over seeds of every number, by cell), `aggregate.md`
(the tables) and plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from ..config import EXPERIMENT_KINDS as KINDS
from ..config import IN_DOMAIN_METHODS, ConfigError, ExperimentConfig
from ..files import write_json, write_jsonl
from .experiment_report import aggregate, fmt, mean_std, write_aggregate

__all__ = ["IN_DOMAIN_METHODS", "KINDS", "ExperimentConfig", "ExperimentRunner", "aggregate", "fmt", "mean_std",
           "parse_seeds", "run_experiment", "write_aggregate"]


# --- run keys -------------------------------------------------------------------------------------------------------
# The options a run key has covered since keys exist: those of `ofsdpo train` then (a continual config held all of
# them, plus its own). The key keeps that form so that a finished run stays recognised when options are added or
# moved: an option outside it enters the key only when set to something other than its default, and one a config
# no longer holds (a continual config has no --data or --max-steps) enters at `ofsdpo train`'s default, as before.
KEY_OPTIONS = frozenset({
    "model", "gguf_file", "trust_remote_code", "device", "dtype", "data", "data_split", "eval_data", "eval_steps",
    "on_policy", "samples_per_prompt", "max_length", "max_prompt_length", "round_size", "epochs", "max_steps",
    "batch_size", "grad_accum", "method", "beta", "lr", "slow_lr_ratio", "alpha", "chase_form", "chase_interval",
    "swap", "module_passes", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr_scheduler", "warmup_steps",
    "weight_decay", "max_grad_norm", "seed", "max_nonfinite_steps", "logprob_chunk_size", "eval_batch_size",
    "output_dir", "save_steps", "save_total_limit", "resume", "overwrite", "report_to", "regret", "progress"})
CONTINUAL_KEY_OPTIONS = frozenset({"domain", "max_steps_per_domain", "memory_size", "heldout_size", "combine", "init",
                                   "judge_prompts", "judge_max_new_tokens", "lambda_grid"})


def option_defaults() -> dict:
    """The default of every option of `ofsdpo train` and `ofsdpo continual` (flat)."""
    from ..config import ContinualConfig, OFSDPOConfig

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
    """A run's flat options in the form its key has always had (see KEY_OPTIONS)."""
    covered = KEY_OPTIONS | (CONTINUAL_KEY_OPTIONS if kind == "continual" else frozenset())
    defaults = option_defaults()
    run = {k: v for k, v in options.items() if k in covered or k not in defaults or v != defaults[k]}
    run.update({k: defaults[k] for k in covered - set(run)})
    return run


# --- the runs --------------------------------------------------------------------------------------------------------
class ExperimentRunner:
    """Runs every (cell, seed) not yet finished, then writes the aggregate. The model loads only if a run is due."""

    def __init__(self, config: ExperimentConfig, output_dir: str | Path, progress: bool = True, verbose: bool = True):
        self.config, self.out, self.progress, self.verbose = config, Path(output_dir), progress, verbose
        self._base = self._tokenizer = self._model_name = None
        self._pairs: dict[str, Path] = {}
        self._reference_scores: dict[str, list[float]] = {}

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"[experiment {self.config.name}] {text}", flush=True)

    def run(self) -> dict:
        results: dict[str, dict[int, dict]] = {}
        for seed in self.config.seeds:  # seeds outermost: an interrupted run has whole seeds, not whole cells
            for cell, variant, domain in self.config.cells():
                results.setdefault(cell, {})[seed] = self.cell_result(cell, variant, domain, seed)
        return write_aggregate(self.out, self.config, results)

    def cell_result(self, cell: str, variant: dict, domain: str | None, seed: int) -> dict:
        run_dir = self.out / "runs" / cell / f"seed-{seed}"
        done = run_dir / "result.json"
        key = self.run_key(variant, domain, seed)
        if done.is_file():  # finished earlier, unless the experiment's file has changed since
            result = json.loads(done.read_text(encoding="utf-8"))
            if result.get("run_key") == key:
                return result
        twin = self.find_run(key)
        if twin is not None:  # the same run in another experiment (an ablation's baseline): reuse it
            result = {**json.loads(twin.read_text(encoding="utf-8")), "reused_from": str(twin)}
            write_json(done, result)
            self.say(f"{cell}, seed {seed}: reused {twin}")
            return result
        self.say(f"{cell}, seed {seed} …")
        started = time.perf_counter()
        if self.config.kind == "in-domain":
            result = self.in_domain(variant, domain, seed, run_dir)
        else:
            result = self.continual(variant, seed, run_dir)
        result.update(wall_seconds=time.perf_counter() - started, run_key=key)
        for checkpoints in run_dir.rglob("checkpoints"):  # resume state (optimiser moments): not needed here
            shutil.rmtree(checkpoints, ignore_errors=True)
        write_json(done, result)
        self.say(f"{cell}, seed {seed}: done in {result['wall_seconds']:.0f} s")
        return result

    def run_key(self, variant: dict, domain: str | None, seed: int) -> str:
        """A hash of everything a run's result depends on: its resolved config (paths aside), the pairs' bytes and
        the judging set-up. Equal keys mean the same computation."""
        cfg = self.config
        domains = [domain] if domain else cfg.domains
        run = key_options(cfg.run_config(variant, seed, "", [f"{d}=pairs" for d in domains]).to_dict(), cfg.kind)
        for volatile in ("output_dir", "progress", "overwrite", "domain"):
            run.pop(volatile, None)
        pairs = [hashlib.sha256(self.pairs(d).read_bytes()).hexdigest() for d in domains]
        ingredients = {"kind": cfg.kind, "run": run, "domains": domains, "pairs": pairs, "heldout": cfg.heldout,
                       "judge_prompts": cfg.judge_prompts, "pair_seed": cfg.pair_seed}
        return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def find_run(self, key: str) -> Path | None:
        """A finished run with this key under any experiment beside this one."""
        for path in sorted(self.out.parent.glob("*/runs/**/result.json")):
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("run_key") == key:
                    return path
            except (OSError, json.JSONDecodeError):
                continue
        return None

    # --- shared inputs -----------------------------------------------------------------------------------------------
    def model(self):
        if self._base is None:
            from ..models import load_model_and_tokenizer, resolve_device

            cfg = self.config
            self._base, self._tokenizer, self._model_name, _ = load_model_and_tokenizer(
                cfg.model, cfg.gguf_file, "auto", resolve_device(cfg.device))
        return self._base, self._tokenizer

    def pairs(self, domain: str) -> Path:
        """The domain's pairs sampled from the base (cached across seeds, variants and experiments)."""
        if domain in self._pairs:
            return self._pairs[domain]
        cfg = self.config
        path = Path(cfg.data_dir) / f"{domain}-p{cfg.prompts}-k{cfg.samples}-seed{cfg.pair_seed}.jsonl"
        info_path = path.with_suffix(".info.json")
        if not path.is_file():
            info = self._sample_pairs(domain, path)
            write_json(info_path, info)
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info["model"] != [cfg.model, cfg.gguf_file]:
            raise ConfigError(f"{path} was sampled from model {info['model']}, not {[cfg.model, cfg.gguf_file]}: "
                              "give this experiment another data_dir.")
        need = cfg.heldout + (cfg.memory if cfg.kind == "continual" else 0) + cfg.batch_size
        if info["pairs"] < need:
            raise ConfigError(f"'{domain}' gave {info['pairs']} pairs ({info['ties']} ties) from {cfg.prompts} "
                              f"prompts; this experiment needs at least {need}: raise prompts or drop the domain.")
        self._pairs[domain] = path
        return path

    def _sample_pairs(self, domain_name: str, path: Path) -> dict:
        import torch
        from transformers import set_seed

        from ..domains import get_domain
        from ..generation import make_pairs

        cfg, (base, tokenizer) = self.config, self.model()
        domain = get_domain(domain_name)
        records = domain.prompts("train")[:cfg.prompts]
        self.say(f"sampling {len(records)} x {cfg.samples} responses on '{domain_name}' (seed {cfg.pair_seed}) …")
        set_seed(cfg.pair_seed)  # per domain: a domain's pairs do not depend on which others were sampled first
        started = time.perf_counter()
        with torch.inference_mode():
            pairs, ties = make_pairs(base, tokenizer, domain, records, cfg.samples, progress=self.progress)
        write_jsonl(path, pairs)  # atomic: never a half-written file under the final name
        return {"domain": domain_name, "prompts": len(records), "samples": cfg.samples, "pairs": len(pairs),
                "ties": ties, "seed": cfg.pair_seed, "model": [cfg.model, cfg.gguf_file],
                "seconds": time.perf_counter() - started}

    def reference_scores(self, domain_name: str) -> tuple[list[dict], list[float]]:
        """The judged held-out prompts and the reference's scores on them, drawn once (seed `pair_seed`)."""
        from ..domains import get_domain
        from ..scoring import common_random_numbers, reference_samples

        domain = get_domain(domain_name)
        records = domain.prompts("heldout")[:self.config.judge_prompts]
        if domain_name not in self._reference_scores:
            base, tokenizer = self.model()
            with common_random_numbers(self.config.pair_seed, next(base.parameters()).device):
                self._reference_scores[domain_name] = reference_samples(base, tokenizer, domain, records)
        return records, self._reference_scores[domain_name]

    # --- one run -----------------------------------------------------------------------------------------------------
    def in_domain(self, variant: dict, domain_name: str, seed: int, run_dir: Path) -> dict:
        from ..data import read_rows
        from ..domains import get_domain
        from ..trainer import OFSDPOTrainer
        from .eval import evaluate_adapter

        cfg = self.config
        _, rows = read_rows(str(self.pairs(domain_name)), "train")
        rows = [row for _, row in rows]
        train, heldout = rows[:-cfg.heldout], rows[-cfg.heldout:]  # the stream's end is held out, as in continual
        records, ref_scores = self.reference_scores(domain_name)
        base, tokenizer = self.model()
        run_config = cfg.run_config(variant, seed, run_dir, [], progress=self.progress)
        trainer = OFSDPOTrainer(base, run_config, train_data=train, tokenizer=tokenizer, eval_data=heldout)
        summary = trainer.train()
        served = summary["served_module"]
        scores = evaluate_adapter(trainer.model, tokenizer, served, get_domain(domain_name), trainer.eval,
                                  trainer.eval_reference, records, ref_scores, run_config.beta, seed=seed)
        trainer.model.unload()  # the same base object, LoRA layers removed, for the next run
        regret = [json.loads(line) for line in (run_dir / "regret.jsonl").read_text().splitlines() if line.strip()]
        return {"domain": domain_name, "method": run_config.method, "served_module": served, "steps": summary["steps"],
                "judge_score": scores["judge_score"], "win_rate": scores["win_rate"], "kl": scores["kl"],
                "response_words": scores["response_words"], "base_judge_score": scores["reference_judge_score"],
                "heldout_loss": scores["loss"], "heldout_accuracy": scores["accuracy"],
                "online_regret": summary["online_regret"], "swaps": summary.get("chase/swaps", 0),
                "online_loss_curve": [r[served] for r in trainer.state.online_losses],
                "regret_curve": [r["regret"] for r in regret], "train_seconds": summary["train_runtime"]}

    def continual(self, variant: dict, seed: int, run_dir: Path) -> dict:
        from ..continual import ContinualRunner
        from .demo import continual_loss_curve

        cfg = self.config
        specs = [f"{d}={self.pairs(d)}" for d in cfg.domains]
        for d in cfg.domains:  # seeded reference samples, shared with the in-domain experiments' definition
            self.reference_scores(d)
        base, tokenizer = self.model()
        run_config = cfg.run_config(variant, seed, run_dir, specs, progress=self.progress)
        runner = ContinualRunner(run_config, model=base, tokenizer=tokenizer, reference_scores=self._reference_scores)
        report = runner.run()
        names, matrix = report["domains"], report["matrix"]
        forgetting = report["cl/forgetting_judge"]
        curve = continual_loss_curve(run_dir, names)
        return {"method": report["method"], "domains": names, "judge_matrix": matrix["judge_score"],
                "kl_matrix": matrix["kl"], "win_rate_matrix": matrix["win_rate"],
                "accuracy_matrix": matrix["accuracy"], "loss_matrix": matrix["loss"],
                "final_judge": dict(zip(names, matrix["judge_score"][-1])),
                "avg_final_judge": report["cl/avg_judge_score"], "forgetting_judge": forgetting,
                "avg_forgetting_judge": sum(forgetting.values()) / max(1, len(forgetting)),
                "avg_final_kl": sum(matrix["kl"][-1]) / len(names),
                "avg_final_accuracy": report["cl/avg_accuracy"], "forgetting_accuracy": report["cl/forgetting"],
                "bwt_accuracy": report["cl/bwt"], "lambdas": report["lambdas"][1:],
                "base_judge_score": report["base_judge_score"], "train_loss_curve": curve}


# --- the command ----------------------------------------------------------------------------------------------------
def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers (got {text!r}).") from None


def run_experiment(config_path: str, seeds: str | None = None, output_dir: str | None = None,
                   progress: bool = True) -> dict:
    config = ExperimentConfig.from_yaml(config_path)
    config.seeds = parse_seeds(seeds) or config.seeds
    out = Path(output_dir or Path("experiments-output") / config.name)
    summary = ExperimentRunner(config, out, progress).run()  # progress lines are printed either way
    print((out / "aggregate.md").read_text(encoding="utf-8"))
    return summary
