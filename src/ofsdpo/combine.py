"""Linear combinations of LoRA modules (SPEC §4), as pure functions of adapter state dicts.

A state dict is what `modules.adapter_state` returns: `...<layer>.lora_A.weight` (r, in) and
`...<layer>.lora_B.weight` (out, r) per adapted layer, the effective update being ΔW = scaling · B A.

- `params` (the literal reading): A = Σ λ_k A_k and B = Σ λ_k B_k. Same rank; ΔW is *not* Σ λ_k ΔW_k (cross terms).
- `delta` (exact): ΔW = Σ λ_k ΔW_k, a LoRA of rank Σ r_k made by stacking A_k and λ_k·B_k (peft's "cat").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def layers(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX))


def combine_params(states: Sequence[dict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ λ_k θ_k over every tensor (all modules share keys and shapes)."""
    keys = states[0].keys()
    for state in states[1:]:
        if state.keys() != keys:
            raise ValueError("modules to combine must adapt the same layers")
    return {k: sum(w * s[k].float() for s, w in zip(states, weights)).to(states[0][k].dtype) for k in keys}


def combine_delta(states: Sequence[dict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """A LoRA whose B A equals Σ λ_k B_k A_k for every layer (scaling unchanged if alpha grows with the rank)."""
    out = {}
    for layer in layers(states[0]):
        out[layer + A_SUFFIX] = torch.cat([s[layer + A_SUFFIX] for s in states], dim=0)
        out[layer + B_SUFFIX] = torch.cat([w * s[layer + B_SUFFIX] for s, w in zip(states, weights)], dim=1)
    return out


def effective_deltas(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B A of every adapted layer."""
    return {layer: scaling * state[layer + B_SUFFIX].float() @ state[layer + A_SUFFIX].float() for layer in layers(state)}


def recursive_weights(previous: Sequence[float], lam: float) -> list[float]:
    """θ ← λ θ_prev + (1 − λ) θ_new, written as weights over all kept modules (they stay on the simplex)."""
    return [lam * w for w in previous] + [1.0 - lam]


def search_lambda(grid: Sequence[float], score: Callable[[float], tuple[float, float]]) -> tuple[float, list[dict]]:
    """The grid point with the lowest memory DPO loss; ties broken by higher preference accuracy, then grid order.

    `score(λ)` returns (loss, accuracy). Returns (best λ, every point's scores).
    """
    table = []
    for lam in grid:
        loss, accuracy = score(lam)
        table.append({"lambda": float(lam), "memory_loss": float(loss), "memory_accuracy": float(accuracy)})
    best = min(table, key=lambda row: (row["memory_loss"], -row["memory_accuracy"]))
    return best["lambda"], table
