"""Sampling, judging into pairs, and judge-based evaluation on the tiny model (its text is noise; the plumbing is
what is tested). Fast sampling (issue 14): the merged adapter samples what the unmerged one does and leaves the base
as it was, our decoding matches transformers' greedy `generate`, EOS ends rows, training after sampling is unchanged."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import length_judge
from ofsdpo.cli import main
from ofsdpo.data import load_preference_data
from ofsdpo.domains import BuiltinDomain, get_domain
from ofsdpo.rounds import RoundSettings, judged_pairs
from ofsdpo.generation import merged, sample_groups, sample_token_ids
from ofsdpo.modules import (DPO_ADAPTERS, OFS_ADAPTERS, activate, adapter_parameters, attach_adapters, can_stack,
                            lora_config)
from ofsdpo.scoring import common_random_numbers, judge_eval, judge_evals, reference_sample_groups
from sampling import sample_details


def test_sampling_returns_k_responses_per_prompt(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = ["Hello there", "A much longer prompt than the first"]
    kwargs = dict(chat=False, num_samples=3, max_new_tokens=5, batch_size=6)
    out = seeded(sample_details, model, tokenizer, prompts, **kwargs)
    assert len(out) == 2 and all(len(r) == 3 for r in out)
    # the same seed draws the same samples; another seed, others
    assert seeded(sample_details, model, tokenizer, prompts, **kwargs) == out
    assert seeded(sample_details, model, tokenizer, prompts, seed=1, **kwargs) != out


def test_pairs_take_best_and_worst_and_load_as_training_data(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    domain = BuiltinDomain("toy", length_judge, chat=True, max_new_tokens=6, description="longer is better")
    records = [{"prompt": f"Question {i}?", "meta": {}} for i in range(4)]
    torch.manual_seed(0)
    pairs, stats = judged_pairs(model, tokenizer, domain, records, RoundSettings(samples_per_prompt=3, batch_size=12))
    ties = stats.ties
    assert len(pairs) + ties == 4
    for pair in pairs:
        assert pair["score_chosen"] > pair["score_rejected"]
        assert len(pair["chosen"][0]["content"]) == pair["score_chosen"]
    data = load_preference_data(pairs, tokenizer, 64, 32)
    assert len(data) == len(pairs)


def test_judge_eval_reports_score_win_rate_and_kl(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(2, 4, 0.0, "all-linear"),
                            DPO_ADAPTERS)
    records = get_domain("sentiment").prompts("heldout")[:3]
    result = judge_eval(model, tokenizer, get_domain("sentiment"), records, adapter="default", batch_size=3)
    assert set(result) == {"judge_score", "reference_judge_score", "win_rate", "kl", "response_words", "judged_samples",
                           "per_prompt", "independent_judge_score"}  # sentiment: AFINN beside VADER
    assert result["judged_samples"] == len(records) and len(result["per_prompt"]["kl"]) == len(records)
    assert result["kl"] == 0.0  # B = 0: the policy is the reference, and the exact KL is 0 exactly
    assert len(result["per_prompt"]["independent_judge_score"]) == len(records)
    per_prompt = result["per_prompt"]  # the means are those of the per-prompt values (the bootstrap's units)
    assert sum(per_prompt["win_rate"]) / 3 == pytest.approx(result["win_rate"])
    assert sum(per_prompt["judge_score"]) / 3 == pytest.approx(result["judge_score"])


def test_several_domains_are_judged_in_one_call_with_common_random_numbers(tiny_model_dir, tokenizer,
                                                                           length_judged):
    """Two domains (one chat, one plain text; different token limits) sampled together under seed 3: a module
    equal to the base draws each domain's reference samples exactly (win rate 0.5, equal scores, KL 0), rows stop
    at their own domain's limit, and one domain alone through `judge_eval` reports what `judge_evals` does for it
    when drawn alone."""
    from dataclasses import replace

    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(2, 4, 0.0, "all-linear"),
                            DPO_ADAPTERS)  # B = 0: the base exactly
    chat, plain = get_domain("concise"), replace(get_domain("sentiment"), max_new_tokens=3)
    assert chat.chat and not plain.chat
    tasks = [(chat, chat.prompts("heldout")[:3]), (plain, plain.prompts("heldout")[:2])]
    with common_random_numbers(3, torch.device("cpu")):
        refs = reference_sample_groups(model, tokenizer, tasks, samples_per_prompt=2)
    with common_random_numbers(3, torch.device("cpu")):
        judged = judge_evals(model, tokenizer, tasks, "default", ref_scores=refs, samples_per_prompt=2)
    assert [j["judged_samples"] for j in judged] == [len(r) for r in refs] == [6, 4]
    for result in judged:
        assert result["win_rate"] == 0.5 and result["judge_score"] == result["reference_judge_score"]
        assert abs(result["kl"]) < 1e-5
    with common_random_numbers(3, torch.device("cpu")):
        alone = judge_evals(model, tokenizer, tasks[1:], "default", samples_per_prompt=2)[0]
    with common_random_numbers(3, torch.device("cpu")):
        single = judge_eval(model, tokenizer, plain, tasks[1][1], "default", samples_per_prompt=2)
    assert alone == single


def test_rows_stop_at_their_own_limit(tiny_model_dir, tokenizer):
    """Per-prompt limits: each row is the row sampled with the longest limit for all, cut at its own limit (a row's
    draws do not depend on when other rows stop); `sample_groups` gives each group its own limit and chat."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = [tokenizer(p)["input_ids"] for p in ("Hello there", "Hi", "A longer prompt than both")]
    kwargs = dict(eos_token_ids=(), pad_token_id=tokenizer.pad_token_id)  # no EOS: rows run to their limits
    uniform = seeded(sample_token_ids, model, ids, 2, 6, **kwargs)
    limited = seeded(sample_token_ids, model, ids, 2, [2, 6, 4], **kwargs)
    for limit, want, got in zip([2, 6, 4], uniform, limited):
        assert [tokens for tokens, _ in got] == [tokens[:limit] for tokens, _ in want]
    with pytest.raises(ValueError, match="one per prompt"):
        sample_token_ids(model, ids, 1, [2, 3])
    groups = seeded(sample_groups, model, tokenizer, [(PROMPTS[:2], True, 3), (["Plain text"], False, 5)], 2)
    assert [len(g) for g in groups] == [2, 1] and groups[0].seconds == groups[1].seconds > 0
    assert all(s.num_tokens <= 3 for g in groups[0] for s in g) and all(s.num_tokens <= 5 for s in groups[1][0])


