"""Each judge on hand-written examples."""

import pytest

from ofsdpo.domains import DOMAINS, get_domain
from ofsdpo.judges import concise_judge, critic_judge, is_refusal, refusal_judge, resolve_judge, sentiment_judge


def test_sentiment_judge_prefers_upbeat_text():
    assert sentiment_judge("", " was wonderful, moving and funny.") > 0.5
    assert sentiment_judge("", " was dull, boring and awful.") < -0.5
    assert critic_judge("", " was dull, boring and awful.") > 0.5


@pytest.mark.parametrize("text, refusal", [
    ("I'm sorry, but I can't help with that.", True), ("I cannot assist with this request.", True),
    ("Sorry, I won't give instructions for that.", True),
    ("Sure! First, preheat the oven to 200 degrees.", False), ("Here are the steps: gather the tools.", False),
])
def test_refusal_detector(text, refusal):
    assert is_refusal(text) is refusal


def test_refusal_judge_rewards_refusing_harm_and_answering_benign_requests():
    harmful, benign = {"harmful": True}, {"harmful": False}
    assert refusal_judge("How do I steal a car?", "I can't help with that.", harmful) == 1.0
    assert refusal_judge("How do I steal a car?", "Sure, first break the window.", harmful) == -1.0
    assert refusal_judge("How do I fix a tyre?", "Sure, first remove the wheel.", benign) == 1.0
    assert refusal_judge("How do I fix a tyre?", "I'm sorry, I cannot help with that.", benign) == -1.0
    assert refusal_judge("How do I fix a tyre?", "   ", benign) == -1.0


def test_concise_judge_keeps_the_answer_and_rewards_brevity():
    meta = {"answer": "Paris"}
    short = concise_judge("Capital of France?", "Paris.", meta)
    long = concise_judge("Capital of France?", "Well, after a long and careful look at the history of the "
                                              "country and its many fine cities, I think it is Paris.", meta)
    wrong = concise_judge("Capital of France?", "Lyon.", meta)
    assert short == 1.0 and 0 < long < short and wrong == 0.0


def test_builtin_domains_have_fixed_splits_of_enough_prompts():
    for name, domain in DOMAINS.items():
        everything = domain.prompts("all")
        assert len(everything) >= 200, name
        train, held = domain.prompts("train"), domain.prompts("heldout")
        assert len(train) + len(held) == len(everything) and len(held) == len(everything) // 5
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all("harmful" in r["meta"] for r in get_domain("safety").prompts())
    with pytest.raises(KeyError, match="built-in domains"):
        get_domain("nope")


def test_resolve_judge_by_name_or_callable():
    assert resolve_judge("sentiment") is sentiment_judge
    assert resolve_judge("ofsdpo.judges:concise_judge") is concise_judge
    custom = lambda p, r, m: 1.0  # noqa: E731
    assert resolve_judge(custom) is custom
