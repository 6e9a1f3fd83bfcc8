"""Stages trained and served modules scored once for continual runs that would compute them alike (`reuse`)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from ofsdpo.config import ContinualConfig
from ofsdpo.continual import ContinualRunner
from ofsdpo.reuse import SharedWork
from ofsdpo.trainer import OFSDPOTrainer


def domain_rows(good, bad, n=20):
    return [{"prompt": f"Item {i}: it is", "chosen": f" {good}.", "rejected": f" {bad}."} for i in range(n)]


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    files = {"sentiment": ("great", "awful"), "critic": ("awful", "great")}
    domains = [f"{n}={write_jsonl(tmp_path / f'{n}.jsonl', domain_rows(*w))}" for n, w in files.items()]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return domains, base, tokenizer


def run(setup, out, shared=None, reference=None, **kw):
    domains, base, tokenizer = setup
    values = dict(domain=domains, output_dir=str(out), batch_size=4, lr=5e-3, lora_r=2, lora_alpha=4, max_length=48,
                  max_prompt_length=24, memory_size=4, heldout_size=4, max_steps_per_domain=2, save_steps=0,
                  progress=False, lambda_grid="0,0.5,1", regret=False, seed=1, judge_prompts=2,
                  method="cofs-dpo", combine="delta")
    values.update(kw)
    runner = ContinualRunner(ContinualConfig.from_flat(**values), model=base, tokenizer=tokenizer, shared=shared,
                             reference_scores=reference)
    return runner.run()


def count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_shared_first_stage_trains_and_scores_once_with_the_same_results(setup, tmp_path, monkeypatch):
    """cofs-dpo --init previous then --init fresh: their first stage (OFS-DPO from scratch on sentiment) is one
    computation. With a SharedWork the second run trains and scores it no more, and its report, served adapter and
    stage files equal those of the same run without sharing."""
    trains = count_calls(monkeypatch, OFSDPOTrainer, "train")
    scored = count_calls(monkeypatch, ContinualRunner, "_report_sets")  # once per served module scored and judged
    alone = run(setup, tmp_path / "alone", init="fresh")
    assert len(trains) == 2 and len(scored) == 2
    shared = SharedWork()
    run(setup, tmp_path / "previous", shared, init="previous")
    trains.clear(), scored.clear()
    reused = run(setup, tmp_path / "fresh", shared, init="fresh")
    assert len(trains) == 1 and len(scored) == 1  # stage 2 only: stage 1 came from the first run
    assert json.dumps(reused["matrix"]) == json.dumps(alone["matrix"])
    assert reused["stages"] == alone["stages"] and reused["base_judge_score"] == alone["base_judge_score"]
    served_alone = load_file(tmp_path / "alone" / "adapter_model.safetensors")
    served_reused = load_file(tmp_path / "fresh" / "adapter_model.safetensors")
    assert served_alone.keys() == served_reused.keys()
    assert all(torch.equal(served_alone[k], served_reused[k]) for k in served_alone)
    stage = tmp_path / "fresh" / "domains" / "1-sentiment"
    assert (stage / "metrics.jsonl").read_text() == (tmp_path / "previous" / "domains" / "1-sentiment" /
                                                     "metrics.jsonl").read_text()
    assert str(stage) in (stage / "config.yaml").read_text() and (stage / "best_fast").is_dir()


def test_other_weights_or_options_are_not_reused(setup, tmp_path, monkeypatch):
    """Another seed, or another initial state (--init previous after a different first stage), trains again."""
    trains = count_calls(monkeypatch, OFSDPOTrainer, "train")
    shared = SharedWork()
    run(setup, tmp_path / "a", shared, method="dpo")
    run(setup, tmp_path / "b", shared, method="dpo", seed=2)
    assert len(trains) == 4
    run(setup, tmp_path / "c", shared, method="lora-merge")  # its first stage is dpo's; its second starts fresh
    assert len(trains) == 5
    run(setup, tmp_path / "d", shared, method="dpo", lr=1e-3)
    assert len(trains) == 7


def test_scoring_key_follows_the_weights(setup):
    shared, calls = SharedWork(), []
    state = {"w": torch.ones(2, 2)}
    compute = lambda: calls.append(1) or {"x": len(calls)}  # noqa: E731
    assert shared.score({"a": 1}, state, compute) == {"x": 1}
    assert shared.score({"a": 1}, {"w": torch.ones(2, 2)}, compute) == {"x": 1} and len(calls) == 1
    shared.score({"a": 1}, {"w": torch.ones(2, 2) + 1e-7}, compute)
    shared.score({"a": 2}, state, compute)
    assert len(calls) == 3
