"""`ofsdpo export`: a run's served module merged into its base as a standalone model that transformers loads, with
the logits of base + adapter; bad input is one line and writes nothing."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ofsdpo.cli import main


def test_export_merges_the_served_module_into_a_standalone_model(make_config, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel

    from ofsdpo.trainer import OFSDPOTrainer

    run = tmp_path / "run"
    OFSDPOTrainer(config=make_config(method="ofs-dpo", max_steps=2, lr=5e-2, output_dir=str(run))).train()
    out = tmp_path / "merged"
    assert main(["export", str(run), "--out", str(out)]) == 0  # the base comes from the run's config.yaml
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    served = PeftModel.from_pretrained(base, str(run)).eval()
    ids = torch.tensor([[1, 42, 7, 99, 5, 300]])
    with torch.no_grad():
        want, got = served(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-4  # the module moved the model: the test can tell a missing merge
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 merge: float32 tolerance
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())
    half = tmp_path / "half"
    assert main(["export", str(run), "--out", str(half), "--dtype", "bfloat16"]) == 0
    assert next(AutoModelForCausalLM.from_pretrained(half).parameters()).dtype == torch.bfloat16
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 2  # exists: refused without --overwrite
    assert f"--out {out} exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no served adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()
