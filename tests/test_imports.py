"""Imports sit at the top of a module (issue 30): an import inside a function hides a circle between two modules
and charges its cost to whichever call comes first. The imports kept inside a function on purpose are listed in
`LAZY` with their reason; `CHECKED` grows until it is every module of src/ (cli.py's lazy commands aside)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ofsdpo"
CHECKED = ["causal_lm.py", "generation.py", "logprobs.py"]
# (file, module imported inside a function): why it is imported only where it is used
LAZY = {
    ("logprobs.py", "deepspeed"): "an optional extra, slow to import; needed only for a head partitioned by ZeRO-3, "
                                  "which exists only once deepspeed is loaded",
}


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


@pytest.mark.parametrize("name", CHECKED)
def test_no_function_level_imports(name):
    found = function_level_imports(SRC / name)
    stray = [f"{name}:{line} imports {module}" for line, module in found if (name, module) not in LAZY]
    assert not stray, f"imports inside functions: {'; '.join(stray)}. Move them to the top of the module (a circle " \
                      "they hid means a helper belongs lower down), or document a deliberate lazy one in LAZY."
    listed = {module for file, module in LAZY if file == name}
    assert listed <= {module for _, module in found}, f"LAZY lists imports {name} no longer makes: {listed}"


def test_the_walk_finds_imports_in_methods_and_nested_functions(tmp_path):
    module = tmp_path / "sample.py"
    module.write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import json\n\n"
                      "class A:\n    import re\n\n    def f(self):\n        from .x import y\n\n"
                      "        def g():\n            import json, csv\n        return g\n\n"
                      "async def h():\n    from .. import z\n")
    assert function_level_imports(module) == [(10, ".x"), (13, "json"), (13, "csv"), (17, "..")]
