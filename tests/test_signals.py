"""SIGTERM is handled like Ctrl-C: the step finishes, its checkpoint is written, exit status 143; while the run holds
its --output-dir a second run into it exits 2 naming the holder's pid; --resume then ends identical."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ofsdpo.cli import main
from ofsdpo.metrics import read_metrics
from ofsdpo.modules import adapter_state
from ofsdpo.signals import RunInterrupted, deferred_interrupt
from ofsdpo.trainer import OFSDPOTrainer
from test_reliability import ENV, train_flags


def test_sigterm_and_sigint_are_deferred_then_the_handlers_restored():
    # Python's own SIGINT handler, whatever this process inherited (a shell's background job starts with SIGINT
    # ignored, and the handlers restored below would then be SIG_IGN)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        with deferred_interrupt() as interrupted:
            assert interrupted() == 0
            os.kill(os.getpid(), signal.SIGTERM)
            assert interrupted() == signal.SIGTERM
            # a second signal acts at once (here SIGINT: KeyboardInterrupt, not a killed test process)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_run_interrupted_carries_the_shell_exit_status():
    assert RunInterrupted(signal.SIGTERM).exit_code == 143 and RunInterrupted(signal.SIGINT).exit_code == 130
    assert RunInterrupted(signal.SIGTERM).reason == "terminated (SIGTERM)"


SLOW = """
import sys, time
from ofsdpo import trainer
from ofsdpo.cli import main

after_step = trainer.OFSDPOTrainer._after_step


def slow_after_step(self, row, seconds):  # time to signal it mid-run; nothing it computes changes
    time.sleep(0.25)
    return after_step(self, row, seconds)


trainer.OFSDPOTrainer._after_step = slow_after_step
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_checkpoints_exits_143_locks_out_a_second_run_and_resumes_identical(tiny_model_dir, pairs_file,
                                                                                     tmp_path, make_config, capsys):
    options = dict(method="ofs-dpo", batch_size=2, save_steps=0, lora_dropout=0.1)
    whole = OFSDPOTrainer(config=make_config(output_dir=str(tmp_path / "whole"), **options))
    whole.train()
    out = tmp_path / "terminated"
    flags = train_flags(tiny_model_dir, pairs_file, out, "--method", "ofs-dpo", "--batch-size", "2",
                        "--lora-dropout", "0.1")
    process = subprocess.Popen([sys.executable, "-c", SLOW, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
            time.sleep(0.05)
        for extra in ([], ["--overwrite"], ["--resume"]):  # a second run into the folder, however asked
            assert main(train_flags(tiny_model_dir, pairs_file, out, *extra)) == 2
            err = capsys.readouterr().err
            assert f"is in use by another run (pid {process.pid}" in err and "Traceback" not in err, err
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]
    last = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert 2 <= last < 8
    assert f"terminated (SIGTERM); checkpoint of step {last} written" in err and "--resume" in err
    assert "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"checkpoint-{last}"]
    assert not (out / ".ofsdpo.lock.json").exists()  # released on the way out: no holder recorded
    done = subprocess.run([sys.executable, "-m", "ofsdpo", *flags, "--resume"], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))
    for name in ("fast", "slow"):
        a, b = adapter_state(whole.model, name), load_file(out / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow  # an `accelerate launch` of two processes: `make test-slow`
def test_sigterm_to_a_two_process_launch_stops_both_at_one_step_and_resumes(tiny_model_dir, tmp_path, make_config):
    """As Slurm's scancel does: SIGTERM to every process of the launch. Both processes stop after the same step,
    the main one writes its checkpoint, and a two-process --resume ends as one process with the same global batch."""
    import re

    from conftest import sentiment_rows, write_jsonl
    from test_distributed import (
        DDP_CONFIG,
        TRAIN,
        _adapters,
        _assert_close,
        _free_port,
        _launch,
    )

    data = write_jsonl(tmp_path / "pairs.jsonl", sentiment_rows(32))
    out = tmp_path / "two"
    script = tmp_path / "slow_ofsdpo.py"
    script.write_text(SLOW)
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--save-steps", "0", *TRAIN]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), "--num_processes",
              "2", "--main_process_port", str(_free_port()), str(script), "train", *args]
    env = {**ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stops = set(re.findall(r"terminated \(SIGTERM\); checkpoint of step (\d+) written", err))
    assert len(stops) == 1, err[-3000:]  # every process named the same step
    last = int(stops.pop())
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"checkpoint-{last}"] and last < 8
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, last + 1))
    _launch([*args, "--resume"])
    single = make_config(data=str(data), output_dir=str(tmp_path / "one"), method="ofs-dpo", batch_size=4,
                         lr=1e-3, lora_dropout=0.0, chase_interval=2, swap="params")
    OFSDPOTrainer(config=single).train()
    _assert_close(_adapters(out), _adapters(tmp_path / "one"))
