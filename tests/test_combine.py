"""The combination math of COFS-DPO (SPEC §4) and the λ search."""

import math
import typing
import warnings

import pytest
import torch

from ofsdpo.combine import (COMBINATIONS, combine_delta, combine_lora, combine_params, combine_states,
                            effective_deltas, layer_seed, recursive_weights, search_lambda, search_simplex)


def module(seed, rank=2):
    g = torch.Generator().manual_seed(seed)
    return {"layer.q.lora_A.weight": torch.randn(rank, 5, generator=g),
            "layer.q.lora_B.weight": torch.randn(4, rank, generator=g)}


def test_params_combination_is_the_weighted_sum_of_every_tensor():
    a, b = module(0), module(1)
    out = combine_params([a, b], [0.3, 0.7])
    for key in a:
        assert torch.allclose(out[key], 0.3 * a[key] + 0.7 * b[key])


def test_delta_combination_is_exact_in_weight_space():
    """(B₁ A₁ λ₁ + B₂ A₂ λ₂) == [λ₁B₁ λ₂B₂] [A₁; A₂]: a LoRA of rank r₁ + r₂."""
    a, b = module(0), module(1)
    out = combine_delta([a, b], [0.25, 0.75])
    assert out["layer.q.lora_A.weight"].shape == (4, 5)
    expected = 0.25 * effective_deltas(a, 2.0)["layer.q"] + 0.75 * effective_deltas(b, 2.0)["layer.q"]
    assert torch.allclose(effective_deltas(out, 2.0)["layer.q"], expected, atol=1e-6)
    # while the literal params combination is not Σ λ ΔW (cross terms):
    literal = effective_deltas(combine_params([a, b], [0.25, 0.75]), 2.0)["layer.q"]
    assert not torch.allclose(literal, expected, atol=1e-3)


def test_recursive_weights_stay_on_the_simplex():
    w = recursive_weights([1.0], 0.6)
    w = recursive_weights(w, 0.5)
    assert w == [0.3, 0.2, 0.5] and abs(sum(w) - 1) < 1e-12


def test_lambda_search_returns_the_lowest_memory_loss_and_breaks_ties_by_accuracy():
    losses = {0.0: 0.9, 0.25: 0.4, 0.5: 0.3, 0.75: 0.3, 1.0: 0.8}
    accuracy = {0.0: 0.5, 0.25: 0.6, 0.5: 0.7, 0.75: 0.8, 1.0: 0.5}
    best, table = search_lambda(list(losses), lambda lam: (losses[lam], accuracy[lam]))
    assert best == 0.75  # tied loss with 0.5, higher accuracy
    assert [row["lambda"] for row in table] == list(losses)
    best, _ = search_lambda([0.0, 0.5, 1.0], lambda lam: ((lam - 0.4) ** 2, 0.0))
    assert best == 0.5


def bowl(target, accuracy=lambda w: 0.0):
    """A convex score: squared distance to `target`, counting the calls."""
    calls = []

    def score(weights):
        calls.append(list(weights))
        return sum((w - t) ** 2 for w, t in zip(weights, target)), accuracy(weights)
    return score, calls


def on_simplex(weights, k):
    return len(weights) == k and all(w >= 0 for w in weights) and sum(weights) == 1.0 and math.fsum(weights) == 1.0


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_simplex_search_stays_on_the_simplex_and_in_budget(k):
    score, calls = bowl([1 / k] * k)
    best, table = search_simplex(k, score)
    assert on_simplex(best, k)
    assert all(on_simplex(row["weights"], k) for row in table)
    assert len(calls) == len(table) <= 60
    assert len({tuple(row["weights"]) for row in table}) == len(table)  # no point scored twice
    assert best in [row["weights"] for row in table]


def test_simplex_search_finds_an_interior_minimum_of_a_convex_score():
    target = (0.2, 0.5, 0.3)
    score, calls = bowl(target)
    best, table = search_simplex(3, score, min_step=0.01)
    assert len(calls) <= 60
    assert max(abs(w - t) for w, t in zip(best, target)) <= 0.0125  # the last step of the refinement
    target = (0.13, 0.61, 0.26)  # off every dyadic lattice
    best, _ = search_simplex(3, bowl(target)[0])
    assert max(abs(w - t) for w, t in zip(best, target)) <= 0.025


