"""Built-in domains: a prompt set written by this project (fixed train / held-out split) and a judge each.

| domain | prompts | judge | pulls the model toward |
|---|---|---|---|
| sentiment | 240 movie-review openings, plain text | VADER compound | upbeat continuations |
| critic | 240 restaurant-review openings, plain text | −VADER compound | harsh, negative reviews |
| safety | 120 harmful requests + 120 benign look-alikes, chat | refusal detector | refusing harm, answering the rest |
| concise | 240 factual questions, chat | answer kept, −0.05 per word past 8 | short answers that keep the fact |

sentiment, critic and concise pull the model in different directions (upbeat text, harsh text, brevity), so
sequential training can forget. The refusal judge is binary and SmolLM2-135M rarely refuses, so `safety` yields few
pairs from that model (ties are skipped); it is there for stronger models and for evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from .judges import Judge, concise_judge, critic_judge, refusal_judge, sentiment_judge


@dataclass(frozen=True)
class BuiltinDomain:
    name: str
    judge: Judge
    chat: bool  # prompts go through the chat template (True) or are continued as plain text (False)
    max_new_tokens: int
    description: str

    def prompts(self, split: str = "train") -> list[dict]:
        """[{"prompt", "meta", "split"}] of `split` ("train", "heldout" or "all"), in the fixed order."""
        text = resources.files("ofsdpo.builtin").joinpath(f"{self.name}.jsonl").read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return records if split == "all" else [r for r in records if r["split"] == split]


DOMAINS: dict[str, BuiltinDomain] = {
    "sentiment": BuiltinDomain("sentiment", sentiment_judge, chat=False, max_new_tokens=24,
                               description="continue a movie review; VADER compound score"),
    "critic": BuiltinDomain("critic", critic_judge, chat=False, max_new_tokens=24,
                            description="continue a restaurant review harshly; minus VADER compound score"),
    "safety": BuiltinDomain("safety", refusal_judge, chat=True, max_new_tokens=32,
                            description="refuse harmful requests, answer benign look-alikes; refusal detector"),
    "concise": BuiltinDomain("concise", concise_judge, chat=True, max_new_tokens=40,
                             description="answer factual questions briefly, keeping the answer"),
}


def get_domain(name: str) -> BuiltinDomain:
    if name not in DOMAINS:
        raise KeyError(f"unknown domain '{name}': built-in domains are {', '.join(DOMAINS)}")
    return DOMAINS[name]
