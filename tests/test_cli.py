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
    with pytest.raises(ConfigError, match=r"unknown key 'bta'; did you mean 'beta'\?"):
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
    (["EXPERIMENTS/in-domain-sentiment.yaml", "--seeds", "0,x"], "--seeds: expected comma-separated integers"),
])
def test_experiment_bad_input_exits_2(capsys, argv, message):
    argv = [a.replace("EXPERIMENTS", str(Path(__file__).resolve().parent.parent / "experiments")) for a in argv]
    assert main(["experiment", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --- every error path: one line, exit status 2, no traceback (issue 15) ----------------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch):
    """The checks below must come before the (slow) tokenizer and model loads."""
    from ofsdpo import trainer as trainer_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(trainer_module, "load_tokenizer", refuse)
    monkeypatch.setattr(trainer_module, "load_model", refuse)


def _one_line_error(capsys, argv, message, code=2):
    assert main(argv) == code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert message in err, err
    assert "Traceback" not in err and "usage:" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flag, replacement", [
    ("--learning-rate", "--lr"), ("--learning_rate", "--lr"), ("--per-device-train-batch-size", "--batch-size"),
    ("--gradient-accumulation-steps", "--grad-accum"), ("--num-train-epochs", "--epochs"),
    ("--lr-scheduler-type", "--lr-scheduler"), ("--model-name-or-path", "--model"), ("--bf16", "--dtype bfloat16"),
    ("--resume-from-checkpoint", "--resume-from PATH"),
])
def test_trl_names_are_mapped_to_ours(capsys, flag, replacement):
    _one_line_error(capsys, ["train", flag, "1"], f"unknown option {flag} (TRL's name); ofsdpo uses {replacement}")


@pytest.mark.parametrize("argv, message", [
    (["train", "--bta", "0.1"], "unknown option --bta; did you mean --beta"),
    (["continual", "--domain", "a=x.jsonl", "--lora-rr", "4"], "unknown option --lora-rr; did you mean --lora-r"),
    (["generate", "--samples-per-promt", "2"], "did you mean --samples-per-prompt"),
    (["eval", "--domain", "sentiment", "--adapters", "x"], "unknown option --adapters; did you mean --adapter"),
    (["demo", "--quik"], "unknown option --quik; did you mean --quick"),
    (["train", "--method", "dop"], "argument --method: invalid choice: 'dop'"),
    (["train", "--max-steps", "x"], "argument --max-steps: invalid int value: 'x'"),
    (["train", "--progress", "maybe"], "argument --progress: expected true or false, got 'maybe'"),
    (["train", "extra"], "unexpected argument 'extra'"),
])
def test_argument_errors_are_one_line_with_a_suggestion(capsys, argv, message):
    _one_line_error(capsys, argv, message)


def test_a_misspelt_command_is_suggested(capsys):
    _one_line_error(capsys, ["trian"], "unknown command 'trian'; did you mean 'train'? commands: train, continual")


def test_max_steps_keeps_its_name(tmp_path):
    assert parse_config(OFSDPOConfig, ["--max-steps", "3"], "ofsdpo train", "").max_steps == 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_exits_2_before_loading(capsys, no_model_loading, pairs_file, tmp_path):
    _one_line_error(capsys, ["train", "--data", str(pairs_file), "--output-dir", str(tmp_path / "o"), "--device",
                             "cuda"], "--device cuda: CUDA is not available here")
    _one_line_error(capsys, ["generate", "--device", "cuda:0", "--out", str(tmp_path / "p.jsonl")],
                    "--device cuda:0: CUDA is not available here")
    assert not (tmp_path / "o").exists()


def test_target_modules_matching_nothing_exit_2_before_loading(capsys, no_model_loading, tiny_model_dir,
                                                               pairs_file, tmp_path):
    _one_line_error(capsys, ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir",
                             str(tmp_path / "o"), "--target-modules", "q_proj,q_prj"],
                    "--target-modules: q_prj match(es) no module of the model; its linear layers are down_proj")


def test_target_modules_matching_nothing_on_a_loaded_model_exit_2(make_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ofsdpo.models import ModelError
    from ofsdpo.trainer import OFSDPOTrainer

    with pytest.raises(ModelError, match="qq_proj match"):
        OFSDPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), make_config(target_modules="qq_proj"))


def test_an_output_dir_that_is_not_writable_exits_2_before_loading(capsys, no_model_loading, pairs_file, tmp_path,
                                                                   monkeypatch):
    from ofsdpo import rundir

    locked = tmp_path / "read-only"
    locked.mkdir()
    # as root (CI containers) chmod stops nothing: ask os.access what a read-only folder answers
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: str(path) != str(locked))
    _one_line_error(capsys, ["train", "--data", str(pairs_file), "--output-dir", str(locked / "run")],
                    f"--output-dir {locked / 'run'} (its nearest existing folder {locked}) is not writable")
    _one_line_error(capsys, ["train", "--data", str(pairs_file), "--output-dir", str(locked)],
                    f"--output-dir {locked} is not writable")


@pytest.mark.parametrize("data", ["pairs", "./missing/pairs", "pairs.csv", "~/nope/pairs"])
def test_a_local_looking_data_path_that_does_not_exist_is_missing_at_once(capsys, tiny_model_dir, tmp_path, data):
    import time

    started = time.monotonic()
    err = _one_line_error(capsys, ["train", "--model", str(tiny_model_dir), "--data", data, "--output-dir",
                                   str(tmp_path / "o"), "--no-progress"], "no such file or folder")
    assert time.monotonic() - started < 60  # no hub retries (they took ~30 s)
    assert not (tmp_path / "o").exists(), err


