"""Keep an unfinished experiment's finished runs in the repository, so that a later sitting, on any machine, goes on
from them (experiments/in-progress/README.md):

    python scripts/keep_runs.py experiments-output/continual-chain-baselines \
        experiments/in-progress/continual-chain-baselines

Copies every `runs/…/result.json` under the output folder that is not there yet, as `ofsdpo experiment` wrote it (with
its run key), laid out the same way. A result reused from another experiment (`reused_from`) is left out: its own
experiment's aggregate holds it, and the rerun reuses it again. A result already kept is left as it is.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ofsdpo.errors import ConfigError
from ofsdpo.files import read_json


def keep(output_dir: Path, kept_dir: Path) -> list[Path]:
    if not (output_dir / "runs").is_dir():
        raise SystemExit(f"{output_dir}: no runs/ folder (not an `ofsdpo experiment` --output-dir).")
    written = []
    for result in sorted((output_dir / "runs").rglob("seed-*/result.json")):  # a run's, not a stage's
        target = kept_dir / result.relative_to(output_dir)
        if target.is_file() or "reused_from" in read_json(result, f"remove {result.parent} and run it again."):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result, target)
        written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/keep_runs.py EXPERIMENT_OUTPUT_DIR KEPT_DIR")
    try:
        kept = keep(Path(sys.argv[1]), Path(sys.argv[2]))
    except ConfigError as err:  # a damaged result.json: one line naming it, not a traceback
        raise SystemExit(str(err)) from None
    for path in kept:
        print(path)
