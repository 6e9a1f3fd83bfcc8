"""Methods as values: the registries match the config's choices, and a new method is a class plus a registry line."""

import typing

import torch
from safetensors.torch import load_file

from ofsdpo import OFSDPOTrainer
from ofsdpo.config import ContinualOptions, OFSDPOConfig
from ofsdpo.continual import CONTINUAL_POLICIES
from ofsdpo.methods import TRAINING_METHODS, TrainingMethod, dpo_terms
from ofsdpo.metrics import read_metrics


def test_the_registries_hold_exactly_the_methods_the_config_accepts():
    """`--method`'s choices and the registries are one list: a name the config accepts always finds its object, and
    every registered object is reachable from the CLI (`method` stays a string in the config and the YAML)."""
    train_choices = typing.get_args(typing.get_type_hints(OFSDPOConfig)["method"])
    continual_choices = typing.get_args(typing.get_type_hints(ContinualOptions)["method"])
    assert set(train_choices) == set(TRAINING_METHODS)
    assert set(continual_choices) == set(CONTINUAL_POLICIES)
    assert all(method.name == name for name, method in TRAINING_METHODS.items())
    assert all(policy.name == name for name, policy in CONTINUAL_POLICIES.items())
    assert {policy.stage_method for policy in CONTINUAL_POLICIES.values()} <= set(TRAINING_METHODS)


class MarginDPO(TrainingMethod):
    """A toy method: DPO on one module, its metrics namespaced `toy/`, plus a statistic of its own (the squared
    reward margin). Its objective is DPO's, so it must train exactly the weights `dpo` trains."""

    name, adapters = "toy-dpo", ("default",)

    def key(self, module, stat):
        return f"toy/{stat}"

    def step_stat_keys(self):
        return [*super().step_stat_keys()[:-1], "toy/margin_sq", "num_tokens"]

    def objective(self, logps, ref_chosen, ref_rejected, cfg, chase, lengths=None):
        total, stats = dpo_terms(logps, ref_chosen, ref_rejected, cfg, self.key, lengths)
        stats["toy/margin_sq"] = stats["toy/rewards/margins"].detach() ** 2
        return total, stats


def test_a_new_method_is_one_class_and_one_registry_line(make_config, tmp_path):
    TRAINING_METHODS["toy-dpo"] = MarginDPO()  # the one registry line
    try:
        config = make_config(method="dpo", max_steps=3, output_dir=str(tmp_path / "toy"))
        config.method = "toy-dpo"  # the config's `--method` choices are the shipped methods; the API takes any
        result = OFSDPOTrainer(config=config).train()
    finally:
        del TRAINING_METHODS["toy-dpo"]
    dpo = OFSDPOTrainer(config=make_config(method="dpo", max_steps=3, output_dir=str(tmp_path / "dpo")))
    reference = dpo.train()
    assert result.steps == reference.steps == 3 and result.served_module == reference.served_module == "default"
    assert result.summary["method"] == "toy-dpo" and result.output_dir == tmp_path / "toy"
    toy_rows, dpo_rows = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("toy", "dpo"))
    for toy, plain in zip(toy_rows, dpo_rows, strict=True):  # its own names, DPO's values
        assert toy["toy/loss"] == plain["loss"] and toy["toy/rewards/margins"] == plain["rewards/margins"]
        assert toy["toy/grad_norm"] == toy["grad_norm"] == plain["grad_norm"]  # one module: its norm is the total
        assert "loss" not in toy and toy["toy/margin_sq"] >= toy["toy/rewards/margins"] ** 2 - 1e-6
    toy_adapter = load_file(tmp_path / "toy" / "adapter_model.safetensors")
    dpo_adapter = load_file(tmp_path / "dpo" / "adapter_model.safetensors")
    assert toy_adapter.keys() == dpo_adapter.keys()
    assert all(torch.equal(toy_adapter[k], dpo_adapter[k]) for k in dpo_adapter)  # the same weights, bit for bit
    assert any(v.abs().sum() > 0 for k, v in dpo_adapter.items() if "lora_B" in k)  # and they did train
