"""`ofsdpo demo`: the whole story on the embedded model and the built-in domains, on a laptop CPU.

1. Pairs: sample the base model on each domain's training prompts, let the judge pick best vs worst.
2. Continual runs over sentiment → critic → concise with sequential DPO, its baselines (dpo-replay; multitask, the
   upper bound), sequential OFS-DPO and COFS-DPO (the defaults docs/results.md kept).
3. After every stage, judge the served module's samples on the held-out prompts of every domain (the full demo: of
   the domains trained so far, to fit ten minutes).
4. The in-domain reward–KL frontier on sentiment: DPO, OFS-DPO's fast and slow modules, DPO at the slow rate.
5. Print the stage × domain judge-score matrices and forgetting; write report.md with plots.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import set_seed

from .. import provenance
from ..config import DEMO_DOMAINS, DEMO_FULL as FULL, DEMO_QUICK as QUICK, DemoSettings, OFSDPOConfig
from ..continual import ContinualConfig, ContinualRunner, format_table
from ..data import load_preference_data, read_rows
from ..domains import get_domain
from ..files import write_atomic, write_json, write_jsonl
from ..metrics import continual_loss_curve, continual_stage_curves
from ..models import embedded_model, load_model_and_tokenizer, resolve_device
from ..plotting import MARKERS, draw_frontier, draw_stage_curves, plot_judge_matrices, pyplot, save, shared_stages
from ..reference import ReferenceCache
from ..reuse import SharedWork
from ..rounds import RoundSettings, judged_pairs_groups
from ..scoring import common_random_numbers, reference_samples
from ..trainer import OFSDPOTrainer
from .experiment import CheckpointLadder

# the baselines users compare against first (docs/results.md: none of the COFS-DPO criteria beat them), then ours
METHODS = ("dpo", "dpo-replay", "multitask", "ofs-dpo", "cofs-dpo")
__all__ = ["DEMO_DOMAINS", "FULL", "METHODS", "QUICK", "DemoSettings", "continual_loss_curve", "run_demo",
           "write_report"]


def sample_pairs(base, tokenizer, settings: DemoSettings, out: Path, progress: bool) -> tuple[list, dict[str, str]]:
    """Each demo domain's training pairs (best vs worst of the base's samples, judged), written to out/data/:
    (the domains, {domain name: pairs file})."""
    tasks = []
    for domain_name in DEMO_DOMAINS:
        domain = get_domain(domain_name)
        if settings.max_new_tokens:
            domain = replace(domain, max_new_tokens=min(domain.max_new_tokens, settings.max_new_tokens))
        tasks.append((domain, domain.prompts("train")[:settings.prompts]))
    with torch.inference_mode():  # every domain's prompts decode together (up to 128 rows a call)
        judged = judged_pairs_groups(base, tokenizer, tasks, RoundSettings(samples_per_prompt=settings.samples,
                                                                           batch_size=128), progress=progress)
    pair_files = {}
    for (domain, _), (pairs, stats) in zip(tasks, judged):
        need = settings.heldout + settings.memory + settings.batch_size
        if len(pairs) < need:
            raise RuntimeError(f"'{domain.name}' gave {len(pairs)} pairs ({stats.ties} ties); the demo needs {need}")
        pair_files[domain.name] = write_jsonl(out / "data" / f"{domain.name}.jsonl", pairs)
    return [domain for domain, _ in tasks], pair_files


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
    say(f"[demo] sampling {settings.prompts} x {settings.samples} responses on each of {', '.join(DEMO_DOMAINS)} "
        "and judging them …")
    domains, pair_files = sample_pairs(base, tokenizer, settings, out, progress)
    specs = [f"{name}={path}" for name, path in pair_files.items()]
    reports, reference_scores, reference_caches = {}, {}, {}
    # the first stage of dpo, dpo-replay and multitask is one training, as is ofs-dpo's and cofs-dpo's: each runs once
    shared = SharedWork()
    for method in METHODS:
        say(f"[demo] {method}: {' → '.join(DEMO_DOMAINS)} …")
        config = ContinualConfig.from_flat(
            domain=specs, method=method, output_dir=str(out / method), overwrite=True, seed=seed, lr=lr,
            max_steps_per_domain=settings.steps, batch_size=settings.batch_size, heldout_size=settings.heldout,
            memory_size=settings.memory, judge_prompts=settings.judge_prompts, lambda_grid=settings.lambda_grid,
            max_length=160, max_prompt_length=96, save_steps=-1, regret=False, progress=progress, device=str(dev),
            eval_steps=settings.eval_steps, judge_max_new_tokens=settings.max_new_tokens,
            score_domains=settings.score_domains,
            # save_steps -1: nothing resumes a demo, so no stage writes a checkpoint
            # the demo's headline is the judge on held-out prompts, which no choice sees; its tiny memory (2-4
            # pairs) would make a noisy chooser, so the best fast module is chosen on the held-out pairs, as ever
            selection="heldout")
        # the base's samples are judged, and its log-probs of every pair computed, once for all the methods: the
        # runners share (and fill) the same dicts
        runner = ContinualRunner(config, model=base, tokenizer=tokenizer, reference_scores=reference_scores,
                                 reference_caches=reference_caches, shared=shared)
        reports[method] = runner.run()
        say(format_table(reports[method]))
    frontier = None
    if settings.frontier_steps:  # after the continual runs: theirs are the runs they were without it
        first = domains[0]
        say(f"[demo] the frontier on {first.name}: dpo, ofs-dpo and dpo at the slow learning rate, judged at steps "
            f"{', '.join(map(str, settings.frontier_checkpoints))} …")
        frontier = frontier_phase(base, tokenizer, first, pair_files[first.name], settings, out, seed, lr, dev,
                                  progress)
    seconds = time.perf_counter() - started
    measured = {"seconds": seconds, "peak_rss_mib": provenance.peak_rss_mib(), **provenance.stamp(dev)}
    summary = write_report(out, reports, settings, name, measured, quick, lr=lr, frontier=frontier)
    say(f"[demo] done in {wall_clock(seconds)} (peak RSS {measured['peak_rss_mib'] / 1024:.1f} GiB) on "
        f"{measured['hardware']}, commit {(measured['commit'] or 'unknown')[:7]}; report: {out / 'report.md'}")
    return summary


def frontier_phase(base, tokenizer, domain, pairs_file: str, settings: DemoSettings, out: Path, seed: int,
                   lr: float, device, progress: bool) -> dict:
    """The in-domain reward–KL frontier on `domain`'s pairs: dpo at `lr`, ofs-dpo at `lr` (its fast and slow
    modules) and dpo at the slow module's learning rate, each judged at `settings.frontier_checkpoints` by the
    experiment's `CheckpointLadder` (judge score and exact KL on the held-out prompts, the base's random numbers).
    The last `settings.heldout` pairs are the ladder's report pairs, the others the stream. Every curve starts at the
    base: KL 0 exactly, its own judge score."""
    s = settings
    rows = [row for _, row in read_rows(pairs_file)[1]]
    stream, report_rows = rows[:-s.heldout], rows[-s.heldout:]
    records = domain.prompts("heldout")[:s.frontier_judge_prompts]
    with common_random_numbers(seed, device):  # the draws every checkpoint's judging repeats
        ref_scores = reference_samples(base, tokenizer, domain, records)
    base_score = sum(ref_scores) / len(ref_scores)
    report = load_preference_data(report_rows, tokenizer, 160, 96)
    caches = {"stream": ReferenceCache(len(stream)), "report": ReferenceCache(len(report))}  # the base's, once
    ratio = OFSDPOConfig().slow_lr_ratio
    arms = {"dpo": ("dpo", lr), "ofs-dpo": ("ofs-dpo", lr), "dpo-slow-lr": ("dpo", lr * ratio)}
    labels = {("dpo", "default"): f"dpo (lr {lr:g})", ("ofs-dpo", "fast"): f"ofs-dpo fast (lr {lr:g})",
              ("ofs-dpo", "slow"): f"ofs-dpo slow (lr {lr * ratio:g})",
              ("dpo-slow-lr", "default"): f"dpo at the slow lr ({lr * ratio:g})"}
    curves: dict[str, list[dict]] = {}
    for arm, (method, arm_lr) in arms.items():
        set_seed(seed)
        config = OFSDPOConfig(method=method, lr=arm_lr, max_steps=s.frontier_steps, batch_size=s.batch_size,
                              max_length=160, max_prompt_length=96, seed=seed, save_steps=0, regret=False,
                              output_dir=str(out / "frontier" / arm), overwrite=True, progress=progress,
                              device=str(device))
        trainer = OFSDPOTrainer(base, config, train_data=stream, tokenizer=tokenizer,
                                train_reference=caches["stream"])
        ladder = CheckpointLadder(list(s.frontier_checkpoints), domain, records, ref_scores, report,
                                  caches["report"], seed, 1)
        trainer.train(on_step=ladder)
        trainer.model.unload()  # the same base object, LoRA layers removed, for the next run
        for point in ladder.points:
            for name, judged in point["modules"].items():
                label = labels.get((arm, name), f"{arm} {name}")
                curves.setdefault(label, [{"step": 0, "kl": 0.0, "judge_score": base_score}]).append(
                    {"step": point["step"], "kl": judged["kl"], "judge_score": judged["judge_score"]})
    return {"domain": domain.name, "steps": s.frontier_steps, "checkpoints": list(s.frontier_checkpoints),
            "judged_prompts": len(records), "batch_size": s.batch_size, "base_judge_score": base_score,
            "curves": curves}


def frontier_sentence(frontier: dict) -> str:
    """What the frontier shows in this run: each module at its last checkpoint, the best judge score, the least KL."""
    last = {label: points[-1] for label, points in frontier["curves"].items()}
    best = max(last, key=lambda label: last[label]["judge_score"])
    least = min(last, key=lambda label: last[label]["kl"])
    at = "; ".join(f"{label} {p['judge_score']:+.3f} at {p['kl']:.2f} nats" for label, p in last.items())
    return (f"From the base ({frontier['base_judge_score']:+.3f} at 0 nats) to step {frontier['steps']} on "
            f"{frontier['domain']}: {at}. The best judge score is {best}'s, the smallest KL {least}'s. Each point "
            f"judges {frontier['judged_prompts']} held-out prompts once (a demo's size: differences of a few "
            "hundredths are noise).")


def wall_clock(seconds: float) -> str:
    """'11 min 30 s' (a reader compares minutes and seconds, not decimal minutes)."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def readable_model(name: str) -> str:
    """The model as a reader knows it: the embedded default by its name, not its site-packages folder."""
    try:
        embedded = embedded_model()[0]
    except Exception:  # noqa: BLE001 -- not installed: the name is whatever was given
        embedded = None
    if embedded is not None and Path(name).resolve() == Path(embedded).resolve():
        return "SmolLM2-135M-Instruct (the embedded GGUF, de-quantized to float32)"
    if Path(name).exists():  # a local folder: its name, not where it lies on this machine
        return f"`{Path(name).name}` (a local model)"
    return f"`{name}`"


