"""The chunked completion-only path against the naive full-vocabulary log-softmax."""

import contextlib
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import sentiment_rows
from ofsdpo.data import check_row, collate, tokenize_pair
from ofsdpo.logprobs import concatenated_forward, naive_sequence_logps, sequence_logps
from ofsdpo.modules import OFS_ADAPTERS, adapter_parameters, attach_adapters, lora_config


@pytest.fixture
def peft_model(tiny_model_dir):
    torch.manual_seed(0)
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(4, 8, 0.0, "all-linear"),
                            OFS_ADAPTERS)
    with torch.no_grad():  # non-zero B so the adapter really changes the outputs
        for p in adapter_parameters(model, "fast"):
            p.normal_(0, 0.2)
    return model


def make_batch(tokenizer, n=3, **kw):
    examples = []
    for i, row in enumerate(sentiment_rows(n)):
        row["prompt"] = row["prompt"] + " and" * (3 * i)  # different lengths, so padding appears
        example, _, _ = tokenize_pair(tokenizer, *check_row(row, "t", i + 1), 64, 32)
        examples.append({**example, "index": i})
    return examples, collate(examples, tokenizer.pad_token_id)


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_equals_naive_values_and_gradients(peft_model, tokenizer, chunk_size):
    """In float64 the two paths differ only by rounding (~1e-16 relative), so the tolerance can be tight; in float32
    the gradient sums' order (threads) made a 1e-5 tolerance flaky."""
    peft_model.double()
    _, batch = make_batch(tokenizer)
    ours = sequence_logps(peft_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_size)
    assert ours.dtype == torch.float64
    ours.sum().backward()
    ours_grads = [p.grad.clone() for p in adapter_parameters(peft_model, "fast")]
    peft_model.zero_grad()
    logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    naive = naive_sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    naive.sum().backward()
    torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-10)
    for a, p in zip(ours_grads, adapter_parameters(peft_model, "fast")):
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12)


