"""Generation throughput of on-policy pair sampling: ours (merged LoRA) against `generate`, new tokens per second.

    python bench/generate.py --quick                        # CPU, tiny model, with a no-KV-cache baseline
    python bench/generate.py --model smollm2                # the embedded SmolLM2-135M-Instruct, chat prompts
    python bench/generate.py --shape 0.5b --device cuda --json gen.json

The same prompts are sampled, under the same seed, in one run, by:

- `generate_unmerged`: `model.generate` on the peft model, its LoRA adapter active and unmerged, `num_return_sequences`
  samples per prompt, KV cache on, sampling at temperature 1, top-p 0.95: how `ofsdpo.generation.sample` sampled
  before issue 14;
- `ours_unmerged`: `ofsdpo.generation.sample_token_ids(..., merge=False)`: our decoding, peft's unmerged layers;
- `ours_merged`: `ofsdpo.generation.sample_token_ids` as the package samples: the adapter merged into the base.

`merged_over_unmerged` is ours_merged's new tokens/s over generate_unmerged's (the speed-up of issue 14);
`merge_alone` is ours_merged's over ours_unmerged's. Every sample is forced to `--new-tokens` tokens
(`min_new_tokens`), so the count of generated tokens is exact and every mode does the same work (real sampling
also stops rows at EOS). The timed calls include merging and restoring the base weights; tokenizing, decoding and
judging are not timed. Shapes (`--shape`) are random Qwen2-shaped models on random prompt ids; `--model smollm2`
is the embedded SmolLM2-135M-Instruct GGUF (found as `ofsdpo.models` finds it, dequantized by transformers) with a
random LoRA (non-zero B) on the built-in safety domain's prompts through the chat template. vLLM is reported as
unavailable when it is not installed: there is no vLLM backend in ofsdpo yet.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import _common as C  # also puts src/ on sys.path
import torch

MODES = ("generate_unmerged", "ours_unmerged", "ours_merged")


def attach_lora(model, spec: dict):
    """One LoRA adapter on every linear layer, B drawn at random (peft starts B at zero: merging would add 0)."""
    from ofsdpo.modules import DPO_ADAPTERS, attach_adapters, lora_config

    policy = attach_adapters(model, lora_config(spec["lora_r"], 2 * spec["lora_r"], 0.0, "all-linear"), DPO_ADAPTERS)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return policy.eval()


def shape_setup(spec: dict, device, dtype):
    """(policy, prompt ids, eos id, pad id) of a random model of `spec["shape"]` on random prompt ids."""
    policy = attach_lora(C.build_model(spec["shape"], dtype, device), spec)
    g = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(3, policy.config.vocab_size, (spec["prompts"], spec["prompt_len"]), generator=g)
    return policy, ids.tolist(), policy.config.eos_token_id, C.PAD_ID


def smollm2_setup(spec: dict, device, dtype):
    """(policy, prompt ids, eos id, pad id) of the embedded SmolLM2-135M-Instruct on chat-formatted prompts."""
    from ofsdpo.domains import get_domain
    from ofsdpo.generation import render_prompt
    from ofsdpo.models import embedded_model, load_model, load_tokenizer

    name, gguf = embedded_model()  # located with importlib.util.find_spec, never imported
    tokenizer = load_tokenizer(name, gguf)
    model = load_model(name, gguf, str(dtype).replace("torch.", ""), device)
    records = get_domain("safety").prompts("heldout")
    prompts = [records[i % len(records)]["prompt"] for i in range(spec["prompts"])]
    ids = [tokenizer(render_prompt(tokenizer, p, True), add_special_tokens=False)["input_ids"] for p in prompts]
    return attach_lora(model, spec), ids, tokenizer.eos_token_id, tokenizer.pad_token_id


def left_padded(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in ids)
    rows = torch.tensor([[pad_id] * (width - len(r)) + r for r in ids], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)
    return rows, mask


def sampler(mode: str, policy, ids: list[list[int]], spec: dict, eos: int, pad: int, device, use_cache=True):
    """A function drawing every sample once in `mode`; returns the number of new tokens it made."""
    from ofsdpo.generation import sample_token_ids

    n, k = spec["new_tokens"], spec["samples"]
    if mode.startswith("generate"):
        rows, mask = left_padded(ids, pad, device)

        @torch.no_grad()
        def draw() -> int:
            out = policy.generate(input_ids=rows, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                                  max_new_tokens=n, min_new_tokens=n, num_return_sequences=k, pad_token_id=pad,
                                  eos_token_id=eos, use_cache=use_cache)
            assert out.shape == (len(ids) * k, rows.shape[1] + n)
            return out.shape[0] * n
        return draw

    def draw() -> int:
        out = sample_token_ids(policy, ids, k, n, 1.0, 0.95, batch_size=len(ids) * k, eos_token_ids=(eos,),
                               pad_token_id=pad, min_new_tokens=n, merge=mode == "ours_merged")
        lengths = [len(tokens) for group in out for tokens, _ in group]
        assert lengths == [n] * (len(ids) * k)
        return sum(lengths)
    return draw


def time_calls(draw, spec: dict, device) -> tuple[float, int]:
    """(median seconds per call, new tokens per call), first call (warm-up) dropped; each call from one seed."""
    times, tokens = [], 0
    for _ in range(spec["repeats"] + 1):
        torch.manual_seed(spec["seed"])
        C.sync(device)
        start = time.perf_counter()
        tokens = draw()
        C.sync(device)
        times.append(time.perf_counter() - start)
    return C.median(times[1:]), tokens


def time_merge(policy, device, repeats: int = 3) -> float:
    """Median seconds to merge the adapter into the base and put the base back (part of every ours_merged call)."""
    from ofsdpo.generation import merged

    times = []
    for _ in range(repeats):
        C.sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), merged(policy):
            C.sync(device)
        C.sync(device)
        times.append(time.perf_counter() - start)
    return C.median(times)


def run(spec: dict) -> dict:
    device = C.resolve_device(spec["device"])
    dtype = C.resolve_dtype(spec["dtype"], device)
    setup = smollm2_setup if spec["model"] == "smollm2" else shape_setup
    policy, ids, eos, pad = setup(spec, device, dtype)
    modes = [(m, True) for m in MODES] + ([("generate_no_cache", False)] if spec["no_cache_baseline"] else [])
    results = {}
    for name, use_cache in modes:
        seconds, tokens = time_calls(sampler(name, policy, ids, spec, eos, pad, device, use_cache), spec, device)
        results[name] = {"s_per_call": seconds, "new_tokens_per_call": tokens, "new_tokens_per_s": tokens / seconds}
    results["merge_restore_s"] = time_merge(policy, device)
    speed = {name: r["new_tokens_per_s"] for name, r in results.items() if isinstance(r, dict)}
    results["merged_over_unmerged"] = speed["ours_merged"] / speed["generate_unmerged"]
    results["merge_alone"] = speed["ours_merged"] / speed["ours_unmerged"]
    if "generate_no_cache" in speed:
        results["kv_cache_speedup"] = speed["generate_unmerged"] / speed["generate_no_cache"]
    results["vllm"] = ("installed, but ofsdpo has no vLLM backend yet" if importlib.util.find_spec("vllm")
                       else "not installed: no vLLM figure")
    return {"spec": spec, "dtype": str(dtype).replace("torch.", ""), "prompt_tokens": [len(r) for r in ids],
            "peak_memory_bytes": C.peak_memory_bytes(device),
            "matmul_params": C.matmul_params(policy.get_base_model()), "results": results, **C.stamp(device)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, with the no-KV-cache baseline")
    p.add_argument("--json", type=Path)
    p.add_argument("--model", choices=["shape", "smollm2"], default="shape",
                   help="smollm2: the embedded SmolLM2-135M-Instruct GGUF on the safety domain's chat prompts")
    p.add_argument("--shape", choices=sorted(C.SHAPES), default="0.5b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", type=int, default=16, help="prompts per call (all decoded together)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (best and worst make a pair)")
    p.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens (shapes only)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (shapes), 32 (smollm2)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per mode after one warm-up call")
    p.add_argument("--no-cache-baseline", action="store_true", help="also time generate with use_cache=False")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.shape, args.device, args.dtype, args.prompts, args.samples = "shape", "tiny", "cpu", \
            "float32", 4, 4
        args.prompt_len, args.new_tokens, args.repeats, args.no_cache_baseline = 32, 32, 3, True
    if args.new_tokens is None:
        args.new_tokens = 32 if args.model == "smollm2" else 128
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    spec = {k: getattr(args, k) for k in ("model", "shape", "device", "dtype", "prompts", "samples", "prompt_len",
                                          "new_tokens", "lora_r", "seed", "repeats", "no_cache_baseline")}
    report = run(spec)
    r = report["results"]
    what = "SmolLM2-135M-Instruct (GGUF)" if spec["model"] == "smollm2" else spec["shape"]
    prompt = report["prompt_tokens"]
    print(f"{what} ({report['matmul_params'] / 1e6:.1f}M matmul params), {report['dtype']}, LoRA r {spec['lora_r']}, "
          f"{spec['prompts']} prompts x {spec['samples']} samples, {min(prompt)}-{max(prompt)} prompt + "
          f"{spec['new_tokens']} new tokens\n{report['hardware']}; {report['versions']}; commit {report['commit']}\n")
    print("mode              | s/call  | new tokens/s")
    for name in (*MODES, "generate_no_cache"):
        if name in r:
            print(f"{name:<17} | {r[name]['s_per_call']:7.3f} | {r[name]['new_tokens_per_s']:10.1f}")
    print(f"merged_over_unmerged (ours merged vs generate unmerged): {r['merged_over_unmerged']:.2f}x; "
          f"merge alone: {r['merge_alone']:.2f}x (merging and restoring the base: {r['merge_restore_s']:.3f} s "
          "a call)")
    if "kv_cache_speedup" in r:
        print(f"KV cache speed-up (generate): {r['kv_cache_speedup']:.2f}x")
    print(f"peak memory: {report['peak_memory_bytes'] / 2**20:.0f} MiB; vLLM: {r['vllm']}")
    if args.json:
        C.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
