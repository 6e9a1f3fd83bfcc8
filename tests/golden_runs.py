"""Golden runs: fixed-seed tiny-model commands whose adapters and metrics must not change under a refactor.

`python tests/golden_runs.py` (from the repository root, with the package installed) writes tests/golden/ from the
current code; test_golden.py reruns the same commands and compares. The files in tests/golden/ were written by the
commit before the restructuring of issue 13, so a change of behaviour there shows up as a failing test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden"
# wall-clock measurements differ from run to run; everything else in metrics.jsonl must be reproduced
TIMING_KEYS = {"tokens_per_second", "pairs_per_second", "train_runtime", "seconds"}


def pairs(good: str, bad: str, n: int, word: str) -> list[dict]:
    return [{"prompt": f"{word} {i}: it was", "chosen": f" {good}.", "rejected": f" {bad}."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def commands(model_dir: Path, work: Path) -> dict[str, list[str]]:
    """{name: argv of `ofsdpo`}. The train run is built to make the slow module overtake (a high fast rate that
    overshoots, a short chase window), so the golden metrics contain swaps."""
    work.mkdir(parents=True, exist_ok=True)
    pos = write_jsonl(work / "pos.jsonl", pairs("great and warm", "awful and cold", 24, "Review"))
    safe = write_jsonl(work / "safe.jsonl", pairs("sorry, I cannot help", "sure, here is how", 24, "Request"))
    common = ["--model", str(model_dir), "--lora-r", "2", "--lora-alpha", "4", "--lora-dropout", "0.0",
              "--max-length", "48", "--max-prompt-length", "24", "--save-steps", "0", "--no-progress", "--seed", "0",
              "--batch-size", "4", "--overwrite"]
    return {
        "train-ofs-dpo": ["train", "--method", "ofs-dpo", "--data", pos, "--output-dir", str(work / "train-ofs-dpo"),
                          "--lr", "0.05", "--slow-lr-ratio", "0.2", "--alpha", "0.5", "--chase-interval", "1",
                          "--max-grad-norm", "0", *common],
        "continual-cofs-dpo": ["continual", "--method", "cofs-dpo", "--domain", f"pos={pos}", "--domain",
                               f"safe={safe}", "--output-dir", str(work / "continual-cofs-dpo"), "--lr", "0.005",
                               "--memory-size", "4", "--heldout-size", "4", "--max-steps-per-domain", "3",
                               "--lambda-grid", "0,0.5,1", "--no-regret", "--combine", "delta", *common,
                               # the code that wrote the golden files chose each stage's best fast module on the
                               # held-out pairs; that is `--selection heldout` now (the default became `memory`)
                               "--selection", "heldout"],
    }


def adapter_files(run_dir: Path) -> list[Path]:
    return sorted(p.relative_to(run_dir) for p in run_dir.rglob("adapter_model.safetensors")
                  if "checkpoints" not in p.parts)


def metrics_files(run_dir: Path) -> list[Path]:
    return sorted(p.relative_to(run_dir) for p in run_dir.rglob("metrics.jsonl"))


def strip_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def run_all(model_dir: Path, work: Path) -> dict[str, Path]:
    from ofsdpo.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float32 sums in one fixed order: the same bits on every machine like this one
    try:
        outputs = {}
        for name, argv in commands(model_dir, work).items():
            assert main(argv) == 0, name
            outputs[name] = work / name
        return outputs
    finally:
        torch.set_num_threads(threads)


def write_golden() -> None:
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "tiny-llama")
        if GOLDEN.exists():
            shutil.rmtree(GOLDEN)
        for name, run_dir in run_all(model_dir, tmp / "runs").items():
            target = GOLDEN / name
            for rel in adapter_files(run_dir):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                save_file(load_file(run_dir / rel), target / rel)
            for rel in metrics_files(run_dir):
                rows = [strip_timing(json.loads(line)) for line in (run_dir / rel).read_text().splitlines()]
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                write_jsonl(target / rel, rows)
            for extra in ("summary.json", "report.json"):
                if (run_dir / extra).is_file():
                    summary = {k: v for k, v in json.loads((run_dir / extra).read_text()).items()
                               if k not in TIMING_KEYS and k not in ("model", "data")}
                    (target / extra).write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")
    print(f"golden runs written to {GOLDEN}")


if __name__ == "__main__":
    write_golden()
