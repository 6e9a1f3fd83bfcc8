"""Programmatic judges: stand-ins for a human annotator that give each response a score (higher is better).

A judge is any callable `judge(prompt, response, meta) -> float`, where `meta` is the prompt record's metadata
(for instance whether a request is harmful, or the answer a question expects). The built-in ones:

- `sentiment_judge`: VADER's compound score of the response, in [-1, 1] (the controlled-sentiment task of the DPO
  paper).
- `critic_judge`: minus VADER's compound score: a harsh critic that prefers negative reviews.
- `refusal_judge`: +1 for refusing a harmful request or answering a benign one, −1 for the opposite, detected by
  refusal phrases; `meta["harmful"]` says which kind the request is.
- `concise_judge`: +1 if the expected answer (`meta["answer"]`) appears, minus 0.05 per word beyond 8, in [-1, 1];
  0 (or less) when the answer is missing. Brevity with the answer kept.

On-policy rounds and evaluation score every prompt's k responses at once through a `GroupJudge`, built from the
user's specs by `resolve_judges` (the spec grammar is in its docstring): built-in names, user functions (pointwise,
or batched in TRL's reward-function style), `hf:MODEL` reward models and TRL-style pairwise judges (a round-robin
tournament), combined as a weighted sum. A judge that fails or returns something other than a finite real number
raises `JudgeError` naming the judge and the prompt's source and row.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from afinn import Afinn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from .errors import ConfigError, JudgeError, ModelError, suggest
from .models import check_hub, looks_local, require_safetensors

Judge = Callable[[Any, str, dict], float]  # (prompt: str or messages, response, meta) -> score

REFUSAL_PATTERNS = [
    r"\bI can(?:'|no)?t\b", r"\bI cannot\b", r"\bI won'?t\b", r"\bI'?m (?:sorry|not able|unable)\b",
    r"\bI am (?:sorry|not able|unable)\b", r"\bI (?:must|have to) (?:decline|refuse)\b", r"\bI'?d rather not\b",
    r"\b(?:cannot|can't|won't) (?:help|assist|provide|support)\b", r"\bnot (?:able|going) to help\b",
    r"\bas an ai\b", r"\bI do not (?:feel comfortable|provide)\b",
]
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)


@lru_cache(maxsize=1)
def _vader() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()  # reads its lexicon file: once, on first use


def sentiment_judge(prompt: str, response: str, meta: dict | None = None) -> float:
    return float(_vader().polarity_scores(response)["compound"])


def critic_judge(prompt: str, response: str, meta: dict | None = None) -> float:
    """The harsh critic: minus VADER's compound score (negative reviews preferred)."""
    return -sentiment_judge(prompt, response, meta)


@lru_cache(maxsize=1)
def _afinn() -> Afinn:
    return Afinn()  # reads its lexicon file: once, on first use


def afinn_judge(prompt: str, response: str, meta: dict | None = None) -> float:
    """An independent sentiment judge: the AFINN-165 word list (a different lexicon, tokenizer and rules from
    VADER's), its summed valence s squashed to (-1, 1) as VADER squashes its own, s / sqrt(s² + 15). It never
    labels a training pair: it shows whether a gain on VADER is a gain on sentiment or on VADER."""
    s = float(_afinn().score(response))
    return s / math.sqrt(s * s + 15.0)


def afinn_critic_judge(prompt: str, response: str, meta: dict | None = None) -> float:
    """The independent judge of the critic domain: minus `afinn_judge`."""
    return -afinn_judge(prompt, response, meta)


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


BUILTIN_JUDGES: dict[str, Judge] = {"sentiment": sentiment_judge, "critic": critic_judge, "refusal": refusal_judge,
                                   "concise": concise_judge, "afinn": afinn_judge, "afinn-critic": afinn_critic_judge}

SPEC_FORMS = ("a built-in name ({builtins}); module:function or path/to/file.py:function, pointwise "
              "(prompt, response, meta) -> float or batched (prompts, completions, **meta_columns) -> list[float]; "
              "hf:MODEL, a sequence-classification reward model (hub name or folder); pairwise:module:function, "
              "TRL's pairwise judge (prompts, completions) -> list[int] (or an object with .judge); "
              "each optionally followed by :WEIGHT")
