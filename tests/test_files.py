"""Atomic writes: the target holds the old bytes or the new ones, whatever happens in between."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ofsdpo import files


def test_write_atomic_writes_text_and_bytes_and_creates_the_folder(tmp_path):
    path = tmp_path / "a" / "b" / "f.txt"
    assert files.write_atomic(path, "héllo\n") == path
    assert path.read_bytes() == "héllo\n".encode("utf-8")
    files.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["f.txt"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the permissions of a plain open()


def test_write_json_and_jsonl_format(tmp_path):
    obj = {"b": [1, 2.5], "a": {"c": None}}
    files.write_json(tmp_path / "o.json", obj)
    assert (tmp_path / "o.json").read_text() == json.dumps(obj, indent=1)
    rows = [{"x": 1}, {"y": "z"}]
    files.write_jsonl(tmp_path / "r.jsonl", rows)
    assert (tmp_path / "r.jsonl").read_text() == '{"x": 1}\n{"y": "z"}\n'


def test_a_failure_mid_write_leaves_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old")
    real_fdopen = os.fdopen

    class HalfWriter:
        """Writes half the bytes, then the disk is full."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[:len(data) // 2])
            self.handle.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space"):
        files.write_atomic(path, "new content, longer than the old")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # the half-written temporary file is gone too


def test_a_killed_process_leaves_the_old_content(tmp_path):
    """SIGKILL after the new bytes are written but before the rename: no cleanup runs, the target is intact."""
    path = tmp_path / "state.json"
    path.write_text("old")
    script = textwrap.dedent(f"""
        import os, signal
        from ofsdpo import files
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        files.write_atomic({str(path)!r}, "new")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert path.read_text() == "old"
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(files.TMP_SUFFIX)
    assert leftovers[0].read_text() == "new"  # the finished new bytes, never under the target's name


def test_read_json_reads_what_write_json_wrote_and_names_a_damaged_file(tmp_path):
    from ofsdpo.errors import ConfigError

    files.write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert files.read_json(tmp_path / "a.json", "unused") == {"x": [1, 2]}
    (tmp_path / "b.json").write_text('{"x": [1, 2')  # cut short
    with pytest.raises(ConfigError, match=r"cannot read .*b\.json \(JSONDecodeError: .*\); remove it\.$"):
        files.read_json(tmp_path / "b.json", "remove it.")
    with pytest.raises(ConfigError, match=r"cannot read .*c\.json \(FileNotFoundError"):
        files.read_json(tmp_path / "c.json", "remove it.")
