"""The front door stays current: README's and docs/' generated blocks and the site's home page are what
scripts/generated_blocks.py writes from the committed aggregates now, and the README is a front door."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

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


def test_the_demo_blocks_say_what_the_committed_demo_summary_measured(tmp_path):
    """`--demo DIR` takes a finished demo's summary; the blocks quote its time, memory, machine and commit, and a
    changed time changes them (so a README figure can't drift from the measurement)."""
    blocks = load_blocks()
    assert "no committed measurement" in blocks.demo_time(tmp_path)
    demo_dir = tmp_path / "demo-output"
    demo_dir.mkdir()
    summary = {"seconds": 905.2, "peak_rss_mib": 5120.0, "hardware": "AMD EPYC, 2 logical CPUs visible",
               "commit": "0123abcdef", "versions": {"torch": "2.13.0+cpu"}, "settings": "one seed", "quick": False,
               "base_judge_score": {"a": 0.1, "b": 0.3}, "methods": {"dpo": {"avg_judge_score": 0.25,
                                                                             "forgetting_judge": {"a": 0.05}}}}
    (demo_dir / "demo_summary.json").write_text(json.dumps(summary))
    blocks.take_demo(demo_dir, tmp_path)
    line = blocks.demo_time(tmp_path)
    assert line == ("`make demo` took **15 min 5 s** wall-clock, peak RSS 5.0 GiB, on AMD EPYC, 2 logical CPUs visible "
                    "(commit 0123abc, torch 2.13.0+cpu).\n")
    table = blocks.demo_measured(tmp_path)
    assert table.startswith(line) and "| base model | +0.200 | |" in table and "| dpo | +0.250 | a +0.05 |" in table
    summary["seconds"] = 1205.0
    (tmp_path / "demo-summary.json").write_text(json.dumps(summary))
    assert "**20 min 5 s**" in blocks.demo_time(tmp_path)
    del summary["commit"]
    (demo_dir / "demo_summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="has no 'commit'"):
        blocks.take_demo(demo_dir, tmp_path)


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


def test_the_page_refuses_bootstraps_too_coarse_for_its_holm(tmp_path):
    """A bootstrap p is at least 1/resamples: with 2000 resamples (aggregates before the fix) Holm over the page's
    comparisons could never decide a bootstrap-decided call. The page is not built then, and the error names the
    comparisons and the rebuild; the committed aggregates (200000 resamples) decide up to 500 comparisons."""
    blocks = load_blocks()
    results = tmp_path / "results"
    results.mkdir()
    agg = json.loads((ROOT / "docs" / "results" / "chase-ablation-aggregate.json").read_text())
    assert {row["crossed_bootstrap"]["resamples"] for row in agg["paired"]} == {200_000}
    (results / "chase-ablation-aggregate.json").write_text(json.dumps(agg))
    assert "proximal-beta-1 worse than alpha-0 on judge score (-0.274," in blocks.results_summary(results)
    for row in agg["paired"]:
        del row["crossed_bootstrap"]["resamples"]  # an aggregate written at the old 2000
    (results / "chase-ablation-aggregate.json").write_text(json.dumps(agg))
    with pytest.raises(SystemExit, match=r"proximal-beta-1 − alpha-0.*too few resamples.*Holm over 18.*reaggregate"):
        blocks.results_summary(results)


def test_the_gap_to_multitask_is_adjusted_with_the_page(tmp_path):
    """A continual aggregate's gap to `multitask` is a family of its own in the aggregate, but on the page its rows
    join the headline's in one Holm: the count says so, and a gap row's page p is the Holm of all rows together."""
    blocks = load_blocks()
    from results_sections import comparisons, page_adjusted

    from ofsdpo.stats import holm

    results = tmp_path / "results"
    results.mkdir()
    agg = json.loads((ROOT / "docs" / "results" / "continual-sentiment-critic-baselines-aggregate.json").read_text())
    assert len(agg["paired"]) == 50 and len(agg["multitask_gap"]) == 36
    (results / "continual-sentiment-critic-baselines-aggregate.json").write_text(json.dumps(agg))
    assert "Holm over 86 comparisons" in blocks.results_summary(results)
    rows = comparisons(agg)
    raw = [row["decision"]["p_value"] for row in rows]
    assert page_adjusted([agg]) == 86
    assert [row["p_holm"] for row in rows] == pytest.approx(holm(raw))
    gap = next(r for r in agg["multitask_gap"] if r["variant"] == "dpo" and r["metric"] == "loss/sentiment")
    assert "dpo worse than multitask on final report DPO loss, sentiment (+0.058," in blocks.results_summary(results)
    assert gap["p_holm"] < 0.05


def test_a_revisiting_stream_puts_relearning_on_the_page(tmp_path):
    """A revisiting stream's aggregate carries relearning against retraining: its section shows that table between
    the headline and every variant's, and the page's Holm counts its rows."""
    load_blocks()  # puts scripts/ on the path
    from results_sections import comparisons, continual_section, page_adjusted
    from test_commands_experiment import fake_continual

    from ofsdpo.commands.experiment_report import write_aggregate
    from ofsdpo.config import ExperimentConfig

    domains = ["sentiment", "critic", "sentiment.2"]
    config = ExperimentConfig(name="revisit", kind="continual", domains=domains,
                              variants=[{"name": "dpo", "method": "dpo"}, {"name": "cofs", "method": "cofs-dpo"}])
    runs = {s: {**fake_continual(s), "domains": domains, "wall_seconds": 60.0,
                "judge_matrix": [[0.7, None, None], [0.2, 0.4, None], [0.6, 0.1, 0.6 + 0.05 * s]],
                "loss_matrix": [[0.6, None, None], [0.66, 0.55, None], [0.65, 0.58, 0.62]]} for s in (0, 1, 2)}
    write_aggregate(tmp_path / "out", config, {"dpo": runs, "cofs": runs})
    results = tmp_path / "results"
    results.mkdir()
    for suffix in ("json", "md"):
        (results / f"revisit-aggregate.{suffix}").write_text((tmp_path / "out" / f"aggregate.{suffix}").read_text())
    agg = json.loads((results / "revisit-aggregate.json").read_text())
    assert len(agg["revisit"]) == 4 and page_adjusted([agg]) == len(comparisons(agg)) == len(agg["paired"]) + 4
    text = continual_section(results / "revisit-aggregate.json", agg)
    headline, relearning = text.index("### The headline"), text.index("### Relearning the revisited domain")
    every = text.index("### Every variant")
    assert headline < relearning < every and "| cofs − dpo |" in text[headline:relearning]
    assert text.index("| cofs − first visit | sentiment.2 | judge score of the revisited domain |") in range(
        relearning, every)
    assert "| cofs | " in text[every:] and "first visit" not in text[every:text.index("### Wall time")]


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


# No stale figure (issue 32): a measured number in the running text says which commit and machine it came from, on
# its own line, or points at docs/changelog.md, where measurements of superseded code live with theirs. A number
# followed by a unit of time, memory, throughput, a ratio or a percentage is taken for a measurement unless a bound
# comes just before it ("≤ 2.0 ×", "up to 256 MiB", "more than 10 %": limits and targets) or the line carries
# NOT_MEASURED (an option's value, an input's size, arithmetic), the one allowed marker.
FIGURE = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:\s*[-–]\s*\d+(?:[.,]\d+)*)?\s*"
                    r"(?:tokens/s|pairs/s|s/step|s/pair|ms|min|GiB|MiB|KiB|GB|MB|s|×|x"
                    r"|%(?!\s*(?:t interval|confidence|interval)))(?![\w/])")
