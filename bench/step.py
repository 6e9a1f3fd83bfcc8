"""Steady-state optimiser step: TRL's DPOTrainer vs our `dpo` vs our `ofs-dpo`, same model, batch and LoRA.

ofs-dpo runs several ways at the same global batch of pairs per step (the same pairs and gradient), issue 16:
`ofs-dpo` (the default: `--module-passes fused`, both modules in one forward of the batch stacked twice, in parts
sized by the memory rule, `--module-batch-size 0`: what an unset --batch-size/--grad-accum resolves to; on a CPU,
half the pairs where that saves >= 256 MiB of activations, else all of them) beside `ofs-dpo-two-pass` (the old default:
`--module-passes joint`, one forward per module over the whole micro-batch), always run; on request
(`--variants`) `ofs-dpo-fused-whole` (fused over the whole micro-batch: an explicit --batch-size),
`ofs-dpo-sequential` (one graph at a time, a no-grad forward more) and `ofs-dpo-accum2` (two-pass on
`--batch-size B/2 --grad-accum 2`).

    python bench/step.py --quick                                  # CPU, tiny model, well under two minutes
    python bench/step.py --shape 0.5b --device cuda --json out.json  # Qwen2-0.5B shape, bf16, 8 pairs of 256+256

Each variant runs in its own subprocess (so CPU peak RSS is per variant, and TRL's patched forward cannot leak
into ours); `--repeats R` interleaves the variants R times (trl, dpo, ofs-dpo, ..., trl, ...) and reports
medians, which matters on a shared machine.

What is timed, per optimiser step (warm-up steps dropped, median over the rest):
- trl: `trainer.train()` with a callback, `on_step_begin` -> `on_step_end`: TRL's own training_step (policy
  forward, live reference forward with adapters disabled, backward), gradient clipping, optimizer and scheduler
  step, zero_grad. A forward counter on the embedding checks that the step runs two forwards.
- dpo / ofs-dpo: `OFSDPOTrainer.train()`; the trainer's per-step seconds (its `pairs_per_second`) cover collation,
  the forward(s), one backward, per-module clipping, optimizer and scheduler step and the one host sync. The
  reference log-probs are cached: each round fills them before its step, outside the step's time; that fill is
  timed here separately and reported per pair, and the `*_incl_reference_*` ratios add it back, because in a
  one-pass online stream every pair needs its reference scoring once.

Model FLOPs (issue 6): per token, LoRA training ~ 2N forward + 2N backward (no weight gradients of the frozen
base); so trl ~ 6N (policy + live reference), our dpo ~ 4N (cached reference), ofs-dpo ~ 8N (two modules;
sequential 10N), a reference fill ~ 2N. N = every weight a token meets (all parameters but the input embedding; the LM head once).
Tokens = prompt + completion of chosen and rejected. Attention-score FLOPs are not counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # also puts src/ on sys.path
import torch

# ofs-dpo at the same global batch of pairs per optimiser step (the objective is a per-pair sum, so the step's
# gradient is the same): {variant: (module_passes, pairs per micro-batch, grad_accum, module_batch_size)}, with
# B = --batch-pairs; None = B/2; 0 = the memory rule. ofs-dpo is the default configuration (fused, the rule's parts).
OFS_VARIANTS = {"ofs-dpo": ("fused", "B", 1, 0), "ofs-dpo-two-pass": ("joint", "B", 1, "B"),
                "ofs-dpo-fused-whole": ("fused", "B", 1, "B"), "ofs-dpo-sequential": ("sequential", "B", 1, "B"),
                "ofs-dpo-accum2": ("joint", None, 2, None)}
VARIANTS = ("trl", "dpo", *OFS_VARIANTS)
ALWAYS = ("trl", "dpo", "ofs-dpo", "ofs-dpo-two-pass")  # the ratios need these
DEFAULT_VARIANTS = ALWAYS
FLOPS_FACTOR = {"trl": 6, "dpo": 4, **{v: 8 for v in OFS_VARIANTS}, "ofs-dpo-sequential": 10}  # x N per token
REFERENCE_FACTOR = 2
TARGETS = {  # issue 6: each ratio must be <= its target
    "dpo_ours_over_trl_time": 0.8, "ofs_over_dpo_time": 2.0, "ofs_over_trl_time": 1.4,
    "ofs_over_dpo_memory": 1.25, "dpo_ours_over_trl_memory": 1.0,
}
MEMORY_VARIANTS = {"ofs-dpo-two-pass": "two_pass", "ofs-dpo-fused-whole": "fused_whole",  # variant: its ratios'
                   "ofs-dpo-sequential": "sequential", "ofs-dpo-accum2": "accum2"}         # infix
for _key in MEMORY_VARIANTS.values():  # the same targets as ofs-dpo's
    TARGETS.update({f"ofs_{_key}_over_dpo_time": 2.0, f"ofs_{_key}_over_trl_time": 1.4,
                    f"ofs_{_key}_over_dpo_memory": 1.25})
MARKER = "BENCH_RESULT "


# --- the worker: one variant, one process ----------------------------------------------------------------------------
class ForwardCounter:
    """Counts backbone forwards (a pre-hook on the input embedding), to check what a step really runs."""

    def __init__(self, model):
        self.n = 0
        model.get_input_embeddings().register_forward_pre_hook(self._hit)

    def _hit(self, *_):
        self.n += 1


def dummy_tokenizer():
    """A word-level tokenizer: TRL needs one (pad id, its constructor's dataset pass), ours saves one at the end.
    The benchmark's pairs are already token ids, so its vocabulary does not matter."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": C.PAD_ID, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def run_trl(model, pairs, spec, device, dtype, out: Path) -> dict:
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    counter = ForwardCounter(model)
    args = trl.DPOConfig(
        output_dir=str(out), per_device_train_batch_size=spec["batch_pairs"], gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1,
        max_grad_norm=1.0, max_length=spec["prompt_len"] + spec["completion_len"], logging_steps=10**6,
        save_strategy="no", report_to="none", use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, disable_tqdm=True, dataloader_num_workers=0, dataset_num_proc=None, seed=0,
        gradient_checkpointing=False)
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=spec["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])  # TRL tokenizes text
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=placeholder, processing_class=dummy_tokenizer(),
                             peft_config=lora)
    assert not trainer.precompute_ref_logps and trainer.ref_model is None  # live reference = adapters disabled
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    trainer.train_dataset = Dataset.from_list([{k: p[k] for k in keys} for p in pairs])  # already token ids

    class StepTimer(TrainerCallback):
        times, forwards = [], []

        def on_step_begin(self, *_, **__):
            C.sync(device)
            self.start, self.first = time.perf_counter(), counter.n

        def on_step_end(self, *_, **__):
            C.sync(device)
            self.times.append(time.perf_counter() - self.start)
            self.forwards.append(counter.n - self.first)

    timer = StepTimer()
    trainer.add_callback(timer)
    setup = _memory_now(device)
    trainer.train()
    w = spec["warmup"]
    return {"step_seconds": timer.times[w:], "forwards_per_step": C.median(timer.forwards[w:]),
            "setup_memory_bytes": setup}


def run_ours(variant, model, pairs, spec, device, out: Path) -> dict:
    from ofsdpo import OFSDPOConfig, OFSDPOTrainer, PreferenceData

    method, passes, batch, accum, module_batch = "dpo", "fused", spec["batch_pairs"], 1, None
    if variant in OFS_VARIANTS:
        half = max(1, spec["batch_pairs"] // 2)
        method, (passes, batch, accum, module_batch) = "ofs-dpo", OFS_VARIANTS[variant]
        batch, module_batch = (spec["batch_pairs"] if v == "B" else 0 if v == 0 else half
                               for v in (batch, module_batch))

    counter = ForwardCounter(model)
    cfg = OFSDPOConfig(
        method=method, output_dir=str(out), overwrite=True, batch_size=batch, grad_accum=accum,
        max_steps=spec["warmup"] + spec["steps"], lr=1e-5, beta=0.1, max_grad_norm=1.0, lora_r=spec["lora_r"],
        lora_alpha=2 * spec["lora_r"], lora_dropout=spec["lora_dropout"], target_modules="all-linear",
        max_length=spec["prompt_len"] + spec["completion_len"], max_prompt_length=spec["prompt_len"],
        device=str(device), save_steps=0, regret=False, progress=False, seed=0,
        module_passes=passes, module_batch_size=module_batch, malloc_keep_freed=spec.get("malloc_keep_freed", True))
    trainer = OFSDPOTrainer(model, cfg, train_data=PreferenceData(pairs=pairs), tokenizer=dummy_tokenizer())
    fills, fill_forwards = [], [0]
    fill = trainer.reference.fill

    def timed_fill(*args, **kwargs):  # each round's one-off reference scoring, outside the step's clock
        C.sync(device)
        start, first = time.perf_counter(), counter.n
        fill(*args, **kwargs)
        C.sync(device)
        fills.append(time.perf_counter() - start)
        fill_forwards[0] += counter.n - first

    trainer.reference.fill = timed_fill
    setup = _memory_now(device)
    first = counter.n
    trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    w = spec["warmup"]
    seconds = [r["pairs"] / r["pairs_per_second"] for r in rows]
    return {"step_seconds": seconds[w:], "setup_memory_bytes": setup,
            "forwards_per_step": (counter.n - first - fill_forwards[0]) / len(rows),
            "reference": {"seconds_per_fill": fills[w:], "pairs_per_fill": spec["batch_pairs"],
                          "forwards_per_fill": fill_forwards[0] / max(1, len(fills))}}


def _memory_now(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else C.rss_bytes()


def worker(variant: str, spec: dict) -> dict:
    device = C.resolve_device(spec["device"])
    dtype = C.resolve_dtype(spec["dtype"], device)
    model = C.build_model(spec["shape"], dtype, device)
    n_params = C.matmul_params(model)
    count = spec["batch_pairs"] * (spec["warmup"] + spec["steps"])
    pairs = C.random_pairs(count, spec["prompt_len"], spec["completion_len"], model.config.vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "trl":
            result = run_trl(model, pairs, spec, device, dtype, Path(tmp))
        else:
            result = run_ours(variant, model, pairs, spec, device, Path(tmp))
    result.update(variant=variant, peak_memory_bytes=C.peak_memory_bytes(device), matmul_params=n_params,
                  dtype=str(dtype).replace("torch.", ""), **C.stamp(device))
    return result


# --- the parent: spawn, combine, report ------------------------------------------------------------------------------
def spawn(variant: str, spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--spec", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"bench worker '{variant}' failed (exit {done.returncode})")
    return json.loads(lines[-1][len(MARKER):])


def summarise(variant: str, runs: list[dict], spec: dict) -> dict:
    """One variant over its repeats: the median of all its timed steps, pooled (a shared machine slows some steps
    of some runs; the pooled median resists that better than a mean); the fastest step beside it."""
    pooled = [t for r in runs for t in r["step_seconds"]]
    seconds = C.median(pooled)
    pairs = spec["batch_pairs"]
    tokens = 2 * pairs * (spec["prompt_len"] + spec["completion_len"])
    n = runs[0]["matmul_params"]
    flops = FLOPS_FACTOR[variant] * n * tokens
    peak = C.median([r["peak_memory_bytes"] for r in runs])
    setup = C.median([r["setup_memory_bytes"] for r in runs])
    out = {
        "s_per_step": seconds, "s_per_step_min": min(pooled), "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds,
        "peak_memory_bytes": peak, "setup_memory_bytes": setup, "step_memory_bytes": peak - setup,
        "forwards_per_step": runs[0]["forwards_per_step"], "model_flops_per_step": flops,
        "model_flops_per_token": f"{FLOPS_FACTOR[variant]}N", "achieved_tflops": flops / seconds / 1e12,
        "step_seconds_per_run": [r["step_seconds"] for r in runs],
    }
    peak_flops = C.peak_flops(C.resolve_device(spec["device"]), C.resolve_dtype(spec["dtype"], C.resolve_device(
        spec["device"])))
    out["mfu"] = flops / seconds / peak_flops if peak_flops else None
    if "reference" in runs[0]:
        fill = C.median([t for r in runs for t in r["reference"]["seconds_per_fill"]])
        out["reference"] = {"s_per_pair": fill / pairs, "s_per_step_of_pairs": fill,
                            "forwards_per_fill": runs[0]["reference"]["forwards_per_fill"],
                            "model_flops_per_token": f"{REFERENCE_FACTOR}N"}
        out["s_per_step_incl_reference"] = seconds + fill
    return out


def ratios(r: dict) -> dict:
    trl, dpo, ofs = r["trl"], r["dpo"], r["ofs-dpo"]
    values = {
        "dpo_ours_over_trl_time": dpo["s_per_step"] / trl["s_per_step"],
        "ofs_over_trl_time": ofs["s_per_step"] / trl["s_per_step"],
        "ofs_over_dpo_time": ofs["s_per_step"] / dpo["s_per_step"],
        "ofs_over_dpo_memory": ofs["peak_memory_bytes"] / dpo["peak_memory_bytes"],
        "dpo_ours_over_trl_memory": dpo["peak_memory_bytes"] / trl["peak_memory_bytes"],
        # honest extras: the reference scoring every new pair needs once, and memory above the loaded model
        "dpo_ours_incl_reference_over_trl_time": dpo["s_per_step_incl_reference"] / trl["s_per_step"],
        "ofs_incl_reference_over_trl_time": ofs["s_per_step_incl_reference"] / trl["s_per_step"],
        "ofs_over_dpo_step_memory": ofs["step_memory_bytes"] / max(1, dpo["step_memory_bytes"]),
        "dpo_ours_over_trl_step_memory": dpo["step_memory_bytes"] / max(1, trl["step_memory_bytes"]),
    }
    for variant, key in MEMORY_VARIANTS.items():  # the memory-saving ways against the same targets
        if variant in r:
            v = r[variant]
            values.update({
                f"ofs_{key}_over_trl_time": v["s_per_step"] / trl["s_per_step"],
                f"ofs_{key}_over_dpo_time": v["s_per_step"] / dpo["s_per_step"],
                f"ofs_{key}_over_dpo_memory": v["peak_memory_bytes"] / dpo["peak_memory_bytes"],
                f"ofs_{key}_over_dpo_step_memory": v["step_memory_bytes"] / max(1, dpo["step_memory_bytes"]),
            })
    return values


def min_time_ratios(r: dict) -> dict:
    """The time ratios on each variant's fastest step: less sensitive to other load on a shared machine."""
    fastest = {v: r[v]["s_per_step_min"] for v in r}
    values = {"dpo_ours_over_trl_time": fastest["dpo"] / fastest["trl"],
              "ofs_over_trl_time": fastest["ofs-dpo"] / fastest["trl"],
              "ofs_over_dpo_time": fastest["ofs-dpo"] / fastest["dpo"]}
    for variant, key in MEMORY_VARIANTS.items():
        if variant in fastest:
            values[f"ofs_{key}_over_dpo_time"] = fastest[variant] / fastest["dpo"]
    return values


def table(report: dict) -> str:
    mib = 2**20
    lines = ["variant            | s/step  | min s   | pairs/s | tokens/s | peak MiB | step MiB | fwd/step | TFLOP/s | MFU",
             "-------------------|---------|---------|---------|----------|----------|----------|----------|---------|------"]
    for v, r in report["results"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"{v:<18} | {r['s_per_step']:7.3f} | {r['s_per_step_min']:7.3f} | {r['pairs_per_s']:7.2f} | {r['tokens_per_s']:8.0f} | "
                     f"{r['peak_memory_bytes'] / mib:8.0f} | {r['step_memory_bytes'] / mib:8.0f} | "
                     f"{r['forwards_per_step']:8.1f} | {r['achieved_tflops']:7.3f} | {mfu}")
    ref = report["results"]["dpo"]["reference"]
    lines.append(f"\nreference fill (one-off per pair, adapters off, no grad): {ref['s_per_pair']:.4f} s/pair, "
                 f"{ref['s_per_step_of_pairs']:.3f} s per step's worth of pairs")
    lines.append("\nratio                                  | measured | target | met")
    for key, value in report["ratios"].items():
        target = TARGETS.get(key)
        met = "" if target is None else ("yes" if value <= target else "NO")
        lines.append(f"{key:<38} | {value:8.3f} | {'' if target is None else f'<= {target}':>6} | {met}")
    fastest = ", ".join(f"{k} {v:.3f}" for k, v in report["ratios_on_fastest_step"].items())
    lines.append(f"\non each variant's fastest step: {fastest}")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, 4 pairs of 64+64, 6 steps, 2 repeats")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--shape", choices=sorted(C.SHAPES), default="0.5b")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per variant")
    p.add_argument("--batch-pairs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--completion-len", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on all linear layers; alpha = 2r")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--no-malloc-keep-freed", dest="malloc_keep_freed", action="store_false",
                   help="our runs with glibc's own allocator setting (default: ofsdpo's, --malloc-keep-freed; TRL's "
                        "trainer is never changed)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} ({', '.join(ALWAYS)} are always run)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of the three variants")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.device, args.dtype = "tiny", "cpu", "float32"
        args.batch_pairs, args.prompt_len, args.completion_len, args.steps, args.warmup = 4, 64, 64, 6, 2
        args.repeats = max(args.repeats, 2)
    return args


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.worker:
        print(MARKER + json.dumps(worker(args.worker, json.loads(args.spec))), flush=True)
        return None
    spec = {k: getattr(args, k) for k in ("shape", "device", "dtype", "steps", "warmup", "batch_pairs", "prompt_len",
                                          "completion_len", "lora_r", "lora_dropout", "repeats", "malloc_keep_freed")}
    asked = set(args.variants.split(",")) | set(ALWAYS)  # the ratios need these
    if asked - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {', '.join(sorted(asked - set(VARIANTS)))}")
    if args.batch_pairs % 2:
        raise SystemExit("--batch-pairs must be even: the default ofs-dpo runs parts of half the pairs")
    variants = [v for v in VARIANTS if v in asked]
    started = time.perf_counter()
    runs = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            runs[v].append(spawn(v, spec))
    first = runs["trl"][0]
    report = {"spec": spec, "command": "python bench/step.py " + " ".join(sys.argv[1:]),
              "hardware": first["hardware"], "versions": first["versions"], "commit": first["commit"],
              "dtype": first["dtype"], "matmul_params": first["matmul_params"],
              "results": {v: summarise(v, runs[v], spec) for v in variants}}
    report["ratios"] = ratios(report["results"])
    report["ratios_on_fastest_step"] = min_time_ratios(report["results"])
    report["targets"] = {k: {"target": t, "measured": report["ratios"][k], "met": report["ratios"][k] <= t}
                         for k, t in TARGETS.items() if k in report["ratios"]}
    report["wall_seconds"] = time.perf_counter() - started
    print(f"{spec['shape']} ({first['matmul_params'] / 1e6:.1f}M matmul params), {first['dtype']}, "
          f"{spec['batch_pairs']} pairs of {spec['prompt_len']}+{spec['completion_len']} tokens, "
          f"median of {spec['steps']} steps after {spec['warmup']} warm-up, {args.repeats} repeat(s)\n"
          f"{first['hardware']}; {first['versions']}; commit {first['commit']}\n")
    print(table(report))
    if args.json:
        C.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
