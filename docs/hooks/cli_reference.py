"""mkdocs hook: the command-line reference, generated at build time from the commands' parsers (which are built
from the config dataclasses), so it cannot drift from `ofsdpo <command> --help`."""

from __future__ import annotations

import contextlib
import io
import os

MARKER = "<!-- cli-reference -->"


def command_help(command: str) -> str:
    from ofsdpo.cli import main

    out = io.StringIO()
    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal: the same width on every machine
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([command, "--help"])
    return out.getvalue().rstrip()


def reference() -> str:
    from ofsdpo.cli import COMMANDS

    return "\n\n".join(f"### `ofsdpo {name}`\n\n```text\n{command_help(name)}\n```" for name in COMMANDS)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
