"""Work that continual runs over one base model share: a stage trained, or a served module scored, once for every run
that would compute it alike (an experiment's variants of one seed, the demo's methods).

The first stage of `cofs-dpo --init previous` and `--init fresh` is the same training (OFS-DPO from scratch on the
first domain), as is every stage of two `--init fresh` runs that differ only in their λ search, and the first stage
of `dpo` and `lora-merge`; a module served by two runs (the same first-stage module) scores the same. A key is a hash
of everything the result depends on — the stage's options, the tokenized stream and selection pairs, the weights it
starts from (or the served weights), the base model object — so a hit is the same computation, never a similar
one. A reused stage's folder is a copy of the first one's (metrics, adapters, summary), its config.yaml its own.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .config import CADENCE, OUTPUT, ContinualConfig, OFSDPOConfig, options_with_role
from .files import write_atomic
from .modules import adapter_state, load_adapter_state
from .rundir import LOCK_NAME, STAGE_FOLDER, config_yaml
from .state import TrainResult
from .stream import fingerprint

# options that say when a stage saves and where it reports, not what it computes (their role, `config.base`); those
# of how it runs (device, threads) stay in the key: a hit must be the very computation, to the last bit
NOT_COMPUTED = options_with_role((OFSDPOConfig, ContinualConfig), CADENCE, OUTPUT)


def _json(value: Any) -> bytes:
    """Canonical JSON: keys sorted, sets as sorted lists (their order would vary), anything else as str."""
    return json.dumps(value, sort_keys=True,
                      default=lambda o: sorted(map(str, o)) if isinstance(o, (set, frozenset)) else str(o)).encode()


def _add_state(digest, state: dict[str, torch.Tensor]) -> None:
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


class SharedWork:
    """Trained stages and scores, by key (see the module docstring); one per base model and seed."""

    def __init__(self):
        self.trained: dict[str, dict] = {}
        self.scored: dict[str, Any] = {}

    # --- training -----------------------------------------------------------------------------------------------------
    def training_key(self, trainer, initial: dict | None) -> str:
        options = {k: v for k, v in trainer.config.to_dict().items() if k not in NOT_COMPUTED}
        digest = hashlib.sha256(_json(options))
        digest.update(f"base {id(trainer.model.get_base_model())}".encode())
        digest.update(f"stream {trainer.stream.fingerprint()}".encode())
        digest.update(f"selection {fingerprint(trainer.eval) if trainer.eval is not None else None}".encode())
        if initial is not None:
            _add_state(digest, initial)
        return digest.hexdigest()

    def train(self, trainer, initial: dict | None) -> TrainResult:
        """`trainer.train()`'s result (its summary, the best fast module, the stage folder, its modules' weights
        left in `trainer.model`): computed, or restored from the same stage run before. `initial`: the weights both
        modules were loaded with, or None."""
        key = self.training_key(trainer, initial)
        hit = self.trained.get(key)
        if hit is None or not Path(hit["result"].output_dir).is_dir():
            result = trainer.train()
            self.trained[key] = {"modules": {n: adapter_state(trainer.model, n) for n in result.modules},
                                 "result": _copied(result), "rng": torch.get_rng_state()}
            return result
        for name, state in hit["modules"].items():
            load_adapter_state(trainer.model, name, state)
        out = trainer.output_dir
        if trainer.processes.is_main:
            shutil.copytree(hit["result"].output_dir, out, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(STAGE_FOLDER, "checkpoints", LOCK_NAME))
            write_atomic(out / "config.yaml", config_yaml(trainer.config.to_dict(), trainer.source_notes))
        torch.set_rng_state(hit["rng"])  # as if it had trained here (dropout draws)
        return dataclasses.replace(_copied(hit["result"]), output_dir=out)

    # --- scoring ------------------------------------------------------------------------------------------------------
    def score(self, parts: dict, state: dict[str, torch.Tensor], compute: Callable[[], Any]) -> Any:
        """`compute()` for weights `state` under everything in `parts` (JSON-able: options, data fingerprints),
        once: a later call with the same parts and weights gets a copy of the first result."""
        digest = hashlib.sha256(_json(parts))
        _add_state(digest, state)
        key = digest.hexdigest()
        if key not in self.scored:
            self.scored[key] = compute()
        return copy.deepcopy(self.scored[key])


def _copied(result: TrainResult) -> TrainResult:
    """A copy whose summary, losses and best weights no later change to `result` or the model reaches (the pairs,
    never changed once made, are shared)."""
    best = None if result.best is None else {
        **result.best, "state": {k: v.detach().clone() for k, v in result.best["state"].items()}}
    return dataclasses.replace(result, summary=copy.deepcopy(result.summary), best=best,
                               online_losses=copy.deepcopy(result.online_losses))
