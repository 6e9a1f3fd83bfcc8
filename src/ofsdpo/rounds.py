"""One on-policy round (SPEC §1, TRL's online DPO): the policy answers prompts, the judge labels its samples, the
best and the worst sample of each prompt form a preference pair.

`judged_pairs` samples `samples_per_prompt` responses per prompt (merged-LoRA sampling, `generation.py`), scores
them with the domain's judge (`domains.py`: built-in, the user's functions, a reward model or a pairwise judge),
lowers the score of a response that never ended (`missing_eos_penalty`, as TRL), and pairs best against worst.
A prompt whose best and worst tie (same score or same text) gives no pair and is counted. The round's statistics
are the `online/*` metrics of the step that starts the round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .generation import sample_groups


@dataclass(frozen=True)
class RoundSettings:
    samples_per_prompt: int = 4
    max_new_tokens: int = 0  # 0: the domain's own
    temperature: float = 1.0
    top_p: float = 0.95
    missing_eos_penalty: float | None = None  # subtracted from the score of a response without EOS
    batch_size: int = 64  # rows (prompts x samples) per generate call
    # pairs per prompt: best vs worst, then the best vs the worst of the rest, … (distinct responses in each)
    pairs_per_prompt: int = 1


@dataclass
class RoundStats:
    prompts: int = 0
    ties: int = 0
    judge_score: float = float("nan")  # mean judge score of every sampled response (before any EOS penalty)
    chosen_score: float = float("nan")  # mean score of the chosen responses (after the penalty: what ranked them)
    rejected_score: float = float("nan")
    sampled_tokens: int = 0
    sample_seconds: float = 0.0
    judge_seconds: float = 0.0

    def then(self, later: "RoundStats") -> "RoundStats":
        """This round's statistics and a `later` round's as one: the rounds of ties only that a step's round
        followed (each prompt tied: no pair, no chosen score) are counted in the row of that step."""
        def mean(a: float, b: float, weight_a: int, weight_b: int) -> float:
            known = [(v, w) for v, w in ((a, weight_a), (b, weight_b)) if v == v and w > 0]  # v == v: not NaN
            return sum(v * w for v, w in known) / sum(w for _, w in known) if known else float("nan")

        paired, later_paired = self.prompts - self.ties, later.prompts - later.ties
        return RoundStats(self.prompts + later.prompts, self.ties + later.ties,
                          mean(self.judge_score, later.judge_score, self.prompts, later.prompts),
                          mean(self.chosen_score, later.chosen_score, paired, later_paired),
                          mean(self.rejected_score, later.rejected_score, paired, later_paired),
                          self.sampled_tokens + later.sampled_tokens, self.sample_seconds + later.sample_seconds,
                          self.judge_seconds + later.judge_seconds)

    def metrics(self) -> dict[str, float]:
        """The `online/*` metrics of the round (TRL's online DPO logs the same quantities as `objective/*`)."""
        return {"online/judge_score": self.judge_score, "online/chosen_score": self.chosen_score,
                "online/rejected_score": self.rejected_score, "online/ties": self.ties,
                "online/sampled_tokens": self.sampled_tokens, "online/sample_seconds": self.sample_seconds,
                "online/judge_seconds": self.judge_seconds}


def pair_row(domain, record: dict, chosen: str, rejected: str, scores: tuple[float, float]) -> dict:
    """A TRL-format preference row: conversational when the domain is chat (the record's messages, or its text
    as one user message), standard otherwise; with both scores and the prompt's source row."""
    prompt = record["prompt"]
    if domain.chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        row = {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
    else:
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    row.update(score_chosen=scores[0], score_rejected=scores[1], domain=domain.name)
    if "row" in record:
        row["prompt_row"] = record["row"]
    return row


def judged_pairs(model, tokenizer, domain, records: list[dict], settings: RoundSettings = RoundSettings(),
                 progress: bool = False, on_phase=None) -> tuple[list[dict], RoundStats]:
    """Judge-labelled pairs from samples of `model`'s active adapter; returns (pairs, the round's statistics)."""
    return judged_pairs_groups(model, tokenizer, [(domain, records)], settings, progress, on_phase)[0]


def judged_pairs_groups(model, tokenizer, tasks: list[tuple], settings: RoundSettings = RoundSettings(),
                        progress: bool = False, on_phase=None) -> list[tuple[list[dict], RoundStats]]:
    """`judged_pairs` for several (domain, records) tasks, their prompts sampled in one call (`sample_groups`:
    a decoding step costs about the same for a few rows as for a few dozen); each task's `sample_seconds` is the
    call's. `on_phase("sampling" | "judging")`, if given, is called as each phase starts."""
    on_phase = on_phase or (lambda phase: None)
    on_phase("sampling")
    tick = time.perf_counter()
    groups = [([r["prompt"] for r in records], domain.chat, settings.max_new_tokens or domain.max_new_tokens)
              for domain, records in tasks]
    sampled = sample_groups(model, tokenizer, groups, settings.samples_per_prompt, settings.temperature,
                            settings.top_p, batch_size=settings.batch_size, progress=progress)
    seconds = time.perf_counter() - tick
    on_phase("judging")
    return [_pairs(domain, records, samples, settings, seconds) for (domain, records), samples in zip(tasks, sampled)]


def _pairs(domain, records: list[dict], samples, settings: RoundSettings, sample_seconds: float):
    """Best against worst of each prompt's judged samples (ties skipped and counted), then, up to
    `settings.pairs_per_prompt`, best against worst of the samples not yet paired (a tie ends the prompt's pairs)."""
    stats = RoundStats(prompts=len(records))
    stats.sample_seconds = sample_seconds
    stats.sampled_tokens = sum(s.num_tokens for group in samples for s in group)
    tick = time.perf_counter()
    scores = domain.score(records, [[s.text for s in group] for group in samples])
    stats.judge_seconds = time.perf_counter() - tick
    every = [x for group in scores for x in group]
    stats.judge_score = sum(every) / len(every) if every else float("nan")
    pairs, chosen, rejected = [], [], []
    for record, group, raw in zip(records, samples, scores):
        penalty = settings.missing_eos_penalty or 0.0
        ranked = [(score - (0.0 if s.finished else penalty), s.text) for s, score in zip(group, raw)]
        for n in range(settings.pairs_per_prompt):
            if len(ranked) < 2:
                break
            best, worst = max(ranked, key=lambda r: r[0]), min(ranked, key=lambda r: r[0])
            if best[0] == worst[0] or best[1] == worst[1]:
                stats.ties += n == 0  # a prompt with no pair at all
                break
            pairs.append(pair_row(domain, record, best[1], worst[1], (best[0], worst[0])))
            chosen.append(best[0])
            rejected.append(worst[0])
            ranked = [r for r in ranked if r is not best and r is not worst]
    if pairs:
        stats.chosen_score, stats.rejected_score = sum(chosen) / len(chosen), sum(rejected) / len(rejected)
    return pairs, stats
