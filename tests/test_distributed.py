"""Data parallelism: two CPU processes (gloo) under `accelerate launch` equal one process with the same global batch,
with the base replicated (ddp.yaml) or sharded (FSDP2, fsdp.yaml; DeepSpeed ZeRO-3, deepspeed-zero3.yaml)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ofsdpo import OFSDPOTrainer
from ofsdpo.metrics import read_metrics

DDP_CONFIG = Path(__file__).parent.parent / "configs" / "accelerate" / "ddp.yaml"
FSDP_CONFIG = DDP_CONFIG.with_name("fsdp.yaml")
ZERO3_CONFIG = DDP_CONFIG.with_name("deepspeed-zero3.yaml")
ZERO2_CONFIG = DDP_CONFIG.with_name("deepspeed-zero2.yaml")
try:
    import deepspeed  # noqa: F401
    NO_DEEPSPEED = None
except ImportError as err:  # an optional extra; `make setup` installs it
    NO_DEEPSPEED = f"deepspeed is not installed ({err})"
needs_deepspeed = pytest.mark.skipif(NO_DEEPSPEED is not None, reason=NO_DEEPSPEED or "")
MULTI_PROCESS = pytest.mark.slow  # `accelerate launch` of two processes: `make test-slow` (CI runs both)
TRAIN = ["--method", "ofs-dpo", "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
         "--max-length", "64", "--max-prompt-length", "32", "--seed", "0", "--chase-interval", "2",
         "--swap", "params", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], command: str = "train", config: Path = DDP_CONFIG,
            succeed: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch` with a shipped config and two processes; without GPUs they use the CPU and gloo."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
              "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "ofsdpo", command, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert (done.returncode == 0) is succeed, done.stderr[-3000:]
    return done


def _adapters(folder) -> dict:
    return {name: load_file(folder / name / "adapter_model.safetensors") for name in ("fast", "slow")}


def _assert_close(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-4, atol=1e-6)


def _run_two_processes(tiny_model_dir, tmp_path_factory, pairs: int, config: Path):
    """One uninterrupted two-process run, batch 2 per process."""
    from conftest import sentiment_rows, write_jsonl

    folder = tmp_path_factory.mktemp("two-processes")
    data = write_jsonl(folder / "pairs.jsonl", sentiment_rows(pairs))
    out = folder / "two"
    _launch(["--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
             "--save-steps", "1", "--save-total-limit", "10", *TRAIN], config=config)
    return data, out


def _compare_with_one_process(data, out, make_config, tmp_path, pairs_seen: list[int]) -> tuple[dict, dict]:
    """The two-process run against one process with batch 4: adapters, stream, chasing and losses."""
    single = OFSDPOTrainer(config=make_config(
        model=_model_arg(out), data=str(data), output_dir=str(tmp_path / "one"), method="ofs-dpo", batch_size=4,
        lr=1e-3, lora_dropout=0.0, chase_interval=2, swap="params"))
    summary = single.train().summary
    _assert_close(_adapters(out), _adapters(tmp_path / "one"))
    rows_two, rows_one = read_metrics(out / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["pairs_seen"] for r in rows_two] == [r["pairs_seen"] for r in rows_one] == pairs_seen
    assert [r["num_tokens"] for r in rows_two] == [r["num_tokens"] for r in rows_one]
    for a, b in zip(rows_two, rows_one):
        assert a["chase/leader"] == b["chase/leader"] and a["chase/swaps"] == b["chase/swaps"]
        assert a["fast/loss"] == pytest.approx(b["fast/loss"], rel=1e-4)
        assert a["slow/grad_norm"] == pytest.approx(b["slow/grad_norm"], rel=1e-4)
    two = json.loads((out / "summary.json").read_text())
    assert two["num_processes"] == 2 and two["reference_pairs_computed"] == summary["reference_pairs_computed"]
    assert two["module_scores"] == pytest.approx(summary["module_scores"], rel=1e-4)
    return two, summary


def _crash_and_resume(data, whole: Path, tmp_path, config: Path) -> None:
    """A crash after step 2 (later checkpoints and the final outputs never written), then --resume."""
    crashed = tmp_path / "crashed"
    shutil.copytree(whole, crashed)
    for path in crashed.iterdir():
        if path.name not in ("checkpoints", "config.yaml", "metrics.jsonl"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for checkpoint in (crashed / "checkpoints").iterdir():
        if int(checkpoint.name.split("-")[1]) > 2:
            shutil.rmtree(checkpoint)
    _launch(["--model", _model_arg(whole), "--data", str(data), "--output-dir", str(crashed), "--batch-size", "2",
             "--save-steps", "1", "--save-total-limit", "10", "--resume", *TRAIN], config=config)
    _assert_close(_adapters(crashed), _adapters(whole))
    assert [r["step"] for r in read_metrics(crashed / "metrics.jsonl")] == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, tmp_path_factory):
    """Replicated (DDP-like): 18 pairs, so the last step is a short one."""
    return _run_two_processes(tiny_model_dir, tmp_path_factory, 18, DDP_CONFIG)


@MULTI_PROCESS
def test_two_processes_equal_one_with_the_same_global_batch(two_process_run, make_config, tmp_path):
    two, summary = _compare_with_one_process(*two_process_run, make_config, tmp_path, [4, 8, 12, 16, 18])
    assert two["sharded_base"] is False


@MULTI_PROCESS
def test_resumed_two_process_run_matches_the_uninterrupted_one(two_process_run, tmp_path):
    _crash_and_resume(*two_process_run, tmp_path, DDP_CONFIG)


@MULTI_PROCESS
@needs_deepspeed
def test_zero2_runs_as_plain_data_parallelism(two_process_run, tmp_path):
    """ZeRO-2 would shard only the LoRA gradients and optimiser state: the run is the replicated one, and says so."""
    data, replicated = two_process_run
    out = tmp_path / "zero2"
    done = _launch(["--model", _model_arg(replicated), "--data", str(data), "--output-dir", str(out), "--batch-size",
                    "2", "--save-steps", "0", *TRAIN], config=ZERO2_CONFIG)
    assert "DeepSpeed ZeRO-2 shards only what is trained" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sharded_base"] is False and summary["zero_stage"] == 2 and summary["base_partition"] is None
    for name, tensors in _adapters(out).items():
        for key, value in tensors.items():
            torch.testing.assert_close(value, _adapters(replicated)[name][key], rtol=0, atol=0)


def _model_arg(run_dir) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["model"]


@pytest.mark.parametrize("config", [DDP_CONFIG, FSDP_CONFIG, pytest.param(ZERO3_CONFIG, marks=needs_deepspeed)],
                         ids=["replicated", "fsdp", "zero3"])
@MULTI_PROCESS
def test_continual_runs_data_parallel(tiny_model_dir, tmp_path, config):
    """COFS-DPO over two domains with two processes serves the same combination as one process (under FSDP, the
    second domain's modules go onto the base the first one sharded)."""
    from conftest import write_jsonl
    from ofsdpo.continual import ContinualConfig, ContinualRunner

    rows = {"pos": (" great.", " awful."), "short": (" yes.", " well, it depends on many things.")}
    domains = [f"{name}={write_jsonl(tmp_path / f'{name}.jsonl', [{'prompt': f'Item {i}: it is', 'chosen': good, 'rejected': bad} for i in range(16)])}"
               for name, (good, bad) in rows.items()]
    common = dict(lr=5e-3, lora_r=2, lora_alpha=4, lora_dropout=0.0, max_length=48, max_prompt_length=24,
                  memory_size=2, heldout_size=2, max_steps_per_domain=2, eval_steps=1, lambda_grid="0,0.5,1",
                  seed=0, method="cofs-dpo", save_steps=0)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    two = tmp_path / "two"
    _launch(["--model", str(tiny_model_dir), *[a for d in domains for a in ("--domain", d)], "--output-dir",
             str(two), "--batch-size", "2", "--no-progress", "--no-regret", *flags], command="continual", config=config)
    one = tmp_path / "one"
    report = ContinualRunner(ContinualConfig.from_flat(model=str(tiny_model_dir), domain=domains, output_dir=str(one),
                                             batch_size=4, progress=False, regret=False, **common)).run()
    stage = json.loads((two / "domains" / "2-short" / "summary.json").read_text())
    assert stage["sharded_base"] is (config != DDP_CONFIG)
    assert json.loads((two / "report.json").read_text())["lambdas"] == report["lambdas"]
    a, b = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, tmp_path_factory):
    """FSDP: 17 pairs, batch 2 per process: the last step has one pair, so process 1 has none and runs a stand-in,
    and so does its share of that round's reference scoring."""
    return _run_two_processes(tiny_model_dir, tmp_path_factory, 17, FSDP_CONFIG)


