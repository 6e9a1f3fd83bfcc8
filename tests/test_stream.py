"""The on-policy stream (stream.py): each round's pairs are sampled from the current policy and labelled by the judge."""

import pytest
import torch

from ofsdpo import OFSDPOTrainer
from ofsdpo.metrics import read_metrics
from ofsdpo.modules import adapter_state


def test_rounds_are_generated_from_the_policy(make_config, length_judged):
    trainer = OFSDPOTrainer(config=make_config(data=None, on_policy="concise", method="ofs-dpo", batch_size=2,
                                               max_steps=3, samples_per_prompt=3))
    summary = trainer.train()
    assert summary["steps"] == 3
    generated = summary["on_policy"]
    assert generated["pairs_generated"] == len(trainer.data) >= 4 and generated["prompts_used"] >= 6
    assert all(p["chosen_ids"] != p["rejected_ids"] for p in trainer.data.pairs)
    rows = read_metrics(trainer.output_dir / "metrics.jsonl")
    assert all("fast/online/loss" in r for r in rows)  # one step per round: each round scored before its update


def test_on_policy_resume_ends_identical(make_config, tmp_path, monkeypatch, length_judged):
    kw = dict(data=None, on_policy="concise", method="dpo", batch_size=2, max_steps=4, samples_per_prompt=3,
              save_steps=1, lora_dropout=0.1)
    whole = OFSDPOTrainer(config=make_config(output_dir=str(tmp_path / "whole"), **kw))
    whole.train()
    original = OFSDPOTrainer._after_step

    def crash(self, row, seconds):
        if self.state.step == 3:
            raise RuntimeError("crash")
        return original(self, row, seconds)

    monkeypatch.setattr(OFSDPOTrainer, "_after_step", crash)
    with pytest.raises(RuntimeError):
        OFSDPOTrainer(config=make_config(output_dir=str(tmp_path / "crash"), **kw)).train()
    monkeypatch.setattr(OFSDPOTrainer, "_after_step", original)
    resumed = OFSDPOTrainer(config=make_config(output_dir=str(tmp_path / "crash"), resume=True, **kw))
    resumed.train()
    a, b = adapter_state(whole.model, "default"), adapter_state(resumed.model, "default")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p["chosen_ids"] for p in whole.data.pairs] == [p["chosen_ids"] for p in resumed.data.pairs]


def test_on_policy_rejects_data_and_unknown_domains(make_config):
    from ofsdpo import ConfigError

    with pytest.raises(ConfigError, match="drop --data"):
        make_config(on_policy="concise")
    with pytest.raises(ConfigError, match="built-in domain"):
        make_config(data=None, on_policy="nope")
