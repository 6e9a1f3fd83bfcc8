"""Our own checkpoint format: everything a resumed run needs to end identical to an uninterrupted one.

`O/checkpoints/checkpoint-<step>/` holds each adapter (safetensors), the optimiser and scheduler states, the RNG
states, the reference cache and `trainer_state.json` (stream position, chasing state, online losses). It is written
to a temporary folder and renamed into place, so a crash never leaves a half-written checkpoint, and only the
newest `keep` are kept. Tensors are read back with `weights_only=True`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, adapters: dict, optimizer, scheduler, reference: dict, state: dict, keep: int,
                    rng: dict | None = None):
    root = Path(root)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in adapters.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / f"adapter-{name}.safetensors")
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp / "reference_cache.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng or rng_state()},
               tmp / "training_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    training = torch.load(path / "training_state.pt", weights_only=True)
    return {
        "adapters": {f.name[len("adapter-"):-len(".safetensors")]: load_file(f)
                     for f in sorted(path.glob("adapter-*.safetensors"))},
        "reference": load_file(path / "reference_cache.safetensors"),
        "optimizer": training["optimizer"],
        "scheduler": training["scheduler"],
        "rng": training["rng"],
        "state": json.loads((path / "trainer_state.json").read_text(encoding="utf-8")),
    }
