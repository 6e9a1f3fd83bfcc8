"""`ofsdpo demo`: the whole story on the embedded model and the built-in domains, on a laptop CPU.

1. Pairs: sample the base model on each domain's training prompts, let the judge pick best vs worst.
2. Continual runs over sentiment → critic → concise with sequential DPO, sequential OFS-DPO and COFS-DPO.
3. After every stage, judge the served module's samples on every domain's held-out prompts.
4. Print the stage × domain judge-score matrices and forgetting; write report.md with plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import set_seed

from .continual import ContinualConfig, ContinualRunner, format_table
from .domains import get_domain
from .generation import make_pairs, write_jsonl
from .metrics import read_metrics
from .models import load_model_and_tokenizer, resolve_device

DEMO_DOMAINS = ("sentiment", "critic", "concise")
METHODS = ("dpo", "ofs-dpo", "cofs-dpo")


@dataclass(frozen=True)
class DemoSettings:
    prompts: int  # training prompts sampled per domain
    samples: int  # samples per prompt
    steps: int  # optimiser steps per domain
    batch_size: int
    judge_prompts: int  # held-out prompts judged per domain after every stage
    heldout: int
    memory: int
    lambda_grid: str
    eval_steps: int  # how often the best fast module is looked for
    max_new_tokens: int = 0  # cap on sampled responses, pairs and judging (0: each domain's own)


FULL = DemoSettings(prompts=40, samples=4, steps=8, batch_size=4, judge_prompts=16, heldout=8, memory=4,
                    lambda_grid="0,0.25,0.5,0.75,1", eval_steps=4)
QUICK = DemoSettings(prompts=12, samples=2, steps=2, batch_size=2, judge_prompts=4, heldout=2, memory=2,
                     lambda_grid="0,0.5,1", eval_steps=2, max_new_tokens=16)


def run_demo(output_dir: str | Path = "demo-output", quick: bool = False, model: str | None = None,
             gguf_file: str | None = None, device: str = "auto", seed: int = 0, lr: float = 5e-4,
             progress: bool = True) -> dict:
    settings, out = (QUICK if quick else FULL), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    dev = resolve_device(device)
    say(f"[demo] loading the model on {dev} …")
    base, tokenizer, name, _ = load_model_and_tokenizer(model, gguf_file, "auto", dev)
    set_seed(seed)
    specs = []
    for domain_name in DEMO_DOMAINS:
        domain = get_domain(domain_name)
        if settings.max_new_tokens:
            domain = replace(domain, max_new_tokens=min(domain.max_new_tokens, settings.max_new_tokens))
        records = domain.prompts("train")[:settings.prompts]
        say(f"[demo] sampling {len(records)} x {settings.samples} responses on '{domain_name}' and judging them …")
        with torch.inference_mode():
            pairs, ties = make_pairs(base, tokenizer, domain, records, settings.samples, progress=progress)
        need = settings.heldout + settings.memory + settings.batch_size
        if len(pairs) < need:
            raise RuntimeError(f"'{domain_name}' gave {len(pairs)} pairs ({ties} ties); the demo needs {need}")
        specs.append(f"{domain_name}={write_jsonl(pairs, out / 'data' / f'{domain_name}.jsonl')}")
    reports, reference_scores = {}, {}
    for method in METHODS:
        say(f"[demo] {method}: {' → '.join(DEMO_DOMAINS)} …")
        config = ContinualConfig(
            domain=specs, method=method, output_dir=str(out / method), overwrite=True, seed=seed, lr=lr,
            max_steps_per_domain=settings.steps, batch_size=settings.batch_size, heldout_size=settings.heldout,
            memory_size=settings.memory, judge_prompts=settings.judge_prompts, lambda_grid=settings.lambda_grid,
            max_length=160, max_prompt_length=96, save_steps=0, regret=False, progress=progress, device=str(dev),
            eval_steps=settings.eval_steps, judge_max_new_tokens=settings.max_new_tokens)
        runner = ContinualRunner(config, model=base, tokenizer=tokenizer)
        runner._reference_scores = reference_scores  # the base's samples are judged once, for all three methods
        reports[method] = runner.run()
        say(format_table(reports[method]))
    seconds = time.perf_counter() - started
    summary = write_report(out, reports, settings, name, seconds, quick)
    say(f"[demo] done in {seconds / 60:.1f} min; report: {out / 'report.md'}")
    return summary


def write_report(out: Path, reports: dict, settings: DemoSettings, model_name: str, seconds: float,
                 quick: bool) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports[METHODS[0]]["domains"])
    base_scores = reports[METHODS[0]]["base_judge_score"]  # the reference's samples: the untrained base
    # 1. learning curves: each method's (fast) DPO loss per step, stages one after another
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for method in METHODS:
        losses = []
        for k, domain in enumerate(names):
            rows = read_metrics(out / method / "domains" / f"{k + 1}-{domain}" / "metrics.jsonl")
            losses += [r.get("fast/loss", r.get("loss")) for r in rows]
        ax.plot(range(1, len(losses) + 1), losses, label=method)
    ax.set_xlabel("optimiser step (domains in order)")
    ax.set_ylabel("training DPO loss (fast module)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)
    # 2. stage × domain judge-score heat-maps
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.4))
    for ax, method in zip(axes, METHODS):
        matrix = reports[method]["matrix"]["judge_score"]
        ax.imshow(matrix, cmap="viridis", vmin=-1, vmax=1)
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), [f"after {n}" for n in names])
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", color="w" if v < 0.3 else "k")
        ax.set_title(method)
    fig.tight_layout()
    fig.savefig(out / "judge_heatmaps.png", dpi=100)
    plt.close(fig)
    # 3. reward versus KL: final served module, one point per domain and method
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in METHODS:
        final_scores = reports[method]["matrix"]["judge_score"][-1]
        final_kl = reports[method]["matrix"]["kl"][-1]
        ax.scatter(final_kl, final_scores, label=method)
        for name, x, y in zip(names, final_kl, final_scores):
            ax.annotate(name, (x, y), fontsize=7)
    ax.set_xlabel("KL(policy || reference), nats per response")
    ax.set_ylabel("judge score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_vs_kl.png", dpi=100)
    plt.close(fig)

    lines = [f"# ofsdpo demo{' (quick)' if quick else ''}", "",
             f"Model: `{model_name}`. Domains in order: {' → '.join(names)}. Settings: {settings}.",
             f"Wall-clock: {seconds / 60:.1f} min.", "",
             "Judge score of the served module's samples on each domain's held-out prompts, after each stage "
             "(row = after training on that domain). Forgetting = best earlier score minus final score.", ""]
    table = ["| method | " + " | ".join(f"final {n}" for n in names) + " | avg | forgetting |",
             "|---|" + "---|" * (len(names) + 2),
             "| base model (no training) | " + " | ".join(f"{base_scores[n]:+.3f}" for n in names) +
             f" | {sum(base_scores.values()) / len(names):+.3f} | |"]
    for method in METHODS:
        r = reports[method]
        final = r["matrix"]["judge_score"][-1]
        forgetting = ", ".join(f"{k} {v:+.2f}" for k, v in r["cl/forgetting_judge"].items())
        table.append(f"| {method} | " + " | ".join(f"{v:+.3f}" for v in final) +
                     f" | {r['cl/avg_judge_score']:+.3f} | {forgetting} |")
    lines += table + [""]
    for method in METHODS:
        lines += ["```", format_table(reports[method]).rstrip(), "```", ""]
    lines += ["![learning curves](learning_curves.png)", "", "![judge heat-maps](judge_heatmaps.png)", "",
              "![reward versus KL](reward_vs_kl.png)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    summary = {"seconds": seconds, "quick": quick, "base_judge_score": base_scores, "methods": {
        m: {"final_judge_scores": dict(zip(names, reports[m]["matrix"]["judge_score"][-1])),
            "avg_judge_score": reports[m]["cl/avg_judge_score"], "forgetting_judge": reports[m]["cl/forgetting_judge"],
            "lambdas": reports[m]["lambdas"]} for m in METHODS}}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
