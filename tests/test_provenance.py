"""provenance: the stamp a measurement carries (machine, versions, commit, peak memory)."""

import subprocess
from pathlib import Path

import torch

from ofsdpo import provenance
from ofsdpo.commands.demo import wall_clock

ROOT = Path(__file__).resolve().parents[1]


def test_the_commit_is_the_checkouts_and_none_outside_git(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert provenance.git_commit(ROOT).removesuffix("-dirty") == head
    assert provenance.git_commit(tmp_path) is None  # an installed wheel: no commit, its version says what ran


def test_the_commit_is_marked_dirty_when_tracked_files_differ(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = provenance.git_commit(tmp_path)
    assert len(clean) == 40 and not clean.endswith("-dirty")
    (tmp_path / "a.txt").write_text("two\n")
    assert provenance.git_commit(tmp_path) == clean + "-dirty"


def test_the_stamp_names_the_cpu_threads_and_versions():
    stamp = provenance.stamp("cpu")
    assert stamp["device"] == "cpu" and stamp["cpu_model"] in stamp["hardware"]
    assert f"torch threads {torch.get_num_threads()}" in stamp["hardware"]
    assert stamp["versions"]["torch"] == torch.__version__ and stamp["versions"]["peft"]
    before = provenance.peak_rss_mib()
    block = bytearray(64 * 2**20)  # touch 64 MiB: the high-water mark can only grow
    block[::4096] = b"x" * len(block[::4096])
    assert provenance.peak_rss_mib() >= before > 0


def test_wall_clock_reads_as_minutes_and_seconds():
    assert wall_clock(690.4) == "11 min 30 s" and wall_clock(59.6) == "1 min 0 s" and wall_clock(42.2) == "42 s"
