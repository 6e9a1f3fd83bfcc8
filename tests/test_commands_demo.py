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
    """The report's summary table (the one headed `| method |`): {first cell: other cells}."""
    block = text[text.index("| method |"):].split("\n\n")[0].splitlines()[2:]
    rows = [line for line in block if line.startswith("| ")]
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
        # each method's stage table, one row per stage (a line instead where it repeats an earlier method's)
        repeats = demo.repeated_methods(reports)
        if method in repeats:
            assert demo.repeat_line(method, repeats[method], report) in text
        else:
            assert format_table(report).rstrip() in text
    blocks = re.findall(r"```\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) == len(demo.METHODS) - len(demo.repeated_methods(reports))
    # no silent duplicate: two identical method tables only where a line says they serve the same module
    assert len(set(blocks)) == len(blocks)
    # the settings as a table, the model by name (no filesystem path), where it was measured at the end
    assert "| setting | value |\n|---|---|\n| model | " in text and "DemoSettings(" not in text
    model_row = next(line for line in text.splitlines() if line.startswith("| model | "))
    assert "/" not in model_row
    assert text.rstrip().splitlines()[-1].startswith("Measured: ")
    for block in blocks:
        stage_lines = [line for line in block.splitlines() if re.match(r"\d-\w+ ", line)]
        assert [line.split()[0] for line in stage_lines] == ["1-sentiment", "2-critic", "3-concise"] * 2
    for name in PLOTS + (["frontier.png"] if "frontier" in summary else []):
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
    summary = demo.write_report(tmp_path, reports, demo.QUICK, "tiny", measured, quick=True, lr=5e-4)
    check_report(tmp_path, reports, summary)
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# ofsdpo demo (quick)\n")
    assert text.rstrip().endswith("Measured: 11 min 30 s wall-clock, peak RSS 5.6 GiB, on AMD EPYC, 2 logical CPUs "
                                  "visible (commit 0123abc).")
    assert summary["seconds"] == 690.4 and summary["commit"] == "0123abc" and summary["peak_rss_mib"] == 5734.4
    assert summary["settings"] == demo.describe(demo.QUICK)
    q = demo.QUICK
    assert "| model | `tiny` |" in text and f"| training | {q.steps} optimiser steps of {q.batch_size} pairs per " \
        "domain, learning rate 0.0005 |" in text
    assert "(`--selection heldout`)" in text and "| seeds | one: an illustration, not a result |" in text
    assert "after every stage the served module's samples on the held-out prompts of every domain are judged" in text
    # judged on the domains seen so far (the full demo's setting): the report says so, and blank cells are explained
    seen = dataclasses.replace(demo.QUICK, score_domains="seen")
    demo.write_report(tmp_path, reports, seen, "tiny", measured, quick=True, lr=5e-4)
    text = (tmp_path / "report.md").read_text()
    assert "held-out prompts of every domain trained so far are judged" in text
    assert "on the domains trained so far (a blank cell: not judged yet) |" in text
    assert demo.describe(seen).startswith(demo.describe(demo.QUICK).split(";")[0])
    assert "judged per domain after every stage (the domains seen so far)" in demo.describe(seen)
    assert "SmolLM2-135M-Instruct (the embedded GGUF" in demo.readable_model(demo.embedded_model()[0])
    assert demo.readable_model(str(tmp_path / "dpo")) == "`dpo` (a local model)"
    # the learning curve is each stage's loss, the stages one after another (dpo logs `loss`, ofs-dpo `fast/loss`)
    assert demo.continual_loss_curve(tmp_path / "ofs-dpo", NAMES) == [
        0.7 - 0.01 * s - 0.1 * k for k in range(3) for s in (1, 2)]


def test_a_cofs_run_that_served_the_newest_module_is_said_once(tmp_path):
    """λ = 0 at every stage: COFS-DPO served what sequential OFS-DPO served, so the report says so in one line
    instead of a second identical stage table."""
    ofs = fake_report("ofs-dpo", 0.0)
    cofs = {**ofs, "method": "cofs-dpo", "lambdas": [None, 0.0, 0.0]}
    reports = {"dpo": fake_report("dpo", 0.1), "dpo-replay": fake_report("dpo-replay", 0.12),
               "multitask": fake_report("multitask", 0.02), "ofs-dpo": ofs, "cofs-dpo": cofs}
    for method in demo.METHODS:
        for k, name in enumerate(NAMES):
            path = tmp_path / method / "domains" / f"{k + 1}-{name}" / "metrics.jsonl"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"step": 1, "loss": 0.7, "fast/loss": 0.7}) + "\n")
    summary = demo.write_report(tmp_path, reports, demo.QUICK, "tiny",
                                {"seconds": 60.0, "peak_rss_mib": 1.0, "hardware": "x"}, quick=True)
    check_report(tmp_path, reports, summary)
    text = (tmp_path / "report.md").read_text()
    assert "cofs-dpo chose λ = 0 at every stage" in text and len(re.findall(r"```\n", text)) == 2 * 4
    # the judge sentence names both as the winners: they are one module
    assert "ofs-dpo and cofs-dpo end with the best average judge score" in text
    # the figures draw the module once, under both names
    assert list(demo.panel_titles(reports).values()) == ["dpo", "dpo-replay", "multitask", "ofs-dpo = cofs-dpo"]
    # the same matrices at other λs (a combination that scores alike) are still one table, without the λ = 0 reason
    mixed = {**cofs, "lambdas": [None, 0.5, 0.0]}
    assert demo.repeated_methods({**reports, "cofs-dpo": mixed}) == {"cofs-dpo": "ofs-dpo"}
    assert demo.repeat_line("cofs-dpo", "ofs-dpo", mixed) == ("cofs-dpo served what ofs-dpo serves at every stage: "
                                                              "its rows equal ofs-dpo's above.")
    # one cell apart: two tables, both drawn
    apart = {**cofs, "matrix": {**cofs["matrix"], "judge_score": [row[:] for row in cofs["matrix"]["judge_score"]]}}
    apart["matrix"]["judge_score"][1][0] += 0.01
    assert demo.repeated_methods({**reports, "cofs-dpo": apart}) == {}
    assert len(demo.panel_titles({**reports, "cofs-dpo": apart})) == 5


