"""An experiment's outputs: the aggregate over seeds (mean and sample std of every number), aggregate.json,
aggregate.md (the tables) and the plots; every figure is mean ± sample std over seeds.

Imports run one way: `experiment` (the runs) imports this module; this one needs only the config and plotting.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from ..files import write_atomic, write_json
from ..plotting import band, plot_curves, plot_judge_matrices, pyplot, save

IN_DOMAIN_COLUMNS = (("judge_score", "judge score", True), ("win_rate", "win rate vs ref", False),
                     ("kl", "KL to ref", True), ("heldout_loss", "held-out DPO loss", False),
                     ("heldout_accuracy", "held-out pref. acc.", False), ("online_regret", "online regret", True),
                     ("response_words", "words", False), ("swaps", "swaps", False))


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


def write_aggregate(out: Path, config: ExperimentConfig, results: dict[str, dict[int, dict]]) -> dict:
    """aggregate.json (cells: the aggregate per cell; per_seed: the results), then the plots and aggregate.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = {cell: aggregate(list(by_seed.values())) for cell, by_seed in results.items()}
    summary = {"experiment": config.name, "kind": config.kind, "description": config.description,
               "seeds": config.seeds, "config": dataclasses.asdict(config), "cells": cells,
               "per_seed": {cell: {str(s): r for s, r in by_seed.items()} for cell, by_seed in results.items()}}
    write_json(out / "aggregate.json", summary)
    plots = plot_experiment(out, config, cells)
    write_atomic(out / "aggregate.md", render_markdown(config, cells, plots))
    return summary


# --- tables ----------------------------------------------------------------------------------------------------------
def _variants(config: ExperimentConfig) -> list[str]:
    return [v["name"] for v in config.variants]


def _scale(config: ExperimentConfig) -> str:
    c = config
    text = (f"pairs from {c.prompts} training prompts x {c.samples} samples per domain (sampled once, seed "
            f"{c.pair_seed}), {c.heldout} held out; {c.steps} steps of {c.batch_size} pairs, lr {c.lr}; "
            f"{c.judge_prompts} judged held-out prompts per domain; max length {c.max_length}")
    if c.kind == "continual":
        text += f"; memory {c.memory} pairs per domain, λ grid {c.lambda_grid}, best-fast check every {c.eval_steps}"
    if c.train:
        text += "; for every variant: " + ", ".join(f"{k}={v}" for k, v in c.train.items())
    return text


def _variant_line(variant: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in variant.items() if k != "name")
    return f"- `{variant['name']}`: {settings}"


def render_markdown(config: ExperimentConfig, cells: dict, plots: list[str]) -> str:
    lines = [f"# {config.name}", "", config.description.strip(), "",
             f"Seeds {', '.join(map(str, config.seeds))}; every cell is mean ± sample standard deviation (n − 1) "
             f"over the seeds. Scale: {_scale(config)}.", "", "Variants:", "",
             *(_variant_line(v) for v in config.variants), ""]
    lines += _in_domain_table(config, cells) if config.kind == "in-domain" else _continual_tables(config, cells)
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


def _in_domain_table(config: ExperimentConfig, cells: dict) -> list[str]:
    head = "| variant | domain | " + " | ".join(title for _, title, _ in IN_DOMAIN_COLUMNS) + " |"
    lines = [head, "|---|---|" + "---|" * len(IN_DOMAIN_COLUMNS)]
    for domain in config.domains:
        base = next((cells[f"{v}/{domain}"]["base_judge_score"] for v in _variants(config)
                     if f"{v}/{domain}" in cells), None)
        lines.append(f"| base model (reference samples) | {domain} | {fmt(base)} |" + " |" * (len(IN_DOMAIN_COLUMNS) - 1))
        for variant in _variants(config):
            cell = cells.get(f"{variant}/{domain}")
            if cell:
                values = " | ".join(fmt(cell.get(key), sign) for key, _, sign in IN_DOMAIN_COLUMNS)
                lines.append(f"| {variant} | {domain} | {values} |")
    return lines + [""]


