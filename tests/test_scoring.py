"""The served-module choice and the online-regret curve (SPEC §3, §5), on hand-made numbers."""

import math

import pytest
import torch

from ofsdpo.scoring import regret_curve, select_served

NAMES = ("fast", "slow")


def rounds(*losses):
    return [{"round": i + 1, "position": 2 * i, "fast": f, "slow": s} for i, (f, s) in enumerate(losses)]


def test_served_module_by_the_latest_online_rounds():
    history = rounds((0.2, 0.9), (0.7, 0.6))
    assert select_served(NAMES, None, history, 1, "fast")[:2] == ("slow", "online loss of the last 1 rounds")
    served, basis, scores = select_served(NAMES, None, history, 2, "fast")  # means: fast 0.45, slow 0.75
    assert served == "fast" and scores == pytest.approx({"fast": 0.45, "slow": 0.75})


def test_rounds_with_a_nan_loss_do_not_rank_the_modules():
    history = rounds((0.7, 0.6), (math.nan, 0.1))
    assert select_served(NAMES, None, history, 1, "fast")[0] == "slow"  # the NaN round is skipped, not the last
    assert select_served(NAMES, None, rounds((math.nan, 0.1)), 1, "fast")[:2] == (
        "fast", "chasing leader (no round with a finite loss)")


def test_eval_scores_win_over_online_losses_and_one_module_is_served_as_is():
    history = rounds((0.2, 0.9))
    assert select_served(NAMES, {"fast": 0.5, "slow": 0.4}, history, 1, "fast")[:2] == ("slow", "eval_data")
    assert select_served(("default",), None, [], 1, "fast") == ("default", "only module", {})


def test_regret_curve_by_hand():
    """Two rounds of two pairs. Final module's losses 0.5, 0.3 | 0.4, 0.2: hindsight 0.4 then 0.3.
    Regret: (0.7 - 0.4) = 0.3, then 0.3 + (0.6 - 0.3) = 0.6."""
    history = rounds((0.7, 0.8), (0.6, 0.9))
    curve = regret_curve(history, [0, 1, 2, 3], 4, torch.tensor([0.5, 0.3, 0.4, 0.2]), "fast")
    assert [c["round"] for c in curve] == [1, 2]
    assert [c["final_loss"] for c in curve] == pytest.approx([0.4, 0.3])
    assert [c["regret"] for c in curve] == pytest.approx([0.3, 0.6])


def test_regret_follows_the_stream_order_and_its_end():
    """Epochs repeat pairs: the second round's pairs are stream positions 2..3 = pairs 1 and 0; a run stopped at
    position 3 counts only pair 1 in the last round."""
    history = rounds((1.0, 1.0), (1.0, 1.0))
    final = torch.tensor([0.2, 0.6])
    curve = regret_curve(history, [0, 1, 1, 0], 3, final, "slow")
    assert [c["final_loss"] for c in curve] == pytest.approx([0.4, 0.6])
    assert curve[-1]["regret"] == pytest.approx((1.0 - 0.4) + (1.0 - 0.6))


def random_lora_model(tiny_model_dir, seed: int):
    """The tiny model in float64 with one LoRA adapter whose B is random (a module that has moved), in eval mode."""
    from transformers import AutoModelForCausalLM

    from ofsdpo.modules import DPO_ADAPTERS, attach_adapters, lora_config

    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
                            lora_config(4, 8, 0.0, "all-linear"), DPO_ADAPTERS).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def test_completion_logps_score_each_response_once(tiny_model_dir, tokenizer):
    """Each distinct prompt forwarded once, then each response once (rows counted at the input embedding), and the
    values of the pair path it replaces (each response tokenized as chosen = rejected, the chosen half kept),
    float64, with a random LoRA module."""
    from ofsdpo.data import collate, tokenize_pair
    from ofsdpo.logprobs import concatenated_forward
    from ofsdpo.scoring import completion_logps

    model = random_lora_model(tiny_model_dir, seed=0)
    prompts = ["Hello there", "A much longer prompt than the first one", "Why?", "x"]
    responses = ["General Kenobi.", "", "Because the sky is blue and the grass is green.", "y"]
    for chat in (False, True):
        want = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            if chat:
                p, r = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": response or " "}]
            else:
                p, r = prompt, response or " "
            example, _, _ = tokenize_pair(tokenizer, p, r, r, 512, 256)
            batch = collate([{**example, "index": i}], tokenizer.pad_token_id)
            with torch.no_grad():
                want.append(concatenated_forward(model, batch)[0].float())
        rows: list[int] = []
        handle = model.get_input_embeddings().register_forward_pre_hook(
            lambda m, args, seen=rows: seen.append(len(args[0])))
        try:
            got = completion_logps(model, tokenizer, prompts, responses, chat, batch_size=3)
        finally:
            handle.remove()
        # each prompt once, then the responses after them, 3 rows per forward; in plain text "x" + "y" is one
        # token (no prompt token of its own): that row is scored whole
        assert rows == ([3, 3, 1] if not chat else [3, 1, 3, 1]), rows
        torch.testing.assert_close(got, torch.cat(want), rtol=1e-6, atol=0)
    as_messages = [[{"role": "user", "content": p}] for p in prompts]  # a conversational prompt as it is
    torch.testing.assert_close(completion_logps(model, tokenizer, as_messages, responses, chat=False), got)


