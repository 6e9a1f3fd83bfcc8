"""The online stream (SPEC §1, §5): pairs in a fixed order, consumed in rounds of `round_size` pairs.

From a file, the order is the data's, repeated `epochs` times. On-policy (`--on-policy DOMAIN`), each round's pairs
are made when the round starts: the current leader answers the next prompts, the judge labels best vs worst, and
the new pairs are appended to the stream (ties are skipped and counted).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Callable

from .data import PreferenceData
from .generation import make_pairs
from .modules import activate
from .state import TrainerState


def fingerprint(data: PreferenceData) -> str:
    """Hash of the tokenized stream: a resume on other data (same length) would silently lose or repeat pairs."""
    digest = hashlib.sha256()
    for pair in data.pairs:
        digest.update(json.dumps([pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]]).encode())
    return digest.hexdigest()


class Stream:
    def __init__(self, data: PreferenceData, epochs: int, round_size: int, on_policy=None,
                 samples_per_prompt: int = 4, tokenizer=None,
                 tokenize: Callable[[list[dict]], PreferenceData] | None = None):
        """`tokenizer` samples on-policy rounds and `tokenize(rows)` turns their judged pairs into stream pairs."""
        self.data, self.round_size, self.on_policy, self.tokenizer = data, round_size, on_policy, tokenizer
        self.order = list(range(len(data))) * epochs
        self.prompts = on_policy.prompts("train") * epochs if on_policy is not None else []
        self.samples_per_prompt, self.tokenize = samples_per_prompt, tokenize

    def total_steps(self, pairs_per_step: int, max_steps: int) -> int:
        steps = math.ceil(len(self.order) / pairs_per_step)
        if self.on_policy is not None:  # at most: ties shrink rounds
            steps = math.ceil(len(self.prompts) / self.round_size) * (self.round_size // pairs_per_step)
        return steps if max_steps == -1 else min(steps, max_steps)

    def fingerprint(self) -> str | None:
        return fingerprint(self.data) if self.on_policy is None else None

    def step_indices(self, state: TrainerState, pairs_per_step: int) -> list[int]:
        return self.order[state.position:min(state.position + pairs_per_step, state.round_end)]

    def next_round(self, state: TrainerState, model, policy: str, names, batch_size: int) -> list[int]:
        """Stream indices of the next round: the next pairs of the stream, or fresh on-policy pairs sampled from
        adapter `policy` (empty when the stream or the prompts ran out)."""
        if self.on_policy is None:
            return self.order[state.position:state.position + self.round_size]
        while state.prompt_position < len(self.prompts):
            records = self.prompts[state.prompt_position:state.prompt_position + self.round_size]
            state.prompt_position += len(records)
            activate(model, policy, names)
            rows, ties = make_pairs(model, self.tokenizer, self.on_policy, records, self.samples_per_prompt,
                                    batch_size=batch_size)
            state.ties_skipped += ties
            if rows:
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