def describe(settings: DemoSettings) -> str:
    """The demo's settings in words (what a reader needs to not mistake one seed for a result)."""
    s = settings
    return (f"{s.prompts} prompts x {s.samples} samples per domain make the pairs; {s.steps} optimiser steps of "
            f"{s.batch_size} pairs per domain; {s.judge_prompts} held-out prompts judged per domain after every stage"
            f"{' (the domains seen so far)' if s.score_domains == 'seen' else ''}; "
            f"dpo-replay mixing in {s.memory} pairs of every earlier domain; COFS-DPO with --init previous, λ on "
            f"{s.lambda_grid} chosen on {s.memory} memory pairs per domain by --select-by loss, the best fast module "
            f"chosen on {s.heldout} held-out pairs (--selection heldout); one seed")


def repeated_methods(reports: dict) -> dict[str, str]:
    """{method: the earlier method (in METHODS order) whose stage × domain matrices it repeats exactly}: the two served
    the same module at every stage (cofs-dpo at λ = 0 everywhere is sequential ofs-dpo)."""
    repeats = {}
    for i, method in enumerate(METHODS):
        if method not in reports:
            continue
        for earlier in METHODS[:i]:
            same = earlier in reports and reports[method]["matrix"] == reports[earlier]["matrix"]
            if same and earlier not in repeats:
                repeats[method] = earlier
                break
    return repeats


