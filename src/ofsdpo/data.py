"""Preference pairs: reading, checking, tokenizing and batching, in TRL's three formats.

- standard:        {"prompt": str, "chosen": str, "rejected": str}
- conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}; the chat template is applied
- implicit prompt: no "prompt"; the shared prefix of chosen and rejected is the prompt

A malformed row raises `DataError` naming the source, the row (for JSONL, its line) and the field. Rows whose chosen
equals rejected carry no preference: they are skipped and counted, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .errors import DataError, ModelError
from .models import check_hub, looks_local

logger = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant", "tool")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz")
WARN_FRACTION = 0.1  # more rows than this truncated or skipped: a printed warning, not only summary.json


@dataclass
class DataStats:
    rows: int = 0
    pairs: int = 0
    skipped_identical: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0


@dataclass
class PreferenceData:
    """Tokenized pairs in stream order; `pairs[i]["index"] == i` keys the reference cache."""

    pairs: list[dict[str, Any]]
    stats: DataStats = field(default_factory=DataStats)
    source: str = "<data>"

    def __len__(self) -> int:
        return len(self.pairs)


# --- reading ---------------------------------------------------------------------------------------------------------
def _json_error(err: ValueError | RecursionError, source: str, row: int | None) -> DataError:
    if isinstance(err, json.JSONDecodeError):
        where = f"line {err.lineno}, " if row is None else ""
        return DataError(source, f"not valid JSON ({err.msg}, {where}column {err.colno})", row)
    # a number of thousands of digits, or arrays nested thousands deep
    return DataError(source, f"not valid JSON ({type(err).__name__}: {str(err)[:200]})", row)


def _parse_json(text: str, source: str, row: int) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise _json_error(err, source, row) from None


def _decode(raw: bytes, source: str, row: int | None, first: bool) -> str:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")  # editors on Windows start files with a BOM
    except UnicodeDecodeError as err:
        raise DataError(source, f"bytes that are not UTF-8 ({err.reason} at byte {err.start})", row) from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(str(path), f"cannot be read ({err.strerror})") from None
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode(raw, str(path), line_number, first=line_number == 1)
            if line.strip():
                yield line_number, _parse_json(line, str(path), line_number)


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(str(path), f"cannot be read ({err.strerror})") from None
    text = _decode(raw, str(path), None, first=True)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise _json_error(err, str(path), None) from None
        yield from _read_jsonl(path)  # a JSON-lines file named .json
        return
    except (ValueError, RecursionError) as err:
        raise _json_error(err, str(path), None) from None
    if isinstance(document, dict):
        lists = [v for v in document.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(str(path), "expected a list of rows, or an object holding exactly one list of rows")
        document = lists[0]
    if not isinstance(document, list):
        raise DataError(str(path), "expected a list of rows")
    yield from enumerate(document, start=1)


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(str(path), f"not a readable Parquet file ({err})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _read_dataset(name: str, split: str) -> Iterator[tuple[int, Any]]:
    saved = [Path(name) / "dataset_info.json", Path(name) / "dataset_dict.json"]
    if os.path.isdir(name) and any(p.exists() for p in saved):  # written by Dataset.save_to_disk
        loaded = datasets.load_from_disk(name)
    else:
        try:
            check_hub(name, "the dataset", repo_type="dataset")
        except ModelError as err:
            raise DataError(name, str(err).removeprefix("the dataset: ")) from None
        try:
            loaded = datasets.load_dataset(name, split=split)
        except Exception as err:
            raise DataError(name, f"could not load the dataset ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(name, f"has no split '{split}' (splits: {', '.join(loaded)}); pass --data-split")
        loaded = loaded[split]
    yield from enumerate(loaded, start=1)


def _looks_local(name: str) -> bool:
    """A name that cannot be a hub dataset (`owner/name`): a path, a bare word, or a file name."""
    return looks_local(name) or "/" not in name or name.lower().endswith(FILE_SUFFIXES)


def read_rows(source: Any, split: str = "train") -> tuple[str, Iterable[tuple[int, Any]]]:
    """(name for messages, iterator of (row number, row)) for a path, a dataset name, a Dataset or an iterable."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".parquet"):
            if not path.is_file():
                raise DataError(str(path), "no such file")
            if path.stat().st_size == 0:
                raise DataError(str(path), "the file is empty")
            reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[suffix]
            return str(path), reader(path)
        if path.is_file():
            raise DataError(str(path), "unknown file type; use .jsonl, .json or .parquet")
        if not path.exists() and _looks_local(str(source)):  # at once: no hub lookup and its retries
            raise DataError(str(path), "no such file or folder (a hub dataset is named owner/name)")
        return str(source), _read_dataset(str(source), split)
    name = "<dataset>" if hasattr(source, "features") else "<rows>"
    return name, enumerate(source, start=1)


