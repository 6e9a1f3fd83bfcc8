"""End to end on a tiny Llama: outputs, invariants, resume, and the two-adapter gradient trap."""

import json
import math
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import sentiment_rows, write_jsonl
from ofsdpo import ConfigError, OFSDPOTrainer
from ofsdpo.data import collate
from ofsdpo.logprobs import concatenated_forward
from ofsdpo.metrics import read_metrics
from ofsdpo.modules import adapter_state

TRL_NAMES = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected"]


def adapters(path):
    return load_file(path / "adapter_model.safetensors")


def test_dpo_writes_a_servable_peft_adapter(make_config, tiny_model_dir):
    config = make_config(method="dpo")
    summary = OFSDPOTrainer(config=config).train().summary
    out = Path(config.output_dir)
    for name in ["adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "summary.json",
                 "regret.jsonl"]:
        assert (out / name).exists(), name
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and summary["steps"] == 4
    for name in TRL_NAMES + ["learning_rate", "grad_norm", "num_tokens", "tokens_per_second", "online/loss"]:
        assert all(name in r for r in rows), name
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    served = PeftModel.from_pretrained(base, out)
    auto = AutoPeftModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(served(ids).logits, auto(ids).logits)
    assert not torch.allclose(served(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits)


def test_ofs_dpo_trains_both_modules_every_step(make_config):
    config = make_config(method="ofs-dpo", alpha=0.5, chase_interval=2, lora_dropout=0.1)
    trainer = OFSDPOTrainer(config=config)
    base_before = {n: p.clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    init = {n: adapter_state(trainer.model, n) for n in ("fast", "slow")}
    assert all(torch.equal(init["fast"][k], init["slow"][k]) for k in init["fast"])  # identical start
    trainer.train()
    rows = read_metrics(trainer.output_dir / "metrics.jsonl")
    for row in rows:  # the set_adapter trap would zero one of these
        assert row["fast/grad_norm"] > 0 and row["slow/grad_norm"] > 0
        for name in TRL_NAMES[1:]:
            assert f"fast/{name}" in row and f"slow/{name}" in row
        for name in ["loss", "chase/loss", "chase/leader", "chase/swaps", "fast/learning_rate", "slow/learning_rate"]:
            assert name in row
    assert rows[0]["slow/learning_rate"] == pytest.approx(0.5 * rows[0]["fast/learning_rate"])
    for n, p in trainer.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), f"base weight {n} changed"
    final = {n: adapter_state(trainer.model, n) for n in ("fast", "slow")}
    for name in ("fast", "slow"):
        assert any(not torch.equal(final[name][k], init[name][k]) for k in final[name] if "lora_B" in k)
    assert any(not torch.equal(final["fast"][k], final["slow"][k]) for k in final["fast"])
    out = trainer.output_dir
    summary = json.loads((out / "summary.json").read_text())
    assert torch.equal(adapters(out)[next(iter(adapters(out)))], adapters(out / summary["served_module"])[next(iter(adapters(out)))])
    assert (out / "fast" / "adapter_config.json").exists() and (out / "slow" / "adapter_config.json").exists()


@pytest.mark.parametrize("passes", ["joint", "fused"])
def test_no_chasing_and_equal_rates_reduce_to_dpo(make_config, tmp_path, passes):
    """α = 0, η_S = η_F, no dropout: fast and slow stay identical and equal to a dpo run with the same seed. With
    one forward per module (joint) bit for bit; fused stacks both in one GEMM, whose rows may round differently
    (float32: equal to its rounding)."""
    ofs = OFSDPOTrainer(config=make_config(method="ofs-dpo", alpha=0.0, slow_lr_ratio=1.0, lora_dropout=0.0,
                                           module_passes=passes, output_dir=str(tmp_path / "ofs")))
    ofs.train()
    dpo = OFSDPOTrainer(config=make_config(method="dpo", lora_dropout=0.0, output_dir=str(tmp_path / "dpo")))
    dpo.train()
    fast, slow = adapter_state(ofs.model, "fast"), adapter_state(ofs.model, "slow")
    single = adapter_state(dpo.model, "default")
    for key in fast:
        if passes == "joint":
            assert torch.equal(fast[key], slow[key])
        else:
            torch.testing.assert_close(fast[key], slow[key])  # float32's default tolerances
        torch.testing.assert_close(fast[key], single[key])


@pytest.mark.parametrize("chase_form", ["minmax", "symmetric"])
def test_sequential_module_passes_give_the_joint_gradients(make_config, tmp_path, chase_form):
    """One module's graph at a time (less memory) takes the same steps as one joint backward (no dropout)."""
    runs = {}
    for passes in ("joint", "sequential"):
        trainer = OFSDPOTrainer(config=make_config(method="ofs-dpo", alpha=0.5, lora_dropout=0.0, chase_interval=1,
                                                   chase_form=chase_form, module_passes=passes, batch_size=2,
                                                   grad_accum=2, output_dir=str(tmp_path / passes)))
        trainer.train()
        runs[passes] = trainer
    for name in ("fast", "slow"):
        joint, sequential = adapter_state(runs["joint"].model, name), adapter_state(runs["sequential"].model, name)
        assert any(not torch.equal(joint[k], adapter_state(runs["joint"].model, "fast" if name == "slow" else "slow")[k])
                   for k in joint)  # the chase made the modules differ: the test compares real updates
        for key in joint:
            torch.testing.assert_close(sequential[key], joint[key], rtol=1e-5, atol=1e-6)
    rows = [read_metrics(tmp_path / p / "metrics.jsonl") for p in ("joint", "sequential")]
    assert [r["loss"] for r in rows[1]] == pytest.approx([r["loss"] for r in rows[0]], rel=1e-5)


def test_reference_cache_equals_a_fresh_forward_and_is_computed_once(make_config):
    trainer = OFSDPOTrainer(config=make_config(method="ofs-dpo", epochs=2))
    summary = trainer.train().summary
    assert summary["reference_pairs_computed"] == len(trainer.data) == 16  # two epochs, one scoring per pair
    batch = {k: v for k, v in collate(trainer.data.pairs, trainer.tokenizer.pad_token_id).items()}
    with trainer.model.disable_adapter(), torch.no_grad():
        trainer.model.eval()
        chosen, rejected = concatenated_forward(trainer.model, batch)
    assert torch.allclose(trainer.reference.chosen, chosen, atol=1e-5)
    assert torch.allclose(trainer.reference.rejected, rejected, atol=1e-5)


@pytest.mark.parametrize("round_size", [4, 8])
def test_online_loss_is_recorded_before_the_update(make_config, round_size):
    """At the start the adapters are zero (B = 0), so policy = reference and the round's loss is exactly log 2."""
    trainer = OFSDPOTrainer(config=make_config(method="dpo", round_size=round_size, lora_dropout=0.0))
    trainer.train()
    rows = read_metrics(trainer.output_dir / "metrics.jsonl")
    online = [r["online/loss"] for r in rows if "online/loss" in r]
    assert len(online) == 16 // round_size
    assert online[0] == pytest.approx(math.log(2), abs=1e-6)
    regret = [json.loads(l) for l in (trainer.output_dir / "regret.jsonl").read_text().splitlines()]
    assert [r["round"] for r in regret] == list(range(1, len(online) + 1))


def test_gradient_accumulation_is_invariant(make_config, tmp_path):
    """4 pairs x 1 micro-batch and 2 pairs x 2 micro-batches give the same step."""
    a = OFSDPOTrainer(config=make_config(batch_size=4, lora_dropout=0.0, output_dir=str(tmp_path / "a")))
    b = OFSDPOTrainer(config=make_config(batch_size=2, grad_accum=2, lora_dropout=0.0, output_dir=str(tmp_path / "b")))
    a.train(), b.train()
    for name in ("fast", "slow"):
        sa, sb = adapter_state(a.model, name), adapter_state(b.model, name)
        assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


@pytest.mark.parametrize("swap", ["roles", "params"])
def test_resume_ends_identical_to_an_uninterrupted_run(make_config, tmp_path, monkeypatch, swap):
    kw = dict(method="ofs-dpo", batch_size=2, save_steps=2, lora_dropout=0.1, chase_interval=2, swap=swap, alpha=0.5)
    whole = OFSDPOTrainer(config=make_config(output_dir=str(tmp_path / "whole"), **kw))
    whole.train()

    crashed = OFSDPOTrainer(config=make_config(output_dir=str(tmp_path / "crash"), **kw))
    original = OFSDPOTrainer._after_step

    def crash_after_step_5(self, row, seconds):
        if self.state.step == 5:
            raise RuntimeError("simulated crash")
        return original(self, row, seconds)

    monkeypatch.setattr(OFSDPOTrainer, "_after_step", crash_after_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    monkeypatch.setattr(OFSDPOTrainer, "_after_step", original)
    resumed = OFSDPOTrainer(config=make_config(output_dir=str(tmp_path / "crash"), resume=True, **kw))
    assert resumed.config.resume
    resumed.train()
    for name in ("fast", "slow"):
        a, b = adapter_state(whole.model, name), adapter_state(resumed.model, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows_whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    rows_resumed = read_metrics(tmp_path / "crash" / "metrics.jsonl")
    assert [r["step"] for r in rows_resumed] == list(range(1, 9))
    for x, y in zip(rows_whole, rows_resumed):
        assert x["fast/loss"] == pytest.approx(y["fast/loss"]) and x["chase/swaps"] == y["chase/swaps"]
    assert resumed.reference.computed_pairs == 16


def test_refuses_an_output_dir_holding_another_run(make_config):
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=1)).train()
    with pytest.raises(ConfigError, match="holds another run"):
        OFSDPOTrainer(config=make_config(method="dpo"))


def test_python_api_accepts_a_loaded_model_and_rows(tiny_model_dir, tokenizer, tmp_path):
    from ofsdpo import OFSDPOConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = OFSDPOConfig(output_dir=str(tmp_path / "api"), batch_size=2, max_steps=2, progress=False, lora_r=2)
    summary = OFSDPOTrainer(model, config, train_data=sentiment_rows(4), tokenizer=tokenizer).train().summary
    assert summary["steps"] == 2 and summary["pairs_seen"] == 4


def test_eval_data_picks_the_served_module(make_config, tmp_path):
    held = write_jsonl(tmp_path / "held.jsonl", sentiment_rows(4, offset=100))
    trainer = OFSDPOTrainer(config=make_config(eval_data=str(held), slow_lr_ratio=0.1))
    summary = trainer.train().summary
    assert summary["served_by"] == "eval_data"
    scores = summary["module_scores"]
    assert summary["served_module"] == min(scores, key=scores.get)


def test_the_served_choice_reuses_the_last_evaluation_of_the_fast_module(make_config, tmp_path):
    """With an evaluation at the last step, the final choice scores only the slow module again; every module's
    score equals a fresh evaluation of the trained weights."""
    held = write_jsonl(tmp_path / "held.jsonl", sentiment_rows(4, offset=100))
    trainer = OFSDPOTrainer(config=make_config(eval_data=str(held), eval_steps=2, max_steps=4))
    scored, original = [], trainer.scorer.pair_losses

    def counting(data, reference, indices, name):
        scored.append((trainer.state.step, name, data is trainer.eval))
        return original(data, reference, indices, name)

    trainer.scorer.pair_losses = counting
    summary = trainer.train().summary
    assert [s for s in scored if s[2] and s[0] == 4] == [(4, "fast", True), (4, "slow", True)]
    every = list(range(len(trainer.eval)))
    fresh = {n: original(trainer.eval, trainer.eval_reference, every, n)[0].mean().item() for n in trainer.names}
    assert summary["module_scores"] == fresh


def test_best_fast_module_is_tracked_on_eval_data(make_config, tmp_path, tiny_model_dir):
    held = write_jsonl(tmp_path / "held.jsonl", sentiment_rows(4, offset=100))
    trainer = OFSDPOTrainer(config=make_config(eval_data=str(held), eval_steps=1))
    result = trainer.train()
    best = result.summary["best_fast"]
    assert 1 <= best["step"] <= 4 and {k: v for k, v in result.best.items() if k != "state"} == best
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, trainer.output_dir / "best_fast")
    saved = adapters(trainer.output_dir / "best_fast")
    assert all(torch.equal(saved[k], result.best["state"][k]) for k in saved)
    loaded = {k.replace(".default", ""): v for k, v in adapter_state(model, "default").items()}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_tensorboard_logging_is_optional(make_config):
    """--report-to tensorboard writes the metrics rows as scalars: every step's loss, the same numbers as
    metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = OFSDPOTrainer(config=make_config(method="dpo", max_steps=2, report_to="tensorboard"))
    trainer.train()
    events = EventAccumulator(str(trainer.output_dir / "runs"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    rows = read_metrics(trainer.output_dir / "metrics.jsonl")
    assert [step for step, _ in logged] == [r["step"] for r in rows] == [1, 2]
    assert [value for _, value in logged] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


# a run built to make the slow module overtake: a fast rate that overshoots, a one-step chase window (as golden)
OVERTAKE = dict(method="ofs-dpo", lr=0.05, slow_lr_ratio=0.2, alpha=0.5, chase_interval=1, max_grad_norm=0.0,
                lora_dropout=0.0, lora_r=2, lora_alpha=4, max_steps=4)


def test_a_params_swap_moves_the_weights(make_config, tmp_path):
    """The slow module overtakes (`roles`: the labels move). The same run stopped at the first swap with
    `swap: params` holds in `fast` exactly what the never-swapping run holds in `slow`, and vice versa."""
    roles = OFSDPOTrainer(config=make_config(swap="roles", output_dir=str(tmp_path / "roles"), **OVERTAKE))
    summary = roles.train().summary
    assert summary["chase/swaps"] >= 1
    rows = read_metrics(roles.output_dir / "metrics.jsonl")
    first = next(r["step"] for r in rows if r["chase/swaps"] == 1)
    assert rows[first - 1]["chase/leader"] == "slow" and all(r["chase/leader"] == "fast" for r in rows[:first - 1])
    runs = {}
    for swap in ("off", "params"):
        values = dict(OVERTAKE, max_steps=first)
        runs[swap] = OFSDPOTrainer(config=make_config(swap=swap, output_dir=str(tmp_path / swap), **values))
        runs[swap].train()
    assert runs["params"].state.chase.swaps == 1 and runs["params"].state.chase.leader == "fast"
    for mine, other in (("fast", "slow"), ("slow", "fast")):
        a, b = adapter_state(runs["params"].model, mine), adapter_state(runs["off"].model, other)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), mine
    a, b = adapter_state(runs["off"].model, "fast"), adapter_state(runs["off"].model, "slow")
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the two modules differ, so the check above can fail


def test_without_eval_data_the_module_with_the_lower_recent_online_loss_is_served(make_config):
    config = make_config(chase_interval=2, **{k: v for k, v in OVERTAKE.items() if k != "chase_interval"})
    summary = OFSDPOTrainer(config=config).train().summary
    rows = read_metrics(Path(config.output_dir) / "metrics.jsonl")[-2:]
    means = {n: sum(r[f"{n}/online/loss"] for r in rows) / 2 for n in ("fast", "slow")}
    assert summary["served_by"] == "online loss of the last 2 rounds"
    assert summary["served_module"] == min(means, key=means.get)
    assert summary["module_scores"] == pytest.approx(means)


@pytest.mark.parametrize("change", ["lr", "data"])
def test_resume_refuses_a_changed_option_or_data_file(make_config, tmp_path, change):
    OFSDPOTrainer(config=make_config(method="dpo", max_steps=2, save_steps=1)).train()
    if change == "lr":
        changed, message = {"lr": 5e-3}, "--lr"
    else:
        other = write_jsonl(tmp_path / "other.jsonl", sentiment_rows(16, offset=50))  # same length, other text
        changed, message = {"data": str(other)}, "other --data"
    with pytest.raises(ConfigError, match=message):
        OFSDPOTrainer(config=make_config(method="dpo", max_steps=4, save_steps=1, resume=True, **changed)).train()
    # what changes nothing computed may change: progress, checkpoint cadence, and the step limit (constant lr)
    summary = OFSDPOTrainer(config=make_config(method="dpo", max_steps=4, save_steps=3, resume=True,
                                               progress=True)).train().summary
    assert summary["steps"] == 4