def test_completion_logps_keep_prompt_states_across_calls(tiny_model_dir, tokenizer):
    """Two samples of one prompt share its forward; a store kept by the caller (the reference's, at every stage)
    forwards the prompts once: a second call with new responses runs the responses alone, with the values of a call
    without the store (float64; the values themselves are checked against whole sequences above)."""
    from transformers import AutoModelForCausalLM

    from ofsdpo.scoring import completion_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    prompts = ["Tell me about the film", "Tell me about the film", "What did you think of the ending?"]
    rows: list[int] = []
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda m, args, seen=rows: seen.append(len(args[0])))
    store: dict = {}
    try:
        first = completion_logps(model, tokenizer, prompts, [" It was fine.", " Dull.", " Sad."], True,
                                 prompt_states=store)
        assert sum(rows[:-1]) == 2 and rows[-1] == 3  # 2 distinct prompts, then the 3 responses in one forward
        rows.clear()
        second = completion_logps(model, tokenizer, prompts, [" Long and slow.", " Great!", " Hopeful."], True,
                                  prompt_states=store)
        assert rows == [3]  # the responses alone
    finally:
        handle.remove()
    assert len(store) == 2
    fresh = [completion_logps(model, tokenizer, prompts[i:i + 1], [r], True)
             for i, r in enumerate([" Long and slow.", " Great!", " Hopeful."])]
    torch.testing.assert_close(second, torch.cat(fresh), rtol=1e-9, atol=0)
    assert first.shape == (3,) and torch.isfinite(first).all()


def test_pair_losses_many_equal_each_set_scored_alone(tiny_model_dir, tokenizer):
    """Several domains' pairs in shared batches (a batch straddles two sets) give each set the losses and
    correctness it gets alone, float64, with a random LoRA module; each set keeps its own reference."""
    from conftest import sentiment_rows
    from ofsdpo.data import load_preference_data
    from ofsdpo.reference import ReferenceCache
    from ofsdpo.scoring import pair_losses, pair_losses_many

    model = random_lora_model(tiny_model_dir, seed=1)
    rows = sentiment_rows(8)
    short = load_preference_data(rows[:3], tokenizer, 128, 64)
    long = load_preference_data([{**r, "prompt": r["prompt"] + " that everyone talked about for weeks"}
                                 for r in rows[3:]], tokenizer, 128, 64)
    sets = [(short, ReferenceCache(len(short)), [0, 2, 1]), (long, ReferenceCache(len(long)), [4, 0, 3, 1])]
    together = pair_losses_many(model, sets, "default", tokenizer.pad_token_id, 0.1, batch_size=2)
    for (data, _, indices), (losses, correct) in zip(sets, together):
        alone = pair_losses(model, data, ReferenceCache(len(data)), indices, "default", tokenizer.pad_token_id, 0.1,
                            batch_size=4)
        torch.testing.assert_close(losses, alone[0], rtol=1e-9, atol=0)
        assert torch.equal(correct, alone[1]) and len(losses) == len(indices)
    assert not torch.equal(together[0][0][:2], together[1][0][:2])  # the sets did not get each other's numbers


