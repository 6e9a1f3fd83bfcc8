import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ofsdpo.chasing import ChaseState
from ofsdpo.modules import OFS_ADAPTERS, activate, adapter_parameters, attach_adapters, lora_config, swap_adapters


def make(tiny_model_dir):
    torch.manual_seed(0)
    return attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(2, 4, 0.0, "all-linear"),
                           OFS_ADAPTERS)


def test_switching_adapters_between_forward_and_backward_keeps_both_gradients(tiny_model_dir):
    """The trap: peft's set_adapter would freeze `fast` before backward; `activate` keeps it trainable."""
    model = make(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    outputs = {}
    for name in OFS_ADAPTERS:
        activate(model, name, OFS_ADAPTERS)
        outputs[name] = model(ids).logits.sum()
    (outputs["fast"] + outputs["slow"]).backward()
    for name in OFS_ADAPTERS:
        grads = [p.grad for p in adapter_parameters(model, name)]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name


def test_swap_exchanges_weights_and_optimizer_state(tiny_model_dir):
    model = make(tiny_model_dir)
    fast, slow = adapter_parameters(model, "fast"), adapter_parameters(model, "slow")
    optimizer = torch.optim.AdamW([{"params": fast, "lr": 1e-2}, {"params": slow, "lr": 1e-3}])
    with torch.no_grad():
        for p in fast:
            p.add_(1.0)
    for p in fast + slow:
        p.grad = torch.ones_like(p)
    optimizer.step()
    before = {"fast": [p.clone() for p in fast], "slow": [p.clone() for p in slow],
              "fast_state": [optimizer.state[p]["exp_avg"].clone() for p in fast]}
    swap_adapters(model, "fast", "slow", optimizer)
    assert all(torch.equal(p, q) for p, q in zip(fast, before["slow"]))
    assert all(torch.equal(p, q) for p, q in zip(slow, before["fast"]))
    assert all(torch.equal(optimizer.state[p]["exp_avg"], q) for p, q in zip(slow, before["fast_state"]))


def test_chase_state_swaps_when_the_chaser_leads():
    state = ChaseState()
    state.record({"fast": 0.5, "slow": 0.6})
    assert not state.end_of_window(step=1, interval=2, mode="roles")  # window still open
    state.record({"fast": 0.5, "slow": 0.2})
    assert state.end_of_window(step=2, interval=2, mode="roles")  # slow's mean 0.4 < fast's 0.5
    assert state.leader == "slow" and state.swaps == 1 and state.window == {"fast": [], "slow": []}
    state.record({"fast": 0.1, "slow": 0.9})
    assert state.end_of_window(step=4, interval=2, mode="params") and state.leader == "slow"  # params: labels stay
    state.record({"fast": 0.1, "slow": 0.9})
    assert not state.end_of_window(step=6, interval=2, mode="off")


def test_activate_switches_without_walking_the_model(tiny_model_dir, monkeypatch):
    """The LoRA layers are found once: later switches neither call peft's set_adapter nor walk the modules, and give
    the same forwards and requires_grad flags as set_adapter + set_trainable."""
    from peft import PeftModel

    model = make(tiny_model_dir)
    with torch.no_grad():
        for p in adapter_parameters(model, "slow"):
            p.normal_(0, 0.2)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    want = {}
    for name in OFS_ADAPTERS:
        model.set_adapter(name)
        want[name] = model(ids).logits
    activate(model, "fast", OFS_ADAPTERS)  # builds the cache

    def refuse(*args, **kwargs):
        raise AssertionError("walked the model")

    monkeypatch.setattr(PeftModel, "set_adapter", refuse)
    monkeypatch.setattr(torch.nn.Module, "modules", refuse)
    monkeypatch.setattr(torch.nn.Module, "named_parameters", refuse)
    for name in ("slow", "fast", "slow"):
        activate(model, name, OFS_ADAPTERS)
        assert model.active_adapter == name
        assert torch.equal(model(ids).logits, want[name])
    monkeypatch.undo()
    assert all(p.requires_grad for n in OFS_ADAPTERS for p in adapter_parameters(model, n))
    activate(model, "slow", ["slow"])  # an adapter not trained is frozen, as set_adapter left it
    assert not any(p.requires_grad for p in adapter_parameters(model, "fast"))
    assert all(p.requires_grad for p in adapter_parameters(model, "slow"))


def test_activate_sees_an_adapter_deleted_and_added_again(tiny_model_dir):
    """The cache is checked on each call: a replaced adapter's new parameters are the ones made trainable."""
    model = make(tiny_model_dir)
    activate(model, "fast", OFS_ADAPTERS)
    model.delete_adapter("slow")
    model.add_adapter("slow", lora_config(2, 4, 0.0, "all-linear"))
    activate(model, "slow", ["fast"])
    assert all(p.requires_grad for n in OFS_ADAPTERS for p in adapter_parameters(model, n))
    activate(model, "fast", ["fast"])
    assert not any(p.requires_grad for p in adapter_parameters(model, "slow"))


def test_adapters_disabled_runs_the_base_as_peft_does_and_restores(tiny_model_dir):
    """The cached-layer switch gives peft's `disable_adapter()` logits (the plain base's) with non-zero modules,
    walks nothing (model.modules is not called), and leaves every layer's flag and the active adapter as before."""
    from ofsdpo.modules import adapters_disabled, reference_mode

    model = make(tiny_model_dir)
    with torch.no_grad():
        for p in adapter_parameters(model, "fast") + adapter_parameters(model, "slow"):
            p.add_(0.1)
    activate(model, "slow", OFS_ADAPTERS)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            want = model(ids).logits
        walks = []
        original = type(model).modules
        try:
            type(model).modules = lambda self: walks.append(1) or original(self)
            with adapters_disabled(model):
                got = model(ids).logits
                assert model._adapters_disabled
        finally:
            type(model).modules = original
    assert not walks and torch.equal(got, want) and not torch.equal(got, adapted)
    assert not model._adapters_disabled and all(not m._disable_adapters for m in model.modules()
                                                if hasattr(m, "_disable_adapters"))
    with reference_mode(model):
        assert torch.equal(model(ids).logits, want)
    assert model.active_adapter == "slow" and all(p.requires_grad for p in adapter_parameters(model, "fast"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, adapted)


def test_loading_a_state_directly_equals_peft_loading_it(tiny_model_dir, monkeypatch):
    """The direct copy into the cached LoRA parameters and peft's loader leave the same weights; the keys are
    peft's state-dict keys (the adapter's name left out), and an adapter added later is found."""
    from peft.utils import set_peft_model_state_dict

    from ofsdpo.modules import adapter_state, load_adapter_state

    model, twin = make(tiny_model_dir), make(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in adapter_state(model, "fast").items()}
    import ofsdpo.modules

    with monkeypatch.context() as patch:  # the direct path: peft's loader is not called
        patch.setattr(ofsdpo.modules, "set_peft_model_state_dict", None)
        load_adapter_state(model, "slow", state)
    set_peft_model_state_dict(twin, state, adapter_name="slow")
    for a, b in zip(adapter_parameters(model, "slow"), adapter_parameters(twin, "slow"), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(v, adapter_state(model, "slow")[k]) for k, v in state.items())
    model.add_adapter("extra", lora_config(2, 4, 0.0, "all-linear"))
    load_adapter_state(model, "extra", state)
    assert all(torch.equal(v, adapter_state(model, "extra")[k]) for k, v in state.items())


def test_attaching_again_resets_the_same_layers_as_a_fresh_attach(tiny_model_dir, monkeypatch):
    """A PeftModel attached before (trained since, an extra scoring slot added) and attached again under the same
    seed: no injection, and the adapters, the trainable flags and the RNG afterwards are a fresh attach's. Another
    seed or config strips it and attaches anew."""
    import ofsdpo.modules as modules

    config = lora_config(2, 4, 0.0, "all-linear")
    torch.manual_seed(5)
    fresh = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config, OFS_ADAPTERS)
    fresh_state, fresh_draw = {n: modules.adapter_state(fresh, n) for n in OFS_ADAPTERS}, torch.rand(3)

    torch.manual_seed(5)
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config, OFS_ADAPTERS)
    with torch.no_grad():
        for p in adapter_parameters(model, "fast") + adapter_parameters(model, "slow"):
            p.add_(torch.randn_like(p))  # trained
    model.add_adapter("served", lora_config(4, 8, 0.0, "all-linear"))
    with monkeypatch.context() as patch:
        patch.setattr(modules, "get_peft_model", None)  # no injection
        torch.manual_seed(5)  # a new config object, as each stage's trainer makes (peft fills in the one it got)
        again = attach_adapters(model, lora_config(2, 4, 0.0, "all-linear"), OFS_ADAPTERS)
    assert again is model and tuple(model.peft_config) == OFS_ADAPTERS and torch.equal(torch.rand(3), fresh_draw)
    for name in OFS_ADAPTERS:
        state = modules.adapter_state(model, name)
        assert state.keys() == fresh_state[name].keys()
        assert all(torch.equal(state[k], fresh_state[name][k]) for k in state)
        assert all(p.requires_grad for p in adapter_parameters(model, name))
    assert model.active_adapter == "fast"
    torch.manual_seed(6)  # another seed: a fresh attach on the stripped base
    other = attach_adapters(model, config, OFS_ADAPTERS)
    assert other is not model and isinstance(other, type(model))
    assert not all(torch.equal(a, b) for a, b in zip(adapter_parameters(other, "fast"),
                                                     adapter_parameters(fresh, "fast")))


