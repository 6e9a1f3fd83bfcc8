"""Every figure of the package: stage × domain heat-maps and learning curves (with a mean ± std band over seeds).

matplotlib is imported only when a figure is drawn, with the Agg backend (files only, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> str:
    """Lay out, write at 100 dpi, close; returns the path."""
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def matrix_image(ax, values: Sequence[Sequence[float]], columns: Sequence[str], rows: Sequence[str], vmin: float,
                 vmax: float):
    """`values` as a viridis image with named columns and rows (a None cell, not scored, left blank); returns the
    image (for a colour bar)."""
    values = [[float("nan") if v is None else v for v in row] for row in values]
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="viridis")
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


def plot_judge_matrices(matrices: dict[str, list[list]], domains: Sequence[str], path: str | Path,
                        height: float = 3.4, title: str | None = None) -> str:
    """One judge-score heat-map per run (stage × domain, scores in [-1, 1]), side by side. A cell is a number, a
    `mean_std` dict over seeds (written as mean ± std) or None (not scored: blank)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4 * len(matrices), height), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        over_seeds = bool(matrix) and isinstance(matrix[0][0], dict)
        means = [[None if v is None else v["mean"] for v in row] for row in matrix] if over_seeds else matrix
        matrix_image(ax, means, domains, [f"after {n}" for n in domains], -1, 1)
        if over_seeds:
            write_cells(ax, means, lambda i, j: f"{matrix[i][j]['mean']:+.2f}\n±{matrix[i][j]['std']:.2f}", 0.3,
                         fontsize=8)
        else:
            write_cells(ax, means, lambda i, j: f"{means[i][j]:+.2f}", 0.3)
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    return save(fig, path)


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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    for name, curve in curves.items():
        if curve and isinstance(curve[0], dict):
            band(ax, curve, name)
        else:
            ax.plot(range(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(**({} if legend_fontsize is None else {"fontsize": legend_fontsize}))
    return save(fig, path)
