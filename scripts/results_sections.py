"""Rewrite docs/results.md's result sections from experiments' aggregates (no hand-typed numbers): claim 1 and the
chase ablation from in-domain experiments, claim 2 from continual ones.

    python scripts/results_sections.py          # the page's experiments (PAGE), in its order
    python scripts/results_sections.py docs/results/in-domain-sentiment-aggregate.json …   # or those given

Each argument is an aggregate.json with its aggregate.md beside it (as `ofsdpo experiment` writes them, or copied
into docs/results/ as NAME-aggregate.{json,md}); one section per experiment, in the order given. A reading written
by hand (what the numbers say together) lives in NAME-reading.md beside the aggregate and ends its section, so
regenerating the page keeps it.

Verdicts (issue 27): each comparison is decided by the wider of its t interval over seeds and its crossed
(seeds x units) bootstrap (`stats.decision`, stored in the aggregate), and its p-value is Holm-adjusted over every
comparison on the page (all the aggregates given), not only its own experiment's. The bootstraps must be fine
enough to decide under Holm over the page (`stats.holm_resolvable`: 200000 resamples decide up to 500 comparisons);
the page is not written while one is not (rebuild it with scripts/reaggregate.py).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ofsdpo.commands.experiment_report import adjust
from ofsdpo.commands.experiment_report import verdict as reading

START, END = "## Claim 1 (SPEC §6.1)", "## Not run in this session"
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# the experiments of docs/results.md, in its order (scripts/generated_blocks.py reads the same list)
PAGE = ["in-domain-sentiment", "in-domain-critic", "in-domain-concise", "on-policy-sentiment", "chase-ablation",
        "cofs-opposed", "cofs-chain", "continual-sentiment-critic-baselines", "frontier-sentiment",
        "frontier-slow-lr-control", "frontier-sentiment-lr4x", "frontier-ablations"]
# a frontier experiment that asks something else than claim 1 itself
FRONTIER_TITLES = {"frontier-ablations": "Ablations (SPEC §6.3) at the long stream: each variant's reward–KL frontier "
                                         "against DPO's"}
NAMES = {"judge_score": "Judge score", "report_loss": "Report DPO loss", "report_accuracy": "Report preference accuracy",
         "win_rate": "Win rate against the base's samples", "kl": "KL to the reference",
         "independent_judge_score": "Independent judge score (AFINN)",
         "online_loss_total": "Cumulative pre-update online loss"}
# where each experiment's runs ran (the page quotes times with the CPU's model); the others ran on the 2-core AMD EPYC
MACHINE = {"frontier-ablations": "2-core Intel Xeon"}
CLAIM = {"better": "**supported**", "worse": "**refuted**", "no difference shown": "**unresolved**",
         "higher": "**higher** (not a KL: no verdict)", "lower": "**lower** (not a KL: no verdict)"}


def machine(name: str) -> str:
    return MACHINE.get(name, "2-core AMD EPYC")


def run_minutes(runs: dict, seeds) -> str:
    """`seed 0 12.3 min; …` of one cell; a run reused from another experiment (by run key) says so: it is not
    counted in the experiment's total and may have run on another machine."""
    def reused(run: dict) -> str:  # the experiment folder the result was found in: <output dir>/runs/<cell>/…
        parts = Path(run["reused_from"]).parts
        return f" (reused from `{parts[parts.index('runs') - 1]}`, not counted)" if "runs" in parts[1:] else \
            " (reused, not counted)"
    return "; ".join(f"seed {s} {runs[str(s)]['wall_seconds'] / 60:.1f} min"
                     + (reused(runs[str(s)]) if runs[str(s)].get("reused_from") else "") for s in seeds)


def verdict(row: dict) -> str:
    """A claim's reading of one comparison under the page's rule (`decided`)."""
    return CLAIM[reading(row)]


def compared(row: dict) -> str:
    """An ablation's reading of one comparison: better or worse than the baseline, or no difference shown."""
    return f"**{reading(row)}**"


