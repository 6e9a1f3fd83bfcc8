"""Issue 8: bad input gets a clear error, numerical faults and crashes lose nothing, nothing unsafe is loaded."""

import ast
import copy
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import ofsdpo
from conftest import sentiment_rows, write_jsonl
from ofsdpo import checkpoint as ckpt
from ofsdpo import methods as methods_module
from ofsdpo import trainer as trainer_module
from ofsdpo.cli import main
from ofsdpo.config import ConfigError, DomainSpec, OFSDPOConfig
from ofsdpo.data import DataError, load_preference_data
from ofsdpo.metrics import read_metrics
from ofsdpo.modules import adapter_state
from ofsdpo.step import OptimiserStep
from ofsdpo.trainer import OFSDPOTrainer

SRC = Path(ofsdpo.__file__).parent
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(SRC.parent), *sys.path])}


def load(source, tokenizer, max_length=64, max_prompt_length=32):
    return load_preference_data(source, tokenizer, max_length, max_prompt_length)


# --- bad data --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, pattern", [
    ('{"prompt": "a", "rejected": " c"}\n', r"d\.jsonl, row 1, field 'chosen': missing"),
    ('{"prompt": "a", "chosen": "  ", "rejected": " c"}\n', r"row 1, field 'chosen': is empty"),
    ('{"prompt": "a", "chosen": " b", "rejected": ""}\n', r"row 1, field 'rejected': is empty"),
    ('{"prompt": "a", "chosen": " b", "rejected": ["x"]}\n', r"row 1, field 'rejected': expected a string"),
    ('\n\n  \n', r"d\.jsonl: holds no rows"),
    ('{"prompt": "a", "chosen": " \\ud800", "rejected": " c"}\n', r"row 1, field 'chosen': holds a lone surrogate"),
    ('{"prompt": "a", "chosen": " b", "rejected": " c"}\n' + "[" * 100_000 + "\n", r"row 2: not valid JSON"),
    ('{"prompt": "a", "chosen": ' + "9" * 5000 + ', "rejected": " c"}\n', r"row 1: not valid JSON"),
])
def test_more_malformed_rows_name_file_row_and_field(tmp_path, tokenizer, content, pattern):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        load(path, tokenizer)


def test_a_byte_order_mark_is_not_an_error(tmp_path, tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(sentiment_rows(1)[0]).encode() + b"\n")
    assert len(load(path, tokenizer)) == 1


def test_a_10_mb_line_loads_quickly_and_is_counted_as_truncated(tmp_path, tokenizer):
    """Tokenizing 10 MB takes seconds per field; only a window around the kept tokens is tokenized."""
    words = " ".join(f"w{i % 997}" for i in range(2_000_000))[:10_000_000]
    rows = [{"prompt": words, "chosen": " yes", "rejected": " no"},
            {"prompt": "Q:", "chosen": words, "rejected": " no"},
            {"chosen": "Q: " + words + " yes", "rejected": "Q: " + words + " no"}]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    assert path.stat().st_size > 30_000_000
    started = time.perf_counter()
    data = load(path, tokenizer, max_length=64, max_prompt_length=32)
    assert time.perf_counter() - started < 15  # tokenizing the fields whole takes over 30 s here
    assert (data.stats.pairs, data.stats.truncated_prompts, data.stats.truncated_completions) == (3, 2, 1)
    tail = tokenizer(words[-20_000:])["input_ids"]
    assert data.pairs[0]["prompt_ids"] == tail[-32:]  # the same tokens as tokenizing the whole prompt
    head = tokenizer("Q:" + words[:20_000])["input_ids"]
    assert data.pairs[1]["prompt_ids"] + data.pairs[1]["chosen_ids"] == head[:64]
    assert tokenizer.decode(data.pairs[2]["chosen_ids"]).strip().startswith("yes")


