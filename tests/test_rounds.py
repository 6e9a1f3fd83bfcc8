"""On-policy rounds on the user's own prompts and judges (rounds.py, stream.py, domains.prompt_domain): every judge
kind drives a 3-round run, the rounds' files hold the pairs trained on, a resume is exact, bad input exits 2."""

import json
import math

import pytest
import torch

from conftest import write_jsonl
from ofsdpo import OFSDPOTrainer
from ofsdpo.cli import main
from ofsdpo.data import load_preference_data
from ofsdpo.metrics import read_metrics
from ofsdpo.modules import adapter_state

JUDGES = '''
import math

CALLS = {"n": 0}


def longer(prompt, response, meta):
    return float(len(response)) + float(meta.get("bonus", 0))


def longer_batched(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def longer_pairwise(prompts, completions):
    return [0 if len(a) >= len(b) else 1 for a, b in completions]


def nan_on_second_round(prompt, response, meta):
    CALLS["n"] += 1
    return math.nan if CALLS["n"] > 6 else float(len(response))
'''


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    (tmp_path / "userjudges.py").write_text(JUDGES, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys

    sys.modules.pop("userjudges", None)  # a fresh CALLS counter for every test
    return "userjudges"


def prompt_rows(n: int, chat: bool) -> list[dict]:
    if chat:
        return [{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}], "bonus": i % 2} for i in range(n)]
    return [{"prompt": f"Item {i}: it is", "bonus": i % 2} for i in range(n)]


@pytest.fixture
def reward_model_dir(tmp_path, tokenizer):
    """A tiny randomly initialised sequence-classification model saved to disk (an `hf:PATH` judge)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    folder = tmp_path / "reward-model"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def on_policy_config(make_config, tmp_path, prompts, judge, **overrides):
    values = dict(data=None, prompts=str(prompts), judge=judge, method="dpo", batch_size=2, round_size=2,
                  max_steps=3, samples_per_prompt=3, max_new_tokens=5, output_dir=str(tmp_path / "out"))
    values.update(overrides)
    return make_config(**values)


@pytest.mark.parametrize("kind, chat", [("pointwise", False), ("pointwise", True), ("batched", False),
                                        ("pairwise", False), ("pairwise", True), ("hf", False), ("hf", True),
                                        ("weighted", False)])
def test_every_judge_kind_drives_three_rounds(make_config, tmp_path, judge_module, reward_model_dir, kind, chat):
    judge = {"pointwise": [f"{judge_module}:longer"], "batched": [f"{judge_module}:longer_batched"],
             "pairwise": [f"pairwise:{judge_module}:longer_pairwise"], "hf": [f"hf:{reward_model_dir}"],
             "weighted": [f"{judge_module}:longer:0.5", f"{judge_module}:longer_batched:2"]}[kind]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(12, chat))
    trainer = OFSDPOTrainer(config=on_policy_config(make_config, tmp_path, prompts, judge))
    summary = trainer.train().summary
    assert summary["steps"] == 3 and summary["on_policy"]["pairs_generated"] == len(trainer.data)
    rounds = sorted((trainer.output_dir / "rounds").glob("round-*.jsonl"))
    rows = [json.loads(line) for path in rounds for line in path.read_text().splitlines()]
    assert len(rounds) >= 3 and len(rows) == len(trainer.data)  # ties skipped: more rounds may have been sampled
    replayed = load_preference_data(rows, trainer.tokenizer, 64, 32).pairs
    for ours, theirs in zip(trainer.data.pairs, replayed):  # the files hold exactly the pairs trained on
        assert ours["chosen_ids"] == theirs["chosen_ids"] and ours["rejected_ids"] == theirs["rejected_ids"]
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert all(isinstance(r["prompt"], list) == chat for r in rows)
    metrics = [r for r in read_metrics(trainer.output_dir / "metrics.jsonl") if "online/judge_score" in r]
    assert len(metrics) == 3  # one row per round that trained
    for r in metrics:
        assert math.isfinite(r["online/judge_score"]) and r["online/sampled_tokens"] > 0
        assert r["online/chosen_score"] > r["online/rejected_score"] and r["online/sample_seconds"] > 0


def test_judge_sees_the_rows_meta_and_weights_add(make_config, tmp_path, judge_module):
    """`longer` adds the row's `bonus` column: with weight 2 the round's mean score is twice the weight-1 one."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(4, False))
    scores = []
    for weight in ("1", "2"):
        trainer = OFSDPOTrainer(config=on_policy_config(make_config, tmp_path, prompts, [f"{judge_module}:longer:{weight}"],
                                                        max_steps=1, output_dir=str(tmp_path / f"w{weight}")))
        trainer.train()
        scores.append(read_metrics(trainer.output_dir / "metrics.jsonl")[0]["online/judge_score"])
    assert scores[1] == pytest.approx(2 * scores[0], rel=1e-12) and scores[0] > 0


