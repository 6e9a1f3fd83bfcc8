"""metrics.jsonl (one row per optimiser step, TRL's metric names) and optional TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, path: Path, tensorboard_dir: Path | None = None, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            # a resumed run rewrites what came after its checkpoint: no row is lost or repeated
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def log(self, row: dict) -> None:
        row = {"step": row["step"], **row}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