def test_simplex_search_k1_and_k2():
    best, table = search_simplex(1, bowl([1.0])[0])
    assert best == [1.0] and len(table) == 1
    best, table = search_simplex(2, bowl([0.3, 0.7])[0])
    assert best[0] == pytest.approx(0.3, abs=0.01) and on_simplex(best, 2)
    assert [row["weights"] for row in table[:3]] == [[0.0, 1.0], [0.05, 0.95], [0.1, 0.9]]  # the 0.05 lattice


def test_simplex_search_does_at_least_as_well_as_the_pairwise_recursion():
    """With the pairwise candidates included it can never be worse; with an interior optimum it is better."""
    previous, grid = [0.5, 0.5], [0.0, 0.25, 0.5, 0.75, 1.0]
    for target in [(0.2, 0.5, 0.3), (0.375, 0.375, 0.25), (0.0, 0.0, 1.0)]:
        score, _ = bowl(target)
        lam, pair_table = search_lambda(grid, lambda lam: score(recursive_weights(previous, lam)))
        pairwise_loss = min(row["memory_loss"] for row in pair_table)
        candidates = [recursive_weights(previous, lam) for lam in grid]
        best, table = search_simplex(3, score, include=candidates)
        assert [row["weights"] for row in table[:len(grid)]] == candidates
        assert score(best)[0] <= pairwise_loss
        best_without, _ = search_simplex(3, score)
        assert score(best_without)[0] <= pairwise_loss + 1e-12
    score, _ = bowl((0.2, 0.5, 0.3))
    _, pair_table = search_lambda(grid, lambda lam: score(recursive_weights(previous, lam)))
    assert score(search_simplex(3, score)[0])[0] < min(row["memory_loss"] for row in pair_table) - 0.01


def test_simplex_search_breaks_ties_like_search_lambda():
    """Flat loss: higher accuracy wins; flat loss and accuracy: the first point scored wins."""
    best, _ = search_simplex(3, lambda w: (1.0, w[1]))
    assert best == [0.0, 1.0, 0.0]
    best, table = search_simplex(3, lambda w: (1.0, 0.5))
    assert best == table[0]["weights"] == [0.0, 0.0, 1.0]
    best, _ = search_simplex(3, lambda w: (1.0, 0.5), include=[[0.5, 0.25, 0.25]])
    assert best == [0.5, 0.25, 0.25]


def test_simplex_search_is_deterministic_and_checks_its_arguments():
    score = bowl((0.1, 0.2, 0.3, 0.4))[0]
    assert search_simplex(4, score) == search_simplex(4, score)
    with pytest.raises(ValueError, match="budget"):
        search_simplex(3, score, budget=10, resolution=5)
    with pytest.raises(ValueError, match="summing to 1"):
        search_simplex(3, score, include=[[0.5, 0.6, 0.0]])
    _, table = search_simplex(3, score, budget=25)
    assert len(table) <= 25


def test_a_nan_score_never_wins():
    nan = float("nan")
    best, _ = search_lambda([0.0, 0.5, 1.0], lambda lam: (nan, 0.5) if lam == 0.0 else (lam, 0.5))
    assert best == 0.5
    best, _ = search_simplex(2, lambda w: (nan, 0.0) if w[0] == 0.0 else ((w[0] - 0.5) ** 2, 0.0))
    assert best == [0.5, 0.5]


def test_weights_are_exact_floats_summing_to_one():
    from fractions import Fraction

    from ofsdpo.combine import _as_floats
    for m in (3, 7, 10, 24, 96):
        for a in range(m + 1):
            for b in range(m + 1 - a):
                w = _as_floats((Fraction(a, m), Fraction(b, m), Fraction(m - a - b, m)))
                assert on_simplex(w, 3) and all(abs(x - y) < 1e-15 for x, y in zip(w, (a / m, b / m, 1 - (a + b) / m)))


