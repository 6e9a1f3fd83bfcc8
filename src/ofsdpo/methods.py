"""Training methods as values: the one place that maps a `--method` name to what the method does.

The trainer and the step function ask the method object — which LoRA modules it trains and at what learning rate,
its objective, its metric names, what it does after a step, which module samples and which is served — and never
compare its name. A new method is a subclass plus one line in `TRAINING_METHODS`; the continual policies, which
train one of these per stage, are in `continual/policies.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from .chasing import ChaseState
from .errors import ConfigError
from .losses import chase_loss, dpo_loss
from .modules import DPO_ADAPTERS, OFS_ADAPTERS, swap_adapters
from .scoring import select_served
from .state import TrainerState

# TRL's per-module statistics of a DPO step; a method with several modules namespaces them (`fast/`, `slow/`)
MODULE_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


def completion_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's (chosen, rejected) completion token counts, `(B,)` each, of a `[chosen; rejected]` batch (what
    the ipo loss divides its log-ratios by)."""
    return batch["completion_mask"].sum(dim=1).chunk(2)


def loss_options(cfg, lengths: tuple | None) -> dict:
    """The `--loss-type` keywords of `dpo_loss` and `chase_loss`."""
    chosen, rejected = lengths if lengths is not None else (None, None)
    return {"loss_type": cfg.loss_type, "label_smoothing": cfg.label_smoothing, "chosen_lengths": chosen,
            "rejected_lengths": rejected}


def dpo_terms(logps: dict, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, cfg, key,
              lengths: tuple | None = None) -> tuple:
    """(Σ over the micro-batch and the modules of the DPO losses, per-example stats named by `key(module, stat)`).
    `logps` maps each module to its `(chosen, rejected)` log-probs, `(B,)` each; `lengths` the completions' token
    counts (`completion_lengths`, for ipo)."""
    stats, total = {}, 0.0
    for name, (chosen, rejected) in logps.items():
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta,
                                                            **loss_options(cfg, lengths))
        total = total + losses.sum()
        values = {"loss": losses.detach(), "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                  "rewards/margins": chosen_rewards - rejected_rewards,
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                  "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
        stats.update({key(name, stat): value for stat, value in values.items()})
    return total, stats


class TrainingMethod:
    """A method trained by `OFSDPOTrainer`. The defaults are plain DPO on each of `adapters`."""

    name: str
    adapters: tuple[str, ...]

    def learning_rates(self, cfg) -> dict[str, float]:
        """Each module's learning rate (one AdamW param group per module)."""
        return {name: cfg.lr for name in self.adapters}

    def key(self, module: str, stat: str) -> str:
        """The one place metric names are built: a module's statistic, namespaced by the module when it has company."""
        return stat if len(self.adapters) == 1 else f"{module}/{stat}"

    def step_stat_keys(self) -> list[str]:
        """The summed statistics of an optimiser step, in a fixed order (every process sums the same list)."""
        return [*(self.key(m, s) for m in self.adapters for s in MODULE_STATS), "num_tokens"]

    def objective(self, logps: dict, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, cfg,
                  chase: ChaseState, lengths: tuple | None = None) -> tuple:
        """(the micro-batch's summed loss to differentiate, per-example stats under `step_stat_keys`); `lengths`:
        `completion_lengths` of the micro-batch."""
        return dpo_terms(logps, ref_chosen, ref_rejected, cfg, self.key, lengths)

    def sampling_module(self, state: TrainerState) -> str:
        """The module whose samples make an on-policy round."""
        return self.adapters[0]

    def after_step(self, state: TrainerState, row: dict, finite: bool, cfg, model, optimizer) -> dict[str, Any]:
        """Bookkeeping after optimiser step `state.step` (its metrics `row`); returns what joins the row."""
        return {}

    def serve(self, eval_scores: dict[str, float] | None, state: TrainerState, cfg) -> tuple[str, str, dict]:
        """(served module, why, the scores it was chosen on) at the end of a run (SPEC §3)."""
        return select_served(self.adapters, eval_scores, state.online_losses, cfg.chase_interval,
                             self.sampling_module(state))

    def summary(self, state: TrainerState) -> dict[str, Any]:
        """What this method adds to summary.json."""
        return {}

    def saved_modules(self) -> tuple[str, ...]:
        """Modules written to folders of their own besides the served one at the output's root."""
        return ()

    def check(self, cfg) -> None:
        """Refuse options this method cannot train with (a ConfigError naming the flag); called before loading."""


class DPO(TrainingMethod):
    """`dpo`: one LoRA module (peft's `default`), TRL's metric names as they are."""

    name, adapters = "dpo", DPO_ADAPTERS


class OFSDPO(TrainingMethod):
    """`ofs-dpo` (SPEC §3): a fast and a slow module, each a DPO learner at its own rate, coupled by the chasing
    regulariser; every `--chase-interval` steps the one with the lower window loss leads."""

    name, adapters = "ofs-dpo", OFS_ADAPTERS

    def learning_rates(self, cfg) -> dict[str, float]:
        return {"fast": cfg.lr, "slow": cfg.lr * cfg.slow_lr_ratio}  # η_F, η_S (SPEC §3)

    def step_stat_keys(self) -> list[str]:
        return ["loss", *super().step_stat_keys()[:-1], "chase/loss", "num_tokens"]

    def objective(self, logps, ref_chosen, ref_rejected, cfg, chase, lengths=None):
        total, stats = dpo_terms(logps, ref_chosen, ref_rejected, cfg, self.key, lengths)
        leader_terms, chaser_terms, gap = chase_loss(*logps[chase.leader], *logps[chase.chaser],
                                                     cfg.chase_temperature, cfg.chase_form,
                                                     **loss_options(cfg, lengths))
        if cfg.alpha > 0:  # SPEC §3: L_DPO(P) + α L_FS(P, sg Q) and L_DPO(Q) ∓ α L_FS(·) in one backward
            total = total + cfg.alpha * (leader_terms.sum() + chaser_terms.sum())
        stats["chase/loss"] = gap
        stats["loss"] = total.detach()  # the whole objective, both modules and the chase
        return total, stats

    def sampling_module(self, state):
        return state.chase.leader

    def after_step(self, state, row, finite, cfg, model, optimizer):
        """The chase window and a swap (SPEC §3, `chasing.py`)."""
        if finite:  # a NaN would decide the next leader comparison
            state.chase.record({n: row[self.key(n, "loss")] for n in self.adapters})
        if state.chase.end_of_window(state.step, cfg.chase_interval, cfg.swap) and cfg.swap == "params":
            swap_adapters(model, "fast", "slow", optimizer)
        return {"chase/leader": state.chase.leader, "chase/swaps": state.chase.swaps}

    def summary(self, state):
        return {"chase/swaps": state.chase.swaps, "chase/leader": state.chase.leader}

    def saved_modules(self):
        return self.adapters

    def check(self, cfg):
        if cfg.alpha > 0 and cfg.loss_type == "ipo" and cfg.chase_form == "minmax":
            raise ConfigError("--loss-type ipo with --chase-form minmax: the chaser's term −(Δ − 1/(2β))² has no "
                              "maximum; pass --chase-form symmetric or proximal.")


# the registry: the only place a method's name is looked up
TRAINING_METHODS: dict[str, TrainingMethod] = {"dpo": DPO(), "ofs-dpo": OFSDPO()}


def training_method(name: str) -> TrainingMethod:
    try:
        return TRAINING_METHODS[name]
    except KeyError:
        raise ConfigError(f"--method must be one of {', '.join(TRAINING_METHODS)} (got {name!r}).") from None
