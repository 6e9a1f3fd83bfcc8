"""Generation throughput of on-policy pair sampling: batched `generate` with a KV cache, new tokens per second.

    python bench/generate.py --quick                        # CPU, tiny model, with a no-KV-cache baseline
    python bench/generate.py --shape 0.5b --device cuda --json gen.json

It calls `model.generate` the way `ofsdpo.generation.sample` does (sampling, temperature 1, top-p 0.95,
`num_return_sequences` samples per prompt, LoRA adapter active, KV cache on), on random prompt ids; every sample
is forced to `--new-tokens` tokens (`min_new_tokens`) so the count of generated tokens is exact. Tokenizing,
decoding and judging are not timed. vLLM is reported as unavailable when it is not installed: there is no vLLM
backend in ofsdpo yet.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import _common as C  # also puts src/ on sys.path
import torch


def build_policy(spec: dict, device, dtype):
    from ofsdpo.modules import DPO_ADAPTERS, attach_adapters, lora_config

    model = C.build_model(spec["shape"], dtype, device)
    policy = attach_adapters(model, lora_config(spec["lora_r"], 2 * spec["lora_r"], 0.0, "all-linear"), DPO_ADAPTERS)
    return policy.eval()


@torch.no_grad()
def time_generate(policy, prompts: torch.Tensor, spec: dict, use_cache: bool, device) -> list[float]:
    """Seconds per `generate` call, first call (warm-up) dropped."""
    times = []
    for _ in range(spec["repeats"] + 1):
        C.sync(device)
        start = time.perf_counter()
        out = policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                              temperature=1.0, top_p=0.95, max_new_tokens=spec["new_tokens"],
                              min_new_tokens=spec["new_tokens"], num_return_sequences=spec["samples"],
                              pad_token_id=C.PAD_ID, use_cache=use_cache)
        C.sync(device)
        times.append(time.perf_counter() - start)
        assert out.shape[1] == prompts.shape[1] + spec["new_tokens"]
    return times[1:]


def run(spec: dict) -> dict:
    device = C.resolve_device(spec["device"])
    dtype = C.resolve_dtype(spec["dtype"], device)
    policy = build_policy(spec, device, dtype)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, policy.config.vocab_size, (spec["prompts"], spec["prompt_len"]), generator=g)
    prompts = prompts.to(device)
    new_tokens = spec["prompts"] * spec["samples"] * spec["new_tokens"]
    modes = [("kv_cache", True)] + ([("no_cache", False)] if spec["no_cache_baseline"] else [])
    results = {}
    for name, use_cache in modes:
        seconds = C.median(time_generate(policy, prompts, spec, use_cache, device))
        results[name] = {"s_per_call": seconds, "new_tokens_per_call": new_tokens,
                         "new_tokens_per_s": new_tokens / seconds}
    if "no_cache" in results:
        results["kv_cache_speedup"] = results["no_cache"]["s_per_call"] / results["kv_cache"]["s_per_call"]
    results["vllm"] = ("installed, but ofsdpo has no vLLM backend yet" if importlib.util.find_spec("vllm")
                       else "not installed: no vLLM figure")
    return {"spec": spec, "dtype": str(dtype).replace("torch.", ""), "peak_memory_bytes": C.peak_memory_bytes(device),
            "matmul_params": C.matmul_params(policy.get_base_model()), "results": results, **C.stamp(device)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, with the no-KV-cache baseline")
    p.add_argument("--json", type=Path)
    p.add_argument("--shape", choices=sorted(C.SHAPES), default="0.5b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", type=int, default=16, help="prompts per generate call (generation batch_size)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (best and worst make a pair)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call")
    p.add_argument("--no-cache-baseline", action="store_true", help="also time use_cache=False")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.device, args.dtype, args.prompts, args.samples = "tiny", "cpu", "float32", 4, 4
        args.prompt_len, args.new_tokens, args.repeats, args.no_cache_baseline = 32, 32, 3, True
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    spec = {k: getattr(args, k) for k in ("shape", "device", "dtype", "prompts", "samples", "prompt_len",
                                          "new_tokens", "lora_r", "repeats", "no_cache_baseline")}
    report = run(spec)
    r = report["results"]
    print(f"{spec['shape']} ({report['matmul_params'] / 1e6:.1f}M matmul params), {report['dtype']}, "
          f"{spec['prompts']} prompts x {spec['samples']} samples, {spec['prompt_len']} prompt + "
          f"{spec['new_tokens']} new tokens\n{report['hardware']}; {report['versions']}; commit {report['commit']}\n")
    print("mode     | s/call  | new tokens/s")
    for name in ("kv_cache", "no_cache"):
        if name in r:
            print(f"{name:<8} | {r[name]['s_per_call']:7.3f} | {r[name]['new_tokens_per_s']:10.1f}")
    if "kv_cache_speedup" in r:
        print(f"KV cache speed-up: {r['kv_cache_speedup']:.2f}x")
    print(f"peak memory: {report['peak_memory_bytes'] / 2**20:.0f} MiB; vLLM: {r['vllm']}")
    if args.json:
        C.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
