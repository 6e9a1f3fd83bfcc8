"""The online stream (SPEC §1, §5): pairs in a fixed order, consumed in rounds of `round_size` pairs.

From a file, the order is the data's, repeated `epochs` times; a round (and so a step) never crosses from one pass
into the next, so each pass is steps of its own and a pair is never twice in one batch. On-policy (`--on-policy
DOMAIN` or `--prompts FILE --judge SPEC`), each round's pairs are made when the round starts (`rounds.py`): the
current leader answers the next prompts, the judge labels best vs worst, and the new pairs are appended to the
stream (ties are skipped and counted). Every sampled round's pairs are also written to `rounds/round-<k>.jsonl` (k
counts sampled rounds from 1), so a run's data can be read and replayed offline.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

from . import checkpoint as ckpt
from .errors import ConfigError
from .data import PreferenceData, load_preference_data
from .domains import on_policy_domain
from .files import write_jsonl
from .modules import activate
from .rounds import RoundSettings, RoundStats, judged_pairs
from .state import TrainerState


def fingerprint(data: PreferenceData) -> str:
    """Hash of the tokenized stream: a resume on other data (same length) would silently lose or repeat pairs."""
    digest = hashlib.sha256()
    for pair in data.pairs:
        digest.update(json.dumps([pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]]).encode())
    return digest.hexdigest()


def load_pairs(source: Any, tokenizer, cfg, flag: str | None = None) -> PreferenceData | None:
    """`source` (a path, a dataset name, a `datasets.Dataset`, rows, or a `PreferenceData` as it is) tokenized under
    the run's options; None without a source, unless `flag` names the option that requires one."""
    if source is None:
        if flag:
            raise ConfigError(f"{flag} is required: a .jsonl/.json/.parquet file or a dataset.")
        return None
    if isinstance(source, PreferenceData):  # tokenized by its maker: used as it is, so it must be cut already
        limit = cfg.max_completion_length  # the pairs are read only when there is a limit to check them against
        longest = 0 if limit is None else max(
            (len(ids) for p in source.pairs for ids in (p["chosen_ids"], p["rejected_ids"])), default=0)
        if limit is not None and longest > limit:
            raise ConfigError(f"{source.source or 'the tokenized pairs'}: a completion has {longest} tokens, more "
                              f"than --max-completion-length {cfg.max_completion_length}, and tokenized pairs are "
                              "used as they are: cut them first (ofsdpo.stream.cut_completions), or pass the rows")
        return source
    data = load_preference_data(source, tokenizer, cfg.max_length, cfg.max_prompt_length, split=cfg.data_split,
                                progress=cfg.progress)
    return cut_completions(data, cfg.max_completion_length, cfg.max_length)


def cut_completions(data: PreferenceData, max_completion_length: int | None, max_length: int) -> PreferenceData:
    """TRL's `max_completion_length`: each completion keeps its first `max_completion_length` tokens (the EOS goes
    with a cut end, as under --max-length). A pair cut here joins `truncated_completions` unless --max-length had
    already cut it (then one of its completions fills the room the prompt left). Unset: `data` untouched."""
    if max_completion_length is None:
        return data
    for pair in data.pairs:
        completions = (pair["chosen_ids"], pair["rejected_ids"])
        if max(map(len, completions)) <= max_completion_length:
            continue
        room = max_length - len(pair["prompt_ids"])
        data.stats.truncated_completions += all(len(ids) < room for ids in completions)
        pair["chosen_ids"], pair["rejected_ids"] = (ids[:max_completion_length] for ids in completions)
    return data


def open_stream(cfg, tokenizer, train_data: Any, domain: Any, device, rounds_dir: Path | None) -> "Stream":
    """A run's stream: `train_data` (else `--data`) in rounds, or, on-policy (`--on-policy`, or a continual stage's
    `domain`), pairs generated round by round from the policy, each round's rows written to `rounds_dir`."""
    if not (cfg.on_policy or domain is not None):
        return Stream(load_pairs(train_data if train_data is not None else cfg.data, tokenizer, cfg, "--data"),
                      cfg.epochs, cfg.round_size)
    domain = domain or on_policy_domain(cfg, str(device))
    settings = RoundSettings(cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                             cfg.missing_eos_penalty, cfg.generation_batch_size)
    return Stream(PreferenceData(pairs=[], source=f"on-policy:{domain.name}"), cfg.epochs, cfg.round_size, domain,
                  settings, tokenizer,
                  lambda rows: cut_completions(load_preference_data(rows, tokenizer, cfg.max_length,
                                                                    cfg.max_prompt_length),
                                               cfg.max_completion_length, cfg.max_length),
                  rounds_dir)


