"""`ofsdpo demo`: the report is made of the runs' numbers (checked on made-up reports), and the pipeline end to end
on the tiny model, with a length judge standing in (its samples are noise, which VADER scores as ties)."""

import dataclasses
import json
import re

from PIL import Image

from ofsdpo import domains, provenance
from ofsdpo.commands import demo
from ofsdpo.continual import format_table

NAMES = ["sentiment", "critic", "concise"]
PLOTS = ["learning_curves.png", "judge_heatmaps.png", "reward_vs_kl.png"]


def fake_report(method: str, shift: float) -> dict:
    judge = [[round(-0.4 + 0.3 * i + 0.1 * j - shift, 4) for j in range(3)] for i in range(3)]
    return {"method": method, "domains": NAMES,
            "stages": [{"stage": k + 1, "domain": n, "lambda": None if k == 0 else 0.5} for k, n in enumerate(NAMES)],
            "matrix": {"accuracy": [[0.5 + 0.1 * i - 0.05 * j for j in range(3)] for i in range(3)],
                       "loss": [[0.69 - 0.01 * i] * 3 for i in range(3)], "judge_score": judge,
                       "kl": [[0.1 * i + 0.01 * j for j in range(3)] for i in range(3)]},
            "cl/avg_accuracy": 0.6, "cl/bwt": -0.01, "cl/forgetting": {"sentiment": 0.02, "critic": 0.01},
            "cl/avg_judge_score": sum(judge[-1]) / 3,
            "cl/forgetting_judge": {"sentiment": 0.1 + shift, "critic": -0.05},
            "base_judge_score": {"sentiment": -0.2, "critic": 0.1, "concise": 0.3}, "lambdas": [None, 0.5, 0.25]}


