"""The output folder of a training run: what marks it as holding a run, and when it may be (over)written."""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import list_checkpoints
from .config import ConfigError

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json")


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder we must not write to; nothing is written here (bad data may still stop the run)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file, not a directory.")
    held = [m for m in RUN_MARKERS if (output_dir / m).exists()]
    if held and not (resume or overwrite):
        raise ConfigError(f"--output-dir {output_dir} holds another run ({', '.join(held)}); "
                          "pass --resume to continue it or --overwrite to replace it.")
    if resume and not list_checkpoints(output_dir / "checkpoints"):
        raise ConfigError(f"--resume: no checkpoint in {output_dir / 'checkpoints'}.")


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the folder; with --overwrite, remove the other run only now that data and model have loaded."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        for marker in RUN_MARKERS:
            path = output_dir / marker
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
