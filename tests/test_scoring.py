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


def test_paired_online_loss_difference_is_the_regret_difference_under_a_shared_comparator():
    """Two arms on one stream (3 rounds of sizes 2, 1, 2), each arm's regret taken against ONE comparator (any
    fixed module's losses on the stream): their regret difference is the difference of the arms' cumulative
    pre-update online losses, which is what the experiments compare (`with_online_total`), whatever the comparator."""
    from ofsdpo.commands.experiment_report import with_online_total

    arm_a = [{"round": 1, "position": 0, "fast": 0.69}, {"round": 2, "position": 2, "fast": 0.6},
             {"round": 3, "position": 3, "fast": 0.55}]  # learns little
    arm_b = [{"round": 1, "position": 0, "fast": 0.69}, {"round": 2, "position": 2, "fast": 0.5},
             {"round": 3, "position": 3, "fast": 0.30}]
    totals = [with_online_total({"online_loss_curve": [r["fast"] for r in arm]})["online_loss_total"]
              for arm in (arm_a, arm_b)]
    for comparator in (torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), torch.tensor([0.9, 0.0, 0.05, 0.7, 0.2])):
        regrets = [regret_curve(arm, [0, 1, 2, 3, 4], 5, comparator, "fast")[-1]["regret"] for arm in (arm_a, arm_b)]
        assert regrets[0] - regrets[1] == pytest.approx(totals[0] - totals[1], abs=1e-12)
    assert totals[0] - totals[1] == pytest.approx(0.35)
    # each arm against its OWN final module (the old curve) ranks them the other way: arm a learnt less
    own = [regret_curve(arm_a, [0, 1, 2, 3, 4], 5, torch.full((5,), 0.55), "fast")[-1]["regret"],
           regret_curve(arm_b, [0, 1, 2, 3, 4], 5, torch.full((5,), 0.2), "fast")[-1]["regret"]]
    assert (own[0] - own[1]) * (totals[0] - totals[1]) < 0


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


def test_sample_kls_are_the_naive_exact_kl_of_each_response(tiny_model_dir, tokenizer):
    """Each response tokenized as training tokenizes a completion (after its prompt, plain or chat), its KL the
    full-vocabulary KL of the naive path (both models' whole logits, float64, a random LoRA module), in any batch
    size; a module equal to the base scores 0 on every response."""
    from ofsdpo.data import collate, tokenize_pair
    from ofsdpo.logprobs import naive_sequence_kl
    from ofsdpo.modules import reference_mode
    from ofsdpo.scoring import sample_kls

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
            ids, mask = batch["input_ids"][:1], batch["completion_mask"][:1]
            with torch.no_grad():
                policy = model(input_ids=ids).logits
                with reference_mode(model):
                    ref = model(input_ids=ids).logits
            want.append(naive_sequence_kl(policy, ref, mask))
        for batch_size in (1, 3):
            got = sample_kls(model, tokenizer, prompts, responses, chat, batch_size=batch_size)
            torch.testing.assert_close(got, torch.cat(want), rtol=1e-9, atol=1e-12)
        assert (got > 0).all()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert torch.equal(sample_kls(model, tokenizer, prompts, responses, True), torch.zeros(4, dtype=torch.float64))


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