WEIGHT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # no "nan"/"inf": those may be function names
PAIRWISE_PREFIX = "pairwise:"
HF_PREFIX = "hf:"
DEFAULT_MAX_LENGTH = 1024  # reward models whose tokenizer and config name no limit


# --- the group-judge protocol ----------------------------------------------------------------------------------------
class GroupJudge:
    """Scores k responses per prompt record at once.

    `records` are prompt records ({"prompt", "meta", "row", "source"}, as `ofsdpo.prompts.load_prompts` gives);
    `responses[i]` are the responses to `records[i]`. Scores are comparable within a record (higher is better);
    when `pairwise` is true they are win fractions of a tournament among the record's responses, so they are not
    comparable across records.
    """

    name: str = "<judge>"  # the spec as the user wrote it, for errors
    pairwise: bool = False

    def score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        """Scores of each record's responses, comparable within a record (higher is better)."""
        raise NotImplementedError


def _where(records: Sequence[dict]) -> str:
    """'source, row N' of one record, or the rows of several (a batched call fails as a whole)."""
    if not records:
        return "no prompts"
    source = records[0].get("source", "<prompts>")
    rows = [r.get("row") for r in records]
    if len(records) == 1:
        return f"{source}, row {rows[0]}"
    shown = ", ".join(str(r) for r in rows[:5]) + (", …" if len(rows) > 5 else "")
    return f"{source}, rows {shown}"


def _fail(judge: str, records: Sequence[dict], problem: str) -> JudgeError:
    return JudgeError(f"judge '{judge}' on {_where(records)}: {problem}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _call(judge: str, records: Sequence[dict], fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), any exception raised as a JudgeError naming the judge and the rows."""
    try:
        return fn(*args, **kwargs)
    except JudgeError:
        raise
    except Exception as err:
        raise _fail(judge, records, f"raised {type(err).__name__}: {err}") from err


def _number(judge: str, record: dict, value: Any) -> float:
    """`value` as a float, or a JudgeError: booleans, non-numbers and NaN / infinity are refused."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor or array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(judge, [record], f"returned {_short(value)} ({type(value).__name__}), not a real number")
    number = float(value)
    if not math.isfinite(number):
        raise _fail(judge, [record], f"returned {number}, not a finite number")
    return number


def _as_list(judge: str, records: Sequence[dict], values: Any, expected: int, what: str) -> list:
    """A batched judge's output as a list of `expected` items, or a JudgeError."""
    if hasattr(values, "tolist"):  # numpy arrays and tensors
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise _fail(judge, records, f"returned {_short(values)} ({type(values).__name__}), not a list of {what}")
    if len(values) != expected:
        raise _fail(judge, records, f"returned {len(values)} {what} for {expected}")
    return list(values)


def _check_shapes(records: list[dict], responses: list[list[str]]) -> None:
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} prompt records but {len(responses)} response groups")


def _regroup(flat: list[float], responses: list[list[str]]) -> list[list[float]]:
    out, start = [], 0
    for group in responses:
        out.append(flat[start:start + len(group)])
        start += len(group)
    return out


# --- kinds of judges -------------------------------------------------------------------------------------------------
class PointwiseJudge(GroupJudge):
    """A `Judge` (prompt, response, meta) -> float, called once per response."""

    def __init__(self, name: str, fn: Judge):
        self.name, self.fn = name, fn

    def score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        _check_shapes(records, responses)
        return [[_number(self.name, record, _call(self.name, [record], self.fn, record["prompt"], text,
                                                  record.get("meta") or {}))
                 for text in group] for record, group in zip(records, responses)]


