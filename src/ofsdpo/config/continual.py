"""`ofsdpo continual`'s config: its domains (`DomainSpec`), its own options and the training options every stage runs
with, and the --search policy (`resolve_search`)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from .base import (CADENCE, OUTPUT, RUNTIME, _help, check_field_types, field_names, options_with_role, read_config_file,
                   write_yaml)
from .train import OFSDPOConfig, TrainingOptions

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# `ofsdpo train` options that a continual run sets per domain: each refused with what to use instead
TRAIN_ONLY = {
    "max_steps": "--max-steps-per-domain (optimiser steps per domain)",
    "data": "--domain NAME=TRAIN (once per domain)",
    "eval_data": "--domain NAME=TRAIN,heldout=PATH",
    "on_policy": "--domain NAME=prompts:PATH,judge=SPEC (an on-policy domain)",
    "prompts": "--domain NAME=prompts:PATH,judge=SPEC (an on-policy domain)",
    "judge": "--domain NAME=prompts:PATH,judge=SPEC (an on-policy domain)",
}


def refuse_train_only(keys, where: str = "") -> None:
    """`ofsdpo continual` sets these per stage; accepting them would silently overwrite them (issue of the past)."""
    for key in keys:
        name = key.lstrip("-").split("=")[0].replace("-", "_")
        if name in TRAIN_ONLY:
            raise ConfigError(f"{where}--{name.replace('_', '-')} is an `ofsdpo train` option; a continual run sets it "
                              f"per domain: use {TRAIN_ONLY[name]}.")


@dataclass
class DomainSpec:
    """One `--domain` of a continual run: its training pairs (`train`), or on-policy its prompts and judges."""

    name: str
    train: str
    heldout: str | None = None
    memory: str | None = None
    judge: list[str] = field(default_factory=list)

    FORM = "NAME=TRAIN[,heldout=PATH][,memory=PATH] or NAME=prompts:PATH,judge=SPEC[,judge=SPEC][,heldout=PATH]"

    @property
    def prompts(self) -> str | None:
        """The prompts source of an on-policy domain (`prompts:PATH`), else None."""
        return self.train[len("prompts:"):] if self.train.startswith("prompts:") else None

    @classmethod
    def parse(cls, text: str) -> "DomainSpec":
        name, sep, rest = text.partition("=")
        parts = rest.split(",") if sep else []
        if not name or not parts or not parts[0]:
            raise ConfigError(f"--domain {text!r}: expected {cls.FORM}.")
        spec = cls(name=name.strip(), train=parts[0].strip())
        if not SAFE_NAME.fullmatch(spec.name):  # the name becomes domains/<k>-<name>/: it must stay inside
            raise ConfigError(f"--domain {text!r}: the name {spec.name!r} must be letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit (it names a folder under --output-dir).")
        for part in parts[1:]:
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in ("heldout", "memory", "judge") or not value:
                raise ConfigError(f"--domain {text!r}: unknown part {part!r} (use heldout=PATH, memory=PATH or, with "
                                  "prompts:PATH, judge=SPEC).")
            if key == "judge":
                spec.judge.append(value.strip())
            else:
                setattr(spec, key, value.strip())
        if spec.prompts is not None and not spec.prompts:
            raise ConfigError(f"--domain {text!r}: prompts: needs a path (prompts:PATH).")
        if spec.judge and spec.prompts is None:
            raise ConfigError(f"--domain {text!r}: judge= labels on-policy samples: give prompts:PATH as the source.")
        if spec.prompts is not None and not spec.judge and not spec.prompts.startswith("builtin:"):
            raise ConfigError(f"--domain {text!r}: an on-policy domain needs judge=SPEC (a built-in name, "
                              "module:function, hf:MODEL or pairwise:module:function).")
        return spec


DENSITY_COMBINES = ("ties", "dare_ties", "dare_linear")  # the --combine values that read --density
DEFAULT_DENSITY = 0.5
DEFAULT_SELECT_JUDGE_PROMPTS = 8


def resolve_search(search: str, init: str) -> str:
    """--search auto resolved: on the 3-domain chain the simplex search beat the pairwise recursion under --init fresh
    (memory and report loss, accuracy, forgetting; docs/results.md); under --init previous only the recursion ran."""
    if search == "auto":
        return "simplex" if init == "fresh" else "pairwise"
    return search


@dataclass
class ContinualOptions:
    """What `ofsdpo continual` adds to the training options: the domains, the method and how it combines."""

    method: Literal["cofs-dpo", "ofs-dpo", "dpo", "dpo-replay", "lora-merge", "multitask"] = field(
        default="cofs-dpo", metadata=_help(
            "cofs-dpo, or a sequential baseline: dpo, ofs-dpo, dpo-replay, lora-merge; or multitask (the upper "
            "bound: each stage a fresh DPO LoRA on every domain seen, interleaved; stage k costs k stages).",
            weights_only=True)
    )
    domain: list[str] = field(
        default_factory=list,
        metadata=_help("NAME=TRAIN[,heldout=PATH][,memory=PATH], once per domain, in stream order; on-policy: "
                       "NAME=prompts:PATH,judge=SPEC[,heldout=PATH] (the stage samples and judges its own pairs).",
                       weights_only=True),
    )
    max_steps_per_domain: int = field(default=-1, metadata=_help(
        "Optimiser steps per domain (-1: its whole stream).", weights_only=True))
    memory_size: int = field(default=8, metadata=_help("Held-out pairs per domain kept in memory to choose λ."))
    heldout_size: int = field(
        default=32, metadata=_help("Pairs held out from the end of a domain's stream when it has no heldout file.")
    )
    combine: Literal["params", "delta", "ties", "dare_ties", "dare_linear"] = field(
        default="params", metadata=_help(
            "params: combine LoRA A and B (literal); delta: combine ΔW = BA exactly; ties, dare_ties, dare_linear: "
            "peft's merges of A and B (each trims or drops entries, --density), weighted by the λ search.",
            weights_only=True)
    )
    density: float = field(
        default=DEFAULT_DENSITY, metadata=_help(
            "--combine ties|dare_ties|dare_linear: share of each module's A and B entries kept, in (0, 1]: TIES "
            "keeps the largest, DARE a random share rescaled by 1/density. Lower: less interference between the "
            "modules, more of each one lost; 1 keeps every entry.", weights_only=True)
    )
    init: Literal["previous", "fresh"] = field(
        default="previous", metadata=_help(
            "Start each domain from the previous served module, or from scratch.", weights_only=True)
    )
    judge_prompts: int = field(
        default=0, metadata=_help("Held-out prompts judged per built-in domain after every stage (0: no judging).")
    )
    judge_max_new_tokens: int = field(
        default=0, metadata=_help("Cap on the judged samples' length (0: each domain's own); lower is faster.")
    )
    judge_samples: int = field(
        default=1, metadata=_help("Judged samples per held-out prompt (more samples, less judge noise).")
    )
    score_domains: Literal["all", "seen"] = field(
        default="all",
        metadata=_help("Domains each stage's served module is scored and judged on: all (the whole stage x domain "
                       "matrix, forward transfer too) or seen (those trained so far: all that forgetting needs, "
                       "fewer passes; the other cells stay empty, and each domain is judged in a call of its own)."),
    )
    selection: Literal["memory", "heldout"] = field(
        default="memory",
        metadata=_help("Pairs that choose each stage's best fast module and served module: the memory (never in the "
                       "report: unbiased) or the held-out pairs the report scores (the choice then flatters it)."),
    )
    lambda_grid: str = field(
        default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", metadata=_help("Comma-separated λ values in [0, 1].",
                                                                         weights_only=True)
    )
    search: Literal["auto", "pairwise", "simplex"] = field(
        default="auto",
        metadata=_help("cofs-dpo weights: pairwise recursion θ ← λθ_prev + (1−λ)θ_new on --lambda-grid, or a search "
                       "over the whole simplex of the kept modules' weights (it also scores the pairwise candidates, "
                       "so it never does worse on the memory; costs up to --search-budget memory passes per stage). "
                       "auto: simplex with --init fresh, pairwise with --init previous (docs/results.md).",
                       weights_only=True),
    )
    search_budget: int = field(default=60, metadata=_help(
        "Most combinations scored per stage by --search simplex.", weights_only=True))
    select_by: Literal["loss", "balanced", "worst", "judge"] = field(
        default="loss",
        metadata=_help("What cofs-dpo's search minimises over the memory of every domain seen: loss (the memory DPO "
                       "loss pooled over pairs: a domain with larger losses or more pairs weighs more); balanced (the "
                       "mean over domains of each domain's loss relative to its own kept module: equal weight per "
                       "domain); worst (the largest such ratio: minimax); judge (the mean over domains of the judge "
                       "score of samples on training prompts: needs a judge for every domain, costs "
                       "--select-judge-prompts x --judge-samples samples per domain per candidate).",
                       weights_only=True),
    )
    select_judge_prompts: int = field(default=DEFAULT_SELECT_JUDGE_PROMPTS, metadata=_help(
        "--select-by judge: training prompts per domain (its last ones, never report prompts), each sampled "
        "--judge-samples times per candidate under the same seed (common random numbers). More: less judge noise, "
        "a slower search.",
        weights_only=True))
    output_dir: str = field(default="ofsdpo-output", metadata=_help("Where the report, stages and served adapter go.",
                                                                    role=OUTPUT))
    resume: bool = field(default=False, metadata=_help("Resume the run in --output-dir (finished stages are kept).",
                                                       role=OUTPUT))
    overwrite: bool = field(default=False, metadata=_help("Allow writing into an --output-dir holding another run.",
                                                          role=OUTPUT))

    def __post_init__(self) -> None:
        check_field_types(self)
        if not self.domain:
            raise ConfigError("--domain is required (NAME=TRAIN, once per domain).")
        names = [s.name for s in self.domains]
        if len(set(names)) != len(names):
            raise ConfigError(f"--domain names must be unique (got {', '.join(names)}).")
        if self.memory_size < 1:
            raise ConfigError(f"--memory-size must be >= 1 (got {self.memory_size}).")
        if self.max_steps_per_domain != -1 and self.max_steps_per_domain < 1:
            raise ConfigError(f"--max-steps-per-domain must be -1 or >= 1 (got {self.max_steps_per_domain}).")
        if self.judge_samples < 1:
            raise ConfigError(f"--judge-samples must be >= 1 (got {self.judge_samples}).")
        if self.search_budget < 1:
            raise ConfigError(f"--search-budget must be >= 1 (got {self.search_budget}).")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"--density must lie in (0, 1]: the share of entries each module keeps (got "
                              f"{self.density}).")
        if self.density != DEFAULT_DENSITY and self.combine not in DENSITY_COMBINES:
            raise ConfigError(f"--density applies to --combine {'|'.join(DENSITY_COMBINES)} (the merges that trim or "
                              f"drop entries); --combine {self.combine} keeps every entry: drop --density, or pick "
                              "one of those merges.")
        self._check_selection()
        if not all(0.0 <= x <= 1.0 for x in self.lambdas):
            raise ConfigError(f"--lambda-grid values must lie in [0, 1] (got {self.lambda_grid}).")

    def _check_selection(self) -> None:
        """--select-by and --select-judge-prompts only where they change something (so run keys stay put)."""
        if self.select_by != "loss" and self.method != "cofs-dpo":
            raise ConfigError(f"--select-by chooses cofs-dpo's combination weights; --method {self.method} combines "
                              "nothing: drop --select-by, or use --method cofs-dpo.")
        if self.select_judge_prompts < 1:
            raise ConfigError(f"--select-judge-prompts must be >= 1 (got {self.select_judge_prompts}).")
        if self.select_judge_prompts != DEFAULT_SELECT_JUDGE_PROMPTS and self.select_by != "judge":
            raise ConfigError(f"--select-judge-prompts applies to --select-by judge; --select-by {self.select_by} "
                              "samples nothing: drop --select-judge-prompts, or use --select-by judge.")

    @property
    def search_method(self) -> str:
        return resolve_search(self.search, self.init)

    @property
    def domains(self) -> list[DomainSpec]:
        return [DomainSpec.parse(text) for text in self.domain]

    @property
    def lambdas(self) -> list[float]:
        try:
            return [float(x) for x in self.lambda_grid.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--lambda-grid: expected comma-separated numbers (got {self.lambda_grid!r}).") from None


@dataclass
class ContinualConfig(ContinualOptions):
    """`ofsdpo continual`: its own options plus the training options every stage runs with (contained, so that a
    train-only flag such as --max-steps cannot slip in and be overwritten per stage)."""

    training: TrainingOptions = field(default_factory=TrainingOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.training, TrainingOptions):
            raise ConfigError(f"ContinualConfig.training must be a TrainingOptions (got {type(self.training).__name__}).")
        super().__post_init__()

    @classmethod
    def own_field_names(cls) -> set[str]:
        return field_names(ContinualOptions)

    @classmethod
    def flat_field_names(cls) -> set[str]:
        """Every key of the flat form (CLI flags, YAML, `from_flat`): the continual options and the training options."""
        return cls.own_field_names() | TrainingOptions.field_names()

    field_names = flat_field_names  # what read_config_file checks a YAML file against

    @classmethod
    def argument_classes(cls) -> tuple[type, ...]:
        """The dataclasses the command line parses into (one flat set of flags)."""
        return ContinualOptions, TrainingOptions

    @classmethod
    def from_parsed(cls, options: ContinualOptions, training: TrainingOptions) -> "ContinualConfig":
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(ContinualOptions)},
                   training=training)

    @classmethod
    def from_flat(cls, **values: Any) -> "ContinualConfig":
        """From one flat mapping of option names (as on the command line); train-only keys are refused."""
        refuse_train_only(values)
        unknown = set(values) - cls.flat_field_names()
        if unknown:
            raise ConfigError(f"unknown continual option(s): {', '.join(sorted(unknown))}.")
        own = {k: v for k, v in values.items() if k in cls.own_field_names()}
        training = TrainingOptions(**{k: v for k, v in values.items() if k not in own})
        return cls(**own, training=training)

    def to_dict(self) -> dict[str, Any]:
        """The flat form: saved as config.yaml and compared on --resume."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(ContinualOptions)}
        return {**own, **self.training.to_dict()}

    def save_yaml(self, path: str | Path) -> None:
        write_yaml(self.to_dict(), path)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "ContinualConfig":
        return cls.from_flat(**{**read_config_file(path, cls), **overrides})

    @staticmethod
    def translate_yaml(values: dict) -> dict:
        """YAML may list `domains: [{name, train, heldout, memory}]` instead of `domain: [NAME=TRAIN, …]`."""
        refuse_train_only(values, "--config: ")
        if "domains" in values:
            items = values.pop("domains") or []
            values["domain"] = [item if isinstance(item, str) else
                                ",".join([f"{item['name']}={item['train']}"] +
                                         [f"{k}={item[k]}" for k in ("heldout", "memory") if item.get(k)])
                                for item in items]
        return values


# Options that change nothing a resumed run computes (their role is not `computed`): `--resume` may change them, not
# the others (`rundir.check_same_run` for ofsdpo train, `ContinualRunner._check_resumable` for ofsdpo continual).
RESUME_MAY_CHANGE = options_with_role((OFSDPOConfig, ContinualConfig), RUNTIME, CADENCE, OUTPUT)
# continual options that change only the modules a stage trains or combines (tagged `weights_only`): a served module's
# scores depend on its weights, not on how they came about (`ContinualRunner._scoring_parts`)
WEIGHTS_ONLY = frozenset(f.name for f in dataclasses.fields(ContinualOptions) if f.metadata.get("weights_only"))
