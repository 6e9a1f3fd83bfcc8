"""The combination math of COFS-DPO (SPEC §4) and the λ search."""

import math

import pytest
import torch

from ofsdpo.combine import (combine_delta, combine_params, effective_deltas, recursive_weights, search_lambda,
                            search_simplex)


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