def _completion(prompt: Any, text: str) -> Any:
    """TRL's completion for a prompt: the text, or one assistant message when the prompt is conversational."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _keyword_filter(fn: Callable) -> Callable[[str], bool]:
    """Which meta columns `fn` takes as keywords: all with **kwargs, else those it names after the first two."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: pass no columns
        return lambda key: False
    taken = {"prompts", "completions", *(p.name for p in parameters[:2])}  # passed positionally already
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return lambda key: key not in taken
    named = {p.name for p in parameters[2:] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                           inspect.Parameter.KEYWORD_ONLY)}
    return lambda key: key in named - taken


class BatchedJudge(GroupJudge):
    """TRL's reward-function style, one call for all responses: `fn(prompts, completions, **columns) -> list[float]`.

    `prompts[j]` is the prompt of `completions[j]` (repeated for each of its responses, as TRL repeats a prompt per
    generation); a completion is the text, or `[{"role": "assistant", "content": text}]` for a conversational
    prompt. Each meta key becomes a keyword list aligned with the completions (None where a record lacks it), as
    TRL passes dataset columns; a function without **kwargs receives only the columns it names.
    """

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn
        self._takes = _keyword_filter(fn)

    def score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        _check_shapes(records, responses)
        owners = [i for i, group in enumerate(responses) for _ in group]
        if not owners:
            return [[] for _ in responses]
        prompts = [records[i]["prompt"] for i in owners]
        completions = [_completion(records[i]["prompt"], text) for i, group in enumerate(responses) for text in group]
        keys = list(dict.fromkeys(k for r in records for k in (r.get("meta") or {})))
        columns = {k: [(records[i].get("meta") or {}).get(k) for i in owners] for k in keys if self._takes(k)}
        values = _call(self.name, records, self.fn, prompts, completions, **columns)
        flat = _as_list(self.name, records, values, len(owners), "scores")
        return _regroup([_number(self.name, records[i], v) for i, v in zip(owners, flat)], responses)


class PairwiseJudge(GroupJudge):
    """A TRL-style pairwise judge `fn(prompts, completions: list[[a, b]]) -> list[int]` (index of the better one),
    turned into scores by a round-robin tournament among each record's responses.

    Every pair plays once, all games in one call. Which response goes first alternates (by the parity of
    i + j + record index), so each response leads in about half its games and the judge's position bias cancels.
    A response's score is its fraction of games won, in [0, 1] (0 for a lone response).
    """

    pairwise = True

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn
        try:  # TRL's judges shuffle the order themselves unless told not to; the schedule already balances it
            takes_shuffle = "shuffle_order" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_shuffle = False
        self._kwargs = {"shuffle_order": False} if takes_shuffle else {}

    @staticmethod
    def schedule(responses: list[list[str]]) -> list[tuple[int, int, int]]:
        """(record index, first, second) of every game."""
        games = []
        for r, group in enumerate(responses):
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    games.append((r, i, j) if (i + j + r) % 2 else (r, j, i))
        return games

    def score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        _check_shapes(records, responses)
        games = self.schedule(responses)
        wins = [[0.0] * len(group) for group in responses]
        if games:
            prompts = [records[r]["prompt"] for r, _, _ in games]
            pairs = [[responses[r][a], responses[r][b]] for r, a, b in games]
            verdicts = _call(self.name, records, self.fn, prompts, pairs, **self._kwargs)
            verdicts = _as_list(self.name, records, verdicts, len(games), "verdicts")
            for (r, first, second), verdict in zip(games, verdicts):
                wins[r][(first, second)[self._index(records[r], verdict)]] += 1.0
        return [[w / (len(group) - 1) for w in ws] if len(group) > 1 else ws for ws, group in zip(wins, responses)]

    def _index(self, record: dict, verdict: Any) -> int:
        if getattr(verdict, "ndim", None) == 0 and hasattr(verdict, "item"):
            verdict = verdict.item()
        if isinstance(verdict, numbers.Integral) and not isinstance(verdict, bool) and verdict in (0, 1):
            return int(verdict)
        hint = " (TRL's judges return -1 when they fail)" if verdict == -1 else ""
        raise _fail(self.name, [record], f"returned {_short(verdict)}, not 0 or 1 (the index of the better of the two "
                                         f"completions){hint}")


