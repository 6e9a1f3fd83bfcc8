"""errors.py: one home for the error classes (their hierarchy decides the exit status) and one "did you mean"."""

import pytest

from ofsdpo import errors
from ofsdpo.errors import (ConfigError, DataError, JudgeError, ModelError, NonFiniteError, OutputDirLocked, PromptError,
                           WriteError, suggest)


def test_the_hierarchy_is_what_the_cli_exit_status_relies_on():
    for error in (PromptError, JudgeError, OutputDirLocked, WriteError):
        assert issubclass(error, ConfigError)  # one line, exit status 2
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert not issubclass(DataError, ConfigError)
    assert issubclass(ModelError, RuntimeError) and issubclass(NonFiniteError, RuntimeError)


@pytest.mark.parametrize("error", [DataError, PromptError])
def test_located_errors_name_source_row_and_field(error):
    err = error("pairs.jsonl", "missing", 3, "chosen")
    assert str(err) == "pairs.jsonl, row 3, field 'chosen': missing"
    assert (err.source, err.row, err.field) == ("pairs.jsonl", 3, "chosen")
    assert str(error("pairs.jsonl", "empty")) == "pairs.jsonl: empty"


def test_the_old_homes_still_export_the_same_classes():
    from ofsdpo import config, data, prompts, rundir

    assert (config.ConfigError, data.DataError, prompts.PromptError, rundir.OutputDirLocked) == (
        errors.ConfigError, errors.DataError, errors.PromptError, errors.OutputDirLocked)


def test_suggest_finds_a_typo_and_nothing_for_another_word():
    assert suggest("sentimnt", ["sentiment", "critic"]) == "did you mean 'sentiment'?"
    assert suggest("banana", ["sentiment", "critic"]) == ""
    # several, closest first; `form` writes each as its message quotes names
    assert suggest("--lora-rr", ["--beta", "--lora-alpha", "--lora-r"], n=3, form="{}") == \
        "did you mean --lora-r or --lora-alpha?"
    assert suggest("bta", ["alpha", "beta", "lr"], n=3) == "did you mean 'beta'?"
    assert suggest("critc", ("critic",), form="builtin:{}") == "did you mean builtin:critic?"


def test_config_sits_below_domains_judges_and_prompts():
    """No circle: config imports errors (not domains, judges or prompts), and domain names are checked where they
    load. A fresh interpreter, so that modules other tests imported do not count."""
    import json
    import subprocess
    import sys

    code = "import json, sys, ofsdpo.config; print(json.dumps([m for m in sys.modules if m.startswith('ofsdpo')]))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert "ofsdpo.errors" in loaded
    assert not {"ofsdpo.domains", "ofsdpo.judges", "ofsdpo.prompts", "ofsdpo.data", "ofsdpo.models"} & set(loaded)
