"""Who leads and who chases in OFS-DPO, and when they swap (SPEC §3, role swap).

Every `chase_interval` optimiser steps the two modules' mean DPO losses over the window are compared; when the
chaser's is lower (strictly), it has overtaken the leader and the two swap:
  - `roles`:  the labels move; each network keeps its own learning rate;
  - `params`: the trainer exchanges weights and optimiser states, so the leader always sits in `fast` (η_F);
  - `off`:    never.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ChaseState:
    leader: str = "fast"
    swaps: int = 0
    window: dict[str, list[float]] = field(default_factory=lambda: {"fast": [], "slow": []})

    @property
    def chaser(self) -> str:
        return "slow" if self.leader == "fast" else "fast"

    def record(self, losses: dict[str, float]) -> None:
        for name in ("fast", "slow"):
            self.window[name].append(float(losses[name]))

    def end_of_window(self, step: int, interval: int, mode: str) -> bool:
        """Close the window at step multiples of `interval`; True when the chaser overtook the leader.

        With `roles` the labels swap here; with `params` the caller must exchange the weights (the leader stays
        `fast`). The window restarts either way.
        """
        if step % interval != 0 or not self.window["fast"]:
            return False
        mean = {name: sum(v) / len(v) for name, v in self.window.items()}
        self.window = {"fast": [], "slow": []}
        if mode == "off" or not mean[self.chaser] < mean[self.leader]:
            return False
        self.swaps += 1
        if mode == "roles":
            self.leader = self.chaser
        return True

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "ChaseState":
        return cls(leader=state["leader"], swaps=state["swaps"], window={k: list(v) for k, v in state["window"].items()})