def test_padding_does_not_change_a_sequence_logp(peft_model, tokenizer):
    examples, batch = make_batch(tokenizer)
    alone = collate(examples[:1], tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = concatenated_forward(peft_model, batch)
        chosen_alone, rejected_alone = concatenated_forward(peft_model, alone)
    assert batch["input_ids"].shape[1] > alone["input_ids"].shape[1]
    assert torch.allclose(chosen[:1], chosen_alone, atol=1e-5) and torch.allclose(rejected[:1], rejected_alone, atol=1e-5)


def test_prompt_tokens_are_not_scored(peft_model, tokenizer):
    _, batch = make_batch(tokenizer)
    with torch.no_grad():
        full = sequence_logps(peft_model, batch["input_ids"], batch["attention_mask"], batch["attention_mask"])
        completion = sequence_logps(peft_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert (completion > full).all()  # fewer (negative) terms in the sum


@pytest.mark.parametrize("softcap,scale", [(None, None), (30.0, None), (None, 0.5), (5.0, 2.0)])
def test_frozen_head_gradient_matches_autograd(softcap, scale):
    from ofsdpo.logprobs import _chunk_logps, _token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True).requires_grad_(False)
    hidden = torch.randn(6, 8, requires_grad=True)
    labels = torch.randint(0, 50, (6,))
    upstream = torch.randn(6)
    ours = _chunk_logps(head, hidden, labels, softcap, scale)  # the gradient computed in the forward
    (ours * upstream).sum().backward()
    ours_grad, hidden.grad = hidden.grad.clone(), None
    plain = _token_logps(head, hidden, labels, softcap, scale)  # plain autograd
    (plain * upstream).sum().backward()
    assert torch.allclose(ours, plain, atol=1e-5) and torch.allclose(ours_grad, hidden.grad, atol=1e-5)


# --- exact KL(π ‖ π_ref) along responses --------------------------------------------------------------------------
def _five_token_model(seed: int, dtype=torch.float64):
    """A Llama with a 5-token vocabulary and a random LoRA module (B ≠ 0), in float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ofsdpo.modules import DPO_ADAPTERS

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = attach_adapters(LlamaForCausalLM(config).to(dtype), lora_config(4, 8, 0.0, "all-linear"), DPO_ADAPTERS)
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.normal_(0, 0.5)
    return model.eval()


def _kl(model, input_ids, completion_mask, chunk_size=1024):
    from ofsdpo.logprobs import sequence_kl
    from ofsdpo.modules import reference_mode

    return sequence_kl(model, input_ids, torch.ones_like(input_ids), completion_mask,
                       reference=lambda: reference_mode(model), chunk_size=chunk_size)


def test_exact_kl_equals_an_enumeration_of_every_sequence():
    """5-token vocabulary, 2-token prompt, 3-token responses, float64. Each response's KL equals Σ_t Σ_v π(v|y<t)
    (log π(v|y<t) − log π_ref(v|y<t)) with every next-token probability read off a whole enumerated sequence's
    log-prob (the naive path, π and π_ref forwarded separately); and its π-weighted mean over all 125 responses is
    the KL between the two distributions over responses, Σ_y π(y) log π(y)/π_ref(y)."""
    import itertools

    from ofsdpo.modules import reference_mode

    model = _five_token_model(seed=0)
    prompt = [0, 3]

    def logp(tokens, reference=False):  # log π(tokens | prompt), whole sequence, naive full log-softmax
        ids = torch.tensor([prompt + list(tokens)])
        mask = torch.tensor([[0] * len(prompt) + [1] * len(tokens)])
        with torch.no_grad(), (reference_mode(model) if reference else contextlib.nullcontext()):
            return naive_sequence_logps(model(input_ids=ids).logits, ids, mask).item()

    responses = list(itertools.product(range(5), repeat=3))
    ids = torch.tensor([prompt + list(y) for y in responses])
    mask = torch.tensor([[0, 0, 1, 1, 1]] * len(responses))
    ours = torch.cat([_kl(model, ids[i:i + 25], mask[i:i + 25], chunk_size=7) for i in range(0, 125, 25)])
    for y, got in zip(responses[::11], ours[::11]):
        want = 0.0
        for t in range(3):
            for v in range(5):
                p = logp(y[:t] + (v,)) - logp(y[:t])
                q = logp(y[:t] + (v,), True) - logp(y[:t], True)
                want += math.exp(p) * (p - q)
        assert abs(got.item() - want) < 1e-10, (y, got.item(), want)
    policy = torch.tensor([logp(y) for y in responses], dtype=torch.float64)
    reference = torch.tensor([logp(y, True) for y in responses], dtype=torch.float64)
    assert abs(policy.exp().sum().item() - 1.0) < 1e-12
    sequence_level = (policy.exp() * (policy - reference)).sum()
    torch.testing.assert_close((policy.exp() * ours).sum(), sequence_level, rtol=1e-10, atol=1e-12)
    assert sequence_level > 1e-3  # the module really moved the distribution


def test_exact_kl_is_zero_for_the_base_and_positive_for_random_modules(tokenizer, tiny_model_dir):
    """A module equal to the base (B = 0, float32 as evaluation runs) scores 0 exactly on every row; random
    modules score > 0 on every row, also where the sampled-log-ratio estimate they replace is negative."""
    from ofsdpo.modules import DPO_ADAPTERS, reference_mode

    _, batch = make_batch(tokenizer, n=4)
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    from ofsdpo.logprobs import sequence_kl

    base = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(4, 8, 0.0, "all-linear"),
                           DPO_ADAPTERS).eval()
    zero = sequence_kl(base, ids, attn, mask, reference=lambda: reference_mode(base))
    assert torch.equal(zero, torch.zeros_like(zero))
    negative_log_ratio = 0
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in adapter_parameters(base, "default"):
                p.normal_(0, 0.3)
        kl = sequence_kl(base, ids, attn, mask, reference=lambda: reference_mode(base), chunk_size=5)
        assert (kl > 0).all(), kl
        with torch.no_grad():
            policy = sequence_logps(base, ids, attn, mask)
            with reference_mode(base):
                ref = sequence_logps(base, ids, attn, mask)
        negative_log_ratio += int(((policy - ref) < 0).sum())
    assert negative_log_ratio > 0  # the old estimate goes below 0 on these rows; the KL never does
