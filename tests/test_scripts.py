"""The maintenance scripts under scripts/ that the results depend on."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_restore_runs_writes_each_finished_run_once(tmp_path):
    """Every run of the aggregate with a run key becomes runs/<cell>/seed-<s>/result.json, as written; a result
    already there is kept, and a run without a key (not from `ofsdpo experiment`) is not restored."""
    restore = load("restore_runs").restore
    per_seed = {"dpo": {"0": {"run_key": "a", "x": 1}, "4": {"run_key": "b", "x": 2}},
                "cofs": {"0": {"x": 3}}}
    aggregate = tmp_path / "aggregate.json"
    aggregate.write_text(json.dumps({"per_seed": per_seed}))
    kept = tmp_path / "out" / "runs" / "dpo" / "seed-4" / "result.json"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"run_key": "newer"}')
    written = restore(aggregate, tmp_path / "out")
    assert written == [tmp_path / "out" / "runs" / "dpo" / "seed-0" / "result.json"]
    assert json.loads(written[0].read_text()) == per_seed["dpo"]["0"]
    assert json.loads(kept.read_text()) == {"run_key": "newer"}
    for text in ('{"cells": {}}', "not json"):  # not an aggregate: an error naming the file
        aggregate.write_text(text)
        with pytest.raises(SystemExit, match=r"aggregate\.json: not an aggregate\.json"):
            restore(aggregate, tmp_path / "out")


def test_reaggregate_and_the_page_decide_every_verdict_under_one_rule(tmp_path):
    """A committed aggregate rebuilt from its runs (`reaggregate`) gets decisions and Holm; the page
    (`results_sections`) re-adjusts Holm over every comparison of every aggregate given and states, per verdict,
    the deciding interval; a frontier experiment gets its own section with the frontier table and figure."""
    from test_commands_experiment import _ladder_result

    from ofsdpo.commands.experiment_report import write_aggregate
    from ofsdpo.config import ExperimentConfig

    results_dir = tmp_path / "results"
    config = ExperimentConfig(name="frontier-x", domains=["sentiment"], seeds=[0, 1, 2], steps=8,
                              checkpoints=[2, 4, 8], kl_budgets=[3.0],
                              variants=[{"name": "dpo", "method": "dpo"}, {"name": "ofs", "method": "ofs-dpo"}])
    results = {"dpo/sentiment": {s: _ladder_result(s, 0.05) for s in (0, 1, 2)},
               "ofs/sentiment": {s: {**_ladder_result(s, 0.08 + 0.001 * s), "wall_seconds": 60.0} for s in (0, 1, 2)}}
    for cell in results.values():
        for r in cell.values():
            r.setdefault("wall_seconds", 30.0)
    summary = write_aggregate(tmp_path / "out", config, results)
    results_dir.mkdir()
    aggregate = results_dir / "frontier-x-aggregate.json"
    aggregate.write_text(json.dumps({**summary, "paired": []}))  # as if written before decisions existed
    written = load("reaggregate").reaggregate(aggregate)
    assert results_dir / "frontier-x-frontier.png" in written and results_dir / "frontier-x-aggregate.md" in written
    rebuilt = json.loads(aggregate.read_text())
    assert rebuilt["paired"] and all("decision" in r and "p_holm" in r for r in rebuilt["paired"])
    page = tmp_path / "results.md"
    sections = load("results_sections")
    page.write_text(f"# Results\n\n{sections.START} old\n\nold text\n\n{sections.END}\n\n- kept\n")
    sections.main([str(aggregate), str(aggregate)], str(page))  # twice: twice the comparisons on the page
    text = page.read_text()
    count = 2 * len(rebuilt["paired"])
    assert "old text" not in text and text.endswith(f"{sections.END}\n\n- kept\n")
    assert text.count("## Claim 1 where fast-slow can act") == 2
    assert "![frontier](results/frontier-x-frontier.png)" in text
    assert f"Holm over the page's {count} comparisons" in text
    assert "| ofs (slow) | 8 |" in text and "Served module of `ofs` per checkpoint" in text


def test_aggregate_runs_takes_each_processes_runs_and_refuses_a_stale_key(tmp_path):
    """Seeds run in two processes (two output folders) are collected into one set of results, each checked against
    the run key the experiment computes now: a run of other settings is refused, naming it; nothing is trained."""
    from test_commands_experiment import _write_pairs

    from ofsdpo.commands.experiment import ExperimentRunner
    from ofsdpo.config import ExperimentConfig

    collect = load("aggregate_runs").collect
    config = ExperimentConfig(name="e", kind="in-domain", domains=["sentiment"], seeds=[0, 1, 2],
                              variants=[{"name": "dpo", "method": "dpo"}], data_dir=str(tmp_path / "pairs"))
    _write_pairs(config)
    runner = ExperimentRunner(config, tmp_path / "out", progress=False, verbose=False)
    variant = config.variants[0]
    for folder, seed in (("a", 0), ("b", 1)):  # seed 2 never ran
        path = tmp_path / folder / "runs" / "dpo" / "sentiment" / f"seed-{seed}" / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"run_key": runner.run_key(variant, "sentiment", seed), "seed": seed}))
    results = collect(config, [tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert {cell: sorted(runs) for cell, runs in results.items()} == {"dpo/sentiment": [0, 1]}
    assert results["dpo/sentiment"][1]["seed"] == 1 and not (tmp_path / "out" / "runs").exists()
    stale = tmp_path / "b" / "runs" / "dpo" / "sentiment" / "seed-1" / "result.json"
    stale.write_text(json.dumps({"run_key": "0123456789abcdef", "seed": 1}))
    with pytest.raises(SystemExit, match=r"seed-1/result.json: run key 0123456789abcdef is not the experiment's"):
        collect(config, [tmp_path / "a", tmp_path / "b"], tmp_path / "out")


def test_ablation_vs_default_differences_each_seeds_runs_and_refuses_other_pairs(tmp_path, capsys):
    """The frontier aggregate against itself: every per-seed difference is 0 (the same runs); with one seed's
    default shifted, that seed's differences show it; baselines with different run keys are refused."""
    script = load("ablation_vs_default")
    committed = Path(__file__).resolve().parents[1] / "docs" / "results" / "frontier-sentiment-aggregate.json"
    agg = json.loads(committed.read_text())
    ablations, default = tmp_path / "ablations.json", tmp_path / "default.json"
    ablations.write_text(json.dumps(agg))
    agg["per_seed"]["ofs-dpo/sentiment"]["1"]["judge_score"] += 0.5
    default.write_text(json.dumps(agg))
    assert script.main([str(ablations), str(default)]) == 0
    table = capsys.readouterr().out.splitlines()
    judge = next(line for line in table if "| judge score |" in line)
    assert "| -0.1000 |" in judge and "+0.000, -0.500, +0.000, +0.000, +0.000" in judge
    kl = next(line for line in table if "| KL(π‖π_ref), nats |" in line)
    assert "+0.000, +0.000, +0.000, +0.000, +0.000" in kl
    assert any(line.startswith("| ofs-dpo | slow: judge score at KL 5 nats |") for line in table)
    agg["per_seed"]["dpo/sentiment"]["2"]["run_key"] = "other"
    default.write_text(json.dumps(agg))
    with pytest.raises(SystemExit, match="seed 2: the baselines' run keys differ"):
        script.main([str(ablations), str(default)])


