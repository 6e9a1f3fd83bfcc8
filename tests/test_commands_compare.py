"""`ofsdpo compare`: the user's pairs split by prompt, arms over seeds, paired verdicts and a recommendation;
resumable; clear errors for files too small and bad variants."""

import json

import pytest

from conftest import sentiment_rows, write_jsonl
from ofsdpo.cli import main
from ofsdpo.commands.compare import parse_variant
from ofsdpo.commands.experiment import split_by_prompt
from ofsdpo.config import ConfigError


def user_pairs(tmp_path, prompts: int = 20, per_prompt: int = 2, conversational: bool = False):
    rows = []
    for i, row in enumerate(sentiment_rows(prompts * per_prompt)):
        row["prompt"] = f"Review {i // per_prompt}: the film"  # several pairs per prompt
        if conversational:
            row = {"prompt": [{"role": "user", "content": row["prompt"]}],
                   "chosen": [{"role": "assistant", "content": row["chosen"]}],
                   "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        rows.append(row)
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_split_by_prompt_keeps_prompts_whole_and_names_the_counts(tmp_path):
    path = user_pairs(tmp_path, prompts=10, per_prompt=3)
    parts = split_by_prompt(str(path), selection=4, report_size=5, stream=-1)
    prompts = {name: {r["prompt"] for r in parts[name]} for name in ("train", "selection", "report")}
    assert len(parts["report"]) == 6 and len(parts["selection"]) == 6 and len(parts["train"]) == 18  # whole prompts
    assert not (prompts["train"] & prompts["selection"] or prompts["train"] & prompts["report"]
                or prompts["selection"] & prompts["report"])
    assert prompts["report"] == {"Review 8: the film", "Review 9: the film"}  # the last prompts: reported
    assert len(split_by_prompt(str(path), 4, 5, stream=8)["train"]) == 8
    with pytest.raises(ConfigError, match=r"30 pairs on 10 prompts .* report set of at least 40 pairs"):
        split_by_prompt(str(path), 4, 40, -1)


def test_variants_parse_into_typed_options():
    assert parse_variant("lr2x:--lr=1e-3,--alpha=0.2", "dpo") == {"name": "lr2x", "method": "dpo", "lr": 1e-3,
                                                                   "alpha": 0.2}
    assert parse_variant("slow:--method=ofs-dpo,--swap=off", "dpo")["method"] == "ofs-dpo"
    # TRL's --max-completion-length is a training option of every command now, an arm's as well
    assert parse_variant("short:--max-completion-length=32", "dpo")["max_completion_length"] == 32
    for bad in ("nocolon", "x:--nosuch=1", "x:--lr=fast", "x:--seed=3"):
        with pytest.raises(ConfigError, match="--variant"):
            parse_variant(bad, "dpo")


@pytest.mark.parametrize("conversational", [False, True])
def test_compare_end_to_end_with_a_judge_and_resume(tiny_model_dir, tmp_path, monkeypatch, capsys, conversational):
    """Two arms x 2 seeds on a user's file with a module:function judge on held-out prompts: the sets are
    disjoint by prompt, compare.json holds the paired rows, verdicts and a recommendation per arm; a second
    call after a run's result is lost runs that run alone."""
    (tmp_path / "myjudge.py").write_text("def longer(prompt, response, meta):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = user_pairs(tmp_path, conversational=conversational)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Held-out review {i}: it"} for i in range(3)])
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(data), "--methods", "dpo,ofs-dpo", "--seeds", "2", "--report-size", "6",
            "--selection-size", "4", "--prompts", str(prompts), "--judge", "myjudge:longer", "--judge-prompts", "3",
            "--judge-samples", "1", "--model", str(tiny_model_dir), "--batch-size", "4", "--lr", "1e-3",
            "--lora-r", "2", "--lora-alpha", "4", "--max-length", "48", "--max-prompt-length", "24",
            "--chase-interval", "1", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert result["judged"] and len(result["recommendation"]) == 1 and result["recommendation"][0] in printed
    assert result["recommendation"][0].startswith("ofs-dpo: ")
    split = result["split"]
    assert len(split["report"]) == 6 and len(split["selection"]) == 4 and len(split["train"]) == 28  # 7 steps x 4
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    key = lambda i: json.dumps(rows[i]["prompt"])  # noqa: E731
    sets = {name: {key(i) for i in split[name]} for name in split}
    assert not (sets["train"] & sets["selection"] or sets["train"] & sets["report"]
                or sets["selection"] & sets["report"])
    metrics = {r["metric"] for r in result["paired"]}
    assert {"report_loss", "judge_score", "kl", "online_loss_total"} <= metrics
    assert all(r["p_holm"] is not None and r["decision"]["lower"] is not None for r in result["paired"])
    assert set(result["costs"]) == {"dpo", "ofs-dpo"} and result["costs"]["dpo"]["runs"] == 2
    assert (out / "runs" / "ofs-dpo" / data.stem / "seed-1" / "adapter_config.json").is_file()  # the served adapter
    assert "# Recommendation" in (out / "compare.md").read_text()
    lost = out / "runs" / "dpo" / data.stem / "seed-1" / "result.json"
    lost.unlink()
    capsys.readouterr()
    assert main([*argv, "--status"]) == 0  # where the runs stand, nothing run
    printed = capsys.readouterr().out
    states = {tuple(line.split()[:2]): " ".join(line.split()[2:]) for line in printed.splitlines()[1:-1]}
    assert states[(f"dpo/{data.stem}", "1")] == "to run" and states[(f"ofs-dpo/{data.stem}", "1")].startswith(
        "finished ")
    assert "3 of 4 runs finished, 0 running, 0 unfinished (a rerun resumes them), 1 to run." in printed
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    assert main(argv) == 0
    assert lost.is_file() and all(p.stat().st_mtime_ns == t for p, t in before.items())  # only the lost run ran


