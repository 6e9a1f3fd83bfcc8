"""Where a measurement came from: the machine, the installed versions, the commit and the process's peak memory.

A figure quoted in a README or a results page is only worth what its stamp says: the demo and the benchmarks
write this next to every time they report, so the docs can carry the commit and the machine beside the number.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

PACKAGE_ROOT = Path(__file__).resolve().parent


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (machines of one kind differ: quote times with it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: torch.device | str = "cpu") -> str:
    """The accelerator's name on CUDA; else the CPU model, the logical CPUs visible and torch's threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs visible, torch threads {torch.get_num_threads()}"


def versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (importing trl to ask would cost seconds)."""
    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            **{name: installed(name) for name in ("ofsdpo", "transformers", "peft", "trl", "accelerate")}}


def git_commit(where: Path = PACKAGE_ROOT) -> str | None:
    """The commit of the checkout `where` lies in, "-dirty" when tracked files differ from it; None outside git (an
    installed wheel: its version says what ran)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB; the OS keeps one high-water mark per
    process)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stamp(device: torch.device | str = "cpu") -> dict:
    """Everything a reader needs to place a measurement: hardware, device, versions, commit."""
    device = torch.device(device)
    return {"hardware": hardware(device), "cpu_model": cpu_model(), "device": device.type, "versions": versions(),
            "commit": git_commit()}