# --- the fuzz test ---------------------------------------------------------------------------------------------------
FIELD_NAMES = st.sampled_from(["prompt", "chosen", "rejected", "chosen ", "rejectd", "Prompt", "role", "content"])
TEXT = st.text(max_size=30) | st.sampled_from([" good", " bad", "The film", "", " ", "\ud800", "\x00", "\ufeff"])
GOOD_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | TEXT,
                                           "content": TEXT | st.integers()}), max_size=3)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FIELD_NAMES | TEXT, inner, max_size=3),
                    max_leaves=6)
VALUE = TEXT | MESSAGES | JSON
ROW = (st.fixed_dictionaries({"chosen": GOOD_TEXT | TEXT | MESSAGES, "rejected": GOOD_TEXT | TEXT | MESSAGES},
                             optional={"prompt": GOOD_TEXT | VALUE, "rejectd": VALUE}) |  # mostly rows that pass the checks
       st.dictionaries(FIELD_NAMES, VALUE, max_size=4) | JSON)


def _turn(role: str):
    return st.builds(lambda text: [{"role": role, "content": text}], GOOD_TEXT)


VALID_ROW = (st.fixed_dictionaries({"prompt": GOOD_TEXT, "chosen": GOOD_TEXT, "rejected": GOOD_TEXT}) |
             st.fixed_dictionaries({"prompt": _turn("user"), "chosen": _turn("assistant"),
                                    "rejected": _turn("assistant")}) |
             st.fixed_dictionaries({"chosen": GOOD_TEXT, "rejected": GOOD_TEXT}))
ROWS = st.lists(ROW, min_size=1, max_size=4) | st.lists(VALID_ROW, min_size=1, max_size=3)


def _load_or_data_error(path: Path, tokenizer) -> None:
    try:
        data = load(path, tokenizer)
    except DataError as err:
        assert str(err).startswith(str(path))  # names the file
        return
    assert len(data) >= 1 and all(p["chosen_ids"] and p["rejected_ids"] for p in data.pairs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=ROWS, suffix=st.sampled_from([".jsonl", ".json"]))
def test_fuzz_any_json_rows_load_or_raise_data_error(tmp_path_factory, tokenizer, rows, suffix):
    path = tmp_path_factory.getbasetemp() / f"fuzz{suffix}"
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_or_data_error(path, tokenizer)


@settings(max_examples=40, deadline=None)
@given(content=st.binary(max_size=200) | st.builds(lambda r, b: json.dumps(r).encode() + b, ROW, st.binary(max_size=8)))
def test_fuzz_any_bytes_load_or_raise_data_error(tmp_path_factory, tokenizer, content):
    path = tmp_path_factory.getbasetemp() / "fuzz-bytes.jsonl"
    path.write_bytes(content)
    _load_or_data_error(path, tokenizer)


# --- bad data and configuration through the CLI ----------------------------------------------------------------------
def train_flags(model_dir, data, out, *extra) -> list[str]:
    """The CLI twin of conftest's make_config."""
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "8", "--max-length", "64", "--max-prompt-length", "32",
            "--save-steps", "0", "--no-progress", "--seed", "0", *extra]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Configuration errors must come before the (slow) model load."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(trainer_module, "load_tokenizer", refuse)
    monkeypatch.setattr(trainer_module, "load_model", refuse)