def test_compare_refuses_bad_input_before_loading(tmp_path, capsys):
    data = user_pairs(tmp_path, prompts=4, per_prompt=1)
    assert main(["compare", "--data", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    assert "too few for a report set of at least 32" in capsys.readouterr().err
    assert main(["compare", "--data", str(data), "--methods", "dpo", "--report-size", "1", "--selection-size", "1",
                 "--batch-size", "1"]) == 2
    assert "at least two distinct arms" in capsys.readouterr().err
    assert main(["compare", "--data", str(data), "--prompts", "p.jsonl"]) == 2
    assert "--prompts and --judge go together" in capsys.readouterr().err
    (tmp_path / "j.py").write_text("def score(prompt, response, meta):\n    return 1.0\n")
    leaked = write_jsonl(tmp_path / "leak.jsonl", [{"prompt": "Held out"}, {"prompt": "Review 2: the film"}])
    config = tmp_path / "compare.yaml"  # the same fields from a YAML file
    config.write_text(f"data: {data}\nreport_size: 1\nselection_size: 1\nbatch_size: 1\nprompts: {leaked}\n"
                      f"judge: [j:score]\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["compare", "--config", str(config)]) == 2
    assert "'Review 2: the film' is also a prompt of --data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compare_gives_the_numbers_of_train_and_eval_run_by_hand(tiny_model_dir, tmp_path, monkeypatch):
    """One arm and seed of a comparison, redone by hand on the split compare.json wrote: `ofsdpo train` on the
    stream with the selection set as --eval-data, then `ofsdpo eval` of its adapter on the report pairs and the
    held-out prompts with the same seed. The report loss and accuracy, judge score, win rate and KL are the same."""
    (tmp_path / "myjudge.py").write_text("def longer(prompt, response, meta):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = user_pairs(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Held-out review {i}: it"} for i in range(3)])
    model = ["--model", str(tiny_model_dir), "--max-length", "48", "--max-prompt-length", "24"]
    lora = ["--lora-r", "2", "--lora-alpha", "4", "--chase-interval", "1", "--batch-size", "4", "--lr", "1e-3"]
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data), "--seeds", "2", "--report-size", "6", "--selection-size", "4",
                 "--prompts", str(prompts), "--judge", "myjudge:longer", "--judge-prompts", "3", "--judge-samples",
                 "1", "--output-dir", str(out), "--no-progress", *model, *lora]) == 0
    result = json.loads((out / "compare.json").read_text())
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", [rows[i] for i in result["split"][name]])
             for name in ("train", "selection", "report")}
    hand = tmp_path / "hand"
    steps = len(result["split"]["train"]) // 4
    assert main(["train", "--data", str(files["train"]), "--eval-data", str(files["selection"]), "--method", "ofs-dpo",
                 "--seed", "1", "--max-steps", str(steps), "--save-steps", "0", "--output-dir", str(hand),
                 "--no-progress", *model, *lora]) == 0
    assert main(["eval", "--adapter", str(hand), "--prompts", f"mine={prompts}", "--judge", "myjudge:longer",
                 "--data", f"mine={files['report']}", "--seed", "1", "--judge-prompts", "3", "--judge-samples", "1",
                 "--json", str(tmp_path / "eval.json"), "--no-progress", *model[:2], "--max-length", "48",
                 "--max-prompt-length", "24"]) == 0
    by_hand = next(r for r in json.loads((tmp_path / "eval.json").read_text())["rows"] if r["adapter"] == str(hand))
    arm = result["per_seed"][f"ofs-dpo/{data.stem}"]["1"]
    for key, theirs in (("report_loss", "loss"), ("report_accuracy", "accuracy"), ("judge_score", "judge_score"),
                        ("win_rate", "win_rate"), ("kl", "kl")):
        assert arm[key] == pytest.approx(by_hand[theirs], rel=1e-5, abs=1e-6), key


def test_the_continual_form_compares_methods_across_your_domains(tiny_model_dir, tmp_path):
    """--domain a=… --domain b=…: each file split by prompt like --data, every method runs over the domains in order
    once per seed; the pair metrics are compared (avg final report loss, accuracy, backward transfer) and each
    arm gets a recommendation line."""
    (tmp_path / "a").mkdir()
    a = user_pairs(tmp_path / "a", prompts=12)
    b_rows = [{**row, "prompt": row["prompt"].replace("Review", "Critique")}
              for row in map(json.loads, a.read_text().splitlines())]
    b = write_jsonl(tmp_path / "b.jsonl", b_rows)
    out = tmp_path / "cmp"
    assert main(["compare", "--domain", f"first={a}", "--domain", f"second={b}", "--methods", "cofs-dpo,dpo",
                 "--seeds", "2", "--report-size", "4", "--selection-size", "4", "--model", str(tiny_model_dir),
                 "--batch-size", "4", "--lr", "1e-3", "--lora-r", "2", "--lora-alpha", "4", "--max-length", "48",
                 "--max-prompt-length", "24", "--chase-interval", "1", "--output-dir", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["kind"] == "continual" and set(result["split"]) == {"first", "second"}
    assert {r["metric"] for r in result["paired"]} >= {"avg_final_loss", "avg_final_accuracy"}
    assert len(result["recommendation"]) == 1 and result["recommendation"][0].startswith("cofs-dpo: ")
    assert set(result["costs"]) == {"cofs-dpo", "dpo"} and not result["judged"]
    assert (out / "split" / "second-report.jsonl").is_file()
    with pytest.raises(ConfigError, match="not both"):
        from ofsdpo.config import CompareConfig

        CompareConfig(data=str(a), domain=[f"first={a}"])