def write_losses(out, shared_first_stage: bool) -> None:
    """Made-up training losses: the first stage one training for dpo, dpo-replay and multitask, and another for
    ofs-dpo and cofs-dpo (or every stage each method's own)."""
    for i, method in enumerate(demo.METHODS):
        for k, name in enumerate(NAMES):
            path = out / method / "domains" / f"{k + 1}-{name}" / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            family = 0.005 * ("ofs" in method)
            offset = family if (k == 0 and shared_first_stage) else 0.01 * i
            path.write_text("".join(json.dumps({"step": s, "loss": 0.7 - 0.01 * s - offset,
                                                "fast/loss": 0.7 - 0.01 * s - offset}) + "\n" for s in (1, 2)))


def sentences(text: str) -> str:
    return " ".join(line for line in text.splitlines() if line and not line.startswith(("|", "!", "#", "`")))


def fake_frontier(slow_judge: float) -> dict:
    def curve(*points):
        return [{"step": 0, "kl": 0.0, "judge_score": 0.2}] + [
            {"step": step, "kl": kl, "judge_score": judge} for step, (kl, judge) in zip((4, 8), points)]

    return {"domain": "sentiment", "steps": 8, "checkpoints": [4, 8], "judged_prompts": 8, "batch_size": 4,
            "base_judge_score": 0.2, "curves": {"dpo (lr 0.0005)": curve((1.0, 0.4), (3.0, 0.6)),
                                                "ofs-dpo slow (lr 0.00025)": curve((0.3, 0.3), (1.0, slow_judge))}}


