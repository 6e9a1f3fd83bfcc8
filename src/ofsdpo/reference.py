"""Reference log-probs π_ref(y|x), computed once per pair and cached (SPEC §3: never per module or per step).

The reference is the base with adapters disabled (`modules.reference_mode`), so it needs no second model. The cache
is two `(N,)` tensors indexed by the pair's stream index; NaN marks pairs not yet scored. It travels in checkpoints,
so a resumed run never recomputes it.

`get` runs inside every training step: with indices already on a GPU, indexing the CPU tensors would copy them
back to the host and stall the step, so it indexes a device copy of the cache instead (two floats per pair),
refreshed only after the cache changes.
"""

from __future__ import annotations

import torch

from .logprobs import concatenated_forward, pair_logps
from .modules import reference_mode


class ReferenceCache:
    def __init__(self, num_pairs: int):
        self.chosen = torch.full((num_pairs,), float("nan"), dtype=torch.float32)
        self.rejected = torch.full((num_pairs,), float("nan"), dtype=torch.float32)
        self.computed_pairs = 0  # how many reference scorings ran: each pair exactly once
        self._on_device: dict = {}  # device -> (chosen, rejected) copies for `get`; emptied when the cache changes

    def grow_to(self, num_pairs: int) -> None:
        """Room for `num_pairs` pairs in all (on-policy rounds add pairs as they are generated)."""
        if num_pairs > len(self.chosen):
            self.extend(num_pairs - len(self.chosen))

    def extend(self, count: int) -> None:
        """Room for `count` more pairs."""
        pad = torch.full((count,), float("nan"), dtype=torch.float32)
        self.chosen, self.rejected = torch.cat([self.chosen, pad]), torch.cat([self.rejected, pad.clone()])
        self._on_device.clear()

    def missing(self, indices: list[int]) -> list[int]:
        if not indices:
            return []
        unscored = torch.isnan(self.chosen[torch.as_tensor(indices, dtype=torch.long)]).tolist()
        return [i for i, todo in zip(indices, unscored) if todo]

    @torch.no_grad()
    def fill(self, model, pairs: list[dict], indices: list[int], pad_token_id: int, batch_size: int, chunk_size: int,
             prompt_once: bool = True):
        """Score the pairs among `indices` that are not cached yet (`logprobs.pair_logps`: each prompt forwarded once
        for both responses; without `prompt_once`, one concatenated forward per batch)."""
        todo = self.missing(indices)
        if not todo:
            return
        with reference_mode(model):
            chosen, rejected = pair_logps(model, [pairs[i] for i in todo], pad_token_id, batch_size, chunk_size,
                                          prompt_once)
        self.chosen[todo] = chosen.float().cpu()
        self.rejected[todo] = rejected.float().cpu()
        self.computed_pairs += len(todo)
        self._on_device.clear()

    def fill_shared(self, model, pairs: list[dict], indices: list[int], processes, pad_token_id: int,
                    batch_size: int, chunk_size: int, make_batch) -> None:
        """`fill` with several processes: each scores a share, then all share all. Under a sharded base every
        process runs as many forwards as the busiest (the all-gathers must match): the surplus ones run on
        `make_batch(indices)` of a stand-in pair, their values unused."""
        todo = self.missing(indices)
        mine = todo[processes.index::processes.count]
        # a sharded base runs the same forwards on every process: batches of whole pairs, counted below
        self.fill(model, pairs, mine, pad_token_id, batch_size, chunk_size, prompt_once=not processes.sharded)
        if processes.sharded and todo:
            batches = [-(-len(share) // batch_size) for share in (todo[0::processes.count], mine)]
            with reference_mode(model):
                for _ in range(batches[0] - batches[1]):
                    concatenated_forward(model, make_batch(todo[:1]), chunk_size)
        if processes.distributed and todo:
            scored = torch.stack([self.chosen[todo], self.rejected[todo]]).nan_to_num(0.0)
            scored = processes.sum(scored)  # each pair was scored by exactly one process
            self.set(todo, scored[0], scored[1])
            self.computed_pairs += len(todo) - len(mine)

    def set(self, indices: list[int], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Store scores computed elsewhere (another process's share of a round)."""
        self.chosen[indices], self.rejected[indices] = chosen.float().cpu(), rejected.float().cpu()
        self._on_device.clear()

    def get(self, indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if indices.device.type == "cpu":
            return self.chosen[indices].to(device), self.rejected[indices].to(device)
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.chosen.to(device), self.rejected.to(device))
        chosen, rejected = self._on_device[key]
        indices = indices.to(device)
        return chosen[indices], rejected[indices]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ref_chosen_logps": self.chosen, "ref_rejected_logps": self.rejected}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.chosen = state["ref_chosen_logps"].clone()
        self.rejected = state["ref_rejected_logps"].clone()
        self._on_device.clear()
