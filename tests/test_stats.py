"""Paired statistics for the reports: t quantiles against published values, intervals, bootstrap, MDE."""

import json
import math

import pytest

from ofsdpo.stats import bootstrap_ci, mean_sd, minimum_detectable_effect, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 4, 2.7764), (0.975, 1, 12.706), (0.975, 30, 2.0423), (0.975, 1e9, 1.95996), (0.975, math.inf, 1.95996),
    (0.975, 2, 4.3027), (0.975, 9, 2.2622), (0.95, 10, 1.8125), (0.995, 3, 5.8409), (0.8, 4, 0.9410),
    (0.9995, 1, 636.62), (0.975, 2e5, 1.95997), (0.975, 120, 1.9799),
])
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-3, rel=1e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-3, rel=1e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_closed_forms_for_one_and_two_df(p):
    """df = 1 (Cauchy): tan(π(p − ½)); df = 2: (2p − 1)/√(2p(1 − p))."""
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


@pytest.mark.parametrize("df", [1, 2.5, 7, 40, 5e4])
def test_t_cdf_inverts_t_quantile(df):
    for p in (0.51, 0.8, 0.975, 0.999):
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    assert t_quantile(0.5, df) == 0.0


def test_t_quantile_rejects_bad_arguments():
    for p, df in [(0.0, 3), (1.0, 3), (0.5, 0), (0.9, -1)]:
        with pytest.raises(ValueError):
            t_quantile(p, df)


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "sd": pytest.approx(math.sqrt(5 / 3)), "n": 4}
    assert mean_sd([0.7]) == {"mean": 0.7, "sd": None, "n": 1}
    with pytest.raises(ValueError):
        mean_sd([])


