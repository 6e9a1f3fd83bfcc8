"""`ofsdpo eval` on the tiny model: one row per (adapter, domain) with the base as a row of its own; a length judge
stands in for the built-in ones (the tiny model's text is noise, which VADER scores as ties)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import sentiment_rows, write_jsonl
from ofsdpo import domains
from ofsdpo.cli import main
from ofsdpo.commands.eval import format_eval_table
from ofsdpo.modules import DPO_ADAPTERS, attach_adapters, lora_config, save_adapter

TINY = ["--max-length", "64", "--max-prompt-length", "32", "--batch-size", "4", "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA with non-zero B, so that it differs from the base."""
    torch.manual_seed(0)
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            lora_config(2, 4, 0.0, "all-linear"), DPO_ADAPTERS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return save_adapter(model, "default", tmp_path_factory.mktemp("adapter"))


def test_eval_scores_the_base_and_each_adapter(tiny_model_dir, adapter_dir, tmp_path, length_judged, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", sentiment_rows(6))
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--domain", "sentiment",
                 "--domain", "concise", "--data", f"sentiment={pairs}", "--judge-prompts", "3", "--judge-samples",
                 "2", "--pair-prompts", "3", "--samples-per-prompt", "2", "--json", str(out), *TINY])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["adapter"], r["domain"]) for r in rows] == [
        ("base", "sentiment"), (str(adapter_dir), "sentiment"), ("base", "concise"), (str(adapter_dir), "concise")]
    # the printed table is the JSON's rows, one line each under the header
    printed = capsys.readouterr().out
    assert printed == format_eval_table(rows) + f"results written to {out}\n"
    lines = printed.splitlines()
    assert len(lines) == 1 + len(rows) + 2 and "win rate" in lines[0]
    assert lines[-2].startswith("pref acc: ") and "a tie counted as half" in lines[-2]  # the legend says how
    for line, row in zip(lines[1:], rows):
        assert line.split() == [row["adapter"], row["domain"], f"{row['loss']:.4f}", f"{row['accuracy']:.3f}",
                                f"{row['judge_score']:+.3f}", f"{row['win_rate']:.3f}", f"{row['kl']:.3f}",
                                f"{row['response_words']:.1f}"]
    base, adapted = rows[0], rows[1]
    assert base["pairs"] == 6 and base["pairs_source"] == str(pairs)
    assert base["loss"] == pytest.approx(math.log(2), abs=1e-4) and abs(base["kl"]) < 1e-4  # the base is π_ref
    assert base["accuracy"] == 0.5  # every pair a tie, counted half (as win rate counts them), not 0.000
    assert abs(adapted["loss"] - math.log(2)) > 1e-4 and abs(adapted["kl"]) > 1e-4
    for row in rows:
        assert row["judge_prompts"] == 3 and row["judged_samples"] == 6  # 3 prompts x --judge-samples 2
        assert len(row["per_prompt"]["judge_score"]) == 3
        assert sum(row["per_prompt"]["judge_score"]) / 3 == pytest.approx(row["judge_score"])
        if row["adapter"] == "base":  # the base draws the reference's very samples (common random numbers): a tie
            assert row["win_rate"] == 0.5 and row["judge_score"] == row["reference_judge_score"]
        # six samples, a tie counting half: the win rate is a whole number of half-wins out of six
        assert row["win_rate"] * 12 == pytest.approx(round(row["win_rate"] * 12))
    for base_row, adapter_row in (rows[0:2], rows[2:4]):  # one set of reference samples per domain, for every row
        assert adapter_row["reference_judge_score"] == base_row["reference_judge_score"]
    assert rows[2]["pairs_source"] == "generated" and rows[2]["pairs"] > 0 and "loss" in rows[2]


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "no/such/adapter", "--domain", "sentiment"], "--adapter no/such/adapter: not a peft adapter"),
    (["--domain", "poetry"], "unknown domain 'poetry'"),
    ([], "or --prompts FILE --judge SPEC is required"),
])
def test_eval_bad_input_exits_2(flags, message, capsys):
    assert main(["eval", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_common_random_numbers_make_an_unmoved_module_tie_with_the_reference(tiny_model_dir, tokenizer,
                                                                              length_judged):
    """continual's judging samples the reference and the policy from the same seed: a module equal to the base
    (a fresh LoRA, B = 0) then draws the very same samples, and the global RNG is left untouched."""
    from ofsdpo.scoring import common_random_numbers, judge_eval, reference_samples

    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(2, 4, 0.0, "all-linear"),
                            DPO_ADAPTERS)
    domain, cpu = domains.get_domain("sentiment"), torch.device("cpu")
    records = domain.prompts("heldout")[:4]
    with common_random_numbers(3, cpu):
        ref = reference_samples(model, tokenizer, domain, records)
    before = torch.random.get_rng_state()
    with common_random_numbers(3, cpu):
        same = judge_eval(model, tokenizer, domain, records, "default", ref_scores=ref)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert same["win_rate"] == 0.5 and same["judge_score"] == same["reference_judge_score"]
    for _ in range(2):
        with common_random_numbers(3, cpu):
            again = judge_eval(model, tokenizer, domain, records, "default", ref_scores=ref)
        assert again["kl"] == 0.0 and again["per_prompt"]["kl"] == [0.0] * len(records)  # the same numbers, exactly
    assert same["kl"] == 0.0
    with common_random_numbers(4, cpu):  # other draws: other samples
        other = judge_eval(model, tokenizer, domain, records, "default", ref_scores=ref)
    assert other["judge_score"] != other["reference_judge_score"]


def test_eval_on_your_own_prompts_and_judge(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    """`--prompts NAME=FILE --judge module:function` (conversational prompts, a meta column the judge reads) and
    held-out pairs from `--data NAME=PATH`: the base and the adapter each get a row on the user's domain."""
    (tmp_path / "evaljudge.py").write_text("def longer(prompt, response, meta):\n"
                                           "    return float(len(response)) + meta['bonus']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "asks.jsonl", [{"prompt": [{"role": "user", "content": f"Tell me about {i}."}],
                                                      "bonus": 100} for i in range(5)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", sentiment_rows(4))
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--prompts", f"mine={prompts}",
                 "--judge", "evaljudge:longer", "--data", f"mine={pairs}", "--judge-prompts", "4", "--json", str(out),
                 *TINY])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["adapter"], r["domain"]) for r in rows] == [("base", "mine"), (str(adapter_dir), "mine")]
    for row in rows:
        assert row["pairs"] == 4 and row["pairs_source"] == str(pairs) and row["judge_prompts"] == 4
        assert row["judge_score"] >= 100  # the judge read the row's `bonus` column
    assert rows[0]["win_rate"] == 0.5 and abs(rows[0]["kl"]) < 1e-4  # the base against itself: ties, no KL


def test_eval_prompts_need_a_judge(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "asks.jsonl", [{"prompt": "Hi"}])
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), *TINY]) == 2
    assert "--judge" in capsys.readouterr().err