def repeat_line(method: str, earlier: str, report: dict) -> str:
    """The one line that stands for a stage table identical to an earlier method's, with the reason where known."""
    if method == "cofs-dpo" and all(lam in (None, 0, 0.0) for lam in report["lambdas"]):
        return (f"cofs-dpo chose λ = 0 at every stage (its newest module alone scored best on the memory), so it "
                f"served what sequential {earlier} serves: its rows equal {earlier}'s above.")
    return f"{method} served what {earlier} serves at every stage: its rows equal {earlier}'s above."


def panel_titles(reports: dict) -> dict[str, str]:
    """{method drawn: its title}: a method that repeats an earlier one is not drawn again, its name joins the
    earlier one's title ("ofs-dpo = cofs-dpo")."""
    repeats = repeated_methods(reports)
    return {m: " = ".join([m, *(r for r, earlier in repeats.items() if earlier == m)])
            for m in METHODS if m in reports and m not in repeats}


def draw_final_reward_kl(reports: dict, names: list[str]):
    """The final served module of each method: judge score against exact KL, one point per domain."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for i, (method, title) in enumerate(panel_titles(reports).items()):
        final_scores = reports[method]["matrix"]["judge_score"][-1]
        final_kl = reports[method]["matrix"]["kl"][-1]
        ax.scatter(final_kl, final_scores, label=title, color=f"C{i}", marker=MARKERS[i % len(MARKERS)])
        for name, x, y in zip(names, final_kl, final_scores):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel("exact KL(π ‖ π_ref), nats per judged sample")
    ax.set_ylabel("judge score, held-out prompts (−1 … 1)")
    ax.legend()
    return fig


def settings_table(settings: DemoSettings, model: str, lr: float | None) -> list[str]:
    """The demo's settings as a small Markdown table: what a reader needs to not mistake one seed for a result."""
    s = settings
    rows = [("model", model),
            ("pairs", f"{s.prompts} training prompts × {s.samples} samples per domain; the judge's best vs worst"),
            ("training", f"{s.steps} optimiser steps of {s.batch_size} pairs per domain" +
             (f", learning rate {lr:g}" if lr is not None else "")),
            ("judged", f"{s.judge_prompts} held-out prompts per domain after every stage, one sample each" +
             (", on the domains trained so far (a blank cell: not judged yet)" if s.score_domains == "seen" else "")),
            ("methods", "dpo, ofs-dpo: one module trained domain after domain; dpo-replay: dpo whose stream mixes in "
                        f"{s.memory} pairs of every earlier domain; multitask: each stage a fresh DPO module on every "
                        "domain's pairs so far (the upper bound; stage k trains k stages' worth); cofs-dpo: the "
                        "kept modules combined"),
            ("COFS-DPO", "the defaults docs/results.md kept (no criterion beat the baselines), `--init previous` and "
                         f"`--select-by loss`; λ in {{{s.lambda_grid}}} chosen on {s.memory} memory pairs per domain"),
            ("best fast module", f"chosen on {s.heldout} held-out pairs (`--selection heldout`)"),
            *([("frontier", f"{s.frontier_steps} steps per run on the first domain; every module judged at steps "
                            f"{', '.join(map(str, s.frontier_checkpoints))} on {s.frontier_judge_prompts} held-out "
                            "prompts")] if s.frontier_steps else []),
            ("seeds", "one: an illustration, not a result")]
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def names_and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def judge_sentence(reports: dict) -> str:
    """Which method ends with the best average judge score and by how much; which domain was forgotten most, by
    whom (forgetting: best earlier score minus final score)."""
    avg = {m: reports[m]["cl/avg_judge_score"] for m in METHODS}
    best = max(avg.values())
    winners = [m for m in METHODS if avg[m] == best]
    others = [v for v in avg.values() if v != best]
    text = (f"After the last stage, {names_and(winners)} {'ends' if len(winners) == 1 else 'end'} with the best "
            f"average judge score over the domains ({best:+.3f}")
    text += (f", {best - max(others):.3f} above the next, {names_and([m for m in METHODS if avg[m] == max(others)])})."
             if others else ", all methods alike).")
    lost = [(v, domain, m) for m in METHODS for domain, v in reports[m]["cl/forgetting_judge"].items()]
    worst = max(lost, default=None)
    if worst is None or worst[0] <= 0:
        return text + " No method lost judge score on an earlier domain."
    who = [m for v, domain, m in lost if v == worst[0] and domain == worst[1]]
    return text + (f" The domain forgotten most is {worst[1]}: {names_and(who)} lost {worst[0]:.3f} of its best "
                   "earlier score there.")


