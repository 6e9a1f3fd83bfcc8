"""Prompt sets: every source and both TRL prompt-only formats, and errors that name the file, row and field."""

import json

import pytest

from ofsdpo.config import ConfigError
from ofsdpo.domains import get_domain
from ofsdpo.prompts import PromptError, PromptSet, load_prompts

STANDARD = [{"prompt": "The film", "topic": "film", "meta": {"answer": "x"}},
            {"prompt": "The meal", "topic": "food", "meta": {"answer": "y"}}]
CHAT = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
         "answer": "Paris"},
        {"prompt": [{"role": "user", "content": "Capital of Peru?"}], "answer": "Lima"}]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def expected(rows, source, numbers):
    """The records load_prompts should give: prompt, other columns (nested meta merged) as meta, row, source."""
    out = []
    for row, number in zip(rows, numbers):
        meta = dict(row.get("meta", {}))
        meta.update({k: v for k, v in row.items() if k not in ("prompt", "meta")})
        out.append({"prompt": row["prompt"], "meta": meta, "row": number, "source": source})
    return out


@pytest.mark.parametrize("rows, chat", [(STANDARD, False), (CHAT, True)])
def test_jsonl_rows_are_numbered_by_line_and_keep_their_columns_as_meta(tmp_path, rows, chat):
    path = write(tmp_path / "p.jsonl", json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    prompts = load_prompts(path)
    assert prompts.chat is chat and prompts.source == str(path) and len(prompts) == 2
    assert prompts.records == expected(rows, str(path), [1, 3])


@pytest.mark.parametrize("rows, chat", [(STANDARD, False), (CHAT, True)])
@pytest.mark.parametrize("form", ["json-list", "json-object", "parquet", "saved", "list", "dataset"])
def test_every_source_gives_the_same_records(tmp_path, rows, chat, form):
    import datasets

    if form == "json-list":
        source = str(write(tmp_path / "p.json", json.dumps(rows)))
    elif form == "json-object":
        source = str(write(tmp_path / "p.json", json.dumps({"data": rows})))
    elif form == "parquet":
        source = str(tmp_path / "p.parquet")
        datasets.Dataset.from_list(rows).to_parquet(source)
    elif form == "saved":
        source = str(tmp_path / "saved")
        datasets.Dataset.from_list(rows).save_to_disk(source)
    elif form == "list":
        source = rows
    else:
        source = datasets.Dataset.from_list(rows)
    prompts = load_prompts(source)
    name = source if isinstance(source, str) else ("<rows>" if form == "list" else "<dataset>")
    assert prompts.chat is chat
    assert prompts.records == expected(rows, name, [1, 2])


def test_builtin_prompts_keep_their_meta_and_split():
    domain = get_domain("safety")
    train = load_prompts("builtin:safety")
    assert train.chat is True and train.source == "builtin:safety"
    assert [r["prompt"] for r in train.records] == [r["prompt"] for r in domain.prompts("train")]
    assert [r["meta"] for r in train.records] == [r["meta"] for r in domain.prompts("train")]
    held = load_prompts("builtin:safety:heldout")
    assert [r["prompt"] for r in held.records] == [r["prompt"] for r in domain.prompts("heldout")]
    assert load_prompts("builtin:safety", split="heldout").records == held.records
    assert load_prompts("builtin:safety:heldout", split="train").records == held.records  # the spec's own wins
    everything = load_prompts("builtin:sentiment:all")
    assert everything.chat is False and [r["row"] for r in everything.records] == list(range(1, 241))
    # rows are the bundled file's record numbers, so a held-out prompt keeps its own number
    assert {r["row"] for r in held.records} < set(range(1, len(domain.prompts("all")) + 1))


def test_builtin_errors_name_the_spec():
    with pytest.raises(ConfigError, match=r"builtin:sentimnt: no built-in domain 'sentimnt' \(did you mean "
                                          r"builtin:sentiment\?\)"):
        load_prompts("builtin:sentimnt")
    with pytest.raises(ConfigError, match="no split 'test' in built-in prompts; splits are train, heldout, all"):
        load_prompts("builtin:sentiment:test")


def test_split_column_selects_rows_and_is_ignored_without_one(tmp_path):
    rows = [{"prompt": "a", "split": "train"}, {"prompt": "b", "split": "heldout"}, {"prompt": "c", "split": "train"}]
    path = write(tmp_path / "p.jsonl", jsonl(rows))
    assert [(r["prompt"], r["row"]) for r in load_prompts(path, split="train").records] == [("a", 1), ("c", 3)]
    assert [r["prompt"] for r in load_prompts(path).records] == ["a", "b", "c"]
    plain = write(tmp_path / "plain.jsonl", jsonl([{"prompt": "a"}]))
    assert len(load_prompts(plain, split="heldout")) == 1
    with pytest.raises(PromptError, match=r"no rows with split 'dev' \(splits: heldout, train\)"):
        load_prompts(path, split="dev")


def test_a_preference_file_works_as_prompts_without_its_completions(tmp_path):
    rows = [{"prompt": "The film", "chosen": " was great.", "rejected": " was dull.", "score": 1}]
    prompts = load_prompts(write(tmp_path / "pairs.jsonl", jsonl(rows)))
    assert prompts.records[0]["prompt"] == "The film" and prompts.records[0]["meta"] == {"score": 1}


def test_prompt_set_passes_through():
    prompts = load_prompts([{"prompt": "a"}])
    assert load_prompts(prompts) is prompts and isinstance(prompts, PromptSet)


BAD_ROWS = [
    ({"text": "hi"}, "field 'prompt': missing (fields: text)"),
    ({"chosen": "The film was great.", "rejected": "The film was dull."},
     ("field 'prompt': missing: this row is preference data in TRL's implicit-prompt format (chosen and rejected "
      "only); pass it with --data")),
    ({"prompt": "   "}, "field 'prompt': is empty"),
    ({"prompt": []}, "field 'prompt': is an empty list of messages"),
    ({"prompt": 7}, "field 'prompt': expected a string or a list of {role, content} messages, got int"),
    ({"prompt": [{"role": "user", "content": "hi"}, "hello"]},
     "field 'prompt': message 1 is a str, not a {role, content} object"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "user"}]},
     "field 'prompt': message 1 needs a string 'content' (missing)"),
    ({"prompt": [{"role": "user", "content": 3}]}, "field 'prompt': message 0 needs a string 'content' (a int)"),
    ({"prompt": [{"role": "robot", "content": "hi"}]}, "field 'prompt': message 0 has role 'robot'"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]},
     "field 'prompt': must open with a user turn (after an optional system turn) and end with one"),
    ("just text", "expected an object with a 'prompt' field, got str"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_a_bad_row_names_the_file_its_line_and_the_field(tmp_path, bad, message):
    path = write(tmp_path / "p.jsonl", jsonl([{"prompt": "fine"}, bad]))
    with pytest.raises(ConfigError) as caught:
        load_prompts(path)
    assert str(caught.value).startswith(f"{path}, row 2")
    assert message in str(caught.value)


def test_mixing_formats_names_both_rows(tmp_path):
    path = write(tmp_path / "p.jsonl", jsonl([{"prompt": "plain"}, {"prompt": "plain"}, CHAT[1]]))
    with pytest.raises(ConfigError, match=r"p.jsonl, row 3, field 'prompt': is a list of messages \(conversational "
                                          r"format\) but row 1's is a string \(standard format\)"):
        load_prompts(path)


@pytest.mark.parametrize("name, text, message", [
    ("empty.jsonl", "", "the file is empty"),
    ("blank.jsonl", "\n \n", "holds no rows"),
    ("empty.json", "[]", "holds no rows"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "row 2: not valid JSON"),
    ("prompts.txt", "hello\n", "unknown file type; use .jsonl, .json or .parquet"),
])
def test_bad_files_are_named(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(PromptError, match=f"^{path}") as caught:
        load_prompts(path)
    assert message in str(caught.value)


def test_missing_paths_fail_at_once(tmp_path):
    with pytest.raises(PromptError, match=f"^{tmp_path / 'nope.jsonl'}: no such file$"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(PromptError, match="no such file or folder"):
        load_prompts(str(tmp_path / "nope"))


def test_a_hub_dataset_that_cannot_load_says_so(monkeypatch):
    import datasets

    asked = []

    def offline(name, split=None, **kwargs):
        asked.append((name, split))
        raise ConnectionError("the hub cannot be reached")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("ofsdpo.data.check_hub", lambda *a, **k: None)  # the Hub answers; the load then fails
    with pytest.raises(PromptError, match=r"^owner/prompts: could not load the dataset \(ConnectionError: the hub "
                                          r"cannot be reached\)$"):
        load_prompts("owner/prompts", split="test")
    assert asked == [("owner/prompts", "test")]
