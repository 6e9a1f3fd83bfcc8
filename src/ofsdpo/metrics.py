"""metrics.jsonl (one row per optimiser step, TRL's metric names) and optional TensorBoard or Weights & Biases."""

from __future__ import annotations

import json
import os
from pathlib import Path


# running totals and positions: a row written every --logging-steps N steps gives the last step's, not a mean
LATEST_KEYS = frozenset({"step", "epoch", "pairs_seen", "num_tokens", "nonfinite_steps_skipped", "chase/swaps"})


def window_row(rows: list[dict]) -> dict:
    """One metrics row for the steps of a --logging-steps window, as TRL logs: each number the mean over the rows
    that hold it, running totals (`LATEST_KEYS`) and text (a leader's name) the last row's."""
    merged: dict = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row[key] for row in rows if key in row]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        merged[key] = sum(values) / len(values) if numbers and key not in LATEST_KEYS else values[-1]
    return merged


class MetricsLogger:
    def __init__(self, path: Path, tensorboard_dir: Path | None = None, resume_step: int | None = None,
                 wandb_config: dict | None = None, logging_steps: int = 1, run_name: str | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            # a resumed run rewrites what came after its checkpoint: no row is lost or repeated
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif self.path.exists():
            self.path.unlink()
        self.logging_steps, self.window = logging_steps, []
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
        self.wandb = None
        if wandb_config is not None:  # project from WANDB_PROJECT (default ofsdpo); WANDB_MODE=offline needs no login
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ofsdpo"), dir=str(self.path.parent),
                                    config=wandb_config, name=run_name or self.path.parent.name)

    def log(self, row: dict) -> None:
        """One optimiser step's row: written at once, or every `logging_steps` steps as their window's mean."""
        self.window.append(row)
        if row["step"] % self.logging_steps == 0:
            self.flush()

    def flush(self) -> None:
        """Write the rows of the window not yet written (one row for them all)."""
        if self.window:
            rows, self.window = self.window, []
            self._write(rows[0] if len(rows) == 1 else window_row(rows))

    def write(self, row: dict) -> None:
        """A row of its own, after the window's: what happened between steps (rounds of ties only)."""
        self.flush()
        self._write(row)

    def _write(self, row: dict) -> None:
        row = {"step": row["step"], **row}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                           step=row["step"])

    def close(self) -> None:
        self.flush()  # the last step is always written, whatever --logging-steps
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_run_metrics(output_dir: Path, config, resume_step: int | None) -> MetricsLogger:
    """A training run's metrics.jsonl in `output_dir`, with TensorBoard (runs/, or runs/<--run-name>) or Weights &
    Biases as `config`'s --report-to says, a row every --logging-steps steps; `resume_step`: a resumed run's step,
    the rows after it dropped."""
    report_to, run_name = config.report_to, config.run_name
    tensorboard = output_dir / "runs" / (run_name or "") if report_to == "tensorboard" else None
    return MetricsLogger(output_dir / "metrics.jsonl", tensorboard, resume_step,
                         wandb_config=config.to_dict() if report_to == "wandb" else None,
                         logging_steps=config.logging_steps, run_name=run_name)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_curve(paths: str | Path | list[str | Path], key: str, *fallbacks: str) -> list:
    """One metric per logged step, from one metrics.jsonl or several read one after another (a continual run's
    stages): each row's `key`, else its first present fallback (e.g. `read_curve(p, "fast/loss", "loss")`: the
    fast module's loss under ofs-dpo, the module's under dpo), else None."""
    curve = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for row in read_metrics(path):
            curve.append(next((row[k] for k in (key, *fallbacks) if k in row), None))
    return curve


def continual_stage_curves(run_dir: str | Path, domains: list[str]) -> list[list]:
    """A continual run's training DPO loss per step (the fast module's under ofs-dpo), one list per stage."""
    return [read_curve(Path(run_dir) / "domains" / f"{k + 1}-{name}" / "metrics.jsonl", "fast/loss", "loss")
            for k, name in enumerate(domains)]


def continual_loss_curve(run_dir: str | Path, domains: list[str]) -> list:
    """`continual_stage_curves`, its stages one after another."""
    return [value for stage in continual_stage_curves(run_dir, domains) for value in stage]
