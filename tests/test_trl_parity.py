"""TRL as the oracle: same tokens, same sequence log-probs, same DPO loss on the same model and batch."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from conftest import sentiment_rows
from ofsdpo.data import check_row, collate, tokenize_pair
from ofsdpo.logprobs import concatenated_forward
from ofsdpo.losses import dpo_loss
from ofsdpo.modules import reference_mode

trl = pytest.importorskip("trl")


@pytest.fixture
def trl_trainer(tiny_model_dir, tokenizer, tmp_path):
    rows = sentiment_rows(4)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, per_device_train_batch_size=4, max_length=64,
                         report_to="none", use_cpu=True, dataset_num_proc=None, logging_steps=1)
    torch.manual_seed(0)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # move the policy away from the reference so the loss is not just log 2
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return trainer, rows


def test_tokenization_matches_trl(trl_trainer, tokenizer):
    trainer, rows = trl_trainer
    for i, row in enumerate(rows):
        ours, _, _ = tokenize_pair(tokenizer, *check_row(row, "t", i + 1), 64, 32)
        theirs = trainer.train_dataset[i]
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["chosen_ids"] == theirs["chosen_ids"] and ours["rejected_ids"] == theirs["rejected_ids"]


def test_logps_and_loss_match_trl(trl_trainer, tokenizer):
    trainer, rows = trl_trainer
    model = trainer.model
    model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items() if v}

    examples = [{**{k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}, "index": i}
                for i in range(len(rows))]
    ours_batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = concatenated_forward(model, ours_batch)
        with reference_mode(model):
            ref_chosen, ref_rejected = concatenated_forward(model, ours_batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    assert losses.mean().item() == pytest.approx(trl_loss, rel=1e-4)
    assert abs(losses.mean().item() - 0.6931) > 1e-3
    assert chosen.mean().item() == pytest.approx(metrics["logps/chosen"], rel=1e-4)
    assert rejected.mean().item() == pytest.approx(metrics["logps/rejected"], rel=1e-4)
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-3, abs=1e-6)
    assert (chosen_rewards - rejected_rewards).mean().item() == pytest.approx(metrics["rewards/margins"], rel=1e-3,
                                                                             abs=1e-6)


@pytest.mark.parametrize("loss_type,label_smoothing", [("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1),
                                                       ("sigmoid", 0.0)])
def test_every_loss_type_matches_trls_loss(tiny_model_dir, tokenizer, tmp_path, loss_type, label_smoothing):
    """`--loss-type`: our loss of our log-probs equals TRL's `DPOTrainer` loss of the same batch, per type (ipo with
    its per-token normalisation, robust with label smoothing)."""
    rows = sentiment_rows(4)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, per_device_train_batch_size=4, max_length=64,
                         report_to="none", use_cpu=True, dataset_num_proc=None, loss_type=[loss_type],
                         label_smoothing=label_smoothing)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():  # away from the reference: every type's loss then depends on the margins
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch).item()
    examples = [{**{k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}, "index": i}
                for i in range(len(rows))]
    ours_batch = collate(examples, tokenizer.pad_token_id)
    lengths = ours_batch["completion_mask"].sum(dim=1)
    with torch.no_grad():
        chosen, rejected = concatenated_forward(model, ours_batch)
        with reference_mode(model):
            ref_chosen, ref_rejected = concatenated_forward(model, ours_batch)
    losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, loss_type=loss_type,
                            label_smoothing=label_smoothing, chosen_lengths=lengths[:4], rejected_lengths=lengths[4:])
    assert losses.mean().item() == pytest.approx(trl_loss, rel=1e-4)