def test_adapter_state_is_peft_state_dict_without_walking_the_model(tiny_model_dir, monkeypatch):
    """Once peft's keys were checked, `adapter_state` copies the cached LoRA parameters: the same keys and values as
    peft's `get_peft_model_state_dict`, for each adapter, after the weights change, and as copies."""
    from peft.utils import get_peft_model_state_dict

    import ofsdpo.modules
    from ofsdpo.modules import adapter_state

    model = make(tiny_model_dir)
    for name in OFS_ADAPTERS:
        adapter_state(model, name)  # the first call checks the keys against peft's
    with torch.no_grad():
        for p in adapter_parameters(model, "slow"):
            p.add_(torch.randn_like(p))
    calls = []
    monkeypatch.setattr(ofsdpo.modules, "get_peft_model_state_dict", lambda *a, **k: calls.append(a))
    states = {name: adapter_state(model, name) for name in OFS_ADAPTERS}
    monkeypatch.undo()
    assert calls == []
    for name in OFS_ADAPTERS:
        want = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
        assert states[name].keys() == want.keys() and len(want) > 0
        assert all(torch.equal(states[name][k], want[k]) for k in want), name
    for value in states["fast"].values():
        value.zero_()  # a copy: the model keeps its weights
    assert any(p.abs().sum() > 0 for p in adapter_parameters(model, "fast"))


