"""Sampling, judging into pairs, and judge-based evaluation on the tiny model (its text is noise; the plumbing is
what is tested)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import length_judge
from ofsdpo.cli import main
from ofsdpo.data import load_preference_data
from ofsdpo.domains import BuiltinDomain, get_domain
from ofsdpo.scoring import judge_eval
from ofsdpo.generation import make_pairs, sample
from ofsdpo.modules import DPO_ADAPTERS, attach_adapters, lora_config


def test_sampling_returns_k_responses_per_prompt(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    out = sample(model, tokenizer, ["Hello there", "A much longer prompt than the first"], chat=False,
                 num_samples=3, max_new_tokens=5, batch_size=2)
    assert len(out) == 2 and all(len(r) == 3 for r in out)
    assert tokenizer.padding_side == "right"  # restored


def test_pairs_take_best_and_worst_and_load_as_training_data(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    domain = BuiltinDomain("toy", length_judge, chat=True, max_new_tokens=6, description="longer is better")
    records = [{"prompt": f"Question {i}?", "meta": {}} for i in range(4)]
    torch.manual_seed(0)
    pairs, ties = make_pairs(model, tokenizer, domain, records, samples_per_prompt=3, batch_size=4)
    assert len(pairs) + ties == 4
    for pair in pairs:
        assert pair["score_chosen"] > pair["score_rejected"]
        assert len(pair["chosen"][0]["content"]) == pair["score_chosen"]
    data = load_preference_data(pairs, tokenizer, 64, 32)
    assert len(data) == len(pairs)


def test_judge_eval_reports_score_win_rate_and_kl(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(2, 4, 0.0, "all-linear"),
                            DPO_ADAPTERS)
    records = get_domain("sentiment").prompts("heldout")[:3]
    result = judge_eval(model, tokenizer, get_domain("sentiment"), records, adapter="default", batch_size=3)
    assert set(result) == {"judge_score", "reference_judge_score", "win_rate", "kl", "response_words", "judged_samples",
                           "per_prompt"}
    assert result["judged_samples"] == len(records) and len(result["per_prompt"]["kl"]) == len(records)
    assert abs(result["kl"]) < 1e-4  # B = 0: the policy is the reference
    per_prompt = result["per_prompt"]  # the means are those of the per-prompt values (the bootstrap's units)
    assert sum(per_prompt["win_rate"]) / 3 == pytest.approx(result["win_rate"])
    assert sum(per_prompt["judge_score"]) / 3 == pytest.approx(result["judge_score"])


def test_generate_command_writes_judged_pairs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    code = main(["generate", "--domain", "sentiment", "--model", str(tiny_model_dir), "--num-prompts", "3",
                 "--samples-per-prompt", "2", "--out", str(out), "--no-progress", "--seed", "1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["pairs"] == len(rows) and summary["pairs"] + summary["ties_skipped"] == 3
    assert all(r["domain"] == "sentiment" and r["score_chosen"] > r["score_rejected"] for r in rows)


def test_generate_rejects_an_unknown_domain(capsys):
    assert main(["generate", "--domain", "nope"]) == 2
    assert "built-in domains are" in capsys.readouterr().err