@pytest.mark.parametrize("model", ["./no-such-model", "../a/b/c", "/abs/missing"])
def test_a_local_looking_model_path_that_does_not_exist_is_missing_at_once(capsys, no_model_loading, pairs_file,
                                                                          tmp_path, model):
    _one_line_error(capsys, ["train", "--model", model, "--data", str(pairs_file), "--output-dir",
                             str(tmp_path / "o")], f"--model {model}: no such folder")


def test_debug_shows_the_traceback(capsys, monkeypatch, pairs_file):
    with pytest.raises(ConfigError):
        main(["--debug", "train", "--data", str(pairs_file), "--beta", "0"])
    monkeypatch.setenv("OFSDPO_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "--data", str(pairs_file), "--beta", "0"])


def test_an_unexpected_error_is_one_line_pointing_at_debug(capsys, monkeypatch, pairs_file, tmp_path):
    from ofsdpo import trainer as trainer_module

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(trainer_module.OFSDPOTrainer, "__init__", boom)
    _one_line_error(capsys, ["train", "--data", str(pairs_file)],
                    "ofsdpo train: error: RuntimeError: boom second line (run with --debug for the traceback)")


def _adapter_of_another_base(folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def test_eval_with_an_adapter_of_another_base_exits_2_naming_it(capsys, tiny_model_dir, tmp_path):
    adapter = _adapter_of_another_base(tmp_path / "adapter")
    _one_line_error(capsys, ["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--domain",
                             "sentiment", "--no-progress"],
                    f"--adapter {adapter} was trained on another base model: module "
                    "model.layers.0.self_attn.q_proj has 32 features, the adapter 48")


def test_generate_refuses_to_overwrite_and_samples_from_an_adapter(capsys, tiny_model_dir, make_config, tmp_path,
                                                                   length_judged):
    from ofsdpo.trainer import OFSDPOTrainer

    out = tmp_path / "generated.jsonl"
    out.write_text("keep\n")
    flags = ["generate", "--model", str(tiny_model_dir), "--out", str(out), "--num-prompts", "2",
             "--samples-per-prompt", "2", "--max-new-tokens", "3", "--no-progress", "--device", "cpu"]
    _one_line_error(capsys, flags, f"--out {out} exists; pass --overwrite")
    assert out.read_text() == "keep\n"
    run = tmp_path / "run"
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=1, output_dir=str(run))).train()
    other = _adapter_of_another_base(tmp_path / "other")
    capsys.readouterr()
    _one_line_error(capsys, [*flags, "--overwrite", "--adapter", str(other)], "was trained on another base model")
    assert main([*flags, "--overwrite", "--adapter", str(run)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["prompts"] == 2
    assert all(len(r["chosen"]) < 60 for r in rows)  # 3 new tokens at most


def test_help_imports_neither_torch_nor_transformers():
    """`ofsdpo --help` and `ofsdpo <command> --help` stay fast (bench/cli_help.py times them)."""
    code = ("import sys; from ofsdpo.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['continual', '--help'], ['generate', '--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_repeated_list_option_keeps_every_value_and_flags_override_yaml(tmp_path):
    """`--judge a --judge b c` is all three (argparse's extend, not the last one given), and a list given on the
    command line replaces the YAML file's list instead of adding to it."""
    from ofsdpo.cli import parse_config
    from ofsdpo.config import ON_PROMPTS, OFSDPOConfig

    argv = ["--on-policy", "--prompts", "p.jsonl", "--judge", "a:b", "--judge", "c:d", "e:f"]
    assert parse_config(OFSDPOConfig, argv, "t", "d").judge == ["a:b", "c:d", "e:f"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"on_policy: {ON_PROMPTS}\nprompts: p.jsonl\njudge: [y:z]\n")
    assert parse_config(OFSDPOConfig, ["--config", str(cfg)], "t", "d").judge == ["y:z"]
    assert parse_config(OFSDPOConfig, ["--config", str(cfg), "--judge", "a:b"], "t", "d").judge == ["a:b"]


def test_a_malformed_yaml_is_one_line_naming_where(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nvariants: [\n  - {name: a\n")
    assert main(["experiment", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}: not valid YAML at line 3, column 3: expected the node content" in err


def test_the_console_script_finds_a_judge_module_in_the_current_directory(tmp_path):
    """The `ofsdpo` script runs without the current directory on sys.path (only `python -m` puts it there): its
    entry point adds it, so `--judge cwdjudge:score` finds cwdjudge.py there as `python -m ofsdpo` does. Run in a
    fresh interpreter whose sys.path is made like the script's."""
    import subprocess

    (tmp_path / "cwdjudge.py").write_text("def score(prompt, response, meta):\n    return 1.0\n")
    probe = ("import sys; sys.path = [p for p in sys.path if p]; from ofsdpo import cli, judges; "
             "cli.main = lambda: judges.resolve_judges(['cwdjudge:score']) and 0; cli.entry_point()")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_judge_file_in_a_yaml_resolves_beside_the_yaml(tmp_path, monkeypatch):
    from ofsdpo.config import ON_PROMPTS

    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "myjudge.py").write_text("def score(prompt, response, meta):\n    return 1.0\n")
    cfg = folder / "c.yaml"
    cfg.write_text(f"on_policy: {ON_PROMPTS}\nprompts: p.jsonl\njudge: [myjudge.py:score:0.5, sentiment]\n")
    monkeypatch.chdir(tmp_path)  # the run starts elsewhere
    judge = parse_config(OFSDPOConfig, ["--config", str(cfg)], "t", "d").judge
    assert judge == [f"{(folder / 'myjudge.py').resolve()}:score:0.5", "sentiment"]
