"""Wall time of `ofsdpo --help` and `ofsdpo <command> --help` (issue 15: each under 2 s, through lazy imports).

    python bench/cli_help.py [--repeats 5] [--json out.json]

Each command runs in a fresh interpreter (`python -m ofsdpo ...`), as a user would start it; the median of the
repeats is reported with the slowest. Deliberately not a timed test: a shared CI machine would make it flaky
(tests/test_cli.py checks instead that no --help imports torch or transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [[], ["train"], ["continual"], ["generate"], ["demo"], ["eval"], ["experiment"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for command in COMMANDS:
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ofsdpo", *command, "--help"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - start)
        rows.append({"command": " ".join(["ofsdpo", *command, "--help"]), "median_s": statistics.median(seconds),
                     "max_s": max(seconds)})
        print(f"{rows[-1]['command']:<30} median {rows[-1]['median_s']:.2f} s  max {rows[-1]['max_s']:.2f} s")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"rows": rows, "python": platform.python_version(), "cpus": os.cpu_count(), "load_average_1m": load,
              "under_2s": all(r["median_s"] < 2 for r in rows)}
    print(f"load average {load}; every median under 2 s: {result['under_2s']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
