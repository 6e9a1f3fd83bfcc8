"""Linear combinations of LoRA modules (SPEC §4), as pure functions of adapter state dicts.

A state dict is what `modules.adapter_state` returns: `...<layer>.lora_A.weight` (r, in) and
`...<layer>.lora_B.weight` (out, r) per adapted layer, the effective update being ΔW = scaling · B A.

- `params` (the literal reading): A = Σ λ_k A_k and B = Σ λ_k B_k. Same rank; ΔW is *not* Σ λ_k ΔW_k (cross terms).
- `delta` (exact): ΔW = Σ λ_k ΔW_k, a LoRA of rank Σ r_k made by stacking A_k and λ_k·B_k (peft's "cat").
- `ties`, `dare_ties`, `dare_linear`: the merges of peft's `add_weighted_adapter` for LoRAs of one rank, through
  peft's own `merge_utils` (TIES: keep each module's top-`density` entries by magnitude, elect a sign per entry, average
  the kept entries that agree with it; DARE: drop entries at random, keeping each with probability `density`, and
  rescale the kept ones by 1/density, then sum (`dare_linear`) or elect signs as TIES (`dare_ties`)). Like peft, they
  merge the A matrices and the B matrices separately, each with the sqrt-split weights sign(w)·√|w·scaling| (A) and
  √|w·scaling| (B), so their product carries w·scaling (`merge_like_peft`).

`combine_states` dispatches the five by name; `combine_lora` also gives the LoraConfig the result is served with.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, Union

import torch
from peft.utils.merge_utils import dare_linear, dare_ties, task_arithmetic, ties

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
    """ΔW = scaling · B A of every adapted layer, in float32 or wider (a float64 state stays float64)."""
    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.promote_types(t.dtype, torch.float32))
    return {layer: scaling * wide(state[layer + B_SUFFIX]) @ wide(state[layer + A_SUFFIX]) for layer in layers(state)}


# peft's merges of LoRAs of one rank (`peft.utils.merge_utils`), each called as `add_weighted_adapter` calls it:
# (task tensors, weights, density) -> the merged tensor, with peft's default sign election ("total")
PEFT_MERGES: dict[str, Callable[[list[torch.Tensor], torch.Tensor, float], torch.Tensor]] = {
    "ties": ties, "dare_ties": dare_ties, "dare_linear": dare_linear}
RANDOM_MERGES = frozenset({"dare_ties", "dare_linear"})  # DARE drops entries at random (torch's global RNG)
LINEAR_COMBINATIONS = {"params": combine_params, "delta": combine_delta}
COMBINATIONS = (*LINEAR_COMBINATIONS, *PEFT_MERGES)  # every --combine value


def combine_states(kind: str, states: Sequence[dict], weights: Sequence[float], density: float | None = None,
                   scaling: float = 1.0, seed: int | None = None) -> dict[str, torch.Tensor]:
    """The combination `kind` (one of `COMBINATIONS`) of the modules' states with these weights. `density`, `scaling`
    and `seed` are the peft merges' (`merge_like_peft`); `params` and `delta` use every entry and leave the scaling
    as it is, so they ignore them."""
    if kind in LINEAR_COMBINATIONS:
        return LINEAR_COMBINATIONS[kind](states, weights)
    if kind in PEFT_MERGES:
        return merge_like_peft(kind, states, weights, density, scaling, seed)
    raise ValueError(f"unknown combination {kind!r}: one of {', '.join(COMBINATIONS)}")


def combine_lora(kind: str, states: Sequence[dict], weights: Sequence[float], lora, density: float | None = None,
                 seed: int | None = None):
    """The combined module as (state, the LoraConfig to serve it with), the kept modules sharing the config `lora`.

    - params: `lora` as it is;
    - delta: rank and lora_alpha times the number of modules (scaling = alpha / r unchanged), as the ranks stack;
    - ties, dare_ties, dare_linear: `lora` as it is, the merge computed with `scaling=1.0`. peft folds each module's
      scaling s into the weights and serves its merged adapter at lora_alpha = r (scaling 1): ΔW = B_p A_p. These
      merges are linear in the weights once their masks are drawn (TIES's trimming and sign election and DARE's
      drops read the unweighted entries), so leaving √s out of both factors gives A = A_p/√s and B = B_p/√s, and
      the module served at its own scaling s has ΔW = s·B A = B_p A_p, peft's (to rounding). Keeping the config also
      lets the next stage start from the served state (--init previous) at the scaling it trains with.
    """
    state = combine_states(kind, states, weights, density=density, scaling=1.0, seed=seed)
    if kind != "delta":
        return state, lora
    stacked = copy.deepcopy(lora)
    stacked.r, stacked.lora_alpha = lora.r * len(states), lora.lora_alpha * len(states)
    return state, stacked


def merge_like_peft(kind: str, states: Sequence[dict], weights: Sequence[float], density: float | None,
                    scaling: float = 1.0, seed: int | None = None) -> dict[str, torch.Tensor]:
    """The A and B that peft's `add_weighted_adapter(adapters, weights, name, combination_type=kind, density=density)`
    writes for LoRAs of one rank whose scaling (lora_alpha / r) is `scaling`: per layer, A = merge(A_k, sign(w_k)·
    √|w_k·scaling|) and B = merge(B_k, √|w_k·scaling|), `merge` being peft's `ties`, `dare_ties` or `dare_linear`
    (`PEFT_MERGES`). peft serves them at lora_alpha = r (scaling 1); `combine_lora` says how we serve them. With one
    module peft merges linearly (`task_arithmetic`) whatever the kind, and so does this.

    DARE's masks are Bernoulli(density) draws of torch's CPU RNG, one per entry of every module's A, then of every
    module's B, layer by layer. With `seed`, each layer's draws start from `layer_seed(seed, layer)` inside
    `torch.random.fork_rng`: the same masks whatever the weights (common random numbers across the λ candidates), the
    states' device or their key order (a resumed run reloads them sorted, on the CPU), and the caller's RNG is left
    as it was. With None they come from the global CPU RNG as it stands, as in peft on the CPU, and advance it. peft
    on a GPU would draw from that GPU's RNG instead. TIES draws nothing.
    """
    if kind not in PEFT_MERGES:
        raise ValueError(f"{kind!r} is not one of peft's merges ({', '.join(PEFT_MERGES)})")
    if density is None or not 0.0 < density <= 1.0:
        raise ValueError(f"{kind} needs a density in (0, 1]: the share of entries each module keeps (got {density})")
    _check_one_rank(states)
    merge = PEFT_MERGES[kind] if len(states) > 1 else (lambda tensors, w, _: task_arithmetic(tensors, w))
    # peft's weights for the A and B sides: the sign on one side only, so a negative weight is not squared away
    products = [w * scaling for w in weights]
    weights_a = [math.sqrt(abs(p)) * (1 if p >= 0 else -1) for p in products]
    weights_b = [math.sqrt(abs(p)) for p in products]
    random, out = kind in RANDOM_MERGES, {}
    with torch.random.fork_rng(devices=[], enabled=random and seed is not None), warnings.catch_warnings():
        # peft warns on every tensor that density 1 prunes nothing: at --density 1 that is what was asked
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        for layer in _layers_in_state_order(states[0]):
            if random and seed is not None:
                torch.random.default_generator.manual_seed(layer_seed(seed, layer))
            for suffix, side_weights in ((A_SUFFIX, weights_a), (B_SUFFIX, weights_b)):
                tensors = [state[layer + suffix] for state in states]
                device, dtype = tensors[0].device, tensors[0].dtype
                if random:  # drawn by the CPU's RNG: the same masks on every device
                    tensors = [t.cpu() for t in tensors]
                # the weights as peft builds them (`torch.tensor` of floats: the default dtype): its result to the bit
                merged = merge(tensors, torch.tensor(side_weights).to(tensors[0].device), density)
                out[layer + suffix] = merged.to(device=device, dtype=dtype)
    return out


def _check_one_rank(states: Sequence[dict]) -> None:
    keys = states[0].keys()
    for state in states[1:]:
        if state.keys() != keys:
            raise ValueError("modules to combine must adapt the same layers")
        shapes = {k: tuple(state[k].shape) for k in keys}
        if shapes != {k: tuple(states[0][k].shape) for k in keys}:
            raise ValueError("ties and dare merge LoRAs of one rank (as peft's add_weighted_adapter): use --combine "
                             "delta for modules of different ranks")


def _layers_in_state_order(state: dict[str, torch.Tensor]) -> list[str]:
    """The adapted layers in the state dict's order (`layers` sorts them), so the result's keys keep the input's."""
    return [k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)]


