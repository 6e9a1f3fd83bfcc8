"""The floors contract of pyproject.toml ([tool.importlinter], run by `make test` before pytest) holds for the
package, and refuses what it is there to refuse: an import from a higher floor, and a circle inside one floor. Each
case runs `lint-imports` on a copy of src/ofsdpo with one import added (grimp reads the source; nothing is run)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(tmp_path: Path, module: str = "", line: str = "") -> subprocess.CompletedProcess:
    """lint-imports on a copy of the package in which `module` (a file under ofsdpo/) starts with `line`."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "ofsdpo", src / "ofsdpo", ignore=shutil.ignore_patterns("__pycache__"))
    if module:
        path = src / "ofsdpo" / module
        path.write_text(f"{line}\n{path.read_text(encoding='utf-8')}", encoding="utf-8")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # the copy, not the installed package, is what grimp finds first
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([str(LINT), "--no-cache", "--no-logo"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_package_keeps_its_floors(tmp_path):
    done = lint(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    # maths importing the engine: an upward import
    ("losses.py", "from .trainer import OFSDPOTrainer", "ofsdpo.losses -> ofsdpo.trainer"),
    # the engine importing a command
    ("scoring.py", "from .commands.eval import run_eval", "ofsdpo.scoring -> ofsdpo.commands.eval"),
    # two modules of one floor importing each other (data already imports models)
    ("models.py", "from .data import DataStats", "no circles between the modules of a package BROKEN"),
])
def test_an_upward_import_or_a_circle_breaks_the_contract(tmp_path, module, line, broken):
    done = lint(tmp_path, module, line)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    assert broken in done.stdout and "BROKEN" in done.stdout