def decided(row: dict) -> str:
    """How a comparison was decided, for its verdict line: the deciding interval and the page-adjusted p."""
    d, boot = row["decision"], row.get("crossed_bootstrap")
    t = (f"t interval [{row['lower']:+.4f}, {row['upper']:+.4f}] over {row['n']} seeds" if row.get("lower") is not None
         else f"no t interval ({row['n']} seed)")  # an aggregate of one seed so far
    intervals = (t +
                 (f", crossed bootstrap [{boot['lower']:+.4f}, {boot['upper']:+.4f}]" if boot else
                  " (no per-unit values: t only)"))
    mde = f"; MDE (80 % power) {row['mde']:.4f}" if row.get("mde") is not None else ""
    return (f"{row['mean']:+.4f}, {intervals}; decided by the {d['by']} interval, p {d['p_value']:.3g}, "
            f"Holm over the page's {row['page_comparisons']} comparisons {row['p_holm']:.3g}{mde}")


def with_reading(path: Path, lines: list[str]) -> str:
    """The section's text, with the hand-written reading beside the aggregate (NAME-reading.md) at its end."""
    reading = path.with_name(path.name.replace("-aggregate.json", "-reading.md"))
    if reading.is_file():
        lines += ["", reading.read_text().strip()]
    return "\n".join(lines) + "\n\n"


def section(path: Path, agg: dict) -> str:
    if agg.get("frontier"):
        return frontier_section(path, agg)
    if agg["kind"] == "continual":
        return continual_section(path, agg)
    md = path.with_name(path.name.replace(".json", ".md")).read_text()
    tables = re.findall(r"(\| variant[^\n]*\n(?:\|[^\n]*\n)+)", md)
    seeds = agg["seeds"]
    walls = {}
    for cell, runs in agg["per_seed"].items():
        variant = cell.split("/")[0]
        walls[variant] = run_minutes(runs, seeds)
    name, baseline_name = agg["experiment"], agg["baseline"]
    on_policy = any(v.get("on_policy") for v in agg["config"]["variants"])
    ablation = baseline_name != "dpo"  # variants of one method against one of them (the chase ablation)
    claim = ("the online claim on-policy: OFS-DPO aligns better than DPO when each round is sampled from the "
             "learner and judged" if on_policy else "OFS-DPO aligns better than DPO on the same online stream")
    title = (f"## Ablation (SPEC §3): can the chasing term act? — {name}" if ablation else
             f"{START}{', ' if on_policy else ': '}{claim} — {name}")
    variants = list(dict.fromkeys(row["variant"] for row in agg["paired"]))
    label = (lambda v: f"{v} − {baseline_name}") if ablation else (lambda v: "OFS-DPO − DPO")
    lines = [f"{title}, seeds {', '.join(map(str, seeds))}", "",
             f"Every seed of the plan ran and is reported (seeds {', '.join(map(str, seeds))}); the protocol and "
             "seeds were fixed in the experiment file before any result was read.", "",
             f"### The headline: {'each variant − ' + baseline_name if ablation else 'OFS-DPO − DPO'}, paired by "
             "seed", "", tables[0].rstrip(), ""]
    per_seed, domain = agg["per_seed"], agg["paired"][0]["domain"]
    for v in variants:
        for metric in ("judge_score", "report_loss"):
            diffs = [per_seed[f"{v}/{domain}"][str(s)][metric] - per_seed[f"{baseline_name}/{domain}"][str(s)][metric]
                     for s in seeds]
            lines.append(f"Per seed, {NAMES[metric].lower()} ({label(v)}): "
                         + ", ".join(f"seed {s}: {d:+.4f}" for s, d in zip(seeds, diffs)) + ".")
    lines += ["", "### Both arms", "", tables[1].rstrip(), "", f"![curves](results/{name}-curves.png)", "",
              f"![judge vs KL](results/{name}-reward_kl.png)", "", "### Wall time", ""]
    for v, items in walls.items():
        lines.append(f"- `{v}`: {items}.")
    arms = "both arms" if len(walls) == 2 else f"{len(walls)} variants"
    lines += [f"- The whole experiment: {agg['wall_seconds'] / 60:.0f} min of runs ({arms}, "
              f"{len(seeds)} seeds) on the {machine(name)}, shared with other jobs throughout: upper bounds.", "", "### Verdict", ""]
    for row in agg["paired"]:
        what = (row["title"] if "not a KL" in row["title"] or row["metric"].startswith("frontier/")
                else NAMES.get(row["metric"], row["title"]))
        what += f", {label(row['variant'])}" if ablation or row["metric"].startswith("frontier/") else ""
        lines.append(f"- **{what}**: {decided(row)}: {compared(row) if ablation else verdict(row)}.")
    return with_reading(path, lines)


