"""What every config class shares: the help and type check of a field, the model fields, reading a YAML file and
comparing two saved configs. Nothing here knows a command."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError, suggest


# --- what an option changes ------------------------------------------------------------------------------------------
# Each field of a run's config says what it changes, where it is declared (`_help(..., role=...)`); resume checks,
# reuse keys and run keys read these tags (`option_roles`), and nothing keeps a second list.
COMPUTED = "computed"  # what the run computes: the data, the maths, the numbers (the default: a new option counts)
RUNTIME = "runtime"  # how it runs: device, threads, memory; the same maths, though the last bits may differ
CADENCE = "cadence"  # when it saves: checkpoints, never what they hold
OUTPUT = "output"  # where and how it reports: the folder, progress bars, loggers, resuming or overwriting
ROLES = (COMPUTED, RUNTIME, CADENCE, OUTPUT)
# the metadata keys that tag a field rather than go to argparse: its role, and `weights_only` (a continual option that
# changes only the modules a stage trains or combines, which a score's key holds itself: `continual._scoring_parts`)
OPTION_TAGS = frozenset({"role", "weights_only"})


def _help(text: str, role: str = COMPUTED, **extra: Any) -> dict:
    """A field's metadata: its help line (the CLI's and the docs') and its role (above)."""
    if role not in ROLES:
        raise ValueError(f"unknown option role {role!r}: one of {', '.join(ROLES)}")
    return {"help": text, "role": role, **extra}


def option_roles(*config_classes: type) -> dict[str, str]:
    """{option: role} over the flat options of these config classes (one that contains others, as ContinualConfig
    contains TrainingOptions, through its `argument_classes`); a field declared without `_help` computes."""
    roles = {}
    for config_class in config_classes:
        parts = config_class.argument_classes() if hasattr(config_class, "argument_classes") else (config_class,)
        for part in parts:
            roles.update({f.name: f.metadata.get("role", COMPUTED) for f in dataclasses.fields(part)})
    return roles


def options_with_role(config_classes: tuple[type, ...], *roles: str) -> frozenset[str]:
    """The options of these config classes whose role is one of `roles`."""
    return frozenset(name for name, role in option_roles(*config_classes).items() if role in roles)


def _describe_mismatch(value: Any, hint: Any) -> str | None:
    """What `value` should have been to fit the annotation `hint`, or None when it fits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _describe_mismatch(value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        return None if value in args else "one of " + ", ".join(map(str, args))
    if origin is list:
        ok = isinstance(value, list) and all(_describe_mismatch(v, args[0]) is None for v in value)
        return None if ok else f"a list of {args[0].__name__}"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None if isinstance(value, hint) else f"a {hint.__name__}"


def check_field_types(config: Any) -> None:
    """Every field against its annotation. A YAML file bypasses argparse's types and choices (`method: foo`
    would otherwise train something else), and the Python API has none; this check catches both, naming the flag.
    An integer given for a float field (`beta: 1`) becomes a float."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = _describe_mismatch(value, hints[f.name])
        if expected is not None:
            raise ConfigError(f"--{f.name.replace('_', '-')} must be {expected} (got {value!r}).")
        if hints[f.name] is float:
            setattr(config, f.name, float(value))


def field_names(config_class: type) -> set[str]:
    """The names of a config dataclass's fields: the flags it accepts, the keys its YAML file may hold."""
    return {f.name for f in dataclasses.fields(config_class)}


class ModelOptions:
    """The model fields of every command that loads one (train, continual, generate, eval, demo), each defined once
    with one help text: a command declares `model: Optional[str] = ModelOptions.model()`, in its own field order."""

    @staticmethod
    def model() -> Any:
        return field(default=None, metadata=_help(
            "Hub name or local path of the causal LM. Default: the embedded SmolLM2-135M-Instruct GGUF."))

    @staticmethod
    def gguf_file() -> Any:
        return field(default=None, metadata=_help(
            "GGUF file inside --model (a folder or hub repo), loaded through transformers."))

    @staticmethod
    def trust_remote_code() -> Any:
        return field(default=False, metadata=_help("Run model code shipped with the checkpoint. Off unless you trust "
                                                   "it."))

    @staticmethod
    def device() -> Any:
        return field(default="auto", metadata=_help("auto (a GPU when there is one) | cpu | cuda | cuda:N | mps.",
                                                    role=RUNTIME))

    @staticmethod
    def dtype() -> Any:
        return field(default="auto", metadata=_help(
            "Weights dtype of the frozen base. auto: bfloat16 on a GPU that supports it, else float32."))


DTYPES = Literal["auto", "float32", "bfloat16", "float16"]


def changed_options(saved: dict[str, Any], now: dict[str, Any], may_change: set[str]) -> list[str]:
    """The flags (as `--name`) whose saved and current values differ, but for those in `may_change`."""
    keys = sorted(k for k in set(saved) | set(now) if k not in may_change and saved.get(k) != now.get(k))
    return [f"--{k.replace('_', '-')} ({saved.get(k)!r} -> {now.get(k)!r})" for k in keys]


def read_config_file(path: str | Path, config_class: type) -> dict[str, Any]:
    """Read a YAML config into a dict of field values; unknown keys are an error naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:  # one line: where, and what the parser expected
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"--config {path}: not valid YAML{where}: {what}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values.")
    if hasattr(config_class, "translate_yaml"):
        raw = config_class.translate_yaml(dict(raw))
    known = config_class.field_names()
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            hint = suggest(name, sorted(known), n=3)
            raise ConfigError(f"--config {path}: unknown key '{key}'" + (f"; {hint}" if hint else "."))
        values[name] = value
    if "judge" in values:  # a judge file named in the YAML is found beside the YAML, wherever the run starts
        values["judge"] = _judges_beside(values["judge"], path.parent)
    return values


def _judges_beside(specs, folder: Path):
    """Judge specs `path/to/file.py:function[:weight]` with a relative path that exists under `folder` (the YAML's),
    made absolute; every other spec as it is."""
    def resolve(spec):
        if not isinstance(spec, str):
            return spec
        file, sep, rest = spec.partition(".py:")
        if not sep or Path(file + ".py").is_absolute() or not (folder / (file + ".py")).is_file():
            return spec
        return f"{(folder / (file + '.py')).resolve()}:{rest}"
    return [resolve(s) for s in specs] if isinstance(specs, list) else resolve(specs)


def write_yaml(values: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
