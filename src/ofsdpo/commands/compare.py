"""`ofsdpo compare`: which method should I use on MY data? The protocol of `ofsdpo experiment` (and of
docs/results.md) applied to the user's pairs, ending in one recommendation line.

- The pairs are split by prompt (`experiment.split_by_prompt`): a report set (the last prompts, at least
  `--report-size` pairs) that makes no choice, a selection set that chooses OFS-DPO's served module, and the
  training stream (the rest, in file order, each pair once). The split is fixed and written to compare.json.
- Each arm (a method of `--methods`, or a `--variant` with its own options) trains on the same stream once per
  seed 0..N-1 (initialisation, dropout and judged samples vary; the data does not): `ExperimentRunner`, so runs
  are kept as they finish (each arm's served adapter under runs/) and a rerun continues.
- With `--prompts` and `--judge`: judged samples on the held-out prompts with common random numbers, the judge's
  score, win rate and exact KL; otherwise the pair metrics only, said plainly.
- Statistics as on the results page: per seed, arm − baseline; the wider of the t interval and the crossed
  bootstrap decides; Holm over the comparisons of the table.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

from ..config import CompareConfig, ExperimentConfig, TrainingOptions
from ..errors import ConfigError
from ..files import write_atomic, write_json
from ..prompts import load_prompts
from .experiment import ExperimentRunner, split_by_prompt
from .experiment_report import verdict

# training options the protocol sets per run or per experiment, not per arm
PROTOCOL_OPTIONS = {"seed", "progress", "save_steps", "lr", "batch_size", "max_length", "max_prompt_length", "model",
                    "gguf_file", "device"}
# what the recommendation quotes when nothing differs (in-domain, then continual)
KEY_METRICS = ("judge_score", "report_loss", "avg_final_loss")


def parse_variant(text: str, default_method: str) -> dict:
    """`NAME:--flag=value,--flag=value` as a variant: {"name", "method", option: value}, each value converted to
    its training option's type."""
    name, _, rest = text.partition(":")
    if not name or not rest:
        raise ConfigError(f"--variant {text!r}: expected NAME:--flag=value[,--flag=value] (e.g. lr2x:--lr=1e-3).")
    hints = typing.get_type_hints(TrainingOptions)
    variant = {"name": name, "method": default_method}
    for item in rest.split(","):
        flag, _, value = item.partition("=")
        key = flag.strip().lstrip("-").replace("-", "_")
        if key == "method":
            variant["method"] = value
            continue
        if key not in hints or key in PROTOCOL_OPTIONS - {"lr", "batch_size"} or not value:
            raise ConfigError(f"--variant {name}: '{flag}' is not a training option an arm can set "
                              "(--flag=value, e.g. --lr=1e-3, --alpha=0.2, --method=ofs-dpo).")
        variant[key] = _convert(value, hints[key], f"--variant {name}: {flag}")
    return variant