def _stat(point: dict, key: str, digits: int = 3) -> str:
    s = point.get(key) or {}
    if s.get("mean") is None:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s.get("n", 0) > 1 else f"{s['mean']:.{digits}f}"


def frontier_section(path: Path, agg: dict) -> str:
    """Claim 1 where fast-slow can act (issue 27): each arm's reward–KL frontier over a checkpoint ladder on a long
    stream, the paired frontier headline (judge score at the file's KL budgets, the best judge score and its KL),
    whether the stream reached the regime it is for, the served module, wall time and verdicts."""
    md = path.with_name(path.name.replace(".json", ".md")).read_text()
    tables = re.findall(r"(\| variant[^\n]*\n(?:\|[^\n]*\n)+)", md)
    name, planned, per_seed, config = agg["experiment"], agg["seeds"], agg["per_seed"], agg["config"]
    ran = {cell: [s for s in planned if str(s) in runs] for cell, runs in per_seed.items()}
    everything = all(seeds == planned for seeds in ran.values())
    title = FRONTIER_TITLES.get(name, "Claim 1 where fast-slow can act: the reward–KL frontier on a long stream")
    lines = [f"## {title} — {name}" + (f", seeds {', '.join(map(str, planned))}" if everything else " (interim)"), "",
             _seeds_run(planned, {c.split("/")[0]: s for c, s in ran.items()}, everything) + "; the plan (steps, "
             f"checkpoints {config['checkpoints']}, KL budgets {config['kl_budgets']} nats, seeds) was fixed in the "
             "experiment file before any run.", "",
             f"Stream: {config['steps']} steps × {config['batch_size']} **distinct** pairs (up to "
             f"{config['pairs_per_prompt']} pairs per prompt from {config['samples']} samples, ranked and paired "
             "outside in; the selection set is the best-vs-worst pair of each of the last "
             f"{config['selection']} training prompts, none of them in the stream), lr {config['lr']}. At each "
             "checkpoint every trained module is judged on the 96 held-out samples (common random numbers) with the "
             "exact KL; the served module there is the one with the lower selection loss.", "",
             "### The frontier (mean ± sd over seeds)", "",
             "| arm (module) | step | exact KL | judge score | AFINN | report DPO loss | training DPO loss |",
             "|---|---|---|---|---|---|---|"]
    for cell, roles in agg["frontier"].items():
        for role, curve in roles.items():
            label = cell.split("/")[0] + ("" if role == "default" else f" ({role})")
            for point in curve:
                lines.append(f"| {label} | {point['step']['mean']:.0f} | {_stat(point, 'kl', 2)} | "
                             f"{_stat(point, 'judge_score')} | {_stat(point, 'independent_judge_score')} | "
                             f"{_stat(point, 'report_loss')} | {_stat(point, 'train_loss')} |")
    lines += ["", f"![frontier](results/{name}-frontier.png)", ""]
    served = {}
    for cell, runs in per_seed.items():
        for run in runs.values():
            for point in run.get("frontier") or []:
                if len(point["modules"]) > 1:
                    served.setdefault(cell.split("/")[0], {}).setdefault(point["step"], []).append(point["served"])
    for arm, by_step in served.items():
        lines.append(f"Served module of `{arm}` per checkpoint (over seeds): " + "; ".join(
            f"step {step}: " + ", ".join(f"{m} {by.count(m)}" for m in sorted(set(by))) for step, by in by_step.items())
            + ".")
    lines += ["", "### The headline: each module − DPO, paired by seed", "", tables[0].rstrip(), "",
              "### Wall time", ""]
    for cell, runs in per_seed.items():
        lines.append(f"- `{cell.split('/')[0]}`: {run_minutes(runs, ran[cell])}.")
    lines += [f"- All runs: {agg['wall_seconds'] / 60:.0f} min of runs on the {machine(name)} (see the reading for "
              "the processes and what shared the machine).", "", "### Verdict", ""]
    for row in comparisons(agg):
        lines.append(f"- **{row['title']}, {row['variant']} − {row['baseline']}**: {decided(row)}: {verdict(row)}.")
    return with_reading(path, lines)


