"""Each ablation of an OFS-DPO ablation experiment against the default OFS-DPO of another experiment, seed by seed,
where both ran on the same pairs (equal DPO run keys): descriptive paired differences with t intervals over the
seeds the two share, not verdicts (the comparison was not among the ablation file's own).

    python scripts/ablation_vs_default.py docs/results/frontier-ablations-aggregate.json \
        docs/results/frontier-sentiment-aggregate.json --default ofs-dpo/sentiment

Per seed: the end-of-run judge score, independent judge score, exact KL, report DPO loss, cumulative online loss
and swaps; the served and slow modules' judge score at each KL budget (each seed's curve interpolated between its
checkpoints) and their best judge score with its KL. Prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ofsdpo.commands.experiment_report import frontier_curves, frontier_metrics
from ofsdpo.errors import ConfigError
from ofsdpo.files import read_json
from ofsdpo.stats import paired_difference

END = [("judge_score", "judge score"), ("independent_judge_score", "independent judge score"),
       ("kl", "KL(π‖π_ref), nats"), ("report_loss", "report DPO loss"),
       ("online_loss_total", "cumulative online loss"), ("swaps", "swaps")]


def load(path: Path) -> dict:
    try:
        return read_json(path, "pass an aggregate.json written by `ofsdpo experiment` or scripts/aggregate_runs.py.")
    except ConfigError as err:  # one line, not a traceback
        raise SystemExit(str(err)) from None


def same_pairs(ablations: dict, default: dict) -> None:
    """The two experiments' baselines must be the same runs (equal keys): else their pairs or protocol differ."""
    domain = ablations["config"]["domains"][0]
    mine = ablations["per_seed"].get(f"{ablations['baseline']}/{domain}", {})
    theirs = default["per_seed"].get(f"{default['baseline']}/{domain}", {})
    for seed in set(mine) & set(theirs):
        if mine[seed].get("run_key") != theirs[seed].get("run_key"):
            raise SystemExit(f"seed {seed}: the baselines' run keys differ ({mine[seed].get('run_key')} vs "
                             f"{theirs[seed].get('run_key')}): not the same pairs and protocol, no comparison")


def _words(metric: str) -> str:
    if metric.startswith("judge_at_kl_"):
        return f"judge score at KL {metric.removeprefix('judge_at_kl_')} nats"
    return {"best_judge": "best judge score", "kl_at_best": "KL at its best judge score"}[metric]


def per_seed_values(result: dict, budgets: list[float]) -> dict[str, float]:
    values = {title: result.get(key) for key, title in END}
    curves = frontier_curves(result)
    for role in ("served", "slow"):
        if role in curves:
            for metric, (value, _) in frontier_metrics(curves[role], budgets).items():
                values[f"{role}: {_words(metric)}"] = value
    return values


def rows(ablations: dict, default: dict, default_cell: str) -> list[str]:
    budgets = ablations["config"]["kl_budgets"]
    theirs = default["per_seed"][default_cell]
    out = ["| ablation − default | metric | seeds | mean diff | 95 % CI (t) | per seed (ablation − default) |",
           "|---|---|---|---|---|---|"]
    for cell, runs in ablations["per_seed"].items():
        if cell.startswith(f"{ablations['baseline']}/"):
            continue
        seeds = sorted(set(runs) & set(theirs), key=int)
        if not seeds:
            continue
        mine_values = {s: per_seed_values(runs[s], budgets) for s in seeds}
        their_values = {s: per_seed_values(theirs[s], budgets) for s in seeds}
        for metric in mine_values[seeds[0]]:
            pairs = [(mine_values[s].get(metric), their_values[s].get(metric)) for s in seeds]
            if any(a is None or b is None for a, b in pairs):
                continue
            a, b = [float(x) for x, _ in pairs], [float(y) for _, y in pairs]
            diff = paired_difference(a, b)
            ci = f"[{diff['lower']:+.4f}, {diff['upper']:+.4f}]" if diff.get("lower") is not None else "-"
            each = ", ".join(f"{x - y:+.3f}" for x, y in zip(a, b))
            out.append(f"| {cell.split('/')[0]} | {metric} | {','.join(seeds)} | {diff['mean']:+.4f} | {ci} | {each} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ablations", type=Path, help="the ablation experiment's aggregate.json")
    parser.add_argument("default", type=Path, help="the aggregate.json holding the default OFS-DPO's runs")
    parser.add_argument("--default-cell", default="ofs-dpo/sentiment", help="its cell (default: ofs-dpo/sentiment)")
    args = parser.parse_args(argv)
    ablations, default = load(args.ablations), load(args.default)
    if args.default_cell not in default.get("per_seed", {}):
        raise SystemExit(f"{args.default}: no cell {args.default_cell!r} in its per_seed")
    same_pairs(ablations, default)
    print("\n".join(rows(ablations, default, args.default_cell)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
