"""Rewrite docs/results.md's result sections from experiments' aggregates (no hand-typed numbers): claim 1 and the
chase ablation from in-domain experiments, claim 2 from continual ones.

    python scripts/results_sections.py docs/results/in-domain-sentiment-aggregate.json \
        docs/results/in-domain-critic-aggregate.json docs/results/cofs-opposed-aggregate.json

Each argument is an aggregate.json with its aggregate.md beside it (as `ofsdpo experiment` writes them, or copied
into docs/results/ as NAME-aggregate.{json,md}); one section per experiment, in the order given. A reading written
by hand (what the numbers say together) lives in NAME-reading.md beside the aggregate and ends its section, so
regenerating the page keeps it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

START, END = "## Claim 1 (SPEC §6.1)", "## Not run in this session"
NAMES = {"judge_score": "Judge score", "report_loss": "Report DPO loss", "report_accuracy": "Report preference accuracy",
         "win_rate": "Win rate against the base's samples", "kl": "KL to the reference"}


LOWER_IS_BETTER = ("report_loss", "kl", "avg_forgetting_judge", "avg_final_loss", "final_memory_loss")


def verdict(row: dict) -> str:
    if row["lower"] > 0 or row["upper"] < 0:
        better = (row["mean"] < 0) if row["metric"] in LOWER_IS_BETTER else (row["mean"] > 0)
        return "**supported**" if better else "**refuted**"
    return "**unresolved**"


def with_reading(path: Path, lines: list[str]) -> str:
    """The section's text, with the hand-written reading beside the aggregate (NAME-reading.md) at its end."""
    reading = path.with_name(path.name.replace("-aggregate.json", "-reading.md"))
    if reading.is_file():
        lines += ["", reading.read_text().strip()]
    return "\n".join(lines) + "\n\n"


def compared(row: dict) -> str:
    """An ablation's reading of one metric: the variant is better or worse than the baseline, or no different."""
    if row["lower"] > 0 or row["upper"] < 0:
        better = (row["mean"] < 0) if row["metric"] in LOWER_IS_BETTER else (row["mean"] > 0)
        return "**better**" if better else "**worse**"
    return "**no difference shown**"


def section(path: Path) -> str:
    agg = json.loads(path.read_text())
    if agg["kind"] == "continual":
        return continual_section(path, agg)
    md = path.with_name(path.name.replace(".json", ".md")).read_text()
    tables = re.findall(r"(\| variant[^\n]*\n(?:\|[^\n]*\n)+)", md)
    seeds = agg["seeds"]
    walls = {}
    for cell, runs in agg["per_seed"].items():
        variant = cell.split("/")[0]
        walls[variant] = [f"seed {seed} {runs[str(seed)]['wall_seconds'] / 60:.1f} min" for seed in seeds]
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
        lines.append(f"- `{v}`: " + "; ".join(items) + ".")
    arms = "both arms" if len(walls) == 2 else f"{len(walls)} variants"
    lines += [f"- The whole experiment: {agg['wall_seconds'] / 60:.0f} min of runs ({arms}, "
              f"{len(seeds)} seeds) on the 2-core AMD EPYC, shared with other jobs throughout: upper bounds.", "", "### Verdict", ""]
    for row in agg["paired"]:
        boot = row["bootstrap"]
        what = NAMES.get(row["metric"], row["title"]) + (f", {label(row['variant'])}" if ablation else "")
        lines.append(f"- **{what}**: {row['mean']:+.4f}, t interval "
                     f"[{row['lower']:+.4f}, {row['upper']:+.4f}] over {row['n']} seeds, bootstrap over the units "
                     f"[{boot['lower']:+.4f}, {boot['upper']:+.4f}]; smallest effect this run could detect "
                     f"(MDE, 80 % power) {row['mde']:.4f}: {compared(row) if ablation else verdict(row)}.")
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
    lines += ["", "### Every variant", "", tables[1].rstrip(), "", f"![judge matrices](results/{name}-judge_matrices.png)",
              "", f"![training curves](results/{name}-train_curves.png)", ""]
    lines += _combinations(name, domains, per_seed, ran) + ["### Wall time", ""]
    for v, runs in per_seed.items():
        lines.append(f"- `{v}`: " + "; ".join(f"seed {s} {runs[str(s)]['wall_seconds'] / 60:.1f} min" for s in ran[v])
                     + ".")
    lines += [f"- The whole experiment: {agg['wall_seconds'] / 60:.0f} min of runs ({len(per_seed)} variants, "
              f"{sum(map(len, ran.values()))} runs; a stage or score shared by variants counted once) on the 2-core "
              "AMD EPYC.", "", "### Verdict" + ("" if everything else " (interim: over the seeds that have run)"), ""]
    for row in agg["paired"]:
        lines.append(f"- **{row['title']}, {row['variant']} − {row['baseline']}**: {row['mean']:+.4f}, t interval "
                     f"[{row['lower']:+.4f}, {row['upper']:+.4f}] over {row['n']} seeds; smallest effect this run "
                     f"could detect (MDE, 80 % power) {row['mde']:.4f}: {verdict(row)}.")
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
    return lines + ["", f"![λ search](results/{name}-lambda_search.png)", ""]


def main(aggregates: list[str], page: str = "docs/results.md") -> None:
    text = Path(page).read_text()
    start, end = text.index(START), text.index(END)
    Path(page).write_text(text[:start] + "".join(section(Path(a)) for a in aggregates) + text[end:])


if __name__ == "__main__":
    main(sys.argv[1:])