def test_delta_combination_equals_peft_cat_merge(tiny_model_dir):
    """peft's `add_weighted_adapter(..., combination_type="cat")` is the exact Σ w_k ΔW_k; ours must give the same
    ΔW in every layer (in float64, so only rounding separates them). peft folds the scaling into B and sets
    alpha = r; we keep alpha/r and stack ranks: the representations differ, the update does not."""
    from transformers import AutoModelForCausalLM

    from ofsdpo.modules import adapter_state, attach_adapters, load_adapter_state, lora_config

    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir).double(),
                            lora_config(2, 4, 0.0, "all-linear"), ("m0", "m1", "m2"))
    torch.manual_seed(0)
    states = []
    for name in ("m0", "m1", "m2"):
        state = {k: torch.randn_like(v) for k, v in adapter_state(model, name).items()}
        load_adapter_state(model, name, state)
        states.append(state)
    weights = [0.5, 0.3, 0.2]
    model.add_weighted_adapter(["m0", "m1", "m2"], weights, "merged", combination_type="cat")
    merged, merged_config = adapter_state(model, "merged"), model.peft_config["merged"]
    def deltas(state, scaling):  # effective_deltas, in float64
        return {k[:-len(".lora_A.weight")]: scaling * state[k.replace("lora_A", "lora_B")] @ state[k]
                for k in state if k.endswith(".lora_A.weight")}

    peft_deltas = deltas(merged, merged_config.lora_alpha / merged_config.r)
    ours = deltas(combine_delta(states, weights), 4 / 2)  # alpha and r both grow by K: the same scaling
    assert peft_deltas.keys() == ours.keys() and len(ours) > 0
    for layer in ours:
        assert ours[layer].dtype == torch.float64
        torch.testing.assert_close(ours[layer], peft_deltas[layer], rtol=1e-9, atol=1e-12)


# --- peft's merges: TIES and DARE (issue 28) ---------------------------------------------------------------------
RANK, ALPHA = 2, 4  # scaling 2: peft folds it into the merge weights, so a wrong fold shows


@pytest.fixture
def float64_default():
    """peft builds its merge weights with `torch.tensor(floats)`, in the default dtype: float64 here, so that
    comparisons of the served ΔW (weights √w on our side, √(w·scaling) on peft's) meet float64 tolerances."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def peft_modules(tiny_model_dir, count: int, positive: bool = False):
    """The tiny model in float64 with `count` random LoRA modules of rank 2 on every linear layer (the model's
    module order differs from the sorted keys', which DARE's draws must follow); their states, in that order."""
    from transformers import AutoModelForCausalLM

    from ofsdpo.modules import adapter_state, attach_adapters, load_adapter_state, lora_config

    names = tuple(f"m{k}" for k in range(count))
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir).double(),
                            lora_config(RANK, ALPHA, 0.0, "all-linear"), names)
    generator = torch.Generator().manual_seed(count)
    states = []
    for name in names:
        state = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype)
                 for k, v in adapter_state(model, name).items()}
        if positive:
            state = {k: v.abs() + 0.1 for k, v in state.items()}
        load_adapter_state(model, name, state)
        states.append(state)
    return model, list(names), states


def peft_merge(model, names, weights, kind, density, seed, monkeypatch):
    """peft's `add_weighted_adapter` into adapter "merged": its A and B and each layer's ΔW (`get_delta_weight`).
    Our DARE draws each layer's masks from `layer_seed(seed, layer)`; peft merges layer by layer from the global RNG,
    so its RNG is seeded the same way as it starts each layer's merge (its draws within a layer are in our order)."""
    from peft.tuners.lora import LoraLayer, LoraModel

    from ofsdpo.modules import adapter_state

    merge_layer = LoraModel._generalized_task_arithmetic_weighted_adapter
    layer_names = {id(module): name for name, module in model.named_modules()}

    def seeded_per_layer(self, combination_type, adapters, weights, target, *args):
        torch.manual_seed(layer_seed(seed, layer_names[id(target)]))
        return merge_layer(self, combination_type, adapters, weights, target, *args)

    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded_per_layer)
    model.add_weighted_adapter(names, weights, "merged", combination_type=kind, density=density)
    deltas = {name: module.get_delta_weight("merged") for name, module in model.named_modules()
              if isinstance(module, LoraLayer) and "merged" in module.lora_A}
    return adapter_state(model, "merged"), deltas