def curves_sentence(curves: dict[str, list[list]], names: list[str]) -> str:
    """Which stages the methods share, and each method's training loss over the last steps of the last stage."""
    shared = [f"{names_and(group)} share stage {k + 1} ({names[k]}): one training"
              for k, groups in enumerate(shared_stages(curves)) for group in groups]
    last = {m: [v for v in stages[-1] if v is not None] for m, stages in curves.items() if stages}
    ends = ", ".join(f"{m} {sum(v[-2:]) / len(v[-2:]):.3f}" for m, v in last.items() if v)
    text = (("; ".join(shared) + ". ") if shared else "No two methods share a stage. ")
    return text + f"Training DPO loss over the last two steps of {names[-1]}: {ends} nats."


def kl_sentence(reports: dict, names: list[str]) -> str:
    """Which method's final served module moved furthest from the base (mean exact KL over the domains)."""
    kl = {m: sum(reports[m]["matrix"]["kl"][-1]) / len(names) for m in METHODS}
    furthest = [m for m in METHODS if kl[m] == max(kl.values())]
    per_sample = f"nats per judged sample over the {len(names)} domains after the last stage"
    if len(furthest) == len(kl):
        return f"Every method's final served module lies as far from the base: mean exact KL {kl[furthest[0]]:.2f} " \
               f"{per_sample}."
    rest = ", ".join(f"{m} {v:.2f}" for m, v in kl.items() if m not in furthest)
    return (f"{names_and(furthest)} moved furthest from the base: mean exact KL {kl[furthest[0]]:.2f} {per_sample} "
            f"({rest}).")


