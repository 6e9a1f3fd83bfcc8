"""Rebuild committed aggregates under the current report code, from the runs they hold (nothing is run again):
the paired rows with today's verdict rule (the wider of the t interval and the crossed bootstrap, Holm over the
experiment's rows), derived metrics (cumulative online loss), the tables and the plots.

    python scripts/reaggregate.py docs/results/in-domain-sentiment-aggregate.json ...

Each argument is a NAME-aggregate.json in a folder of results (docs/results/): it is rewritten with
NAME-aggregate.md and the plots beside it, the plots under the names the aggregate.md links.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from ofsdpo.commands.experiment_report import write_aggregate
from ofsdpo.config import ExperimentConfig


def reaggregate(path: Path) -> list[Path]:
    agg = json.loads(path.read_text(encoding="utf-8"))
    config = ExperimentConfig(**agg["config"])
    results = {cell: {int(seed): result for seed, result in runs.items()} for cell, runs in agg["per_seed"].items()}
    stem = path.name.removesuffix("-aggregate.json")
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        write_aggregate(Path(tmp), config, results)
        for made in sorted(Path(tmp).iterdir()):
            name = f"{stem}-{made.name}" if made.name.startswith("aggregate.") else made.name
            written.append(Path(shutil.copyfile(made, path.parent / name)))
    return written


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python scripts/reaggregate.py NAME-aggregate.json ...")
    for argument in sys.argv[1:]:
        for path in reaggregate(Path(argument)):
            print(path)
