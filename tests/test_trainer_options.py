"""What TRL users reach for (issue 15): gradient checkpointing, threads, Weights & Biases."""

import json

import pytest
import torch

from ofsdpo.data import collate
from ofsdpo.errors import ConfigError
from ofsdpo.methods import training_method
import ofsdpo.trainer
from ofsdpo.models import configure_cpu_allocator, set_num_threads
from ofsdpo.trainer import OFSDPOTrainer


def _lora_gradients(trainer) -> dict[str, torch.Tensor]:
    """Gradients of the LoRA weights for a sum of completion log-probs of 4 pairs (the DPO loss's ingredient)."""
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    batch = collate(trainer.data.pairs[:4], trainer.tokenizer.pad_token_id)
    trainer.model.zero_grad()
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    (logps * batch["completion_mask"][:, 1:]).sum().backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(make_config, tmp_path):
    plain = OFSDPOTrainer(config=make_config(method="dpo", lora_dropout=0.0, output_dir=str(tmp_path / "a")))
    checkpointed = OFSDPOTrainer(config=make_config(method="dpo", lora_dropout=0.0, gradient_checkpointing=True,
                                                    output_dir=str(tmp_path / "b")))
    assert checkpointed.model.base_model.model.model.gradient_checkpointing
    assert not plain.model.base_model.model.model.gradient_checkpointing
    a, b = _lora_gradients(plain), _lora_gradients(checkpointed)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert a[name].abs().sum() > 0, name
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-8, msg=name)
    summary = checkpointed.train().summary  # and a whole run trains with it
    assert summary["steps"] == 4


