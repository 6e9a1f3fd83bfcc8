"""The demo pipeline end to end on the tiny model, with a length judge standing in (its samples are noise, which
VADER scores as ties)."""

import dataclasses
import json

from ofsdpo import demo, domains


def test_quick_demo_writes_the_report(tiny_model_dir, tmp_path, monkeypatch):
    for name, domain in list(domains.DOMAINS.items()):
        monkeypatch.setitem(domains.DOMAINS, name, dataclasses.replace(
            domain, judge=lambda prompt, response, meta: float(len(response)), max_new_tokens=6))
    summary = demo.run_demo(tmp_path / "demo", quick=True, model=str(tiny_model_dir), progress=False)
    out = tmp_path / "demo"
    for name in ["report.md", "learning_curves.png", "judge_heatmaps.png", "reward_vs_kl.png", "demo_summary.json"]:
        assert (out / name).exists(), name
    assert set(summary["methods"]) == {"dpo", "ofs-dpo", "cofs-dpo"}
    report = json.loads((out / "cofs-dpo" / "report.json").read_text())
    assert len(report["matrix"]["judge_score"]) == 3 and set(report["cl/forgetting_judge"]) == {"sentiment", "critic"}
    text = (out / "report.md").read_text()
    assert "base model (no training)" in text and "| cofs-dpo |" in text
