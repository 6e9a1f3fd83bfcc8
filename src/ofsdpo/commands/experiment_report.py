"""An experiment's outputs: the aggregate over seeds (mean and sample std of every number), aggregate.json,
aggregate.md (the tables) and the plots; every figure is mean ± sample std over seeds.

Imports run one way: `experiment` (the runs) imports this module; this one needs only the config, plotting and the
domains' names (a revisiting stream's later visit).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from ..domains import builtin_name
from ..files import write_atomic, write_json
from ..plotting import band, plot_curves, plot_judge_matrices, pyplot, save
from ..stats import (
    DECISION_RESAMPLES,
    bootstrap_ci,
    crossed_bootstrap,
    decision,
    holm,
    holm_resolvable,
    mean_sd,
    minimum_detectable_effect,
    paired_difference,
)

IN_DOMAIN_COLUMNS = (("judge_score", "judge score", True), ("win_rate", "win rate vs ref", False),
                     ("kl", "KL to ref", True), ("report_loss", "report DPO loss", False),
                     ("report_accuracy", "report pref. acc.", False),
                     ("online_loss_total", "cum. online loss", False),
                     ("response_words", "words", False), ("swaps", "swaps", False))
# the paired headline: metric, its title, and the per-unit values a bootstrap resamples (pairs or prompts)
PAIRED_IN_DOMAIN = (("report_loss", "report DPO loss (lower is better)"),
                    ("report_accuracy", "report preference accuracy"), ("judge_score", "judge score"),
                    ("win_rate", "win rate vs reference"),
                    ("kl", "KL to reference (lower is better at an equal judge score)"),
                    ("independent_judge_score", "independent judge score (AFINN; never labelled a pair)"),
                    ("online_loss_total", "cumulative pre-update online loss (lower is better; = the regret "
                                          "difference under any shared comparator)"))
OLD_KL = "sampled log-ratio, old estimator: not a KL"  # results without "kl_estimator" (`experiment.KL_ESTIMATOR`)
PAIRED_CONTINUAL = (("avg_final_judge", "avg final judge score"),
                    ("avg_forgetting_judge", "avg forgetting (judge; lower is better)"),
                    ("avg_final_loss", "avg final report DPO loss (lower is better)"),
                    ("avg_final_accuracy", "avg final report pref. acc."), ("bwt_accuracy", "backward transfer (acc.)"),
                    ("final_memory_loss", "memory DPO loss of the final combination (lower is better; what the search "
                                          "minimises)"))
PER_RUN_ONLY = ("units", "sets", "frontier")  # per-unit values, set indices, the ladder: kept per seed


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
    if config.kind == "continual":
        results = {cell: {s: with_search_outcome(r) for s, r in by_seed.items()} for cell, by_seed in results.items()}
    derived = {cell: {s: with_online_total(r) for s, r in by_seed.items()} for cell, by_seed in results.items()}
    cells = {cell: aggregate([{k: v for k, v in r.items() if k not in PER_RUN_ONLY} for r in by_seed.values()])
             for cell, by_seed in derived.items()}
    paired = paired_differences(config, derived)
    frontier = frontier_section(derived)
    gap = multitask_gap(config, derived)
    relearnt = revisit_rows(config, derived)
    summary = {"experiment": config.name, "kind": config.kind, "description": config.description,
               "seeds": config.seeds, "config": dataclasses.asdict(config), "baseline": config.baseline_variant,
               "paired": paired, "cells": cells, **({"frontier": frontier} if frontier else {}),
               **({"multitask_gap": gap} if gap else {}), **({"revisit": relearnt} if relearnt else {}),
               "per_seed": {cell: {str(s): r for s, r in by_seed.items()} for cell, by_seed in results.items()},
               "wall_seconds": sum(r.get("wall_seconds", 0.0) for by_seed in results.values()
                                   for r in by_seed.values() if not r.get("reused_from"))}
    write_json(out / "aggregate.json", summary)
    plots = plot_experiment(out, config, cells) + ([plot_frontier(out, config, frontier)] if frontier else [])
    write_atomic(out / "aggregate.md", render_markdown(config, cells, plots, paired, gap, relearnt))
    return summary


def with_online_total(result: dict) -> dict:
    """An in-domain result with its cumulative pre-update online loss (the sum of `online_loss_curve`: each round's
    loss before any update on it; derived for results written before the field), its running sum (the curve the
    report plots: every arm against one comparator) and the sum's per-round units (n x each round's loss, so their
    mean is the sum: what the bootstrap resamples); unchanged where there is no curve."""
    curve = result.get("online_loss_curve")
    if not curve or any(x is None for x in curve):
        return result
    running, total = [], 0.0
    for x in curve:
        total += x
        running.append(total)
    units = {**result.get("units", {}), "online_loss_total": [len(curve) * x for x in curve]}
    return {**result, "online_loss_total": result.get("online_loss_total", total), "online_loss_cumulative": running,
            "units": units}


def with_search_outcome(result: dict) -> dict:
    """A continual result with the pooled memory DPO loss of the combination its search chose after each stage
    and after the last one, derived from `searches`; unchanged without. The chosen candidate is the argmin of the
    search's own criterion (`--select-by`: "criterion" on each point; the pooled loss itself under `loss`, whose
    points carry none); NaN points never win."""
    searches = [stage for stage in result.get("searches") or [] if stage]
    if not searches:
        return result

    def chosen_loss(stage: list[dict]) -> float | None:
        scored = [(p.get("criterion", p["memory_loss"]), p["memory_loss"]) for p in stage]
        return min(((c, m) for c, m in scored if c == c), default=(None, None))[1]

    chosen = [chosen_loss(stage) for stage in searches]
    return {**result, "chosen_memory_loss": chosen, "final_memory_loss": chosen[-1]}


# --- paired differences against the baseline (the headline) ---------------------------------------------------------
def paired_differences(config: ExperimentConfig, results: dict[str, dict[int, dict]]) -> list[dict]:
    """For every variant but the baseline (and every domain, in-domain), every headline metric: the per-seed
    difference variant − baseline with a t interval over seeds and, where per-unit values exist, a bootstrap over
    the units (report pairs or judged prompts, the same units under every seed), mean ± sd of both arms beside.
    Then the same for each of the file's `compare` pairs [variant, against]. Each row's verdict comes from its
    decision interval (`stats.decision`: the wider of the t interval and the crossed bootstrap over seeds and
    units) and its p-value Holm-adjusted over every row of the experiment (`stats.holm`): "p_holm"."""
    baseline = config.baseline_variant
    pairs = [(v["name"], baseline) for v in config.variants if v["name"] != baseline]
    pairs += [(variant, against) for variant, against in config.compare]
    rows = []
    for variant, against in pairs:
        for domain in (config.domains if config.kind == "in-domain" else [None]):
            cell, base_cell = (f"{variant}/{domain}", f"{against}/{domain}") if domain else (variant, against)
            rows += _paired_rows(config, results.get(cell, {}), results.get(base_cell, {}), variant, against, domain)
            rows += _frontier_rows(config, results.get(cell, {}), results.get(base_cell, {}), variant, against,
                                   domain)
    return adjust(rows)


def adjust(rows: list[dict]) -> list[dict]:
    """Each row with "p_holm": its decision p-value Holm-adjusted over `rows` (one page's comparisons). Raises
    ValueError, naming the rows, where a bootstrap's resamples are too few to decide under Holm over that many
    (`stats.holm_resolvable`; rows of aggregates written before `DECISION_RESAMPLES` count as 2000)."""
    coarse = sorted({f"{row['variant']} − {row['baseline']}" for row in rows if "crossed_bootstrap" in row
                     and not holm_resolvable(len(rows), row["crossed_bootstrap"].get("resamples", 2000))})
    if coarse:
        raise ValueError(f"the bootstraps of {', '.join(coarse)} have too few resamples to decide under Holm over "
                         f"{len(rows)} comparisons (need 1/resamples ≤ 0.05 / (20 · {len(rows)}))")
    for row, p in zip(rows, holm([row["decision"]["p_value"] for row in rows])):
        row["p_holm"] = p
    return rows


def _paired_rows(config: ExperimentConfig, runs: dict, base_runs: dict, variant: str, baseline: str,
                 domain: str | None, metrics: tuple | None = None) -> list[dict]:
    """One row per headline metric (or per (metric, title) of `metrics`): `runs` − `base_runs` ({seed: result})
    over the seeds both have."""
    seeds = [s for s in config.seeds if s in runs and s in base_runs]
    rows = []
    for metric, title in metrics or (PAIRED_IN_DOMAIN if config.kind == "in-domain" else PAIRED_CONTINUAL):
        pairs = [(runs[s].get(metric), base_runs[s].get(metric)) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not pairs:
            continue
        diff = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
        row = {"variant": variant, "baseline": baseline, "domain": domain, "metric": metric, "title": title,
               **{k: diff[k] for k in ("mean", "sd", "n", "lower", "upper", "p_value")},
               "variant_arm": mean_sd([a for a, _ in pairs]), "baseline_arm": mean_sd([b for _, b in pairs]),
               # no MDE where the metric does not vary across seeds (its sd says nothing about detecting an effect)
               "mde": minimum_detectable_effect(diff["sd"], diff["n"]) if diff["sd"] else None}
        if metric == "kl" and not all(runs[s].get("kl_estimator") and base_runs[s].get("kl_estimator") for s in seeds):
            row["title"] = f"{OLD_KL} (log π(y) − log π_ref(y) of top-k / top-p samples)"
        units = [(runs[s].get("units", {}).get(metric), base_runs[s].get("units", {}).get(metric)) for s in seeds]
        crossed = None
        if units and all(a is not None and b is not None and len(a) == len(b) for a, b in units):
            differences = [[x - y for x, y in zip(a, b)] for a, b in units]
            boot = bootstrap_ci(differences, resamples=DECISION_RESAMPLES, shared_units=True)
            row["bootstrap"] = {k: boot[k] for k in ("mean", "lower", "upper", "n_units")}
            if len({len(d) for d in differences}) == 1:
                crossed = _crossed(row, differences)
        row["decision"] = decision(row, crossed)
        rows.append(row)
    return rows


def _crossed(row: dict, differences: list[list[float]]) -> dict:
    """The crossed bootstrap of a comparison at `DECISION_RESAMPLES`, kept in its row as "crossed_bootstrap"."""
    crossed = crossed_bootstrap(differences, resamples=DECISION_RESAMPLES)
    row["crossed_bootstrap"] = {k: crossed[k] for k in ("mean", "lower", "upper", "p_value", "resamples")}
    return crossed


# --- the gap to `multitask` (the upper bound continual methods are measured against) ------------------------------
MULTITASK = "multitask"


def multitask_gap(config: ExperimentConfig, results: dict[str, dict[int, dict]]) -> list[dict]:
    """Each variant against the experiment's `multitask` variant (none: []): per domain and on average, the final
    judge score and the final report DPO loss, variant − multitask paired by seed with the headline's intervals
    (`_paired_rows`), Holm-adjusted over these rows alone (a family of its own: the headline's p Holm is not
    diluted by them). Each row adds "share_kept": per seed, the share of multitask's gain over the base model that
    the variant keeps, (variant − base) / (multitask − base), its mean and t interval over seeds (the base: its
    reference samples' judge score; its report loss, every margin 0: `experiment.base_report_loss`). A per-seed
    ratio is unstable where multitask barely moves from the base: read it beside the difference."""
    upper = next((v["name"] for v in config.variants if v.get("method") == MULTITASK), None)
    if config.kind != "continual" or upper is None:
        return []
    flat = {cell: {s: _gap_values(r) for s, r in by_seed.items()} for cell, by_seed in results.items()}
    metrics = [(f"{kind}/{name}", f"{title}, {name}") for kind, title in GAP_METRICS for name in config.domains]
    metrics += [(f"{kind}/all", f"{title}, average") for kind, title in GAP_METRICS]
    rows = []
    for variant in (v["name"] for v in config.variants if v["name"] != upper):
        runs, bound = flat.get(variant, {}), flat.get(upper, {})
        for row in _paired_rows(config, runs, bound, variant, upper, None, tuple(metrics)):
            row["domain"] = row["metric"].split("/")[1]
            seeds = [s for s in config.seeds if s in runs and s in bound]
            row["share_kept"] = _share_kept([(runs[s].get(row["metric"]), bound[s].get(row["metric"]),
                                              runs[s].get("base/" + row["metric"])) for s in seeds],
                                            lower_is_better=row["metric"].startswith("loss/"))
            rows.append(row)
    return adjust(rows)


GAP_METRICS = (("judge", "final judge score"), ("loss", "final report DPO loss (lower is better)"))


def _gap_values(result: dict) -> dict:
    """A continual result's numbers the gap compares, flat: "judge/<domain>", "loss/<domain>", ".../all" (the
    average and its per-unit values), and "base/<metric>": the base model's value of each."""
    judge, loss = result.get("final_judge") or {}, result.get("final_loss") or {}
    base_judge, base_loss = result.get("base_judge_score") or {}, result.get("base_report_loss")
    out = {f"judge/{n}": v for n, v in judge.items()} | {f"loss/{n}": v for n, v in loss.items()}
    out |= {f"base/judge/{n}": base_judge.get(n) for n in judge} | {f"base/loss/{n}": base_loss for n in loss}
    judged = [n for n, v in judge.items() if v is not None and base_judge.get(n) is not None]
    out |= {"judge/all": result.get("avg_final_judge"), "loss/all": result.get("avg_final_loss"),
            "base/judge/all": sum(base_judge[n] for n in judged) / len(judged) if judged else None,
            "base/loss/all": base_loss}
    units = result.get("units") or {}
    out["units"] = {k: units[u] for k, u in (("judge/all", "avg_final_judge"), ("loss/all", "avg_final_loss"))
                    if u in units}
    return out


def _share_kept(values: list[tuple], lower_is_better: bool) -> dict | None:
    """Mean and t interval over seeds of (variant − base) / (multitask − base), from (variant, multitask, base)
    per seed. None where a seed lacks one, or where multitask's own gain over the base is not shown (its 95 % t
    interval over seeds reaches 0 or the wrong side; `lower_is_better` for losses): a share of a gain that may not
    exist is a ratio of noise (sentiment's judge score after a critic stage: multitask ≈ base, shares of ±5)."""
    if not values or any(v is None or m is None or b is None for v, m, b in values):
        return None
    sign = -1.0 if lower_is_better else 1.0
    gain = paired_difference([sign * m for _, m, _ in values], [sign * b for _, _, b in values])
    if gain["lower"] is None or gain["lower"] <= 0:
        return None
    shares = [(v - b) / (m - b) for v, m, b in values]
    interval = paired_difference(shares, [0.0] * len(shares))
    return {k: interval[k] for k in ("mean", "lower", "upper", "n", "values")}


def _gap_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [f"## The gap to `{rows[0]['baseline']}` (the upper bound)", "",
             "Per seed: variant − multitask (one DPO LoRA trained on every domain seen, interleaved), with the "
             "headline's intervals and verdict rule; p Holm over these "
             f"{len(rows)} rows alone. Share kept: per seed, (variant − base) / (multitask − base), the share of "
             "multitask's gain over the base model the variant keeps (1: all of it), mean and 95 % t interval over "
             "seeds; - where multitask's own gain over the base is not shown (its t interval reaches 0).", "",
             "| variant − multitask | domain | metric | mean diff | 95 % CI (t) | 95 % CI (crossed bootstrap) | "
             "decided by | p Holm (the gap's rows) | n | MDE | variant (mean ± sd) | multitask (mean ± sd) | reading "
             "| share kept [95 % CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = r.get("share_kept")
        kept = "-" if not share else (f"{share['mean']:.3f}" + ("" if share["lower"] is None else
                                                               f" [{share['lower']:.3f}, {share['upper']:.3f}]"))
        lines.append(f"{paired_line(r)} {kept} |")
    return lines + [""]


# --- a revisiting stream (sentiment → critic → sentiment.2): relearning a domain against retraining it -------------
FIRST_VISIT = "first visit"
REVISIT_METRICS = (("judge_matrix", "judge score of the revisited domain"),
                   ("loss_matrix", "report DPO loss of the revisited domain (lower is better)"))


def revisits(domains: list[str]) -> list[tuple[int, int]]:
    """(first visit, later visit): the stage indices of each domain a stream trains on again (`sentiment.2` after
    `sentiment`: `domains.builtin_name`), in stream order; [] for a stream that visits every domain once."""
    first: dict[str, int] = {}
    pairs = []
    for k, name in enumerate(domains):
        seen = first.setdefault(builtin_name(name), k)
        if seen != k:
            pairs.append((seen, k))
    return pairs


def revisit_rows(config: ExperimentConfig, results: dict[str, dict[int, dict]]) -> list[dict]:
    """Does what a method kept bring a domain back faster than retraining it? Per variant and seed: the served
    model's score on a revisited domain right after the stage that revisits it, against its score on that domain
    right after its first visit (the same steps on the same pairs; from a fresh LoRA where the first visit is
    the first stage: retraining), averaged over the stream's revisits; `_paired_rows`' intervals and verdict rule
    with the first visit as the baseline arm (t over seeds only: the per-prompt values of an earlier stage are not
    kept, so there is no crossed bootstrap), Holm over these rows alone in the aggregate (the page adjusts them with
    the rest). [] for a stream without a revisit."""
    visits = revisits(config.domains)
    if config.kind != "continual" or not visits:
        return []

    def scores(result: dict, which: int) -> dict:  # which: 0 the first visit, 1 the later one
        out = {}
        for matrix, _ in REVISIT_METRICS:
            rows = result.get(matrix)
            values = [rows[pair[which]][pair[which]] for pair in visits] if rows else []
            out[matrix] = (sum(values) / len(values) if values and all(v is not None for v in values) else None)
        return out

    rows = []
    for variant in _variants(config):
        runs = results.get(variant, {})
        later = {s: scores(r, 1) for s, r in runs.items()}
        first = {s: scores(r, 0) for s, r in runs.items()}
        rows += _paired_rows(config, later, first, variant, FIRST_VISIT, None, REVISIT_METRICS)
    for row in rows:
        row["domain"] = ", ".join(config.domains[k] for _, k in visits)
    return adjust(rows)


def _revisit_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## Relearning a revisited domain against retraining it", "",
             "Per seed: the served model's score on the revisited domain right after the stage that revisits it − "
             "its score right after the first visit (the same steps on the same pairs, from a fresh LoRA: "
             "retraining). Above 0 on the judge (below on the loss): what the method kept brings the domain back "
             "further than retraining does. t interval over seeds only (an earlier stage's per-prompt values are "
             f"not kept); p Holm over these {len(rows)} rows alone.", "",
             "| variant − baseline | domain | metric | mean diff | 95 % CI (t) | 95 % CI (crossed bootstrap) | "
             "decided by | p Holm (these rows) | n | MDE | relearnt (mean ± sd) | first visit (mean ± sd) | reading |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    return lines + [paired_line(r) for r in rows] + [""]


# --- the reward–KL frontier (a checkpoint ladder: `experiment.CheckpointLadder`) ------------------------------------
def frontier_curves(result: dict) -> dict[str, list[dict]]:
    """A run's frontier per module role: each trained module by name ("default" for dpo's; "fast", "slow"), and
    for several, "served" (at each checkpoint the module with the lower selection loss). Each curve starts at the
    base (step 0: KL 0 and the reference's judge score, exactly what a module equal to the base scores under
    common random numbers), then one point per checkpoint. {} without a ladder."""
    points = result.get("frontier") or []
    if not points:
        return {}
    names = list(points[0]["modules"])
    roles = names + (["served"] if len(names) > 1 else [])
    base = {"step": 0, "kl": 0.0, "judge_score": result.get("base_judge_score")}
    return {role: [base] + [{"step": p["step"], **p["modules"][p["served"] if role == "served" else role]}
                            for p in points] for role in roles}


def at_kl(curve: list[dict], budget: float, key: str = "judge_score"):
    """`key` on a frontier at KL = `budget`: linear between the two points of the first segment whose KL reaches
    the budget, in checkpoint order. Returns (value, per-prompt values or None), or None if the curve never
    reaches the budget. The per-prompt values are interpolated with the same weight (the units of a bootstrap)."""
    for a, b in zip(curve, curve[1:]):
        if a["kl"] <= budget <= b["kl"] and b["kl"] > a["kl"]:
            w = (budget - a["kl"]) / (b["kl"] - a["kl"])
            value = (1 - w) * a[key] + w * b[key]
            units_a, units_b = (a.get("per_prompt") or {}).get(key), (b.get("per_prompt") or {}).get(key)
            units = [(1 - w) * x + w * y for x, y in zip(units_a, units_b)] if units_a and units_b else None
            return value, units
    return None


def frontier_metrics(curve: list[dict], budgets: list[float]) -> dict[str, tuple]:
    """{metric: (value, units)}: the judge score at each KL budget (where reached), the best judge score over
    the checkpoints and the KL at which it was reached."""
    out = {}
    for budget in budgets:
        found = at_kl(curve, budget)
        if found is not None:
            out[f"judge_at_kl_{budget:g}"] = found
    best = max(curve[1:], key=lambda p: p["judge_score"])
    out["best_judge"] = (best["judge_score"], (best.get("per_prompt") or {}).get("judge_score"))
    out["kl_at_best"] = (best["kl"], (best.get("per_prompt") or {}).get("kl"))
    return out


def _frontier_title(metric: str, role: str) -> str:
    if metric.startswith("judge_at_kl_"):
        return f"frontier: judge score at KL {metric.removeprefix('judge_at_kl_')} nats ({role})"
    if metric == "best_judge":
        return f"frontier: best judge score over the checkpoints ({role})"
    return f"frontier: KL at the best judge score ({role}; lower is better)"


def _frontier_rows(config: ExperimentConfig, runs: dict, base_runs: dict, variant: str, baseline: str,
                   domain: str | None) -> list[dict]:
    """Paired frontier rows (issue 27's headline): each of the variant's module roles against the baseline's
    served module (its only one for dpo), per seed, at the file's KL budgets, the best judge score and its KL."""
    seeds = [s for s in config.seeds if s in runs and s in base_runs]
    curves = {s: (frontier_curves(runs[s]), frontier_curves(base_runs[s])) for s in seeds}
    if not seeds or not all(mine and theirs for mine, theirs in curves.values()):
        return []
    rows = []
    for role in curves[seeds[0]][0]:
        values = {}
        for s in seeds:
            mine, theirs = curves[s]
            reference = theirs.get("served") or next(iter(theirs.values()))
            ours, base = frontier_metrics(mine[role], config.kl_budgets), frontier_metrics(reference, config.kl_budgets)
            for metric in ours:
                if metric in base:
                    values.setdefault(metric, {})[s] = (ours[metric], base[metric])
        for metric, by_seed in values.items():
            a, b = [v[0][0] for v in by_seed.values()], [v[1][0] for v in by_seed.values()]
            diff = paired_difference(a, b)
            row = {"variant": f"{variant} ({role})", "baseline": baseline, "domain": domain,
                   "metric": f"frontier/{metric}", "title": _frontier_title(metric, role),
                   **{k: diff[k] for k in ("mean", "sd", "n", "lower", "upper", "p_value")},
                   "variant_arm": mean_sd(a), "baseline_arm": mean_sd(b), "mde": None, "seeds": list(by_seed)}
            units = [(v[0][1], v[1][1]) for v in by_seed.values()]
            crossed = None
            if all(u and w and len(u) == len(w) for u, w in units) and len({len(u) for u, _ in units}) == 1:
                crossed = _crossed(row, [[x - y for x, y in zip(u, w)] for u, w in units])
            row["decision"] = decision(row, crossed)
            rows.append(row)
    return rows


def frontier_section(results: dict[str, dict[int, dict]]) -> dict:
    """aggregate.json's `frontier`: per cell and module role, each checkpoint's step, exact KL, judge score,
    independent judge score, report and training loss, mean ± std over the seeds (curves without a ladder: none)."""
    keys = ("step", "kl", "judge_score", "independent_judge_score", "report_loss", "train_loss")
    section = {}
    for cell, by_seed in results.items():
        curves = [frontier_curves(r) for r in by_seed.values()]
        if curves and all(curves):
            section[cell] = {role: aggregate([[{k: p.get(k) for k in keys} for p in c[role]] for c in curves])
                             for role in curves[0]}
    return section


def plot_frontier(out: Path, config: ExperimentConfig, frontier: dict) -> str:
    """Judge score against exact KL, one curve per (variant, module role): the mean over seeds at each checkpoint
    (from the base at KL 0), the band ± one std of the judge score, bars ± one std of the KL."""
    fig, ax = pyplot().subplots(figsize=(7, 4.6))
    styles = {"served": "-", "fast": "--", "slow": ":", "default": "-"}
    for i, (cell, roles) in enumerate(frontier.items()):
        for role, curve in roles.items():
            kl = [p["kl"]["mean"] for p in curve]
            judge = [p["judge_score"]["mean"] for p in curve]
            sd = [p["judge_score"]["std"] or 0.0 for p in curve]
            label = cell.split("/")[0] + ("" if role == "default" else f" ({role})")
            line, = ax.plot(kl, judge, styles.get(role, "-"), marker="o", color=f"C{i}", label=label, markersize=3)
            ax.fill_between(kl, [j - s for j, s in zip(judge, sd)], [j + s for j, s in zip(judge, sd)],
                            color=line.get_color(), alpha=0.12)
            ax.errorbar(kl, judge, xerr=[p["kl"]["std"] or 0.0 for p in curve], fmt="none", ecolor=line.get_color(),
                        alpha=0.5, capsize=2)
    for budget in config.kl_budgets:
        ax.axvline(budget, color="grey", linewidth=0.6, linestyle="--")
    steps = ", ".join(str(s) for s in config.checkpoints)
    ax.set_xlabel("exact KL(π ‖ π_ref), nats per judged sample (policy at temperature 1)")
    ax.set_ylabel("judge score (held-out prompts)")
    ax.legend(fontsize=7)
    ax.set_title(f"{config.name}: reward–KL frontier, checkpoints at steps {steps}\n(mean over seeds; band ± 1 sd; "
                 "dashed lines: the KL budgets)", fontsize=9)
    return save(fig, out / f"{config.name}-frontier.png")


def verdict(row: dict, level: float = 0.05) -> str:
    """`better` / `worse` (direction by the metric) when the decision interval (`stats.decision`) excludes 0 and
    the Holm-adjusted p-value is below `level`; else `no difference shown`. A row from before decisions existed
    is decided by its t interval alone."""
    decided = row.get("decision") or {"lower": row["lower"], "upper": row["upper"]}
    lower, upper = decided["lower"], decided["upper"]
    if lower is None or upper is None or lower <= 0 <= upper:
        return "no difference shown"
    if row.get("p_holm") is not None and row["p_holm"] >= level:
        return "no difference shown"
    if "not a KL" in row["title"]:
        return "higher" if lower > 0 else "lower"  # a direction, not better or worse: the number is not a KL
    lower_is_better = "lower is better" in row["title"]
    return "better" if (lower > 0) != lower_is_better else "worse"


def _paired_table(paired: list[dict]) -> list[str]:
    if not paired:
        return []
    lines = ["## Paired differences (the headline)", "",
             "Per seed: variant − baseline on the same data, judged with the same random numbers. 95 % intervals: "
             "t over seeds (the units held fixed), and a crossed bootstrap that resamples seeds and units (report "
             "pairs / judged prompts, the same under every seed) together. The wider of the two decides; its "
             f"p-value is Holm-adjusted over the {len(paired)} comparisons of this page (p Holm), and a verdict "
             "needs the interval to exclude 0 and p Holm < 0.05. MDE: the smallest true difference this many "
             "seeds detect with 80 % power (two-sided 5 %; none where the metric does not vary across seeds).", "",
             "| variant − baseline | domain | metric | mean diff | 95 % CI (t) | 95 % CI (crossed bootstrap) | "
             "decided by | p Holm (this file) | n | MDE | variant (mean ± sd) | baseline (mean ± sd) | reading |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in paired:
        lines.append(paired_line(r))
    return lines + [""]


def paired_line(r: dict) -> str:
    """One comparison as a row of the paired table (`_paired_table`'s columns)."""
    t_ci = "-" if r["lower"] is None else f"[{r['lower']:+.4f}, {r['upper']:+.4f}]"
    boot = r.get("crossed_bootstrap")
    b_ci = f"[{boot['lower']:+.4f}, {boot['upper']:+.4f}]" if boot else "-"
    mde = "-" if r.get("mde") is None else f"{r['mde']:.4f}"
    p_holm = "-" if r.get("p_holm") is None else f"{r['p_holm']:.3g}"
    by = (r.get("decision") or {}).get("by", "t")
    arms = [f"{a['mean']:+.4f} ± {a['sd']:.4f}" if a["sd"] is not None else f"{a['mean']:+.4f}"
            for a in (r["variant_arm"], r["baseline_arm"])]
    return (f"| {r['variant']} − {r['baseline']} | {r['domain'] or 'all'} | {r['title']} | {r['mean']:+.4f} | "
            f"{t_ci} | {b_ci} | {by} | {p_holm} | {r['n']} | {mde} | {arms[0]} | {arms[1]} | {verdict(r)} |")


# --- tables ----------------------------------------------------------------------------------------------------------
def _variants(config: ExperimentConfig) -> list[str]:
    return [v["name"] for v in config.variants]


def _scale(config: ExperimentConfig) -> str:
    c = config
    if c.data is not None or c.data_files:  # the user's pairs (`ofsdpo compare`)
        files = ", ".join(c.data_files.values()) if c.data_files else c.data
        judged = (f"; {c.judge_prompts} judged held-out prompts of {c.heldout_prompts} x {c.judge_samples} samples "
                  "per arm" if c.heldout_prompts else "; no judged samples")
        return (f"your pairs ({files}) split by prompt: a stream of {c.steps} steps x {c.batch_size} pairs (lr "
                f"{c.lr}), a selection set of at least {c.selection} pairs and a report set of at least "
                f"{c.report_size} (the last prompts){judged}; max length {c.max_length}")
    text = (f"pairs from {c.prompts} training prompts x {c.samples} samples per domain (sampled once, seed "
            f"{c.pair_seed}): a stream of {c.steps} steps x {c.batch_size} pairs (lr {c.lr}) and the last "
            f"{c.selection} pairs as the selection set; report pairs from the held-out prompts ({c.report_rounds} "
            f"round(s)); {c.judge_prompts} judged held-out prompts x {c.judge_samples} samples per arm; max length "
            f"{c.max_length}")
    if c.kind == "continual":
        text += (f"; memory {c.memory} selection pairs per domain, λ grid {c.lambda_grid}, best-fast check every "
                 f"{c.eval_steps}")
    if c.train:
        text += "; for every variant: " + ", ".join(f"{k}={v}" for k, v in c.train.items())
    return text


def _variant_line(variant: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in variant.items() if k != "name")
    return f"- `{variant['name']}`: {settings}"


def render_markdown(config: ExperimentConfig, cells: dict, plots: list[str], paired: list[dict] | None = None,
                    gap: list[dict] | None = None, revisit: list[dict] | None = None) -> str:
    lines = [f"# {config.name}", "", config.description.strip(), "", *_paired_table(paired or []),
             *_gap_table(gap or []), *_revisit_table(revisit or []),
             f"Seeds {', '.join(map(str, config.seeds))}; every cell is mean ± sample standard deviation (n − 1) "
             f"over the seeds. Scale: {_scale(config)}.", "", "Variants:", "",
             *(_variant_line(v) for v in config.variants), ""]
    lines += _in_domain_table(config, cells) if config.kind == "in-domain" else _continual_tables(config, cells)
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


def _in_domain_table(config: ExperimentConfig, cells: dict) -> list[str]:
    exact = all(cell.get("kl_estimator") == "exact" for cell in cells.values())
    titles = [title if key != "kl" or exact else "log-ratio (old estimator, not a KL)"
              for key, title, _ in IN_DOMAIN_COLUMNS]
    head = "| variant | domain | " + " | ".join(titles) + " |"
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


def _combination_per_stage(cell: dict) -> str:
    """What a continual cell served after each stage from the second: the pairwise search's λ, or (a simplex
    search, whose λ is None) the weight of each kept module, seed means; "-" for methods that combine nothing."""
    lambdas, weights = cell.get("lambdas") or [], (cell.get("weights") or [])[1:]
    if any(x is not None for x in lambdas):
        return ", ".join(fmt(x, False, 2) for x in lambdas)
    if not any(weights):
        return "-"
    return "; ".join(", ".join(f"{name} {w['mean']:.2f}" for name, w in stage.items()) if stage else "-"
                     for stage in weights)


def _continual_tables(config: ExperimentConfig, cells: dict) -> list[str]:
    names = config.domains
    head = ("| variant | " + " | ".join(f"final {n}" for n in names) + " | avg final judge | avg forgetting (judge) | "
            + " | ".join(f"forgetting {n}" for n in names[:-1]) + " | avg final pref. acc. | "
            + ("avg final KL" if all(c.get("kl_estimator") == "exact" for c in cells.values()) else
               "avg final log-ratio (old estimator, not a KL)")
            + " | λ or weights per stage | chosen memory loss per stage |")
    lines = [head, "|---|" + "---|" * (2 * len(names) + 5)]
    for variant in _variants(config):
        c = cells.get(variant)
        if not c:
            continue
        lambdas = _combination_per_stage(c)
        memory = ", ".join(fmt(s, False) for s in c["chosen_memory_loss"]) if c.get("chosen_memory_loss") else "-"
        final, forgetting = c.get("final_judge") or {}, c.get("forgetting_judge") or {}
        lines.append(f"| {variant} | " + " | ".join(fmt(final.get(n)) for n in names) +
                     f" | {fmt(c.get('avg_final_judge'))} | {fmt(c.get('avg_forgetting_judge'))} | " +
                     " | ".join(fmt(forgetting.get(n)) for n in names[:-1]) +
                     f" | {fmt(c['avg_final_accuracy'], False)} | {fmt(c['avg_final_kl'])} | {lambdas} | {memory} |")
    base = next(iter(cells.values())).get("base_judge_score") or {}
    lines += ["", "Base model (reference samples): " + ", ".join(f"{n} {fmt(base.get(n))}" for n in names), ""]
    for variant in _variants(config):
        if variant not in cells or not cells[variant].get("judge_matrix"):
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
    judged = all(cell.get("judge_matrix") for cell in cells.values())  # not so: the user's pairs files alone
    plots = ([_plot_matrices(out, config, cells)] if judged else []) + [_plot_train_curves(out, config, cells)]
    searched = _plot_lambda_search(out, config, cells)
    return plots + ([searched] if searched else [])


def _plot_lambda_search(out: Path, config: ExperimentConfig, cells: dict) -> str | None:
    """The memory DPO loss over the whole λ grid at every stage after the first (pairwise searches), mean ± std."""
    searched = {v: cells[v]["searches"] for v in _variants(config)
                if v in cells and cells[v].get("searches") and all(
                    isinstance(stage, list) and stage and "lambda" in stage[0] for stage in cells[v]["searches"])}
    if not searched:
        return None
    stages = max(len(s) for s in searched.values())
    fig, axes = pyplot().subplots(1, stages, figsize=(4.4 * stages, 3.6), squeeze=False)
    for k in range(stages):
        ax = axes[0][k]
        for i, (variant, per_stage) in enumerate(searched.items()):
            if k < len(per_stage):
                rows = per_stage[k]
                ax.errorbar([r["lambda"]["mean"] for r in rows], [r["memory_loss"]["mean"] for r in rows],
                            yerr=[r["memory_loss"]["std"] for r in rows], color=f"C{i}", marker="o", capsize=2,
                            label=variant)
        ax.set_title(f"stage {k + 2}: {config.domains[k + 1]}")
        ax.set_xlabel("λ (weight of the modules kept before)")
        ax.set_ylabel("memory DPO loss (all domains seen)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{config.name}\nthe λ search's memory loss (mean ± std over seeds)", fontsize=10)
    return save(fig, out / f"{config.name}-lambda_search.png")


def _plot_curves(out: Path, config: ExperimentConfig, cells: dict) -> str:
    n = len(config.domains)
    fig, axes = pyplot().subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False)
    for j, domain in enumerate(config.domains):
        for variant in _variants(config):
            cell = cells.get(f"{variant}/{domain}")
            if cell:
                band(axes[0][j], cell["online_loss_curve"], variant)
                if cell.get("online_loss_cumulative"):
                    band(axes[1][j], cell["online_loss_cumulative"], variant)
        axes[0][j].set_title(domain)
        axes[0][j].set_ylabel("pre-update DPO loss (served module)")
        axes[1][j].set_ylabel("cumulative pre-update online loss")
        axes[1][j].set_xlabel("online round (= optimiser step)")
    axes[0][0].legend(fontsize=7)
    # two lines: one domain's figure is narrower than the title on one line
    fig.suptitle(f"{config.name}\nlearning curves (mean ± std over seeds)", fontsize=10)
    return save(fig, out / f"{config.name}-curves.png")


def _plot_reward_kl(out: Path, config: ExperimentConfig, cells: dict) -> str:
    fig, ax = pyplot().subplots(figsize=(6, 4.2))
    markers = "osD^v<>p*h"
    for i, variant in enumerate(_variants(config)):
        for j, domain in enumerate(config.domains):
            cell = cells.get(f"{variant}/{domain}")
            if cell and (cell.get("kl") or {}).get("mean") is not None:  # judged (not so: a user's pairs alone)
                ax.errorbar(cell["kl"]["mean"], cell["judge_score"]["mean"], xerr=cell["kl"]["std"],
                            yerr=cell["judge_score"]["std"], fmt=markers[j % len(markers)], color=f"C{i}",
                            label=f"{variant} / {domain}", capsize=3)
    exact = all(cell.get("kl_estimator") == "exact" for cell in cells.values())
    ax.set_xlabel("exact KL(π ‖ π_ref), nats per judged sample" if exact else
                  "sampled log-ratio log π(y) − log π_ref(y), nats (the old estimator: not a KL)")
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
