"""Writing files so that a crash (an exception, SIGKILL, a power cut) leaves either the old file or the new one,
never a half-written one: the bytes go to a temporary file in the same folder, are flushed to disk, and the file is
renamed over the target (`os.replace`, atomic on POSIX and Windows within one file system)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError

TMP_SUFFIX = ".tmp"


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text is UTF-8) to `path`, creating its folder; the target is replaced only once the new bytes
    are on disk. The file gets the usual permissions (0666 less the umask), as with a plain `open`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: the old file stays, the temporary one goes
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)
    return path


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """`json.dumps(obj, indent=indent)`, atomically (no trailing newline, as the files always had)."""
    return write_atomic(path, json.dumps(obj, indent=indent))


def read_json(path: str | Path, remedy: str) -> Any:
    """A JSON file this package wrote. One it cannot read (edited by hand, or damaged on disk) is a one-line
    `ConfigError` naming the file and what to do (`remedy`), not a traceback."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"cannot read {path} ({type(err).__name__}: {err}); {remedy}") from None


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line, atomically."""
    return write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def flush_to_disk(folder: str | Path) -> None:
    """fsync the files directly inside `folder`, then the folder itself (so that a rename of the folder that comes
    after cannot reach the disk before its data)."""
    folder = Path(folder)
    for path in folder.iterdir():
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """The rename itself made durable; folders cannot be opened for fsync everywhere (Windows), which is harmless."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
