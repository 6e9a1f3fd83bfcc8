"""Tables (aggregate.md) and plots of an experiment's aggregate: every figure is mean ± sample std over seeds."""

from __future__ import annotations

from pathlib import Path

from .experiments import ExperimentConfig, fmt

IN_DOMAIN_COLUMNS = (("judge_score", "judge score", True), ("win_rate", "win rate vs ref", False),
                     ("kl", "KL to ref", True), ("heldout_loss", "held-out DPO loss", False),
                     ("heldout_accuracy", "held-out pref. acc.", False), ("online_regret", "online regret", True),
                     ("response_words", "words", False), ("swaps", "swaps", False))


def _variants(config: ExperimentConfig) -> list[str]:
    return [v["name"] for v in config.variants]


def _means(series: list[dict]) -> tuple[list[float], list[float]]:
    return [p["mean"] for p in series], [p["std"] for p in series]


def _scale(config: ExperimentConfig) -> str:
    c = config
    text = (f"pairs from {c.prompts} training prompts x {c.samples} samples per domain (sampled once, seed "
            f"{c.pair_seed}), {c.heldout} held out; {c.steps} steps of {c.batch_size} pairs, lr {c.lr}; "
            f"{c.judge_prompts} judged held-out prompts per domain; max length {c.max_length}")
    if c.kind == "continual":
        text += f"; memory {c.memory} pairs per domain, λ grid {c.lambda_grid}, best-fast check every {c.eval_steps}"
    if c.train:
        text += "; for every variant: " + ", ".join(f"{k}={v}" for k, v in c.train.items())
    return text


def _variant_line(variant: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in variant.items() if k != "name")
    return f"- `{variant['name']}`: {settings}"


def render_markdown(config: ExperimentConfig, cells: dict, plots: list[str]) -> str:
    lines = [f"# {config.name}", "", config.description.strip(), "",
             f"Seeds {', '.join(map(str, config.seeds))}; every cell is mean ± sample standard deviation (n − 1) "
             f"over the seeds. Scale: {_scale(config)}.", "", "Variants:", "",
             *(_variant_line(v) for v in config.variants), ""]
    lines += _in_domain_table(config, cells) if config.kind == "in-domain" else _continual_tables(config, cells)
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


def _in_domain_table(config: ExperimentConfig, cells: dict) -> list[str]:
    head = "| variant | domain | " + " | ".join(title for _, title, _ in IN_DOMAIN_COLUMNS) + " |"
    lines = [head, "|---|---|" + "---|" * len(IN_DOMAIN_COLUMNS)]
    for domain in config.domains:
        base = next((cells[f"{v}/{domain}"]["base_judge_score"] for v in _variants(config)
                     if f"{v}/{domain}" in cells), None)
        lines.append(f"| base model (reference samples) | {domain} | {fmt(base)} |" + " |" * (len(IN_DOMAIN_COLUMNS) - 1))
        for variant in _variants(config):
            cell = cells.get(f"{variant}/{domain}")
            if cell:
                values = " | ".join(fmt(cell.get(key), sign) for key, _, sign in IN_DOMAIN_COLUMNS)
                lines.append(f"| {variant} | {domain} | {values} |")
    return lines + [""]


