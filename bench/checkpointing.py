"""Peak memory and step time with and without `--gradient-checkpointing` (issue 15), same model, batch and LoRA.

    python bench/checkpointing.py --quick                         # CPU, tiny shape, well under a minute
    python bench/checkpointing.py --shape 0.5b --device cuda --json out.json

Each setting runs `OFSDPOTrainer.train()` (dpo, all-linear LoRA) in its own subprocess on a randomly initialised
Qwen2-shaped model (bench/_common.py) and random pairs. Peak memory: CUDA max allocated during training (the
model and its load excluded), or on CPU the growth of peak RSS over the set-up (coarse). The gradients are equal
with and without (tests/test_trainer_options.py); checkpointing trades one more forward of the base per step for
not keeping its activations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def run_one(spec: dict) -> dict:
    from step import dummy_tokenizer

    from ofsdpo import OFSDPOConfig, OFSDPOTrainer, PreferenceData

    device = torch.device(spec["device"])
    dtype = C.resolve_dtype(spec["dtype"], device)
    model = C.build_model(spec["shape"], dtype, device)
    pairs = C.random_pairs(spec["pairs"], spec["prompt_len"], spec["completion_len"],
                           C.SHAPES[spec["shape"]]["vocab_size"])
    with tempfile.TemporaryDirectory() as out:
        cfg = OFSDPOConfig(method="dpo", output_dir=out, overwrite=True, batch_size=spec["batch"],
                           max_steps=spec["steps"], lora_r=16, lora_alpha=32, lora_dropout=0.0,
                           max_length=spec["prompt_len"] + spec["completion_len"], max_prompt_length=spec["prompt_len"],
                           device=str(device), save_steps=0, regret=False, progress=False,
                           gradient_checkpointing=spec["checkpointing"])
        trainer = OFSDPOTrainer(model, cfg, train_data=PreferenceData(pairs=pairs), tokenizer=dummy_tokenizer())
        setup = C.peak_memory_bytes(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        peak = C.peak_memory_bytes(device)
    return {"checkpointing": spec["checkpointing"], "seconds_per_step": seconds / spec["steps"],
            "train_peak_bytes": peak if device.type == "cuda" else peak - setup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="70m", choices=list(C.SHAPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shape, 2 pairs of 32+32 tokens, 2 steps")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    device = C.resolve_device(args.device)
    if args.quick:
        args.shape, args.batch, args.prompt_len, args.completion_len, args.steps = "tiny", 2, 32, 32, 2
    rows = []
    for checkpointing in (False, True):
        spec = {"shape": args.shape, "device": str(device), "dtype": args.dtype, "batch": args.batch,
                "pairs": args.batch * args.steps, "prompt_len": args.prompt_len,
                "completion_len": args.completion_len, "steps": args.steps, "checkpointing": checkpointing}
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"gradient_checkpointing={checkpointing!s:<5}  peak {rows[-1]['train_peak_bytes'] / 2**20:8.1f} MiB  "
              f"{rows[-1]['seconds_per_step']:.3f} s/step")
    result = {"shape": args.shape, "batch": args.batch, "prompt_len": args.prompt_len,
              "completion_len": args.completion_len, "rows": rows, **C.stamp(device)}
    if args.json:
        C.write_json(args.json, result)


if __name__ == "__main__":
    main()
