import json

import datasets
import pytest

import ofsdpo.data
from conftest import sentiment_rows, write_jsonl
from ofsdpo.data import DataError, check_row, collate, load_preference_data, tokenize_pair


def load(source, tokenizer, **kw):
    return load_preference_data(source, tokenizer, kw.pop("max_length", 64), kw.pop("max_prompt_length", 32), **kw)


def test_standard_format_appends_eos_and_masks_the_prompt(tokenizer):
    example, cut_prompt, cut_completion = tokenize_pair(tokenizer, "The film", " was great.", " was bad.", 64, 32)
    full = tokenizer("The film was great.")["input_ids"] + [tokenizer.eos_token_id]
    assert example["prompt_ids"] + example["chosen_ids"] == full
    assert example["prompt_ids"] == tokenizer("The film")["input_ids"]
    assert example["rejected_ids"][-1] == tokenizer.eos_token_id
    assert not cut_prompt and not cut_completion


def test_conversational_format_applies_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "Say something nice."}]
    chosen = [{"role": "assistant", "content": "You are great."}]
    rejected = [{"role": "assistant", "content": "Go away."}]
    example, _, _ = tokenize_pair(tokenizer, prompt, chosen, rejected, 128, 64)
    text = tokenizer.decode(example["prompt_ids"] + example["chosen_ids"])
    assert text == tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    assert tokenizer.decode(example["chosen_ids"]).startswith("You are great.")
    assert tokenizer.eos_token_id in example["chosen_ids"]  # the template's end-of-turn is the EOS token


def test_implicit_prompt_is_the_shared_prefix():
    assert check_row({"chosen": "The film was great.", "rejected": "The film was bad."}, "f", 1) == (
        "The film was", " great.", " bad.")
    user = {"role": "user", "content": "hi"}
    a, b = {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "go"}
    assert check_row({"chosen": [user, a], "rejected": [user, b]}, "f", 1) == ([user], [a], [b])


def test_truncation_keeps_the_prompt_end_and_cuts_the_completion(tokenizer):
    prompt = " ".join(f"word{i}" for i in range(40))
    example, cut_prompt, cut_completion = tokenize_pair(tokenizer, prompt, " a b c d e f g h i j k l m n o p q r s t", " k", 20, 8)
    assert cut_prompt and cut_completion
    assert example["prompt_ids"] == tokenizer(prompt)["input_ids"][-8:]
    assert len(example["prompt_ids"]) + len(example["chosen_ids"]) == 20


def test_counts_identical_and_truncated_rows(tmp_path, tokenizer):
    rows = sentiment_rows(3) + [{"prompt": "p", "chosen": " same", "rejected": " same"},
                                {"prompt": "x " * 100, "chosen": " yes", "rejected": " no"}]
    data = load(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_prompt_length=16)
    assert (data.stats.rows, data.stats.pairs, data.stats.skipped_identical, data.stats.truncated_prompts) == (5, 4, 1, 1)
    assert [p["index"] for p in data.pairs] == [0, 1, 2, 3] and data.pairs[3]["row"] == 5


@pytest.mark.parametrize("kind", ["json", "parquet", "saved", "rows"])
def test_other_sources_give_the_same_pairs(tmp_path, tokenizer, kind):
    rows = sentiment_rows(5)
    expected = load(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer).pairs
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows))
        source = tmp_path / "d.json"
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
        source = tmp_path / "d.parquet"
    elif kind == "saved":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
        source = str(tmp_path / "saved")
    else:
        source = datasets.Dataset.from_list(rows)
    assert load(source, tokenizer).pairs == expected


@pytest.mark.parametrize(
    "content, pattern",
    [
        ('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": " b"\n',
         r"bad\.jsonl, row 2: not valid JSON"),
        ('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": " b", "rejectd": " c"}\n',
         r"bad\.jsonl, row 2, field 'rejected': missing \(unknown fields: rejectd\)"),
        ('{"prompt": "a", "chosen": 3, "rejected": " c"}\n', r"row 1, field 'chosen': expected a string"),
        ('{"prompt": "", "chosen": " b", "rejected": " c"}\n', r"row 1, field 'prompt': is empty"),
        ('{"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "x"}]}\n',
         r"row 1, field 'chosen': message 0 needs a string 'content'"),
        ('[1, 2]\n', r"row 1: expected an object"),
        ("", r"bad\.jsonl: the file is empty"),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, tokenizer, content, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        load(path, tokenizer)


def test_non_utf8_and_missing_files(tmp_path, tokenizer):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bytes\.jsonl, row 2: bytes that are not UTF-8"):
        load(path, tokenizer)
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "absent.jsonl", tokenizer)


def test_collate_stacks_chosen_then_rejected_with_right_padding():
    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "index": 0},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11], "index": 1}]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    assert batch["attention_mask"].sum().item() == 5 + 3 + 4 + 4
    assert batch["index"].tolist() == [0, 1]


