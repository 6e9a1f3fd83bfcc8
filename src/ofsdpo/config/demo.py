"""`ofsdpo demo`: its config and scale settings (also an experiment's defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError
from .base import ModelOptions, _help, check_field_types, field_names

DEMO_DOMAINS = ("sentiment", "critic", "concise")


@dataclass(frozen=True)
class DemoSettings:
    """The scale of the demo."""

    prompts: int  # training prompts sampled per domain
    samples: int  # samples per prompt
    steps: int  # optimiser steps per domain
    batch_size: int
    judge_prompts: int  # held-out prompts judged per domain after every stage
    heldout: int
    memory: int
    lambda_grid: str
    eval_steps: int  # how often the best fast module is looked for
    max_new_tokens: int = 0  # cap on sampled responses, pairs and judging (0: each domain's own)
    score_domains: str = "all"  # after each stage judge every domain ("all") or those trained so far ("seen")
    # the in-domain frontier on the first domain: dpo, ofs-dpo and dpo at the slow learning rate (0 steps: none)
    frontier_steps: int = 0  # optimiser steps of each frontier run
    frontier_checkpoints: tuple[int, ...] = ()  # steps at which every module is judged, with the exact KL
    frontier_judge_prompts: int = 0  # held-out prompts judged per module and checkpoint (fewer: cheaper, noisier)


# five continual methods (multitask trains 1 + 2 + 3 stages' worth) and the frontier within ten minutes on a 2-core
# CPU: 3 steps a stage, 8 judged prompts a domain, each stage judged on the domains seen so far, the best fast module
# looked for at the stage's end only (2-core EPYC, alone: with it looked for after every step 10 min 28 s, 2661e00;
# 4 steps judged on every domain 11 min 34 s, 40e921e; 6 steps and 12 prompts 13 min 49 s, e3a02f2)
DEMO_FULL = DemoSettings(prompts=40, samples=4, steps=3, batch_size=4, judge_prompts=8, heldout=8, memory=4,
                         lambda_grid="0,0.25,0.5,0.75,1", eval_steps=3, frontier_steps=4, frontier_checkpoints=(2, 4),
                         frontier_judge_prompts=4, score_domains="seen")  # frontier: 8 prompts took 10 min 29 s
DEMO_QUICK = DemoSettings(prompts=12, samples=2, steps=2, batch_size=2, judge_prompts=4, heldout=2, memory=2,
                          lambda_grid="0,0.5,1", eval_steps=2, max_new_tokens=16, frontier_steps=2,
                          frontier_checkpoints=(1, 2), frontier_judge_prompts=2)


@dataclass
class DemoConfig:
    """`ofsdpo demo`: sequential DPO, its continual baselines (replay, multitask), sequential OFS-DPO and COFS-DPO on
    the built-in domains."""

    quick: bool = field(default=False, metadata=_help("A smaller run (a few minutes on a laptop CPU)."))
    output_dir: str = field(default="demo-output", metadata=_help("Where data, runs and report.md go."))
    model: Optional[str] = ModelOptions.model()
    gguf_file: Optional[str] = ModelOptions.gguf_file()
    device: str = ModelOptions.device()
    seed: int = field(default=0, metadata=_help("Seed of sampling and training."))
    lr: float = field(default=5e-4, metadata=_help("Learning rate of the fast (and dpo) module."))

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be > 0 (got {self.lr}).")

    field_names = classmethod(field_names)  # the flags, and the keys its YAML may hold