def test_num_threads_is_set_and_one_per_process_under_a_launch(make_config, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        OFSDPOTrainer(config=make_config(num_threads=1, output_dir=str(tmp_path / "a")))
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        set_num_threads(None, processes=2)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the launcher's (or the user's) own choice is kept
        set_num_threads(None, processes=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_allocator_settings_are_asked_of_glibc_on_linux_cpu_only(make_config, tmp_path, monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("ctypes.CDLL", lambda name: FakeLibc())
    monkeypatch.setattr("sys.platform", "linux")
    # M_MMAP_THRESHOLD at glibc's largest automatic one and M_TRIM_THRESHOLD at its maximum: never trimmed
    assert configure_cpu_allocator(True, 0, "cpu") == "keep-freed" and calls == [(-3, 32 << 20), (-1, 2**31 - 1)]
    calls.clear()
    assert configure_cpu_allocator(True, 65536, "cpu") == "mmap-threshold" and calls == [(-3, 65536)]  # wins
    calls.clear()
    assert configure_cpu_allocator(False, 0, "cpu") is None and calls == []  # glibc's own setting
    assert configure_cpu_allocator(True, 0, "cuda:0") is None  # the GPU's caching allocator is torch's
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert configure_cpu_allocator(True, 65536, "cpu") is None  # the user's environment wins
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    assert configure_cpu_allocator(True, 0, "cpu") is None
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setattr("sys.platform", "darwin")
    assert configure_cpu_allocator(True, 65536, "cpu") is None
    assert calls == []

    class RefusingLibc:
        def mallopt(self, option, value):
            return 0

    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setattr("ctypes.CDLL", lambda name: RefusingLibc())
    assert configure_cpu_allocator(True, 0, "cpu") is None  # glibc said no: reported as not set

    asked = []
    monkeypatch.setattr(ofsdpo.trainer, "configure_cpu_allocator",
                        lambda keep, threshold, device: asked.append((keep, threshold)))
    OFSDPOTrainer(config=make_config(malloc_mmap_threshold=4096, output_dir=str(tmp_path / "a")))
    OFSDPOTrainer(config=make_config(malloc_keep_freed=False, output_dir=str(tmp_path / "b")))
    assert asked == [(True, 4096), (False, 0)]


def test_report_to_wandb_logs_offline(make_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=2, report_to="wandb", output_dir=str(out))).train()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_save_steps_minus_one_writes_no_checkpoint_even_when_stopped(make_config, tmp_path, monkeypatch):
    """--save-steps -1: no checkpoint at the end, and none when a run stops early (the message says it cannot be
    resumed); the run's outputs are written as ever."""
    from ofsdpo.signals import RunInterrupted

    trainer = OFSDPOTrainer(config=make_config(method="dpo", save_steps=-1, output_dir=str(tmp_path / "a")))
    assert trainer.train().steps == 4
    assert not (tmp_path / "a" / "checkpoints").exists() and (tmp_path / "a" / "adapter_model.safetensors").exists()
    stopped = OFSDPOTrainer(config=make_config(method="dpo", save_steps=-1, output_dir=str(tmp_path / "b")))
    monkeypatch.setattr(ofsdpo.trainer, "stop_signal", lambda processes, signum: 15)
    with pytest.raises(RunInterrupted, match="no checkpoint written .--save-steps -1.: this run cannot be resumed"):
        stopped.train()
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_no_silent_no_ops_in_the_options(make_config):
    """--eval-steps without --eval-data warns (it tracks nothing); --max-length alone fits the prompt limit to it
    (it used to stop on the default --max-prompt-length 256)."""
    import warnings as w

    from ofsdpo import OFSDPOConfig, OFSDPOTrainer

    with pytest.warns(UserWarning, match="--eval-steps 2 does nothing without --eval-data"):
        OFSDPOTrainer(config=make_config(eval_steps=2, max_steps=1))
    with w.catch_warnings():
        w.simplefilter("error", UserWarning)
        OFSDPOTrainer(config=make_config(max_steps=1))  # no warning without the flag
    assert OFSDPOConfig(max_length=64).max_prompt_length == 32
    assert OFSDPOConfig().max_prompt_length == 256
    assert OFSDPOConfig(max_length=64, max_prompt_length=10).max_prompt_length == 10


LOG2 = 0.6931471805599453


@pytest.mark.parametrize("loss_type,smoothing,first_loss", [
    ("ipo", 0.0, (0 - 1 / (2 * 0.1)) ** 2),  # (h − 1/(2β))² at h = 0: 25
    ("hinge", 0.0, 1.0),  # max(0, 1 − βh) at h = 0
    ("robust", 0.2, LOG2),  # [(1 − ε) + (−ε)] log 2 / (1 − 2ε) = log 2 at h = 0
    ("sigmoid", 0.2, LOG2),  # conservative DPO at h = 0: (1 − ε + ε) log 2
])
def test_loss_type_trains_with_its_own_loss(make_config, tmp_path, loss_type, smoothing, first_loss):
    """`--loss-type`: the first step's loss is the type's value at zero margin (the module starts at the reference),
    and the run trains (a later step's loss differs)."""
    trainer = OFSDPOTrainer(config=make_config(method="dpo", loss_type=loss_type, label_smoothing=smoothing,
                                               lora_dropout=0.0, max_steps=3, output_dir=str(tmp_path / "run")))
    trainer.train()
    rows = [row for row in _metrics(tmp_path / "run") if "loss" in row]
    assert rows[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    assert rows[-1]["loss"] != pytest.approx(first_loss, rel=1e-5)


def test_ofs_dpo_chases_in_the_loss_types_family(make_config, tmp_path):
    """ofs-dpo under ipo with the symmetric chase: at the start both modules equal the reference, so each module's
    DPO term is 25 and each chase term (Δ − 1/(2β_c))² at Δ = 0 is 25 too: the whole objective is 25 + 25 + α·50."""
    trainer = OFSDPOTrainer(config=make_config(method="ofs-dpo", loss_type="ipo", chase_form="symmetric", alpha=0.1,
                                               lora_dropout=0.0, max_steps=1, output_dir=str(tmp_path / "run")))
    trainer.train()
    row = next(r for r in _metrics(tmp_path / "run") if "loss" in r)
    assert row["fast/loss"] == pytest.approx(25.0, rel=1e-5) and row["slow/loss"] == pytest.approx(25.0, rel=1e-5)
    assert row["loss"] == pytest.approx(25 + 25 + 0.1 * 50, rel=1e-5)


def test_loss_type_options_that_mean_nothing_are_refused(make_config, tmp_path):
    with pytest.raises(ConfigError, match="--label-smoothing applies to --loss-type robust or sigmoid, not hinge"):
        make_config(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"--label-smoothing must be in \[0, 0.5\)"):
        make_config(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="pass --chase-form symmetric or proximal"):
        OFSDPOTrainer(config=make_config(method="ofs-dpo", loss_type="ipo", output_dir=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    training_method("dpo").check(make_config(method="dpo", loss_type="ipo"))  # no chase: nothing to refuse


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_max_completion_length_cuts_each_completion_as_trl_does(make_config, tmp_path, pairs_file):
    """TRL's --max-completion-length: chosen and rejected keep their first N tokens (the EOS goes with the cut
    end), counted in summary.json's data; unset, the pairs are those --max-length alone makes."""
    whole = OFSDPOTrainer(config=make_config(method="dpo", max_steps=1, output_dir=str(tmp_path / "whole")))
    cut = OFSDPOTrainer(config=make_config(method="dpo", max_steps=1, max_completion_length=3,
                                           output_dir=str(tmp_path / "cut"), eval_data=str(pairs_file)))
    longest = max(len(p[k]) for p in whole.data.pairs for k in ("chosen_ids", "rejected_ids"))
    assert longest > 3  # the data has completions the option must cut
    for before, after in zip(whole.data.pairs, cut.data.pairs):
        assert after["prompt_ids"] == before["prompt_ids"]
        for key in ("chosen_ids", "rejected_ids"):
            assert after[key] == before[key][:3]
    assert all(len(p["chosen_ids"]) <= 3 for p in cut.eval.pairs)  # the held-out pairs alike
    assert cut.train().summary["data"]["truncated_completions"] == len(cut.data) > 0
    assert whole.data.stats.truncated_completions == 0
    with pytest.raises(ConfigError, match="--max-completion-length must be >= 1"):
        make_config(max_completion_length=0)
    from ofsdpo.reference import ReferenceCache

    # a π_ref cache shared with other runs (an experiment's) was scored on the pairs as --max-length alone cuts them
    with pytest.raises(ConfigError, match="--max-completion-length cuts the pairs this run tokenizes"):
        OFSDPOTrainer(config=make_config(max_completion_length=3, output_dir=str(tmp_path / "shared")),
                      train_reference=ReferenceCache(len(whole.data)))
    # tokenized pairs are used as they are: cut already (a continual run's), they take their cache; longer, refused
    kept = OFSDPOTrainer(config=make_config(method="dpo", max_completion_length=3, output_dir=str(tmp_path / "kept")),
                         train_data=cut.data, train_reference=ReferenceCache(len(cut.data)))
    assert kept.data is cut.data
    with pytest.raises(ConfigError, match="more than --max-completion-length 3, and tokenized pairs are used as"):
        OFSDPOTrainer(config=make_config(max_completion_length=3, output_dir=str(tmp_path / "long")),
                      train_data=whole.data)


def test_logging_steps_writes_every_nth_step_as_the_mean_of_its_window(make_config, tmp_path):
    """--logging-steps 3 over 4 steps: rows at steps 3 and 4 (the last is always written); a row's loss is the mean
    of its steps' losses, its counters the last step's (TRL logs so)."""
    from ofsdpo.metrics import read_metrics

    every = OFSDPOTrainer(config=make_config(method="dpo", output_dir=str(tmp_path / "every")))
    every.train()
    windowed = OFSDPOTrainer(config=make_config(method="dpo", logging_steps=3, output_dir=str(tmp_path / "three")))
    windowed.train()
    rows, each = read_metrics(tmp_path / "three" / "metrics.jsonl"), read_metrics(tmp_path / "every" / "metrics.jsonl")
    assert [r["step"] for r in each] == [1, 2, 3, 4] and [r["step"] for r in rows] == [3, 4]
    for row, window in ((rows[0], each[:3]), (rows[1], each[3:])):
        assert row["loss"] == pytest.approx(sum(r["loss"] for r in window) / len(window), rel=1e-6)
        assert row["pairs_seen"] == window[-1]["pairs_seen"] and row["num_tokens"] == window[-1]["num_tokens"]
    with pytest.raises(ConfigError, match="--logging-steps must be >= 1"):
        make_config(logging_steps=0)


def test_run_name_names_the_tensorboard_and_wandb_runs(make_config, tmp_path, monkeypatch):
    """--run-name: TensorBoard's run folder runs/<name> (without it, runs/ as before) and the W&B run's name."""
    pytest.importorskip("torch.utils.tensorboard")
    out = tmp_path / "tb"
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=1, report_to="tensorboard", run_name="lr-sweep-3",
                                     output_dir=str(out))).train()
    assert any((out / "runs" / "lr-sweep-3").glob("events.out.tfevents.*"))
    named = {}

    class FakeRun:
        def log(self, values, step):
            pass

        def finish(self):
            pass

    def init(**kwargs):
        named.update(kwargs)
        return FakeRun()

    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "init", init)
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=1, report_to="wandb", run_name="lr-sweep-3",
                                     output_dir=str(tmp_path / "wb"))).train()
    assert named["name"] == "lr-sweep-3"


def test_no_progress_has_its_own_help_and_hides_transformers_loading_bars(make_config, tmp_path, monkeypatch,
                                                                          capsys):
    """--no-progress says what it hides (not "Turn --progress off."), and the model loads with transformers'
    bars off under it (on with --progress), their state restored afterwards."""
    from transformers.utils import logging as hf_logging

    from ofsdpo.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no-progress, --no_progress Hide every progress bar: the run's, the data's tokenizing and transformers'" \
           " weight loading." in help_text
    enabled_while_loading = []
    original = ofsdpo.trainer.load_model

    def load(*args, **kwargs):
        enabled_while_loading.append(hf_logging.is_progress_bar_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(ofsdpo.trainer, "load_model", load)
    hf_logging.enable_progress_bar()
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=1, progress=False, output_dir=str(tmp_path / "a")))
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=1, progress=True, output_dir=str(tmp_path / "b")))
    assert enabled_while_loading == [False, True] and hf_logging.is_progress_bar_enabled()
