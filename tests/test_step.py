"""The fused forward of both OFS-DPO modules (issue 16) against one forward per module: same losses and gradients,
each module's own dropout, and whole runs that end with the same adapters."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ofsdpo import OFSDPOTrainer
from ofsdpo.logprobs import concatenated_forward, stacked_forward
from ofsdpo.metrics import read_metrics
from ofsdpo.modules import OFS_ADAPTERS, adapter_parameters, adapter_state, attach_adapters, lora_config, stacked


def float64_trainer(make_config, tiny_model_dir, tmp_path, name, **overrides):
    """An ofs-dpo trainer on the tiny model in float64, both modules moved off their (equal, B = 0) start so that
    every LoRA weight has a gradient and the two modules differ."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    values = dict(method="ofs-dpo", alpha=0.5, lora_dropout=0.0, chase_interval=1, output_dir=str(tmp_path / name))
    trainer = OFSDPOTrainer(model, make_config(**{**values, **overrides}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in OFS_ADAPTERS:
            for p in adapter_parameters(trainer.model, module):
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
    return trainer


def step_gradients(trainer, indices):
    """The summed statistics and each module's gradients of one step's forward and backward (no update)."""
    trainer.reference.fill(trainer.model, trainer.data.pairs, indices, trainer.tokenizer.pad_token_id, 8, 1024)
    sums = trainer.step_fn._accumulate(trainer.data, trainer.reference, indices, trainer.state.chase)
    grads = {name: [p.grad.clone() for p in adapter_parameters(trainer.model, name)] for name in OFS_ADAPTERS}
    trainer.optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().double() for k, v in sums.items()}, grads


@pytest.mark.parametrize("chase_form", ["minmax", "proximal"])
def test_fused_step_equals_the_two_pass_step(make_config, tiny_model_dir, tmp_path, chase_form):
    """float64, no dropout: the fused forward (one forward of the batch stacked twice, one backward), the same in
    parts of 2 pairs (the default memory plan) and the sequential passes all give the two-pass (joint) losses and
    both modules' gradients, to rounding."""
    indices = list(range(4))
    runs = {}
    for name, overrides in {"joint": dict(module_passes="joint"), "fused": dict(module_passes="fused"),
                            "fused-parts": dict(module_passes="fused", module_batch_size=2),
                            "sequential": dict(module_passes="sequential")}.items():
        trainer = float64_trainer(make_config, tiny_model_dir, tmp_path, name, chase_form=chase_form, **overrides)
        assert trainer.step_fn.passes == overrides["module_passes"]
        runs[name] = step_gradients(trainer, indices)
    want_sums, want_grads = runs.pop("joint")
    assert all(g.abs().sum() > 0 for grads in want_grads.values() for g in grads)  # every LoRA weight is reached
    assert not torch.equal(want_grads["fast"][0], want_grads["slow"][0])
    for name, (sums, grads) in runs.items():
        assert sums.keys() == want_sums.keys()
        for key in want_sums:
            torch.testing.assert_close(sums[key], want_sums[key], rtol=1e-6, atol=1e-12, msg=f"{name}: {key}")
        for module in OFS_ADAPTERS:
            for got, want in zip(grads[module], want_grads[module], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, msg=f"{name}: {module}")


def test_stacked_forward_equals_one_forward_per_module(tiny_model_dir, tokenizer):
    """The forward alone, float64: each copy of the stacked batch gets exactly its module's log-probs; the active
    adapter and every requires_grad flag are as before afterwards."""
    from test_logprobs import make_batch

    torch.manual_seed(0)
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
                            lora_config(4, 8, 0.0, "all-linear"), OFS_ADAPTERS)
    with torch.no_grad():
        for name in OFS_ADAPTERS:
            for p in adapter_parameters(model, name):
                p.normal_(0, 0.2)
    _, batch = make_batch(tokenizer, n=3)
    model.set_adapter("slow")
    want = {}
    for name in OFS_ADAPTERS:
        model.set_adapter(name)
        want[name] = concatenated_forward(model, batch)
    model.set_adapter("slow")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with stacked(model, OFS_ADAPTERS):
        got = dict(zip(OFS_ADAPTERS, stacked_forward(model, batch, 2)))
    for name in OFS_ADAPTERS:
        for g, w in zip(got[name], want[name]):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert model.active_adapter == "slow" and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.get_base_model()._forward_hooks and all(
        not m._forward_hooks for m in model.modules())  # nothing left behind


