"""The output-folder lock: held for the run, released on any exit, a stale one taken over; and --resume-from."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from ofsdpo.config import ConfigError
from ofsdpo.rundir import (HOLDER_NAME, LOCK_NAME, OutputDirLocked, RunLock, check_once, check_output_dir,
                           lock_holder, output_dir_lock)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_held_lock_refuses_a_second_holder_naming_the_pid(tmp_path):
    with output_dir_lock(tmp_path):
        holder = json.loads((tmp_path / HOLDER_NAME).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(OutputDirLocked, match=rf"in use by another run \(pid {os.getpid()}, started "):
            RunLock(tmp_path).acquire()  # another open file: flock conflicts within one process too
        assert holder == json.loads((tmp_path / HOLDER_NAME).read_text())  # the refused try left the record alone
        assert isinstance(OutputDirLocked("x"), ConfigError)  # exit status 2 through the CLI
    assert not (tmp_path / HOLDER_NAME).exists() and lock_holder(tmp_path) is None


def _probe_for_a_moment(output_dir, seconds: float = 0.2):
    """Hold the lock of `output_dir` as `lock_holder`'s probe does (no record written), in its own thread (filelock's
    state is per thread), for `seconds`; returns once it holds it, with the thread to join."""
    import threading

    from filelock import FileLock

    taken = threading.Event()

    def probe():
        with FileLock(output_dir / LOCK_NAME, timeout=0):
            taken.set()
            time.sleep(seconds)

    thread = threading.Thread(target=probe)
    thread.start()
    taken.wait()
    return thread


def test_a_lock_held_for_an_instant_by_a_probe_is_taken_once_free(tmp_path):
    """`lock_holder` tries the lock to see whether it is free; a run starting in that instant waits for the probe to
    drop it instead of being refused, while a lock held longer by no named holder is refused after the grace."""
    from filelock import FileLock

    thread = _probe_for_a_moment(tmp_path)
    with output_dir_lock(tmp_path):
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    thread.join()
    probe = FileLock(tmp_path / LOCK_NAME, timeout=0)
    probe.acquire()  # held past the grace: refused, the message naming no pid
    try:
        with pytest.raises(OutputDirLocked, match=r"pid \?"):
            RunLock(tmp_path).acquire()
    finally:
        probe.release()


def test_a_dead_runs_record_does_not_refuse_a_run_that_starts_while_a_probe_holds_the_lock(tmp_path, caplog):
    """A record left by a dead run names no live holder: a run starting in the instant a probe holds the lock waits
    for the probe as if no record were there, then takes the lock over; held past the grace, the refusal names no
    pid (not the dead one)."""
    from filelock import FileLock

    pid = _dead_pid()
    (tmp_path / HOLDER_NAME).write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    thread = _probe_for_a_moment(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ofsdpo.rundir"):
        with output_dir_lock(tmp_path):
            assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    thread.join()
    assert f"took over the lock left by pid {pid} (no longer running)" in caplog.text
    (tmp_path / HOLDER_NAME).write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    probe = FileLock(tmp_path / LOCK_NAME, timeout=0)
    probe.acquire()
    try:
        with pytest.raises(OutputDirLocked, match=r"pid \?"):
            RunLock(tmp_path).acquire()
    finally:
        probe.release()


class _Launch:
    """Two launched processes seen from one of them: `gather` returns what the main process sent."""

    def __init__(self, is_main: bool, main_sends=None):
        self.distributed, self.is_main, self.main_sends = True, is_main, main_sends

    def gather(self, obj):
        return [obj if self.is_main else self.main_sends, None]


def test_under_a_launch_only_the_main_process_checks_the_folder_and_all_raise_its_error(tmp_path):
    """The other process checking for itself found the folder claimed by the faster main one ('in use ... pid ?')."""
    with output_dir_lock(tmp_path):  # the main process has claimed it already
        (tmp_path / HOLDER_NAME).write_text("{}")  # its record not yet written, as the failing launch saw it
        check_once(_Launch(is_main=False), check_output_dir, tmp_path, False, False)  # not refused
        with pytest.raises(OutputDirLocked, match="in use by another run"):
            check_once(None, check_output_dir, tmp_path, False, False)  # one process: refused as before
    (tmp_path / "metrics.jsonl").write_text("")
    main_error = (ConfigError, "--output-dir x holds another run (metrics.jsonl)")
    with pytest.raises(ConfigError, match="holds another run") as raised:
        check_once(_Launch(is_main=False, main_sends=main_error), check_output_dir, tmp_path, False, False)
    assert type(raised.value) is ConfigError
    with pytest.raises(ConfigError, match="holds another run"):
        check_once(_Launch(is_main=True), check_output_dir, tmp_path, False, False)


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with output_dir_lock(tmp_path):
            raise RuntimeError("crash")
    assert lock_holder(tmp_path) is None
    with output_dir_lock(tmp_path):
        pass


def test_a_lock_held_by_another_process_is_seen_and_a_dead_ones_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ofsdpo.rundir import RunLock; "
                               "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(tmp_path)["pid"] == holder.pid
        with pytest.raises(OutputDirLocked, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the file stays, the kernel drops the flock
        holder.wait()
    assert (tmp_path / HOLDER_NAME).exists() and lock_holder(tmp_path) is None
    with caplog.at_level(logging.WARNING, logger="ofsdpo.rundir"):
        with output_dir_lock(tmp_path):
            pass
    assert f"took over the lock left by pid {holder.pid} (no longer running)" in caplog.text


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    """A lock file and a holder record left by a dead pid (the lock itself free): not reported as held, taken over
    with a warning naming the pid, the record rewritten for this process."""
    pid = _dead_pid()
    (tmp_path / LOCK_NAME).write_text("")
    (tmp_path / HOLDER_NAME).write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    assert lock_holder(tmp_path) is None
    with caplog.at_level(logging.WARNING, logger="ofsdpo.rundir"):
        with output_dir_lock(tmp_path):
            assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    assert f"took over the lock left by pid {pid} (no longer running)" in caplog.text


def test_a_clean_release_leaves_nothing_to_take_over(tmp_path, caplog):
    """A run that ended normally removes its holder record: the next run takes the lock without a warning."""
    with output_dir_lock(tmp_path):
        pass
    with caplog.at_level(logging.WARNING, logger="ofsdpo.rundir"):
        with output_dir_lock(tmp_path):
            pass
    assert "took over" not in caplog.text


def test_resume_from_a_chosen_checkpoint_drops_the_later_ones(make_config, tmp_path):
    from safetensors.torch import load_file

    from ofsdpo.checkpoint import list_checkpoints
    from ofsdpo.metrics import read_metrics
    from ofsdpo.modules import adapter_state
    from ofsdpo.trainer import OFSDPOTrainer

    options = dict(method="dpo", batch_size=2, save_steps=2, save_total_limit=4, lora_dropout=0.0)
    whole = OFSDPOTrainer(config=make_config(output_dir=str(tmp_path / "whole"), **options))
    whole.train()
    out = tmp_path / "out"
    OFSDPOTrainer(config=make_config(output_dir=str(out), **options)).train()
    checkpoints = out / "checkpoints"
    with pytest.raises(ConfigError, match="--resume-from checkpoint-3: not a checkpoint of --output-dir"):
        OFSDPOTrainer(config=make_config(output_dir=str(out), resume_from="checkpoint-3", **options))
    resumed = OFSDPOTrainer(config=make_config(output_dir=str(out), resume_from=str(checkpoints / "checkpoint-4"),
                                               **options))
    assert resumed.config.resume
    resumed.train()
    assert [p.name for p in list_checkpoints(checkpoints)][-1] == "checkpoint-8"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))
    a, b = adapter_state(whole.model, "default"), load_file(out / "adapter_model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_overwrite_removes_everything_the_previous_run_wrote(make_config, tmp_path):
    """An ofs-dpo run (fast/, slow/, best_fast/, regret, summary, tokenizer), a stale checkpoint write and a judged
    rounds/ folder, then a dpo run with --overwrite into the same folder: nothing of the first run is left, and a
    file the user put there stays."""
    from conftest import sentiment_rows, write_jsonl
    from ofsdpo.trainer import OFSDPOTrainer

    held = write_jsonl(tmp_path / "held.jsonl", sentiment_rows(4, offset=50))
    out = tmp_path / "out"
    OFSDPOTrainer(config=make_config(method="ofs-dpo", eval_data=str(held), eval_steps=2, max_steps=2,
                                     output_dir=str(out))).train()
    assert all((out / name).is_dir() for name in ("fast", "slow", "best_fast"))
    (out / "rounds").mkdir()
    (out / "rounds" / "round-2.jsonl").write_text("{}\n")  # as an earlier on-policy run leaves them
    (out / ".tmp-checkpoint-9").mkdir()
    (out / "notes.txt").write_text("mine")
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=1, output_dir=str(out), overwrite=True)).train()
    left = sorted(p.name for p in out.iterdir())
    assert not {"fast", "slow", "best_fast", "rounds", ".tmp-checkpoint-9"} & set(left), left
    assert "notes.txt" in left and "adapter_model.safetensors" in left
    assert json.loads((out / "summary.json").read_text())["method"] == "dpo"
