"""Everything a resumed run needs besides tensors: one dataclass, saved as `trainer_state.json` by `to_dict` and
read back by `from_dict` (the tensors — adapters, optimiser, reference cache, RNG — travel beside it)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .chasing import ChaseState

logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    method: str
    num_pairs: int = 0  # pairs in the stream (on-policy: generated so far)
    data_fingerprint: Optional[str] = None  # hash of the tokenized stream (None on-policy)
    step: int = 0  # optimiser steps done
    position: int = 0  # pairs of the stream consumed
    round_end: int = 0  # stream position where the current round ends
    prompt_position: int = 0  # on-policy: prompts used
    ties_skipped: int = 0  # on-policy: prompts whose best and worst samples tied
    num_tokens: int = 0
    online_losses: list[dict] = field(default_factory=list)  # each round's pre-update loss per module (SPEC §5)
    chase: ChaseState = field(default_factory=ChaseState)
    reference_computed_pairs: int = 0
    nonfinite_skipped: int = 0  # steps skipped for a non-finite loss or gradient
    nonfinite_in_a_row: int = 0
    generated_pairs: Optional[list[dict]] = None  # on-policy: the pairs generated so far are part of the state
    best: Optional[dict[str, Any]] = None  # step, loss and accuracy of the best fast module (its weights: adapters)
    train_seconds: float = 0.0  # training time up to the checkpoint: `train_runtime` counts a resumed run whole

    def count_finite(self, finite: bool, max_in_a_row: int) -> bool:
        """Count a step whose loss and gradient were finite or not (its update skipped, with a warning naming the
        streak and the limit it stops at, --max-nonfinite-steps); returns `finite`."""
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        self.nonfinite_skipped += 0 if finite else 1
        if not finite:
            logger.warning("step %d: non-finite loss or gradient; the update was skipped (%d in a row, %d in all; the "
                           "run stops at %d in a row, --max-nonfinite-steps)", self.step, self.nonfinite_in_a_row,
                           self.nonfinite_skipped, max_in_a_row)
        return finite

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainerState":
        """Keys this version does not know are ignored; missing ones (older checkpoints) take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["chase"] = ChaseState.from_state_dict(values.get("chase") or ChaseState().state_dict())
        return cls(**values)


def run_summary(state: TrainerState, run: dict, seconds: float, served: tuple[str, str, dict], regret: list[dict],
                inputs: dict, processes: dict, on_policy=None, num_pairs: int = 0) -> dict:
    """summary.json's numbers but the method's own: `run` (method, model, gguf_file), what `state` counted, the
    served module (`served`: module, why, the modules' scores) and the run's online regret, the `inputs` (data
    statistics, reference pairs computed) and the `processes` (`Processes.describe`); on-policy, the `on_policy`
    domain's prompts used and the `num_pairs` generated; the best fast module where one was tracked."""
    module, basis, scores = served
    summary = {**run, "steps": state.step, "pairs_seen": state.position, "rounds": len(state.online_losses),
               "num_tokens": state.num_tokens, "train_runtime": seconds, "served_module": module, "served_by": basis,
               "module_scores": scores, **inputs, "online_regret": regret[-1]["regret"] if regret else None,
               **processes, "nonfinite_steps_skipped": state.nonfinite_skipped}
    if on_policy is not None:
        summary["on_policy"] = {"domain": on_policy.name, "prompts_used": state.prompt_position,
                                "pairs_generated": num_pairs, "ties_skipped": state.ties_skipped}
    if state.best is not None:
        summary["best_fast"] = dict(state.best)
    return summary


@dataclass
class TrainResult:
    """What `OFSDPOTrainer.train()` returns, so that no caller reads the trainer's internals."""

    summary: dict[str, Any]  # summary.json: steps, pairs, served module and why, ...
    output_dir: Path  # the run's folder: the served adapter at its root, metrics.jsonl, checkpoints/
    modules: tuple[str, ...]  # the trained modules, by adapter name in the model (`dpo`: default; fast, slow)
    best: Optional[dict[str, Any]]  # the best fast module on --eval-data: step, loss, accuracy, weights ("state")
    online_losses: list[dict]  # each round's pre-update loss per module (SPEC §5)
    pairs: list[dict]  # the stream's pairs (on-policy: those the run sampled)

    @property
    def served_module(self) -> str:
        return self.summary["served_module"]

    @property
    def steps(self) -> int:
        return self.summary["steps"]