def continual_section(path: Path, agg: dict) -> str:
    """Claim 2: each variant against the baseline (sequential DPO) and the file's other comparisons on the average
    final judge score and the average forgetting, paired by seed; every variant's table, the combination chosen per
    stage, the plots, wall time, verdicts. Each variant's seeds are those that have run (an interim aggregate)."""
    md = path.with_name(path.name.replace(".json", ".md")).read_text()
    tables = re.findall(r"(\| variant[^\n]*\n(?:\|[^\n]*\n)+)", md)
    name, planned, per_seed = agg["experiment"], agg["seeds"], agg["per_seed"]
    domains = agg["config"]["domains"]
    ran = {v: [s for s in planned if str(s) in runs] for v, runs in per_seed.items()}
    everything = all(seeds == planned for seeds in ran.values())
    lines = [f"## Claim 2 (SPEC §6.2): COFS-DPO learns a new domain without forgetting the earlier ones — {name} "
             f"({' → '.join(domains)})" + (f", seeds {', '.join(map(str, planned))}" if everything else " (interim)"),
             "",
             _seeds_run(planned, ran, everything) + "; the protocol and seeds were fixed in the experiment file before "
             "any result was read. Forgetting of a domain: its best judge score after any stage that had trained on "
             "it, minus its score at the end.", "",
             f"### The headline: each variant − `{agg['baseline']}`"
             f"{' (and the comparisons the file adds)' if agg['config'].get('compare') else ''}, paired by seed", "",
             tables[0].rstrip(), ""]
    for v, against in dict.fromkeys((row["variant"], row["baseline"]) for row in agg["paired"]):
        seeds = [s for s in ran[v] if s in ran[against]]
        for metric, title in (("avg_final_judge", "average final judge score"),
                              ("avg_forgetting_judge", "average forgetting (judge)")):
            diffs = [per_seed[v][str(s)][metric] - per_seed[against][str(s)][metric] for s in seeds]
            lines.append(f"Per seed, {title} ({v} − {against}): "
                         + ", ".join(f"seed {s}: {d:+.4f}" for s, d in zip(seeds, diffs)) + ".")
    gap, revisit = agg.get("multitask_gap", []), agg.get("revisit", [])
    if gap:
        lines += ["", "### The gap to `multitask` (the upper bound)", "", tables[1].rstrip(), "",
                  "Its p Holm column adjusts over the gap's rows alone; the verdicts below adjust over the page."]
    if revisit:
        lines += ["", "### Relearning the revisited domain against retraining it", "",
                  "Per seed: the served model's score on the revisited domain right after the stage that revisits "
                  "it − its score right after the first visit (the same steps on the same pairs, from a fresh LoRA: "
                  "retraining); t interval over seeds only (an earlier stage's per-prompt scores are not kept).", "",
                  tables[1 + bool(gap)].rstrip(), "",
                  "Its p Holm column adjusts over these rows alone; the verdicts below adjust over the page."]
    lines += ["", "### Every variant", "", tables[1 + bool(gap) + bool(revisit)].rstrip(), "",
              f"![judge matrices](results/{name}-judge_matrices.png)",
              "", f"![training curves](results/{name}-train_curves.png)", ""]
    lines += _combinations(name, domains, per_seed, ran) + ["### Wall time", ""]
    trained = sum(not runs[str(s)].get("reused_from") for v, runs in per_seed.items() for s in ran[v])
    for v, runs in per_seed.items():
        lines.append(f"- `{v}`: {run_minutes(runs, ran[v])}.")
    lines += [f"- The whole experiment: {agg['wall_seconds'] / 60:.0f} min of runs ({len(per_seed)} variants, "
              f"{trained} runs; a stage or score shared by variants counted once) on the "
              f"{machine(name)}.", "",
              "### Verdict" + ("" if everything else " (interim: over the seeds that have run)"), ""]
    for row in comparisons(agg):
        lines.append(f"- **{row['title']}, {row['variant']} − {row['baseline']}**: {decided(row)}: {verdict(row)}.")
    return with_reading(path, lines)


