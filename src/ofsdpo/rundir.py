"""The output folder of a training run: what marks it as holding a run, when it may be (over)written, and the lock
that keeps two runs out of one folder.

The lock is `<output-dir>/.ofsdpo.lock`, a `filelock.FileLock` (an advisory `flock`; on Windows a `msvcrt` lock)
held for the whole run; `<output-dir>/.ofsdpo.lock.json` names its holder (pid, host, start time). The operating
system drops the lock when its process dies, however it dies (SIGKILL and OOM included), so a run that finds the
lock free and a holder record left behind takes it over and says so. The record is a file of its own because
filelock may truncate the lock file when another process tries it (filelock 3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from .checkpoint import list_checkpoints
from .config import RESUME_MAY_CHANGE, OFSDPOConfig, changed_options, read_config_file
from .errors import ConfigError, OutputDirLocked
from .files import write_atomic

logger = logging.getLogger(__name__)

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json")
# everything a training run writes into its folder (`trainer._write_outputs`, the stream's rounds, the loggers):
# --overwrite removes all of it, so nothing of the previous run (its fast/slow modules, its judged rounds) is left
# to be served or replayed as if this run had written it
RUN_OUTPUTS = RUN_MARKERS + (
    "fast", "slow", "best_fast", "rounds", "runs", "regret.jsonl", "adapter_config.json", "adapter_model.safetensors",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
    "merges.txt", "added_tokens.json", "tokenizer.model", "generation_config.json")
LOCK_NAME = ".ofsdpo.lock"
HOLDER_NAME = ".ofsdpo.lock.json"  # who holds the lock: written once it is taken, removed before it is released
UNNAMED_HOLDER_GRACE = 1.0  # seconds a lock held by no named holder is tried again before a refusal
# a continual run's finished stage keeps what a resume needs in `<stage dir>/STAGE_FOLDER`; its record, written last,
# marks the stage finished (`continual.persistence`)
STAGE_FOLDER, STAGE_RECORD = "stage", "stage.json"


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool, resume_from: str | None = None) -> None:
    """Refuse a folder we must not write to; nothing is written here (bad data may still stop the run)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir} is a file, not a directory.")
    refuse_if_locked(output_dir)  # checked first: a live run's folder holds run markers too
    check_writable(output_dir)
    held = [m for m in RUN_MARKERS if (output_dir / m).exists()]
    if held and not (resume or overwrite):
        raise ConfigError(f"--output-dir {output_dir} holds another run ({', '.join(held)}); "
                          "pass --resume to continue it or --overwrite to replace it.")
    if resume and not list_checkpoints(output_dir / "checkpoints"):
        raise ConfigError(f"--resume: no checkpoint in {output_dir / 'checkpoints'}.")
    if resume_from is not None:
        resume_checkpoint(output_dir, resume_from)


def check_once(processes, check, *args) -> None:
    """Run the folder check `check(*args)` under a launch on the main process only, and raise its `ConfigError` on
    every process. Another process checking for itself could find the folder already claimed by the main one (it
    may load faster) and refuse a run that is its own."""
    if processes is None or not processes.distributed:
        return check(*args)
    error = None
    if processes.is_main:
        try:
            check(*args)
        except ConfigError as err:  # OutputDirLocked included: sent as its class and message
            error = (type(err), str(err))
    error = processes.gather(error)[0]
    if error is not None:
        raise error[0](error[1])


def resume_checkpoint(output_dir: Path, resume_from: str | None = None) -> Path:
    """The checkpoint to resume from: the newest, or --resume-from's (a checkpoint folder of this --output-dir,
    given as a path or as its name `checkpoint-N`)."""
    checkpoints = list_checkpoints(Path(output_dir) / "checkpoints")
    if resume_from is None:
        return checkpoints[-1]
    wanted = Path(resume_from)
    for path in checkpoints:
        if path.resolve() == wanted.resolve() or (not wanted.exists() and path.name == wanted.name):
            return path
    names = ", ".join(p.name for p in checkpoints) or "none"
    raise ConfigError(f"--resume-from {resume_from}: not a checkpoint of --output-dir {output_dir} (its checkpoints: "
                      f"{names}).")


