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


def restore(aggregate: Path, output_dir: Path) -> list[Path]:
    per_seed = json.loads(aggregate.read_text(encoding="utf-8"))["per_seed"]
    written = []
    for cell, runs in per_seed.items():
        for seed, result in runs.items():
            path = output_dir / "runs" / cell / f"seed-{seed}" / "result.json"
            if path.is_file() or "run_key" not in result:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
            written.append(path)
    return written


if __name__ == "__main__":
    for path in restore(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path)
