"""Rewrite the generated blocks of README.md and docs/ from what was measured, so no figure there goes stale:

    python scripts/generated_blocks.py          # rewrite them
    python scripts/generated_blocks.py --check  # exit 1, naming the files, if any is not what it would write now
    python scripts/generated_blocks.py --demo demo-output  # take a finished `make demo`'s summary, then rewrite

A block is the text between `<!-- generated: NAME -->` and `<!-- /generated -->`; NAME picks the generator.
`results-summary` reads the committed aggregates of docs/results/ (in the order of docs/results.md) and states,
under the page's verdict rule (the wider of the t interval and the crossed bootstrap; Holm over every comparison
of the page), which comparisons hold. `demo-time` reads the committed demo summary (docs/results/demo-summary.json):
its wall time, peak memory, machine and commit; `demo-measured` adds its one seed's table. docs/index.md, the
site's home page, is README.md with its links made
relative to docs/. tests/test_docs.py fails when a block or the home page is not current.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "scripts")]
from results_sections import PAGE, RESULTS, comparisons, page_adjusted  # noqa: E402  (the page and its Holm)

BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- /generated -->)", re.DOTALL)


def _aggregates(results: Path) -> list[dict]:
    return [json.loads((results / f"{name}-aggregate.json").read_text()) for name in PAGE
            if (results / f"{name}-aggregate.json").is_file()]


def results_summary(results: Path = RESULTS) -> str:
    from ofsdpo.commands.experiment_report import verdict

    aggregates = _aggregates(results)
    count = page_adjusted(aggregates)
    lines = ["| experiment | seeds run | comparisons | what holds under the page's rule (95 %, Holm over "
             f"{count} comparisons) |", "|---|---|---|---|"]
    for agg in aggregates:
        held = [r for r in comparisons(agg) if verdict(r) in ("better", "worse")]
        seeds = sorted({int(s) for runs in agg["per_seed"].values() for s in runs})
        planned = agg["seeds"]
        ran = ", ".join(map(str, seeds)) + ("" if seeds == planned else f" of {', '.join(map(str, planned))}")
        what = "; ".join(_call(r, f"{verdict(r)} than") for r in held) or "nothing: no difference shown"
        lines.append(f"| {agg['experiment']} | {ran} | {len(comparisons(agg))} | {what} |")
    return "\n".join(lines) + "\n"


def _call(row: dict, how: str) -> str:
    title = re.sub(r" \([^)]*\)", "", row["title"])  # "…loss (lower is better), sentiment": "…loss, sentiment"
    return (f"{row['variant']} {how} {row['baseline']} on {title} ({row['mean']:+.3f}, "
            f"[{row['decision']['lower']:+.3f}, {row['decision']['upper']:+.3f}])")


def _demo(results: Path) -> dict | None:
    path = results / "demo-summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def demo_time(results: Path = RESULTS) -> str:
    """`make demo`'s last committed measurement (docs/results/demo-summary.json, a finished demo's
    demo_summary.json taken by `--demo DIR`): wall time, peak memory, machine and commit, on one line."""
    demo = _demo(results)
    if demo is None:
        return "`make demo` has no committed measurement yet (`python scripts/generated_blocks.py --demo DIR`).\n"
    from ofsdpo.commands.demo import wall_clock

    commit = (demo.get("commit") or "unknown")[:7] + (" with uncommitted changes" if "dirty" in str(demo["commit"])
                                                      else "")
    kind = "`make demo-quick`" if demo.get("quick") else "`make demo`"
    return (f"{kind} took **{wall_clock(demo['seconds'])}** wall-clock, peak RSS {demo['peak_rss_mib'] / 1024:.1f} "
            f"GiB, on {demo['hardware']} (commit {commit}, torch {demo['versions']['torch']}).\n")


def demo_measured(results: Path = RESULTS) -> str:
    """`demo-time`, then what its one seed showed: each method's average judge score and forgetting."""
    demo = _demo(results)
    if demo is None:
        return demo_time(results)
    lines = [demo_time(results), f"Its one seed ({demo['settings']}), after the last stage (an illustration, not a "
             "result: the measured comparisons are in [results](results.md)):", "",
             "| method | average judge score | forgetting (judge) |", "|---|---|---|",
             f"| base model | {sum(demo['base_judge_score'].values()) / len(demo['base_judge_score']):+.3f} | |"]
    for method, row in demo["methods"].items():
        forgetting = ", ".join(f"{k} {v:+.2f}" for k, v in row["forgetting_judge"].items())
        lines.append(f"| {method} | {row['avg_judge_score']:+.3f} | {forgetting} |")
    return "\n".join(lines) + "\n"


GENERATORS = {"results-summary": results_summary, "demo-time": demo_time, "demo-measured": demo_measured}


def render(text: str, results: Path = RESULTS) -> str:
    """`text` with every generated block rewritten."""
    def block(match: re.Match) -> str:
        name = match.group(2)
        if name not in GENERATORS:
            raise SystemExit(f"unknown generated block '{name}' (known: {', '.join(GENERATORS)})")
        return match.group(1) + GENERATORS[name](results) + match.group(4)

    return BLOCK.sub(block, text)


def home_page(readme: str) -> str:
    """docs/index.md: the README, its links relative to docs/."""
    return readme.replace("](docs/", "](").replace("[`docs/`](docs/)", "`docs/`")


def outputs(root: Path = ROOT, results: Path = RESULTS) -> dict[Path, str]:
    """What every generated file should hold now."""
    readme = render((root / "README.md").read_text(), results)
    out = {root / "README.md": readme, root / "docs" / "index.md": home_page(readme)}
    for page in sorted((root / "docs").glob("*.md")):
        if page.name != "index.md" and "<!-- generated:" in page.read_text():
            out[page] = render(page.read_text(), results)
    return out


def take_demo(demo_dir: Path, results: Path = RESULTS) -> None:
    """Commit-ready copy of a finished demo's summary: docs/results/demo-summary.json."""
    summary = json.loads((demo_dir / "demo_summary.json").read_text())
    for key in ("seconds", "peak_rss_mib", "hardware", "commit", "versions", "settings"):
        if key not in summary:
            raise SystemExit(f"{demo_dir / 'demo_summary.json'} has no '{key}': rerun the demo with this version")
    (results / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    if "--demo" in sys.argv[1:]:
        take_demo(Path(sys.argv[sys.argv.index("--demo") + 1]))
    stale = [path for path, text in outputs().items() if not path.is_file() or path.read_text() != text]
    if "--check" in sys.argv[1:]:
        if stale:
            raise SystemExit("not current (run python scripts/generated_blocks.py): "
                             + ", ".join(str(p.relative_to(ROOT)) for p in stale))
    else:
        for path, text in outputs().items():
            path.write_text(text)
        print("\n".join(str(p.relative_to(ROOT)) for p in stale) or "everything was current")
