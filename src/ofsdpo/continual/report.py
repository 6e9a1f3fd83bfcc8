"""A continual run's report: the stage x domain matrices summed up (average final accuracy and loss, forgetting,
backward transfer, the judge's numbers), the per-unit values a bootstrap resamples, the text table, and the files a
finished run leaves (report.json, report.txt, heatmap.png, the served adapter)."""

from __future__ import annotations

from pathlib import Path

from ..config import ContinualConfig
from ..files import write_atomic, write_json
from ..modules import write_adapter
from ..plotting import plot_heatmap
from .policies import describe_search


def build_report(config: ContinualConfig, names: list[str], stages: list[dict], matrix: dict,
                 reference_scores: dict[str, list[float]]) -> dict:
    """report.json's content: `matrix` ({metric: stage x domain rows}, per-unit scores under "units") summed up;
    `reference_scores` ({domain: the base's judged sample scores}) gives the base's judge score."""
    units = matrix.get("units")
    matrix = {key: rows for key, rows in matrix.items() if key != "units"}
    acc, loss = matrix["accuracy"], matrix["loss"]
    last = len(names) - 1
    forgetting = {names[j]: max(acc[k][j] for k in range(j, last)) - acc[last][j] for j in range(last)}
    forgetting_loss = {names[j]: loss[last][j] - min(loss[k][j] for k in range(j, last)) for j in range(last)}
    extra = {}
    if "judge_score" in matrix:
        judge = matrix["judge_score"]
        judged = [j for j in range(len(names)) if judge[last][j] is not None]
        extra = {"base_judge_score": {n: sum(v) / len(v) for n, v in reference_scores.items() if n in names},
                 "cl/avg_judge_score": sum(judge[last][j] for j in judged) / max(1, len(judged)),
                 "cl/forgetting_judge": {names[j]: max(judge[k][j] for k in range(j, last)) - judge[last][j]
                                         for j in judged if j < last}}
    return {**extra,
        "method": config.method, "combine": config.combine, "init": config.init,
        "search": describe_search(config),
        "domains": names, "stages": stages, "matrix": matrix,
        "cl/avg_accuracy": sum(acc[last]) / len(names), "cl/avg_loss": sum(loss[last]) / len(names),
        "cl/forgetting": forgetting, "cl/forgetting_loss": forgetting_loss,
        "cl/bwt": sum(acc[last][j] - acc[j][j] for j in range(last)) / last if last else 0.0,
        "lambdas": [s["lambda"] for s in stages],
        "units": headline_units(matrix.get("judge_score"), units),
    }


def write_report(out: Path, report: dict, served_lora, served: dict, tokenizer) -> None:
    """The finished run's files: the served adapter (with the tokenizer) at the root, the report and its table."""
    write_adapter(served_lora, served, out)
    tokenizer.save_pretrained(out)
    write_json(out / "report.json", report)
    write_atomic(out / "report.txt", format_table(report))
    plot_heatmap(report, out / "heatmap.png")


def headline_units(judge: list[list] | None, units: list[list[dict | None]] | None) -> dict[str, list[float]]:
    """Per-unit values whose plain mean is each headline number of the report (`cl/avg_loss`, `cl/avg_accuracy`,
    `cl/bwt`, `cl/avg_judge_score`, `cl/avg_forgetting_judge`): the units a bootstrap resamples. A unit is a report
    pair (loss, correctness) or a judged prompt (its samples' mean score); a domain's units are scaled by
    U / (D · n_d) (U units over D domains, n_d of this one), so the mean over all units is the mean over domains
    as the report takes it. Forgetting is a max over stages: its units are the differences from the stage that
    attained the max in this run (the bootstrap holds that stage fixed). `units[k][j]`: stage k's per-unit scores
    on domain j ({"loss", "correct", "judge_score"}; None where not scored); {} if a stage has none (a stage saved
    before they were kept); a metric without units (e.g. `cl/bwt` of one domain) is left out."""
    if not units or any(row is None for row in units):
        return {}
    last = len(units) - 1
    final = units[last]
    if any(u is None for u in final):
        return {}

    def spread(parts: list[list[float]]) -> list[float]:
        total = sum(len(p) for p in parts)
        return [v * total / (len(parts) * len(p)) for p in parts for v in p]

    def difference(a: list[float], b: list[float]) -> list[float]:
        return [x - y for x, y in zip(a, b)]

    out = {"cl/avg_loss": spread([u["loss"] for u in final]),
           "cl/avg_accuracy": spread([u["correct"] for u in final])}
    if last and all(units[j][j] is not None for j in range(last)):
        out["cl/bwt"] = spread([difference(final[j]["correct"], units[j][j]["correct"]) for j in range(last)])
    judged = [j for j, u in enumerate(final) if u.get("judge_score") is not None]
    if judge is not None and judged:
        out["cl/avg_judge_score"] = spread([final[j]["judge_score"] for j in judged])
        peaks = [(j, max(range(j, last), key=lambda k: judge[k][j])) for j in judged if j < last]
        if peaks and all(units[k][j] is not None and units[k][j].get("judge_score") is not None for j, k in peaks):
            out["cl/avg_forgetting_judge"] = spread([difference(units[k][j]["judge_score"], final[j]["judge_score"])
                                                     for j, k in peaks])
    return out


def format_table(report: dict) -> str:
    names = report["domains"]
    width = max(8, *(len(n) for n in names))
    lines = [f"{report['method']}: served module's held-out preference accuracy (DPO loss) after each stage",
             "stage".ljust(12) + "".join(n.rjust(width + 10) for n in names)]
    for k, stage in enumerate(report["stages"]):
        cells = "".join(("-" if a is None else f"{a:.3f} ({l:.3f})").rjust(width + 10)
                        for a, l in zip(report["matrix"]["accuracy"][k], report["matrix"]["loss"][k]))
        lam = f"  λ={stage['lambda']}" if stage["lambda"] is not None else ""
        lines.append(f"{k + 1}-{stage['domain']}".ljust(12) + cells + lam)
    lines.append(f"cl/avg_accuracy {report['cl/avg_accuracy']:.3f}   cl/bwt {report['cl/bwt']:+.3f}   "
                 "cl/forgetting " + ", ".join(f"{k} {v:+.3f}" for k, v in report["cl/forgetting"].items()))
    if "judge_score" in report["matrix"]:
        lines.append("judge score of the served module's samples (KL to the reference)")
        for k, stage in enumerate(report["stages"]):
            cells = "".join(("-" if s is None else f"{s:+.3f} ({kl:.2f})").rjust(width + 10)
                            for s, kl in zip(report["matrix"]["judge_score"][k], report["matrix"]["kl"][k]))
            lines.append(f"{k + 1}-{stage['domain']}".ljust(12) + cells)
        lines.append(f"cl/avg_judge_score {report['cl/avg_judge_score']:+.3f}   cl/forgetting_judge " +
                     ", ".join(f"{k} {v:+.3f}" for k, v in report["cl/forgetting_judge"].items()))
    return "\n".join(lines) + "\n"
