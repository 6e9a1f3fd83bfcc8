"""Our own checkpoint format: everything a resumed run needs to end identical to an uninterrupted one.

`O/checkpoints/checkpoint-<step>/` holds each adapter (safetensors), the optimiser and scheduler states, the RNG
states, the reference cache and `trainer_state.json` (stream position, chasing state, online losses). It is written
to `.tmp-checkpoint-<step>/`, flushed to disk and renamed into place, so a crash (even SIGKILL or a power cut)
never leaves a half-written `checkpoint-<step>/`; a leftover `.tmp-` folder is ignored and removed by the next
save. Only the newest `keep` are kept. A checkpoint is never rewritten: the state of a step is the same whoever
saves it. The optimiser state is read back with `weights_only=True`, so a tampered file cannot run code.
"""

from __future__ import annotations

import errno
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError, WriteError
from .files import flush_to_disk, write_json

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"


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


def write_error(path: Path, what: str, err: BaseException) -> WriteError:
    """One line for a failed write: the file, what was being written, and the cause in words."""
    text = " ".join(str(err).split())
    full = getattr(err, "errno", None) == errno.ENOSPC or "unexpected pos" in text or "No space left" in text
    cause = "no space left on device" if full else (getattr(err, "strerror", None) or text[:200])
    return WriteError(f"cannot write {path} ({what}): {cause}; free space or choose another --output-dir")


def save_checkpoint(root: Path, step: int, adapters: dict, optimizer, scheduler, reference: dict, state: dict, keep: int,
                    rng: dict | None = None):
    root = Path(root)
    final = root / f"{PREFIX}{step}"
    if final.is_dir():  # already saved at this step (e.g. Ctrl-C right after a periodic save): same state
        return final
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash mid-write; only one run writes here
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{TMP_PREFIX}{PREFIX}{step}"
    writing = tmp
    try:
        tmp.mkdir()
        for name, tensors in adapters.items():
            writing = tmp / f"adapter-{name}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, writing)
        writing = tmp / "reference_cache.safetensors"
        save_file({k: v.contiguous() for k, v in reference.items()}, writing)
        writing = tmp / "training_state.pt"
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng or rng_state()}, writing)
        writing = tmp / "trainer_state.json"
        write_json(writing, state)
        flush_to_disk(tmp)
        tmp.rename(final)
    except (OSError, RuntimeError) as err:  # a full disk: torch.save says "unexpected pos", others ENOSPC
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint left behind
        raise write_error(writing, f"the checkpoint of step {step}", err) from None
    flush_to_disk(root)
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
    try:
        training = torch.load(path / "training_state.pt", weights_only=True)  # no pickled code runs
        return {
            "adapters": {f.name[len("adapter-"):-len(".safetensors")]: load_file(f)
                         for f in sorted(path.glob("adapter-*.safetensors"))},
            "reference": load_file(path / "reference_cache.safetensors"),
            "optimizer": training["optimizer"],
            "scheduler": training["scheduler"],
            "rng": training["rng"],
            "state": json.loads((path / "trainer_state.json").read_text(encoding="utf-8")),
        }
    except (OSError, pickle.UnpicklingError, SafetensorError, json.JSONDecodeError, KeyError, RuntimeError) as err:
        raise ConfigError(f"--resume: cannot read checkpoint {path} ({type(err).__name__}: {err}); remove it to "
                          "resume from an older one.") from None


def own_rng(rng: dict, path: Path, processes) -> dict:
    """This process's RNG states out of a checkpoint's (one per process under a multi-process launch)."""
    saved_processes = len(rng["processes"]) if "processes" in rng else 1
    if saved_processes != processes.count:
        raise ConfigError(f"--resume: {path} was written by {saved_processes} process(es); this run has "
                          f"{processes.count}. Resume with the same number of processes.")
    return rng["processes"][processes.index] if "processes" in rng else rng
