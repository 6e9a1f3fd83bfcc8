"""What one in-domain experiment run spends on π_ref's log-probs of its stream and selection set: the work every
later run of an `ofsdpo experiment` process now skips (they share the first run's values).

    mkdir -p experiments-output/pairs && cp docs/results/pairs/* experiments-output/pairs/
    python bench/experiment_reference.py [--experiment experiments/in-domain-sentiment.yaml] [--repeats 3]

Loads the experiment's model and pairs (sampling them first if they are not cached), attaches the LoRA modules the
runs use, and times filling fresh reference caches batch by batch as the trainer does (stream: --batch-size pairs;
selection: --eval-batch-size, default twice that).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/in-domain-sentiment.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from ofsdpo.commands.experiment import ExperimentRunner
    from ofsdpo.config import ExperimentConfig
    from ofsdpo.data import load_preference_data
    from ofsdpo.modules import DPO_ADAPTERS, OFS_ADAPTERS, attach_adapters, lora_config
    from ofsdpo.reference import ReferenceCache

    config = ExperimentConfig.from_yaml(args.experiment)
    runner = ExperimentRunner(config, Path("experiments-output") / config.name, progress=False, verbose=False)
    base, tokenizer = runner.model()
    domain = config.domains[0]
    parts = runner.split(domain)
    run = config.run_config(config.variants[0], 0, "unused", [])
    lora = lora_config(run.lora_r, run.lora_alpha, run.lora_dropout, run.target_module_list)
    model = attach_adapters(base, lora, OFS_ADAPTERS if run.method == "ofs-dpo" else DPO_ADAPTERS)
    sizes = {"train": run.batch_size, "selection": run.eval_batch_size or 2 * run.batch_size}
    data = {name: load_preference_data(parts[name], tokenizer, run.max_length, run.max_prompt_length)
            for name in sizes}
    for repeat in range(args.repeats):
        started = time.perf_counter()
        for name, batch in sizes.items():
            cache, pairs = ReferenceCache(len(data[name])), data[name].pairs
            for start in range(0, len(pairs), batch):
                cache.fill(model, pairs, list(range(start, min(start + batch, len(pairs)))),
                           tokenizer.pad_token_id, batch, run.logprob_chunk_size)
        print(f"repeat {repeat}: {time.perf_counter() - started:.1f} s for {domain}'s "
              f"{len(data['train'])} stream + {len(data['selection'])} selection pairs", flush=True)


if __name__ == "__main__":
    main()