def _continual_tables(config: ExperimentConfig, cells: dict) -> list[str]:
    names = config.domains
    head = ("| variant | " + " | ".join(f"final {n}" for n in names) + " | avg final judge | avg forgetting (judge) | "
            + " | ".join(f"forgetting {n}" for n in names[:-1]) + " | avg final pref. acc. | avg final KL | λ per stage |")
    lines = [head, "|---|" + "---|" * (2 * len(names) + 4)]
    for variant in _variants(config):
        c = cells.get(variant)
        if not c:
            continue
        lambdas = ", ".join(fmt(s, False, 2) for s in c["lambdas"]) if c.get("lambdas") else "-"
        lines.append(f"| {variant} | " + " | ".join(fmt(c["final_judge"][n]) for n in names) +
                     f" | {fmt(c['avg_final_judge'])} | {fmt(c['avg_forgetting_judge'])} | " +
                     " | ".join(fmt(c["forgetting_judge"].get(n)) for n in names[:-1]) +
                     f" | {fmt(c['avg_final_accuracy'], False)} | {fmt(c['avg_final_kl'])} | {lambdas} |")
    base = next(iter(cells.values()))["base_judge_score"]
    lines += ["", "Base model (reference samples): " + ", ".join(f"{n} {fmt(base.get(n))}" for n in names), ""]
    for variant in _variants(config):
        if variant not in cells:
            continue
        lines += [f"Judge score after each stage, `{variant}` (row: after training on that domain):", "",
                  "| after | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k, row in enumerate(cells[variant]["judge_matrix"]):
            lines.append(f"| {k + 1}-{names[k]} | " + " | ".join(fmt(v) for v in row) + " |")
        lines.append("")
    return lines


# --- plots -----------------------------------------------------------------------------------------------------------
def plot_experiment(out: Path, config: ExperimentConfig, cells: dict) -> list[str]:
    if config.kind == "in-domain":
        return [_plot_curves(out, config, cells), _plot_reward_kl(out, config, cells)]
    return [_plot_matrices(out, config, cells), _plot_train_curves(out, config, cells)]


def _plot_curves(out: Path, config: ExperimentConfig, cells: dict) -> str:
    n = len(config.domains)
    fig, axes = pyplot().subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False)
    for j, domain in enumerate(config.domains):
        for variant in _variants(config):
            cell = cells.get(f"{variant}/{domain}")
            if cell:
                band(axes[0][j], cell["online_loss_curve"], variant)
                band(axes[1][j], cell["regret_curve"], variant)
        axes[0][j].set_title(domain)
        axes[0][j].set_ylabel("pre-update DPO loss (served module)")
        axes[1][j].set_ylabel("cumulative online regret")
        axes[1][j].set_xlabel("online round (= optimiser step)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{config.name}: learning and regret curves (mean ± std over seeds)")
    return save(fig, out / f"{config.name}-curves.png")


def _plot_reward_kl(out: Path, config: ExperimentConfig, cells: dict) -> str:
    fig, ax = pyplot().subplots(figsize=(6, 4.2))
    markers = "osD^v<>p*h"
    for i, variant in enumerate(_variants(config)):
        for j, domain in enumerate(config.domains):
            cell = cells.get(f"{variant}/{domain}")
            if cell:
                ax.errorbar(cell["kl"]["mean"], cell["judge_score"]["mean"], xerr=cell["kl"]["std"],
                            yerr=cell["judge_score"]["std"], fmt=markers[j % len(markers)], color=f"C{i}",
                            label=f"{variant} / {domain}", capsize=3)
    ax.set_xlabel("KL(policy || reference), nats per response")
    ax.set_ylabel("judge score")
    ax.legend(fontsize=7)
    ax.set_title(f"{config.name}: judge score vs KL at the end (mean ± std)")
    return save(fig, out / f"{config.name}-reward_kl.png")


def _plot_matrices(out: Path, config: ExperimentConfig, cells: dict) -> str:
    matrices = {v: cells[v]["judge_matrix"] for v in _variants(config) if v in cells}
    return plot_judge_matrices(matrices, config.domains, out / f"{config.name}-judge_matrices.png", height=3.6,
                               title=f"{config.name}: judge score after each stage (mean ± std over seeds)")


def _plot_train_curves(out: Path, config: ExperimentConfig, cells: dict) -> str:
    curves = {v: cells[v]["train_loss_curve"] for v in _variants(config) if v in cells}
    return plot_curves(curves, out / f"{config.name}-train_curves.png",
                       "optimiser step (domains in order: " + " → ".join(config.domains) + ")",
                       "training DPO loss (fast module)", figsize=(7, 3.6), legend_fontsize=7)
