"""The on-policy stream (stream.py): each round's pairs are sampled from the current policy and labelled by the judge."""

import pytest
import torch
from conftest import sentiment_rows, write_jsonl

from ofsdpo import OFSDPOTrainer
from ofsdpo.metrics import read_metrics
from ofsdpo.modules import adapter_state


def test_rounds_are_generated_from_the_policy(make_config, length_judged):
    trainer = OFSDPOTrainer(config=make_config(data=None, on_policy="concise", method="ofs-dpo", batch_size=2,
                                               max_steps=3, samples_per_prompt=3))
    summary = trainer.train().summary
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
    from ofsdpo import OFSDPOTrainer

    # the name is checked where the domain loads (config knows no domain), before the model: with a suggestion
    with pytest.raises(ConfigError, match=r"--on-policy: unknown domain 'critc' \(did you mean 'critic'\?\): "
                                          r"built-in domains are sentiment, .*; or give --on-policy bare"):
        OFSDPOTrainer(config=make_config(data=None, on_policy="critc"))


def test_an_on_policy_run_where_every_prompt_ties_stops_with_one_line(make_config, monkeypatch, capsys):
    """A judge that gives every sample the same score: no pair, no step. The run does not end "done" with 0 steps:
    exit 2, one line saying why and what to change."""
    import dataclasses

    from ofsdpo import domains
    from ofsdpo.cli import main

    flat = dataclasses.replace(domains.DOMAINS["concise"], judge=lambda prompt, response, meta: 0.0,
                               max_new_tokens=3)
    monkeypatch.setitem(domains.DOMAINS, "concise", flat)
    config = make_config(data=None, on_policy="concise", batch_size=2, max_steps=2, samples_per_prompt=2)
    with pytest.raises(Exception, match="every sampled prompt tied under the judge"):
        OFSDPOTrainer(config=config).train()
    flags = ["train", "--model", config.model, "--on-policy", "concise", "--batch-size", "2", "--max-steps", "2",
             "--samples-per-prompt", "2", "--output-dir", config.output_dir + "-cli", "--lora-r", "2",
             "--max-length", "64", "--max-prompt-length", "32", "--no-progress"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "nothing to learn; raise --samples-per-prompt" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_epochs_are_passes_of_steps_and_the_reference_is_scored_once_per_pair(make_config, tmp_path, monkeypatch):
    """--epochs 3 on a 1-row file: three steps of that one pair (it used to be one step with the pair three times in
    its batch), and π_ref scored once: the later passes read the cache. 6 pairs at 4 a step, 2 passes: 2 steps a
    pass, no batch mixing two passes."""
    import json

    from ofsdpo import reference

    scored = []
    original = reference.pair_logps
    monkeypatch.setattr(reference, "pair_logps", lambda model, pairs, *a, **k: scored.extend(pairs) or
                        original(model, pairs, *a, **k))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "Review: the film", "chosen": " was moving.", "rejected": " was dull."})
                   + "\n")
    trainer = OFSDPOTrainer(config=make_config(data=str(one), epochs=3, method="dpo", regret=False,
                                               output_dir=str(tmp_path / "one")))
    summary = trainer.train().summary
    assert summary["steps"] == trainer.total_steps == 3 and summary["pairs_seen"] == 3
    assert len(scored) == 1 and summary["reference_pairs_computed"] == 1
    six = write_jsonl(tmp_path / "six.jsonl", sentiment_rows(6))
    batches, after_step = [], OFSDPOTrainer._after_step

    def record(self, row, seconds):
        batches.append(self.stream.order[self.state.position - row["pairs"]:self.state.position])
        return after_step(self, row, seconds)

    monkeypatch.setattr(OFSDPOTrainer, "_after_step", record)
    OFSDPOTrainer(config=make_config(data=str(six), epochs=2, method="dpo", regret=False,
                                     output_dir=str(tmp_path / "six"))).train()
    assert batches == [[0, 1, 2, 3], [4, 5], [0, 1, 2, 3], [4, 5]]


