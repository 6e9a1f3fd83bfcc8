"""`ofsdpo experiment` and `ofsdpo compare`: an experiment file's schema (`ExperimentConfig`), the compare command's
options and the experiment command's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..errors import ConfigError
from .base import _help, check_field_types, field_names, read_config_file
from .continual import ContinualConfig
from .demo import DEMO_DOMAINS
from .train import OFSDPOConfig, TrainingOptions

EXPERIMENT_KINDS = ("in-domain", "continual")
IN_DOMAIN_METHODS = ("dpo", "ofs-dpo")


@dataclass
class ExperimentConfig:
    """One experiment of `experiments/*.yaml` (the file's schema): variants run on built-in domains over seeds."""

    name: str = "experiment"
    kind: Literal["in-domain", "continual"] = "in-domain"
    description: str = ""
    domains: list[str] = field(default_factory=lambda: list(DEMO_DOMAINS))
    # each: {name: ..., method: ..., any other field of OFSDPOConfig (in-domain) or ContinualConfig (continual)}
    variants: list[dict] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    model: Optional[str] = None  # default: the embedded SmolLM2-135M-Instruct
    gguf_file: Optional[str] = None
    device: str = "auto"
    data_dir: str = "experiments-output/pairs"  # shared by experiments: pairs are sampled once per domain
    pair_seed: int = 0
    # the scale; the defaults are the scale every shipped experiment ran at (the demo's until it added the continual
    # baselines and shrank to fit ten minutes): a run's key holds them, so they stay fixed here
    prompts: int = 40  # training prompts sampled per domain
    samples: int = 4  # samples per prompt (best vs worst form the pair)
    # distinct pairs per training prompt, from its ranked samples: best vs worst, second best vs second worst, …
    # (at most samples // 2). Above 1, the sets are split by prompt: the selection pairs come from the last
    # prompts, the stream from the others, shuffled (seed `pair_seed`)
    pairs_per_prompt: int = 1
    steps: int = 8  # optimiser steps (per domain)
    batch_size: int = 4
    lr: float = 5e-4
    judge_prompts: int = 16  # held-out prompts judged per domain
    judge_samples: int = 1  # judged samples per held-out prompt, for every arm and the reference alike
    # three disjoint sets per domain (issue 12): the training stream; the selection pairs (the last `selection`
    # pairs of the training prompts: they choose the served and best fast module, and hold the continual memory);
    # the report pairs, sampled on the held-out prompts in `report_rounds` rounds and never used for a choice
    selection: int = 16
    report_rounds: int = 1
    memory: int = 4  # continual: selection pairs per domain kept in memory to choose λ
    baseline: Optional[str] = None  # the variant paired differences are taken against (default: `dpo`, else first)
    # further paired differences beside each variant − baseline: [variant, against] pairs (e.g. two COFS searches)
    compare: list[list[str]] = field(default_factory=list)
    lambda_grid: str = "0,0.25,0.5,0.75,1"
    eval_steps: int = 4  # continual: how often the best fast module is looked for
    max_length: int = 160
    max_prompt_length: int = 96
    train: dict = field(default_factory=dict)  # fields set for every variant (a variant's own keys win)
    # in-domain: the steps at which every trained module is judged (judge score, exact KL, report loss), a
    # checkpoint ladder that traces each arm's reward–KL frontier; and the KL budgets (nats) at which the report
    # compares the arms' judge scores, each seed's frontier interpolated
    checkpoints: list[int] = field(default_factory=list)
    kl_budgets: list[float] = field(default_factory=list)
    # a user's pairs instead of a built-in domain's (`ofsdpo compare`): the one domain is this file, split by prompt
    # (`experiment.split_by_prompt`: at least `report_size` report pairs, `selection` selection pairs, the rest the
    # stream); judged samples only with held-out prompts and a judge (`heldout_prompts`, `judge`)
    data: Optional[str] = None
    data_files: dict = field(default_factory=dict)  # continual over the user's pairs: {domain: file}, in order
    report_size: int = 32
    heldout_prompts: Optional[str] = None
    judge: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in EXPERIMENT_KINDS:
            raise ConfigError(f"experiment '{self.name}': kind must be one of {', '.join(EXPERIMENT_KINDS)} "
                              f"(got {self.kind!r}).")
        if self.data is not None:  # the user's pairs: one domain, named after them
            if len(self.domains) != 1 or self.kind != "in-domain":
                raise ConfigError(f"experiment '{self.name}': a data file is one in-domain domain (got {self.domains}).")
        if self.data_files:  # the user's pairs, one file per domain, in stream order
            if list(self.data_files) != list(self.domains) or self.kind != "continual":
                raise ConfigError(f"experiment '{self.name}': data_files are a continual experiment's domains in "
                                  f"order (got {list(self.data_files)} for domains {self.domains}).")
        if not self.domains:  # built-in names are checked by the runner (`domains.require_builtin`)
            raise ConfigError(f"experiment '{self.name}': domains must not be empty.")
        names = [v.get("name") for v in self.variants]
        if not names or None in names or len(set(names)) != len(names):
            raise ConfigError(f"experiment '{self.name}': variants need unique names (got {names}).")
        if not self.seeds:
            raise ConfigError(f"experiment '{self.name}': seeds must not be empty.")
        if self.baseline is not None and self.baseline not in names:
            raise ConfigError(f"experiment '{self.name}': baseline '{self.baseline}' is not a variant ({names}).")
        if not isinstance(self.compare, list):
            raise ConfigError(f"experiment '{self.name}': compare is a list of [variant, against] pairs "
                              f"(got {self.compare!r}).")
        for pair in self.compare:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or pair[0] == pair[1] or set(pair) - set(names):
                raise ConfigError(f"experiment '{self.name}': each compare entry is [variant, against], two different "
                                  f"variants of {names} (got {pair!r}).")
        if self.selection < 1 or self.report_rounds < 1 or self.judge_samples < 1:
            raise ConfigError(f"experiment '{self.name}': selection, report_rounds and judge_samples must be >= 1.")
        if not 1 <= self.pairs_per_prompt <= max(1, self.samples // 2):
            raise ConfigError(f"experiment '{self.name}': pairs_per_prompt must be between 1 and samples // 2 "
                              f"({self.samples // 2}); got {self.pairs_per_prompt}.")
        if sorted(set(self.checkpoints)) != list(self.checkpoints) or any(not 1 <= c <= self.steps
                                                                           for c in self.checkpoints):
            raise ConfigError(f"experiment '{self.name}': checkpoints are increasing steps within 1..{self.steps} "
                              f"(got {self.checkpoints}).")
        if self.checkpoints and self.kind != "in-domain":
            raise ConfigError(f"experiment '{self.name}': checkpoints are for in-domain experiments.")
        if self.kl_budgets and not self.checkpoints:
            raise ConfigError(f"experiment '{self.name}': kl_budgets compare frontiers: give checkpoints too.")
        if self.kind == "continual" and self.memory > self.selection:
            raise ConfigError(f"experiment '{self.name}': memory ({self.memory}) is carved from the selection pairs "
                              f"({self.selection}): raise selection.")
        for variant in self.variants:  # a bad variant fails now, not after an hour of the others
            self.run_config(variant, self.seeds[0], "unused", [f"{d}=unused" for d in self.domains])

    field_names = classmethod(field_names)  # the flags, and the keys its YAML may hold

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ExperimentConfig":
        values = read_config_file(path, cls)
        try:
            return cls(**values)
        except ConfigError as err:  # a value the file holds: say which file
            raise ConfigError(f"{path}: {err}") from None

    def run_config(self, variant: dict, seed: int, output_dir: str | Path, specs: list[str], progress: bool = True,
                   save_steps: int = 0, resume: bool = False):
        """The OFSDPOConfig (in-domain) or ContinualConfig (continual) of one variant and seed. `save_steps` and
        `resume` say how a run is carried out (checkpoints, and continuing an unfinished one); a run key is taken
        at their defaults, so it does not depend on them."""
        common = dict(lr=self.lr, batch_size=self.batch_size, max_length=self.max_length, seed=seed,
                      max_prompt_length=self.max_prompt_length, save_steps=save_steps, device=self.device,
                      output_dir=str(output_dir), overwrite=True, model=self.model, gguf_file=self.gguf_file,
                      progress=progress, resume=resume, **({"save_total_limit": 1} if save_steps > 0 else {}))
        if self.kind == "in-domain":
            values, accepted = dict(common, max_steps=self.steps, regret=True), OFSDPOConfig.field_names()
        else:
            values = dict(common, domain=specs, max_steps_per_domain=self.steps, memory_size=self.memory,
                          judge_prompts=self.judge_prompts, judge_samples=self.judge_samples,
                          lambda_grid=self.lambda_grid, eval_steps=self.eval_steps, regret=False, selection="memory")
            accepted = ContinualConfig.flat_field_names()
        values.update(self.train)
        values.update({k: v for k, v in variant.items() if k != "name"})
        if self.kind == "in-domain" and values.get("method") not in IN_DOMAIN_METHODS:
            raise ConfigError(f"variant '{variant['name']}': in-domain methods are {', '.join(IN_DOMAIN_METHODS)}.")
        unknown = set(values) - set(accepted)
        if unknown:
            raise ConfigError(f"variant '{variant['name']}': unknown field(s) {', '.join(sorted(unknown))}.")
        return OFSDPOConfig(**values) if self.kind == "in-domain" else ContinualConfig.from_flat(**values)

    @property
    def builtin_domains(self) -> bool:
        """Whether the domains are built-in ones (else they name the user's pairs: `data`, `data_files`)."""
        return self.data is None and not self.data_files

    @property
    def baseline_variant(self) -> str:
        names = [v["name"] for v in self.variants]
        return self.baseline or ("dpo" if "dpo" in names else names[0])

    def cells(self) -> list[tuple[str, dict, str | None]]:
        """(cell name, variant, domain): a variant per domain in-domain, a variant over all domains otherwise."""
        if self.kind == "continual":
            return [(v["name"], v, None) for v in self.variants]
        return [(f"{v['name']}/{d}", v, d) for v in self.variants for d in self.domains]


@dataclass
class CompareOptions:
    """`ofsdpo compare`: which methods to compare on the user's pairs, over how many seeds, on which sets."""

    data: Optional[str] = field(default=None, metadata=_help(
        "Your preference pairs (.jsonl/.json/.parquet, TRL's format), split by prompt into a training stream, a "
        "selection set and a report set."))
    domain: list[str] = field(default_factory=list, metadata=_help(
        "The continual form: NAME=PATH, once per domain in stream order (each file split by prompt as --data is); "
        "methods cofs-dpo, dpo, ofs-dpo, dpo-replay, lora-merge, multitask."))
    methods: str = field(default="dpo,ofs-dpo", metadata=_help("Comma-separated methods, each an arm: dpo, ofs-dpo."))
    variant: list[str] = field(default_factory=list, metadata=_help(
        "NAME:--flag=value,--flag=value: one more arm with its own training options (repeatable), e.g. "
        "lr2x:--lr=1e-3; --method=... picks its method (default: the first of --methods)."))
    baseline: Optional[str] = field(default=None, metadata=_help(
        "The arm the others are compared with (default: dpo if it is an arm, else the first)."))
    seeds: int = field(default=5, metadata=_help("Seeds 0..N-1 per arm (initialisation, dropout, judged samples)."))
    report_size: int = field(default=32, metadata=_help(
        "At least this many report pairs (the last prompts' pairs): reported, never used for a choice."))
    selection_size: int = field(default=16, metadata=_help(
        "Selection pairs (the prompts before the report set's): they choose OFS-DPO's served module."))
    prompts: Optional[str] = field(default=None, metadata=_help(
        "Held-out prompts to judge samples on (a file, saved dataset, hub name or builtin:NAME); with --judge. "
        "Without them only the pair metrics are compared."))
    judge: list[str] = field(default_factory=list, metadata=_help(
        "Judge of the samples (as ofsdpo train --judge; repeatable)."))
    judge_prompts: int = field(default=48, metadata=_help("Held-out prompts judged per arm and seed."))
    judge_samples: int = field(default=2, metadata=_help("Samples per judged prompt."))
    max_steps: int = field(default=-1, metadata=_help("Optimiser steps per arm (-1: the whole stream once)."))
    output_dir: str = field(default="compare-output", metadata=_help(
        "Where the runs (each arm's served adapter), compare.json and compare.md go; rerun to resume."))
    status: bool = field(default=False, metadata=_help(
        "Print where each run stands (finished, running, unfinished and what it resumes from, to run) and exit: "
        "nothing runs and the model does not load."))


@dataclass
class CompareConfig(CompareOptions):
    """`ofsdpo compare`: its own options plus the training options every arm runs with."""

    training: TrainingOptions = field(default_factory=TrainingOptions)

    def __post_init__(self) -> None:
        check_field_types(self)
        if bool(self.data) == bool(self.domain):
            raise ConfigError("give --data PAIRS (one stream) or --domain NAME=PATH once per domain (continual), "
                              "not both.")
        if self.domain and self.prompts:
            raise ConfigError("--prompts/--judge: the continual form compares the pair metrics only.")
        if self.seeds < 2:
            raise ConfigError(f"--seeds {self.seeds}: a paired comparison needs at least 2 seeds (5 recommended).")
        if self.report_size < 1 or self.selection_size < 1 or self.judge_prompts < 1 or self.judge_samples < 1:
            raise ConfigError("--report-size, --selection-size, --judge-prompts and --judge-samples must be >= 1.")
        if bool(self.prompts) != bool(self.judge) and not (self.prompts or "").startswith("builtin:"):
            raise ConfigError("--prompts and --judge go together: judged samples need held-out prompts and a judge.")

    @classmethod
    def own_field_names(cls) -> set[str]:
        return field_names(CompareOptions)

    @classmethod
    def field_names(cls) -> set[str]:
        return cls.own_field_names() | TrainingOptions.field_names()

    @classmethod
    def argument_classes(cls) -> tuple[type, ...]:
        return CompareOptions, TrainingOptions

    @classmethod
    def from_parsed(cls, options: CompareOptions, training: TrainingOptions) -> "CompareConfig":
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(CompareOptions)},
                   training=training)