def test_on_policy_resume_after_a_kill_is_exact(make_config, tmp_path, monkeypatch, judge_module):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(12, True))
    kw = dict(max_steps=4, save_steps=1, lora_dropout=0.1)
    whole = OFSDPOTrainer(config=on_policy_config(make_config, tmp_path, prompts, [f"{judge_module}:longer"],
                                                  output_dir=str(tmp_path / "whole"), **kw))
    whole.train()
    original = OFSDPOTrainer._after_step

    def crash(self, row, seconds):
        if self.state.step == 3:
            raise RuntimeError("killed")
        return original(self, row, seconds)

    monkeypatch.setattr(OFSDPOTrainer, "_after_step", crash)
    crashed = on_policy_config(make_config, tmp_path, prompts, [f"{judge_module}:longer"],
                               output_dir=str(tmp_path / "crash"), **kw)
    with pytest.raises(RuntimeError, match="killed"):
        OFSDPOTrainer(config=crashed).train()
    monkeypatch.setattr(OFSDPOTrainer, "_after_step", original)
    resumed = OFSDPOTrainer(config=on_policy_config(make_config, tmp_path, prompts, [f"{judge_module}:longer"],
                                                    output_dir=str(tmp_path / "crash"), resume=True, **kw))
    resumed.train()
    a, b = adapter_state(whole.model, "default"), adapter_state(resumed.model, "default")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p["chosen_ids"] for p in whole.data.pairs] == [p["chosen_ids"] for p in resumed.data.pairs]
    for path in sorted((tmp_path / "whole" / "rounds").glob("*.jsonl")):
        assert (tmp_path / "crash" / "rounds" / path.name).read_text() == path.read_text()


def test_resume_on_other_prompts_is_refused(make_config, tmp_path, judge_module):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(12, False))
    OFSDPOTrainer(config=on_policy_config(make_config, tmp_path, prompts, [f"{judge_module}:longer"], max_steps=2,
                                          save_steps=1)).train()
    write_jsonl(prompts, prompt_rows(12, False)[::-1])
    from ofsdpo import ConfigError

    with pytest.raises(ConfigError, match="other --prompts"):
        OFSDPOTrainer(config=on_policy_config(make_config, tmp_path, prompts, [f"{judge_module}:longer"],
                                              max_steps=3, resume=True)).train()


def _train(tiny_model_dir, tmp_path, *extra) -> list[str]:
    return ["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "out"), "--method", "dpo",
            "--batch-size", "2", "--round-size", "2", "--max-steps", "3", "--samples-per-prompt", "3",
            "--max-new-tokens", "5", "--lora-r", "4", "--max-length", "64", "--max-prompt-length", "32",
            "--no-progress", "--save-steps", "0", *extra]


def test_prompts_without_a_prompt_field_exit_2_naming_file_and_row(tiny_model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"question": "b"}])
    assert main(_train(tiny_model_dir, tmp_path, "--prompts", str(bad), "--judge", "sentiment")) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl, row 2, field 'prompt'" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_judge_exits_2(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(4, False))
    assert main(_train(tiny_model_dir, tmp_path, "--prompts", str(prompts), "--judge", "sentimnet")) == 2
    err = capsys.readouterr().err
    assert "sentimnet" in err and "sentiment" in err  # named, with the near built-in name


def test_judge_returning_nan_exits_2_after_a_checkpoint(tiny_model_dir, tmp_path, capsys, judge_module):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(12, False))
    code = main(_train(tiny_model_dir, tmp_path, "--prompts", str(prompts), "--judge", f"{judge_module}:nan_on_second_round"))
    err = capsys.readouterr().err
    assert code == 2
    assert "nan_on_second_round" in err and "row 3" in err and "prompts.jsonl" in err  # round 2 starts at row 3
    out = tmp_path / "out"
    assert (out / "checkpoints" / "checkpoint-1").is_dir()  # the step before the failing round, for --resume
    assert not (out / "summary.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["round-1.jsonl"]  # the failed round left nothing


def test_on_policy_flag_combinations(make_config, tmp_path):
    from ofsdpo import ConfigError

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(4, False))
    assert make_config(data=None, prompts=str(prompts), judge=["sentiment"]).on_policy == "prompts"
    with pytest.raises(ConfigError, match="needs --prompts"):
        make_config(data=None, on_policy="prompts")
    with pytest.raises(ConfigError, match="add --prompts"):
        make_config(judge=["sentiment"])
    with pytest.raises(ConfigError, match="drop --prompts"):
        make_config(data=None, on_policy="sentiment", prompts=str(prompts))