class Stream:
    def __init__(self, data: PreferenceData, epochs: int, round_size: int, on_policy=None,
                 settings: RoundSettings = RoundSettings(), tokenizer=None,
                 tokenize: Callable[[list[dict]], PreferenceData] | None = None, rounds_dir: Path | None = None):
        """`on_policy` is a domain (`domains.py`); `tokenizer` samples its rounds, `tokenize(rows)` turns their
        judged pairs into stream pairs, and each round's rows go to `rounds_dir` (None: not written)."""
        self.data, self.round_size, self.on_policy, self.tokenizer = data, round_size, on_policy, tokenizer
        self.order = list(range(len(data))) * epochs
        self.prompts = on_policy.prompts("train") * epochs if on_policy is not None else []
        self.settings, self.tokenize, self.rounds_dir = settings, tokenize, rounds_dir
        # the statistics of the rounds the latest `next_round` sampled (for the metrics); None when it sampled none
        self.last_round: RoundStats | None = None

    def total_steps(self, pairs_per_step: int, max_steps: int) -> int:
        passes = len(self.order) // max(len(self.data), 1)  # each pass ends its last step (`next_round`)
        steps = passes * math.ceil(len(self.data) / pairs_per_step)
        if self.on_policy is not None:  # at most: ties shrink rounds
            steps = math.ceil(len(self.prompts) / self.round_size) * (self.round_size // pairs_per_step)
        return steps if max_steps == -1 else min(steps, max_steps)

    def check_learnt(self, state: TrainerState) -> None:
        """Refuse to end an on-policy run that took no step: every sampled prompt tied, nothing was learnt."""
        if state.step == 0 and self.on_policy is not None:
            raise ConfigError(f"every sampled prompt tied under the judge ({state.ties_skipped} of "
                              f"{state.prompt_position} prompts): nothing to learn; raise --samples-per-prompt "
                              "or --temperature, or use a judge that separates the samples.")

    def fingerprint(self) -> str | None:
        """The data's hash; on-policy, the prompts' (a resume on other prompts would train on other pairs)."""
        if self.on_policy is None:
            return fingerprint(self.data)
        digest = hashlib.sha256()
        for record in self.prompts:
            digest.update(json.dumps([record["prompt"], record.get("meta", {})], sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def step_indices(self, state: TrainerState, pairs_per_step: int) -> list[int]:
        return self.order[state.position:min(state.position + pairs_per_step, state.round_end)]

    def next_round(self, state: TrainerState, model, policy: str, names, on_phase=None) -> list[int]:
        """Stream indices of the next round: the next pairs of the stream, or fresh on-policy pairs sampled from
        adapter `policy` (empty when the stream or the prompts ran out); `on_phase("sampling" | "judging")` is
        called as each phase of a sampled round starts (the progress bar shows it)."""
        self.last_round = None
        if self.on_policy is None:
            pass_end = (state.position // len(self.data) + 1) * len(self.data)
            return self.order[state.position:min(state.position + self.round_size, pass_end)]
        while state.prompt_position < len(self.prompts):
            records = self.prompts[state.prompt_position:state.prompt_position + self.round_size]
            activate(model, policy, names)
            rng = ckpt.rng_state()
            try:
                rows, stats = judged_pairs(model, self.tokenizer, self.on_policy, records, self.settings,
                                           on_phase=on_phase)
            except Exception:  # a checkpoint taken now must redo this round exactly: as if it had not started
                ckpt.set_rng_state(rng)
                raise
            state.prompt_position += len(records)
            state.ties_skipped += stats.ties
            self.last_round = stats if self.last_round is None else self.last_round.then(stats)
            if self.rounds_dir is not None:
                k = math.ceil(state.prompt_position / self.round_size)
                write_jsonl(self.rounds_dir / f"round-{k}.jsonl", rows)
            if rows:  # (a round of ties only samples the next prompts at once)
                start = len(self.data.pairs)
                self.data.pairs += [{**p, "index": start + i} for i, p in enumerate(self.tokenize(rows).pairs)]
                self.order += list(range(start, len(self.data.pairs)))
                return self.order[state.position:]
        return []

    def restore(self, generated_pairs: list[dict] | None) -> None:
        """On-policy resume: the pairs generated before the checkpoint are the stream so far."""
        if generated_pairs is not None:
            self.data.pairs = generated_pairs
            self.order = list(range(len(generated_pairs)))
