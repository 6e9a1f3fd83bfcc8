"""The experiment runner: aggregation over seeds (fake results), the shipped configs, and a tiny end-to-end run."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from ofsdpo import domains
from ofsdpo.config import ConfigError
from ofsdpo.experiments import ExperimentConfig, ExperimentRunner, aggregate, mean_std, parse_seeds, write_aggregate

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def test_mean_and_sample_std():
    stat = mean_std([1.0, 2.0, 6.0])
    assert stat["mean"] == pytest.approx(3.0) and stat["n"] == 3
    assert stat["std"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1, "values": [5.0]}
    assert mean_std([None, None])["mean"] is None


def test_aggregate_walks_nested_seed_results():
    seeds = [{"score": 0.1, "curve": [1.0, 2.0, 3.0], "matrix": [[0.0, 1.0]], "per": {"a": 1, "b": None},
              "lambdas": [None, 0.5], "method": "dpo"},
             {"score": 0.3, "curve": [3.0, 4.0], "matrix": [[2.0, 3.0]], "per": {"a": 3, "b": 2.0},
              "lambdas": [None, 0.25], "method": "dpo"}]
    agg = aggregate(seeds)
    assert agg["score"]["mean"] == pytest.approx(0.2) and agg["score"]["std"] == pytest.approx(math.sqrt(0.02))
    assert [p["mean"] for p in agg["curve"]] == [2.0, 3.0]  # cut to the shortest seed
    assert agg["matrix"][0][1]["mean"] == 2.0 and agg["per"]["a"]["mean"] == 2.0
    assert agg["per"]["b"]["n"] == 1  # a missing value is skipped, not counted as 0
    assert agg["lambdas"][0] is None and agg["lambdas"][1]["mean"] == pytest.approx(0.375)
    assert agg["method"] == "dpo"


def fake_in_domain(seed):
    return {"judge_score": 0.1 * seed, "win_rate": 0.5, "kl": 1.0 + seed, "heldout_loss": 0.6, "heldout_accuracy": 0.5,
            "online_regret": 0.2, "response_words": 10, "swaps": 0, "base_judge_score": 0.05,
            "online_loss_curve": [0.69, 0.5], "regret_curve": [0.0, 0.2]}


def fake_continual(seed):
    names = ["sentiment", "critic"]
    return {"judge_matrix": [[0.5, -0.5], [0.1 * seed, 0.4]], "final_judge": {"sentiment": 0.1 * seed, "critic": 0.4},
            "avg_final_judge": 0.2, "forgetting_judge": {"sentiment": 0.5 - 0.1 * seed}, "avg_forgetting_judge": 0.4,
            "avg_final_accuracy": 0.6, "avg_final_kl": 1.5, "lambdas": [0.5],
            "base_judge_score": dict(zip(names, [0.1, -0.1])), "train_loss_curve": [0.69, 0.6, 0.5]}


@pytest.mark.parametrize("kind", ["in-domain", "continual"])
def test_write_aggregate_tables_and_plots(tmp_path, kind):
    in_domain = kind == "in-domain"
    config = ExperimentConfig(name="t", kind=kind, domains=["sentiment"] if in_domain else ["sentiment", "critic"],
                              variants=[{"name": "dpo", "method": "dpo"}])
    cell, fake = ("dpo/sentiment", fake_in_domain) if in_domain else ("dpo", fake_continual)
    summary = write_aggregate(tmp_path, config, {cell: {s: fake(s) for s in (0, 1, 2)}})
    written = json.loads((tmp_path / "aggregate.json").read_text())
    assert written["cells"] == json.loads(json.dumps(summary["cells"]))
    stat = written["cells"][cell]["judge_score" if in_domain else "avg_final_judge"]
    assert stat["n"] == 3
    text = (tmp_path / "aggregate.md").read_text()
    assert "+0.100 ± 0.100" in text  # the judge scores of seeds 0, 1, 2: 0.0, 0.1, 0.2
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_shipped_experiments_load_and_bad_variants_fail():
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        config = ExperimentConfig.from_yaml(path)
        assert len(config.seeds) >= 3 and config.cells()
    with pytest.raises(ConfigError, match="unknown field"):
        ExperimentConfig(variants=[{"name": "x", "method": "dpo", "alpah": 0.1}])
    with pytest.raises(ConfigError, match="in-domain methods"):
        ExperimentConfig(variants=[{"name": "x", "method": "cofs-dpo"}])
    assert parse_seeds("0, 1,2") == [0, 1, 2]


def test_tiny_in_domain_experiment_end_to_end_and_reuse(tiny_model_dir, tmp_path, monkeypatch):
    for name, domain in list(domains.DOMAINS.items()):
        monkeypatch.setitem(domains.DOMAINS, name, dataclasses.replace(
            domain, judge=lambda prompt, response, meta: float(len(response)), max_new_tokens=5))
    values = dict(name="tiny", kind="in-domain", domains=["sentiment"], seeds=[0, 1], model=str(tiny_model_dir),
                  data_dir=str(tmp_path / "pairs"), prompts=6, samples=2, steps=2, batch_size=2, heldout=2,
                  judge_prompts=2, max_length=48, max_prompt_length=24, lr=1e-3,
                  train={"lora_r": 2, "lora_alpha": 4, "chase_interval": 1},
                  variants=[{"name": "ofs", "method": "ofs-dpo"}])
    summary = ExperimentRunner(ExperimentConfig(**values), tmp_path / "runs" / "tiny", progress=False, verbose=False).run()
    cell = summary["cells"]["ofs/sentiment"]
    assert cell["judge_score"]["n"] == 2 and len(cell["regret_curve"]) == 2
    assert not list((tmp_path / "runs").rglob("checkpoints"))
    # a second experiment holding the same run reuses it instead of training again
    again = ExperimentConfig(**{**values, "name": "tiny2",
                                "variants": [{"name": "ofs-again", "method": "ofs-dpo"}]})
    second = ExperimentRunner(again, tmp_path / "runs" / "tiny2", progress=False, verbose=False).run()
    reused = second["per_seed"]["ofs-again/sentiment"]["0"]
    assert "reused_from" in reused and reused["judge_score"] == summary["per_seed"]["ofs/sentiment"]["0"]["judge_score"]
