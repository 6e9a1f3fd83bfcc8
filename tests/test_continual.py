"""End to end over three tiny domains: the report, the stage folders and the served combination on disk."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PowerCut, dying_after_step, write_jsonl
from ofsdpo.cli import main
from ofsdpo.combine import combine_params, effective_deltas
from ofsdpo.config import ConfigError, ContinualConfig
from ofsdpo.continual import ContinualRunner


def domain_rows(word_good, word_bad, n=20):
    return [{"prompt": f"Item {i}: it is", "chosen": f" {word_good}.", "rejected": f" {word_bad}."} for i in range(n)]


@pytest.fixture
def domains(tmp_path):
    files = {"pos": ("great", "awful"), "safe": ("sorry, I cannot help", "sure, here is how"),
             "short": ("yes", "well, it depends on many things")}
    return [f"{name}={write_jsonl(tmp_path / f'{name}.jsonl', domain_rows(*words))}"
            for name, words in files.items()]


def run(tiny_model_dir, tmp_path, domains, **kw):
    values = dict(model=str(tiny_model_dir), domain=domains, output_dir=str(tmp_path / kw.get("method", "x")),
                  batch_size=4, lr=5e-3, lora_r=2, lora_alpha=4, max_length=48, max_prompt_length=24,
                  memory_size=4, heldout_size=4, max_steps_per_domain=3, save_steps=0, progress=False,
                  lambda_grid="0,0.5,1", regret=False, seed=0)
    values.update(kw)
    config = ContinualConfig.from_flat(**values)
    return config, ContinualRunner(config).run()


@pytest.mark.parametrize("combine", ["params", "delta"])
def test_cofs_dpo_serves_the_stated_combination(tiny_model_dir, tmp_path, domains, combine):
    config, report = run(tiny_model_dir, tmp_path, domains, method="cofs-dpo", combine=combine)
    out = tmp_path / "cofs-dpo"
    assert len(report["matrix"]["accuracy"]) == 3 and all(len(r) == 3 for r in report["matrix"]["loss"])
    assert report["lambdas"][0] is None and all(l in (0.0, 0.5, 1.0) for l in report["lambdas"][1:])
    for key in ("cl/avg_accuracy", "cl/forgetting", "cl/bwt"):
        assert key in report
    kept = [load_file(out / "domains" / f"{k + 1}-{n}" / "best_fast" / "adapter_model.safetensors")
            for k, n in enumerate(["pos", "safe", "short"])]
    for k, n in enumerate(["pos", "safe", "short"]):
        stage_dir = out / "domains" / f"{k + 1}-{n}"
        assert (stage_dir / "fast").is_dir() and (stage_dir / "slow").is_dir() and (stage_dir / "metrics.jsonl").exists()
    weights = list(report["stages"][-1]["weights"].values())
    assert abs(sum(weights) - 1) < 1e-9
    served = load_file(out / "adapter_model.safetensors")
    served_config = json.loads((out / "adapter_config.json").read_text())
    if combine == "params":
        expected = combine_params(kept, weights)
        assert all(torch.allclose(served[k], expected[k], atol=1e-6) for k in expected)
        assert served_config["r"] == 2
    else:
        scale = 4 / 2
        deltas = [effective_deltas(s, scale) for s in kept]
        got = effective_deltas(served, served_config["lora_alpha"] / served_config["r"])
        for layer, delta in got.items():
            assert torch.allclose(delta, sum(w * d[layer] for w, d in zip(weights, deltas)), atol=1e-5)
    assert (out / "heatmap.png").stat().st_size > 1000 and (out / "report.txt").exists()


@pytest.mark.parametrize("method", ["dpo", "ofs-dpo", "dpo-replay", "lora-merge"])
def test_baselines_fill_the_report(tiny_model_dir, tmp_path, domains, method):
    _, report = run(tiny_model_dir, tmp_path, domains[:2], method=method, max_steps_per_domain=2)
    acc, loss = report["matrix"]["accuracy"], report["matrix"]["loss"]
    assert report["method"] == method and len(acc) == 2 and len(acc[0]) == 2
    assert all(0 <= a <= 1 for row in acc for a in row) and all(math.isfinite(x) for row in loss for x in row)
    # the report's continual metrics are those of its own matrix
    assert report["cl/forgetting"] == {"pos": pytest.approx(max(acc[0][0], acc[1][0]) - acc[1][0])}
    assert report["cl/avg_accuracy"] == pytest.approx((acc[1][0] + acc[1][1]) / 2)
    assert report["cl/bwt"] == pytest.approx(acc[1][0] - acc[0][0])
    assert [s["steps"] for s in report["stages"]] == [2, 2]
    assert (tmp_path / method / "adapter_model.safetensors").exists()


def test_replay_mixes_the_earlier_domains_memory_into_the_stream(tiny_model_dir, tmp_path, domains):
    """dpo-replay's second stage trains on its domain's stream plus memory_size pairs of the first: more steps
    than sequential dpo over the same whole streams, the same first stage."""
    _, plain = run(tiny_model_dir, tmp_path, domains[:2], method="dpo", max_steps_per_domain=-1, batch_size=2)
    _, replay = run(tiny_model_dir, tmp_path, domains[:2], method="dpo-replay", max_steps_per_domain=-1,
                    batch_size=2)
    first, second = ([s["steps"] for s in r["stages"]] for r in (plain, replay))
    assert first[0] == second[0] and second[1] == first[1] + 4 // 2  # memory_size 4 pairs, 2 per step


def test_cli_takes_repeated_domains_and_yaml(tiny_model_dir, tmp_path, domains, capsys):
    cfg = tmp_path / "cl.yaml"
    name, path = domains[0].split("=")
    cfg.write_text(f"domains:\n  - name: {name}\n    train: {path}\n")
    code = main(["continual", "--config", str(cfg), "--model", str(tiny_model_dir), "--domain", domains[1],
                 "--domain", domains[2], "--output-dir", str(tmp_path / "cli"), "--method", "dpo",
                 "--max-steps-per-domain", "1", "--memory-size", "2", "--heldout-size", "2", "--batch-size", "2",
                 "--lora-r", "2", "--no-progress", "--no-regret"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["domains"] == ["safe", "short"]  # flags override the YAML's list
    assert "cl/avg_accuracy" in capsys.readouterr().out


def test_builtin_domains_are_judged_after_every_stage(tiny_model_dir, tmp_path):
    files = {"sentiment": ("great", "awful"), "critic": ("awful", "great")}
    domains = [f"{n}={write_jsonl(tmp_path / f'{n}.jsonl', domain_rows(*w))}" for n, w in files.items()]
    _, report = run(tiny_model_dir, tmp_path, domains, method="cofs-dpo", judge_prompts=2, max_steps_per_domain=1)
    for key in ("judge_score", "win_rate", "kl"):
        assert len(report["matrix"][key]) == 2 and all(v is not None for row in report["matrix"][key] for v in row)
    assert "cl/avg_judge_score" in report and set(report["cl/forgetting_judge"]) == {"sentiment"}


def test_score_domains_seen_leaves_out_the_domains_not_trained_yet(tiny_model_dir, tmp_path):
    """--score-domains seen: the stage x domain matrix without its upper triangle, the rest as under `all` (the
    same training; report pairs have no randomness), and each domain's reference drawn in a call of its own."""
    from ofsdpo.domains import get_domain
    from ofsdpo.scoring import common_random_numbers, reference_samples

    files = {"sentiment": ("great", "awful"), "critic": ("awful", "great")}
    domains = [f"{n}={write_jsonl(tmp_path / f'{n}.jsonl', domain_rows(*w))}" for n, w in files.items()]
    common = dict(method="dpo", judge_prompts=2, max_steps_per_domain=1, seed=3)
    _, everything = run(tiny_model_dir, tmp_path, domains, output_dir=str(tmp_path / "all"), **common)
    config, seen = run(tiny_model_dir, tmp_path, domains, output_dir=str(tmp_path / "seen"), score_domains="seen",
                       **common)
    for key in ("loss", "accuracy", "judge_score", "win_rate", "kl"):
        assert seen["matrix"][key][0][1] is None and everything["matrix"][key][0][1] is not None
        assert None not in seen["matrix"][key][0][:1] + seen["matrix"][key][1]
    for key in ("loss", "accuracy"):  # the cells both score are the same numbers
        assert seen["matrix"][key][0][0] == everything["matrix"][key][0][0]
        assert seen["matrix"][key][1] == everything["matrix"][key][1]
    assert set(seen["cl/forgetting_judge"]) == {"sentiment"} and seen["cl/bwt"] == everything["cl/bwt"]
    report_txt = (tmp_path / "seen" / "report.txt").read_text()
    assert report_txt.count(" -") >= 2 and (tmp_path / "seen" / "heatmap.png").stat().st_size > 1000
    # the reference's samples of each domain as `experiment` draws an in-domain run's: alone, under the seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name in files:
        domain = get_domain(name)
        with common_random_numbers(3, torch.device("cpu")):
            alone = reference_samples(model, tokenizer, domain, domain.prompts("heldout")[:2])
        assert seen["base_judge_score"][name] == pytest.approx(sum(alone) / len(alone), abs=0)