class RewardModelJudge(GroupJudge):
    """A Hugging Face sequence-classification reward model: score = logits[:, 0] of prompt + response.

    With a chat template, the prompt's messages (a string prompt becomes one user message) and the response as the
    assistant's turn are rendered by it; without one, the text is prompt + response. Batches are right-padded (the
    real tokens keep their positions, and the model pools at the last non-pad token), so padding leaves scores
    unchanged; sequences are cut to the model's maximum length (or 1024), their end dropped.
    """

    def __init__(self, name: str, model_name: str, device: str | None = None, batch_size: int = 8):
        if batch_size < 1:
            raise ConfigError(f"judge '{name}': the batch size must be >= 1 (got {batch_size})")
        self.name, self.batch_size = name, batch_size
        self.device = str(device) if device is not None else "cpu"
        self.model, self.tokenizer = _load_reward_model(name, model_name, self.device)
        self.max_length = _max_length(self.tokenizer, self.model)

    def text(self, prompt: Any, response: str) -> str:
        """What the reward model reads for one response."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                      tokenize=False)
        if not isinstance(prompt, str):
            raise ConfigError(f"judge '{self.name}': conversational prompts need a tokenizer with a chat template; "
                              "this reward model's has none")
        return prompt + response

    def score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        _check_shapes(records, responses)
        owners = [i for i, group in enumerate(responses) for _ in group]
        texts = [self.text(records[i]["prompt"], t) for i, group in enumerate(responses) for t in group]
        templated = bool(getattr(self.tokenizer, "chat_template", None))  # the template writes special tokens
        flat: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start:start + self.batch_size]
                batch = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                       max_length=self.max_length, add_special_tokens=not templated)
                logits = _call(self.name, [records[i] for i in owners[start:start + len(chunk)]], self.model,
                               **batch.to(self.device)).logits
                flat.extend(logits[:, 0].float().tolist())
        return _regroup([_number(self.name, records[i], v) for i, v in zip(owners, flat)], responses)


class WeightedJudge(GroupJudge):
    """Σ weight × scores of several judges; pairwise when any part is (then only comparable within a record)."""

    def __init__(self, parts: list[tuple[float, GroupJudge]]):
        self.parts = parts
        self.name = " + ".join(judge.name for _, judge in parts)
        self.pairwise = any(judge.pairwise for _, judge in parts)

    def score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        _check_shapes(records, responses)
        total = [[0.0] * len(group) for group in responses]
        for weight, judge in self.parts:
            for sums, scores in zip(total, judge.score(records, responses)):
                for i, value in enumerate(scores):
                    sums[i] += weight * value
        return total


class CheckedJudge(GroupJudge):
    """A user's own GroupJudge, its output checked like the built-in kinds' (shape, finite real numbers)."""

    def __init__(self, name: str, inner: GroupJudge):
        self.name, self.inner, self.pairwise = name, inner, bool(getattr(inner, "pairwise", False))

    def score(self, records: list[dict], responses: list[list[str]]) -> list[list[float]]:
        _check_shapes(records, responses)
        groups = _as_list(self.name, records, _call(self.name, records, self.inner.score, records, responses),
                          len(records), "score groups")
        out = []
        for record, group, scores in zip(records, responses, groups):
            scores = _as_list(self.name, [record], scores, len(group), "scores")
            out.append([_number(self.name, record, v) for v in scores])
        return out


# --- loading ---------------------------------------------------------------------------------------------------------
def _max_length(tokenizer, model) -> int:
    """The smaller of the tokenizer's and the model's limits (tokenizers without one report a huge sentinel)."""
    limits = [getattr(tokenizer, "model_max_length", None), getattr(model.config, "max_position_embeddings", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else DEFAULT_MAX_LENGTH


@lru_cache(maxsize=4)
def _cached_reward_model(model_name: str, device: str):
    require_safetensors(model_name, f"judge hf:{model_name}", "model")  # a local folder: pickles refused first
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # left padding shifts positions: harmless under RoPE, not with absolute ones
    model = AutoModelForSequenceClassification.from_pretrained(model_name, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id  # the model pools at the last token that is not this one
    return model.to(device).eval(), tokenizer


def _load_reward_model(name: str, model_name: str, device: str):
    """(model, tokenizer), loaded once per (model, device); errors as ConfigError naming the judge."""
    if not model_name:
        raise ConfigError(f"judge '{name}': hf: needs a model name or folder (hf:MODEL)")
    if looks_local(model_name) and not Path(model_name).expanduser().exists():
        raise ConfigError(f"judge '{name}': no such folder {model_name} (a hub model is named owner/name)")
    if not Path(model_name).expanduser().exists():
        try:
            check_hub(model_name, f"judge '{name}'")
        except ModelError as err:
            raise ConfigError(str(err)) from None
    try:
        model, tokenizer = _cached_reward_model(model_name, device)
    except ModelError as err:  # said plainly already (pickled weights refused)
        raise ConfigError(f"judge '{name}': {err}") from None
    except Exception as err:  # hub, file and config errors come in many types
        raise ConfigError(f"judge '{name}': cannot load {model_name} as a sequence-classification reward model "
                          f"({type(err).__name__}: {err})") from None
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"judge '{name}': the tokenizer of {model_name} has neither a pad nor an EOS token")
    return model, tokenizer


_FILE_MODULES: dict[Path, Any] = {}


def _import_file(spec: str, path_text: str):
    """A .py file as a module, loaded once per path (so its state, e.g. a loaded model, is shared)."""
    path = Path(path_text).expanduser().resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise ConfigError(f"judge '{spec}': no such file {path_text}")
    name = f"ofsdpo_user_judge_{len(_FILE_MODULES)}_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ConfigError(f"judge '{spec}': running {path_text} failed ({type(err).__name__}: {err})") from None
    _FILE_MODULES[path] = module
    return module


def _import_module(spec: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ConfigError(f"judge '{spec}': no module named '{err.name}' (a module must be importable, e.g. on "
                              "PYTHONPATH, or give a file: path/to/file.py:function)") from None
        raise ConfigError(f"judge '{spec}': importing {module_name} failed ({err})") from None
    except Exception as err:
        raise ConfigError(f"judge '{spec}': importing {module_name} failed ({type(err).__name__}: {err})") from None


def _load_target(spec: str, text: str) -> Any:
    """The object named by `module:attribute` or `path/to/file.py:attribute` (attribute may be dotted)."""
    module_name, _, attribute = text.rpartition(":")  # rpartition: a Windows path keeps its drive letter
    if not module_name or not attribute:
        raise ConfigError(f"judge '{spec}': expected module:function; a judge is {_forms()}")
    is_file = module_name.endswith(".py") or "/" in module_name or "\\" in module_name
    target = _import_file(spec, module_name) if is_file else _import_module(spec, module_name)
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            hint = suggest(part, public)
            raise ConfigError(f"judge '{spec}': {module_name} has no attribute '{part}'"
                              + (f"; {hint}" if hint else ""))
        target = getattr(target, part)
    return target


def _forms() -> str:
    return SPEC_FORMS.format(builtins=", ".join(BUILTIN_JUDGES))


def _first_parameter(fn: Callable) -> str | None:
    try:
        parameters = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return parameters[0] if parameters else None


def _instantiate(spec: str, cls: type) -> Any:
    try:
        return cls()
    except Exception as err:
        raise ConfigError(f"judge '{spec}': cannot create {cls.__name__}() ({type(err).__name__}: {err})") from None


def _pairwise_from(spec: str, target: Any) -> PairwiseJudge:
    """A pairwise judge from a function, an object with .judge (TRL's judges), or such a class (created bare)."""
    if isinstance(target, type) and callable(getattr(target, "judge", None)):
        target = _instantiate(spec, target)
    method = getattr(target, "judge", None)
    if callable(method):
        return PairwiseJudge(spec, method)
    if callable(target):
        return PairwiseJudge(spec, target)
    raise ConfigError(f"judge '{spec}': {type(target).__name__} is neither callable nor has a .judge method")


def _judge_from(spec: str, target: Any) -> GroupJudge:
    """The kind of judge `target` is: a GroupJudge, batched, pointwise, or (given directly) a TRL pairwise judge."""
    if isinstance(target, type) and issubclass(target, GroupJudge):
        target = _instantiate(spec, target)
    if isinstance(target, GroupJudge):
        return target if type(target) in KINDS else CheckedJudge(spec, target)
    if not callable(target) and callable(getattr(target, "score", None)):  # the protocol, without subclassing
        return CheckedJudge(spec, target)
    if not callable(target):
        if callable(getattr(target, "judge", None)):
            raise ConfigError(f"judge '{spec}': has a .judge method like TRL's pairwise judges; write "
                              f"pairwise:{spec}")
        raise ConfigError(f"judge '{spec}': {type(target).__name__} is not callable; a judge is {_forms()}")
    if getattr(target, "batched", False) is True or _first_parameter(target) == "prompts":
        return BatchedJudge(spec, target)
    return PointwiseJudge(spec, target)


KINDS = (PointwiseJudge, BatchedJudge, PairwiseJudge, RewardModelJudge, WeightedJudge, CheckedJudge)


def split_weight(spec: str) -> tuple[str, float]:
    """(judge spec, weight): a last `:NUMBER` is the weight (default 1); `module:function` keeps its colon."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or not WEIGHT.fullmatch(tail.strip()):
        return spec, 1.0
    weight = float(tail)
    if not math.isfinite(weight):
        raise ConfigError(f"judge '{spec}': the weight {tail} is not a finite number")
    return head, weight


def _resolve_spec(spec: str, device: str | None, batch_size: int) -> tuple[float, GroupJudge]:
    text, weight = split_weight(spec.strip())
    if text.startswith(PAIRWISE_PREFIX):
        return weight, _pairwise_from(spec, _load_target(spec, text[len(PAIRWISE_PREFIX):]))
    if text.startswith(HF_PREFIX):
        return weight, RewardModelJudge(spec, text[len(HF_PREFIX):], device, batch_size)
    if text in BUILTIN_JUDGES:
        return weight, PointwiseJudge(spec, BUILTIN_JUDGES[text])
    if ":" in text:
        return weight, _judge_from(spec, _load_target(spec, text))
    hint = suggest(text, BUILTIN_JUDGES)
    hint = f" ({hint})" if hint else ""
    raise ConfigError(f"unknown judge '{spec}'{hint}; a judge is {_forms()}")


def _callable_name(target: Any) -> str:
    name = getattr(target, "name", None)
    if isinstance(target, GroupJudge) and isinstance(name, str):
        return name
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{getattr(target, '__module__', None) or type(target).__module__}:{qualname}"


def resolve_judges(specs: str | Any | Sequence[str | Any], device: str | None = None,
                   batch_size: int = 8) -> GroupJudge:
    """One GroupJudge from the user's judge specs (`--judge`, repeatable).

    A spec is a built-in name (sentiment, critic, refusal, concise, afinn, afinn-critic); `module:function` or
    `path/to/file.py:function` (pointwise `(prompt, response, meta) -> float`, or batched when its first parameter
    is named `prompts` or it has `batched = True`: see BatchedJudge); `hf:MODEL` (a reward model, on `device`, `batch_size` texts per forward);
    or `pairwise:module:function` (a TRL pairwise judge function, object with .judge, or such a class). A trailing
    `:NUMBER` is the spec's weight (default 1), several specs are summed with their weights. Callables, TRL judge
    objects and GroupJudge instances may be given instead of strings (weight 1).
    """
    items = [specs] if isinstance(specs, str) or not isinstance(specs, Sequence) else list(specs)
    if not items:
        raise ConfigError(f"no judge given; a judge is {_forms()}")
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.append(_resolve_spec(item, device, batch_size))
        elif not isinstance(item, GroupJudge) and not callable(item) and callable(getattr(item, "judge", None)):
            parts.append((1.0, _pairwise_from(_callable_name(item), item)))
        else:
            parts.append((1.0, _judge_from(_callable_name(item), item)))
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]
    return WeightedJudge(parts)