def drop_checkpoints_after(output_dir: Path, path: Path) -> None:
    """Remove the checkpoints newer than `path` (a resume from an older one would otherwise find them newest)."""
    checkpoints = list_checkpoints(Path(output_dir) / "checkpoints")
    for later in checkpoints[checkpoints.index(path) + 1:] if path in checkpoints else []:
        shutil.rmtree(later)


def check_writable(output_dir: Path) -> None:
    """The folder, or the nearest existing folder above it (where it will be created), must be writable: found
    before the model loads, not when the first file is written."""
    existing = output_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output-dir {output_dir}: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == output_dir.absolute() else f" (its nearest existing folder {existing})"
        raise ConfigError(f"--output-dir {output_dir}{where} is not writable; choose another --output-dir or fix its "
                          "permissions.")


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the folder; with --overwrite, remove the other run only now that data and model have loaded."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        leftovers = [path for path in output_dir.glob(".tmp-checkpoint-*")]  # an interrupted checkpoint write
        for path in [output_dir / name for name in RUN_OUTPUTS] + leftovers:
            try:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            except OSError as err:
                raise ConfigError(f"--overwrite: cannot remove {path} of the previous run ({err.strerror}); remove it "
                                  "or choose another --output-dir.") from None


def name_sources(config, model=None, train_data=None) -> tuple[Any, dict[str, str]]:
    """The config a Python-API run saves as config.yaml: `model` and `data` filled in when they were passed by name
    or path (so that `ofsdpo train --config out/config.yaml` reruns it), and a note for each passed in memory."""
    updates, notes = {}, {}
    if config.model is None and isinstance(model, (str, os.PathLike)):
        updates["model"] = str(model)
    elif config.model is None and model is not None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or "unknown"
        notes["model"] = f"passed in memory: a loaded {type(model).__name__} of {name!r}; set model to rerun"
    if config.data is None and config.on_policy is None:
        if isinstance(train_data, (str, os.PathLike)):
            updates["data"] = str(train_data)
        elif train_data is not None:
            notes["data"] = (f"passed in memory ({type(train_data).__name__}); write the pairs to a .jsonl file and "
                             "set data to rerun")
    return (dataclasses.replace(config, **updates) if updates else config), notes


def config_yaml(values: dict, notes: dict[str, str]) -> str:
    """config.yaml's text: the values, with `# passed in memory` notes on the keys they explain."""
    text = yaml.safe_dump(values, sort_keys=False)
    for key, note in notes.items():
        text = re.sub(rf"^{key}: null$", lambda _, key=key, note=note: f"{key}: null  # {note}", text, count=1,
                      flags=re.MULTILINE)
    return text