def _continual_tables(config: ExperimentConfig, cells: dict) -> list[str]:
    names = config.domains
    head = ("| variant | " + " | ".join(f"final {n}" for n in names) + " | avg final judge | avg forgetting (judge) | "
            + " | ".join(f"forgetting {n}" for n in names[:-1]) + " | avg final pref. acc. | avg final KL | λ per stage |")
    lines = [head, "|---|" + "---|" * (2 * len(names) + 4)]
    for variant in _variants(config):
        c = cells.get(variant)
        if not c:
            continue
        lambdas = ", ".join(fmt(s, False, 2) for s in c["lambdas"]) if c.get("lambdas") else "-"
        lines.append(f"| {variant} | " + " | ".join(fmt(c["final_judge"][n]) for n in names) +
                     f" | {fmt(c['avg_final_judge'])} | {fmt(c['avg_forgetting_judge'])} | " +
                     " | ".join(fmt(c["forgetting_judge"].get(n)) for n in names[:-1]) +
                     f" | {fmt(c['avg_final_accuracy'], False)} | {fmt(c['avg_final_kl'])} | {lambdas} |")
    base = next(iter(cells.values()))["base_judge_score"]
    lines += ["", "Base model (reference samples): " + ", ".join(f"{n} {fmt(base.get(n))}" for n in names), ""]
    for variant in _variants(config):
        if variant not in cells:
            continue
        lines += [f"Judge score after each stage, `{variant}` (row: after training on that domain):", "",
                  "| after | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k, row in enumerate(cells[variant]["judge_matrix"]):
            lines.append(f"| {k + 1}-{names[k]} | " + " | ".join(fmt(v) for v in row) + " |")
        lines.append("")
    return lines


# --- plots -----------------------------------------------------------------------------------------------------------
def plot_experiment(out: Path, config: ExperimentConfig, cells: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    if config.kind == "in-domain":
        return [_plot_curves(out, config, cells), _plot_reward_kl(out, config, cells)]
    return [_plot_matrices(out, config, cells), _plot_train_curves(out, config, cells)]


def _band(ax, series: list[dict], label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    mean, std = _means(series)
    steps = range(1, len(mean) + 1)
    line, = ax.plot(steps, mean, label=label)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and steps are whole numbers


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _plot_curves(out: Path, config: ExperimentConfig, cells: dict) -> str:
    import matplotlib.pyplot as plt

    n = len(config.domains)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False)
    for j, domain in enumerate(config.domains):
        for variant in _variants(config):
            cell = cells.get(f"{variant}/{domain}")
            if cell:
                _band(axes[0][j], cell["online_loss_curve"], variant)
                _band(axes[1][j], cell["regret_curve"], variant)
        axes[0][j].set_title(domain)
        axes[0][j].set_ylabel("pre-update DPO loss (served module)")
        axes[1][j].set_ylabel("cumulative online regret")
        axes[1][j].set_xlabel("online round (= optimiser step)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{config.name}: learning and regret curves (mean ± std over seeds)")
    return _save(fig, out / f"{config.name}-curves.png")


def _plot_reward_kl(out: Path, config: ExperimentConfig, cells: dict) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    markers = "osD^v<>p*h"
    for i, variant in enumerate(_variants(config)):
        for j, domain in enumerate(config.domains):
            cell = cells.get(f"{variant}/{domain}")
            if cell:
                ax.errorbar(cell["kl"]["mean"], cell["judge_score"]["mean"], xerr=cell["kl"]["std"],
                            yerr=cell["judge_score"]["std"], fmt=markers[j % len(markers)], color=f"C{i}",
                            label=f"{variant} / {domain}", capsize=3)
    ax.set_xlabel("KL(policy || reference), nats per response")
    ax.set_ylabel("judge score")
    ax.legend(fontsize=7)
    ax.set_title(f"{config.name}: judge score vs KL at the end (mean ± std)")
    return _save(fig, out / f"{config.name}-reward_kl.png")


def _plot_matrices(out: Path, config: ExperimentConfig, cells: dict) -> str:
    import matplotlib.pyplot as plt

    variants = [v for v in _variants(config) if v in cells]
    names = config.domains
    fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants), 3.6), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        matrix = cells[variant]["judge_matrix"]
        ax.imshow([[v["mean"] for v in row] for row in matrix], cmap="viridis", vmin=-1, vmax=1)
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), [f"after {n}" for n in names])
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v['mean']:+.2f}\n±{v['std']:.2f}", ha="center", va="center", fontsize=8,
                        color="w" if v["mean"] < 0.3 else "k")
        ax.set_title(variant)
    fig.suptitle(f"{config.name}: judge score after each stage (mean ± std over seeds)")
    return _save(fig, out / f"{config.name}-judge_matrices.png")


def _plot_train_curves(out: Path, config: ExperimentConfig, cells: dict) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for variant in _variants(config):
        if variant in cells:
            _band(ax, cells[variant]["train_loss_curve"], variant)
    ax.set_xlabel("optimiser step (domains in order: " + " → ".join(config.domains) + ")")
    ax.set_ylabel("training DPO loss (fast module)")
    ax.legend(fontsize=7)
    return _save(fig, out / f"{config.name}-train_curves.png")
