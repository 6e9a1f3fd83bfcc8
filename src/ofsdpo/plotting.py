"""Every figure of the package: stage × domain heat-maps and learning curves (with a mean ± std band over seeds).

matplotlib is imported only when a figure is drawn, with the Agg backend (files only, no display needed). Every line
and marker takes its colour from the Okabe–Ito palette (distinct under the common colour-vision deficiencies), set
as matplotlib's colour cycle, so `color="C2"` anywhere in the package means its third colour.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable, Sequence


# Okabe & Ito, "Color Universal Design" (2008), ordered so the first colours differ most; its yellow (#F0E442) is
# last: it is hard to see on white
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
LINE_STYLES = ("-", "--", ":", "-.")  # a second cue where two lines lie on top of each other
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
PANELS_PER_ROW = 3  # heat-maps side by side


def pyplot():
    """matplotlib.pyplot on the Agg backend, lines in the Okabe–Ito colours, text legible at 100 dpi."""
    import matplotlib
    from cycler import cycler

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"axes.prop_cycle": cycler(color=OKABE_ITO), "font.size": 10, "axes.titlesize": 10,
                         "axes.labelsize": 10, "legend.fontsize": 9})
    return plt


def save(fig, path: str | Path) -> str:
    """Lay out (unless the figure has its own layout engine), write at 100 dpi, close; returns the path."""
    plt = pyplot()
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def matrix_image(ax, values: Sequence[Sequence[float]], columns: Sequence[str], rows: Sequence[str], vmin: float,
                 vmax: float):
    """`values` as a viridis image with named columns and rows (a None cell, not scored, left blank); returns the
    image (for a colour bar)."""
    values = [[float("nan") if v is None else v for v in row] for row in values]
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")  # cells fill the panel
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    return image


def write_cells(ax, values: Sequence[Sequence[float]], text: Callable[[int, int], str], dark_below: float,
                fontsize: float | None = None) -> None:
    """`text(i, j)` on every cell but a None one, white where the cell's value is below `dark_below` (a dark
    colour), else black."""
    extra = {} if fontsize is None else {"fontsize": fontsize}
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value is None:
                continue
            ax.text(j, i, text(i, j), ha="center", va="center", **extra, color="w" if value < dark_below else "k")


def plot_heatmap(report: dict, path: Path) -> None:
    """A continual run's held-out preference accuracy, after each stage (rows) on each domain (columns)."""
    plt = pyplot()
    acc = report["matrix"]["accuracy"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(report["domains"]), 1.2 + 0.8 * len(acc)))
    image = matrix_image(ax, acc, report["domains"], [f"{s['stage']}-{s['domain']}" for s in report["stages"]], 0, 1)
    ax.set_xlabel("evaluated on domain")
    ax.set_ylabel("after stage")
    write_cells(ax, acc, lambda i, j: f"{acc[i][j]:.2f}", 0.6)
    ax.set_title(f"{report['method']}: held-out preference accuracy")
    fig.colorbar(image, ax=ax)
    save(fig, path)


BASE_ROW = "base (untrained)"


