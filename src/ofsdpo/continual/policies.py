"""Continual policies as values: the one place that maps a continual `--method` name to what the method does.

A policy says which training method each stage runs (`methods.py`), what a stage trains on, whether the next stage
starts from what was served, which module of a stage is kept, and how the served module is formed from the kept
ones (SPEC §4). `continual.ContinualRunner` runs the stages and asks the policy; it never compares the name. A new
policy is a subclass plus one line in `CONTINUAL_POLICIES`.
"""

from __future__ import annotations

import copy
from typing import Any

from ..combine import recursive_weights, search_lambda, search_simplex
from ..errors import ConfigError
from ..modules import adapter_state
from ..state import TrainResult
from .selection import selection_criterion


def interleave(stream: list[dict], replay: list[dict]) -> list[dict]:
    """Spread the replay pairs evenly through the new domain's stream."""
    if not replay:
        return list(stream)
    out, every = [], max(1, len(stream) // len(replay))
    replay = list(replay)
    for i, pair in enumerate(stream):
        out.append(pair)
        if (i + 1) % every == 0 and replay:
            out.append(replay.pop(0))
    return out + replay


class ContinualPolicy:
    """Sequential training: one module carried through the domains, the stage's served module served (the
    forgetting baseline)."""

    name: str
    stage_method: str  # the training method of every stage (`methods.TRAINING_METHODS`)
    keeps_modules = False  # whether each stage adds a module to `kept` (saved with the stage for --resume)
    carries_init = True  # whether --init previous starts a stage's modules from the previous stage's served one

    def check_on_policy(self, domain_name: str) -> None:
        """Refuse an on-policy domain (pairs sampled by the stage) if this policy cannot train on one."""

    def stage_pairs(self, k: int, pairs: list[dict], earlier: list, memory_size: int,
                    per_domain: int | None = None) -> list[dict] | None:
        """Stage k's stream when it is not its domain's own `pairs` (None: the domain's, with its reference cache);
        `earlier` are the domains before it; `per_domain` is how many pairs of a stream one stage of
        --max-steps-per-domain steps trains on (None: all of them)."""
        return None

    def stage_steps(self, k: int, max_steps_per_domain: int) -> int:
        """Stage k's optimiser steps (-1: its whole stream)."""
        return max_steps_per_domain

    def serve(self, runner: Any, k: int, model, result: TrainResult, kept: list, weights: list,
              stage: dict) -> tuple[dict, Any, list]:
        """What is served after stage k: (weights, LoraConfig, combination weights over `kept`). `kept` grows by
        the stage's module when the policy keeps one; `stage` (the report's row) records how it was formed."""
        lora = copy.deepcopy(model.peft_config[result.modules[0]])
        return adapter_state(model, result.served_module), lora, weights

    def next_init(self, served: dict, served_lora, kept: list, lora_r: int) -> dict | None:
        """The weights the next stage starts from under --init previous (None: fresh)."""
        return served


class Sequential(ContinualPolicy):
    def __init__(self, name: str, stage_method: str):
        self.name, self.stage_method = name, stage_method


class Replay(ContinualPolicy):
    """`dpo-replay`: sequential DPO whose stream mixes in `--memory-size` training pairs of every earlier domain."""

    name, stage_method = "dpo-replay", "dpo"

    def check_on_policy(self, domain_name):
        raise ConfigError(f"--domain {domain_name}: dpo-replay mixes earlier pairs into a fixed stream; an "
                          "on-policy domain has none. Use another --method, or generate the pairs first.")

    def stage_pairs(self, k, pairs, earlier, memory_size, per_domain=None):
        if k == 0:
            return None
        return interleave(pairs, [p for d in earlier for p in d.train.pairs[:memory_size]])


def round_robin(streams: list[list[dict]]) -> list[dict]:
    """Pair i of each stream in turn (streams in order); when one runs out the others continue."""
    return [s[i] for i in range(max(map(len, streams), default=0)) for s in streams if i < len(s)]


class Multitask(ContinualPolicy):
    """`multitask`: the upper bound continual methods are measured against. Stage k trains a fresh DPO LoRA (no
    init carry) on the training pairs of domains 1..k+1, round-robin interleaved (`round_robin`), each pair once;
    its served module is that LoRA. Each domain gives the pairs its own stage would train on (the first
    --max-steps-per-domain x batch pairs), so stage k runs k+1 times a stage's steps: the cost grows with every
    domain, (1 + 2 + ... + K) stages' worth over K domains against K for sequential DPO."""

    name, stage_method, carries_init = "multitask", "dpo", False

    def check_on_policy(self, domain_name):
        raise ConfigError(f"--domain {domain_name}: multitask trains on every earlier domain's fixed pairs; an "
                          "on-policy domain has none. Use another --method, or generate the pairs first.")

    def stage_pairs(self, k, pairs, earlier, memory_size, per_domain=None):
        if k == 0:  # the first domain alone: its own stream and reference cache, as a fresh dpo stage
            return None
        return round_robin([d.train.pairs[:per_domain] for d in earlier] + [pairs[:per_domain]])

    def stage_steps(self, k, max_steps_per_domain):
        # every domain's share is cut to one stage's pairs already: this many steps cover the whole union once
        return max_steps_per_domain if max_steps_per_domain == -1 else (k + 1) * max_steps_per_domain

    def next_init(self, served, served_lora, kept, lora_r):
        return None


class LoraMerge(ContinualPolicy):
    """`lora-merge`: a fresh DPO LoRA per domain, merged with equal weights as the exact Σ ΔW/k (`combine_delta`:
    what peft's `add_weighted_adapter(..., "cat")` computes)."""

    name, stage_method, keeps_modules, carries_init = "lora-merge", "dpo", True, False

    def serve(self, runner, k, model, result, kept, weights, stage):
        final, lora, weights = super().serve(runner, k, model, result, kept, weights, stage)
        kept.append(final)
        served, served_lora = runner.materialise(lora, kept, [1.0 / len(kept)] * len(kept), "delta")
        stage["weights"] = {d.name: 1.0 / len(kept) for d in runner.domains[:k + 1]}
        return served, served_lora, weights

    def next_init(self, served, served_lora, kept, lora_r):
        return None


class COFSDPO(ContinualPolicy):
    """`cofs-dpo` (SPEC §4): keep each stage's best fast module and serve their linear combination, the weights
    chosen on the memory of every domain seen (`--search`, `--select-by`, `--combine`)."""

    name, stage_method, keeps_modules = "cofs-dpo", "ofs-dpo", True

    def serve(self, runner, k, model, result, kept, weights, stage):
        lora = copy.deepcopy(model.peft_config[result.modules[0]])
        kept.append(result.best["state"])
        weights, stage["lambda"], stage["search"] = self.choose_weights(runner, model, lora, kept, weights, k)
        served, served_lora = runner.materialise(lora, kept, weights)
        stage["weights"] = dict(zip([d.name for d in runner.domains[:k + 1]], weights))
        return served, served_lora, weights

    @staticmethod
    def choose_weights(runner, model, lora, kept: list, previous: list, k: int):
        """(weights over the kept modules, λ or None, every scored point) by the lowest --select-by criterion on the
        memory of every domain seen (SPEC §4; `selection.py`)."""
        if k == 0:
            return [1.0], None, []
        cfg = runner.config
        criterion = selection_criterion(cfg.select_by)
        own = runner.own_memory_losses(model, lora, kept, k) if criterion.relative else None

        def score(weights: list[float]) -> dict:
            state, candidate_lora = runner.materialise(lora, kept, weights)
            return runner.candidate_scores(model, candidate_lora, state, k, criterion, own)

        if cfg.search_method == "simplex":  # the pairwise candidates first: never worse than the recursion
            candidates = [recursive_weights(previous, lam) for lam in cfg.lambdas]
            weights, table = search_simplex(k + 1, score, cfg.search_budget, include=candidates)
            return weights, None, table
        lam, table = search_lambda(cfg.lambdas, lambda lam: score(recursive_weights(previous, lam)))
        return recursive_weights(previous, lam), lam, table

    def next_init(self, served, served_lora, kept, lora_r):
        # a delta combination stacks ranks: the next stage's modules (rank --lora-r) start from the newest kept one
        return served if served_lora.r == lora_r else kept[-1]


def describe_search(cfg) -> str:
    """How cofs-dpo's combination weights are searched (`--search`) and by what (`--select-by`), in words for the
    report."""
    if cfg.search_method == "pairwise":
        how = "pairwise recursive: θ ← λ θ_prev + (1 − λ) θ_F^(k), λ on --lambda-grid"
    else:
        how = f"simplex: Σ λ_k θ_k over all kept modules, at most {cfg.search_budget} points"
    criterion = selection_criterion(cfg.select_by)
    if criterion.name == "loss":  # the default says what it always said (the golden report.json holds it)
        return how
    budget = (f" ({cfg.select_judge_prompts} training prompts per domain x {cfg.judge_samples} samples, the same "
              "seed for every candidate)" if criterion.judged else "")
    return f"{how}; selected by {criterion.name}: {criterion.words}{budget}"


# the registry: the only place a continual method's name is looked up
CONTINUAL_POLICIES: dict[str, ContinualPolicy] = {
    "cofs-dpo": COFSDPO(), "dpo": Sequential("dpo", "dpo"), "ofs-dpo": Sequential("ofs-dpo", "ofs-dpo"),
    "dpo-replay": Replay(), "lora-merge": LoraMerge(), "multitask": Multitask(),
}


def continual_policy(name: str) -> ContinualPolicy:
    try:
        return CONTINUAL_POLICIES[name]
    except KeyError:
        raise ConfigError(f"--method must be one of {', '.join(CONTINUAL_POLICIES)} (got {name!r}).") from None
