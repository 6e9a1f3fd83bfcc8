import dataclasses
import json
from pathlib import Path

import pytest

from ofsdpo import OFSDPOConfig
from ofsdpo.models import load_tokenizer
from tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def sentiment_rows(n: int, offset: int = 0) -> list[dict]:
    good = [" was wonderful and moving.", " is a joy, warm and funny.", " made me smile all night."]
    bad = [" was dull and boring.", " is a mess, cold and slow.", " made me leave early, annoyed."]
    return [{"prompt": f"Review {i + offset}: the film", "chosen": good[i % 3], "rejected": bad[(i + 1) % 3]}
            for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class PowerCut(Exception):
    """A crash a test causes in the middle of training."""


def dying_after_step(stage_prefix: str, step: int):
    """An `OFSDPOTrainer._after_step` that raises PowerCut at `step` of the stage whose folder name starts with
    `stage_prefix` (a continual stage: `2-`): the step has updated the weights and is neither logged nor saved."""
    from ofsdpo.trainer import OFSDPOTrainer

    after_step = OFSDPOTrainer._after_step

    def dies(self, row, seconds):
        if self.output_dir.name.startswith(stage_prefix) and self.state.step == step:
            raise PowerCut
        return after_step(self, row, seconds)

    return dies


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", sentiment_rows(16))


@pytest.fixture
def make_config(tiny_model_dir, pairs_file, tmp_path):
    def make(**overrides) -> OFSDPOConfig:
        values = dict(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(tmp_path / "out"),
                      batch_size=4, lr=1e-3, lora_r=4, lora_alpha=8, max_length=64, max_prompt_length=32,
                      save_steps=0, progress=False, seed=0)
        values.update(overrides)
        return OFSDPOConfig(**values)

    return make


def length_judge(prompt, response, meta) -> float:
    """The tiny model writes noise, which the built-in judges mostly score as ties: longer is better instead."""
    return float(len(response))


@pytest.fixture
def length_judged(monkeypatch):
    """Every built-in domain judged by `length_judge`, with 5-token samples (fast on the tiny model)."""
    from ofsdpo import domains

    for name, domain in list(domains.DOMAINS.items()):
        monkeypatch.setitem(domains.DOMAINS, name, dataclasses.replace(domain, judge=length_judge, max_new_tokens=5))
