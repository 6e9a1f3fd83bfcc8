"""Each judge on hand-written examples; group judges built from specs, their scores and their errors."""

import math
import sys
import textwrap

import pytest

from ofsdpo.config import ConfigError
from ofsdpo.domains import DOMAINS, get_domain
from ofsdpo.judges import (
    GroupJudge, JudgeError, PairwiseJudge, PointwiseJudge, WeightedJudge, concise_judge, critic_judge, is_refusal,
    refusal_judge, resolve_judges, sentiment_judge, split_weight,
)


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


# --- group judges ----------------------------------------------------------------------------------------------------
USER_JUDGES = '''
import math

calls = []

def length(prompt, response, meta):
    return float(len(response))

def bonus(prompt, response, meta):
    return meta.get("bonus", 0.0) + (1.0 if response.startswith("yes") else 0.0)

def batched_length(prompts, completions, bonus=None):
    calls.append({"prompts": prompts, "completions": completions, "bonus": bonus})
    return [len(c if isinstance(c, str) else c[0]["content"]) + (b or 0) for c, b in zip(completions, bonus)]

def kwargs_judge(prompts, completions, **columns):
    calls.append(columns)
    return [1.0] * len(completions)

def flagged(p, c):
    return [2.0 * len(x) for x in c]
flagged.batched = True

def longer(prompts, completions):
    calls.append([list(pair) for pair in completions])
    return [0 if len(a) > len(b) else 1 for a, b in completions]

def always_first(prompts, completions):
    return [0] * len(completions)

class TRLStyle:
    def __init__(self):
        self.shuffles = []

    def judge(self, prompts, completions, shuffle_order=True):
        self.shuffles.append(shuffle_order)
        return [1 if len(b) > len(a) else 0 for a, b in completions]

trl_style = TRLStyle()

def nan_judge(prompt, response, meta):
    return math.nan if response == "bad" else 1.0

def text_judge(prompt, response, meta):
    return "high"

def bool_judge(prompt, response, meta):
    return True

def raising_judge(prompt, response, meta):
    raise RuntimeError("quota exceeded")

def short_batch(prompts, completions):
    return [1.0]

def bad_verdict(prompts, completions):
    return [2] * len(completions)

def failed_verdict(prompts, completions):
    return [-1] * len(completions)

not_callable = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of user judges, importable as `userjudges` and also as a file path."""
    path = tmp_path / "userjudges.py"
    path.write_text(textwrap.dedent(USER_JUDGES), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "userjudges", raising=False)
    import userjudges

    yield userjudges
    sys.modules.pop("userjudges", None)


def records(*prompts, meta=None, source="p.jsonl"):
    return [{"prompt": p, "meta": dict(meta or {}), "row": i + 2, "source": source} for i, p in enumerate(prompts)]


def test_pointwise_module_function_and_file_path(user_module, tmp_path):
    recs = records("a", "b")
    responses = [["xx", "xxxx"], ["x"]]
    judge = resolve_judges("userjudges:length")
    assert isinstance(judge, PointwiseJudge) and judge.name == "userjudges:length" and not judge.pairwise
    assert judge.score(recs, responses) == [[2.0, 4.0], [1.0]]
    by_file = resolve_judges(f"{tmp_path / 'userjudges.py'}:length")
    assert by_file.score(recs, responses) == [[2.0, 4.0], [1.0]]
    assert resolve_judges("sentiment").score(recs, [["wonderful!", "awful."], []])[0][0] > 0.3


def test_batched_judge_gets_trl_style_lists_and_meta_columns(user_module):
    recs = [{"prompt": "p0", "meta": {"bonus": 10}, "row": 1, "source": "s"},
            {"prompt": [{"role": "user", "content": "p1"}], "meta": {"other": "z"}, "row": 2, "source": "s"}]
    judge = resolve_judges("userjudges:batched_length")
    assert judge.score(recs, [["ab", "abc"], ["a"]]) == [[12.0, 13.0], [1.0]]
    call = user_module.calls[-1]
    assert call["prompts"] == ["p0", "p0", [{"role": "user", "content": "p1"}]]  # one prompt per completion
    assert call["completions"] == ["ab", "abc", [{"role": "assistant", "content": "a"}]]  # TRL's chat completion
    assert call["bonus"] == [10, 10, None]  # a column aligned with the completions; unnamed "other" not passed
    resolve_judges("userjudges:kwargs_judge").score(recs, [["a"], ["b"]])
    assert user_module.calls[-1] == {"bonus": [10, None], "other": [None, "z"]}  # **kwargs: every column
    assert resolve_judges("userjudges:flagged").score(recs[:1], [["abc", "a"]]) == [[6.0, 2.0]]  # batched = True


def test_weights_sum_the_judges_scores(user_module):
    recs = records("a", meta={"bonus": 0.5})
    responses = [["yes!", "no"]]
    # length: [4, 2]; bonus: [1.5, 0.5]
    judge = resolve_judges(["userjudges:length:0.7", "userjudges:bonus:-2"])
    assert isinstance(judge, WeightedJudge) and judge.name == "userjudges:length:0.7 + userjudges:bonus:-2"
    scores = judge.score(recs, responses)[0]
    assert scores == pytest.approx([0.7 * 4 - 2 * 1.5, 0.7 * 2 - 2 * 0.5])
    assert resolve_judges(["userjudges:length"]).score(recs, responses) == [[4.0, 2.0]]
    assert resolve_judges("userjudges:length:2").score(recs, responses) == [[8.0, 4.0]]


@pytest.mark.parametrize("spec, expected", [
    ("sentiment", ("sentiment", 1.0)), ("sentiment:0.5", ("sentiment", 0.5)), ("a.b:fn", ("a.b:fn", 1.0)),
    ("a.b:fn:-1.5e-1", ("a.b:fn", -0.15)), ("hf:org/rm:.3", ("hf:org/rm", 0.3)), ("hf:./rm", ("hf:./rm", 1.0)),
    ("pairwise:m:f:2", ("pairwise:m:f", 2.0)), ("m:inf", ("m:inf", 1.0)), ("dir/f.py:fn:1", ("dir/f.py:fn", 1.0)),
])
def test_a_trailing_number_is_the_weight(spec, expected):
    assert split_weight(spec) == expected


def test_weights_must_be_finite():
    with pytest.raises(ConfigError, match="weight 1e999 is not a finite number"):
        split_weight("sentiment:1e999")


def test_pairwise_tournament_ranks_by_wins(user_module):
    recs = records("p", "q")
    responses = [["aa", "aaaa", "a"], ["bbb", "b", "bb", "bbbb"]]
    judge = resolve_judges("pairwise:userjudges:longer")
    assert isinstance(judge, PairwiseJudge) and judge.pairwise
    assert judge.score(recs, responses) == [[0.5, 1.0, 0.0], [2 / 3, 0.0, 1 / 3, 1.0]]
    games = user_module.calls[-1]
    assert len(games) == 3 + 6  # every pair once, in one call
    assert sorted(tuple(sorted(g)) for g in games[:3]) == sorted([("a", "aa"), ("a", "aaaa"), ("aa", "aaaa")])


def test_pairwise_positions_alternate_so_a_position_bias_cancels(user_module):
    judge = resolve_judges("pairwise:userjudges:always_first")  # prefers whatever is shown first
    three = judge.score(records("p"), [["a", "b", "c"]])
    assert three == [[0.5, 0.5, 0.5]]  # each response leads in exactly one of its two games
    two = judge.score(records("p", "q"), [["a", "b"], ["a", "b"]])
    assert two == [[1.0, 0.0], [0.0, 1.0]]  # k = 2: the order flips from one record to the next
    firsts = {}
    for _, first, _ in PairwiseJudge.schedule([["r"] * 4]):
        firsts[first] = firsts.get(first, 0) + 1
    assert sorted(firsts.values()) == [1, 1, 2, 2]  # three games each: led once or twice


def test_pairwise_accepts_trl_judge_objects_and_turns_off_their_shuffle(user_module):
    judge = resolve_judges("pairwise:userjudges:trl_style")
    assert judge.score(records("p"), [["a", "abc"]]) == [[0.0, 1.0]]
    assert user_module.trl_style.shuffles == [False]
    direct = resolve_judges(user_module.trl_style)  # an object given directly is pairwise by its .judge
    assert direct.pairwise and direct.score(records("p"), [["abc", "a"]]) == [[1.0, 0.0]]
    with pytest.raises(ConfigError, match="write pairwise:userjudges:trl_style"):
        resolve_judges("userjudges:trl_style")
    mixed = resolve_judges(["pairwise:userjudges:longer", "userjudges:length:0.5"])
    assert mixed.pairwise and mixed.score(records("p"), [["a", "abc"]]) == [[0.5, 2.5]]


@pytest.mark.parametrize("spec, message", [
    ("userjudges:nan_judge", "returned nan, not a finite number"),
    ("userjudges:text_judge", "returned 'high' (str), not a real number"),
    ("userjudges:bool_judge", "returned True (bool), not a real number"),
    ("userjudges:raising_judge", "raised RuntimeError: quota exceeded"),
    ("pairwise:userjudges:bad_verdict", "returned 2, not 0 or 1"),
    ("pairwise:userjudges:failed_verdict", ("returned -1, not 0 or 1 (the index of the better of the two "
                                            "completions) (TRL's judges return -1 when they fail)")),
])
def test_a_bad_judge_names_itself_and_the_row(user_module, spec, message):
    recs = records("ok", "also ok", source="prompts.jsonl")
    with pytest.raises(JudgeError) as caught:
        resolve_judges([spec, "userjudges:length:0.5"]).score(recs, [["fine", "fine"], ["bad", "fine"]])
    text = str(caught.value)
    row = 2 if spec.startswith("pairwise") else (3 if "nan" in spec else 2)
    assert text.startswith(f"judge '{spec}' on prompts.jsonl, row {row}: ") and message in text
    assert isinstance(caught.value, ConfigError)


def test_a_batched_judge_with_the_wrong_count_names_the_rows(user_module):
    with pytest.raises(JudgeError, match=r"judge 'userjudges:short_batch' on p.jsonl, rows 2, 3: returned 1 scores "
                                         r"for 3"):
        resolve_judges("userjudges:short_batch").score(records("a", "b"), [["x", "y"], ["z"]])


def test_an_own_group_judge_is_checked():
    class Broken(GroupJudge):
        name = "broken"

        def score(self, records, responses):
            return [[1.0, math.inf] for _ in records]

    with pytest.raises(JudgeError, match=r"on p.jsonl, row 2: returned inf, not a finite number"):
        resolve_judges(Broken()).score(records("a"), [["x", "y"]])
    with pytest.raises(JudgeError, match="returned 2 scores for 1"):
        resolve_judges(Broken()).score(records("a"), [["x"]])


@pytest.mark.parametrize("spec, message", [
    ("sentimnt", ("unknown judge 'sentimnt' (did you mean 'sentiment'?); a judge is a built-in name (sentiment, "
                  "critic, refusal, concise, afinn, afinn-critic); module:function")),
    ("nosuchmodule:fn", "judge 'nosuchmodule:fn': no module named 'nosuchmodule'"),
    ("userjudges:lenght", "judge 'userjudges:lenght': userjudges has no attribute 'lenght'; did you mean 'length'?"),
    ("userjudges:not_callable", "judge 'userjudges:not_callable': int is not callable"),
    ("missing/file.py:fn", "judge 'missing/file.py:fn': no such file missing/file.py"),
    ("hf:./no-such-model", "judge 'hf:./no-such-model': no such folder ./no-such-model"),
])
def test_unknown_specs_say_what_a_judge_is(user_module, spec, message):
    with pytest.raises(ConfigError) as caught:
        resolve_judges(spec)
    assert message in str(caught.value)


# --- reward models ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A tiny random LlamaForSequenceClassification (one label) with the tiny model's tokenizer, saved together."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_scores_match_a_manual_forward_batched_or_not(reward_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForSequenceClassification

    assert tokenizer.chat_template  # the responses are rendered as the assistant's turn
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    recs = [{"prompt": "Capital of France?", "meta": {}, "row": 1, "source": "s"},
            {"prompt": [{"role": "user", "content": "Hi"}], "meta": {}, "row": 2, "source": "s"}]
    responses = [["Paris.", "It is Paris, a large city on the Seine, famous for its museums."], ["Hello there!"]]

    def manual(prompt, response):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return float(model(input_ids=ids).logits[0, 0])

    expected = [[manual(r["prompt"], t) for t in group] for r, group in zip(recs, responses)]
    batched = resolve_judges(f"hf:{reward_model_dir}", batch_size=8).score(recs, responses)
    single = resolve_judges(f"hf:{reward_model_dir}", batch_size=1).score(recs, responses)
    for got in (batched, single):
        assert [len(g) for g in got] == [2, 1]
        for row_got, row_expected in zip(got, expected):
            assert row_got == pytest.approx(row_expected, abs=1e-5)
    assert len({round(s, 6) for g in expected for s in g}) == 3  # the texts really differ in score