def test_pair_path_forwards_each_prompt_once_with_the_whole_sequence_values(tiny_model_dir, tokenizer):
    """`pair_logps`: each pair's prompt forwarded once, then its two responses after it (rows counted at the input
    embedding), with the values of one concatenated forward of whole sequences (float64, random LoRA module);
    pair losses and the reference computed this way give a module equal to the base exactly log 2."""
    import math

    from conftest import sentiment_rows
    from ofsdpo.data import load_preference_data
    from ofsdpo.logprobs import pair_logps
    from ofsdpo.reference import ReferenceCache
    from ofsdpo.scoring import pair_losses

    model = random_lora_model(tiny_model_dir, seed=2)
    rows = sentiment_rows(5)
    data = load_preference_data([{**r, "prompt": r["prompt"] + " and" * (2 * i)} for i, r in enumerate(rows)],
                                tokenizer, 128, 64)
    seen: list[int] = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    try:
        chosen, rejected = pair_logps(model, data.pairs, tokenizer.pad_token_id, batch_size=2)
        assert sum(seen) == 5 + 10, seen  # 5 prompts, then 10 responses
        seen.clear()
        whole = pair_logps(model, data.pairs, tokenizer.pad_token_id, batch_size=2, prompt_once=False)
        assert seen == [4, 4, 2]  # chosen and rejected whole, 2 pairs a forward
    finally:
        handle.remove()
    torch.testing.assert_close(chosen, whole[0], rtol=1e-9, atol=0)
    torch.testing.assert_close(rejected, whole[1], rtol=1e-9, atol=0)
    from transformers import AutoModelForCausalLM

    from ofsdpo.modules import DPO_ADAPTERS, attach_adapters, lora_config

    fresh = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(4, 8, 0.0, "all-linear"),
                            DPO_ADAPTERS)  # B = 0: the policy is the base (float32, as the reference cache)
    losses, _ = pair_losses(fresh, data, ReferenceCache(len(data)), list(range(len(data))), "default",
                            tokenizer.pad_token_id, 0.1)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))


def test_judged_samples_are_scored_after_the_samplers_prompt_states(tiny_model_dir, tokenizer, length_judged):
    """The prompt states the sampler keeps let `completion_logps` run the responses alone (rows counted at the input
    embedding; a response whose first token merges with the prompt's end tokenizes to another prompt, which would
    be forwarded), with the numbers of forwarding the prompts; judge_evals, whose policy side always uses them,
    gives the KL of a reference side that forwards its prompts (float64, a random LoRA module)."""
    from ofsdpo.domains import get_domain
    from ofsdpo.generation import sample_groups
    from ofsdpo.scoring import common_random_numbers, completion_logps, judge_evals, reference_sample_groups

    model = random_lora_model(tiny_model_dir, seed=3)
    prompts = ["Tell me about the film", "What did you think of the ending?", "Was it long?"]
    store: dict = {}
    torch.manual_seed(0)
    sample_groups(model, tokenizer, [(prompts, True, 4)], 2, prompt_states=store)
    assert len(store) == 3
    responses = ["It was fine.", "Sad.", "Yes, very long."]
    rows: list[int] = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    try:
        kept = completion_logps(model, tokenizer, prompts, responses, True, prompt_states=store)
    finally:
        handle.remove()
    assert rows == [3]  # the responses alone
    torch.testing.assert_close(kept, completion_logps(model, tokenizer, prompts, responses, True), rtol=1e-9, atol=0)
    tasks = [(get_domain("sentiment"), get_domain("sentiment").prompts("heldout")[:3])]
    cpu, ref_store = torch.device("cpu"), {}
    with common_random_numbers(5, cpu):
        refs = reference_sample_groups(model, tokenizer, tasks, samples_per_prompt=2, prompt_states=ref_store)
    with common_random_numbers(5, cpu):
        fast = judge_evals(model, tokenizer, tasks, "default", ref_scores=refs, samples_per_prompt=2,
                           ref_prompt_states=ref_store)[0]
    with common_random_numbers(5, cpu):
        slow = judge_evals(model, tokenizer, tasks, "default", ref_scores=refs, samples_per_prompt=2)[0]
    assert fast["per_prompt"]["judge_score"] == slow["per_prompt"]["judge_score"]
    torch.testing.assert_close(torch.tensor(fast["per_prompt"]["kl"]), torch.tensor(slow["per_prompt"]["kl"]),
                               rtol=1e-9, atol=1e-12)