@MULTI_PROCESS
def test_fsdp_two_processes_equal_one_with_the_same_global_batch(fsdp_run, make_config, tmp_path):
    two, summary = _compare_with_one_process(*fsdp_run, make_config, tmp_path, [4, 8, 12, 16, 17])
    assert two["sharded_base"] is True and summary["sharded_base"] is False
    assert summary["reference_pairs_computed"] == 17
    data, out = fsdp_run
    checkpoint = load_file(out / "checkpoints" / "checkpoint-5" / "adapter-fast.safetensors")
    torch.testing.assert_close(checkpoint, _adapters(out)["fast"], rtol=0, atol=0)


@MULTI_PROCESS
def test_resumed_fsdp_run_matches_the_uninterrupted_one(fsdp_run, tmp_path):
    _crash_and_resume(*fsdp_run, tmp_path, FSDP_CONFIG)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """DeepSpeed ZeRO-3, as fsdp_run: 17 pairs, a stand-in on process 1 at the last step and in the reference. The
    model ties its LM head to the embeddings, so the head is partitioned too and the chunked head gathers it."""
    from tiny import build_tiny_model

    if NO_DEEPSPEED:
        pytest.skip(NO_DEEPSPEED)
    tied = build_tiny_model(tmp_path_factory.mktemp("tied-tiny-llama"), tied=True)
    return _run_two_processes(tied, tmp_path_factory, 17, ZERO3_CONFIG)


