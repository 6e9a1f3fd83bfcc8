"""Prompt sets for on-policy rounds and evaluation, in TRL's prompt-only formats.

- standard:        {"prompt": "The film"}
- conversational:  {"prompt": [{"role": "user", "content": "Hi"}]}

Every other column of a row is the prompt's metadata, handed to the judges (a "meta" object column is merged into
it, not nested; a preference file's "chosen" and "rejected" are dropped, so a pairs file also works as a prompt
set). Sources: a .jsonl / .json / .parquet file, a folder written by `Dataset.save_to_disk`, a hub dataset name, a
list of dicts, a `datasets.Dataset`, or `builtin:NAME[:SPLIT]` for a built-in domain's prompts.

A bad row raises `PromptError` (a `ConfigError`: exit status 2) naming the source, the row (for JSONL, its line)
and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .data import _check_roles, _check_text, read_rows
from .errors import DataError, PromptError, suggest

BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS = ("train", "heldout", "all")
# the built-in prompt sets (ofsdpo/builtin/NAME.jsonl) and whether each goes through the chat template (True) or is
# continued as plain text (False); domains.py pairs each set with its judge (it imports this module, not the reverse)
BUILTIN_CHAT = {"sentiment": False, "critic": False, "safety": True, "concise": True}
PREFERENCE_FIELDS = ("chosen", "rejected")


@dataclass
class PromptSet:
    """Checked prompt records in source order.

    Each record is {"prompt": str | list of messages, "meta": dict, "row": int, "source": str}; `chat` says whether
    the prompts go through the chat template (conversational rows, or a built-in chat domain's plain-text prompts).
    """

    records: list[dict]
    source: str
    chat: bool

    def __len__(self) -> int:
        return len(self.records)


def load_prompts(source: Any, split: str | None = None) -> PromptSet:
    """Read and check the prompts of `source` (see the module docstring for the accepted sources).

    `split` keeps the rows whose "split" column equals it when the rows have such a column (built-in files and
    files derived from them do), and is ignored otherwise; for a hub dataset or a saved `DatasetDict` it is also
    the split loaded (default "train"). `builtin:NAME:SPLIT` names its split itself, which wins over `split`.
    """
    if isinstance(source, PromptSet):
        return source
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        return _load_builtin(source, split)
    name, rows = _read(source, split)
    rows = _select_split(rows, split, name)
    records = [_record(row, name, number) for number, row in rows]
    chat = _check_one_format(records, name)
    return PromptSet(records=records, source=name, chat=chat)


# --- reading ---------------------------------------------------------------------------------------------------------
def _read(source: Any, split: str | None) -> tuple[str, list[tuple[int, Any]]]:
    """(source name, [(row number, row)]) through data.read_rows, its errors turned into PromptError."""
    try:
        name, rows = read_rows(source, split or "train")
        numbered = list(rows)  # read_rows is lazy: its errors surface while iterating
    except DataError as err:
        raise PromptError(err.source, _reason(err), err.row, err.field) from None
    if not numbered:
        raise PromptError(name, "holds no rows")
    return name, numbered


def _reason(err: Exception) -> str:
    """The part of a DataError's message after its 'source, row, field: ' prefix."""
    text = str(err)
    prefix = getattr(err, "source", "")
    if getattr(err, "row", None) is not None:
        prefix += f", row {err.row}"
    if getattr(err, "field", None) is not None:
        prefix += f", field '{err.field}'"
    return text[len(prefix) + 2:] if text.startswith(prefix + ": ") else text


def _select_split(rows: list[tuple[int, Any]], split: str | None, name: str) -> list[tuple[int, Any]]:
    has_column = any(isinstance(row, dict) and "split" in row for _, row in rows)
    if split is None or not has_column:
        return rows
    kept = [(number, row) for number, row in rows if isinstance(row, dict) and row.get("split") == split]
    if not kept:
        present = sorted({str(row.get("split")) for _, row in rows if isinstance(row, dict) and "split" in row})
        raise PromptError(name, f"no rows with split '{split}' (splits: {', '.join(present)})")
    return kept


def _load_builtin(spec: str, split: str | None) -> PromptSet:
    """`builtin:NAME[:SPLIT]`: a built-in domain's prompts; rows count its bundled file's records from 1."""
    name, _, spec_split = spec[len(BUILTIN_PREFIX):].partition(":")
    if name not in BUILTIN_CHAT:
        hint = suggest(name, BUILTIN_CHAT, form=BUILTIN_PREFIX + "{}")
        hint = f" ({hint})" if hint else ""
        raise PromptError(spec, f"no built-in domain '{name}'{hint}; built-in domains are {', '.join(BUILTIN_CHAT)}")
    chosen = spec_split or split or "train"
    if chosen not in BUILTIN_SPLITS:
        raise PromptError(spec, f"no split '{chosen}' in built-in prompts; splits are {', '.join(BUILTIN_SPLITS)}")
    source = f"{BUILTIN_PREFIX}{name}"
    records = [{"prompt": r["prompt"], "meta": dict(r.get("meta") or {}), "row": line, "source": source}
               for line, r in enumerate(builtin_records(name), start=1) if chosen == "all" or r["split"] == chosen]
    return PromptSet(records=records, source=source, chat=BUILTIN_CHAT[name])


def builtin_records(name: str) -> list[dict]:
    """Every record of the built-in prompt set `name` in file order: {"prompt", "meta", "split", "row", "source"},
    `row` being the line of the bundled file (errors name it)."""
    text = resources.files("ofsdpo.builtin").joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
    return [{**json.loads(line), "row": i, "source": f"{BUILTIN_PREFIX}{name}"}
            for i, line in enumerate(text.splitlines(), 1) if line.strip()]


# --- checking --------------------------------------------------------------------------------------------------------
def _record(row: Any, source: str, number: int) -> dict:
    """One checked record: the prompt, the other columns as meta, and where it came from."""
    if not isinstance(row, dict):
        raise PromptError(source, f"expected an object with a 'prompt' field, got {type(row).__name__}", number)
    if row.get("prompt") is None:
        raise PromptError(source, _missing_prompt_reason(row), number, "prompt")
    _check_prompt(row["prompt"], source, number)
    return {"prompt": row["prompt"], "meta": _meta(row), "row": number, "source": source}


def _missing_prompt_reason(row: dict) -> str:
    if all(name in row for name in PREFERENCE_FIELDS):
        return ("missing: this row is preference data in TRL's implicit-prompt format (chosen and rejected only); "
                "pass it with --data, or add a 'prompt' field")
    others = sorted(row)
    return "missing" + (f" (fields: {', '.join(others)})" if others else "")


def _check_prompt(prompt: Any, source: str, row: int) -> None:
    try:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError(source, "is empty", row, "prompt")
            _check_text(prompt, source, row, "prompt")
            return
        if not isinstance(prompt, list):
            raise PromptError(source, "expected a string or a list of {role, content} messages, got "
                                      f"{type(prompt).__name__}", row, "prompt")
        if not prompt:
            raise PromptError(source, "is an empty list of messages", row, "prompt")
        for i, message in enumerate(prompt):
            _check_message(message, i, source, row)
        _check_roles(prompt, [], [], source, row)  # known roles; ends with the user's turn, which is answered
    except DataError as err:
        raise PromptError(err.source, _reason(err), err.row, err.field) from None


def _check_message(message: Any, index: int, source: str, row: int) -> None:
    if not isinstance(message, dict):
        raise PromptError(source, f"message {index} is a {type(message).__name__}, not a {{role, content}} object",
                          row, "prompt")
    for key in ("role", "content"):
        if not isinstance(message.get(key), str):
            got = "missing" if key not in message else f"a {type(message[key]).__name__}"
            raise PromptError(source, f"message {index} needs a string '{key}' ({got})", row, "prompt")
        _check_text(message[key], source, row, f"prompt[{index}].{key}")


def _meta(row: dict) -> dict:
    """Every column but the prompt and a preference row's completions; a "meta" object is merged, not nested."""
    meta: dict = {}
    nested = row.get("meta")
    if isinstance(nested, dict):
        meta.update(nested)
    for key, value in row.items():
        if key in ("prompt", *PREFERENCE_FIELDS) or (key == "meta" and (isinstance(value, dict) or value is None)):
            continue
        meta[key] = value  # a top-level column wins over the same key inside "meta"
    return meta


def _check_one_format(records: Iterable[dict], source: str) -> bool:
    """Whether the rows are conversational; rows mixing the two formats are refused at the first odd one."""
    first: dict | None = None
    for record in records:
        if first is None:
            first = record
        elif isinstance(record["prompt"], str) != isinstance(first["prompt"], str):
            kinds = {True: "a string (standard format)", False: "a list of messages (conversational format)"}
            raise PromptError(source, f"is {kinds[isinstance(record['prompt'], str)]} but row {first['row']}'s is "
                                      f"{kinds[isinstance(first['prompt'], str)]}; use one format per source",
                              record["row"], "prompt")
    return first is not None and not isinstance(first["prompt"], str)