@pytest.mark.parametrize("method", ["cofs-dpo", "lora-merge"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch, method):
    """Stage 2 of 3 dies after its first checkpoint; --resume reads stage 1, resumes stage 2, runs stage 3."""
    from ofsdpo.config import ConfigError
    from ofsdpo.trainer import OFSDPOTrainer

    files = {"sentiment": ("great", "awful"), "critic": ("awful", "great"), "short": ("yes", "well, it depends")}
    domains = [f"{n}={write_jsonl(tmp_path / f'{n}.jsonl', domain_rows(*w))}" for n, w in files.items()]
    kw = dict(method=method, save_steps=1, judge_prompts=2, judge_max_new_tokens=4)
    _, whole = run(tiny_model_dir, tmp_path, domains, output_dir=str(tmp_path / "whole"), **kw)

    after_step, trained = OFSDPOTrainer._after_step, []
    monkeypatch.setattr(OFSDPOTrainer, "_after_step", dying_after_step("2-", 2))
    with pytest.raises(PowerCut):
        run(tiny_model_dir, tmp_path, domains, output_dir=str(tmp_path / "cut"), **kw)
    monkeypatch.setattr(OFSDPOTrainer, "_after_step", after_step)
    train = OFSDPOTrainer.train

    def counted(self):
        trained.append((self.output_dir.name, self.config.resume))
        return train(self)

    monkeypatch.setattr(OFSDPOTrainer, "train", counted)
    with pytest.raises(ConfigError, match="other options.*lr"):  # not the same run
        run(tiny_model_dir, tmp_path, domains, output_dir=str(tmp_path / "cut"), resume=True, lr=1e-3, **kw)
    _, resumed = run(tiny_model_dir, tmp_path, domains, output_dir=str(tmp_path / "cut"), resume=True, **kw)

    assert trained == [("2-critic", True), ("3-short", False)]  # stage 1 read back, not retrained
    assert resumed["lambdas"] == whole["lambdas"] and resumed["stages"] == whole["stages"]
    for key, rows in whole["matrix"].items():
        for got, expected in zip(resumed["matrix"][key], rows, strict=True):  # None: a domain with no judge
            assert [v is None for v in got] == [v is None for v in expected], key
            assert [v for v in got if v is not None] == pytest.approx([v for v in expected if v is not None],
                                                                      rel=1e-5, abs=1e-6), key
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_lora_merge_serves_the_mean_delta_of_its_modules(tiny_model_dir, tmp_path, domains):
    """Each stage trains a fresh DPO module (kept in the stage folder); the served adapter's ΔW = mean of theirs."""
    _, report = run(tiny_model_dir, tmp_path, domains, method="lora-merge", max_steps_per_domain=2)
    out = tmp_path / "lora-merge"
    kept = [load_file(out / "domains" / f"{k + 1}-{n}" / "stage" / "kept.safetensors")
            for k, n in enumerate(["pos", "safe", "short"])]
    assert report["stages"][-1]["weights"] == pytest.approx({"pos": 1 / 3, "safe": 1 / 3, "short": 1 / 3})
    served, served_config = load_file(out / "adapter_model.safetensors"), json.loads(
        (out / "adapter_config.json").read_text())
    got = effective_deltas(served, served_config["lora_alpha"] / served_config["r"])
    deltas = [effective_deltas(s, 4 / 2) for s in kept]
    assert not torch.allclose(deltas[0][next(iter(got))], deltas[1][next(iter(got))])  # the modules differ
    for layer, delta in got.items():
        torch.testing.assert_close(delta, sum(d[layer] for d in deltas) / 3, rtol=1e-5, atol=1e-7)


def test_interleave_spreads_the_replay_evenly():
    from ofsdpo.continual import interleave as _interleave

    assert _interleave(list("abcdefgh"), [1, 2]) == list("abcd") + [1] + list("efgh") + [2]
    assert _interleave(list("abc"), [1, 2, 3, 4]) == ["a", 1, "b", 2, "c", 3, 4]
    assert _interleave(list("ab"), []) == ["a", "b"]


def test_dpo_replay_trains_on_earlier_domains_pairs_interleaved(tiny_model_dir, tmp_path, domains):
    """Stage 2's stream is its own pairs with `memory_size` training pairs of stage 1 spread through it."""
    config, report = run(tiny_model_dir, tmp_path, domains[:2], method="dpo-replay", max_steps_per_domain=-1,
                         batch_size=2)
    stage_two = json.loads((tmp_path / "dpo-replay" / "domains" / "2-safe" / "summary.json").read_text())
    own = 20 - config.heldout_size - config.memory_size  # training pairs left of the 20-row file
    assert stage_two["pairs_seen"] == own + config.memory_size
    stage_one = json.loads((tmp_path / "dpo-replay" / "domains" / "1-pos" / "summary.json").read_text())
    assert stage_one["pairs_seen"] == own


def test_continual_refuses_train_only_flags(tiny_model_dir, tmp_path, domains, capsys):
    code = main(["continual", "--domain", domains[0], "--max-steps", "3", "--model", str(tiny_model_dir),
                 "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--max-steps-per-domain" in err and "Traceback" not in err
    for flag, hint in (("--data", "--domain NAME=TRAIN"), ("--eval-data", "heldout=PATH")):
        assert main(["continual", "--domain", domains[0], flag, "x.jsonl"]) == 2
        assert hint in capsys.readouterr().err
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"domain: [{domains[0]}]\nmax_steps: 3\n")
    assert main(["continual", "--config", str(yaml_file)]) == 2
    assert "--max-steps-per-domain" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--max-steps-per-domain"):
        ContinualConfig.from_flat(domain=domains[:1], max_steps=3)


def test_fresh_init_lets_the_search_keep_an_earlier_module(tiny_model_dir, tmp_path):
    """Two opposed domains, each module started fresh: the first module is clearly better on the first domain's
    memory, so the memory loss of every domain seen is lowest with some weight on it: λ > 0. The simplex search
    (same memory; the default under --init fresh) returns weights on the simplex and does no worse than the pairwise
    recursion."""
    files = {"pos": ("great", "awful"), "neg": ("awful", "great")}
    domains = [f"{n}={write_jsonl(tmp_path / f'{n}.jsonl', domain_rows(*w, n=24))}" for n, w in files.items()]
    kw = dict(method="cofs-dpo", init="fresh", combine="delta", max_steps_per_domain=4, lr=2e-2, memory_size=8,
              lambda_grid="0,0.25,0.5,0.75,1", lora_dropout=0.0)
    _, pairwise = run(tiny_model_dir, tmp_path, domains, output_dir=str(tmp_path / "pairwise"), search="pairwise",
                      **kw)
    search = pairwise["stages"][1]["search"]
    assert pairwise["lambdas"][1] > 0, search
    assert min(r["memory_loss"] for r in search) < next(r["memory_loss"] for r in search if r["lambda"] == 0)
    # no --search: auto runs the simplex under --init fresh
    _, simplex = run(tiny_model_dir, tmp_path, domains, output_dir=str(tmp_path / "simplex"), search_budget=12, **kw)
    assert simplex["search"].startswith("simplex")
    weights = list(simplex["stages"][1]["weights"].values())
    assert sum(weights) == pytest.approx(1.0, abs=1e-12) and all(w >= 0 for w in weights)
    assert weights[0] > 0 and simplex["lambdas"][1] is None
    best = min(r["memory_loss"] for r in simplex["stages"][1]["search"])
    assert best <= min(r["memory_loss"] for r in search) + 1e-6


def test_an_on_policy_domain_samples_its_own_stage(tiny_model_dir, tmp_path, monkeypatch):
    """`NAME=prompts:PATH,judge=SPEC`: the stage's stream is sampled from the policy and judged (its rounds on
    disk), its report and memory pairs are sampled once from the base on prompts kept out of the stream."""
    (tmp_path / "lenjudge.py").write_text("def longer(prompt, response, meta):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "asks.jsonl", [{"prompt": f"Item {i}: it is"} for i in range(24)])
    pos = f"pos={write_jsonl(tmp_path / 'pos.jsonl', domain_rows('great', 'awful'))}"
    config, report = run(tiny_model_dir, tmp_path, [pos, f"asks=prompts:{prompts},judge=lenjudge:longer"],
                         method="cofs-dpo", batch_size=2, samples_per_prompt=3, max_new_tokens=5, judge_prompts=2)
    out = tmp_path / "cofs-dpo"
    assert [s["domain"] for s in report["stages"]] == ["pos", "asks"] and report["stages"][1]["steps"] == 3
    rounds = sorted((out / "domains" / "2-asks" / "rounds").glob("round-*.jsonl"))
    assert len(rounds) >= 3 and all(json.loads(line)["domain"] == "asks" for p in rounds
                                    for line in p.read_text().splitlines())
    assert report["matrix"]["judge_score"][-1][1] is not None  # judged on its held-out prompts by its own judge
    assert report["matrix"]["judge_score"][-1][0] is None  # a pairs-file domain has no judge


def test_on_policy_domain_specs_are_checked():
    from ofsdpo.config import DomainSpec

    spec = DomainSpec.parse("mine=prompts:p.jsonl,judge=mod:fn:0.5,judge=sentiment,heldout=h.jsonl")
    assert spec.prompts == "p.jsonl" and spec.judge == ["mod:fn:0.5", "sentiment"] and spec.heldout == "h.jsonl"
    with pytest.raises(ConfigError, match="needs judge=SPEC"):
        DomainSpec.parse("mine=prompts:p.jsonl")
    with pytest.raises(ConfigError, match="give prompts:PATH"):
        DomainSpec.parse("mine=pairs.jsonl,judge=sentiment")
    assert DomainSpec.parse("s=prompts:builtin:sentiment").judge == []  # a built-in's own judge


def test_scoring_borrows_the_stage_adapters_with_the_same_results(tiny_model_dir, tmp_path, domains, monkeypatch):
    """The served module and the λ search's candidates are scored in the stage's own trained adapters when the
    shapes fit (no new LoRA layers injected per stage): the report equals that of a run that injects them."""
    import ofsdpo.continual.slots as slots

    added = []
    original_add = slots._load_slot

    def counting(model, name, lora, state):
        added.append(name)
        return original_add(model, name, lora, state)

    monkeypatch.setattr(slots, "_load_slot", counting)
    _, borrowed = run(tiny_model_dir, tmp_path / "a", domains, method="cofs-dpo", combine="params")
    assert added == []
    monkeypatch.setattr(slots, "_fits", lambda held, lora: False)
    _, injected = run(tiny_model_dir, tmp_path / "b", domains, method="cofs-dpo", combine="params")
    assert set(added) == {"served", "candidate"}
    assert borrowed["matrix"] == injected["matrix"] and borrowed["lambdas"] == injected["lambdas"]


def test_runners_over_the_same_pairs_share_the_reference(tiny_model_dir, tmp_path, domains):
    """The demo's methods run over the same base and files: with one `reference_caches` dict, π_ref scores each
    pair once (the second runner computes none) and the second report equals a run with its own caches."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    caches = {}

    def runner(method, folder, shared):
        config = ContinualConfig.from_flat(
            model=str(tiny_model_dir), domain=domains, output_dir=str(tmp_path / folder), batch_size=4, lr=5e-3,
            lora_r=2, lora_alpha=4, max_length=48, max_prompt_length=24, memory_size=4, heldout_size=4,
            max_steps_per_domain=3, save_steps=0, progress=False, lambda_grid="0,0.5,1", regret=False, seed=0,
            method=method)
        return ContinualRunner(config, model=base, reference_caches=shared)

    runner("dpo", "first", caches).run()
    assert len(caches) == 3 and all(c["train_reference"].computed_pairs > 0 for c in caches.values())
    computed = {key: {part: c.computed_pairs for part, c in parts.items()} for key, parts in caches.items()}
    shared = runner("ofs-dpo", "shared", caches).run()
    assert {key: {part: c.computed_pairs for part, c in parts.items()} for key, parts in caches.items()} == computed
    alone = runner("ofs-dpo", "alone", None).run()
    for key in ("loss", "accuracy"):
        assert torch.allclose(torch.tensor(shared["matrix"][key]), torch.tensor(alone["matrix"][key]), atol=1e-5)


def test_later_stages_reset_the_first_stages_lora_layers(tiny_model_dir, tmp_path, domains, monkeypatch):
    """Each stage's trainer builds a new LoraConfig (which peft would fill in); the LoRA layers are still injected
    once per run and reset at every later stage (`modules.attach_adapters`), not injected again."""
    import ofsdpo.modules as modules

    calls = []
    real = modules.get_peft_model
    monkeypatch.setattr(modules, "get_peft_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, report = run(tiny_model_dir, tmp_path, domains, method="ofs-dpo")
    assert len(report["matrix"]["loss"]) == 3 and len(calls) == 1


def test_headline_units_average_to_the_reported_numbers(tiny_model_dir, tmp_path, length_judged):
    """The per-unit values a bootstrap resamples have, as plain means, exactly the report's headline numbers; a
    stage saved before units were kept leaves the report without them (no bootstrap) rather than misaligned."""
    files = {"sentiment": ("great", "awful"), "critic": ("awful", "great"), "short": ("yes", "well, it depends")}
    domains = [f"{n}={write_jsonl(tmp_path / f'{n}.jsonl', domain_rows(*w))}" for n, w in files.items()]
    kw = dict(method="cofs-dpo", judge_prompts=3, judge_samples=2, max_steps_per_domain=2, score_domains="seen",
              output_dir=str(tmp_path / "run"))
    _, report = run(tiny_model_dir, tmp_path, domains, **kw)
    units = report["units"]
    assert set(units) == {"cl/avg_loss", "cl/avg_accuracy", "cl/bwt", "cl/avg_judge_score", "cl/avg_forgetting_judge"}
    forgetting = report["cl/forgetting_judge"]  # the judged domains before the last: sentiment and critic
    expected = {"cl/avg_loss": report["cl/avg_loss"], "cl/avg_accuracy": report["cl/avg_accuracy"],
                "cl/bwt": report["cl/bwt"], "cl/avg_judge_score": report["cl/avg_judge_score"],
                "cl/avg_forgetting_judge": sum(forgetting.values()) / len(forgetting)}
    assert set(forgetting) == {"sentiment", "critic"} and len(units["cl/avg_judge_score"]) == 2 * 3
    for key, values in units.items():
        assert sum(values) / len(values) == pytest.approx(expected[key], abs=1e-6), key
    stage = tmp_path / "run" / "domains" / "1-sentiment" / "stage" / "stage.json"
    record = json.loads(stage.read_text())
    del record["rows"]["units"]
    stage.write_text(json.dumps(record))
    _, resumed = run(tiny_model_dir, tmp_path, domains, resume=True, **kw)
    assert resumed["units"] == {} and resumed["cl/avg_loss"] == pytest.approx(report["cl/avg_loss"])


def test_headline_units_hold_the_peak_stage_and_weigh_domains_equally():
    """Domains with different unit counts weigh as in the report (a mean over domains); forgetting's units are the
    differences from the stage where each domain's judge score peaked (stage 2 for the first domain here)."""
    from ofsdpo.continual import headline_units

    judge = [[0.2, None, None], [0.5, 0.1, None], [0.3, 0.4, 0.6]]
    per_prompt = [[[0.0, 0.4], None, None], [[0.5, 0.5], [0.0, 0.1, 0.2], None],
                  [[0.2, 0.4], [0.4, 0.4, 0.4], [0.6]]]
    correct = [[[1, 0, 0, 0], None, None], [[1, 1, 0, 0], [1, 0], None], [[0, 0, 0, 1], [1, 1], [1, 0, 1]]]
    units = [[None if c is None else {"loss": [0.7] * len(c), "correct": c, "judge_score": p}
              for c, p in zip(c_row, p_row)] for c_row, p_row in zip(correct, per_prompt)]
    out = headline_units(judge, units)
    mean = {key: sum(v) / len(v) for key, v in out.items()}
    assert mean["cl/avg_judge_score"] == pytest.approx((0.3 + 0.4 + 0.6) / 3)
    assert mean["cl/avg_forgetting_judge"] == pytest.approx(((0.5 - 0.3) + (0.1 - 0.4)) / 2)
    assert mean["cl/avg_accuracy"] == pytest.approx((0.25 + 1.0 + 2 / 3) / 3)
    assert mean["cl/bwt"] == pytest.approx(((0.25 - 0.25) + (1.0 - 0.5)) / 2)
    assert mean["cl/avg_loss"] == pytest.approx(0.7)
    assert headline_units(judge, units[:2] + [None]) == {}  # a stage without units: none at all


# --- --select-by (issue 28) ------------------------------------------------------------------------------------------
def _hand_made_modules():
    """Two hand-made modules of one layer: module 0's A all ones, module 1's zero, so the `params` combination with
    weight w on module 0 has mean(A) = w: the stub below reads the candidate's weight back from its state."""
    ones, zeros = torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    b = torch.ones(4, 2, dtype=torch.float64)
    return [{"x.lora_A.weight": ones, "x.lora_B.weight": b}, {"x.lora_A.weight": zeros, "x.lora_B.weight": b}]


def _choose(runner, monkeypatch, values):
    """COFSDPO.choose_weights at stage 2 over the hand-made modules, every evaluation answered by `values(set name,
    w)` (w: the candidate's weight on domain a's module) -> its row."""
    from peft import LoraConfig

    from ofsdpo.continual.policies import COFSDPO

    def evaluate(model, lora, state, sets, slot, **kw):
        w = state["x.lora_A.weight"].mean().item()
        return [values(s.name, w) for s in sets]

    monkeypatch.setattr(runner, "_evaluate", evaluate)
    return COFSDPO.choose_weights(runner, None, LoraConfig(r=2), _hand_made_modules(), [1.0], 1)


def _chosen_row(table, weights):
    return next(r for r in table if r.get("weights", [r.get("lambda")])[0] == weights[0])


@pytest.mark.parametrize("init", ["previous", "fresh"])
@pytest.mark.parametrize("search", ["pairwise", "simplex"])
def test_balanced_and_worst_ignore_a_domain_whose_losses_are_10x(tiny_model_dir, tmp_path, domains, monkeypatch,
                                                                   init, search):
    """Domain a's losses are 10 (1 + 2(1 − w)²), b's 1 + 2w² (w: weight on a's own module; own losses 10 and 1).
    Pooled, a dominates: 10 + 20(1 − w)² + 1 + 2w² is least at w = 40/44 (grid: w = 1). Relative to their own
    modules both are 1 + 2(·)², symmetric: balanced and worst are least at w = 1/2. Each criterion's choice is the
    argmin of its table's "criterion" (under loss: "memory_loss", its rows those of before the option)."""
    def values(name, w):
        loss = 10 * (1 + 2 * (1 - w) ** 2) if name == "pos" else 1 + 2 * w ** 2
        return {"loss": loss, "accuracy": 0.5}

    chosen = {}
    for select_by in ("loss", "balanced", "worst"):
        config = ContinualConfig.from_flat(model=str(tiny_model_dir), domain=domains[:2], init=init, search=search,
                                           select_by=select_by, lambda_grid="0,0.5,1", memory_size=4, heldout_size=4,
                                           search_budget=12, output_dir=str(tmp_path / select_by), progress=False)
        weights, lam, table = _choose(ContinualRunner(config), monkeypatch, values)
        criterion = [r.get("criterion", r["memory_loss"]) for r in table]  # loss: the rows of before
        assert _chosen_row(table, weights).get("criterion", _chosen_row(table, weights)["memory_loss"]) == min(
            criterion), table
        chosen[select_by] = weights[0]
        if select_by != "loss":
            assert all(set(r["domains"]) == {"pos", "safe"} for r in table)
            row = _chosen_row(table, weights)["domains"]
            assert row["pos"]["relative"] == pytest.approx(row["pos"]["loss"] / 10, rel=1e-12)
        else:
            assert all(set(r) <= {"lambda", "weights", "memory_loss", "memory_accuracy", "phase"} for r in table)
    assert chosen["loss"] > 0.85 and chosen["balanced"] == pytest.approx(0.5, abs=0.05)
    assert chosen["worst"] == pytest.approx(0.5, abs=0.05)
    if search == "pairwise":
        assert chosen == {"loss": 1.0, "balanced": 0.5, "worst": 0.5}


@pytest.mark.parametrize("search", ["pairwise", "simplex"])
def test_select_by_judge_picks_the_candidate_whose_samples_the_judge_prefers(tiny_model_dir, tmp_path,
                                                                              monkeypatch, search, length_judged):
    """Module a's samples hold the token 'yes' (its count 4w, w its weight), b's the token 'no' (4(1 − w)); the judge
    of sentiment counts 'yes' and critic's counts 'no' with twice the weight: the judge's mean over domains
    (4w + 8(1 − w))/2 is highest at w = 0, whatever the memory losses say (they favour w = 1)."""
    files = {"sentiment": ("great", "awful"), "critic": ("awful", "great")}
    specs = [f"{n}={write_jsonl(tmp_path / f'{n}.jsonl', domain_rows(*w))}" for n, w in files.items()]

    def values(name, w):
        samples = ["yes"] * round(4 * w) + ["no"] * round(4 * (1 - w))
        judge = samples.count("yes") if name == "sentiment" else 2 * samples.count("no")
        return {"loss": 2 - w, "accuracy": 0.5, "judge_score": float(judge)}

    config = ContinualConfig.from_flat(model=str(tiny_model_dir), domain=specs, search=search, select_by="judge",
                                       lambda_grid="0,0.5,1", memory_size=4, heldout_size=4, search_budget=12,
                                       output_dir=str(tmp_path / "judge"), progress=False)
    weights, _, table = _choose(ContinualRunner(config), monkeypatch, values)
    assert weights[0] == 0.0 and _chosen_row(table, weights)["criterion"] == min(r["criterion"] for r in table)
    assert min(table, key=lambda r: r["memory_loss"]) is not _chosen_row(table, weights)
    assert all(r["criterion"] == -(r["domains"]["sentiment"]["judge"] + r["domains"]["critic"]["judge"]) / 2
               for r in table)


def test_select_by_judge_end_to_end_samples_training_prompts(tiny_model_dir, tmp_path, length_judged):
    """A real run: every candidate's samples judged on the last --select-judge-prompts training prompts (never the
    held-out ones the report judges), the chosen λ the argmin of the table, the report saying so."""
    files = {"sentiment": ("great", "awful"), "critic": ("awful", "great")}
    specs = [f"{n}={write_jsonl(tmp_path / f'{n}.jsonl', domain_rows(*w))}" for n, w in files.items()]
    config, report = run(tiny_model_dir, tmp_path, specs, method="cofs-dpo", select_by="judge",
                         select_judge_prompts=2, max_steps_per_domain=1, judge_prompts=2)
    table = report["stages"][1]["search"]
    chosen = next(r for r in table if r["lambda"] == report["lambdas"][1])
    assert chosen["criterion"] == min(r["criterion"] for r in table)
    assert all(isinstance(r["domains"][n]["judge"], float) for r in table for n in files)
    assert "selected by judge" in report["search"] and "2 training prompts" in report["search"]
    runner = ContinualRunner(config.__class__.from_flat(**{**config.to_dict(), "overwrite": True}))
    for d in runner.domains:
        judged, records = runner._selection_task(d)
        assert len(records) == 2 and all(r["split"] == "train" for r in records)


def test_select_by_is_checked_before_anything_trains(tiny_model_dir, tmp_path, domains):
    with pytest.raises(ConfigError, match="--select-by judge needs a judge for every domain; pos has none"):
        run(tiny_model_dir, tmp_path, domains, select_by="judge")
    with pytest.raises(ConfigError, match="--select-by chooses cofs-dpo"):
        ContinualConfig.from_flat(domain=domains, method="dpo", select_by="worst")
    with pytest.raises(ConfigError, match="--select-judge-prompts applies to --select-by judge"):
        ContinualConfig.from_flat(domain=domains, select_judge_prompts=3)


def test_round_robin_takes_pair_i_of_each_stream_in_turn():
    from ofsdpo.continual.policies import round_robin
    assert round_robin([list("abc"), [1, 2], ["x"]]) == ["a", 1, "x", "b", 2, "c"]
    assert round_robin([[], [1]]) == [1] and round_robin([]) == []


@pytest.mark.parametrize("steps", [-1, 2])
def test_multitask_stage_trains_every_domain_seen_once_each_interleaved(tiny_model_dir, tmp_path, domains,
                                                                          monkeypatch, steps):
    """A `multitask` stage k's stream holds the training pairs of domains 1..k+1, each exactly once, in
    round-robin order (pair i of each domain in turn); with --max-steps-per-domain each domain gives the pairs
    its own stage would train on, and the stage trains the whole union."""
    streams, own_streams = [], []
    original = ContinualRunner._stage_trainer

    def key(pair: dict) -> tuple:  # a pair by its tokens: the chosen completion tells the domains apart
        return tuple(pair["prompt_ids"]), tuple(pair["chosen_ids"])

    def recording(self, k, domain, base):
        trainer = original(self, k, domain, base)
        streams.append([key(p) for p in trainer.stream.data.pairs])
        own_streams.append([key(p) for p in domain.train.pairs])
        return trainer

    monkeypatch.setattr(ContinualRunner, "_stage_trainer", recording)
    config, report = run(tiny_model_dir, tmp_path, domains, method="multitask", batch_size=2,
                         max_steps_per_domain=steps)
    own = 20 - config.heldout_size - config.memory_size  # training pairs left of each 20-row file
    share = own if steps == -1 else steps * 2  # the pairs one domain's stage trains on
    assert len({p for s in own_streams for p in s}) == 3 * own  # three domains, no pair shared
    for k, stream in enumerate(streams):
        expected = [own_streams[d][i] for i in range(share) for d in range(k + 1)]
        if k == 0:  # a fresh dpo stage on the first domain's own stream, its steps cut to the share (below)
            expected = own_streams[0]
        assert stream == expected  # every domain seen, pair i of each in turn, each once
    assert [s["steps"] for s in report["stages"]] == [(k + 1) * share // 2 for k in range(3)]
    assert report["method"] == "multitask" and report["stages"][-1]["lambda"] is None


def test_multitask_refuses_an_on_policy_domain(tiny_model_dir, tmp_path, domains):
    prompts = write_jsonl(tmp_path / "asks.jsonl", [{"prompt": f"Item {i}: it is"} for i in range(24)])
    with pytest.raises(ConfigError, match="multitask"):
        run(tiny_model_dir, tmp_path, [domains[0], f"asks=prompts:{prompts},judge=builtin:sentiment"],
            method="multitask")


def test_overwrite_removes_everything_the_previous_continual_run_wrote(tiny_model_dir, tmp_path, domains):
    """A finished continual run (stages, report, heatmap, served adapter, tokenizer), a stale checkpoint write and a
    train run's fast/ left in the folder: --overwrite leaves nothing of them but a file of the user's; without it,
    the folder is refused."""
    from ofsdpo.continual.persistence import prepare_output
    from ofsdpo.distributed import Processes

    config, _ = run(tiny_model_dir, tmp_path, domains[:2], method="dpo", max_steps_per_domain=1)
    out = Path(config.output_dir)
    written = {p.name for p in out.iterdir()}
    assert {"domains", "report.json", "report.txt", "heatmap.png", "adapter_model.safetensors"} <= written
    (out / ".tmp-checkpoint-3").mkdir()
    (out / "fast").mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds another run"):
        ContinualRunner(config)
    prepare_output(dataclasses.replace(config, overwrite=True), out, Processes("cpu"))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".ofsdpo.lock")) == ["config.yaml",
                                                                                                "notes.txt"]


def test_max_completion_length_cuts_every_domains_pairs_with_caches_of_their_own(tiny_model_dir, tmp_path, domains):
    """`ofsdpo continual --max-completion-length N` (TRL's name, as `ofsdpo train` has it): every domain's stream,
    report and memory pairs keep their first N completion tokens, and runners sharing `reference_caches` score the
    cut pairs in caches of their own, never the uncut pairs' (a stage takes its pairs and caches as they are)."""
    from transformers import AutoModelForCausalLM

    base, caches = AutoModelForCausalLM.from_pretrained(tiny_model_dir), {}

    def runner(folder, **kw):
        config = ContinualConfig.from_flat(
            model=str(tiny_model_dir), domain=domains, output_dir=str(tmp_path / folder), batch_size=4, lr=5e-3,
            lora_r=2, lora_alpha=4, max_length=48, max_prompt_length=24, memory_size=4, heldout_size=4,
            max_steps_per_domain=2, save_steps=0, progress=False, regret=False, seed=0, method="dpo", **kw)
        return ContinualRunner(config, model=base, reference_caches=caches)

    full, cut = runner("full"), runner("cut", max_completion_length=2)
    assert len(caches) == 2 * len(domains)  # each domain's pairs, uncut and cut
    longer = 0
    for whole, short in zip(full.domains, cut.domains):
        for part in ("train", "test", "memory"):
            pairs, cut_pairs = getattr(whole, part).pairs, getattr(short, part).pairs
            assert len(cut_pairs) == len(pairs)  # cut, never dropped
            for p, q in zip(pairs, cut_pairs):
                assert q["prompt_ids"] == p["prompt_ids"]
                assert (q["chosen_ids"], q["rejected_ids"]) == (p["chosen_ids"][:2], p["rejected_ids"][:2])
                longer += max(len(p["chosen_ids"]), len(p["rejected_ids"])) > 2
    assert longer > 0  # the limit cut something
    full_report, cut_report = full.run(), cut.run()
    assert cut_report["matrix"]["loss"] != full_report["matrix"]["loss"]
    stage_config = (tmp_path / "cut" / "domains" / "1-pos" / "config.yaml").read_text()
    assert "max_completion_length: 2" in stage_config  # each stage's config says how its pairs were cut
