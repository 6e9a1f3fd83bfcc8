"""One evaluation of a module, for every command that scores one: `ofsdpo eval`, the experiment runner's served
module, a continual run's served modules and the λ search's candidates.

Per domain (`EvalSet`): the held-out DPO loss and preference accuracy against the cached reference (`scoring`'s
pair scoring, every set's pairs in shared batches), and the judge metrics of the module's samples on held-out
prompts against the reference's samples, both drawn under the same seed (common random numbers). Every evaluation
option is one field of `EvalOptions`, read here and nowhere else: a command that forgets one cannot exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .data import PreferenceData
from .reference import ReferenceCache
from .scoring import common_random_numbers, heldout_scores_many, judge_evals, reference_sample_groups


@dataclass(frozen=True)
class EvalOptions:
    """How a module is evaluated; each command fills it from its own flags."""

    beta: float  # the DPO loss's β
    batch_size: int = 8  # pairs per no-grad forward (--eval-batch-size; `ofsdpo eval`: --batch-size)
    chunk_size: int = 1024  # vocabulary rows per log-softmax chunk (--logprob-chunk-size)
    seed: int = 0  # the judged samples' random numbers, the reference's and every module's alike
    judge_samples: int = 1  # judged samples per prompt (--judge-samples)
    judge_batch_size: int = 16  # prompts per generate call while judging
    judge_together: bool = True  # every set's prompts sampled in one call; False: one call per set (a row's random
    #                              numbers depend on the call's rows, so the calls are part of the result)

    @classmethod
    def of_run(cls, training, **given) -> EvalOptions:
        """The options of a run trained under `training` (`config.TrainingOptions`): its β, --eval-batch-size
        (default twice --batch-size), --logprob-chunk-size and seed; `given`: the judge's fields, or others."""
        return cls(**{"beta": training.beta, "batch_size": training.eval_batch_size or 2 * training.batch_size,
                      "chunk_size": training.logprob_chunk_size, "seed": training.seed, **given})


@dataclass
class EvalSet:
    """One domain's evaluation material: held-out pairs with their π_ref cache, and prompts to judge."""

    name: str  # keys the reference's judged scores (`evaluate`'s `reference_scores`)
    pairs: PreferenceData | None = None
    reference: ReferenceCache | None = None  # π_ref's log-probs of `pairs`, filled on first use
    judged: Any = None  # the domain whose judge scores samples (`domains.Domain`, `PromptDomain`), or None
    records: list[dict] = field(default_factory=list)  # its held-out prompt records, sampled and judged


def evaluate(model, tokenizer, adapter: str, sets: list[EvalSet], options: EvalOptions,
             reference_scores: dict[str, list[float]] | None = None, trained=None,
             per_pair: bool = False) -> list[dict]:
    """Adapter `adapter`'s row for each set: `loss`, `accuracy` and `pairs` on its pairs (if any; with `per_pair`,
    each pair's loss and correctness as "per_pair"), and on its records (if any) `scoring.judge_evals`' metrics and
    `judge_prompts`. `reference_scores` ({set name: the reference's judged scores}) is read where it holds a set and
    filled in place where not, drawn in the same calls and under the same seed as the module's samples; `trained`:
    the adapters left trainable (`modules.activate`)."""
    rows: list[dict] = [{} for _ in sets]
    scored = [(i, s) for i, s in enumerate(sets) if s.pairs is not None and len(s.pairs)]
    if scored:
        results = heldout_scores_many(model, [(s.pairs, s.reference) for _, s in scored], adapter,
                                      tokenizer.pad_token_id, options.beta, options.batch_size, options.chunk_size,
                                      trained, per_pair=per_pair)
        for (i, s), result in zip(scored, results):
            rows[i].update(result, pairs=len(s.pairs))
    judged = [(i, s) for i, s in enumerate(sets) if s.judged is not None and s.records]
    reference = reference_scores if reference_scores is not None else {}
    device = next(model.parameters()).device
    for call in [judged] if options.judge_together else [[one] for one in judged]:
        if not call:
            continue
        tasks = [(s.judged, s.records) for _, s in call]
        if any(s.name not in reference for _, s in call):  # drawn once, in the calls the module's samples are
            with common_random_numbers(options.seed, device):
                drawn = reference_sample_groups(model, tokenizer, tasks, options.judge_batch_size,
                                                options.judge_samples)
            reference.update({s.name: scores for (_, s), scores in zip(call, drawn)})
        with common_random_numbers(options.seed, device):  # the reference's draws, row for row
            results = judge_evals(model, tokenizer, tasks, adapter, options.judge_batch_size,
                                  ref_scores=[reference[s.name] for _, s in call],
                                  samples_per_prompt=options.judge_samples)
        for (i, s), result in zip(call, results):
            rows[i].update(result, judge_prompts=len(s.records))
    return rows
