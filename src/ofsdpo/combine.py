"""Linear combinations of LoRA modules (SPEC §4), as pure functions of adapter state dicts.

A state dict is what `modules.adapter_state` returns: `...<layer>.lora_A.weight` (r, in) and
`...<layer>.lora_B.weight` (out, r) per adapted layer, the effective update being ΔW = scaling · B A.

- `params` (the literal reading): A = Σ λ_k A_k and B = Σ λ_k B_k. Same rank; ΔW is *not* Σ λ_k ΔW_k (cross terms).
- `delta` (exact): ΔW = Σ λ_k ΔW_k, a LoRA of rank Σ r_k made by stacking A_k and λ_k·B_k (peft's "cat").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

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
    """The grid point with the lowest memory DPO loss; ties broken by higher preference accuracy, then grid order
    (a NaN score ranks last).

    `score(λ)` returns (loss, accuracy). Returns (best λ, every point's scores).
    """
    table = []
    for lam in grid:
        loss, accuracy = score(lam)
        table.append({"lambda": float(lam), "memory_loss": float(loss), "memory_accuracy": float(accuracy)})
    best = min(table, key=_rank)
    return best["lambda"], table


def _rank(row: dict) -> tuple[float, float]:
    """Lower memory loss first, then higher accuracy; a NaN loss or accuracy ranks last, never first."""
    loss, accuracy = row["memory_loss"], row["memory_accuracy"]
    return (math.inf if math.isnan(loss) else loss), (math.inf if math.isnan(accuracy) else -accuracy)


def _lattice(num_modules: int, resolution: int) -> list[tuple[Fraction, ...]]:
    """Every point of the simplex whose weights are multiples of 1/resolution, lexicographic in the weights."""
    def parts(total: int, k: int):
        if k == 1:
            yield (total,)
            return
        for first in range(total + 1):
            for rest in parts(total - first, k - 1):
                yield (first,) + rest
    return [tuple(Fraction(p, resolution) for p in point) for point in parts(resolution, num_modules)]


def _lattice_size(num_modules: int, resolution: int) -> int:
    return math.comb(resolution + num_modules - 1, num_modules - 1)


def _as_floats(point: Sequence[Fraction]) -> list[float]:
    """The point as floats with both `sum(weights) == 1.0` and `math.fsum(weights) == 1.0`.

    The nearest floats of the exact weights, with one weight (the largest first) moved by a few ulps when their
    sum is not 1.0; failing that (never seen), multiples of 2^-50, whose sums are exact in any order.
    """
    floats = [float(w) for w in point]
    if sum(floats) == 1.0 and math.fsum(floats) == 1.0:
        return floats
    order = sorted((i for i in range(len(point)) if point[i] > 0), key=lambda i: -point[i])
    for ulps in range(1, 9):
        for i in order:
            for direction in (math.inf, -math.inf):
                value = floats[i]
                for _ in range(ulps):
                    value = math.nextafter(value, direction)
                candidate = floats[:i] + [value] + floats[i + 1:]
                if value >= 0 and sum(candidate) == 1.0 and math.fsum(candidate) == 1.0:
                    return candidate
    quantum = 2**50
    ticks = [math.floor(w * quantum) for w in point]
    ticks[order[0]] += quantum - sum(ticks)
    return [t / quantum for t in ticks]


def _on_simplex(weights: Sequence[float], num_modules: int) -> tuple[Fraction, ...]:
    if len(weights) != num_modules or any(w < 0 for w in weights) or abs(math.fsum(weights) - 1) > 1e-9:
        raise ValueError(f"an included point must be {num_modules} non-negative weights summing to 1: {weights}")
    exact = [Fraction(w) for w in weights]
    total = sum(exact)
    return tuple(w / total for w in exact)


SIMPLEX_RESOLUTIONS = (1, 2, 4, 5, 10, 20)


def search_simplex(
    num_modules: int,
    score: Callable[[list[float]], tuple[float, float]],
    budget: int = 60,
    resolution: int | None = None,
    min_step: float = 0.01,
    include: Sequence[Sequence[float]] = (),
) -> tuple[list[float], list[dict]]:
    """Search the whole simplex of K = `num_modules` weights for the lowest memory DPO loss (SPEC §4).

    `score(weights)` returns (loss, accuracy) of the combination Σ λ_k θ_k. Deterministic (no randomness), in
    three phases, every distinct point scored once:
      1. `include`: given points first (e.g. the pairwise recursion's candidates `recursive_weights(prev, λ)`,
         so the search is never worse than `search_lambda` on the same grid);
      2. lattice: every point whose weights are multiples of 1/`resolution` (C(resolution+K−1, K−1) points; the
         vertices, i.e. each module alone, are always in it). Default: the largest of `SIMPLEX_RESOLUTIONS`
         whose lattice fits in half of what `budget` leaves after `include` (K=2: 20 → step 0.05, 21 points;
         K=3: 5 → step 0.2, 21 points; K=4…7: 2, vertices and edge midpoints; K ≥ 8: 1, the vertices only);
      3. refinement: pattern search from the best point so far along the simplex edges, i.e. moves that shift
         weight s from module i to module j (all ordered pairs; s capped at λ_i so the boundary is reachable),
         starting at s = 1/(2·resolution). If a move improves on the best point, go there and poll again;
         otherwise halve s. Stops when s < `min_step` or the budget is spent.
    `budget` bounds the number of `score` calls (each is a pass over the memory data): ≤ 60 by default. For
    K = 3 the defaults use 21 lattice points and at most 39 refinement ones, reaching ~0.0125 resolution.
    Ties are broken as in `search_lambda`: lower loss, then higher accuracy, then evaluation order; NaN last.

    Returns (best weights: K floats ≥ 0 whose sum is exactly 1.0 (see `_as_floats`), every scored point in order as
    {"weights", "memory_loss", "memory_accuracy", "phase"}). K = 1 scores the single point [1.0].
    """
    if num_modules < 1:
        raise ValueError("need at least one module")
    points = list(dict.fromkeys(_on_simplex(w, num_modules) for w in include))
    if resolution is None:
        room = max(budget - len(points), 0) // 2
        fits = [r for r in SIMPLEX_RESOLUTIONS if _lattice_size(num_modules, r) <= room]
        resolution = max(fits, default=1)
    if resolution < 1:
        raise ValueError("resolution must be a positive integer")
    if len(points) + _lattice_size(num_modules, resolution) > budget:
        raise ValueError(f"budget {budget} is too small for {len(points)} included points and the "
                         f"{_lattice_size(num_modules, resolution)}-point lattice of resolution {resolution}")
    scored = _ScoredPoints(score)
    for point in points:
        scored.evaluate(point, "include")
    for point in _lattice(num_modules, resolution):
        scored.evaluate(point, "lattice")
    best = _refine(scored, num_modules, Fraction(1, 2 * resolution), Fraction(min_step), budget)
    return list(scored.table[best]["weights"]), scored.table


class _ScoredPoints:
    """Every point scored so far, in order (each distinct point once): its table row and its exact weights."""

    def __init__(self, score: Callable[[list[float]], tuple[float, float]]):
        self.score, self.table, self.exact, self.seen = score, [], [], set()

    def evaluate(self, point: tuple[Fraction, ...], phase: str) -> dict | None:
        weights = _as_floats(point)
        if tuple(weights) in self.seen:
            return None
        loss, accuracy = self.score(list(weights))
        row = {"weights": weights, "memory_loss": float(loss), "memory_accuracy": float(accuracy), "phase": phase}
        self.seen.add(tuple(weights))
        self.table.append(row)
        self.exact.append(point)
        return row


def _refine(scored: _ScoredPoints, num_modules: int, step: Fraction, min_step: Fraction, budget: int) -> int:
    """Pattern search along the simplex edges from the best point so far; returns the best row's index."""
    table = scored.table
    best = min(range(len(table)), key=lambda i: _rank(table[i]))  # first of the ties
    while num_modules > 1 and step >= min_step and len(table) < budget:
        centre, moved = scored.exact[best], False
        for i in range(num_modules):
            for j in range(num_modules):
                if i == j or centre[i] == 0 or len(table) >= budget:
                    continue
                shift = min(step, centre[i])
                point = tuple(w - shift if k == i else w + shift if k == j else w for k, w in enumerate(centre))
                row = scored.evaluate(point, "refine")
                if row is not None and _rank(row) < _rank(table[best]):
                    best, moved = len(table) - 1, True
        if not moved:
            step /= 2
    return best
