"""`ofsdpo experiment CONFIG`: one experiment of `experiments/*.yaml`, repeated over seeds, then aggregated.

An experiment is a list of *variants* (a method plus any fields of the run's config) run on built-in domains:

- `kind: in-domain`: each variant trains (`ofsdpo train`: dpo or ofs-dpo) on each domain's stream on its own; at
  the end the served module is scored (`evaluate.evaluate_adapter`: held-out DPO loss and accuracy, judge score,
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
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .config import ConfigError, OFSDPOConfig, read_config_file
from .demo import DEMO_DOMAINS, FULL

KINDS = ("in-domain", "continual")
IN_DOMAIN_METHODS = ("dpo", "ofs-dpo")


@dataclass
class ExperimentConfig:
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
    # the scale; defaults are the demo's (`demo.FULL`)
    prompts: int = FULL.prompts  # training prompts sampled per domain
    samples: int = FULL.samples  # samples per prompt (best vs worst form the pair)
    steps: int = FULL.steps  # optimiser steps (per domain)
    batch_size: int = FULL.batch_size
    lr: float = 5e-4
    judge_prompts: int = FULL.judge_prompts  # held-out prompts judged per domain
    heldout: int = FULL.heldout  # pairs held out of each domain's stream (never trained on)
    memory: int = FULL.memory  # continual: held-out pairs per domain kept to choose λ
    lambda_grid: str = FULL.lambda_grid
    eval_steps: int = FULL.eval_steps  # continual: how often the best fast module is looked for
    max_length: int = 160
    max_prompt_length: int = 96
    train: dict = field(default_factory=dict)  # fields set for every variant (a variant's own keys win)

    def __post_init__(self) -> None:
        from .domains import DOMAINS

        if self.kind not in KINDS:
            raise ConfigError(f"experiment '{self.name}': kind must be one of {', '.join(KINDS)} (got {self.kind!r}).")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise ConfigError(f"experiment '{self.name}': domains must be built-in ({', '.join(DOMAINS)}); "
                              f"got {self.domains}.")
        names = [v.get("name") for v in self.variants]
        if not names or None in names or len(set(names)) != len(names):
            raise ConfigError(f"experiment '{self.name}': variants need unique names (got {names}).")
        if not self.seeds:
            raise ConfigError(f"experiment '{self.name}': seeds must not be empty.")
        for variant in self.variants:  # a bad variant fails now, not after an hour of the others
            self.run_config(variant, self.seeds[0], "unused", [f"{d}=unused" for d in self.domains])

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ExperimentConfig":
        return cls(**read_config_file(path, cls))

    def run_config(self, variant: dict, seed: int, output_dir: str | Path, specs: list[str]):
        """The OFSDPOConfig (in-domain) or ContinualConfig (continual) of one variant and seed."""
        from .continual import ContinualConfig

        common = dict(lr=self.lr, batch_size=self.batch_size, max_length=self.max_length, seed=seed,
                      max_prompt_length=self.max_prompt_length, save_steps=0, device=self.device,
                      output_dir=str(output_dir), overwrite=True, model=self.model, gguf_file=self.gguf_file)
        if self.kind == "in-domain":
            values, config_class = dict(common, max_steps=self.steps, regret=True), OFSDPOConfig
        else:
            values = dict(common, domain=specs, max_steps_per_domain=self.steps, heldout_size=self.heldout,
                          memory_size=self.memory, judge_prompts=self.judge_prompts, lambda_grid=self.lambda_grid,
                          eval_steps=self.eval_steps, regret=False)
            config_class = ContinualConfig
        values.update(self.train)
        values.update({k: v for k, v in variant.items() if k != "name"})
        if self.kind == "in-domain" and values.get("method") not in IN_DOMAIN_METHODS:
            raise ConfigError(f"variant '{variant['name']}': in-domain methods are {', '.join(IN_DOMAIN_METHODS)}.")
        unknown = set(values) - {f.name for f in dataclasses.fields(config_class)}
        if unknown:
            raise ConfigError(f"variant '{variant['name']}': unknown field(s) {', '.join(sorted(unknown))}.")
        return config_class(**values)

    def cells(self) -> list[tuple[str, dict, str | None]]:
        """(cell name, variant, domain): a variant per domain in-domain, a variant over all domains otherwise."""
        if self.kind == "continual":
            return [(v["name"], v, None) for v in self.variants]
        return [(f"{v['name']}/{d}", v, d) for v in self.variants for d in self.domains]


# --- aggregation over seeds ------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n − 1; 0 for one value) of the non-missing values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": len(values), "values": values}


def aggregate(results: list[Any]) -> Any:
    """Mean ± std over seeds of every number in nested seed results: dicts by key, lists by position (curves are
    cut to the shortest seed), numbers to `mean_std`; anything else is kept if every seed agrees."""
    present = [r for r in results if r is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for r in present for k in r))
        return {k: aggregate([r.get(k) for r in present]) for k in keys}
    if isinstance(first, list):
        length = min(len(r) for r in present)
        return [aggregate([r[i] for r in present]) for i in range(length)]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return mean_std(present)
    return first if all(r == first for r in present) else present


def fmt(stat: dict | None, sign: bool = True, digits: int = 3) -> str:
    """`mean ± std` of a `mean_std` result; '-' when missing."""
    if not stat or stat.get("mean") is None:
        return "-"
    mean = f"{stat['mean']:+.{digits}f}" if sign else f"{stat['mean']:.{digits}f}"
    return f"{mean} ± {stat['std']:.{digits}f}"


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
            run_dir.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(result, indent=1), encoding="utf-8")
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
        done.write_text(json.dumps(result, indent=1), encoding="utf-8")
        self.say(f"{cell}, seed {seed}: done in {result['wall_seconds']:.0f} s")
        return result

    def run_key(self, variant: dict, domain: str | None, seed: int) -> str:
        """A hash of everything a run's result depends on: its resolved config (paths aside), the pairs' bytes and
        the judging set-up. Equal keys mean the same computation."""
        cfg = self.config
        domains = [domain] if domain else cfg.domains
        run = dataclasses.asdict(cfg.run_config(variant, seed, "", [f"{d}=pairs" for d in domains]))
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
            from .models import load_model_and_tokenizer, resolve_device

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
            path.parent.mkdir(parents=True, exist_ok=True)
            info = self._sample_pairs(domain, path)
            info_path.write_text(json.dumps(info, indent=1), encoding="utf-8")
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

        from .domains import get_domain
        from .generation import make_pairs, write_jsonl

        cfg, (base, tokenizer) = self.config, self.model()
        domain = get_domain(domain_name)
        records = domain.prompts("train")[:cfg.prompts]
        self.say(f"sampling {len(records)} x {cfg.samples} responses on '{domain_name}' (seed {cfg.pair_seed}) …")
        set_seed(cfg.pair_seed)  # per domain: a domain's pairs do not depend on which others were sampled first
        started = time.perf_counter()
        with torch.inference_mode():
            pairs, ties = make_pairs(base, tokenizer, domain, records, cfg.samples, progress=self.progress)
        partial = path.with_suffix(".partial")
        write_jsonl(pairs, partial).rename(path)  # never a half-written file under the final name
        return {"domain": domain_name, "prompts": len(records), "samples": cfg.samples, "pairs": len(pairs),
                "ties": ties, "seed": cfg.pair_seed, "model": [cfg.model, cfg.gguf_file],
                "seconds": time.perf_counter() - started}

    def reference_scores(self, domain_name: str) -> tuple[list[dict], list[float]]:
        """The judged held-out prompts and the reference's scores on them, drawn once (seed `pair_seed`)."""
        from .domains import get_domain
        from .scoring import common_random_numbers, reference_samples

        domain = get_domain(domain_name)
        records = domain.prompts("heldout")[:self.config.judge_prompts]
        if domain_name not in self._reference_scores:
            base, tokenizer = self.model()
            with common_random_numbers(self.config.pair_seed, next(base.parameters()).device):
                self._reference_scores[domain_name] = reference_samples(base, tokenizer, domain, records)
        return records, self._reference_scores[domain_name]

    # --- one run -----------------------------------------------------------------------------------------------------
    def in_domain(self, variant: dict, domain_name: str, seed: int, run_dir: Path) -> dict:
        from .data import read_rows
        from .domains import get_domain
        from .evaluate import evaluate_adapter
        from .trainer import OFSDPOTrainer

        cfg = self.config
        _, rows = read_rows(str(self.pairs(domain_name)), "train")
        rows = [row for _, row in rows]
        train, heldout = rows[:-cfg.heldout], rows[-cfg.heldout:]  # the stream's end is held out, as in continual
        records, ref_scores = self.reference_scores(domain_name)
        base, tokenizer = self.model()
        run_config = cfg.run_config(variant, seed, run_dir, [])
        run_config.progress = self.progress
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
                "online_loss_curve": [r[served] for r in trainer.online_losses],
                "regret_curve": [r["regret"] for r in regret], "train_seconds": summary["train_runtime"]}

    def continual(self, variant: dict, seed: int, run_dir: Path) -> dict:
        from .continual import ContinualRunner
        from .metrics import read_metrics

        cfg = self.config
        specs = [f"{d}={self.pairs(d)}" for d in cfg.domains]
        for d in cfg.domains:  # seeded reference samples, shared with the in-domain experiments' definition
            self.reference_scores(d)
        base, tokenizer = self.model()
        run_config = cfg.run_config(variant, seed, run_dir, specs)
        run_config.progress = self.progress
        runner = ContinualRunner(run_config, model=base, tokenizer=tokenizer)
        runner._reference_scores = self._reference_scores
        report = runner.run()
        names, matrix = report["domains"], report["matrix"]
        forgetting = report["cl/forgetting_judge"]
        curve = []
        for k, name in enumerate(names):
            rows = read_metrics(run_dir / "domains" / f"{k + 1}-{name}" / "metrics.jsonl")
            curve += [r.get("fast/loss", r.get("loss")) for r in rows]
        return {"method": run_config.method, "domains": names, "judge_matrix": matrix["judge_score"],
                "kl_matrix": matrix["kl"], "win_rate_matrix": matrix["win_rate"],
                "accuracy_matrix": matrix["accuracy"], "loss_matrix": matrix["loss"],
                "final_judge": dict(zip(names, matrix["judge_score"][-1])),
                "avg_final_judge": report["cl/avg_judge_score"], "forgetting_judge": forgetting,
                "avg_forgetting_judge": sum(forgetting.values()) / max(1, len(forgetting)),
                "avg_final_kl": sum(matrix["kl"][-1]) / len(names),
                "avg_final_accuracy": report["cl/avg_accuracy"], "forgetting_accuracy": report["cl/forgetting"],
                "bwt_accuracy": report["cl/bwt"], "lambdas": report["lambdas"][1:],
                "base_judge_score": report["base_judge_score"], "train_loss_curve": curve}


# --- outputs ---------------------------------------------------------------------------------------------------------
def write_aggregate(out: Path, config: ExperimentConfig, results: dict[str, dict[int, dict]]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cells = {cell: aggregate(list(by_seed.values())) for cell, by_seed in results.items()}
    summary = {"experiment": config.name, "kind": config.kind, "description": config.description,
               "seeds": config.seeds, "config": dataclasses.asdict(config), "cells": cells,
               "per_seed": {cell: {str(s): r for s, r in by_seed.items()} for cell, by_seed in results.items()}}
    (out / "aggregate.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    from .experiment_report import plot_experiment, render_markdown

    plots = plot_experiment(out, config, cells)
    (out / "aggregate.md").write_text(render_markdown(config, cells, plots), encoding="utf-8")
    return summary


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
