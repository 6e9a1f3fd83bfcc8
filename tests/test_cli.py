import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ofsdpo.cli import main, parse_config
from ofsdpo.config import ConfigError, OFSDPOConfig

ISSUE_FLAGS = ["--model", "--data", "--output-dir", "--method", "--config", "--max-steps", "--seed", "--batch-size",
               "--grad-accum", "--beta", "--lr", "--slow-lr-ratio", "--alpha", "--chase-interval", "--chase-form",
               "--swap", "--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules", "--max-length",
               "--max-prompt-length", "--round-size", "--epochs", "--save-steps", "--resume", "--device", "--dtype",
               "--gguf-file", "--trust-remote-code", "--eval-data", "--report-to"]


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ISSUE_FLAGS:
        assert flag in text, flag


def test_yaml_config_and_flags_override_it(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("method: dpo\nbeta: 0.3\nmax-steps: 7\nlora_r: 8\n")
    config = parse_config(OFSDPOConfig, ["--config", str(path), "--beta", "0.5"], "ofsdpo train", "")
    assert (config.method, config.beta, config.max_steps, config.lora_r) == ("dpo", 0.5, 7, 8)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("bta: 0.3\n")
    with pytest.raises(ConfigError, match="unknown key 'bta'"):
        parse_config(OFSDPOConfig, ["--config", str(path)], "ofsdpo train", "")


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "--beta must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--slow-lr-ratio", "1.5"], "--slow-lr-ratio must be in (0, 1]"),
    (["--alpha", "-0.1"], "--alpha must be >= 0"),
    (["--round-size", "3", "--batch-size", "2"], "--round-size (3) must be a positive multiple"),
])
def test_bad_configuration_exits_2_with_the_flag_named(capsys, flags, message, tmp_path):
    code = main(["train", "--data", "x.jsonl", "--output-dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_data_exits_2_naming_file_row_and_field(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": " b"}\n')
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl, row 2, field 'rejected': missing" in err


def test_python_dash_m_trains_end_to_end(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "ofsdpo", "train", "--model", str(tiny_model_dir), "--data", str(pairs_file),
         "--output-dir", str(out), "--method", "ofs-dpo", "--max-steps", "2", "--batch-size", "2", "--lora-r", "2",
         "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "ofs-dpo"
    assert (out / "adapter_model.safetensors").exists()


def test_missing_model_exits_2(tmp_path, pairs_file, capsys):
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(pairs_file),
                 "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no-such-model" in err and "Traceback" not in err


@pytest.mark.parametrize("command, flags", [
    ("demo", ["--quick", "--output-dir", "--model", "--gguf-file", "--device", "--seed", "--lr", "--config"]),
    ("experiment", ["experiment", "--seeds", "--output-dir", "--no-progress", "--config"]),
    ("eval", ["--adapter", "--domain", "--data", "--judge-prompts", "--json", "--config"]),
])
def test_every_command_has_help(capsys, command, flags):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: ofsdpo {command} ")
    for flag in flags:
        assert flag in text, flag


def test_demo_reads_a_yaml_config_and_flags_override_it(tmp_path):
    from ofsdpo.config import DemoConfig

    path = tmp_path / "demo.yaml"
    path.write_text("quick: true\nlr: 0.001\noutput-dir: here\nseed: 3\n")
    config = parse_config(DemoConfig, ["--config", str(path), "--seed", "4"], "ofsdpo demo", "")
    assert config == DemoConfig(quick=True, output_dir="here", lr=0.001, seed=4)
    assert parse_config(DemoConfig, [], "ofsdpo demo", "") == DemoConfig(
        quick=False, output_dir="demo-output", model=None, gguf_file=None, device="auto", seed=0, lr=5e-4)


@pytest.mark.parametrize("text, message", [
    ("quik: true\n", "unknown key 'quik'"), ("lr: -1\n", "--lr must be > 0"),
    ("quick: 3\n", "--quick must be true or false"),
])
def test_demo_bad_yaml_exits_2(tmp_path, capsys, text, message):
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    assert main(["demo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_experiment_file_is_positional_or_a_flag(tmp_path):
    from ofsdpo.config import ExperimentCommandConfig

    def parse(argv):
        return parse_config(ExperimentCommandConfig, argv, "ofsdpo experiment", "", positional="experiment")

    assert parse(["e.yaml", "--seeds", "0,1", "--no-progress", "--output-dir", "o"]) == ExperimentCommandConfig(
        experiment="e.yaml", seeds="0,1", output_dir="o", progress=False)
    assert parse(["--seeds", "2", "e.yaml"]) == ExperimentCommandConfig(experiment="e.yaml", seeds="2")
    assert parse(["--experiment", "f.yaml"]).experiment == "f.yaml"
    path = tmp_path / "run.yaml"
    path.write_text("experiment: g.yaml\nseeds: '5'\n")
    assert parse(["--config", str(path), "--seeds", "6"]) == ExperimentCommandConfig(experiment="g.yaml", seeds="6")


@pytest.mark.parametrize("argv, message", [
    ([], "the experiment's YAML file is required"),
    (["no/such.yaml"], "no/such.yaml: no such file"),
    (["EXPERIMENTS/in-domain.yaml", "--seeds", "0,x"], "--seeds: expected comma-separated integers"),
])
def test_experiment_bad_input_exits_2(capsys, argv, message):
    argv = [a.replace("EXPERIMENTS", str(Path(__file__).resolve().parent.parent / "experiments")) for a in argv]
    assert main(["experiment", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