# --- conversational roles and lossy data (issue 15) -----------------------------------------------------------------
USER, SYSTEM = {"role": "user", "content": "hi"}, {"role": "system", "content": "be kind"}
ANSWER, OTHER = {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "go"}


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": [ANSWER, USER], "chosen": [ANSWER], "rejected": [OTHER]}, "prompt", "must open with a user turn"),
    ({"prompt": [USER, ANSWER], "chosen": [ANSWER], "rejected": [OTHER]}, "prompt", "roles: user -> assistant"),
    ({"prompt": [USER], "chosen": [{"role": "user", "content": "x"}], "rejected": [OTHER]}, "chosen",
     "must hold assistant turns only (found user)"),
    ({"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "bot", "content": "x"}]}, "rejected",
     "message 0 has role 'bot'"),
    ({"chosen": [ANSWER, USER], "rejected": [ANSWER, {"role": "user", "content": "x"}]}, "prompt",
     "roles: assistant"),  # implicit prompt: the shared prefix is an assistant turn
])
def test_conversational_roles_are_checked(row, field, message):
    with pytest.raises(DataError) as error:
        check_row(row, "d.jsonl", 3)
    assert f"d.jsonl, row 3, field '{field}': " in str(error.value) and message in str(error.value)


def test_a_system_turn_may_open_the_prompt_and_history_may_precede_the_last_user_turn():
    prompt = [SYSTEM, USER, ANSWER, USER]
    assert check_row({"prompt": prompt, "chosen": [ANSWER], "rejected": [OTHER]}, "d", 1)[0] == prompt


def test_a_bad_role_order_exits_2_naming_the_row(tiny_model_dir, tmp_path, capsys):
    from ofsdpo.cli import main

    rows = [{"prompt": [USER], "chosen": [ANSWER], "rejected": [OTHER]},
            {"prompt": [USER], "chosen": [USER], "rejected": [OTHER]}]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "chat.jsonl, row 2, field 'chosen': must hold assistant turns only" in err
    assert "Traceback" not in err


def test_more_than_a_tenth_of_rows_truncated_or_skipped_is_a_printed_warning(tmp_path, tokenizer, caplog):
    rows = sentiment_rows(10)
    rows[0] = {**rows[0], "prompt": "a very long prompt " * 40}
    rows[1] = {**rows[1], "prompt": "another long prompt " * 40}
    rows[2] = {**rows[2], "rejected": rows[2]["chosen"]}
    with caplog.at_level("WARNING", logger="ofsdpo.data"):
        load(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_length=64, max_prompt_length=16)
    assert "d.jsonl: 1 of 10 rows skipped" not in caplog.text  # 10 %: not more than a tenth
    assert "d.jsonl: 2 of 9 prompts cut to --max-prompt-length 16 (their end kept) (22%)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ofsdpo.data"):
        load(write_jsonl(tmp_path / "e.jsonl", sentiment_rows(20)), tokenizer, max_length=64, max_prompt_length=16)
    assert caplog.text == ""


def test_a_quick_read_shows_no_tokenizing_bar_and_a_slow_one_counts_against_its_total(tokenizer, capsys,
                                                                                     monkeypatch):
    """The bar appears only past a second (a quick read left "tokenizing <rows>: 0 rows" behind), and then with the
    source's length as its total where the source knows it."""
    rows = sentiment_rows(8)
    load_preference_data(rows, tokenizer, 64, 32, progress=True)
    assert "tokenizing" not in capsys.readouterr().err
    seen = {}

    def recording_tqdm(iterable, **kwargs):
        seen.update(kwargs)
        return iterable

    monkeypatch.setattr(ofsdpo.data, "tqdm", recording_tqdm)
    load_preference_data(rows, tokenizer, 64, 32, progress=True)
    assert seen["total"] == 8 and seen["delay"] == 1.0