def layer_seed(seed: int, layer: str) -> int:
    """The seed of one layer's DARE draws: a function of the run's seed and the layer's name only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{layer}".encode()).digest()[:8], "little")


def recursive_weights(previous: Sequence[float], lam: float) -> list[float]:
    """θ ← λ θ_prev + (1 − λ) θ_new, written as weights over all kept modules (they stay on the simplex)."""
    return [lam * w for w in previous] + [1.0 - lam]


# what a score callback returns: (memory loss, accuracy), or a row with those two and optionally "criterion"
Scores = Union[tuple[float, float], Mapping[str, Any]]


def search_lambda(grid: Sequence[float], score: Callable[[float], Scores]) -> tuple[float, list[dict]]:
    """The grid point with the lowest criterion (by default the memory DPO loss); ties broken by higher preference
    accuracy, then grid order (a NaN criterion or accuracy ranks last).

    `score(λ)` returns (loss, accuracy), or a row holding "memory_loss", "memory_accuracy" and optionally
    "criterion" (the value to minimise) and anything else to record (`scored_row`). Returns (best λ, every point's
    row).
    """
    table = [{"lambda": float(lam), **scored_row(score(lam))} for lam in grid]
    best = min(table, key=_rank)
    return best["lambda"], table


def scored_row(scores: Scores) -> dict:
    """A score callback's result as a table row: "memory_loss" and "memory_accuracy" as floats, then the rest."""
    if isinstance(scores, Mapping):
        row = dict(scores)
        row["memory_loss"], row["memory_accuracy"] = float(row["memory_loss"]), float(row["memory_accuracy"])
        return row
    loss, accuracy = scores
    return {"memory_loss": float(loss), "memory_accuracy": float(accuracy)}