@pytest.mark.parametrize("yaml_text, flags, message", [
    ("method: dop\n", [], "--method must be one of dpo, ofs-dpo (got 'dop')"),
    ("beta: [0.1]\n", [], "--beta must be a number"),
    ("resume: 3\n", [], "--resume must be true or false (got 3)"),
    ("", ["--beta", "nan"], "--beta must be > 0 (got nan)"),
    ("", ["--lr", "inf"], "--lr must be > 0 (got inf)"),
    ("", ["--slow-lr-ratio", "0"], "--slow-lr-ratio must be in (0, 1]"),
    ("", ["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be >= 1"),
    ("", ["--save-steps", "-2"], "--save-steps must be >= -1 (got -2)"),
])
def test_bad_yaml_values_and_limits_exit_2(tmp_path, capsys, no_model_loading, pairs_file, yaml_text, flags, message):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml_text)
    code = main(train_flags("m", pairs_file, tmp_path / "o", "--config", str(config), *flags))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_output_dir_holding_a_run_or_a_file_is_refused_before_loading(tmp_path, capsys, no_model_loading,
                                                                          pairs_file):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    assert main(train_flags("m", pairs_file, run)) == 2
    assert "holds another run (summary.json); pass --resume" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(train_flags("m", pairs_file, tmp_path / "file")) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, "", '{"prompt": "a", "chosen": " b", "rejected": " c"}\nnot json\n',
                                     b'{"prompt": "a", "chosen": " b", "rejected": " \xff"}\n'])
def test_bad_data_exits_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys, content):
    data = tmp_path / "d.jsonl"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    code = main(train_flags(tiny_model_dir, data, tmp_path / "fresh"))
    err = capsys.readouterr().err
    assert code == 2 and "d.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "fresh").exists()