def _convert(value: str, hint, where: str):
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    kind = kinds[0]
    try:
        if kind is bool:
            return value.lower() in ("1", "true", "yes")
        if kind in (int, float):
            return kind(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a {kind.__name__}, got {value!r}.") from None
    return value


def experiment_config(cfg: CompareConfig) -> ExperimentConfig:
    """The experiment this comparison runs: one domain (the user's file), one variant per arm."""
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    variants = [{"name": m, "method": m} for m in methods] + [parse_variant(v, methods[0] if methods else "dpo")
                                                               for v in cfg.variant]
    names = [v["name"] for v in variants]
    if len(variants) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"compare needs at least two distinct arms (got {names}): --methods dpo,ofs-dpo, "
                          "or add --variant NAME:--flag=value.")
    training = cfg.training
    defaults = TrainingOptions()
    shared = {f.name: getattr(training, f.name) for f in dataclasses.fields(TrainingOptions)
              if f.name not in PROTOCOL_OPTIONS and getattr(training, f.name) != getattr(defaults, f.name)}
    batch_size = training.batch_size or 8
    stream = -1 if cfg.max_steps < 0 else cfg.max_steps * batch_size
    files = (dict(_domain_file(spec) for spec in cfg.domain) if cfg.domain
             else {Path(cfg.data).stem or "data": cfg.data})
    steps = None
    for path in files.values():  # a clear error before any load; every domain trains as many steps
        parts = split_by_prompt(path, cfg.selection_size, cfg.report_size, stream)
        if len(parts["train"]) // batch_size < 1:
            raise ConfigError(f"{path}: {len(parts['train'])} training pairs make no optimiser step of "
                              f"{batch_size}: lower --batch-size or add pairs.")
        steps = min(steps or 10**9, len(parts["train"]) // batch_size)
        if cfg.prompts:
            _check_heldout(cfg, parts)
    continual = bool(cfg.domain)
    return ExperimentConfig(
        name="compare", kind="continual" if continual else "in-domain", domains=list(files),
        data=None if continual else cfg.data, data_files=files if continual else {}, memory=cfg.selection_size,
        variants=variants,
        seeds=list(range(cfg.seeds)), baseline=cfg.baseline, model=training.model, gguf_file=training.gguf_file,
        device=training.device, steps=steps, batch_size=batch_size, lr=training.lr, selection=cfg.selection_size,
        report_size=cfg.report_size, judge_prompts=0 if continual else cfg.judge_prompts,
        judge_samples=cfg.judge_samples,
        heldout_prompts=cfg.prompts, judge=list(cfg.judge), max_length=training.max_length,
        max_prompt_length=training.max_prompt_length, train=shared,
        description=f"{', '.join(names)} on {', '.join(files.values())}: {steps} steps x {batch_size} pairs "
                    f"{'per domain' if continual else 'per run'}")


def _domain_file(spec: str) -> tuple[str, str]:
    name, _, path = spec.partition("=")
    if not name or not path:
        raise ConfigError(f"--domain {spec!r}: expected NAME=PATH (a pairs file per domain, in stream order).")
    return name, path


def _check_heldout(cfg: CompareConfig, parts: dict) -> None:
    """Judged prompts must be held out: one that is also a prompt of the pairs would be scored after training on
    it. A clear error naming the first such prompt."""
    def text(prompt) -> str:
        return json.dumps(prompt if not isinstance(prompt, str) else prompt.strip(), sort_keys=True)

    trained = {text(row.get("prompt")) for name in ("train", "selection", "report") for row in parts[name]}
    for record in load_prompts(cfg.prompts, None).records:
        if text(record["prompt"]) in trained:
            raise ConfigError(f"--prompts {cfg.prompts}: the prompt {str(record['prompt'])[:60]!r} is also a "
                              f"prompt of --data {cfg.data}; judged prompts must be held out from the pairs.")


def costs(summary: dict) -> dict[str, dict]:
    """Each arm's measured cost over its seeds: training seconds per run and per optimiser step (a continual run:
    the whole run's seconds, its steps over every domain)."""
    out = {}
    steps_per_run = summary["config"]["steps"] * (len(summary["config"]["domains"]) if summary["kind"] == "continual"
                                                  else 1)
    for cell, runs in summary["per_seed"].items():
        seconds = [r.get("train_seconds", r.get("wall_seconds")) for r in runs.values()]
        seconds = [s for s in seconds if s is not None]
        steps = [r.get("steps") or steps_per_run for r in runs.values()]
        if seconds:
            mean = sum(seconds) / len(seconds)
            out[cell.split("/")[0]] = {"train_seconds": mean, "seconds_per_step": mean / (sum(steps) / len(steps)),
                                       "runs": len(seconds)}
            for key in ("peak_cuda_mib", "peak_process_rss_mib"):
                peaks = [r[key] for r in runs.values() if r.get(key) is not None]
                if peaks:
                    out[cell.split("/")[0]][key] = max(peaks)
    return out


def _quote(row: dict) -> str:
    d = row["decision"]
    return f"{row['title'].split(' (')[0]} {row['mean']:+.3g} [{d['lower']:+.3g}, {d['upper']:+.3g}]"  # any scale


def recommendation(summary: dict, cost: dict) -> list[str]:
    """One line per arm against the baseline: what differs (verdicts under the page's rule), at what cost."""
    baseline, lines = summary["baseline"], []
    arms = list(dict.fromkeys(r["variant"] for r in summary["paired"] if r["baseline"] == baseline))
    for arm in arms:
        rows = [r for r in summary["paired"] if r["variant"] == arm and r["baseline"] == baseline]
        better = [r for r in rows if verdict(r) == "better"]
        worse = [r for r in rows if verdict(r) == "worse"]
        ratio = (cost.get(arm, {}).get("train_seconds", 0) / cost[baseline]["train_seconds"]
                 if cost.get(baseline) else float("nan"))
        at = f"{ratio:.1f}x {baseline}'s {'training' if summary['kind'] == 'in-domain' else 'run'} time"
        if better and not worse:
            lines.append(f"{arm}: better on {'; '.join(map(_quote, better))}, at {at}: use {arm} if that gain is "
                         "worth the time.")
        elif worse and not better:
            lines.append(f"{arm}: worse on {'; '.join(map(_quote, worse))}, at {at}: use {baseline}.")
        elif better and worse:
            lines.append(f"{arm}: better on {'; '.join(map(_quote, better))} but worse on "
                         f"{'; '.join(map(_quote, worse))}, at {at}: a trade-off; choose by the metric that matters.")
        else:
            key = next((r for m in KEY_METRICS for r in rows if r["metric"] == m), rows[0] if rows else None)
            shown = f" ({_quote(key)})" if key else ""
            cheaper = arm if ratio < 1 else baseline
            lines.append(f"{arm}: no difference shown on your data{shown}; {arm} costs {at}: use {cheaper}.")
    return lines


def run_compare(cfg: CompareConfig) -> dict:
    experiment = experiment_config(cfg)
    out = Path(cfg.output_dir)
    runner = ExperimentRunner(experiment, out, cfg.training.progress)
    if cfg.status:  # nothing runs, nothing loads
        return {"status": runner.status()}
    summary = runner.run()
    cost = costs(summary)
    lines = recommendation(summary, cost)
    judged = bool(cfg.prompts)
    split = {d: runner.split(d)["indices"] for d in experiment.domains}  # the sets the runs used
    split = split[experiment.domains[0]] if experiment.kind == "in-domain" else split
    result = {"recommendation": lines, "costs": cost, "judged": judged, "split": split, **summary}
    write_json(out / "compare.json", result)
    note = ("" if judged else "Pair metrics only (report DPO loss and preference accuracy"
            + (", online loss): give --prompts and --judge for judged samples, win rate and KL.\n\n"
               if experiment.kind == "in-domain" else "): the continual form judges no samples.\n\n"))
    def memory(c: dict) -> str:
        if c.get("peak_cuda_mib") is not None:
            return f"{c['peak_cuda_mib']:.0f} MiB (CUDA, per run)"
        return f"{c['peak_process_rss_mib']:.0f} MiB (process RSS so far)" if c.get("peak_process_rss_mib") else "-"

    table = "\n".join(f"| {arm} | {c['train_seconds']:.1f} | {c['seconds_per_step']:.2f} | {memory(c)} | {c['runs']} |"
                      for arm, c in cost.items())
    timed = "training s per run" if experiment.kind == "in-domain" else "s per run (training, selection, scoring)"
    body = (out / "aggregate.md").read_text(encoding="utf-8")
    write_atomic(out / "compare.md", "# Recommendation\n\n" + "".join(f"- {line}\n" for line in lines) + "\n" + note
                 + f"## Cost (mean over seeds)\n\n| arm | {timed} | s per step | peak memory | runs |\n"
                 + "|---|---|---|---|---|\n"
                 + table + "\n\n" + body)
    return result