# --- checking and prompt extraction ----------------------------------------------------------------------------------
def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _check_text(text: str, source: str, row: int, name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's "\ud800" escapes decode to text no tokenizer can encode
        raise DataError(source, f"holds a lone surrogate {text[err.start]!r} at character {err.start}", row,
                        name) from None


def _check_value(value: Any, source: str, row: int, name: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(source, "is empty", row, name)
        _check_text(value, source, row, name)
        return
    if _is_messages(value):
        if not value:
            raise DataError(source, "is an empty list of messages", row, name)
        for i, message in enumerate(value):
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise DataError(source, f"message {i} needs a string '{key}'", row, name)
                _check_text(message[key], source, row, f"{name}[{i}].{key}")
        return
    raise DataError(
        source, f"expected a string or a list of {{role, content}} messages, got {type(value).__name__}", row, name
    )


def _common_prefix_length(a: Sequence, b: Sequence) -> int:
    """Length of the shared prefix, by bisection on C-speed slice comparisons (a 10 MB field stays fast)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _split_implicit_prompt(chosen: Any, rejected: Any, source: str, row: int) -> tuple[Any, Any, Any]:
    """The shared prefix of chosen and rejected becomes the prompt (TRL's implicit-prompt format)."""
    n = _common_prefix_length(chosen, rejected)
    if isinstance(chosen, str):
        # end the prompt at a word boundary so the first completion token is a whole word (" great", not "eat")
        cut = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1)) if n < len(chosen) else n
        n = cut if cut > 0 else n
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        raise DataError(source, "no 'prompt' field, and chosen and rejected share no prefix to use as one", row)
    return prompt, chosen, rejected


def check_row(row: Any, source: str, row_number: int) -> tuple[Any, Any, Any] | None:
    """(prompt, chosen, rejected) of a row, or None when chosen == rejected (no preference to learn)."""
    if not isinstance(row, dict):
        raise DataError(source, f"expected an object with 'chosen' and 'rejected', got {type(row).__name__}", row_number)
    for name in ("chosen", "rejected"):
        if name not in row or row[name] is None:
            unknown = sorted(set(row) - set(FIELDS))
            hint = f" (unknown fields: {', '.join(unknown)})" if unknown else ""
            raise DataError(source, f"missing{hint}", row_number, name)
        _check_value(row[name], source, row_number, name)
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(source, "mixes a string and a list of messages with 'chosen'", row_number, "rejected")
    if prompt is None:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, source, row_number)
    else:
        _check_value(prompt, source, row_number, "prompt")
        if isinstance(prompt, str) != isinstance(chosen, str):
            raise DataError(source, "mixes a string and a list of messages with 'chosen'", row_number, "prompt")
    if not isinstance(prompt, str):
        _check_roles(prompt, chosen, rejected, source, row_number)
    if chosen == rejected:
        return None
    return prompt, chosen, rejected


def _check_roles(prompt: list, chosen: list, rejected: list, source: str, row: int) -> None:
    """TRL's conversational format: the prompt's turns end with the user's (after an optional system turn it opens
    with the user), and each completion is the assistant's answer."""
    for name, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        for i, message in enumerate(messages):
            if message["role"] not in ROLES:
                raise DataError(source, f"message {i} has role {message['role']!r}; roles are {', '.join(ROLES)}",
                                row, name)
    opening = [m["role"] for m in prompt if m["role"] != "system"]
    if not opening or opening[0] != "user" or prompt[-1]["role"] != "user":
        order = " -> ".join(m["role"] for m in prompt)
        raise DataError(source, f"must open with a user turn (after an optional system turn) and end with one, so "
                                f"that the completion answers it (roles: {order})", row, "prompt")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        wrong = [m["role"] for m in messages if m["role"] != "assistant"]
        if wrong:
            raise DataError(source, f"must hold assistant turns only (found {', '.join(wrong)}): the completion is "
                                    "the assistant's answer to the prompt", row, name)


# --- tokenization ----------------------------------------------------------------------------------------------------
CLIP_CHARS_PER_TOKEN = 8  # first guess of a window's size; it grows until it holds enough tokens
CLIP_MARGIN_TOKENS = 16  # tokens between the kept ones and the cut, so the cut cannot change them


def _clip_text(tokenizer, text: str, tokens: int, keep_end: bool) -> str:
    """The end (or start) of `text` that still holds more than `tokens` tokens, before any truncation.

    A 10 MB field would take seconds to tokenize only to be cut to a few hundred tokens; the window keeps the
    tokens that survive truncation identical, since the cut lies a margin of tokens away from them.
    """
    window = CLIP_CHARS_PER_TOKEN * (tokens + CLIP_MARGIN_TOKENS)
    while window < len(text):
        part = text[-window:] if keep_end else text[:window]
        if len(tokenizer(part, add_special_tokens=False)["input_ids"]) > tokens + CLIP_MARGIN_TOKENS:
            return part
        window *= 4
    return text


def _clip(tokenizer, value: Any, tokens: int, keep_end: bool) -> Any:
    if isinstance(value, str):
        return _clip_text(tokenizer, value, tokens, keep_end)
    return [{**m, "content": _clip_text(tokenizer, m["content"], tokens, keep_end)} for m in value]