def test_each_module_draws_its_own_dropout_masks(tiny_model_dir):
    """Dropout > 0: in the fused forward each module's rows go through its own dropout, with its own rate, and the
    two modules' masks are independent draws (they agree no more than chance)."""
    torch.manual_seed(0)
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            lora_config(4, 8, 0.1, "all-linear"), OFS_ADAPTERS)
    model.train()
    rates = {"fast": 0.1, "slow": 0.4}
    kept = {name: [] for name in OFS_ADAPTERS}
    handles = []
    for module_name, module in model.named_modules():
        for name in OFS_ADAPTERS:
            if module_name.endswith(f"lora_dropout.{name}"):
                module.p = rates[name]

                def record(mod, args, out, name=name):
                    kept[name].append((out != 0).flatten())
                handles.append(module.register_forward_hook(record))
    ids = torch.randint(3, 200, (8, 32))
    with stacked(model, OFS_ADAPTERS):
        model(torch.cat([ids, ids])).logits.sum().backward()
    for handle in handles:
        handle.remove()
    fast, slow = torch.cat(kept["fast"]).float(), torch.cat(kept["slow"]).float()
    assert fast.numel() == slow.numel() > 100_000
    for name, mask in (("fast", fast), ("slow", slow)):
        assert abs((1 - mask.mean().item()) - rates[name]) < 0.01, name  # its own rate, on its own rows
    both_dropped = ((1 - fast) * (1 - slow)).mean().item()
    assert abs(both_dropped - rates["fast"] * rates["slow"]) < 0.01  # independent draws
    for name in OFS_ADAPTERS:  # both modules trained through the one backward (B starts at 0: only B moves)
        params = adapter_parameters(model, name)
        assert all(p.grad is not None for p in params) and sum(p.grad.abs().sum() for p in params) > 0, name


def test_fused_run_ends_with_the_adapters_of_the_two_pass_run(make_config, tiny_model_dir, tmp_path):
    """Whole `--method ofs-dpo` runs in float64 (a loaded float64 model): fused, fused in parts of half the pairs
    (the default memory plan) and the two-pass path end with the same adapters and losses."""
    runs = {}
    for name, overrides in {"joint": dict(module_passes="joint"), "fused": dict(module_passes="fused"),
                            "fused-parts": dict(module_passes="fused", module_batch_size=2)}.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
        trainer = OFSDPOTrainer(model, make_config(method="ofs-dpo", alpha=0.5, lora_dropout=0.0, chase_interval=1,
                                                   lr=1e-2, output_dir=str(tmp_path / name), **overrides))
        trainer.train()
        runs[name] = trainer
    joint = {n: adapter_state(runs["joint"].model, n) for n in OFS_ADAPTERS}
    assert any(not torch.equal(joint["fast"][k], joint["slow"][k]) for k in joint["fast"])  # real, different updates
    want = [r["loss"] for r in read_metrics(tmp_path / "joint" / "metrics.jsonl")]
    for name in ("fused", "fused-parts"):
        for module in OFS_ADAPTERS:
            got = adapter_state(runs[name].model, module)
            for key in joint[module]:
                torch.testing.assert_close(got[key], joint[module][key], rtol=1e-6, atol=1e-9, msg=f"{name} {key}")
        got_losses = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
        assert got_losses == pytest.approx(want, rel=1e-6)


def test_module_batch_size_is_checked(make_config):
    from ofsdpo import ConfigError

    with pytest.raises(ConfigError, match="--module-batch-size"):
        OFSDPOTrainer(config=make_config(method="ofs-dpo", batch_size=2, module_batch_size=3))


