"""The chunked completion-only path against the naive full-vocabulary log-softmax."""

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
