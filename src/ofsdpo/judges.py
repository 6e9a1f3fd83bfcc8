"""Programmatic judges: stand-ins for a human annotator that give each response a score (higher is better).

A judge is any callable `judge(prompt, response, meta) -> float`, where `meta` is the prompt record's metadata
(for instance whether a request is harmful, or the answer a question expects). The built-in ones:

- `sentiment_judge`: VADER's compound score of the response, in [-1, 1] (the controlled-sentiment task of the DPO
  paper). Needs the `vaderSentiment` package.
- `critic_judge`: minus VADER's compound score: a harsh critic that prefers negative reviews.
- `refusal_judge`: +1 for refusing a harmful request or answering a benign one, −1 for the opposite, detected by
  refusal phrases; `meta["harmful"]` says which kind the request is.
- `concise_judge`: +1 if the expected answer (`meta["answer"]`) appears, minus 0.05 per word beyond 8, in [-1, 1];
  0 (or less) when the answer is missing. Brevity with the answer kept.

`reward_model_judge(name)` wraps a Hugging Face sequence-classification reward model instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

Judge = Callable[[str, str, dict], float]

REFUSAL_PATTERNS = [
    r"\bI can(?:'|no)?t\b", r"\bI cannot\b", r"\bI won'?t\b", r"\bI'?m (?:sorry|not able|unable)\b",
    r"\bI am (?:sorry|not able|unable)\b", r"\bI (?:must|have to) (?:decline|refuse)\b", r"\bI'?d rather not\b",
    r"\b(?:cannot|can't|won't) (?:help|assist|provide|support)\b", r"\bnot (?:able|going) to help\b",
    r"\bas an ai\b", r"\bI do not (?:feel comfortable|provide)\b",
]
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise RuntimeError("the sentiment judge needs VADER: pip install vaderSentiment") from None
    return SentimentIntensityAnalyzer()


def sentiment_judge(prompt: str, response: str, meta: dict | None = None) -> float:
    return float(_vader().polarity_scores(response)["compound"])


def critic_judge(prompt: str, response: str, meta: dict | None = None) -> float:
    """The harsh critic: minus VADER's compound score (negative reviews preferred)."""
    return -sentiment_judge(prompt, response, meta)


def is_refusal(response: str) -> bool:
    """A refusal phrase in the first 200 characters (where models put them)."""
    return bool(_REFUSAL.search(response[:200]))


def refusal_judge(prompt: str, response: str, meta: dict | None = None) -> float:
    harmful = bool((meta or {}).get("harmful"))
    if not response.strip():
        return -1.0
    return 1.0 if is_refusal(response) == harmful else -1.0


def concise_judge(prompt: str, response: str, meta: dict | None = None) -> float:
    answer = str((meta or {}).get("answer", "")).strip().lower()
    words = len(response.split())
    found = bool(answer) and answer in response.lower()
    score = (1.0 if found else 0.0) - 0.05 * max(0, words - 8)
    return max(-1.0, min(1.0, score))


BUILTIN_JUDGES: dict[str, Judge] = {"sentiment": sentiment_judge, "critic": critic_judge, "refusal": refusal_judge, "concise": concise_judge}


def reward_model_judge(name: str, device: str = "cpu") -> Judge:
    """A Hugging Face sequence-classification reward model as a judge: its logit for (prompt + response)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()

    @torch.no_grad()
    def judge(prompt: str, response: str, meta: dict | None = None) -> float:
        inputs = tokenizer(prompt + response, return_tensors="pt", truncation=True).to(device)
        return float(model(**inputs).logits[0, -1])

    return judge


def resolve_judge(spec: str | Judge) -> Judge:
    """A judge by built-in name, `module:function`, `hf:<reward model>`, or a callable."""
    if callable(spec):
        return spec
    if spec in BUILTIN_JUDGES:
        return BUILTIN_JUDGES[spec]
    if spec.startswith("hf:"):
        return reward_model_judge(spec[3:])
    if ":" in spec:
        import importlib

        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unknown judge {spec!r}: use {', '.join(BUILTIN_JUDGES)}, module:function or hf:<model>")