def test_generate_command_writes_judged_pairs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    code = main(["generate", "--domain", "sentiment", "--model", str(tiny_model_dir), "--num-prompts", "3",
                 "--samples-per-prompt", "2", "--out", str(out), "--no-progress", "--seed", "1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["pairs"] == len(rows) and summary["pairs"] + summary["ties_skipped"] == 3
    assert all(r["domain"] == "sentiment" and r["score_chosen"] > r["score_rejected"] for r in rows)


def test_generate_rejects_an_unknown_domain(capsys):
    assert main(["generate", "--domain", "nope"]) == 2
    assert "built-in domains are" in capsys.readouterr().err


# --- fast sampling (issue 14): merged LoRA, shared prefill, our decoding ----------------------------------------------
PROMPTS = ["Hello there", "A much longer prompt than the first one", [{"role": "user", "content": "Hi"},
                                                                     {"role": "assistant", "content": "Hello"},
                                                                     {"role": "user", "content": "And now?"}]]


def ofs_model(tiny_model_dir, dtype=torch.float32, seed=1):
    """fast and slow LoRA modules on the tiny model, every B drawn at random (non-zero) and different per module."""
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype),
                            lora_config(4, 8, 0.0, "all-linear"), OFS_ADAPTERS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    activate(model, "fast")
    return model


def seeded(fn, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def test_merged_sampling_draws_the_unmerged_samples(tiny_model_dir, tokenizer):
    """Same seed: the merged adapter samples what peft's unmerged layers sample, token for token; the slow module
    and the base sample something else (the adapters matter, so the test could fail)."""
    model = ofs_model(tiny_model_dir)
    kwargs = dict(chat=True, num_samples=3, max_new_tokens=10, batch_size=4)
    fused = seeded(sample_details, model, tokenizer, PROMPTS, merge=True, **kwargs)
    plain = seeded(sample_details, model, tokenizer, PROMPTS, merge=False, **kwargs)
    assert fused == plain and len(fused) == 3 and all(len(g) == 3 for g in fused)
    reference = seeded(sample_details, model, tokenizer, PROMPTS, reference=True, **kwargs)
    assert fused != reference
    with model.disable_adapter():  # adapters switched off by the caller (ofsdpo eval): nothing is merged
        assert seeded(sample_details, model, tokenizer, PROMPTS, **kwargs) == reference
    activate(model, "slow")
    assert fused != seeded(sample_details, model, tokenizer, PROMPTS, **kwargs)


def test_merging_restores_the_base_and_leaves_the_adapters(tiny_model_dir):
    """Inside `merged` the active module is in the base weights (and only it: the slow module stays unmerged) and
    forwards give the unmerged logits; afterwards every base weight is bit for bit what it was, the adapters too,
    and no LoRA layer is left merged."""
    model = ofs_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    want = model(input_ids=ids).logits
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    with merged(model):
        assert all(m.merged_adapters == ["fast"] for m in layers)
        moved = [n for n, p in model.named_parameters() if "base_layer" in n and not torch.equal(p, before[n])]
        assert len(moved) == len(layers)  # every adapted weight holds B A * scale of the fast module
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert not any(m.merged for m in layers)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # exact: the original tensors are put back


def test_a_dora_module_merges_through_peft_and_comes_back(tiny_model_dir, tokenizer):
    """A LoRA variant (DoRA) goes through peft's own (safe) merge: the same samples as unmerged, the base and the
    module unchanged afterwards."""
    from peft import LoraConfig

    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                       task_type="CAUSAL_LM"), DPO_ADAPTERS)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = dict(chat=True, num_samples=2, max_new_tokens=6)
    fused = seeded(sample_details, model, tokenizer, PROMPTS, **kwargs)
    assert fused == seeded(sample_details, model, tokenizer, PROMPTS, merge=False, **kwargs)
    assert fused != seeded(sample_details, model, tokenizer, PROMPTS, reference=True, **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_merging_is_undone_when_sampling_fails(tiny_model_dir, tokenizer):
    model = ofs_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    handle = model.get_base_model().lm_head.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        sample_details(model, tokenizer, PROMPTS, chat=True, num_samples=2, max_new_tokens=3)
    handle.remove()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_a_module_equal_to_the_base_samples_the_reference(tiny_model_dir, tokenizer):
    """B = 0 (a fresh module): merged sampling under the same seed gives exactly the reference's samples (adapters
    disabled), and a plain transformers model (no adapters) samples them too."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(4, 8, 0.0, "all-linear"),
                            DPO_ADAPTERS)
    kwargs = dict(chat=False, num_samples=4, max_new_tokens=8, batch_size=5)
    policy = seeded(sample_details, model, tokenizer, PROMPTS, **kwargs)
    assert policy == seeded(sample_details, model, tokenizer, PROMPTS, reference=True, **kwargs)
    assert policy == seeded(sample_details, base, tokenizer, PROMPTS, **kwargs)
    assert policy != seeded(sample_details, base, tokenizer, PROMPTS, seed=1, **kwargs)


def test_decoding_matches_greedy_generate(tiny_model_dir, tokenizer):
    """top_k=1 makes sampling greedy: then our decoding (shared chat-template prefix with padding in the middle,
    one prefill per prompt, rows leaving at EOS) gives transformers' greedy `generate` tokens, row for row."""
    from ofsdpo.generation import _encode

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids, _ = _encode(tokenizer, PROMPTS, chat=True)
    assert ids[0][:5] == ids[1][:5]  # the template's system turn: a shared prefix
    width = max(len(r) for r in ids)
    rows = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    greedy = model.generate(input_ids=rows, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            pad_token_id=tokenizer.pad_token_id)[:, width:].tolist()
    ours = sample_token_ids(model, ids, num_samples=2, max_new_tokens=12, top_k=1,
                            eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    for want, group in zip(greedy, ours):
        for tokens, finished in group:
            assert tokens == want[:len(tokens)] and len(tokens) == (want.index(tokenizer.eos_token_id) + 1
                                                                    if finished else 12)


def test_rows_stop_at_eos_and_count_their_tokens(tiny_model_dir, tokenizer):
    """EOS forced where the input token sits at position 6 (and forbidden elsewhere): a prompt of n tokens ends
    after 8 - n new tokens, EOS included; a prompt longer than 7 tokens never reaches position 6 and runs to
    max_new_tokens unfinished. Rows leave the batch at different steps."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    prompts = ["Hi", "Hello there my", "A much longer prompt than the first one, by far"]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert lengths[0] < lengths[1] <= 7 < lengths[2]
    seen = {}

    def remember(module, args, kwargs):
        seen["positions"] = kwargs["position_ids"][:, -1]

    def force(module, args, logits):
        bias = torch.full_like(logits[:, -1, eos], -1e9)
        bias[seen["positions"] == 6] = 1e9
        logits[:, -1, eos] = bias
        return logits

    hooks = [model.register_forward_pre_hook(remember, with_kwargs=True),
             model.lm_head.register_forward_hook(force)]
    try:
        out = seeded(sample_details, model, tokenizer, prompts, chat=False, num_samples=2, max_new_tokens=10)
        raw = seeded(sample_token_ids, model, [tokenizer(p)["input_ids"] for p in prompts], 2, 10,
                     eos_token_ids=(eos,), pad_token_id=tokenizer.pad_token_id)
    finally:
        for h in hooks:
            h.remove()
    for n, group, raw_group in zip(lengths, out, raw):
        for s, (tokens, finished) in zip(group, raw_group):
            want = 8 - n if n <= 7 else 10
            assert (s.num_tokens, s.finished) == (want, n <= 7) == (len(tokens), finished)
            assert (tokens[-1] == eos) == finished and eos not in tokens[:-1]
            assert s.text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_min_new_tokens_holds_eos_back(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id

    def eos_first(module, args, logits):
        logits[:, -1, eos] = 1e9
        return logits

    handle = model.lm_head.register_forward_hook(eos_first)
    try:
        out = sample_details(model, tokenizer, ["Hello"], chat=False, num_samples=2, max_new_tokens=6,
                             min_new_tokens=3)
        assert out.seconds > 0
    finally:
        handle.remove()
    assert [(s.num_tokens, s.finished) for s in out[0]] == [(4, True), (4, True)]


def test_rows_per_call_do_not_change_the_samples_count(tiny_model_dir, tokenizer):
    """`batch_size` counts rows per decoding call (at least one prompt's samples)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for rows in (1, 3, 64):
        out = sample_details(model, tokenizer, PROMPTS, chat=True, num_samples=2, max_new_tokens=3, batch_size=rows)
        assert [len(g) for g in out] == [2, 2, 2] and all(1 <= s.num_tokens <= 3 for g in out for s in g)


def test_training_after_merged_sampling_is_unchanged(make_config, tiny_model_dir, tokenizer, tmp_path):
    """float64 OFS-DPO: the losses and both modules' gradients of a step are bit for bit the same before and after
    sampling from the merged fast module; the fused two-module forward (`stacked`) is still available."""
    from ofsdpo import OFSDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    trainer = OFSDPOTrainer(model, make_config(method="ofs-dpo", lora_dropout=0.0, output_dir=str(tmp_path / "o")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in OFS_ADAPTERS:
            for p in adapter_parameters(trainer.model, name):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)

    def step():
        indices = list(range(4))
        trainer.reference.fill(trainer.model, trainer.data.pairs, indices, tokenizer.pad_token_id, 8, 1024)
        sums = trainer.step_fn._accumulate(trainer.data, trainer.reference, indices, trainer.state.chase)
        grads = [p.grad.clone() for name in OFS_ADAPTERS for p in adapter_parameters(trainer.model, name)]
        trainer.optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in sums.items()}, grads

    sums, grads = step()
    activate(trainer.model, "fast")
    was_training = trainer.model.training
    sample_details(trainer.model, tokenizer, PROMPTS, chat=True, num_samples=2, max_new_tokens=4)
    assert trainer.model.training == was_training and can_stack(trainer.model, OFS_ADAPTERS)
    again, grads_again = step()
    assert all(torch.equal(sums[k], again[k]) for k in sums)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again, strict=True))


def test_candidates_keep_what_transformers_warpers_keep():
    """Temperature, top-k and top-p over the k best tokens give the distribution of transformers' warpers over the
    whole vocabulary (softmax of the warped logits)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from ofsdpo.generation import _candidates, _Settings

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [(1.0, 50, 0.95), (0.7, 20, 0.5), (1.3, 0, 0.9), (1.0, 5, 1.0)]:
        settings = _Settings(temperature, top_k, top_p, 1, 0, (), 0)
        probs, tokens = _candidates(logits, settings)
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        want = TopPLogitsWarper(top_p)(None, warped).softmax(-1)
        got = torch.zeros_like(want).scatter(-1, tokens, probs / probs.sum(-1, keepdim=True))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_draws_follow_the_probabilities():
    """Exp(1) noise and argmax draw each candidate with its (unnormalised) probability; zero never."""
    from ofsdpo.generation import _draw

    n = 200_000
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]]).expand(n, 5) * 2  # scale does not matter
    candidates = torch.tensor([[10, 11, 12, 13, 14]]).expand(n, 5)
    noise = torch.empty(n, 5).exponential_(generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(_draw(probs, candidates, noise) - 10, minlength=5) / n
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0]), rtol=0, atol=5e-3)

