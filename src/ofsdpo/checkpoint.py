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
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError, WriteError
from .files import flush_to_disk, write_json, write_jsonl
from .modules import load_adapter_state, save_adapter, write_adapter

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


def process_rng(processes) -> dict:
    """This process's RNG states, or every process's under a multi-process launch (each has its own dropout masks;
    the rest of a checkpoint is the same everywhere)."""
    rng = rng_state()
    return {"processes": processes.gather(rng)} if processes.distributed else rng


def save_run(root: Path, state, adapters, best: dict | None, optimizer, scheduler, reference, processes,
             keep: int) -> None:
    """A run's checkpoint of step `state.step`, written by the main process (`adapters()`: its modules' weights;
    `best`: the best fast module's, or None); every process returns once it is in place."""
    rng = process_rng(processes)
    if processes.is_main:
        modules = adapters() if best is None else {**adapters(), "best": best}
        save_checkpoint(root, state.step, modules, optimizer, scheduler, reference.state_dict(), state.to_dict(),
                        keep, rng=rng)
    processes.barrier()  # nobody reads a checkpoint before it is in place


def restore(saved: dict, path: Path, state, model, names, optimizer, scheduler, reference, processes) -> dict | None:
    """Load a checkpoint (`load_checkpoint`, its `state` read) into a run: its modules `names`, optimiser, schedule,
    reference cache and this process's RNG; returns the best fast module's weights kept with it, or None."""
    missing = [name for name in names if name not in saved["adapters"]]
    if missing:  # a checkpoint missing a file: the message of any unreadable checkpoint
        raise ConfigError(f"--resume: cannot read checkpoint {path} (no adapter-{missing[0]}.safetensors); remove "
                          "it to resume from an older one.")
    for name in names:
        load_adapter_state(model, name, saved["adapters"][name])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    reference.load_state_dict(saved["reference"])
    reference.computed_pairs = state.reference_computed_pairs
    set_rng_state(own_rng(saved["rng"], path, processes))
    return saved["adapters"].get("best") if state.best else None


def write_outputs(out: Path, model, served: str, modules, best: tuple | None, tokenizer, regret: list[dict],
                  summary: dict) -> None:
    """A finished run's outputs: the served module at the root as a plain peft adapter, `modules` each in a folder
    of its own, `best` = (module, weights) in `best_fast/`, the tokenizer, regret.jsonl and summary.json."""
    try:
        save_adapter(model, served, out)
        for name in modules:
            save_adapter(model, name, out / name)
        if best is not None:
            write_adapter(model.peft_config[best[0]], best[1], out / "best_fast")
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-tokenizer-") as staging:  # whole files or none
            for path in tokenizer.save_pretrained(staging):
                if os.path.isfile(path):
                    os.replace(path, out / Path(path).name)
        if regret:
            write_jsonl(out / "regret.jsonl", regret)
        write_json(out / "summary.json", summary)
    except (OSError, RuntimeError) as err:
        raise write_error(Path(getattr(err, "filename", None) or out), "the run's outputs", err) from None
