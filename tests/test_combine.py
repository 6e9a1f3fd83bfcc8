"""The combination math of COFS-DPO (SPEC §4) and the λ search."""

import torch

from ofsdpo.combine import (combine_delta, combine_params, effective_deltas, recursive_weights, search_lambda)


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