@MULTI_PROCESS
@needs_deepspeed
def test_zero3_two_processes_equal_one_with_the_same_global_batch(zero3_run, make_config, tmp_path):
    two, summary = _compare_with_one_process(*zero3_run, make_config, tmp_path, [4, 8, 12, 16, 17])
    assert two["sharded_base"] is True and two["sharding"] == "zero3" and two["zero_stage"] == 3
    assert summary["sharded_base"] is False and summary["zero_stage"] is None
    assert summary["reference_pairs_computed"] == 17
    # process 0 holds about half the base: its embeddings (= the tied head) and linears are split, the norms
    # (below DeepSpeed's persistence threshold, 10 x hidden size) stay whole
    held, of = two["base_partition"]["held"], two["base_partition"]["of"]
    assert 0.45 * of < held < 0.55 * of, two["base_partition"]
    data, out = zero3_run
    checkpoint = load_file(out / "checkpoints" / "checkpoint-5" / "adapter-fast.safetensors")
    torch.testing.assert_close(checkpoint, _adapters(out)["fast"], rtol=0, atol=0)


@MULTI_PROCESS
@needs_deepspeed
def test_resumed_zero3_run_matches_the_uninterrupted_one(zero3_run, tmp_path):
    _crash_and_resume(*zero3_run, tmp_path, ZERO3_CONFIG)


@pytest.mark.parametrize("config", [FSDP_CONFIG, pytest.param(ZERO3_CONFIG, marks=needs_deepspeed)],
                         ids=["fsdp", "zero3"])
@MULTI_PROCESS
def test_sharded_base_refuses_judging_by_sampling(tiny_model_dir, tmp_path, config):
    """Sampling runs a different number of forwards on each process: the sharded base's all-gathers would hang."""
    from conftest import write_jsonl

    domain = write_jsonl(tmp_path / "pos.jsonl", [{"prompt": f"Item {i}: it is", "chosen": " great.",
                                                   "rejected": " awful."} for i in range(8)])
    done = _launch(["--model", str(tiny_model_dir), "--domain", f"pos={domain}", "--output-dir", str(tmp_path / "o"),
                    "--judge-prompts", "2", "--heldout-size", "2", "--memory-size", "1", "--no-progress"],
                   command="continual", config=config, succeed=False)
    assert "--judge-prompts is not supported under FSDP or DeepSpeed ZeRO-3" in done.stderr


def test_micro_batches_is_the_busiest_process_count():
    from ofsdpo.distributed import Processes

    processes = Processes()
    processes.count = 2
    assert processes.micro_batches([16], batch_size=2) == 1  # process 0 has [16], process 1 nothing
    assert processes.micro_batches(list(range(10)), batch_size=2) == 3  # [0, 1] [4, 5] [8] and [2, 3] [6, 7] [9]
    assert processes.micro_batches(list(range(6)), batch_size=4) == 1  # [0, 1, 2] and [3, 4, 5]


def test_shard_splits_each_global_micro_batch_in_process_order():
    from ofsdpo.distributed import Processes

    shards = []
    for index in range(2):
        processes = Processes()
        processes.index, processes.count = index, 2
        shards.append(processes.shard(list(range(10)), batch_size=2))
    # micro-batches of 4 pairs: [0..3] [4..7] [8, 9]; process 0 takes the first half of each
    assert shards == [[0, 1, 4, 5, 8], [2, 3, 6, 7, 9]]


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "zero_stage must be 0, 1, 2 or 3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, "offload_param_device: cpu"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, "deepspeed_config_file"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_GRADIENT_CLIPPING": "1.0"}, "--max-grad-norm"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1 is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
])
def test_unsupported_launches_are_refused_clearly(monkeypatch, env, message):
    from ofsdpo import ConfigError
    from ofsdpo.distributed import Processes

    monkeypatch.setenv("WORLD_SIZE", "2")  # the refusal comes before any process group is set up
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        Processes()
