"""Put an experiment's finished runs back from its committed aggregate, so that `ofsdpo experiment` skips them and
runs only the rest (a run is skipped when its result.json holds the run key the experiment computes now).

    python scripts/restore_runs.py docs/results/cofs-chain-aggregate.json experiments-output/cofs-chain
    ofsdpo experiment experiments/cofs-chain.yaml     # the seeds not in the aggregate; then the whole aggregate

The aggregate's `per_seed` holds every run's result as `ofsdpo experiment` wrote it (with its run key). An existing
result.json is left as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ofsdpo.files import write_json


def restore(aggregate: Path, output_dir: Path) -> list[Path]:
    try:
        per_seed = json.loads(aggregate.read_text(encoding="utf-8"))["per_seed"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{aggregate}: not an aggregate.json written by `ofsdpo experiment` (need its per_seed: "
                         f"{type(err).__name__}: {err})") from None
    written = []
    for cell, runs in per_seed.items():
        for seed, result in runs.items():
            path = output_dir / "runs" / cell / f"seed-{seed}" / "result.json"
            if path.is_file() or "run_key" not in result:
                continue
            written.append(write_json(path, result))
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/restore_runs.py AGGREGATE.json EXPERIMENT_OUTPUT_DIR")
    for path in restore(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path)