def test_the_memory_rule_chooses_per_device_as_documented(make_config):
    """`--module-batch-size 0` (ofs-dpo's default when the batch is not set): on a CPU, half micro-batches where
    that saves >= 256 MiB of activations by the estimate (the 70m bench shape), whole ones where it would not (the
    tiny quick shape); on an accelerator whole ones; under --memory-budget-mib the largest part that fits."""
    from types import SimpleNamespace

    from ofsdpo import ConfigError
    from ofsdpo.step import CPU_SPLIT_MIB, activation_mib, auto_part_size, module_plan

    tiny = SimpleNamespace(hidden_size=64, intermediate_size=176, num_hidden_layers=2)
    mid = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=12)

    def model(shape, device):  # what the rule reads: the config, and the first parameter's device and width
        weight = SimpleNamespace(device=torch.device(device), element_size=lambda: 4)
        return SimpleNamespace(config=shape, parameters=lambda: iter([weight]))

    default = make_config(method="ofs-dpo", batch_size=None, max_length=128)
    assert default.batch_size == 4 and default.module_batch_size == 0  # the rule, saved as such in config.yaml
    assert make_config(method="ofs-dpo", batch_size=4, max_length=128).module_batch_size == 4  # as asked
    assert auto_part_size(model(tiny, "cpu"), default, 2) == 4
    assert activation_mib(tiny, 4, 128, 2, 4) - activation_mib(tiny, 2, 128, 2, 4) < CPU_SPLIT_MIB
    long = make_config(method="ofs-dpo", batch_size=None, max_length=256, max_prompt_length=128)
    assert activation_mib(mid, 4, 256, 2, 4) - activation_mib(mid, 2, 256, 2, 4) >= CPU_SPLIT_MIB
    assert auto_part_size(model(mid, "cpu"), long, 2) == 2
    assert auto_part_size(model(mid, "cuda"), long, 2) == 4
    fits_two = make_config(method="ofs-dpo", batch_size=None, max_length=256, max_prompt_length=128,
                           memory_budget_mib=activation_mib(mid, 2, 256, 2, 4) + 1)
    assert auto_part_size(model(mid, "cuda"), fits_two, 2) == 2 and auto_part_size(model(mid, "cpu"), fits_two, 2) == 2
    nothing_fits = make_config(method="ofs-dpo", batch_size=None, max_length=256, max_prompt_length=128,
                               memory_budget_mib=1.0)
    assert auto_part_size(model(mid, "cuda"), nothing_fits, 2) == 1
    assert module_plan(model(mid, "cuda"), ["fast"], long) == ("joint", 4)  # one module: never split
    for bad in (dict(module_batch_size=-1), dict(memory_budget_mib=0.0)):
        with pytest.raises(ConfigError, match="--module-batch-size|--memory-budget-mib"):
            make_config(method="ofs-dpo", **bad)


# --- the learning-rate schedule: transformers' curve, the warm-up one step ahead --------------------------------------
def _schedule_before_transformers(kind: str, warmup: int, total: int, step: int) -> float:
    """The closed form ofsdpo's schedule had before it used `get_scheduler` (the golden runs' curve): warm-up step s
    at (s + 1) / warmup; then progress p = (s - warmup) / max(1, total - warmup), capped at 1, and the factor 1,
    1 - p or (1 + cos πp) / 2."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 10), (3, 10), (1, 7), (5, 5), (8, 4), (10, 200)])
def test_the_schedule_is_the_curve_of_before(kind, warmup, total):
    """Every step from the first to past the end (a run shorter than its warm-up included), through the trainer's
    LambdaLR, in float64: what the hand-written schedule gave, to 2 ulp (linear decay divides in another order)."""
    from ofsdpo.step import lr_schedule

    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(kind, warmup, total))
    tolerance = 2 * torch.finfo(torch.float64).eps
    for step in range(total + warmup + 5):
        want = _schedule_before_transformers(kind, warmup, total, step)
        assert abs(optimizer.param_groups[0]["lr"] - want) <= tolerance, (kind, warmup, total, step)
        optimizer.step()
        scheduler.step()
    if kind != "constant":
        assert optimizer.param_groups[0]["lr"] == 0.0  # past the end: no rise again (transformers' cosine would)


def test_the_warm_up_is_one_step_ahead_of_transformers():
    """The one difference from `transformers.get_scheduler`: its first warm-up step trains at rate 0, ours at
    1 / warmup; from the end of the warm-up on, the two curves are the same."""
    from transformers import get_scheduler

    from ofsdpo.step import lr_schedule

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = get_scheduler("cosine", optimizer, num_warmup_steps=4, num_training_steps=20).lr_lambdas[0]
    ours = lr_schedule("cosine", 4, 20)
    assert [theirs(s) for s in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert [ours(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [ours(s) for s in range(4, 21)] == [theirs(s) for s in range(4, 21)]
