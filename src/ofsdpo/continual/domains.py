"""A continual run's domains: each `--domain`'s pairs read and split into the stream, the report pairs and the memory
(SPEC §4), or for an on-policy domain its prompts and judge, with report and memory pairs sampled from the base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import ContinualConfig, DomainSpec
from ..data import PreferenceData, load_preference_data
from ..domains import get_domain, prompt_domain
from ..errors import DataError
from ..reference import ReferenceCache
from ..rounds import RoundSettings, judged_pairs
from ..stream import cut_completions


def subset(pairs: list[dict], source: str) -> PreferenceData:
    """Pairs re-indexed from 0, so each subset keys its own reference cache."""
    return PreferenceData(pairs=[{**p, "index": i} for i, p in enumerate(pairs)], source=source)


@dataclass
class Domain:
    name: str
    train: PreferenceData  # empty for an on-policy domain until its stage has sampled it
    test: PreferenceData
    memory: PreferenceData
    test_reference: ReferenceCache = None
    memory_reference: ReferenceCache = None
    train_reference: ReferenceCache = None
    on_policy: Any = None  # `prompts:PATH,judge=SPEC`: the domain (domains.PromptDomain) whose rounds the stage samples

    def __post_init__(self):
        for part in ("test", "memory", "train"):  # given (shared by runners over the same files), or new
            if getattr(self, f"{part}_reference") is None:
                setattr(self, f"{part}_reference", ReferenceCache(len(getattr(self, part))))


class DomainLoader:
    """Reads the domains of one continual run, tokenized by `tokenizer` under the run's training options.
    `reference_caches` ({pairs files and split: π_ref caches}) is shared and filled in place, so that runners over
    the same base and files (the demo's methods) score each pair's reference once."""

    def __init__(self, config: ContinualConfig, tokenizer, reference_caches: dict[tuple, dict]):
        self.config, self.tokenizer, self.reference_caches = config, tokenizer, reference_caches

    def _load(self, source: str) -> PreferenceData:
        """A pairs file tokenized as every stage would (--max-completion-length included: stages take the pairs as
        they are, and the π_ref caches score them cut)."""
        cfg = self.config.training
        return cut_completions(load_preference_data(source, self.tokenizer, cfg.max_length, cfg.max_prompt_length,
                                                    cfg.data_split), cfg.max_completion_length, cfg.max_length)

    def _load_rows(self, rows: list[dict], source: str) -> PreferenceData:
        cfg = self.config.training
        data = cut_completions(load_preference_data(rows, self.tokenizer, cfg.max_length, cfg.max_prompt_length),
                               cfg.max_completion_length, cfg.max_length)
        data.source = source
        return data

    def pairs_domain(self, spec: DomainSpec) -> Domain:
        """A domain of pairs files: its stream, report pairs (heldout=PATH, or the end of the stream, never trained
        on) and memory (memory=PATH, or carved from the report pairs)."""
        cfg, train = self.config, self._load(spec.train)
        pairs = train.pairs
        if spec.heldout:
            heldout = self._load(spec.heldout).pairs
        else:  # hold out the end of the stream: never trained on
            need = cfg.heldout_size + (0 if spec.memory else cfg.memory_size)
            if len(pairs) <= need:
                raise DataError(spec.train, f"has {len(pairs)} pairs; holding out {need} would leave none to train "
                                            "on (give heldout=PATH, or lower --heldout-size / --memory-size)")
            pairs, heldout = pairs[:-need], pairs[-need:]
        if spec.memory:
            memory = self._load(spec.memory).pairs[:cfg.memory_size]
        else:
            if len(heldout) <= cfg.memory_size:
                raise DataError(spec.heldout or spec.train, f"needs more than --memory-size ({cfg.memory_size}) "
                                                            "held-out pairs: the memory is carved from them")
            memory, heldout = heldout[:cfg.memory_size], heldout[cfg.memory_size:]
        training = cfg.training
        key = (spec.train, spec.heldout, spec.memory, cfg.heldout_size, cfg.memory_size, training.max_length,
               training.max_prompt_length, training.max_completion_length,
               training.data_split)  # the same pairs, tokenized alike
        caches = self.reference_caches.get(key, {})
        domain = Domain(spec.name, subset(pairs, spec.train), subset(heldout, spec.heldout or spec.train),
                        subset(memory, spec.memory or spec.heldout or spec.train), **caches)
        self.reference_caches[key] = {"train_reference": domain.train_reference,
                                      "test_reference": domain.test_reference,
                                      "memory_reference": domain.memory_reference}
        return domain

    def on_policy_domain(self, spec: DomainSpec, base, device: torch.device) -> Domain:
        """`NAME=prompts:PATH,judge=SPEC`: the stage samples its pairs from the policy, round by round. Its report
        and memory pairs come from heldout=PATH, or are sampled once from `base` on prompts kept out of the stream
        (a built-in domain's held-out prompts; else the last --heldout-size + --memory-size prompts)."""
        cfg, training = self.config, self.config.training
        domain = prompt_domain(spec.prompts, spec.judge, name=spec.name, max_new_tokens=training.max_new_tokens,
                               judge_device=training.judge_device or str(device))
        if spec.heldout:
            heldout = self._load(spec.heldout).pairs
        else:
            need = cfg.heldout_size + cfg.memory_size
            if spec.prompts.startswith("builtin:"):  # its own held-out prompts: never in a stream
                held_records = get_domain(spec.prompts.split(":")[1]).prompts("heldout")[:need]
            else:
                if len(domain.records) <= need:
                    raise DataError(spec.prompts, f"has {len(domain.records)} prompts; holding out {need} "
                                                  "(--heldout-size + --memory-size) would leave none to train on")
                domain.records, held_records = domain.records[:-need], domain.records[-need:]
            domain.heldout = held_records
            settings = RoundSettings(training.samples_per_prompt, training.max_new_tokens, training.temperature,
                                     training.top_p, training.missing_eos_penalty, training.generation_batch_size)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(training.seed)  # the same held-out pairs for every method of a comparison
                rows, _ = judged_pairs(base, self.tokenizer, domain, held_records, settings)
            heldout = self._load_rows(rows, f"{spec.prompts} (held-out prompts, sampled from the base)").pairs
        if len(heldout) <= cfg.memory_size:
            raise DataError(spec.heldout or spec.prompts, f"gives {len(heldout)} held-out pairs; the memory "
                                                          f"(--memory-size {cfg.memory_size}) and the report need more")
        memory, heldout = heldout[:cfg.memory_size], heldout[cfg.memory_size:]
        source = spec.heldout or spec.prompts
        return Domain(spec.name, subset([], f"on-policy:{spec.name}"), subset(heldout, source),
                      subset(memory, source), on_policy=domain)
