"""Adapter slots for scoring a continual stage's modules (the served module, the λ search's candidates): a stage's
trained adapters, free once its modules are saved, are borrowed when their shape fits, instead of injecting new
LoRA layers into every target module of the model for each stage (peft's add/delete_adapter walk the whole
model, and scoring runs many times per stage)."""

from __future__ import annotations

from ..modules import activate, load_adapter_state


def _fits(held, lora) -> bool:
    """Whether an adapter configured as `held` can hold a module configured as `lora` (dropout aside: scoring
    runs without it)."""
    keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
    return all(getattr(held, k, None) == getattr(lora, k, None) for k in keys)


def _load_slot(model, name: str, lora, state: dict) -> None:
    """Adapter `name` holding `state`. The slot is kept between calls while its shape stays the same; the stage's
    `model.unload()` strips it with the rest."""
    held = model.peft_config.get(name)
    if held is not None and not _fits(held, lora):
        activate(model, next(n for n in model.peft_config if n != name))  # never delete the active adapter
        model.delete_adapter(name)
        held = None
    if held is None:
        model.add_adapter(name, lora)
    load_adapter_state(model, name, state)


class Slots:
    """The adapters that hold modules to score: `borrow` lends a stage's trained adapters ({slot: adapter}) until
    `release`."""

    def __init__(self):
        self.borrowed: dict[str, str] = {}

    def borrow(self, adapters) -> None:
        """Lend the stage's trained adapters (in order) to the "served" and "candidate" slots; the policy has
        cloned what it keeps."""
        self.borrowed = dict(zip(("served", "candidate"), adapters))

    def release(self) -> None:
        self.borrowed = {}

    def load(self, model, name: str, lora, state: dict) -> str:
        """The adapter now holding `state` for slot `name`: the stage's trained adapter borrowed for it when its
        shape fits, else an adapter of that name (`_load_slot`)."""
        borrowed = self.borrowed.get(name)
        if borrowed is not None and _fits(model.peft_config[borrowed], lora):
            load_adapter_state(model, borrowed, state)
            return borrowed
        _load_slot(model, name, lora, state)
        return name