def draw_judge_matrices(matrices: dict[str, list[list]], domains: Sequence[str], base: dict | None = None,
                        height: float | None = None, title: str | None = None):
    """One judge-score heat-map per run (stage × domain, scores in [-1, 1]) side by side, sharing one colour bar;
    with `base` ({domain: score}, the untrained base's) a first row that every stage's row reads against. A cell is
    a number, a `mean_std` dict over seeds (written as mean ± std) or None (not scored: blank). Returns the figure
    (open: `save` writes it)."""
    plt = pyplot()
    rows = len(next(iter(matrices.values()), [])) + (base is not None)
    height = height or 1.5 + 0.55 * rows
    # at most PANELS_PER_ROW side by side: wider, the figure shrinks on the page until its numbers are unreadable
    across = min(len(matrices), PANELS_PER_ROW)
    down = -(-len(matrices) // across)
    fig, grid = plt.subplots(down, across, figsize=(0.6 + 3.1 * across, height * down), squeeze=False,
                             layout="constrained")
    axes = [ax for row in grid for ax in row]
    for spare in axes[len(matrices):]:
        spare.set_axis_off()
    labels = ([BASE_ROW] if base is not None else []) + [f"after {n}" for n in domains]
    image = None
    for k, (ax, (name, matrix)) in enumerate(zip(axes, matrices.items())):
        matrix = ([[base.get(d) for d in domains]] if base is not None else []) + list(matrix)
        over_seeds = any(isinstance(v, dict) for row in matrix for v in row)
        means = [[v["mean"] if isinstance(v, dict) else v for v in row] for row in matrix]
        image = matrix_image(ax, means, domains, labels if k % across == 0 else [""] * len(labels), -1, 1)
        if over_seeds:
            write_cells(ax, means, lambda i, j: f"{matrix[i][j]['mean']:+.2f}\n±{matrix[i][j]['std']:.2f}", 0.3,
                        fontsize=8)
        else:
            write_cells(ax, means, lambda i, j: f"{means[i][j]:+.2f}", 0.3)
        if base is not None:  # the base row is a reference, not a stage: set apart by a white rule
            ax.axhline(0.5, color="w", linewidth=3)
        ax.set_xlabel("judged on (held-out prompts)")
        ax.set_title(name)
    fig.colorbar(image, ax=axes, shrink=0.9, label="judge score (−1 … 1)")
    if title:
        fig.suptitle(title)
    return fig


def plot_judge_matrices(matrices: dict[str, list[list]], domains: Sequence[str], path: str | Path,
                        height: float | None = None, title: str | None = None, base: dict | None = None) -> str:
    """`draw_judge_matrices` written to `path`; returns the path."""
    return save(draw_judge_matrices(matrices, domains, base, height, title), path)


def band(ax, series: list[dict], label: str) -> None:
    """A curve of `mean_std` points: the mean as a line, ± one std as a band of the same colour."""
    from matplotlib.ticker import MaxNLocator

    mean, std = [p["mean"] for p in series], [p["std"] for p in series]
    steps = range(1, len(mean) + 1)
    line, = ax.plot(steps, mean, label=label)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and steps are whole numbers


def plot_curves(curves: dict[str, list], path: str | Path, xlabel: str, ylabel: str,
                figsize: tuple[float, float] = (7, 3.5), legend_fontsize: float | None = None) -> str:
    """One line per name against the step (1, 2, …); a curve of `mean_std` points is drawn as a band."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    for i, (name, curve) in enumerate(curves.items()):
        if curve and isinstance(curve[0], dict):
            band(ax, curve, name)
        else:
            ax.plot(range(1, len(curve) + 1), curve, linestyle=LINE_STYLES[i % len(LINE_STYLES)], label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(**({} if legend_fontsize is None else {"fontsize": legend_fontsize}))
    return save(fig, path)


def shared_stages(curves: dict[str, list[list]]) -> list[list[list[str]]]:
    """For each stage, the groups of two or more runs whose curves are identical up to and including it (the same
    training: `reuse.SharedWork` ran it once for all of them). `curves`: {run: [stage 1's values, stage 2's, …]}."""
    stages = max((len(c) for c in curves.values()), default=0)
    shared = []
    for k in range(stages):
        groups: dict[tuple, list[str]] = {}
        for name, curve in curves.items():
            if len(curve) > k:
                groups.setdefault(tuple(tuple(stage) for stage in curve[:k + 1]), []).append(name)
        shared.append([group for group in groups.values() if len(group) > 1])
    return shared


def stage_starts(curves: dict[str, list[list]]) -> tuple[list[int], list[int]]:
    """(steps before each stage, each stage's length): a stage spans the longest of the runs' (replay adds steps)."""
    stages = max((len(c) for c in curves.values()), default=0)
    lengths = [max(len(c[k]) for c in curves.values() if len(c) > k) for k in range(stages)]
    return [sum(lengths[:k]) for k in range(stages)], lengths


def merge_identical(curves: dict[str, list[list]]) -> dict[str, list[list]]:
    """Runs whose curves are identical at every stage, drawn once under their joined names ("b = c")."""
    groups: dict[tuple, list[str]] = {}
    for name, stages in curves.items():
        groups.setdefault(tuple(tuple(stage) for stage in stages), []).append(name)
    return {" = ".join(names): curves[names[0]] for names in groups.values()}


def draw_stage_curves(curves: dict[str, list[list]], stage_names: Sequence[str], ylabel: str,
                      xlabel: str = "optimiser step"):
    """Continual runs' per-step curves on integer steps, stage after stage: a line at each domain boundary, each
    stage's name over its span, each run's line broken at the boundaries (a stage starts a new training), runs
    identical at every stage drawn once under their joined names, and a shaded span where runs share a stage's
    training, named in a caption under the axes. Every run's stage k starts at the same step. Returns the open
    figure."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    curves = merge_identical(curves)
    starts, lengths = stage_starts(curves)
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    for i, (name, stages) in enumerate(curves.items()):
        for k, stage in enumerate(stages):
            ax.plot([starts[k] + s + 1 for s in range(len(stage))], stage, color=f"C{i}", markersize=4,
                    linestyle=LINE_STYLES[i % len(LINE_STYLES)], marker=MARKERS[i % len(MARKERS)], gid=name,
                    label=name if k == 0 else "_nolegend_")
    across = ax.get_xaxis_transform()  # x in steps, y in axes fractions
    for k, name in enumerate(stage_names[:len(starts)]):
        if k:
            ax.axvline(starts[k] + 0.5, color="0.3", linewidth=1.2, gid="stage boundary")
        ax.text(starts[k] + lengths[k] / 2 + 0.5, 1.01, f"{k + 1}. {name}", transform=across, ha="center",
                va="bottom")
    shared = []
    for k, groups in enumerate(shared_stages(curves)):
        if groups:
            ax.axvspan(starts[k] + 0.5, starts[k] + lengths[k] + 0.5, color="0.5", alpha=0.12, linewidth=0,
                       gid="shared stage")
            shared.append(f"stage {k + 1} ({stage_names[k]}): " + ", ".join(" = ".join(g) for g in groups))
    if shared:  # under the axes, where a long list of names cannot cover the curves
        fig.supxlabel("\n".join(textwrap.wrap("shaded, one training shared by runs — " + "; ".join(shared), 110)),
                      fontsize=8, color="0.25", gid="shared stages")
    ax.set_xlim(0.5, sum(lengths) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return fig


# each curve's step labels on another side of its points: curves that pass close by keep their labels apart
LABEL_OFFSETS = ((4, 3), (4, -10), (-12, 3), (-12, -10))


def draw_frontier(curves: dict[str, list[dict]], title: str | None = None):
    """Judge score against exact KL, one line per module through its checkpoints in order (points `{"step", "kl",
    "judge_score"}`), each point labelled with its optimiser step. Returns the open figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, points) in enumerate(curves.items()):
        kl, judge = [p["kl"] for p in points], [p["judge_score"] for p in points]
        ax.plot(kl, judge, color=f"C{i}", linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                marker=MARKERS[i % len(MARKERS)], label=name)
        for point in points:
            if point["step"] == 0 and i > 0:
                continue  # every curve starts at the base: its "0" once
            ax.annotate(str(point["step"]), (point["kl"], point["judge_score"]), textcoords="offset points",
                        xytext=LABEL_OFFSETS[i % len(LABEL_OFFSETS)], fontsize=8, color=f"C{i}")
    ax.set_xlim(left=0)
    ax.set_xlabel("exact KL(π ‖ π_ref), nats per judged sample")
    ax.set_ylabel("judge score, held-out prompts (−1 … 1)")
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    return fig