BOUND = re.compile(r"(?:≤|≥|<|>|up to|at most|than)\s*$")
STAMP = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b|changelog\.md")
NOT_MEASURED = "<!-- figure: not measured -->"
FIGURE_EXEMPT = {"results.md", "SPEC.md", "index.md", "changelog.md"}  # generated, or the paper, or the dated log


def _measured(line: str) -> bool:
    text = re.sub(r"`[^`]*`", "", line)  # option values and code in backticks are not measurements
    return any(not BOUND.search(text[:m.start()]) for m in FIGURE.finditer(text))


def unstamped_figures(markdown: str) -> list[str]:
    """The lines of `markdown` outside code fences and generated blocks whose figure has neither a commit nor a
    changelog link on the line; a table row may have its stamp in the table's header row."""
    found, fence, generated, header = [], False, False, ""
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        generated = (generated or line.startswith("<!-- generated:")) and not line.startswith("<!-- /generated")
        header = (header or line) if line.startswith("|") else ""
        stamped = STAMP.search(line) or (line.startswith("|") and STAMP.search(header))
        if not (fence or generated or stamped or NOT_MEASURED in line) and _measured(line):
            found.append(line)
    return found


def test_every_measured_figure_names_its_commit_or_the_changelog():
    pages = [ROOT / "README.md"] + [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in FIGURE_EXEMPT]
    stale = {str(p.relative_to(ROOT)): lines for p in pages if (lines := unstamped_figures(p.read_text()))}
    assert not stale, ("a measured figure needs its commit and machine on its line (or a link to docs/changelog.md, "
                       f"where superseded measurements go): {stale}")


def test_the_figure_check_catches_an_undated_time_and_passes_dated_ones():
    assert unstamped_figures("Run it: the demo takes 11 min 30 s.") == ["Run it: the demo takes 11 min 30 s."]
    assert unstamped_figures("| what | time |\n|---|---|\n| demo | 11 min 30 s |") == ["| demo | 11 min 30 s |"]
    assert unstamped_figures("ofs-dpo at 1.94 × dpo's time, peak RSS 3348 MiB") != []
    passes = ["the demo takes 11 min 30 s (commit 65bc49e, 2-core AMD EPYC)",
              "the demo took 11 min 30 s before ([changelog](changelog.md#2026-12-01))",
              "| step (commit e83e064, 2-core AMD EPYC) | s |\n|---|---|\n| dpo | 3.4 s |",
              "a GGUF file up to 256 MiB; targets ≤ 2.0 × dpo; when more than 10 % are skipped; a 95 % t interval",
              "`--max-new-tokens 64 --lr 5e-4`, 5 seeds, 128 pairs, 4N FLOPs",
              "```text\nreal 11 min 30 s\n```", "<!-- generated: x -->\n11 min 30 s\n<!-- /generated -->",
              f"≈ 10 % of dpo's FLOPs {NOT_MEASURED}"]
    assert [unstamped_figures(text) for text in passes] == [[]] * len(passes)
