"""The configs of the commands that train nothing: generate, eval and export."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..errors import ConfigError
from .base import DTYPES, ModelOptions, _help, check_field_types, field_names

@dataclass
class GenerateConfig:
    domain: str = field(default="sentiment", metadata=_help("Built-in domain: sentiment, critic, concise, safety."))
    out: str = field(default="pairs.jsonl", metadata=_help("Where to write the judged pairs (JSONL)."))
    overwrite: bool = field(default=False, metadata=_help("Replace --out if it exists (else the run is refused)."))
    model: Optional[str] = ModelOptions.model()
    adapter: Optional[str] = field(default=None, metadata=_help(
        "A peft adapter folder (e.g. a run's --output-dir, or its fast/ or slow/ module) to sample from, on --model."))
    max_new_tokens: int = field(default=0, metadata=_help(
        "Most tokens per sample (0: the domain's own, 24-40); a sample cut here may end mid-sentence."))
    num_threads: Optional[int] = field(default=None, metadata=_help("CPU threads (default: what torch picks)."))
    gguf_file: Optional[str] = ModelOptions.gguf_file()
    trust_remote_code: bool = ModelOptions.trust_remote_code()
    device: str = ModelOptions.device()
    dtype: DTYPES = ModelOptions.dtype()
    split: Literal["train", "heldout", "all"] = field(default="train", metadata=_help("Which prompts to use."))
    num_prompts: int = field(default=64, metadata=_help("Prompts to sample for (in the fixed order; -1: all)."))
    samples_per_prompt: int = field(default=4, metadata=_help("Samples per prompt; best and worst form a pair."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature."))
    top_p: float = field(default=0.95, metadata=_help("Nucleus sampling threshold."))
    batch_size: int = field(default=16, metadata=_help("Prompts per generate call."))
    seed: int = field(default=0, metadata=_help("Sampling seed."))
    progress: bool = field(default=True, metadata=_help("Show a progress bar."))

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.samples_per_prompt < 2:
            raise ConfigError(f"--samples-per-prompt must be >= 2 to form a pair (got {self.samples_per_prompt}).")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 (got {self.temperature}).")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1] (got {self.top_p}).")
        if self.num_prompts == 0 or self.num_prompts < -1:
            raise ConfigError(f"--num-prompts must be -1 or >= 1 (got {self.num_prompts}).")
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0 (got {self.max_new_tokens}).")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"--num-threads must be >= 1 (got {self.num_threads}).")


@dataclass
class ExportConfig:
    """`ofsdpo export RUN --out DIR`: a run's served module merged into its base, saved as a standalone model."""

    run: Optional[str] = field(default=None, metadata=_help(
        "A run's --output-dir (train or continual): its served adapter and config.yaml; the first positional argument."))
    out: Optional[str] = field(default=None, metadata=_help(
        "Folder for the merged model (safetensors, config, tokenizer, chat template)."))
    model: Optional[str] = field(default=None, metadata=_help(
        "The base the adapter was trained on (default: the run's config.yaml, else the embedded model)."))
    gguf_file: Optional[str] = field(default=None, metadata=_help("With --model: its GGUF file."))
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata=_help(
        "Dtype of the saved weights (the merge itself runs in float32)."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow the base's own modelling code."))
    overwrite: bool = field(default=False, metadata=_help("Replace an existing --out folder."))

    def __post_init__(self) -> None:
        check_field_types(self)
        if not self.run:
            raise ConfigError("the run folder is required: ofsdpo export RUN --out DIR")
        if not self.out:
            raise ConfigError("--out DIR is required: the folder for the merged model.")

    field_names = classmethod(field_names)  # the flags, and the keys its YAML may hold


@dataclass
class EvalConfig:
    """`ofsdpo eval`: score the base model and each adapter on built-in domains and on your own prompts and judge
    (held-out pairs and judged samples)."""

    model: Optional[str] = ModelOptions.model()  # the base the adapters were trained on
    gguf_file: Optional[str] = ModelOptions.gguf_file()
    trust_remote_code: bool = ModelOptions.trust_remote_code()
    device: str = ModelOptions.device()
    dtype: DTYPES = ModelOptions.dtype()
    adapter: list[str] = field(default_factory=list, metadata=_help(
        "A peft adapter folder, once per adapter (the base model is always scored too, as the row 'base')."))
    domain: list[str] = field(default_factory=list, metadata=_help("Built-in domain to score on, once per domain."))
    prompts: Optional[str] = field(default=None, metadata=_help(
        "Your own domain: prompts to judge (.jsonl/.json/.parquet, a dataset folder, a hub name; NAME=SOURCE names "
        "the domain, else the file's stem), scored by --judge; its held-out pairs from --data NAME=PATH."))
    judge: list[str] = field(default_factory=list, metadata=_help(
        "Judge of --prompts: a built-in name, module:function, hf:MODEL or pairwise:module:function (:WEIGHT each)."))
    judge_device: Optional[str] = field(default=None, metadata=_help("Device of an hf:MODEL judge (default: the model's)."))
    data: list[str] = field(default_factory=list, metadata=_help(
        "Held-out pairs for the DPO loss: NAME=PATH (or PATH, in --domain order). A domain without a file gets "
        "pairs sampled from the base model on its held-out prompts and judged."))
    pair_prompts: int = field(default=16, metadata=_help("Held-out prompts sampled for pairs when --data lacks one."))
    samples_per_prompt: int = field(default=4, metadata=_help("Samples per prompt for generated pairs."))
    judge_prompts: int = field(default=16, metadata=_help("Held-out prompts judged per domain (0: no judging)."))
    judge_samples: int = field(default=1, metadata=_help(
        "Judged samples per prompt (every row draws the same random numbers: a module equal to the base ties it)."))
    beta: float = field(default=0.1, metadata=_help("DPO temperature of the held-out loss (use the training one)."))
    max_length: int = field(default=512, metadata=_help("Max tokens of prompt + completion."))
    max_prompt_length: int = field(default=256, metadata=_help("Max prompt tokens."))
    batch_size: int = field(default=8, metadata=_help("Pairs per forward, prompts per generate call."))
    seed: int = field(default=0, metadata=_help("Seed of pair sampling; every row's judged samples start from it."))
    json: Optional[str] = field(default=None, metadata=_help("Also write the results here (JSON)."))
    progress: bool = field(default=True, metadata=_help("Show progress bars."))

    def __post_init__(self) -> None:
        if not self.domain and self.prompts is None:
            raise ConfigError("--domain (a built-in domain, once per domain) or --prompts FILE --judge SPEC is required.")
        if self.prompts is not None and not self.judge and not self.prompts_source.startswith("builtin:"):
            raise ConfigError(f"--prompts {self.prompts}: give --judge SPEC to score the samples.")
        if self.judge and self.prompts is None:
            raise ConfigError("--judge scores --prompts: give --prompts FILE (built-in domains keep their own judges).")
        for path in self.adapter:
            if not (Path(path) / "adapter_config.json").is_file():
                raise ConfigError(f"--adapter {path}: not a peft adapter folder (no adapter_config.json).")
        for name, path in self.data_files.items():
            if not Path(path).exists():
                raise ConfigError(f"--data {name}={path}: no such file.")
        if self.judge_prompts < 0 or self.pair_prompts < 1 or self.batch_size < 1 or self.judge_samples < 1:
            raise ConfigError("--judge-prompts must be >= 0, --pair-prompts, --batch-size and --judge-samples >= 1.")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"--samples-per-prompt must be >= 2 to form a pair (got {self.samples_per_prompt}).")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0 (got {self.beta}).")

    @property
    def prompts_name(self) -> str | None:
        """The domain name of --prompts: NAME of NAME=SOURCE, else the source's stem."""
        if self.prompts is None:
            return None
        name, sep, _ = self.prompts.partition("=")
        source = self.prompts_source
        return name if sep else (source.split(":")[1] if source.startswith("builtin:") else Path(source).stem)

    @property
    def prompts_source(self) -> str | None:
        return None if self.prompts is None else self.prompts.partition("=")[2] or self.prompts

    @property
    def domain_names(self) -> list[str]:
        return self.domain + ([self.prompts_name] if self.prompts is not None else [])

    @property
    def data_files(self) -> dict[str, str]:
        """{domain: path} from `NAME=PATH` entries, or bare paths matched to the domains (--domain, then --prompts)
        in order."""
        files, names = {}, self.domain_names
        for i, entry in enumerate(self.data):
            name, sep, path = entry.partition("=")
            if not sep:
                if i >= len(names):
                    raise ConfigError(f"--data {entry}: more files than domains; write NAME=PATH.")
                name, path = names[i], entry
            if name not in names:
                raise ConfigError(f"--data {entry}: '{name}' is not one of the domains ({', '.join(names)}).")
            files[name] = path
        return files
