"""`ofsdpo eval`: the base model and each adapter, scored on built-in domains and on your own, side by side.

Your own domain is `--prompts FILE --judge SPEC` (prompts in TRL's prompt-only formats, judges as in `ofsdpo train
--on-policy`), with held-out pairs from `--data NAME=PATH` or sampled from the base on its prompts and judged.

Per (adapter, domain) row: held-out DPO loss and preference accuracy (against the base as reference), mean judge
score of the adapter's samples, win rate against the reference's samples, a sample-based KL(π || π_ref) estimate
and the mean response length. The base model is a row of its own ("base"): a LoRA whose B is zero, so it is the
base exactly and goes through the same code as every adapter.

Every row shares what can be shared, so that rows differ only by the adapter: one set of held-out pairs and one
reference cache per domain, one set of reference samples per domain, and the same sampling seed for every row.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import set_seed

from ..config import EvalConfig
from ..data import load_preference_data
from ..domains import get_domain, prompt_domain, require_builtin
from ..evaluation import EvalOptions, EvalSet, evaluate
from ..files import write_json
from ..models import load_model_and_tokenizer, resolve_device
from ..modules import lora_config
from ..reference import ReferenceCache
from ..rounds import RoundSettings, judged_pairs
from ..trainer import loading_bars

BASE_ROW = "base"
LEGEND = ("pref acc: share of pairs whose implicit reward ranks chosen above rejected, a tie counted as half (the base "
          "row ties on every pair: it is the reference); win rate: samples judged above the reference's, a tie as half")
COLUMNS = (("loss", "dpo loss", "{:.4f}"), ("accuracy", "pref acc", "{:.3f}"), ("judge_score", "judge", "{:+.3f}"),
           ("win_rate", "win rate", "{:.3f}"), ("kl", "KL", "{:.3f}"), ("response_words", "words", "{:.1f}"))


def attach_for_eval(base, adapters: list[str]):
    """A PeftModel holding the zero adapter `base` and every adapter folder, named adapter1, adapter2, …"""
    model = get_peft_model(base, lora_config(1, 1, 0.0, "all-linear"), adapter_name=BASE_ROW)  # B = 0: the base
    names = {}
    for i, path in enumerate(adapters, start=1):
        model.load_adapter(path, adapter_name=f"adapter{i}")
        names[f"adapter{i}"] = path
    model.eval()
    return model, names


def generated_pairs(model, tokenizer, domain, prompts: int, samples: int, seed: int,
                    batch_size: int, progress: bool) -> list[dict]:
    """Judged best-vs-worst pairs sampled from the base on the domain's held-out prompts (never trained on)."""
    set_seed(seed)
    with torch.inference_mode(), model.disable_adapter():
        pairs, _ = judged_pairs(model, tokenizer, domain, domain.prompts("heldout")[:prompts],
                                RoundSettings(samples_per_prompt=samples, batch_size=batch_size * samples),
                                progress=progress)
    return pairs


def eval_domains(cfg: EvalConfig, device) -> list:
    """The built-in domains of --domain, then the user's of --prompts/--judge (all its prompts held out)."""
    domains = [get_domain(d) for d in cfg.domain]
    if cfg.prompts is not None:
        mine = prompt_domain(cfg.prompts_source, cfg.judge, name=cfg.prompts_name, split=None,
                             judge_device=cfg.judge_device or str(device))
        mine.heldout, mine.records = mine.records, []
        domains.append(mine)
    return domains


def run_eval(cfg: EvalConfig) -> dict:
    require_builtin(cfg.domain, "--domain")  # before the model loads
    device = resolve_device(cfg.device)
    with loading_bars(cfg.progress):
        base, tokenizer, name, _ = load_model_and_tokenizer(cfg.model, cfg.gguf_file, cfg.dtype, device,
                                                            cfg.trust_remote_code)
    model, names = attach_for_eval(base, cfg.adapter)
    files, rows = cfg.data_files, []
    # --batch-size: pairs per forward and prompts per generate call; every row's samples under --seed
    options = EvalOptions(cfg.beta, cfg.batch_size, seed=cfg.seed, judge_samples=cfg.judge_samples,
                          judge_batch_size=cfg.batch_size)
    for domain in eval_domains(cfg, device):
        source = files.get(domain.name) or generated_pairs(model, tokenizer, domain, cfg.pair_prompts,
                                                           cfg.samples_per_prompt, cfg.seed, cfg.batch_size,
                                                           cfg.progress)
        pairs = load_preference_data(source, tokenizer, cfg.max_length, cfg.max_prompt_length) if source else None
        reference = ReferenceCache(len(pairs)) if pairs is not None else None
        held_out = EvalSet(domain.name, pairs, reference, domain, domain.prompts("heldout")[:cfg.judge_prompts])
        drawn: dict = {}  # the reference's judged samples: drawn for the first row, the same for every row
        for adapter, label in [(BASE_ROW, BASE_ROW), *names.items()]:
            row, = evaluate(model, tokenizer, adapter, [held_out], options, drawn)
            if adapter == BASE_ROW and row.get("accuracy") is not None:
                # the base is π_ref itself: both implicit rewards of every pair are 0 (its loss is log 2 exactly), a
                # tie, which counts as half, as win rate counts a tied sample; strict ">" would call it 0.000
                row["accuracy"] = 0.5
            rows.append({"adapter": label, "domain": domain.name, **row,
                         "pairs_source": files.get(domain.name, "generated")})
    result = {"model": name, "beta": cfg.beta, "seed": cfg.seed, "rows": rows}
    if cfg.json:
        write_json(cfg.json, result)
    return result


def format_eval_table(rows: list[dict]) -> str:
    """A fixed-width table, one line per (adapter, domain); '-' where a metric was not measured."""
    width = max(len("adapter"), *(len(r["adapter"]) for r in rows))
    header = "adapter".ljust(width) + "  " + "domain".ljust(10) + "".join(title.rjust(10) for _, title, _ in COLUMNS)
    lines = [header]
    for r in rows:
        cells = "".join((fmt.format(r[key]) if r.get(key) is not None else "-").rjust(10) for key, _, fmt in COLUMNS)
        lines.append(r["adapter"].ljust(width) + "  " + r["domain"].ljust(10) + cells)
    return "\n".join(lines + [LEGEND]) + "\n"
