"""Imports sit at the top of a module (issue 30): an import inside a function hides a circle between two modules
and charges its cost to whichever call comes first. Every module of src/ofsdpo is walked; the imports kept inside a
function on purpose are listed in `LAZY` with their reason, and those of files another change in flight owns, in
`PENDING` until it lands."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ofsdpo"
MODULES = sorted(path.relative_to(SRC).as_posix() for path in SRC.rglob("*.py"))

_HELP = ("the lazy CLI: `ofsdpo --help` and a bad flag load neither torch nor transformers (tests/test_cli.py, "
         "bench/cli_help.py); a command's modules load once its flags have parsed")
_FSDP = ("FSDP2's API, loaded only when a launch shards the model: DTensor is public from torch 2.5 and fully_shard "
         "takes ignored_params from 2.7 (the package allows 2.2; an older torch is a one-line ConfigError there)")
_DEEPSPEED = "an optional extra (ZeRO-3 launches only), slow to import; its absence is a one-line ConfigError"
_MATPLOTLIB = "plots are drawn only by report writers; matplotlib (and its backend choice) loads on the first plot"
# (file, module imported inside a function): why it is imported only where it is used
LAZY = {
    **{("cli.py", module): _HELP for module in (
        ".trainer", ".continual", ".domains", "torch", "transformers", ".rounds", ".models", "peft", ".rundir",
        ".commands.demo", ".commands.eval", ".commands.experiment", ".commands.compare",
        ".commands.experiment_report", ".commands.export")},
    ("data.py", "jinja2"): "not a dependency of ofsdpo or transformers: only a chat template needs it, so only "
                           "conversational rows do",
    ("distributed.py", "torch.distributed.tensor"): _FSDP,
    ("distributed.py", "torch.distributed.device_mesh"): _FSDP,
    ("distributed.py", "torch.distributed.fsdp"): _FSDP,
    ("distributed.py", "deepspeed"): _DEEPSPEED,
    ("logprobs.py", "deepspeed"): "an optional extra, slow to import; needed only for a head partitioned by ZeRO-3, "
                                  "which exists only once deepspeed is loaded",
    ("metrics.py", "torch.utils.tensorboard"): "the tensorboard extra, only with --report-to tensorboard",
    ("metrics.py", "wandb"): "the wandb extra, only with --report-to wandb",
    ("plotting.py", "matplotlib"): _MATPLOTLIB,
    ("plotting.py", "matplotlib.pyplot"): _MATPLOTLIB,
    ("plotting.py", "matplotlib.ticker"): _MATPLOTLIB,
    ("plotting.py", "cycler"): _MATPLOTLIB,  # matplotlib's own dependency, set as the colour cycle with it
}
# owned by another change in flight; remove when it lands (each file's imports move to the top there)
PENDING: set = set()  # none in flight


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function of `path`: methods, nested functions and lambdas included;
    a relative import's module keeps its leading dots."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, "." * child.level + (child.module or "")))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
    return found


@pytest.mark.parametrize("name", MODULES)
def test_no_function_level_imports(name):
    found = function_level_imports(SRC / name)
    stray = [f"{name}:{line} imports {module}" for line, module in found
             if (name, module) not in LAZY and (name, module) not in PENDING]
    assert not stray, f"imports inside functions: {'; '.join(stray)}. Move them to the top of the module (a circle " \
                      "they hid means a helper belongs lower down), or document a deliberate lazy one in LAZY."
    for allowed, what in ((LAZY, "LAZY"), (PENDING, "PENDING")):
        listed = {module for file, module in allowed if file == name}
        assert listed <= {module for _, module in found}, \
            f"{what} lists imports {name} no longer makes: {sorted(listed - {module for _, module in found})}"


def test_every_allowed_import_names_a_module_of_the_package():
    """An entry whose file has gone (moved into a package, say) would allow nothing and hide nothing: it goes too."""
    assert {file for file, _ in LAZY} | {file for file, _ in PENDING} <= set(MODULES)
    assert not set(LAZY) & PENDING and all(reason.strip() for reason in LAZY.values())


def test_the_walk_finds_imports_in_methods_and_nested_functions(tmp_path):
    module = tmp_path / "sample.py"
    module.write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import json\n\n"
                      "class A:\n    import re\n\n    def f(self):\n        from .x import y\n\n"
                      "        def g():\n            import json, csv\n        return g\n\n"
                      "async def h():\n    from .. import z\n")
    assert function_level_imports(module) == [(10, ".x"), (13, "json"), (13, "csv"), (17, "..")]
