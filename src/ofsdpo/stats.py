"""Paired statistics over seeds for the experiment reports (scipy for Student's t, torch for the bootstraps).

- `t_quantile(p, df)` / `t_cdf(t, df)`: Student's t (`scipy.stats.t`; df = ∞: the normal), with argument checks.
- `mean_sd(values)`: mean and sample sd.
- `paired_difference(method, baseline)`: method − baseline paired by seed, with a t interval over seeds.
- `bootstrap_ci(per_seed_unit_differences)`: a percentile bootstrap over units (pairs, prompts) within seeds.
- `crossed_bootstrap(per_seed_unit_differences)`: seeds and units resampled together (both sources of variation).
- `decision(t_row, crossed)`: the wider of the two intervals decides, with its p-value; `holm(p_values)`: the
  Holm step-down adjustment over the comparisons of one page; `holm_resolvable(m, resamples)`: whether a
  bootstrap of that many resamples can decide under Holm over m comparisons (`DECISION_RESAMPLES` can, to m = 500).
- `minimum_detectable_effect(sd, n)`: the smallest true mean difference a paired t-test over n seeds detects.

Undefined quantities are `None`, never NaN or ±inf, so the results stay valid JSON: with one seed there is no
sample sd and no t interval (sd, lower, upper, p_value and the minimum detectable effect are None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from scipy import stats as _scipy


# --- Student's t ---------------------------------------------------------------------------------------------------
def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` > 0 degrees of freedom (df = math.inf: the standard normal)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    return float(_scipy.norm.cdf(t) if math.isinf(df) else _scipy.t.cdf(t, df))


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t), accurate far in the tail (the survival function, not 1 − cdf)."""
    return float(_scipy.norm.sf(t) if math.isinf(df) else _scipy.t.sf(t, df))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` > 0 degrees of freedom (any real df; math.inf: the normal),
    e.g. t_quantile(0.975, 4) = 2.7764, (0.975, 1) = 12.706."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if p == 0.5:
        return 0.0
    return float(_scipy.norm.ppf(p) if math.isinf(df) else _scipy.t.ppf(p, df))


# --- summaries over seeds ------------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float:
    """Shifted mean: exactly the value when all values are equal."""
    first = values[0]
    return first + math.fsum(v - first for v in values) / len(values)


def mean_sd(values: Sequence[float]) -> dict:
    """{"mean", "sd", "n"}: the mean and the sample sd (n − 1 denominator; None for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd needs at least one value")
    mean = _mean(values)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "sd": sd, "n": len(values)}


def paired_difference(method_values: Sequence[float], baseline_values: Sequence[float],
                      confidence: float = 0.95) -> dict:
    """Method − baseline paired by seed (same order), with a Student-t interval over the n seeds.

    d_i = method_i − baseline_i; mean d̄, sample sd s; interval d̄ ± t_{(1+c)/2, n−1} · s/√n; p_value is the
    two-sided paired t-test of mean 0. Returns {"mean", "sd", "n", "lower", "upper", "se", "t", "p_value",
    "confidence", "values"}. With n = 1 sd, se, lower, upper and p_value are None (no spread to estimate); a
    constant difference (s = 0, n ≥ 2) gives lower = upper = mean and p_value 0 (or 1 if the mean is 0).
    """
    if len(method_values) != len(baseline_values):
        raise ValueError(f"paired values need equal lengths: {len(method_values)} vs {len(baseline_values)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = [float(m) - float(b) for m, b in zip(method_values, baseline_values)]
    summary = mean_sd(values)
    mean, sd, n = summary["mean"], summary["sd"], summary["n"]
    out = {"mean": mean, "sd": sd, "n": n, "lower": None, "upper": None, "se": None, "t": None, "p_value": None,
           "confidence": confidence, "values": values}
    if n < 2:
        return out
    se = sd / math.sqrt(n)
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * se
    out.update(se=se, lower=mean - half, upper=mean + half)
    if se > 0:
        out["t"] = mean / se
        out["p_value"] = 2.0 * _t_upper_tail(abs(mean / se), n - 1)
    else:
        out["p_value"] = 1.0 if mean == 0 else 0.0
    return out


def bootstrap_ci(per_seed_unit_differences: Sequence[Sequence[float]], resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0, shared_units: bool = False) -> dict:
    """Percentile bootstrap over units of the mean difference, averaged over seeds.

    `per_seed_unit_differences[s][u]` is the method − baseline difference on unit u (a pair, a prompt) under
    seed s. The statistic is the mean over seeds of each seed's mean over units. Each resample draws, with
    replacement, as many units as each seed has, independently per seed (`shared_units=True`: one draw of unit
    indices used by every seed, for units that are the same prompts under every seed; the seeds then need equal
    unit counts). The interval is the (1 ∓ c)/2 percentiles (linear interpolation) of the resampled statistic.
    It measures the uncertainty from the finite evaluation set only; the t interval of `paired_difference`
    measures the seed-to-seed spread. Deterministic for a given `seed` (a torch CPU generator).

    Returns {"mean", "lower", "upper", "resamples", "confidence", "n_seeds", "n_units"}.
    """
    if not per_seed_unit_differences or any(len(units) == 0 for units in per_seed_unit_differences):
        raise ValueError("bootstrap_ci needs at least one seed, each with at least one unit")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    seeds = [torch.tensor([float(v) for v in units], dtype=torch.float64) for units in per_seed_unit_differences]
    sizes = [len(x) for x in seeds]
    if shared_units and len(set(sizes)) != 1:
        raise ValueError(f"shared_units needs the same number of units under every seed, got {sizes}")
    mean = math.fsum(_mean(x.tolist()) for x in seeds) / len(seeds)

    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, 2_000_000 // max(sizes))  # bound the index tensor to ~16 MB
    statistics = []
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        total = torch.zeros(count, dtype=torch.float64)
        shared = torch.randint(sizes[0], (count, sizes[0]), generator=generator) if shared_units else None
        for x in seeds:
            index = shared if shared_units else torch.randint(len(x), (count, len(x)), generator=generator)
            total += x[index].mean(dim=1)
        statistics.append(total / len(seeds))
    statistics = torch.cat(statistics)
    alpha = 1.0 - confidence
    lower, upper = torch.quantile(statistics, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return {"mean": mean, "lower": lower, "upper": upper, "resamples": resamples, "confidence": confidence,
            "n_seeds": len(seeds), "n_units": sizes}


def crossed_bootstrap(per_seed_unit_differences: Sequence[Sequence[float]], resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap of the mean difference that resamples seeds AND units (a crossed design: the same
    units, e.g. report pairs or judged prompts, under every seed). `d[s][u]` is the difference on unit u under seed
    s; each resample draws n seeds with replacement and, independently, one set of unit indices with replacement
    shared by the drawn seeds, and takes the mean of d over both. Unlike the t interval over seeds (units held
    fixed) or a bootstrap over units (seeds held fixed), its spread includes both the seed-to-seed and the
    unit-to-unit variation. The p-value is two-sided: 2 min(P*(stat ≤ 0), P*(stat ≥ 0)), at most 1, at least
    1 / resamples. Deterministic for a given `seed`.

    Returns {"mean", "lower", "upper", "p_value", "resamples", "confidence", "n_seeds", "n_units"}.
    """
    if not per_seed_unit_differences or any(len(u) == 0 for u in per_seed_unit_differences):
        raise ValueError("crossed_bootstrap needs at least one seed, each with at least one unit")
    sizes = {len(u) for u in per_seed_unit_differences}
    if len(sizes) != 1:
        raise ValueError(f"crossed_bootstrap needs the same units under every seed, got counts {sorted(sizes)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = torch.tensor([[float(v) for v in units] for units in per_seed_unit_differences], dtype=torch.float64)
    n_seeds, n_units = d.shape
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, 4_000_000 // (n_seeds * n_units))  # bound the gathered tensor to ~32 MB
    statistics = []
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        seeds = torch.randint(n_seeds, (count, n_seeds), generator=generator)
        units = torch.randint(n_units, (count, n_units), generator=generator)
        drawn = d[seeds]  # (count, n_seeds, n_units)
        statistics.append(drawn.gather(2, units[:, None, :].expand(-1, n_seeds, -1)).mean(dim=(1, 2)))
    statistics = torch.cat(statistics)
    alpha = 1.0 - confidence
    lower, upper = torch.quantile(statistics, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    below, above = (statistics <= 0).double().mean().item(), (statistics >= 0).double().mean().item()
    p_value = min(1.0, max(2.0 * min(below, above), 1.0 / resamples))
    return {"mean": d.mean().item(), "lower": lower, "upper": upper, "p_value": p_value, "resamples": resamples,
            "confidence": confidence, "n_seeds": n_seeds, "n_units": n_units}


def decision(t_row: dict, crossed: dict | None) -> dict:
    """The interval that decides a comparison: the wider of the t interval over seeds (`paired_difference`) and
    the crossed bootstrap (`crossed_bootstrap`; None where there are no per-unit values), with its p-value.
    Returns {"lower", "upper", "p_value", "by"} ("t" or "crossed bootstrap"); lower/upper None without a t
    interval (one seed)."""
    t = {"lower": t_row.get("lower"), "upper": t_row.get("upper"), "p_value": t_row.get("p_value"), "by": "t"}
    if crossed is None:
        return t
    boot = {"lower": crossed["lower"], "upper": crossed["upper"], "p_value": crossed["p_value"],
            "by": "crossed bootstrap"}
    if t["lower"] is None:
        return boot
    return boot if boot["upper"] - boot["lower"] > t["upper"] - t["lower"] else t


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of m p-values (the family-wise error rate over m comparisons): sorted
    ascending, p_(i) becomes max_{j ≤ i} min(1, (m − j + 1) p_(j)), returned in the input order. None (no
    p-value) stays None and does not count in m."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m, adjusted, running = len(present), list(p_values), 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


# The bootstraps' resamples behind a verdict. A bootstrap's p is at least 1/resamples, and Holm over m comparisons
# first asks p < level/m: the floor must sit well below that, or no effect of any size can be decided (at the old
# 2000, no bootstrap-decided comparison could hold on a page of over 100). Rule: 1/resamples ≤ level/(20 m). At
# p = level/m the smaller tail then holds resamples · p / 2 = 5000/m resamples (50 at m = 100: a Monte Carlo
# error of about 14 % on that p).
DECISION_RESAMPLES = 200_000
RESOLUTION_MARGIN = 20


def holm_resolvable(comparisons: int, resamples: int, level: float = 0.05) -> bool:
    """Whether bootstrap p-values of `resamples` resamples (floor 1/resamples) are fine enough to decide under Holm
    over `comparisons` at `level`: 1/resamples ≤ level / (RESOLUTION_MARGIN · comparisons). E.g. 2000 resamples
    decide up to 5 comparisons, DECISION_RESAMPLES = 200000 up to 500."""
    if comparisons < 0 or resamples < 1:
        raise ValueError(f"need comparisons ≥ 0 and resamples ≥ 1, got {comparisons}, {resamples}")
    return RESOLUTION_MARGIN * comparisons <= level * resamples


def minimum_detectable_effect(sd: float | None, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest true mean paired difference that a two-sided paired t-test at level `alpha` over `n` seeds
    detects with probability ≈ `power`, given the sd of the per-seed differences:

        MDE ≈ (t_{1−α/2, n−1} + t_{power, n−1}) · sd / √n

    (the usual approximation that ignores the non-centrality of the t distribution; slightly optimistic for very
    small n). E.g. n = 5, sd = 1: (2.776 + 0.941) / √5 = 1.66. None when n < 2 or sd is None (no sd estimate).
    """
    if sd is None or n < 2:
        return None
    if sd < 0:
        raise ValueError(f"sd must be non-negative, got {sd}")
    return (t_quantile(1.0 - alpha / 2.0, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)