def test_rounds_of_ties_only_are_counted_in_a_metrics_row(make_config, monkeypatch):
    """A round where every prompt ties trains nothing, but its row is written: counted in the row of the step that
    follows it (online/ties of both rounds, their prompts' judge score), or, when no step follows (every round
    tied), in a row of its own before the run stops with exit 2."""
    import dataclasses

    from ofsdpo import domains

    calls = []

    def first_round_ties(prompt, response, meta):  # the first round: 2 prompts x 2 samples, all scored 0
        calls.append(response)
        return 0.0 if len(calls) <= 4 else float(len(response))

    concise = domains.DOMAINS["concise"]
    monkeypatch.setitem(domains.DOMAINS, "concise", dataclasses.replace(concise, judge=first_round_ties,
                                                                        max_new_tokens=5))
    config = make_config(data=None, on_policy="concise", method="dpo", batch_size=2, max_steps=1,
                         samples_per_prompt=2, output_dir=make_config().output_dir + "-some")
    trainer = OFSDPOTrainer(config=config)
    trainer.train()
    row, = read_metrics(trainer.output_dir / "metrics.jsonl")
    # the first round's 2 ties (and any of the round after it) are in the one row; it held only the last round's
    assert row["step"] == 1 and row["online/ties"] == trainer.state.ties_skipped >= 2
    assert trainer.state.prompt_position >= 4 and row["online/sample_seconds"] > 0

    monkeypatch.setitem(domains.DOMAINS, "concise", dataclasses.replace(concise, judge=lambda p, r, m: 0.0,
                                                                        max_new_tokens=3))
    flat = OFSDPOTrainer(config=make_config(data=None, on_policy="concise", method="dpo", batch_size=2, max_steps=2,
                                            samples_per_prompt=2))
    with pytest.raises(Exception, match="every sampled prompt tied under the judge"):
        flat.train()
    row, = read_metrics(flat.output_dir / "metrics.jsonl")
    assert row["step"] == 0 and row["online/ties"] == flat.state.prompt_position == flat.state.ties_skipped > 0


def test_sampling_and_judging_show_as_phases_and_throughput_says_what_it_counts(make_config, monkeypatch):
    """An on-policy round with a slow judge: the progress bar's description names the phase running (the judge
    sees "judging"), `online/judge_seconds` holds the judge's time, and `pairs_per_second_with_sampling` counts
    it while `pairs_per_second` (the step alone) does not."""
    import dataclasses
    import time

    from tqdm.auto import tqdm

    import ofsdpo.trainer
    from ofsdpo import domains

    shown = []

    class Recording(tqdm):
        def set_description(self, desc=None, refresh=True):
            shown.append(desc)
            super().set_description(desc, refresh)

    judged_under = []

    def slow_judge(prompt, response, meta):
        judged_under.append(shown[-1] if shown else None)
        time.sleep(0.1)
        return float(len(response))

    monkeypatch.setattr(ofsdpo.trainer, "tqdm", Recording)
    monkeypatch.setitem(domains.DOMAINS, "concise", dataclasses.replace(domains.DOMAINS["concise"], judge=slow_judge,
                                                                        max_new_tokens=5))
    trainer = OFSDPOTrainer(config=make_config(data=None, on_policy="concise", method="dpo", batch_size=2,
                                               max_steps=2, samples_per_prompt=2))
    trainer.train()
    assert shown[:3] == ["dpo (sampling)", "dpo (judging)", "dpo"]  # and back once the round is ready
    assert set(judged_under) == {"dpo (judging)"}
    for row in read_metrics(trainer.output_dir / "metrics.jsonl"):
        assert row["online/judge_seconds"] >= 0.1 * 4  # 2 prompts x 2 samples, 0.1 s each
        with_sampling = row["pairs"] / row["pairs_per_second_with_sampling"]
        step_alone = row["pairs"] / row["pairs_per_second"]
        assert with_sampling >= step_alone + row["online/judge_seconds"] + row["online/sample_seconds"]