def test_bad_data_with_overwrite_leaves_the_old_run_untouched(tiny_model_dir, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text('{"old": true}')
    (old / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": " b"}])
    assert main(train_flags(tiny_model_dir, data, old, "--overwrite")) == 2
    assert "row 1, field 'rejected': missing" in capsys.readouterr().err
    assert sorted(p.name for p in old.iterdir()) == ["checkpoints", "summary.json"]
    assert (old / "checkpoints" / "checkpoint-3").is_dir()


# --- numerical faults ------------------------------------------------------------------------------------------------
def _snapshot(trainer) -> tuple:
    adapters = {k: v.clone() for k, v in adapter_state(trainer.model, trainer.names[0]).items()}
    return adapters, copy.deepcopy(trainer.optimizer.state_dict()["state"]), trainer.scheduler.last_epoch


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _poison_loss_at(monkeypatch, bad_calls: set[int]) -> None:
    """dpo_loss returns NaN losses on the given calls (one call per step for dpo with one micro-batch)."""
    original, calls = methods_module.dpo_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        losses, chosen, rejected = original(*args, **kwargs)
        return (losses * math.nan if len(calls) in bad_calls else losses), chosen, rejected

    monkeypatch.setattr(methods_module, "dpo_loss", poisoned)  # the objective is the method's


def _poison_gradient_at(monkeypatch, bad_step: int) -> None:
    """An inf in one gradient while the loss stays finite (clipping runs once per step)."""
    original, calls = OptimiserStep._clip_gradients, []

    def poisoned(self):
        calls.append(1)
        if len(calls) == bad_step:
            next(p for p in self.optimizer.param_groups[0]["params"] if p.grad is not None).grad.view(-1)[0] = math.inf
        return original(self)

    monkeypatch.setattr(OptimiserStep, "_clip_gradients", poisoned)


@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_counted_and_warned(make_config, tmp_path, monkeypatch, caplog, fault):
    rows = sentiment_rows(16) + [{"prompt": "p", "chosen": " same", "rejected": " same"},
                                 {"prompt": "x " * 100, "chosen": " yes", "rejected": " no"}]
    data = write_jsonl(tmp_path / "with-odd-rows.jsonl", rows[:15] + rows[16:] + rows[15:16])  # 17 pairs, 5 steps
    trainer = OFSDPOTrainer(config=make_config(method="dpo", data=str(data), max_steps=4))
    _poison_loss_at(monkeypatch, {2}) if fault == "loss" else _poison_gradient_at(monkeypatch, 2)
    snapshots, original = [], OptimiserStep.__call__

    def recorded(self, *args):
        before = _snapshot(trainer)
        row = original(self, *args)
        snapshots.append((before, _snapshot(trainer)))
        return row

    monkeypatch.setattr(OptimiserStep, "__call__", recorded)
    with caplog.at_level(logging.WARNING, logger="ofsdpo.state"):
        summary = trainer.train().summary
    assert [_same(before, after) for before, after in snapshots] == [False, True, False, False]
    metrics = read_metrics(trainer.output_dir / "metrics.jsonl")
    assert [r["nonfinite_steps_skipped"] for r in metrics] == [0, 1, 1, 1]
    assert math.isnan(metrics[1]["loss"]) == (fault == "loss") and not math.isfinite(metrics[1]["grad_norm"])
    assert "step 2: non-finite loss or gradient; the update was skipped" in caplog.text
    assert summary["nonfinite_steps_skipped"] == 1 and summary["steps"] == 4 and summary["pairs_seen"] == 16
    assert (summary["data"]["skipped_identical"], summary["data"]["truncated_prompts"]) == (1, 1)
    assert json.loads((trainer.output_dir / "summary.json").read_text())["nonfinite_steps_skipped"] == 1


def test_non_finite_steps_in_a_row_stop_with_a_checkpoint_and_exit_2(tiny_model_dir, pairs_file, tmp_path,
                                                                     monkeypatch, capsys):
    _poison_loss_at(monkeypatch, set(range(1, 100)))
    out = tmp_path / "nan"
    assert main(train_flags(tiny_model_dir, pairs_file, out, "--method", "dpo", "--max-nonfinite-steps", "3")) == 2
    err = capsys.readouterr().err
    assert "steps 1-3: 3 optimiser steps in a row had a non-finite loss" in err and "Traceback" not in err
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-3"]
    kept = load_file(out / "checkpoints" / "checkpoint-3" / "adapter-default.safetensors")
    assert all(not v.any() for k, v in kept.items() if "lora_B" in k)  # never updated: B is still its zero init
    assert [r["nonfinite_steps_skipped"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert not (out / "summary.json").exists()


# --- checkpoints -----------------------------------------------------------------------------------------------------
def _save_toy_checkpoint(root: Path, step: int, value: float, keep: int = 2) -> Path:
    weight = torch.nn.Parameter(torch.full((2,), value))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return ckpt.save_checkpoint(root, step, {"default": {"w": weight.detach()}}, optimizer, scheduler,
                                {"chosen": torch.zeros(1)}, {"step": step}, keep)


def test_a_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    _save_toy_checkpoint(root, 2, 1.0)
    half = root / ".tmp-checkpoint-4"
    half.mkdir()
    (half / "adapter-default.safetensors").write_bytes(b"\0" * 10)  # as a crash mid-write leaves it
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-2"]
    _save_toy_checkpoint(root, 6, 3.0)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-6"]
    _save_toy_checkpoint(root, 6, 9.0)  # the same step again (Ctrl-C right after a periodic save): kept as it was
    assert ckpt.load_checkpoint(root / "checkpoint-6")["adapters"]["default"]["w"].tolist() == [3.0, 3.0]
    _save_toy_checkpoint(root, 8, 4.0, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-6", "checkpoint-8"]


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = _save_toy_checkpoint(tmp_path / "checkpoints", 2, 1.0)
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _RunsCode(marker)}, path / "training_state.pt")
    with pytest.raises(ConfigError, match=r"cannot read checkpoint .*checkpoint-2"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_a_checkpoint_missing_a_module_file_is_one_line(tiny_model_dir, pairs_file, tmp_path, capsys):
    """An ofs-dpo checkpoint without adapter-slow.safetensors: "cannot read checkpoint", not KeyError: 'slow'."""
    out = tmp_path / "run"
    assert main(train_flags(tiny_model_dir, pairs_file, out, "--method", "ofs-dpo", "--max-steps", "2",
                            "--save-steps", "1")) == 0
    newest = sorted((out / "checkpoints").iterdir())[-1]
    (newest / "adapter-slow.safetensors").unlink()
    capsys.readouterr()
    assert main(train_flags(tiny_model_dir, pairs_file, out, "--method", "ofs-dpo", "--max-steps", "3",
                            "--save-steps", "1", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot read checkpoint {newest} (no adapter-slow.safetensors)" in err and "KeyError" not in err


def test_pickled_adapters_and_reward_models_are_refused_before_loading(tiny_model_dir, tmp_path, capsys):
    """Only safetensors load: an adapter folder or an hf: judge folder whose weights are a pickled .bin is one
    line, exit 2, and nothing is unpickled."""
    from ofsdpo.judges import resolve_judges

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    marker = tmp_path / "code-ran"
    torch.save({"w": _RunsCode(marker)}, adapter / "adapter_model.bin")
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--num-prompts", "1",
                 "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--adapter {adapter}: its weights are pickled (.bin)" in err and not marker.exists()
    reward = tmp_path / "reward"
    reward.mkdir()
    torch.save({"w": _RunsCode(marker)}, reward / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"judge 'hf:.*reward': judge hf:.*its weights are pickled"):
        resolve_judges([f"hf:{reward}"]).score([{"prompt": "p", "meta": {}}], [["r"]])
    assert not marker.exists()


@pytest.mark.parametrize("where", ["checkpoint", "outputs"])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(tiny_model_dir, pairs_file,
                                                                                  tmp_path, capsys, monkeypatch,
                                                                                  where):
    """ENOSPC injected while a checkpoint's files (or the run's outputs: the served adapter) are written: exit 2,
    one line naming the file and "no space left on device", no temporary folder, no truncated file."""
    import errno

    import ofsdpo.checkpoint
    import ofsdpo.modules

    def full(tensors, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    target = ofsdpo.checkpoint if where == "checkpoint" else ofsdpo.modules
    monkeypatch.setattr(target, "save_file", full)  # each module imports save_file at its top
    out = tmp_path / "run"
    assert main(train_flags(tiny_model_dir, pairs_file, out, "--max-steps", "2", "--save-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no space left on device" in err and str(out) in err and "Traceback" not in err
    assert not list(out.rglob(".tmp-*")) and not (out / "summary.json").exists()


# --- security --------------------------------------------------------------------------------------------------------
def _calls(name: str):
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path.name, node


def test_every_torch_load_is_weights_only():
    found = list(_calls("torch.load"))
    assert found, "the checkpoint loader uses torch.load"
    for filename, node in found:
        keywords = {k.arg: k.value for k in node.keywords}
        assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, \
            f"{filename}:{node.lineno}"


def test_model_weights_load_only_from_safetensors(tiny_model_dir, tmp_path):
    """A folder holding only a pickled pytorch_model.bin is refused: unpickling can run code."""
    import torch
    from transformers import AutoModelForCausalLM

    from ofsdpo.models import ModelError, load_model

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in tiny_model_dir.iterdir():  # the same folder, with the weights as a pickle instead of safetensors
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match=str(pickled)):
        load_model(str(pickled), None, "float32", torch.device("cpu"))
    safe = load_model(str(tiny_model_dir), None, "float32", torch.device("cpu"))  # the safetensors folder loads
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in safe.state_dict().items())


def test_remote_code_runs_only_when_asked(monkeypatch, make_config):
    from ofsdpo.config import GenerateConfig
    from ofsdpo.continual import ContinualConfig

    for path in SRC.rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(encoding="utf-8").replace(" ", ""), path
    assert not OFSDPOConfig().trust_remote_code and not GenerateConfig().trust_remote_code
    assert not ContinualConfig(domain=["a=b.jsonl"]).training.trust_remote_code
    asked = []

    def record(name, gguf_file=None, trust_remote_code=None):
        asked.append(trust_remote_code)
        raise ConfigError("stop after the tokenizer")

    monkeypatch.setattr(trainer_module, "load_tokenizer", record)
    for trust in (False, True):
        with pytest.raises(ConfigError, match="stop after"):
            OFSDPOTrainer(config=make_config(trust_remote_code=trust))
    assert asked == [False, True]


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "..", ".hidden", "a\\b", "-flag", "x" * 65])
def test_domain_names_that_are_not_plain_folder_names_are_refused(name):
    with pytest.raises(ConfigError, match="must be letters, digits"):
        DomainSpec.parse(f"{name}=pairs.jsonl")
    assert DomainSpec.parse("sentiment-v2.1=pairs.jsonl").name == "sentiment-v2.1"


# --- crashes ---------------------------------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
from ofsdpo import checkpoint, trainer
from ofsdpo.cli import main

kind, at = sys.argv[1], int(sys.argv[2])


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "mid-write":  # the adapters of checkpoint <at> are on disk, its reference cache is not
    save_file = checkpoint.save_file

    def save_or_die(tensors, path):
        if path.parent.name == f".tmp-checkpoint-{at}" and path.name == "reference_cache.safetensors":
            die()
        save_file(tensors, path)

    checkpoint.save_file = save_or_die
else:  # "mid-step": step <at> has updated the weights, and is neither logged nor saved
    after_step = trainer.OFSDPOTrainer._after_step

    def after_step_or_die(self, row, seconds):
        if self.state.step == at:
            die()
        return after_step(self, row, seconds)

    trainer.OFSDPOTrainer._after_step = after_step_or_die
sys.exit(main(sys.argv[3:]))
"""
CHASING = dict(method="ofs-dpo", batch_size=2, save_steps=2, lora_dropout=0.1, chase_interval=2, swap="params",
               alpha=0.5)


def _cli(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def _run(args: list[str], killed: bool) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == (-signal.SIGKILL if killed else 0), result.stderr[-3000:]
    return result


def test_sigkill_at_several_points_then_resume_ends_identical(tiny_model_dir, pairs_file, tmp_path, make_config):
    whole = OFSDPOTrainer(config=make_config(output_dir=str(tmp_path / "whole"), **CHASING))
    whole.train()
    out = tmp_path / "killed"
    flags = train_flags(tiny_model_dir, pairs_file, out, *_cli(CHASING))
    checkpoints = out / "checkpoints"

    _run(["-c", KILLER, "mid-write", "4", *flags], killed=True)
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-checkpoint-4", "checkpoint-2"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]

    _run(["-c", KILLER, "mid-step", "7", *flags, "--resume"], killed=True)  # resumes from 2, ignoring the .tmp-
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]

    _run(["-m", "ofsdpo", *flags, "--resume"], killed=False)
    for name in ("fast", "slow"):
        a, b = adapter_state(whole.model, name), load_file(out / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows, expected = read_metrics(out / "metrics.jsonl"), read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [(r["step"], r["pairs_seen"]) for r in rows] == [(s, 2 * s) for s in range(1, 9)]  # none lost or twice
    assert [r["fast/loss"] for r in rows] == [r["fast/loss"] for r in expected]  # the same pairs, in order
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["pairs_seen"], summary["reference_pairs_computed"]) == (8, 16, 16)


def test_sigint_writes_a_checkpoint_of_the_last_step_and_exits_130(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "interrupted"
    long_run = train_flags(tiny_model_dir, pairs_file, out, "--method", "dpo", "--batch-size", "2", "--epochs", "500")
    # a job started in the background by a non-interactive shell (as CI may run us) inherits SIGINT ignored:
    # give the child the default disposition, as a terminal would
    process = subprocess.Popen([sys.executable, "-m", "ofsdpo", *long_run], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 3):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err[-3000:]
    last = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert f"interrupted; checkpoint of step {last} written" in err and "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"checkpoint-{last}"]
    saved = ckpt.load_checkpoint(out / "checkpoints" / f"checkpoint-{last}")
    assert (saved["state"]["step"], saved["state"]["position"]) == (last, 2 * last)
    files = sorted(p.name for p in (out / "checkpoints" / f"checkpoint-{last}").iterdir())
    assert files == ["adapter-default.safetensors", "reference_cache.safetensors", "trainer_state.json",
                     "training_state.pt"]  # tensors in safetensors; the optimiser state is read weights_only


def test_resume_on_other_data_of_the_same_length_is_refused(make_config, tmp_path):
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=1)).train()
    other = write_jsonl(tmp_path / "other.jsonl", sentiment_rows(16, offset=500))
    resumed = OFSDPOTrainer(config=make_config(method="dpo", data=str(other), resume=True))
    with pytest.raises(ConfigError, match="written by a run on other --data"):
        resumed.train()


# --- adapters loadable anywhere; config.yaml of a Python-API run (issue 15) ------------------------------------------
def test_an_adapter_of_a_relative_model_path_loads_from_another_directory(tiny_model_dir, pairs_file, tmp_path,
                                                                          make_config, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(tiny_model_dir.parent)
    out = tmp_path / "run"
    OFSDPOTrainer(config=make_config(model=tiny_model_dir.name, method="dpo", max_steps=1,
                                     output_dir=str(out))).train()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert model.peft_config["default"].r == 4


def test_config_yaml_of_a_python_api_run_names_what_it_can(tiny_model_dir, pairs_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from ofsdpo.config import read_config_file

    options = dict(method="dpo", max_steps=1, batch_size=4, lora_r=4, max_length=64, max_prompt_length=32,
                   progress=False)
    by_name = tmp_path / "by-name"
    OFSDPOTrainer(str(tiny_model_dir), OFSDPOConfig(output_dir=str(by_name), **options),
                  train_data=str(pairs_file)).train()
    saved = read_config_file(by_name / "config.yaml", OFSDPOConfig)
    assert (saved["model"], saved["data"]) == (str(tiny_model_dir), str(pairs_file))
    rerun = tmp_path / "rerun"
    assert main(["train", "--config", str(by_name / "config.yaml"), "--output-dir", str(rerun)]) == 0
    assert (rerun / "adapter_model.safetensors").exists()

    in_memory = tmp_path / "in-memory"
    OFSDPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), OFSDPOConfig(output_dir=str(in_memory),
                                                                                     **options),
                  train_data=sentiment_rows(8)).train()
    text = (in_memory / "config.yaml").read_text()
    assert f"model: null  # passed in memory: a loaded LlamaForCausalLM of '{tiny_model_dir}'" in text
    assert "data: null  # passed in memory (list); write the pairs to a .jsonl file" in text
    assert read_config_file(in_memory / "config.yaml", OFSDPOConfig)["model"] is None  # still valid YAML


@pytest.mark.skipif(not os.environ.get("OFSDPO_SLOW_TESTS"), reason="slow (loads the embedded model twice, ~2 min): "
                                                                    "set OFSDPO_SLOW_TESTS=1")
def test_an_adapter_of_the_embedded_gguf_model_loads_with_the_documented_call(pairs_file, tmp_path):
    """The README's call for the default model: AutoPeftModelForCausalLM needs the GGUF file's name, which the
    adapter config cannot hold (peft passes `gguf_file` on to transformers)."""
    from peft import AutoPeftModelForCausalLM

    from ofsdpo.models import EMBEDDED_GGUF

    out = tmp_path / "run"
    OFSDPOTrainer(config=OFSDPOConfig(data=str(pairs_file), output_dir=str(out), method="dpo", max_steps=1,
                                      batch_size=1, lora_r=2, max_length=32, max_prompt_length=16, progress=False,
                                      regret=False)).train()
    model = AutoPeftModelForCausalLM.from_pretrained(str(out), gguf_file=EMBEDDED_GGUF)
    trained = load_file(out / "adapter_model.safetensors")
    loaded = adapter_state(model, "default")
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
