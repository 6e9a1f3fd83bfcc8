"""Built-in domains: a prompt set written by this project (fixed train / held-out split) and a judge each.

| domain | prompts | judge | pulls the model toward |
|---|---|---|---|
| sentiment | 240 movie-review openings, plain text | VADER compound (independent: AFINN) | upbeat continuations |
| critic | 240 restaurant-review openings, plain text | −VADER compound (independent: −AFINN) | harsh, negative reviews |
| safety | 120 harmful requests + 120 benign look-alikes, chat | refusal detector | refusing harm, answering the rest |
| concise | 240 factual questions, chat | answer kept, −0.05 per word past 8 | short answers that keep the fact |

sentiment, critic and concise pull the model in different directions (upbeat text, harsh text, brevity), so
sequential training can forget. The refusal judge is binary and SmolLM2-135M rarely refuses, so `safety` yields few
pairs from that model (ties are skipped); it is there for stronger models and for evaluation. sentiment and critic
also have an independent judge (the AFINN lexicon) that never labels a pair and is reported beside their own, so a
gain that is specific to VADER shows.

A user's domain (`PromptDomain`) is the same idea with the user's prompts (`prompts.load_prompts`: a file, a saved
dataset, a hub name or `builtin:NAME`) and the user's judges (`judges.resolve_judges`: built-in names,
`module:function`, `hf:MODEL`, `pairwise:module:function`, weighted). Both answer `prompts(split)` and
`score(records, responses)`, which is all that on-policy rounds (`rounds.py`) and judged evaluation need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ON_PROMPTS
from .errors import ConfigError, suggest
from .judges import (
    Judge,
    afinn_critic_judge,
    afinn_judge,
    concise_judge,
    critic_judge,
    refusal_judge,
    resolve_judges,
    sentiment_judge,
)
from .prompts import BUILTIN_CHAT, builtin_records, load_prompts


@dataclass(frozen=True)
class BuiltinDomain:
    name: str
    judge: Judge
    chat: bool  # prompts go through the chat template (True) or are continued as plain text (False)
    max_new_tokens: int
    description: str
    independent_judge: Judge | None = None  # reported beside `judge`, never labels a pair (`scoring.judge_evals`)

    def prompts(self, split: str = "train") -> list[dict]:
        """[{"prompt", "meta", "split", "row", "source"}] of `split` ("train", "heldout" or "all"), in the fixed
        order; `row` is the line of the built-in file (errors name it)."""
        records = builtin_records(self.name)
        return records if split == "all" else [r for r in records if r["split"] == split]

    def score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        """The judge's scores of each record's responses (checked: real and finite, else a JudgeError)."""
        return resolve_judges(self.judge).score(records, responses)

    def independent_score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        """`score` by the independent judge."""
        return resolve_judges(self.independent_judge).score(records, responses)


DEFAULT_MAX_NEW_TOKENS = 64  # a user's domain samples this many tokens unless told otherwise (TRL's online DPO too)


@dataclass
class PromptDomain:
    """The user's prompts and judges as a domain. `records` are `prompts.load_prompts` records; `heldout` (for
    evaluation) defaults to none."""

    name: str
    records: list[dict]
    judge: object  # a judges.GroupJudge
    chat: bool
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    heldout: list[dict] = field(default_factory=list)
    description: str = ""

    def prompts(self, split: str = "train") -> list[dict]:
        return {"train": self.records, "heldout": self.heldout, "all": self.records + self.heldout}[split]

    def score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        return self.judge.score(records, responses)


DOMAINS: dict[str, BuiltinDomain] = {
    "sentiment": BuiltinDomain("sentiment", sentiment_judge, chat=BUILTIN_CHAT["sentiment"], max_new_tokens=24,
                               description="continue a movie review; VADER compound score",
                               independent_judge=afinn_judge),
    "critic": BuiltinDomain("critic", critic_judge, chat=BUILTIN_CHAT["critic"], max_new_tokens=24,
                            description="continue a restaurant review harshly; minus VADER compound score",
                            independent_judge=afinn_critic_judge),
    "safety": BuiltinDomain("safety", refusal_judge, chat=BUILTIN_CHAT["safety"], max_new_tokens=32,
                            description="refuse harmful requests, answer benign look-alikes; refusal detector"),
    "concise": BuiltinDomain("concise", concise_judge, chat=BUILTIN_CHAT["concise"], max_new_tokens=40,
                             description="answer factual questions briefly, keeping the answer"),
}


def builtin_name(name: str) -> str:
    """The built-in domain a continual domain's name stands for: `sentiment`, or `sentiment.2` for a later visit of
    it in a revisiting stream (sentiment → critic → sentiment.2: the same pairs, report set and judge; domain names
    stay unique, each names its stage's folder). Any other name is returned as it is."""
    base, dot, visit = name.rpartition(".")
    return base if dot and visit.isdigit() and base in DOMAINS else name


def require_builtin(names: list[str], where: str, alternative: str = "") -> None:
    """A ConfigError naming `where` (the flag or file) for the first name that is not a built-in domain; each command
    checks its names here, before anything loads (config knows no domain: it sits below this module)."""
    for name in names:
        if name not in DOMAINS:
            hint = suggest(name, DOMAINS)
            raise ConfigError(f"{where}: unknown domain '{name}'" + (f" ({hint})" if hint else "")
                              + f": built-in domains are {', '.join(DOMAINS)}{alternative}.")


def get_domain(name: str) -> BuiltinDomain:
    if name not in DOMAINS:
        raise KeyError(f"unknown domain '{name}': built-in domains are {', '.join(DOMAINS)}")
    return DOMAINS[name]


def prompt_domain(prompts: str, judges: list[str] | None = None, name: str | None = None, split: str | None = "train",
                  max_new_tokens: int = 0, judge_device: str | None = None, heldout: str | None = None):
    """The domain of `--prompts SOURCE --judge SPEC…`. `builtin:NAME` prompts without a judge keep NAME's judge and
    length; any other source needs a judge. `max_new_tokens` 0 keeps the domain's own (64 for the user's)."""
    builtin = DOMAINS.get(prompts.split(":")[1]) if prompts.startswith("builtin:") else None
    if not judges and builtin is None:
        raise ConfigError(f"--prompts {prompts}: give a --judge (a built-in name such as sentiment, module:function, "
                          "hf:MODEL or pairwise:module:function) to label the sampled responses.")
    judge = resolve_judges(judges, device=judge_device) if judges else resolve_judges(builtin.judge)
    loaded = load_prompts(prompts, split)
    held = load_prompts(heldout, None).records if heldout else []
    own = builtin.max_new_tokens if builtin is not None else DEFAULT_MAX_NEW_TOKENS
    chat = builtin.chat if builtin is not None else loaded.chat
    return PromptDomain(name or (builtin.name if builtin else _stem(prompts)), loaded.records, judge, chat,
                        max_new_tokens or own, held, f"prompts {prompts}, judge {', '.join(judges or [builtin.name])}")


def _stem(source: str) -> str:
    return Path(source.rstrip("/")).stem or "prompts"


def on_policy_domain(config, device: str | None = None):
    """The domain an on-policy `ofsdpo train` samples: `--on-policy NAME` (a built-in domain, its judge unless
    `--judge` replaces it) or `--prompts SOURCE --judge SPEC…`; `--max-new-tokens` overrides the domain's length."""
    judge_device = config.judge_device or device
    if config.on_policy != ON_PROMPTS:
        require_builtin([config.on_policy], "--on-policy", "; or give --on-policy bare with --prompts FILE")
        if not config.judge and not config.max_new_tokens:
            return get_domain(config.on_policy)
        return prompt_domain(f"builtin:{config.on_policy}", config.judge, max_new_tokens=config.max_new_tokens,
                             judge_device=judge_device)
    return prompt_domain(config.prompts, config.judge, max_new_tokens=config.max_new_tokens,
                         judge_device=judge_device)