def _rank(row: dict) -> tuple[float, float]:
    """Lower criterion first (the memory loss when the row has none), then higher accuracy; a NaN criterion or
    accuracy ranks last, never first."""
    value, accuracy = row.get("criterion", row["memory_loss"]), row["memory_accuracy"]
    return (math.inf if math.isnan(value) else value), (math.inf if math.isnan(accuracy) else -accuracy)


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
    score: Callable[[list[float]], Scores],
    budget: int = 60,
    resolution: int | None = None,
    min_step: float = 0.01,
    include: Sequence[Sequence[float]] = (),
) -> tuple[list[float], list[dict]]:
    """Search the whole simplex of K = `num_modules` weights for the lowest criterion (SPEC §4; by default the memory
    DPO loss).

    `score(weights)` returns (loss, accuracy) of the combination Σ λ_k θ_k, or a row (as `search_lambda`'s).
    Deterministic (no randomness), in three phases, every distinct point scored once:
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
    Ties are broken as in `search_lambda`: lower criterion, then higher accuracy, then evaluation order; NaN last.

    Returns (best weights: K floats ≥ 0 whose sum is exactly 1.0 (see `_as_floats`), every scored point in order as
    {"weights", "memory_loss", "memory_accuracy", [the callback's other values,] "phase"}). K = 1 scores the single
    point [1.0].
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

    def __init__(self, score: Callable[[list[float]], Scores]):
        self.score, self.table, self.exact, self.seen = score, [], [], set()

    def evaluate(self, point: tuple[Fraction, ...], phase: str) -> dict | None:
        weights = _as_floats(point)
        if tuple(weights) in self.seen:
            return None
        row = {"weights": weights, **scored_row(self.score(list(weights))), "phase": phase}
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
