"""The maintenance scripts under scripts/ that the results depend on."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_restore_runs_writes_each_finished_run_once(tmp_path):
    """Every run of the aggregate with a run key becomes runs/<cell>/seed-<s>/result.json, as written; a result
    already there is kept, and a run without a key (not from `ofsdpo experiment`) is not restored."""
    restore = load("restore_runs").restore
    per_seed = {"dpo": {"0": {"run_key": "a", "x": 1}, "4": {"run_key": "b", "x": 2}},
                "cofs": {"0": {"x": 3}}}
    aggregate = tmp_path / "aggregate.json"
    aggregate.write_text(json.dumps({"per_seed": per_seed}))
    kept = tmp_path / "out" / "runs" / "dpo" / "seed-4" / "result.json"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"run_key": "newer"}')
    written = restore(aggregate, tmp_path / "out")
    assert written == [tmp_path / "out" / "runs" / "dpo" / "seed-0" / "result.json"]
    assert json.loads(written[0].read_text()) == per_seed["dpo"]["0"]
    assert json.loads(kept.read_text()) == {"run_key": "newer"}
    for text in ('{"cells": {}}', "not json"):  # not an aggregate: an error naming the file
        aggregate.write_text(text)
        with pytest.raises(SystemExit, match=r"aggregate\.json: not an aggregate\.json"):
            restore(aggregate, tmp_path / "out")
