"""Every error ofsdpo raises on purpose, in one module that imports nothing of ofsdpo (any module may import it),
and `suggest`, the one "did you mean" of every message about a misspelt name.

The hierarchy decides the exit status (`cli.main`): a `ConfigError`, and the errors that are one (a prompt, a judge,
a locked or unwritable output folder), a `DataError`, a `ModelError` or a `NonFiniteError` is one line and exit 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def suggest(name: str, choices: Iterable[str], n: int = 1, form: str = "'{}'") -> str:
    """"did you mean X?" for the closest of `choices` to a misspelt `name` (up to `n`, joined by "or"; each written
    with `form`), or "" when none is close. One algorithm for every name a user types: difflib's similarity ratio,
    at least 0.6 (a typo or a dropped letter, not a different word)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f"did you mean {' or '.join(form.format(c) for c in close)}?" if close else ""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag."""


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient (usually a learning rate too high, or a
    model that overflows in its dtype); the run stopped with a checkpoint kept. `what`: which steps, without the
    advice on the checkpoint (a caller that does not resume says its own)."""

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what or message


class ModelError(RuntimeError):
    """The model cannot be found or loaded; the message says what to do."""


class _Located:
    """An error about one row of a source: the message starts with the source, the row and the field."""

    def __init__(self, source: str, message: str, row: int | None = None, field_name: str | None = None):
        where = source
        if row is not None:
            where += f", row {row}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {message}")
        self.source, self.row, self.field = source, row, field_name


class DataError(_Located, ValueError):
    """Bad input data; the message names the file, the row and the field."""


class PromptError(_Located, ConfigError):
    """A bad prompt source or row; the message names the source, the row and the field."""


class JudgeError(ConfigError):
    """A judge failed or returned something other than a finite real number; names the judge, source and row.
    `what`: the failure, without the advice on the checkpoint (a caller that does not resume says its own)."""

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what or message


class OutputDirLocked(ConfigError):
    """Another live run holds the --output-dir; the message names its pid."""


class WriteError(ConfigError):
    """A run's file could not be written (a full disk, a lost mount): one line naming the file, exit 2."""