def frontier_section(out: Path, frontier: dict | None, settings: DemoSettings) -> list[str]:
    """frontier.png and its part of the report (none without a frontier phase)."""
    if not frontier:
        return []
    save(draw_frontier(frontier["curves"], f"{frontier['domain']}: every module at steps 0 (the base), "
                                           f"{', '.join(map(str, frontier['checkpoints']))}"), out / "frontier.png")
    return [f"## In-domain: the reward–KL frontier on {frontier['domain']}", "",
            f"Each run trains {frontier['steps']} steps of {frontier['batch_size']} pairs on {frontier['domain']}'s "
            f"pairs (its last {settings.heldout} pairs held out); at steps "
            f"{', '.join(map(str, frontier['checkpoints']))} every module is judged on {frontier['judged_prompts']} "
            "held-out prompts, one sample each, with the exact KL to the base (labels: the step).", "",
            "![reward–KL frontier](frontier.png)", "", frontier_sentence(frontier), ""]


def write_report(out: Path, reports: dict, settings: DemoSettings, model_name: str, measured: dict,
                 quick: bool, lr: float | None = None, frontier: dict | None = None) -> dict:
    """report.md with its figures, and demo_summary.json: the results and where they were measured (`measured`:
    seconds, peak_rss_mib and `provenance.stamp`) and, from a frontier phase (`frontier_phase`), its points."""
    names = list(reports[METHODS[0]]["domains"])
    base_scores = reports[METHODS[0]]["base_judge_score"]  # the reference's samples: the untrained base
    # 1. learning curves: each method's (fast) DPO loss per step, stage after stage, shared stages marked
    curves = {method: continual_stage_curves(out / method, names) for method in METHODS}
    save(draw_stage_curves(curves, names, "training DPO loss, nats (fast module)",
                           f"optimiser step ({settings.batch_size} pairs each)"), out / "learning_curves.png")
    # 2. stage × domain judge-score heat-maps under the untrained base's row (a repeated method once, both named)
    plot_judge_matrices({title: reports[method]["matrix"]["judge_score"]
                         for method, title in panel_titles(reports).items()}, names, out / "judge_heatmaps.png",
                        base=base_scores)
    # 3. reward versus KL: final served module, one point per domain and method
    save(draw_final_reward_kl(reports, names), out / "reward_vs_kl.png")

    lines = [f"# ofsdpo demo{' (quick)' if quick else ''}", "",
             f"Sequential DPO, its continual baselines (dpo-replay, and multitask as the upper bound), sequential "
             f"OFS-DPO and COFS-DPO, each trained over {' → '.join(names)} on pairs the base model sampled and each "
             "domain's judge ranked; after every stage the served module's samples on the held-out prompts of "
             f"{'every domain trained so far' if settings.score_domains == 'seen' else 'every domain'} are judged.",
             "", *settings_table(settings, readable_model(model_name), lr), "",
             *frontier_section(out, frontier, settings),
             f"## Continual: {' → '.join(names)}", "",
             "![judge heat-maps](judge_heatmaps.png)", "", judge_sentence(reports), "",
             "Judge score of the served module's samples on each domain's held-out prompts, after the last stage. "
             "Forgetting = best earlier score minus final score.", "",
             *summary_table(reports, names, base_scores), ""]
    lines += stage_tables(reports)
    lines += ["![learning curves](learning_curves.png)", "", curves_sentence(curves, names), "",
              "![reward versus KL](reward_vs_kl.png)", "", kl_sentence(reports, names), "",
              f"Measured: {wall_clock(measured['seconds'])} wall-clock, peak RSS "
              f"{measured['peak_rss_mib'] / 1024:.1f} GiB, on {measured['hardware']} "
              f"(commit {measured.get('commit') or 'unknown'}).", ""]
    write_atomic(out / "report.md", "\n".join(lines))
    summary = {**measured, "quick": quick, "settings": describe(settings), "base_judge_score": base_scores,
               "methods": {
        m: {"final_judge_scores": dict(zip(names, reports[m]["matrix"]["judge_score"][-1])),
            "avg_judge_score": reports[m]["cl/avg_judge_score"], "forgetting_judge": reports[m]["cl/forgetting_judge"],
            "lambdas": reports[m]["lambdas"]} for m in METHODS}, **({"frontier": frontier} if frontier else {})}
    write_json(out / "demo_summary.json", summary)
    return summary


def summary_table(reports: dict, names: list[str], base_scores: dict) -> list[str]:
    """One row for the untrained base, one per method: final judge scores, their average, forgetting."""
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
    return table


def stage_tables(reports: dict) -> list[str]:
    """Each method's stage table, but one line instead of a table identical to an earlier method's."""
    lines, repeats = [], repeated_methods(reports)
    for method in METHODS:
        if method in repeats:  # no silent duplicate: say it once instead of a second identical table
            lines += [repeat_line(method, repeats[method], reports[method]), ""]
            continue
        lines += ["```", format_table(reports[method]).rstrip(), "```", ""]
    return lines