@dataclass
class ExperimentCommandConfig:
    """`ofsdpo experiment FILE`: how to run an experiment's file (the file itself is an ExperimentConfig)."""

    experiment: Optional[str] = field(
        default=None, metadata=_help("The experiment's YAML file (experiments/*.yaml); the first positional argument.")
    )
    seeds: Optional[str] = field(
        default=None, metadata=_help("Comma-separated seeds (default: the file's, else 0,1,2).")
    )
    variants: Optional[str] = field(default=None, metadata=_help(
        "Comma-separated variant names to run, in this order (default: the file's, all). Runs are shared by name, so "
        "processes may split the variants or their order; the aggregate covers what this call ran: rerun whole."))
    output_dir: Optional[str] = field(default=None, metadata=_help("Default: experiments-output/<name>."))
    progress: bool = field(default=True, metadata=_help(
        "Show progress bars.", negative_help="Hide the runs' progress bars (the progress lines are printed anyway)."))
    overwrite: bool = field(default=False, metadata=_help(
        "Remove what an earlier call wrote into --output-dir (runs, splits, aggregate, plots) and run every cell "
        "again, none reused from another experiment's runs (without it, finished cells are kept and reused)."))
    status: bool = field(default=False, metadata=_help(
        "Print where each run stands (finished, running, unfinished and what it resumes from, to run) and exit: "
        "nothing runs and the model does not load."))

    def __post_init__(self) -> None:
        check_field_types(self)
        if not self.experiment:
            raise ConfigError("the experiment's YAML file is required: ofsdpo experiment experiments/NAME.yaml")

    field_names = classmethod(field_names)  # the flags, and the keys its YAML may hold