# --- peft's private attributes that modules.py reads and writes -------------------------------------------------------
# `activate`, `stacked` and `adapters_disabled` write peft's own records instead of calling peft's walks (each walks
# the whole model, a large share of a small step). pyproject pins peft below its next minor version; these checks say
# which record moved when a newer peft is tried.
def _peft_record(holds: bool, owner: str, attribute: str, meaning: str) -> None:
    import peft

    if not holds:
        pytest.fail(f"peft {peft.__version__}: {owner}.{attribute} no longer {meaning}. ofsdpo.modules writes it "
                    f"directly (activate, stacked, adapters_disabled): adapt modules.py to this peft, or keep peft "
                    f"within the range pinned in pyproject.toml.", pytrace=False)


def test_the_peft_records_modules_writes_are_where_it_expects_them(tiny_model_dir):
    """Each private record is checked both ways: peft's own call writes it, and peft's public reader reads it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = make(tiny_model_dir)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    layer = layers[0]
    model.set_adapter("slow")
    _peft_record(all(m._active_adapter in ("slow", ["slow"]) for m in layers), "BaseTunerLayer", "_active_adapter",
                 "holds what set_adapter activates")
    layer._active_adapter = ["fast"]
    _peft_record(layer.active_adapters == ["fast"], "BaseTunerLayer", "_active_adapter",
                 "is what active_adapters reads")
    _peft_record(not layer._disable_adapters, "BaseTunerLayer", "_disable_adapters", "is False with adapters on")
    with model.disable_adapter():
        _peft_record(all(m._disable_adapters is True for m in layers), "BaseTunerLayer", "_disable_adapters",
                     "is set by PeftModel.disable_adapter")
        _peft_record(model._adapters_disabled is True, "PeftModel", "_adapters_disabled",
                     "is set by PeftModel.disable_adapter")
    layer._disable_adapters = True
    _peft_record(layer.disable_adapters is True, "BaseTunerLayer", "_disable_adapters",
                 "is what disable_adapters reads")
    layer._disable_adapters = False
    x = torch.ones(2, 3, dtype=torch.float64)
    cast = getattr(layer, "_cast_input_dtype", None)
    _peft_record(callable(cast) and cast(x, torch.float32).dtype == torch.float32, "BaseTunerLayer",
                 "_cast_input_dtype", "casts a LoRA input to the adapter's dtype")


def test_peft_is_within_the_pinned_range():
    """The installed peft is one the private records were checked against: pyproject.toml pins peft with an upper
    bound, and the installed version is below it."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    spec = re.search(r'"(peft[^"]*)"', pyproject).group(1)
    upper = re.search(r"<\s*([\d.]+)", spec)
    assert upper, f"pyproject.toml pins {spec} without an upper bound: modules.py writes peft's private records"
    installed = tuple(int(p) for p in version("peft").split(".")[:2])
    assert installed < tuple(int(p) for p in upper.group(1).split(".")[:2]), f"peft {version('peft')} is outside {spec}"