def test_sentences_carry_the_numbers_of_the_run_they_describe(tmp_path):
    """Two made-up runs with different winners: each report names its own winner, margin, most-forgotten domain,
    furthest mover and shared stages."""
    measured = {"seconds": 60.0, "peak_rss_mib": 1.0, "hardware": "x"}
    first = {m: fake_report(m, shift) for m, shift in zip(demo.METHODS, (0.0, 0.07, 0.08, 0.05, 0.1))}
    second = {m: fake_report(m, shift) for m, shift in zip(demo.METHODS, (0.1, 0.06, 0.07, 0.0, 0.04))}
    second["dpo"]["matrix"]["kl"][-1] = [2.0, 3.0, 4.0]
    texts = []
    for k, (reports, shared, slow) in enumerate(((first, True, 0.5), (second, False, 0.7))):
        out = tmp_path / str(k)
        write_losses(out, shared)
        summary = demo.write_report(out, reports, demo.QUICK, "tiny", measured, quick=True,
                                    frontier=fake_frontier(slow))
        check_report(out, reports, summary)
        texts.append(sentences((out / "report.md").read_text()))
    assert "dpo (lr 0.0005) +0.600 at 3.00 nats; ofs-dpo slow (lr 0.00025) +0.500 at 1.00 nats. The best judge " \
        "score is dpo (lr 0.0005)'s, the smallest KL ofs-dpo slow (lr 0.00025)'s" in texts[0]
    assert "The best judge score is ofs-dpo slow (lr 0.00025)'s" in texts[1]
    assert "dpo ends with the best average judge score over the domains (+0.300, 0.050 above the next, ofs-dpo)" \
        in texts[0]
    assert "ofs-dpo ends with the best average judge score over the domains (+0.300, 0.040 above the next, " \
        "cofs-dpo)" in texts[1]
    # forgetting: sentiment 0.1 + shift, the largest shift forgets most
    assert "forgotten most is sentiment: cofs-dpo lost 0.200" in texts[0]
    assert "forgotten most is sentiment: dpo lost 0.200" in texts[1]
    assert "Every method's final served module lies as far from the base: mean exact KL 0.21 nats" in texts[0]
    assert "dpo moved furthest from the base: mean exact KL 3.00 nats per judged sample over the 3 domains after " \
        "the last stage (dpo-replay 0.21, multitask 0.21, ofs-dpo 0.21, cofs-dpo 0.21)" in texts[1]
    assert "dpo, dpo-replay and multitask share stage 1 (sentiment): one training; ofs-dpo and cofs-dpo share stage " \
        "1 (sentiment): one training" in texts[0]
    assert "No two methods share a stage" in texts[1]


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
        stages = 1 + 2 + 3 if method == "multitask" else 3  # multitask's stage k trains on k domains' pairs
        assert len(steps) == stages * demo.QUICK.steps and all(isinstance(v, float) for v in steps)
    # one training for the first stage of dpo, dpo-replay and multitask, another for ofs-dpo's and cofs-dpo's
    curves = {m: demo.continual_stage_curves(out / m, NAMES) for m in demo.METHODS}
    assert demo.shared_stages(curves)[0] == [["dpo", "dpo-replay", "multitask"], ["ofs-dpo", "cofs-dpo"]]
    # the frontier: dpo, ofs-dpo's two modules and dpo at the slow lr, from the base (step 0, KL 0) through every
    # checkpoint, every KL an exact KL (>= 0), drawn in the report's first screen with its sentence
    frontier = json.loads((out / "demo_summary.json").read_text())["frontier"]
    assert list(frontier["curves"]) == ["dpo (lr 0.0005)", "ofs-dpo fast (lr 0.0005)", "ofs-dpo slow (lr 0.00025)",
                                        "dpo at the slow lr (0.00025)"]
    for points in frontier["curves"].values():
        assert [p["step"] for p in points] == [0, *demo.QUICK.frontier_checkpoints]
        assert points[0] == {"step": 0, "kl": 0.0, "judge_score": frontier["base_judge_score"]}
        assert all(p["kl"] >= 0 for p in points) and any(p["kl"] > 0 for p in points[1:])
    text = (out / "report.md").read_text()
    assert text.index("![reward–KL frontier](frontier.png)") < text.index("## Continual")
    assert demo.frontier_sentence(frontier) in text
    for name in NAMES:  # the judged pairs every method trained on
        rows = [json.loads(line) for line in (out / "data" / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all(r["score_chosen"] > r["score_rejected"] and r["domain"] == name for r in rows)
