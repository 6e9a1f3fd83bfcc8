"""How cofs-dpo ranks its candidate combinations (`--select-by`, issue 28): the one place a criterion's name is
looked up. Each criterion is a pure function of the candidate's per-domain values on the memory of every domain seen;
the λ search (`combine.search_lambda`, `combine.search_simplex`) keeps the candidate whose value is lowest.

- `loss`: the memory DPO loss pooled over all seen domains' pairs (SPEC §4; a domain with more pairs weighs more);
- `balanced`: the mean over domains of rel_d = loss_d(candidate) / loss_d(domain d's own kept module), so each
  domain weighs the same and a domain whose losses are larger (say 10x) weighs no more;
- `worst`: the largest rel_d (minimax: no domain left far behind its own module);
- `judge`: −(mean over domains of the mean judge score of the candidate's samples on that domain's training prompts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Criterion:
    name: str
    relative: bool  # needs each domain's own kept module's memory loss (the denominator of rel_d)
    judged: bool  # needs judged samples on each domain's memory prompts
    value: Callable[[dict[str, dict]], float]  # {domain: its values} -> the number the search minimises
    words: str  # for the report (`policies.describe_search`)


def pooled_loss(domains: dict[str, dict]) -> float:
    """The pair-weighted mean memory loss, summed in domain order exactly as before the option (bit-identical)."""
    total = sum(v["pairs"] for v in domains.values())
    return sum(v["loss"] * v["pairs"] for v in domains.values()) / total


def pooled_accuracy(domains: dict[str, dict]) -> float:
    total = sum(v["pairs"] for v in domains.values())
    return sum(v["accuracy"] * v["pairs"] for v in domains.values()) / total


def balanced(domains: dict[str, dict]) -> float:
    return sum(v["relative"] for v in domains.values()) / len(domains)


def worst(domains: dict[str, dict]) -> float:
    return max(v["relative"] for v in domains.values())


def judged(domains: dict[str, dict]) -> float:
    # a higher judge score is better; the search minimises
    return -sum(v["judge"] for v in domains.values()) / len(domains)


SELECTION_CRITERIA: dict[str, Criterion] = {
    "loss": Criterion("loss", False, False, pooled_loss, "the lowest memory DPO loss pooled over the seen domains"),
    "balanced": Criterion("balanced", True, False, balanced,
                          "the lowest mean over domains of the memory loss relative to the domain's own module"),
    "worst": Criterion("worst", True, False, worst,
                       "the lowest worst-domain memory loss relative to the domain's own module"),
    "judge": Criterion("judge", False, True, judged,
                       "the highest mean over domains of the judge score of samples on training prompts"),
}


def selection_criterion(name: str) -> Criterion:
    try:
        return SELECTION_CRITERIA[name]
    except KeyError:
        raise ConfigError(f"--select-by must be one of {', '.join(SELECTION_CRITERIA)} (got {name!r}).") from None


def candidate_row(criterion: Criterion, domains: dict[str, dict], own_losses: dict[str, float] | None) -> dict:
    """A candidate's table row for the search (`combine._rank` reads "criterion", then "memory_accuracy"): the pooled
    memory loss and accuracy, each domain's values ({"loss", "accuracy", and "relative" / "judge" where the criterion
    reads them}) and the criterion's value. Under `loss` the row is the pooled pair alone, as before the option (the
    criterion is "memory_loss", which `_rank` reads when a row has no "criterion"). `domains`: {name: {"loss",
    "accuracy", "pairs"[, "judge"]}} in domain
    order; `own_losses`: {name: the domain's own kept module's memory loss}, for a relative criterion."""
    values = {name: dict(v) for name, v in domains.items()}
    row = {"memory_loss": pooled_loss(values), "memory_accuracy": pooled_accuracy(values)}
    if criterion.name == "loss":  # the row of before: the golden report.json holds it (its criterion: memory_loss)
        return row
    if criterion.relative:
        for name, v in values.items():
            v["relative"] = v["loss"] / own_losses[name]
    row["criterion"] = criterion.value(values)
    row["domains"] = {name: {k: x for k, x in v.items() if k != "pairs"} for name, v in values.items()}
    return row
