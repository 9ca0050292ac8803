"""Atomic file writes: temp file in the same directory, fsync, os.replace, fsync the directory.

A crash at any point leaves either the old file or the new one, never a torn file. Files get the mode every
other file of the process gets (0666 minus the umask), not mkstemp's 0600: on a shared cluster a teammate
with group access must be able to read a run directory (config.yaml, report.md, summary.json, eval JSON,
checkpoint markers). A write that fails (disk full, quota) removes its temp file and raises an OSError that
names the file it was writing.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def named_os_error(e: OSError, path: str | os.PathLike) -> OSError:
    """`e` with `path` as its file name (a failed write, e.g. ENOSPC, carries none): "[Errno 28] No space
    left on device: '<path>'"."""
    if e.filename is not None or e.errno is None:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        # O_EXCL: a fresh file whose mode is 0666 & ~umask (what open() gives every other file)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named_os_error(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