def table_rows(text: str) -> dict[str, list[str]]:
    """The report's summary table: {first cell: other cells}."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in rows)}


def check_report(out, reports: dict, summary: dict) -> None:
    """report.md and demo_summary.json say what the per-method reports say, and nothing else."""
    text = (out / "report.md").read_text()
    assert json.loads((out / "demo_summary.json").read_text()) == json.loads(json.dumps(summary))
    rows = table_rows(text)
    assert list(rows) == ["base model (no training)", *demo.METHODS]  # one row for the base, one per method
    base = reports["dpo"]["base_judge_score"]
    assert rows["base model (no training)"] == [f"{base[n]:+.3f}" for n in NAMES] + [
        f"{sum(base.values()) / 3:+.3f}", ""]
    assert summary["base_judge_score"] == base
    for method, report in reports.items():
        final = report["matrix"]["judge_score"][-1]
        forgetting = ", ".join(f"{k} {v:+.2f}" for k, v in report["cl/forgetting_judge"].items())
        assert rows[method] == [f"{v:+.3f}" for v in final] + [f"{report['cl/avg_judge_score']:+.3f}", forgetting]
        assert summary["methods"][method] == {
            "final_judge_scores": dict(zip(NAMES, final)), "avg_judge_score": report["cl/avg_judge_score"],
            "forgetting_judge": report["cl/forgetting_judge"], "lambdas": report["lambdas"]}
        # each method's stage table, one row per stage
        assert format_table(report).rstrip() in text
    blocks = re.findall(r"```\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) == len(demo.METHODS)
    for block in blocks:
        stage_lines = [line for line in block.splitlines() if re.match(r"\d-\w+ ", line)]
        assert [line.split()[0] for line in stage_lines] == ["1-sentiment", "2-critic", "3-concise"] * 2
    for name in PLOTS:
        assert f"]({name})" in text
        with Image.open(out / name) as image:
            image.verify()
        assert (out / name).stat().st_size > 10_000


def test_write_report_holds_the_runs_numbers(tmp_path):
    reports = {m: fake_report(m, 0.05 * i) for i, m in enumerate(demo.METHODS)}
    for i, method in enumerate(demo.METHODS):
        for k, name in enumerate(NAMES):
            path = tmp_path / method / "domains" / f"{k + 1}-{name}" / "metrics.jsonl"
            path.parent.mkdir(parents=True)
            key = "loss" if method == "dpo" else "fast/loss"
            path.write_text("".join(json.dumps({"step": s, key: 0.7 - 0.01 * s - 0.1 * k}) + "\n" for s in (1, 2)))
    measured = {"seconds": 690.4, "peak_rss_mib": 5734.4, "hardware": "AMD EPYC, 2 logical CPUs visible",
                "commit": "0123abc"}
    summary = demo.write_report(tmp_path, reports, demo.QUICK, "tiny", measured, quick=True)
    check_report(tmp_path, reports, summary)
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# ofsdpo demo (quick)\n")
    assert ("Measured: 11 min 30 s wall-clock, peak RSS 5.6 GiB, on AMD EPYC, 2 logical CPUs visible "
            "(commit 0123abc).") in text
    assert summary["seconds"] == 690.4 and summary["commit"] == "0123abc" and summary["peak_rss_mib"] == 5734.4
    assert f"Settings: {demo.describe(demo.QUICK)}.\n" in text and "Model: `tiny`." in text
    assert "DemoSettings(" not in text and "--selection heldout" in text and "one seed" in text
    assert "SmolLM2-135M-Instruct (the embedded GGUF" in demo.readable_model(demo.embedded_model()[0])
    # the learning curve is each stage's loss, the stages one after another (dpo logs `loss`, ofs-dpo `fast/loss`)
    assert demo.continual_loss_curve(tmp_path / "ofs-dpo", NAMES) == [
        0.7 - 0.01 * s - 0.1 * k for k in range(3) for s in (1, 2)]


def test_a_cofs_run_that_served_the_newest_module_is_said_once(tmp_path):
    """λ = 0 at every stage: COFS-DPO served what sequential OFS-DPO served, so the report says so in one line
    instead of a second identical stage table."""
    ofs = fake_report("ofs-dpo", 0.0)
    cofs = {**ofs, "method": "cofs-dpo", "lambdas": [None, 0.0, 0.0]}
    reports = {"dpo": fake_report("dpo", 0.1), "ofs-dpo": ofs, "cofs-dpo": cofs}
    for method in demo.METHODS:
        for k, name in enumerate(NAMES):
            path = tmp_path / method / "domains" / f"{k + 1}-{name}" / "metrics.jsonl"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"step": 1, "loss": 0.7, "fast/loss": 0.7}) + "\n")
    demo.write_report(tmp_path, reports, demo.QUICK, "tiny", {"seconds": 60.0, "peak_rss_mib": 1.0, "hardware": "x"},
                      quick=True)
    text = (tmp_path / "report.md").read_text()
    assert "cofs-dpo chose λ = 0 at every stage" in text and len(re.findall(r"```\n", text)) == 2 * 2
    assert not demo.same_as_sequential({**reports, "cofs-dpo": {**cofs, "lambdas": [None, 0.5, 0.0]}})


def test_quick_demo_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    for name, domain in list(domains.DOMAINS.items()):
        monkeypatch.setitem(domains.DOMAINS, name, dataclasses.replace(
            domain, judge=lambda prompt, response, meta: float(len(response)), max_new_tokens=6))
    out = tmp_path / "demo"
    summary = demo.run_demo(out, quick=True, model=str(tiny_model_dir), progress=False)
    reports = {m: json.loads((out / m / "report.json").read_text()) for m in demo.METHODS}
    check_report(out, reports, summary)
    # where it was measured: this machine, this checkout, this process's peak memory
    assert summary["hardware"] == provenance.hardware("cpu") and summary["commit"] == provenance.git_commit()
    assert 0 < summary["seconds"] and 0 < summary["peak_rss_mib"] <= provenance.peak_rss_mib()
    for method, report in reports.items():
        assert report["method"] == method and report["domains"] == NAMES
        assert [len(row) for row in report["matrix"]["judge_score"]] == [3, 3, 3]  # stage × domain
        assert set(report["cl/forgetting_judge"]) == {"sentiment", "critic"}
        # the runs share one set of reference samples: the same base scores in every report
        assert report["base_judge_score"] == reports["dpo"]["base_judge_score"]
        steps = demo.continual_loss_curve(out / method, NAMES)
        assert len(steps) == 3 * demo.QUICK.steps and all(isinstance(v, float) for v in steps)
    for name in NAMES:  # the judged pairs every method trained on
        rows = [json.loads(line) for line in (out / "data" / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all(r["score_chosen"] > r["score_rejected"] and r["domain"] == name for r in rows)
