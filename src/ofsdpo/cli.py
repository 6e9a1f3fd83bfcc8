"""Command line: `ofsdpo train …` (also `python -m ofsdpo train …`, so `accelerate launch -m ofsdpo` works).

Every flag is a field of a config dataclass (help text included), built by transformers' HfArgumentParser. A YAML
file given with `--config` sets the same fields; flags on the command line override it. Bad input or
configuration, and a run stopped by non-finite losses, exit with status 2 and a one-line error, never a
traceback; Ctrl-C writes a checkpoint of the last whole step and exits with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings

from transformers import HfArgumentParser

from . import __version__
from .config import ConfigError, NonFiniteError, OFSDPOConfig, read_config_file
from .data import DataError
from .models import ModelError

USAGE = """usage: ofsdpo <command> [options]

commands:
  train      DPO or OFS-DPO on a stream of preference pairs (ofsdpo train --help)
  continual  COFS-DPO or a sequential baseline across domains (ofsdpo continual --help)
  generate   judged preference pairs sampled on a built-in domain (ofsdpo generate --help)
  demo       DPO vs OFS-DPO vs COFS-DPO on the embedded model and built-in domains (ofsdpo demo --help)
  eval       the base model and adapters side by side on built-in domains (ofsdpo eval --help)
  experiment one experiment of experiments/*.yaml over seeds, with its aggregate (ofsdpo experiment --help)

ofsdpo {version}: online fast-slow chasing DPO (arXiv 2406.05534) on transformers + peft."""


def parse_config(config_class, argv: list[str], prog: str, description: str, positional: str | None = None):
    """Flags > YAML (--config) > defaults, into one validated dataclass. `positional` names a field that may also
    be given as the first positional argument (`ofsdpo experiment FILE` as well as `--experiment FILE`)."""
    # a config made of several dataclasses (continual: its own options + the training options) parses them together
    classes = config_class.argument_classes() if hasattr(config_class, "argument_classes") else (config_class,)
    parser = HfArgumentParser(classes, prog=prog, description=description)
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
    parsed = parser.parse_args_into_dataclasses(args=argv)
    parsed = parsed[:len(classes)]  # then a namespace of the extra arguments (--config)
    return config_class.from_parsed(*parsed) if hasattr(config_class, "from_parsed") else parsed[0]


def train_command(argv: list[str]) -> int:
    from .trainer import OFSDPOTrainer

    config = parse_config(OFSDPOConfig, argv, "ofsdpo train",
                          "Train a LoRA policy with DPO or OFS-DPO on a stream of preference pairs.")
    summary = OFSDPOTrainer(config=config).train()
    print(json.dumps({k: summary[k] for k in ("method", "steps", "pairs_seen", "served_module", "train_runtime")}))
    print(f"served adapter written to {config.output_dir}")
    return 0


def continual_command(argv: list[str]) -> int:
    from .config import ContinualConfig, refuse_train_only
    from .continual import ContinualRunner, format_table

    refuse_train_only([arg for arg in argv if arg.startswith("--")])  # set per stage: say what to use instead
    config = parse_config(ContinualConfig, _merge_repeated(argv, "--domain"), "ofsdpo continual",
                          "Continual alignment across domains: COFS-DPO or a sequential baseline.")
    report = ContinualRunner(config).run()
    print(format_table(report), end="")
    print(f"report written to {config.output_dir}/report.json; served adapter at {config.output_dir}")
    return 0


def generate_command(argv: list[str]) -> int:
    import torch
    from transformers import set_seed

    from .config import GenerateConfig
    from .domains import get_domain
    from .generation import make_pairs, write_jsonl
    from .models import load_model_and_tokenizer, resolve_device

    config = parse_config(GenerateConfig, argv, "ofsdpo generate",
                          "Sample responses on a built-in domain, judge them, and write best-vs-worst pairs.")
    try:
        domain = get_domain(config.domain)
    except KeyError as err:
        raise ConfigError(f"--domain: {err.args[0]}") from None
    records = domain.prompts(config.split)
    records = records if config.num_prompts == -1 else records[:config.num_prompts]
    device = resolve_device(config.device)
    model, tokenizer, _, _ = load_model_and_tokenizer(config.model, config.gguf_file, config.dtype, device,
                                                      config.trust_remote_code)
    set_seed(config.seed)
    with torch.inference_mode():
        pairs, ties = make_pairs(model, tokenizer, domain, records, config.samples_per_prompt, config.temperature,
                                 config.top_p, config.batch_size, progress=config.progress)
    write_jsonl(pairs, config.out)
    print(json.dumps({"domain": domain.name, "prompts": len(records), "pairs": len(pairs), "ties_skipped": ties,
                      "out": config.out}))
    return 0


def demo_command(argv: list[str]) -> int:
    from .commands.demo import run_demo
    from .config import DemoConfig

    config = parse_config(DemoConfig, argv, "ofsdpo demo", (
        "Sequential DPO, sequential OFS-DPO and COFS-DPO on the embedded model over the built-in domains "
        "sentiment -> critic -> concise, with judge scores after every stage and report.md with plots."))
    run_demo(config.output_dir, config.quick, config.model, config.gguf_file, config.device, config.seed, config.lr)
    return 0


def eval_command(argv: list[str]) -> int:
    from .config import EvalConfig
    from .commands.eval import format_eval_table, run_eval

    argv = _merge_repeated(_merge_repeated(_merge_repeated(argv, "--adapter"), "--domain"), "--data")
    config = parse_config(EvalConfig, argv, "ofsdpo eval",
                          "Held-out DPO loss, preference accuracy, judge score, win rate, KL and response length "
                          "of the base model and each adapter on built-in domains.")
    result = run_eval(config)
    print(format_eval_table(result["rows"]), end="")
    if config.json:
        print(f"results written to {config.json}")
    return 0


def experiment_command(argv: list[str]) -> int:
    from .commands.experiment import run_experiment
    from .config import ExperimentCommandConfig

    config = parse_config(ExperimentCommandConfig, argv, "ofsdpo experiment", (
        "Run one experiment (a YAML file of experiments/) once per seed, then write aggregate.json and "
        "aggregate.md (mean +- std per cell over seeds) with plots. Finished cells are kept: rerun to resume."),
        positional="experiment")
    run_experiment(config.experiment, config.seeds, config.output_dir, config.progress)
    return 0


def _merge_repeated(argv: list[str], flag: str) -> list[str]:
    """`--domain a=x --domain b=y` → `--domain a=x b=y` (argparse keeps only the last of a repeated flag)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
        elif argv[i].startswith(flag + "="):
            values.append(argv[i][len(flag) + 1:])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


COMMANDS = {"train": train_command, "continual": continual_command, "generate": generate_command,
            "demo": demo_command, "eval": eval_command, "experiment": experiment_command}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
        print(f"ofsdpo: unknown command '{argv[0]}'; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except (ConfigError, DataError, ModelError, NonFiniteError) as err:
        print(f"ofsdpo {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # the trainer says where its checkpoint went
        print(f"ofsdpo {argv[0]}: interrupted" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())