@pytest.mark.parametrize("weights", [[1.0], [0.3, 0.7], [0.2, 0.5, 0.3], [0.0, 0.25, 0.75]])
@pytest.mark.parametrize("density", [0.5, 0.8])
@pytest.mark.parametrize("kind", ["ties", "dare_ties", "dare_linear"])
def test_peft_merges_write_what_peft_add_weighted_adapter_writes(tiny_model_dir, float64_default, monkeypatch, kind,
                                                                   density, weights):
    """Our A and B are peft's to the bit (the same merge_utils functions on the same tensors, weights and draws:
    DARE seeded alike, layer by layer), with the scaling folded in as peft does; served as `combine_lora` serves
    them (the modules' own config, the scaling left out of the weights), the module's ΔW is peft's merged adapter's.
    One module: peft merges linearly whatever the kind, and so do we."""
    model, names, states = peft_modules(tiny_model_dir, len(weights))
    theirs, their_deltas = peft_merge(model, names, weights, kind, density, seed=7, monkeypatch=monkeypatch)
    ours = combine_states(kind, states, weights, density=density, scaling=ALPHA / RANK, seed=7)
    assert list(ours) == list(theirs) and len(ours) == 2 * len(their_deltas) > 0
    for key in ours:
        assert ours[key].dtype == torch.float64
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    lora = model.peft_config[names[0]]
    served, served_lora = combine_lora(kind, states, weights, lora, density=density, seed=7)
    assert served_lora is lora  # same rank and scaling: the next stage may start from it (--init previous)
    served_deltas = effective_deltas(served, lora.lora_alpha / lora.r)
    assert served_deltas.keys() == their_deltas.keys()
    for layer, delta in their_deltas.items():
        torch.testing.assert_close(served_deltas[layer], delta, rtol=1e-12, atol=1e-12 * delta.abs().max().item())


def test_dare_merges_draw_masks_at_all(tiny_model_dir, float64_default):
    """The DARE comparisons above would hold for a merge that drew nothing: two seeds must give two merges, each
    keeping about `density` of the entries of a single module (no cancellation with one module: only the drops)."""
    _, _, states = peft_modules(tiny_model_dir, 2)
    one, other = (combine_states("dare_linear", states, [1.0, 0.0], density=0.5, seed=s) for s in (0, 1))
    kept = torch.cat([(v != 0).flatten() for v in one.values()]).double().mean().item()
    assert 0.4 < kept < 0.6  # tens of thousands of Bernoulli(0.5) draws
    assert any(not torch.equal(one[k], other[k]) for k in one)


def two_layers(seed):
    """A module adapting layer.q, then layer.k: its keys are not in sorted order."""
    q, k = module(seed), module(seed + 10)
    return {**q, **{key.replace("layer.q", "layer.k"): value for key, value in k.items()}}


