"""Aggregate an experiment whose seeds ran in several processes, each with its own --output-dir, without running
anything: every finished run (runs/<cell>/seed-<s>/result.json) of the given folders whose run key is the one the
experiment computes now is taken, and the aggregate (aggregate.json, aggregate.md, plots) is written to --out.

    python scripts/aggregate_runs.py experiments/frontier-sentiment.yaml \
        experiments-output/frontier-sentiment-a experiments-output/frontier-sentiment-b --out docs-ready/frontier

Run it where the experiment ran (its data_dir holds the sampled pairs the keys hash). A run whose key differs (the
file or the code changed what it computes) is refused, naming it; two folders holding the same run must agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ofsdpo.commands.experiment import ExperimentRunner
from ofsdpo.commands.experiment_report import write_aggregate
from ofsdpo.config import ExperimentConfig


def collect(config: ExperimentConfig, folders: list[Path], out: Path) -> dict[str, dict[int, dict]]:
    """{cell: {seed: result}} of every finished run in `folders`, each checked against today's run key."""
    runner = ExperimentRunner(config, out, progress=False, verbose=False)
    results: dict[str, dict[int, dict]] = {}
    for cell, variant, domain in config.cells():
        for seed in config.seeds:
            found = [folder / "runs" / cell / f"seed-{seed}" / "result.json" for folder in folders]
            found = [path for path in found if path.is_file()]
            if not found:
                continue
            key = runner.run_key(variant, domain, seed)
            loaded = [json.loads(path.read_text(encoding="utf-8")) for path in found]
            for path, result in zip(found, loaded):
                if result.get("run_key") != key:
                    raise SystemExit(f"{path}: run key {result.get('run_key')} is not the experiment's {key} (the "
                                     "file or the code changed what it computes): not aggregated")
            results.setdefault(cell, {})[seed] = loaded[0]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path, help="the experiment's YAML file")
    parser.add_argument("folders", type=Path, nargs="+", help="the processes' --output-dir folders")
    parser.add_argument("--out", type=Path, required=True, help="where the aggregate goes")
    args = parser.parse_args(argv)
    config = ExperimentConfig.from_yaml(args.experiment)
    results = collect(config, args.folders, args.out)
    if not results:
        raise SystemExit(f"no finished run of {config.name} in {', '.join(map(str, args.folders))}")
    write_aggregate(args.out, config, results)
    seeds = sorted({seed for runs in results.values() for seed in runs})
    print(f"{config.name}: {sum(map(len, results.values()))} runs of seeds {seeds} -> {args.out / 'aggregate.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