def test_paired_difference_worked_example():
    """d = (1, 2, 3, 4, 5) − (0, 0, 0, 0, 0): mean 3, sd √2.5, interval 3 ± 2.7764·√2.5/√5 = 3 ± 1.9632."""
    out = paired_difference([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
    assert out["mean"] == 3.0 and out["n"] == 5 and out["sd"] == pytest.approx(math.sqrt(2.5))
    assert out["lower"] == pytest.approx(3 - 1.9632, abs=1e-3) and out["upper"] == pytest.approx(3 + 1.9632, abs=1e-3)
    assert out["lower"] <= out["mean"] <= out["upper"]
    assert out["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert out["p_value"] == pytest.approx(0.0132, abs=1e-3)  # t = 3/√0.5 = 4.243 on 4 df


def test_paired_difference_pairs_by_seed():
    """A shared seed effect cancels: the baselines vary a lot, the differences not at all."""
    out = paired_difference([10.5, 20.5, 30.5], [10.0, 20.0, 30.0])
    assert out["mean"] == 0.5 and out["sd"] == 0.0
    assert out["lower"] == out["upper"] == out["mean"] == 0.5  # constant difference: zero width
    assert out["p_value"] == 0.0


def test_paired_difference_with_one_seed_has_no_interval():
    out = paired_difference([0.8], [0.6])
    assert out["mean"] == pytest.approx(0.2) and out["n"] == 1
    assert out["sd"] is None and out["lower"] is None and out["upper"] is None and out["p_value"] is None
    json.dumps(out, allow_nan=False)  # None, never inf/NaN: a report stays valid JSON


def test_paired_difference_rejects_unpaired_input():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])


def test_bootstrap_is_deterministic_and_contains_the_mean():
    per_seed = [[0.1, -0.3, 0.5, 0.2, 0.0, 0.4, -0.1, 0.3],
                [0.2, 0.1, -0.2, 0.6, 0.3, 0.0, 0.1, 0.2, 0.4],
                [0.0, 0.5, 0.1, -0.4, 0.2, 0.3]]
    a = bootstrap_ci(per_seed, seed=3)
    assert a == bootstrap_ci(per_seed, seed=3)
    assert a != bootstrap_ci(per_seed, seed=4)
    assert a["resamples"] == 2000 and a["n_units"] == [8, 9, 6]
    expected = sum(sum(s) / len(s) for s in per_seed) / 3
    assert a["mean"] == pytest.approx(expected)
    assert a["lower"] < a["mean"] < a["upper"]
    shared = bootstrap_ci([[0.1, 0.3, -0.2, 0.5], [0.2, 0.2, 0.0, 0.4]], shared_units=True, resamples=500)
    assert shared["lower"] <= shared["mean"] <= shared["upper"]
    with pytest.raises(ValueError, match="same number"):
        bootstrap_ci(per_seed, shared_units=True)


def test_bootstrap_of_a_constant_difference_has_zero_width():
    out = bootstrap_ci([[0.25] * 5, [0.25] * 7])
    assert out["lower"] == out["upper"] == out["mean"] == 0.25


def test_bootstrap_width_shrinks_with_more_units():
    few = bootstrap_ci([[(-1) ** i * 1.0 + 0.1 for i in range(10)]])
    many = bootstrap_ci([[(-1) ** i * 1.0 + 0.1 for i in range(1000)]])
    assert many["upper"] - many["lower"] < 0.5 * (few["upper"] - few["lower"])


def test_minimum_detectable_effect():
    """n = 5, sd = 1: (t_{.975,4} + t_{.8,4}) / √5 = (2.7764 + 0.9410) / 2.2361 = 1.6625."""
    assert minimum_detectable_effect(1.0, 5) == pytest.approx(1.6625, abs=1e-3)
    assert minimum_detectable_effect(2.0, 5) == pytest.approx(2 * minimum_detectable_effect(1.0, 5))
    assert minimum_detectable_effect(1.0, 20) < minimum_detectable_effect(1.0, 5)
    assert minimum_detectable_effect(1.0, 1) is None and minimum_detectable_effect(None, 5) is None


def test_crossed_bootstrap_decision_covers_the_true_difference():
    """Synthetic differences with seed AND unit variance (the same units under every seed, as report pairs are):
    d[s][u] = μ + a_s + b_u + e_su. Over 200 draws at 95 %, the decision interval (the wider of t and the crossed
    bootstrap) covers μ in ≥ 90 %; the t interval alone, which holds the units fixed, covers it less often."""
    import torch

    from ofsdpo.stats import crossed_bootstrap, decision, paired_difference

    g = torch.Generator().manual_seed(0)
    mu, seeds, units, covered, t_covered = 0.1, 5, 48, 0, 0
    for draw in range(200):
        d = (mu + 0.05 * torch.randn(seeds, 1, generator=g, dtype=torch.float64)
             + 0.3 * torch.randn(1, units, generator=g, dtype=torch.float64)
             + 0.2 * torch.randn(seeds, units, generator=g, dtype=torch.float64))
        rows = d.tolist()
        t_row = paired_difference([sum(r) / units for r in rows], [0.0] * seeds)
        decided = decision(t_row, crossed_bootstrap(rows, resamples=1000, seed=draw))
        covered += decided["lower"] <= mu <= decided["upper"]
        t_covered += t_row["lower"] <= mu <= t_row["upper"]
    assert covered >= 180, covered
    assert t_covered < covered, (t_covered, covered)


def test_crossed_bootstrap_p_value_and_the_wider_interval():
    from ofsdpo.stats import crossed_bootstrap, decision

    far = crossed_bootstrap([[1.0, 1.1, 0.9], [1.2, 1.0, 1.1]], resamples=500)
    assert far["p_value"] == 1 / 500 and far["lower"] > 0 and far["n_seeds"] == 2 and far["n_units"] == 3
    centred = crossed_bootstrap([[1.0, -1.0], [-1.0, 1.0]], resamples=500)
    assert centred["p_value"] > 0.5 and centred["lower"] < 0 < centred["upper"]
    t_row = {"lower": -0.1, "upper": 0.1, "p_value": 0.9}
    assert decision(t_row, {"lower": -1.0, "upper": 1.0, "p_value": 0.5})["by"] == "crossed bootstrap"
    assert decision(t_row, {"lower": 0.01, "upper": 0.02, "p_value": 0.01}) == {**t_row, "by": "t"}
    assert decision(t_row, None)["by"] == "t"
    with pytest.raises(ValueError, match="same units"):
        crossed_bootstrap([[1.0, 2.0], [1.0]])


def test_holm_matches_a_hand_computation():
    """m = 4 (None does not count): sorted 0.01, 0.02, 0.03, 0.5 → 4 x 0.01 = 0.04, 3 x 0.02 = 0.06,
    max(0.06, 2 x 0.03) = 0.06, max(0.06, 1 x 0.5) = 0.5; returned in the input order."""
    from ofsdpo.stats import holm

    got = holm([0.03, None, 0.5, 0.01, 0.02])
    assert got[1] is None
    assert got[0] == pytest.approx(0.06) and got[2] == pytest.approx(0.5)
    assert got[3] == pytest.approx(0.04) and got[4] == pytest.approx(0.06)
    assert holm([0.4, 0.6]) == [pytest.approx(0.8), pytest.approx(0.8)]  # capped monotone: max(0.8, 0.6)
    assert holm([]) == []


def test_holm_resolvable_is_the_stated_rule_and_the_report_refuses_coarse_bootstraps():
    """1/resamples ≤ 0.05 / (20 m): 2000 resamples decide up to 5 comparisons, 200000 up to 500; the report's
    Holm (`experiment_report.adjust`) refuses rows whose bootstrap is coarser than that, and the row that is fine
    enough is adjusted as `holm` says."""
    from ofsdpo.commands.experiment_report import adjust
    from ofsdpo.stats import DECISION_RESAMPLES, holm, holm_resolvable

    assert holm_resolvable(5, 2000) and not holm_resolvable(6, 2000)
    assert holm_resolvable(500, DECISION_RESAMPLES) and not holm_resolvable(501, DECISION_RESAMPLES)
    assert holm_resolvable(0, 1)
    with pytest.raises(ValueError):
        holm_resolvable(3, 0)

    def row(name, p, resamples):
        return {"variant": name, "baseline": "dpo", "decision": {"p_value": p},
                "crossed_bootstrap": {"p_value": p, "resamples": resamples}}

    fine = [row(f"v{i}", p, DECISION_RESAMPLES) for i, p in enumerate([0.001, 0.02, 0.5, 0.04, 0.3, 0.2])]
    assert [r["p_holm"] for r in adjust(fine)] == pytest.approx(holm([0.001, 0.02, 0.5, 0.04, 0.3, 0.2]))
    coarse = fine[:5] + [row("old", 0.0005, 2000)]  # 6 comparisons: 2000 resamples resolve only 5
    with pytest.raises(ValueError, match="old − dpo have too few resamples to decide under Holm over 6"):
        adjust(coarse)
    assert "p_holm" in adjust(coarse[1:])[-1]  # 5 comparisons: 2000 is enough