# --- the lock ---------------------------------------------------------------------------------------------------------
def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _may_be_running(holder: dict) -> bool:
    """False only for a record naming a process of this host that no longer exists (another host's: unknown)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") not in (None, socket.gethostname()):
        return bool(holder)
    try:
        os.kill(pid, 0)  # signal 0: is there such a process (nothing is sent)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by another user
    return True


def _locked_message(output_dir: Path, holder: dict) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    return (f"--output-dir {output_dir} is in use by another run (pid {pid}{where}{since}); wait for it to end, "
            f"stop it, or choose another --output-dir.")


def lock_holder(output_dir: Path) -> dict | None:
    """Who holds the lock of `output_dir` ({pid, host, started}; {} while its record is being written), or None when
    it is free. Writes nothing: the lock is tried and, when free, dropped at once."""
    output_dir = Path(output_dir)
    if not (output_dir / LOCK_NAME).is_file():
        return None
    holder = _read_holder(output_dir / HOLDER_NAME)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return None  # this process holds it (a check made again once the lock is taken)
    probe = FileLock(output_dir / LOCK_NAME, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return holder
    probe.release()
    return None  # free: a record left behind belongs to a dead run


def refuse_if_locked(output_dir: str | Path) -> None:
    """The check before anything loads (writes nothing): a folder held by a live run is an `OutputDirLocked`."""
    holder = lock_holder(Path(output_dir))
    if holder is not None:
        raise OutputDirLocked(_locked_message(Path(output_dir), holder))


class RunLock:
    """The lock of one output folder, held from `acquire()` to `release()` (also a context manager)."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.holder_path = Path(output_dir) / HOLDER_NAME
        self.lock = FileLock(self.path, timeout=0)  # never wait: a second run is refused at once

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        give_up = time.monotonic() + UNNAMED_HOLDER_GRACE
        while True:
            try:
                self.lock.acquire()
                break
            except Timeout:
                holder = _read_holder(self.holder_path)
                if not _may_be_running(holder):
                    holder = {}  # a dead run's record: whoever holds the lock has not named itself
                # a holder names itself at once; none named is `lock_holder`'s probe (held for an instant) or a run
                # between taking the lock and writing its record: look again for a moment before refusing
                if holder or time.monotonic() > give_up:
                    raise OutputDirLocked(_locked_message(self.path.parent, holder)) from None
                time.sleep(0.02)
        # a run that ends removes its record before it unlocks: one found now was left by a run that died
        stale = _read_holder(self.holder_path)
        if stale.get("pid") not in (None, os.getpid()):
            logger.warning("%s: took over the lock left by pid %s (no longer running).", self.path.parent,
                           stale.get("pid"))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomic(self.holder_path, json.dumps(holder) + "\n")  # whole or not at all for a reader
        return self

    def release(self) -> None:
        if not self.lock.is_locked:
            return
        with contextlib.suppress(OSError):
            self.holder_path.unlink()  # before unlocking: a record names a live holder or a dead one, never the next
        self.lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path, processes=None):
    """Hold the lock of `output_dir` for the `with` body (released on any exit, exceptions included).

    Under a multi-process launch only the main process takes it, and every process raises the same
    `OutputDirLocked` when it is held elsewhere (so none waits at a collective for a process that stopped)."""
    lock = RunLock(Path(output_dir))
    check_once(processes, lock.acquire)  # the main process takes it; every process raises its OutputDirLocked
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def claim_output_dir(output_dir: Path, resume: bool, overwrite: bool, processes=None):
    """A training run's hold on its folder: the lock, then (the folder may have changed while the model loaded) the
    checks of `check_output_dir` again, then the folder made ready (`prepare_output_dir`)."""
    with output_dir_lock(output_dir, processes) as lock:
        if processes is None or processes.is_main:
            check_output_dir(Path(output_dir), resume, overwrite)
            prepare_output_dir(Path(output_dir), resume, overwrite)
        yield lock


def check_same_run(path: Path, saved, now, config, num_pairs: int) -> None:
    """--resume continues the same run only: same method, data and every option that changes what it computes.
    `saved` is the checkpoint's `TrainerState`, `now` this run's (fresh) one."""
    if saved.method != config.method or saved.num_pairs != num_pairs:
        article = "an" if saved.method.startswith("ofs") else "a"  # "an OFS-DPO run"
        raise ConfigError(f"--resume: {path} was written by {article} {saved.method} run on {saved.num_pairs} pairs; "
                          f"this run is {config.method} on {num_pairs} pairs.")
    if saved.data_fingerprint is not None and saved.data_fingerprint != now.data_fingerprint:
        what = ("other --prompts (different prompts or meta); resuming would train on another stream"
                if config.on_policy else "other --data (same number of pairs, different tokens); resuming would lose "
                                         "or repeat pairs of the stream")
        raise ConfigError(f"--resume: {path} was written by a run on {what}.")
    saved_config = Path(config.output_dir) / "config.yaml"
    if saved_config.is_file():
        may_change = RESUME_MAY_CHANGE | {"data", "prompts"}  # their contents are compared above, not their paths
        if config.lr_scheduler == "constant":  # the step limit changes no learning rate: a run may be extended
            may_change = may_change | {"max_steps"}
        changed = changed_options(read_config_file(saved_config, OFSDPOConfig), config.to_dict(), may_change)
        if changed:
            raise ConfigError(f"--resume: this run was started with other options: {'; '.join(changed)}. Resume "
                              "with the same options, or start again with --overwrite.")