def _render(tokenizer, prompt: Any, completion: Any, source: str, row: int) -> tuple[str, str, bool]:
    """(prompt text, prompt+completion text, conversational?)."""
    if isinstance(prompt, str):
        return prompt, prompt + completion, False
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(source, "conversational rows need a tokenizer with a chat template; this one has none", row)
    from jinja2 import TemplateError

    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    except TemplateError as err:  # templates reject e.g. a role order they do not know
        raise DataError(source, f"the chat template refuses these messages ({err})", row) from None
    return prompt_text, full_text, True


def tokenize_pair(tokenizer, prompt, chosen, rejected, max_length: int, max_prompt_length: int, source="<data>", row=0):
    """Token ids of one pair, TRL-style: the completion starts where prompt and prompt+completion tokens diverge.

    EOS ends every completion (a chat template's own end-of-turn counts when it holds the EOS token). The prompt
    keeps its last `max_prompt_length` tokens; the completion is then cut to fit `max_length`.
    Returns (example, prompt_truncated, completion_truncated).
    """
    prompt = _clip(tokenizer, prompt, max_prompt_length, keep_end=True)
    chosen, rejected = (_clip(tokenizer, c, max_length, keep_end=False) for c in (chosen, rejected))
    prompt_text, chosen_text, conversational = _render(tokenizer, prompt, chosen, source, row)
    _, rejected_text, _ = _render(tokenizer, prompt, rejected, source, row)
    special = not conversational  # a chat template writes its own special tokens
    prompt_ids = tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
    chosen_full = tokenizer(chosen_text, add_special_tokens=special)["input_ids"]
    rejected_full = tokenizer(rejected_text, add_special_tokens=special)["input_ids"]
    n = min(_common_prefix_length(prompt_ids, chosen_full), _common_prefix_length(prompt_ids, rejected_full))
    prompt_ids, completions = prompt_ids[:n], [chosen_full[n:], rejected_full[n:]]
    eos = tokenizer.eos_token_id
    for ids in completions:
        if eos is not None and not (ids and ids[-1] == eos) and not (conversational and eos in ids):
            ids.append(eos)
    prompt_truncated = len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    completion_truncated = any(len(ids) > room for ids in completions)
    chosen_ids, rejected_ids = (ids[:room] for ids in completions)
    if not chosen_ids or not rejected_ids:
        raise DataError(source, "tokenizes to an empty completion", row, "chosen" if not chosen_ids else "rejected")
    example = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
    return example, prompt_truncated, completion_truncated


def load_preference_data(
    source: Any, tokenizer, max_length: int, max_prompt_length: int, split: str = "train", progress: bool = False
) -> PreferenceData:
    """Read, check and tokenize every row of `source`, keeping stream order."""
    name, rows = read_rows(source, split)
    stats, pairs = DataStats(), []
    iterator = rows
    if progress:
        # with its total where the source knows it; shown only past a second, so a quick read leaves no "0 rows" bar
        total = len(source) if hasattr(source, "__len__") and not isinstance(source, (str, os.PathLike)) else None
        iterator = tqdm(rows, desc=f"tokenizing {Path(name).name}", unit=" rows", leave=False, total=total, delay=1.0)
    for row_number, row in iterator:
        stats.rows += 1
        checked = check_row(row, name, row_number)
        if checked is None:
            stats.skipped_identical += 1
            continue
        example, cut_prompt, cut_completion = tokenize_pair(
            tokenizer, *checked, max_length=max_length, max_prompt_length=max_prompt_length, source=name, row=row_number
        )
        stats.truncated_prompts += cut_prompt
        stats.truncated_completions += cut_completion
        example["index"] = len(pairs)
        example["row"] = row_number
        pairs.append(example)
    if stats.rows == 0:
        raise DataError(name, "holds no rows")
    if not pairs:
        raise DataError(name, f"all {stats.rows} rows have chosen identical to rejected; nothing to learn")
    stats.pairs = len(pairs)
    warn_if_lossy(name, stats, max_length, max_prompt_length)
    return PreferenceData(pairs=pairs, stats=stats, source=name)


def warn_if_lossy(name: str, stats: DataStats, max_length: int, max_prompt_length: int) -> list[str]:
    """A printed warning (with counts) for each kind of row loss above WARN_FRACTION; returns the messages."""
    losses = [(stats.skipped_identical, stats.rows, "rows skipped (chosen identical to rejected)"),
              (stats.truncated_prompts, stats.pairs, f"prompts cut to --max-prompt-length {max_prompt_length} "
                                                     "(their end kept)"),
              (stats.truncated_completions, stats.pairs, f"pairs with a completion cut to fit --max-length "
                                                         f"{max_length}")]
    messages = [f"{name}: {count} of {total} {what} ({count / total:.0%})" for count, total, what in losses
                if total and count / total > WARN_FRACTION]
    for message in messages:
        logger.warning("%s; raise the limit or check the data (counts in summary.json, data).", message)
    return messages


# --- batching --------------------------------------------------------------------------------------------------------
def collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack `[chosen; rejected]` into one right-padded batch of 2B rows, with a completion mask."""
    sequences, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            sequences.append(ex["prompt_ids"] + ex[key])
            masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[key]))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, : len(seq)] = torch.tensor(mask)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "index": torch.tensor([ex["index"] for ex in examples], dtype=torch.long),
    }