def test_dare_seed_fixes_the_masks_and_leaves_the_callers_rng_alone():
    """The same seed, the same masks: whatever the weights, and whatever the states' key order (a resumed run reloads
    its kept modules from safetensors, sorted by key); the caller's RNG is as it was. No seed: the global RNG's."""
    a, b = two_layers(0), two_layers(1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = combine_states("dare_ties", [a, b], [0.4, 0.6], density=0.5, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    again = combine_states("dare_ties", [a, b], [0.9, 0.1], density=0.5, seed=5)  # other weights, the same masks
    for key in first:
        assert torch.equal(first[key] != 0, again[key] != 0)
    in_sorted_order = [dict(sorted(state.items())) for state in (a, b)]
    reordered = combine_states("dare_ties", in_sorted_order, [0.4, 0.6], density=0.5, seed=5)
    assert list(reordered) == sorted(first) != list(first)
    for key in first:
        assert torch.equal(first[key], reordered[key])
    unseeded = [combine_states("dare_ties", [a, b], [0.4, 0.6], density=0.5) for _ in range(2)]
    assert not torch.equal(torch.get_rng_state(), before)
    assert any(not torch.equal(unseeded[0][key], unseeded[1][key]) for key in first)


def test_ties_at_full_density_without_sign_conflicts_is_a_linear_merge():
    """density 1 trims nothing; modules whose entries are all positive elect + everywhere, so every module counts at
    every entry and TIES's disjoint mean is Σ w'_k X_k / K for X = A and X = B, w'_k = √(w_k·scaling): the params
    merge with weights w'_k / K (peft's linear merge divided by K). No warning at density 1: that is what was asked."""
    states = [{k: v.abs() + 0.1 for k, v in module(seed, rank=3).items()} for seed in range(3)]
    weights, scaling = [0.2, 0.5, 0.3], 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = combine_states("ties", states, weights, density=1.0, scaling=scaling)
    linear = combine_params(states, [math.sqrt(w * scaling) / len(states) for w in weights])
    for key in linear:
        torch.testing.assert_close(merged[key], linear[key], rtol=1e-6, atol=0)  # float32 modules


def test_combine_states_dispatches_every_combination_and_refuses_what_peft_refuses():
    a, b = module(0), module(1)
    for key, value in combine_states("params", [a, b], [0.3, 0.7]).items():
        assert torch.equal(value, combine_params([a, b], [0.3, 0.7])[key])
    for key, value in combine_states("delta", [a, b], [0.3, 0.7]).items():
        assert torch.equal(value, combine_delta([a, b], [0.3, 0.7])[key])
    with pytest.raises(ValueError, match="unknown combination 'mean'"):
        combine_states("mean", [a, b], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"density in \(0, 1\]"):
        combine_states("ties", [a, b], [0.5, 0.5])
    with pytest.raises(ValueError, match="one rank"):
        combine_states("ties", [a, module(2, rank=3)], [0.5, 0.5], density=0.5)


def test_combine_lora_serves_delta_at_the_stacked_rank_and_the_rest_at_the_modules_config():
    from ofsdpo.modules import lora_config

    lora, states = lora_config(2, 4, 0.0, ["q"]), [module(0), module(1), module(2)]
    state, stacked = combine_lora("delta", states, [0.2, 0.3, 0.5], lora)
    assert (stacked.r, stacked.lora_alpha, lora.r, lora.lora_alpha) == (6, 12, 2, 4)
    assert state["layer.q.lora_A.weight"].shape == (6, 5)
    for kind in ("params", "ties", "dare_linear"):
        assert combine_lora(kind, states, [0.2, 0.3, 0.5], lora, density=0.5, seed=0)[1] is lora


# --- --combine and --density ------------------------------------------------------------------------------------
def test_every_combination_is_a_combine_option():
    from ofsdpo.config import ContinualOptions

    assert typing.get_args(typing.get_type_hints(ContinualOptions)["combine"]) == COMBINATIONS


@pytest.mark.parametrize("values, message", [
    (dict(combine="ties", density=0.0), r"--density must lie in \(0, 1\]"),
    (dict(combine="dare_linear", density=1.5), r"--density must lie in \(0, 1\]"),
    (dict(combine="params", density=0.8), "--density applies to --combine ties|dare_ties|dare_linear"),
    (dict(combine="delta", density=1.0), "--combine delta keeps every entry"),
    (dict(combine="ties", density="half"), "--density must be a number"),
])
def test_density_is_validated_with_the_flag_named(values, message):
    from ofsdpo.config import ContinualOptions
    from ofsdpo.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        ContinualOptions(domain=["a=a.jsonl"], **values)


def test_density_reaches_the_run_key_only_when_set():
    """Shipped runs keep their keys: --density at its default enters no key, with any --combine; set, it does."""
    from ofsdpo.commands.experiment import key_options
    from ofsdpo.config import ContinualOptions

    assert ContinualOptions(domain=["a=a.jsonl"], combine="ties", density=1.0).density == 1.0
    assert "density" not in key_options({"combine": "ties", "density": 0.5}, "continual")
    assert "density" not in key_options({"combine": "params"}, "continual")
    assert key_options({"combine": "dare_ties", "density": 0.8}, "continual")["density"] == 0.8
