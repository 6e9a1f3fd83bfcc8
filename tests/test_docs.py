"""The front door stays current: README's and docs/' generated blocks and the site's home page are what
scripts/generated_blocks.py writes from the committed aggregates now, and the README is a front door."""

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_blocks():
    spec = importlib.util.spec_from_file_location("generated_blocks", ROOT / "scripts" / "generated_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_and_home_page_are_current():
    blocks = load_blocks()
    stale = [str(path.relative_to(ROOT)) for path, text in blocks.outputs().items() if path.read_text() != text]
    assert not stale, f"run python scripts/generated_blocks.py: {stale} are not current"
    assert "<!-- generated: results-summary -->" in (ROOT / "README.md").read_text()


def test_a_changed_aggregate_makes_the_block_stale(tmp_path):
    """The check can fail: a number changed in an aggregate (here a comparison's mean) changes the block."""
    blocks = load_blocks()
    results = tmp_path / "results"
    shutil.copytree(ROOT / "docs" / "results", results, ignore=shutil.ignore_patterns("*.png", "pairs"))
    path = results / "chase-ablation-aggregate.json"
    agg = json.loads(path.read_text())
    row = next(r for r in agg["paired"] if r["variant"] == "proximal-beta-1" and r["metric"] == "judge_score")
    before = blocks.results_summary(results)
    row["mean"] = -0.5
    path.write_text(json.dumps(agg))
    after = blocks.results_summary(results)
    assert "(-0.274," in before and "(-0.500," in after and before.replace("-0.274", "-0.500") == after


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