def _seeds_run(planned: list[int], ran: dict[str, list[int]], everything: bool) -> str:
    """Which seeds each variant has run: all of the plan's (`everything`), or (an interim aggregate) which ones."""
    if everything:
        return f"Every seed of the plan ran and is reported (seeds {', '.join(map(str, planned))})"
    return (f"**Interim: not every run of the plan's seeds ({', '.join(map(str, planned))}) has finished**; those "
            "reported are " + "; ".join(f"`{v}` seeds {', '.join(map(str, seeds))}" for v, seeds in ran.items())
            + ", and each paired interval is over the seeds both arms have")


def _combinations(name: str, domains: list[str], per_seed: dict, ran: dict[str, list[int]]) -> list[str]:
    """The λ (pairwise search) or weights (simplex) each searching variant chose after each stage, per seed."""
    searched = [v for v in per_seed if any(r.get("searches") and any(r["searches"]) for r in per_seed[v].values())]
    if not searched:
        return []
    lines = ["### The combination chosen per stage", ""]
    for v in searched:
        for s in ran[v]:
            run = per_seed[v][str(s)]
            chosen = [f"after {domains[k + 1]}: λ {lam}" if lam is not None else
                      f"after {domains[k + 1]}: weights " + ", ".join(f"{d} {w:.2f}" for d, w in weights.items())
                      for k, (lam, weights) in enumerate(zip(run["lambdas"], run["weights"][1:]))]
            lines.append(f"- `{v}`, seed {s}: " + "; ".join(chosen) + ".")
    plot = f"{name}-lambda_search.png"  # pairwise searches only: a simplex search has no λ axis to draw
    return lines + ["", *([f"![λ search](results/{plot})", ""] if (RESULTS / plot).is_file() else [])]


def comparisons(agg: dict) -> list[dict]:
    """Every comparison an aggregate puts on the page: the headline's and (a continual file with `multitask`) the
    gap to multitask's and (a revisiting stream) relearning against retraining, which the aggregate adjusts as
    families of their own but the page adjusts with the rest."""
    return agg["paired"] + agg.get("multitask_gap", []) + agg.get("revisit", [])


def page_adjusted(aggregates: list[dict]) -> int:
    """Holm over every comparison of the page (`comparisons`): each row's p_holm becomes the page's (and its count
    is kept as "page_comparisons"); returns the count. Exits, naming the aggregates to rebuild, where a
    bootstrap's resamples are too few to decide under Holm over the page (`stats.holm_resolvable`)."""
    rows = [row for agg in aggregates for row in comparisons(agg)]
    try:
        adjust(rows)
    except ValueError as err:
        raise SystemExit(f"docs/results.md: {err}; rebuild them: python scripts/reaggregate.py "
                         "docs/results/NAME-aggregate.json ...") from None
    for row in rows:
        row["page_comparisons"] = len(rows)
    return len(rows)


def main(aggregates: list[str], page: str = "docs/results.md") -> None:
    text = Path(page).read_text()
    start, end = text.index(START), text.index(END)
    loaded = [json.loads(Path(a).read_text()) for a in aggregates]
    page_adjusted(loaded)
    Path(page).write_text(text[:start] + "".join(section(Path(a), agg) for a, agg in zip(aggregates, loaded))
                          + text[end:])


if __name__ == "__main__":
    main(sys.argv[1:] or [str(RESULTS / f"{name}-aggregate.json") for name in PAGE
                          if (RESULTS / f"{name}-aggregate.json").is_file()])