def test_a_one_seed_comparison_renders_without_a_t_interval():
    """An aggregate of the seeds finished so far may hold one seed: no t interval to print, the bootstrap's is."""
    decided = load("results_sections").decided
    row = {"mean": 0.01, "lower": None, "upper": None, "n": 1, "mde": None, "page_comparisons": 44, "p_holm": 1.0,
           "crossed_bootstrap": {"lower": -0.02, "upper": 0.03},
           "decision": {"by": "crossed bootstrap", "p_value": 0.4}}
    line = decided(row)
    assert line.startswith("+0.0100, no t interval (1 seed), crossed bootstrap [-0.0200, +0.0300]; decided by the "
                           "crossed bootstrap interval, p 0.4")
    row.update(lower=-0.05, upper=0.07, n=3)
    assert "t interval [-0.0500, +0.0700] over 3 seeds" in decided(row)


def test_the_page_marks_a_reused_runs_time_and_names_each_experiments_machine():
    """A run reused from another experiment (by run key) ran there, maybe on another machine: its time is marked
    and left out of the experiment's total; the machine named is the one that experiment ran on."""
    sections = load("results_sections")
    runs = {"0": {"wall_seconds": 60.0, "reused_from": "experiments-output/frontier-sentiment/runs/dpo/sentiment/"
                                                        "seed-0/result.json"},
            "1": {"wall_seconds": 120.0}, "2": {"wall_seconds": 30.0, "reused_from": "result.json"}}
    assert sections.run_minutes(runs, [0, 1, 2]) == ("seed 0 1.0 min (reused from `frontier-sentiment`, not "
                                                     "counted); seed 1 2.0 min; seed 2 0.5 min (reused, not counted)")
    assert sections.machine("frontier-ablations") == "2-core Intel Xeon"
    assert sections.machine("cofs-chain") == "2-core AMD EPYC"


def test_keep_runs_copies_each_finished_run_once_and_leaves_reused_ones(tmp_path):
    """Finished runs (in-domain and continual layouts) are copied as written, once; a run reused from another
    experiment, a stage's own file and an unfinished run (no result.json) are not; a damaged result names itself."""
    keep = load("keep_runs").keep
    out, kept = tmp_path / "out", tmp_path / "kept"
    runs = {"runs/dpo/sentiment/seed-0/result.json": {"run_key": "a"},
            "runs/multitask/seed-1/result.json": {"run_key": "b"},
            "runs/dpo/sentiment/seed-1/result.json": {"run_key": "c", "reused_from": "x/runs/dpo/seed-1/result.json"},
            "runs/multitask/seed-1/domains/1-sentiment/result.json": {"stage": 1}}
    for name, result in runs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(result))
    (out / "runs" / "cofs" / "seed-0").mkdir(parents=True)  # unfinished: nothing to keep
    assert keep(out, kept) == [kept / "runs/dpo/sentiment/seed-0/result.json",
                               kept / "runs/multitask/seed-1/result.json"]
    assert json.loads((kept / "runs/multitask/seed-1/result.json").read_text()) == {"run_key": "b"}
    (kept / "runs/multitask/seed-1/result.json").write_text('{"run_key": "kept earlier"}')
    assert keep(out, kept) == []  # nothing new; what is kept stays as it is
    assert json.loads((kept / "runs/multitask/seed-1/result.json").read_text()) == {"run_key": "kept earlier"}
    (out / "runs/multitask/seed-2").mkdir()
    (out / "runs/multitask/seed-2/result.json").write_text("{not json")
    from ofsdpo.config import ConfigError
    with pytest.raises(ConfigError, match=r"seed-2/result\.json .*remove .*seed-2 and run it again"):
        keep(out, kept)
    with pytest.raises(SystemExit, match="no runs/ folder"):
        keep(tmp_path / "nothing", kept)
