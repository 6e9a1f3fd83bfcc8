"""Command line: `ofsdpo train …` (also `python -m ofsdpo train …`, so `accelerate launch -m ofsdpo` works).

Every flag is a field of a config dataclass (help text included), made as transformers' HfArgumentParser makes
them. A YAML file given with `--config` sets the same fields; flags on the command line override it. Bad input or
configuration, and a run stopped by non-finite losses, exit with status 2 and a one-line error, never a
traceback (`--debug` or OFSDPO_DEBUG=1 shows it); Ctrl-C or SIGTERM writes a checkpoint of the last whole step and
exits with status 130 or 143. Imports are lazy: `ofsdpo --help` loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

from . import __version__
from .config import (
    OPTION_TAGS,
    CompareConfig,
    ContinualConfig,
    DemoConfig,
    EvalConfig,
    ExperimentCommandConfig,
    ExportConfig,
    GenerateConfig,
    OFSDPOConfig,
    read_config_file,
    refuse_train_only,
)
from .errors import ConfigError, DataError, ModelError, NonFiniteError, suggest
from .files import write_jsonl

USAGE = """usage: ofsdpo <command> [options]

commands:
  train      DPO or OFS-DPO on a stream of preference pairs (ofsdpo train --help)
  continual  COFS-DPO or a sequential baseline across domains (ofsdpo continual --help)
  generate   judged preference pairs sampled on a built-in domain (ofsdpo generate --help)
  demo       DPO and its baselines vs OFS-DPO and COFS-DPO on the embedded model, built-in domains (ofsdpo demo --help)
  eval       the base model and adapters side by side on built-in domains (ofsdpo eval --help)
  experiment one experiment of experiments/*.yaml over seeds, with its aggregate (ofsdpo experiment --help)
  compare    which method to use on your pairs: arms over seeds, paired intervals, a recommendation
  export     a run's served module merged into its base, saved as a standalone model (ofsdpo export --help)

global options: --debug (or OFSDPO_DEBUG=1) shows the traceback of an error

ofsdpo {version}: online fast-slow chasing DPO (arXiv 2406.05534) on transformers + peft."""

# TRL's (and transformers.TrainingArguments') names of what ofsdpo calls otherwise: refused with the name to use
TRL_NAMES = {
    "learning-rate": "--lr", "per-device-train-batch-size": "--batch-size",
    "per-device-eval-batch-size": "--eval-batch-size", "gradient-accumulation-steps": "--grad-accum",
    "num-train-epochs": "--epochs", "lr-scheduler-type": "--lr-scheduler", "model-name-or-path": "--model",
    "dataset-name": "--data", "dataset-train-split": "--data-split", "dataset-test-split": "--eval-data",
    "torch-dtype": "--dtype", "bf16": "--dtype bfloat16", "fp16": "--dtype float16",
    "resume-from-checkpoint": "--resume-from PATH (or --resume for the newest checkpoint)",
    "lora-target-modules": "--target-modules", "warmup-ratio": "--warmup-steps",
    "save-strategy": "--save-steps", "use-peft": "nothing: ofsdpo always trains LoRA modules",
    "overwrite-output-dir": "--overwrite", "dataloader-num-workers": "nothing: pairs are tokenized once, up front",
}


def _to_bool(text: str) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Repeatable(argparse._ExtendAction):
    """A list option given several times keeps every value (argparse's "extend": `--judge a --judge b` is both),
    and its first use on the command line replaces the default, so flags still override a YAML file's list."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_repeated_seen", set())
        if self.dest not in seen:
            seen.add(self.dest)
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


class DataclassParser(argparse.ArgumentParser):
    """One flag per dataclass field, as transformers' HfArgumentParser makes them (`--max-steps` and `--max_steps`;
    Literal → choices; bool → `--flag [true|false]` and `--no-flag`; list → several values), without importing
    transformers: `ofsdpo <command> --help` stays under 2 s. Errors raise ConfigError: one line through main()."""

    def __init__(self, classes, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.init:
                    self._add_field(f, hints[f.name])

    def _add_field(self, f, hint) -> None:
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        # `negative_help`: the --no-X flag's own help line (default: "Turn --X off.")
        kwargs = {k: v for k, v in f.metadata.items() if k not in OPTION_TAGS and k != "negative_help"}
        if "help" in kwargs:
            kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse %-formats help texts
            shown = f.default if f.default is not dataclasses.MISSING else None
            if shown not in (None, "", False) and "default" not in kwargs["help"].lower():
                kwargs["help"] += f" (default: {shown})".replace("%", "%%")
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X], X | None
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if typing.get_origin(hint) is typing.Literal:
            choices = typing.get_args(hint)
            by_text = {str(c): c for c in choices}
            kwargs.update(choices=choices, type=lambda text: by_text.get(text, text))
        elif hint is bool:
            kwargs.update(type=_to_bool, nargs="?", const=True)
        elif typing.get_origin(hint) is list:
            kwargs.update(type=typing.get_args(hint)[0], nargs="+", action=_Repeatable)
        else:
            kwargs["type"] = hint
        self.add_argument(*names, **kwargs)
        if hint is bool and default is True:
            self.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                              dest=f.name, help=f.metadata.get("negative_help",
                                                               f"Turn --{f.name.replace('_', '-')} off."))

    def parse_args_into_dataclasses(self, args: list[str]) -> tuple[list, list[str]]:
        """(one instance per class, the arguments not recognised)."""
        namespace, extra = self.parse_known_args(args)
        values = vars(namespace)
        values.pop("_repeated_seen", None)
        return [cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls) if f.init})
                for cls in self.classes], extra

    def error(self, message):
        raise ConfigError(re.sub(r"(--[\w-]+)/--\w+", r"\1", message))  # "--max-steps", not "--max-steps/--max_steps"


def _unknown_option(parser, extra: list[str]) -> ConfigError:
    """What the first unrecognised argument should have been: TRL's name mapped, else the closest flags."""
    first = extra[0]
    if not first.startswith("-"):
        return ConfigError(f"unexpected argument {first!r}")
    flag = first.split("=", 1)[0]
    name = flag.lstrip("-").replace("_", "-")
    if name in TRL_NAMES:
        return ConfigError(f"unknown option {flag} (TRL's name); ofsdpo uses {TRL_NAMES[name]}")
    options = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--") and "_" not in o})
    hint = suggest("--" + name, options, n=3, form="{}") or f"see {parser.prog} --help"
    return ConfigError(f"unknown option {flag}; {hint}")


def parse_config(config_class, argv: list[str], prog: str, description: str, positional: str | None = None):
    """Flags > YAML (--config) > defaults, into one validated dataclass. `positional` names a field that may also
    be given as the first positional argument (`ofsdpo experiment FILE` as well as `--experiment FILE`)."""
    # a config made of several dataclasses (continual: its own options + the training options) parses them together
    classes = config_class.argument_classes() if hasattr(config_class, "argument_classes") else (config_class,)
    parser = DataclassParser(classes, prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file with the same fields; flags override it.")
    for action in parser._actions:  # show --max-steps, not --max_steps (both work)
        action.option_strings.sort(key=lambda option: "_" in option)
    if positional is not None:
        field = next(f for f in dataclasses.fields(config_class) if f.name == positional)
        for action in parser._actions:
            if action.dest == positional:
                action.help = argparse.SUPPRESS  # the flag still works; the help shows the positional form
        parser.add_argument(positional, nargs="?", default=argparse.SUPPRESS, help=field.metadata.get("help"))
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config_file(known.config, config_class))
    parsed, extra = parser.parse_args_into_dataclasses(argv)
    if extra:
        raise _unknown_option(parser, extra)
    return config_class.from_parsed(*parsed) if hasattr(config_class, "from_parsed") else parsed[0]


def train_command(argv: list[str]) -> int:
    config = parse_config(OFSDPOConfig, argv, "ofsdpo train",
                          "Train a LoRA policy with DPO or OFS-DPO on a stream of preference pairs.")
    from .trainer import (
        OFSDPOTrainer,  # after parsing: `--help` and bad flags need no torch
    )

    result = OFSDPOTrainer(config=config).train()
    print(json.dumps({k: result.summary[k] for k in ("method", "steps", "pairs_seen", "served_module",
                                                     "train_runtime")}))
    print(f"served adapter written to {result.output_dir}")
    return 0


def continual_command(argv: list[str]) -> int:
    refuse_train_only([arg for arg in argv if arg.startswith("--")])  # set per stage: say what to use instead
    config = parse_config(ContinualConfig, argv, "ofsdpo continual",
                          "Continual alignment across domains: COFS-DPO or a sequential baseline.")
    from .continual import ContinualRunner, format_table

    report = ContinualRunner(config).run()
    print(format_table(report), end="")
    print(f"report written to {config.output_dir}/report.json; served adapter at {config.output_dir}")
    return 0


def generate_command(argv: list[str]) -> int:
    config = parse_config(GenerateConfig, argv, "ofsdpo generate",
                          "Sample responses on a built-in domain, judge them, and write best-vs-worst pairs.")
    from .domains import get_domain

    try:
        domain = get_domain(config.domain)
    except KeyError as err:
        raise ConfigError(f"--domain: {err.args[0]}") from None
    if config.max_new_tokens:
        domain = dataclasses.replace(domain, max_new_tokens=config.max_new_tokens)
    _check_out_file(config.out, config.overwrite)
    if config.adapter is not None and not (Path(config.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {config.adapter}: not a peft adapter folder (no adapter_config.json).")
    import torch
    from transformers import set_seed

    from .rounds import RoundSettings, judged_pairs
    from .models import (
        check_adapter,
        load_model_and_tokenizer,
        meta_model,
        resolve_device,
        resolve_model_name,
        set_num_threads,
    )

    records = domain.prompts(config.split)
    records = records if config.num_prompts == -1 else records[:config.num_prompts]
    device = resolve_device(config.device)
    set_num_threads(config.num_threads)
    if config.adapter is not None:  # before the load: an adapter of another base is a one-line error
        check_adapter(config.adapter, meta_model(*resolve_model_name(config.model, config.gguf_file),
                                                 config.trust_remote_code))
    model, tokenizer, _, _ = load_model_and_tokenizer(config.model, config.gguf_file, config.dtype, device,
                                                      config.trust_remote_code)
    if config.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, config.adapter)
    set_seed(config.seed)
    with torch.inference_mode():
        settings = RoundSettings(config.samples_per_prompt, 0, config.temperature, config.top_p,
                                 batch_size=config.batch_size * config.samples_per_prompt)
        pairs, stats = judged_pairs(model, tokenizer, domain, records, settings, progress=config.progress)
        ties = stats.ties
    write_jsonl(config.out, pairs)
    print(json.dumps({"domain": domain.name, "prompts": len(records), "pairs": len(pairs), "ties_skipped": ties,
                      "out": config.out}))
    return 0


def _check_out_file(out: str, overwrite: bool) -> None:
    """An output file is replaced only when asked, and its folder must be writable: both before any model loads."""
    from .rundir import check_writable

    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a .jsonl file.")
    if path.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out.")
    try:
        check_writable(path.parent)
    except ConfigError:
        raise ConfigError(f"--out {out}: its folder is not writable.") from None


def demo_command(argv: list[str]) -> int:
    config = parse_config(DemoConfig, argv, "ofsdpo demo", (
        "Sequential DPO, dpo-replay, multitask, sequential OFS-DPO and COFS-DPO on the embedded model over the "
        "built-in domains sentiment -> critic -> concise, with judge scores after every stage, the reward-KL "
        "frontier on sentiment and report.md with plots."))
    from .commands.demo import run_demo
    from .models import resolve_device

    resolve_device(config.device)  # a GPU the machine lacks: one line before anything loads
    run_demo(config.output_dir, config.quick, config.model, config.gguf_file, config.device, config.seed, config.lr)
    return 0


def eval_command(argv: list[str]) -> int:
    config = parse_config(EvalConfig, argv, "ofsdpo eval",
                          "Held-out DPO loss, preference accuracy, judge score, win rate, KL and response length "
                          "of the base model and each adapter on built-in domains.")
    from .commands.eval import format_eval_table, run_eval
    from .models import check_adapter, meta_model, resolve_device, resolve_model_name

    resolve_device(config.device)  # a GPU the machine lacks, an adapter of another base: before the model loads
    if config.adapter:
        base = meta_model(*resolve_model_name(config.model, config.gguf_file), config.trust_remote_code)
        for adapter in config.adapter:
            check_adapter(adapter, base)
    result = run_eval(config)
    print(format_eval_table(result["rows"]), end="")
    if config.json:
        print(f"results written to {config.json}")
    return 0


def experiment_command(argv: list[str]) -> int:
    config = parse_config(ExperimentCommandConfig, argv, "ofsdpo experiment", (
        "Run one experiment (a YAML file of experiments/) once per seed, then write aggregate.json and "
        "aggregate.md (mean +- std per cell over seeds) with plots. Finished cells are kept: rerun to resume."),
        positional="experiment")
    from .commands.experiment import run_experiment

    run_experiment(config.experiment, config.seeds, config.output_dir, config.progress, config.variants,
                   config.overwrite, config.status)
    return 0


def compare_command(argv: list[str]) -> int:
    config = parse_config(CompareConfig, argv, "ofsdpo compare", (
        "Compare methods on your preference pairs: each arm trains on the same stream over seeds; report-set "
        "metrics (and judged samples with --prompts/--judge) paired per seed, with intervals, verdicts and one "
        "recommendation. Any training option applies to every arm."))
    from .commands.compare import run_compare
    from .models import resolve_device

    if not config.status:  # --status reads the folder only: it runs anywhere, whatever --device names
        resolve_device(config.training.device)
    result = run_compare(config)
    if config.status:
        from .commands.experiment import format_status

        print(format_status(result["status"]), end="")
        return 0
    from .commands.experiment_report import paired_line

    print("| arm − baseline | domain | metric | mean diff | 95 % CI (t) | 95 % CI (crossed bootstrap) | decided by | "
          "p Holm | n | MDE | arm (mean ± sd) | baseline (mean ± sd) | reading |")
    print("\n".join(paired_line(row) for row in result["paired"]))
    print("\n".join(result["recommendation"]))
    print(f"compare.md and compare.json written to {config.output_dir}")
    return 0


def export_command(argv: list[str]) -> int:
    config = parse_config(ExportConfig, argv, "ofsdpo export", (
        "Merge a run's served module into its base model and save a standalone transformers model (safetensors, "
        "config, tokenizer, chat template) for servers that take a plain model."), positional="run")
    from .commands.export import export

    print(f"merged model written to {export(config)}")
    return 0


COMMANDS = {"train": train_command, "continual": continual_command, "generate": generate_command,
            "demo": demo_command, "eval": eval_command, "experiment": experiment_command, "compare": compare_command,
            "export": export_command}


def _debug(argv: list[str]) -> tuple[list[str], bool]:
    debug = os.environ.get("OFSDPO_DEBUG", "").lower() not in ("", "0", "false", "no")
    return [a for a in argv if a != "--debug"], debug or "--debug" in argv


def _one_line(err: BaseException) -> tuple[str, int]:
    """The message and exit status of an error that reached main()."""
    if isinstance(err, (ConfigError, DataError, ModelError, NonFiniteError)):
        return str(err), 2
    text = " ".join(str(err).split())[:500]
    if type(err).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return (f"out of memory ({text[:200]}); lower --batch-size (raise --grad-accum to keep the step), "
                "--max-length or --logprob-chunk-size, or pass --gradient-checkpointing"), 2
    if "size mismatch" in text:  # peft loading an adapter onto a base of other shapes
        return (f"an adapter does not fit --model, it was trained on another base model ({text[:300]}); pass the "
                "--model it was trained on"), 2
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or text}", 2
    return f"{type(err).__name__}: {text} (run with --debug for the traceback)", 2


def main(argv: list[str] | None = None) -> int:
    argv, debug = _debug(list(sys.argv[1:] if argv is None else argv))
    # a deprecation inside peft's calls into transformers, not ours to act on: keep the progress output readable
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(version=__version__))
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        hint = suggest(argv[0], COMMANDS)
        print(f"ofsdpo: unknown command '{argv[0]}'; {hint + ' ' if hint else ''}commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except KeyboardInterrupt as err:  # the trainer says where its checkpoint went (RunInterrupted)
        reason = getattr(err, "reason", "interrupted")
        print(f"ofsdpo {argv[0]}: {reason}" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except Exception as err:  # the promise: one line, never a traceback (unless asked for)
        if debug:
            raise
        message, code = _one_line(err)
        print(f"ofsdpo {argv[0]}: error: {message}", file=sys.stderr)
        return code


def entry_point() -> None:
    """The `ofsdpo` console script. It finds a judge module (`--judge mymodule:fn`) in the current directory as
    `python -m ofsdpo` does: Python puts the current directory first on sys.path for `-m`, not for a script."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    sys.exit(main())
