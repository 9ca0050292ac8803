"""Atomic file writes: temp file in the same directory, fsync, os.replace, fsync the directory.

A crash at any point leaves either the old file or the new one, never a torn file. Files get the mode every
other file of the process gets (0666 minus the umask), not mkstemp's 0600: on a shared cluster a teammate
with group access must be able to read a run directory (config.yaml, report.md, summary.json, eval JSON,
checkpoint markers). A write that fails (disk full, quota) removes its temp file and raises an OSError that
names the file it was writing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path


def named_os_error(e: OSError, path: str | os.PathLike) -> OSError:
    """`e` with `path` as its file name (a failed write, e.g. ENOSPC, carries none): "[Errno 28] No space
    left on device: '<path>'"."""
    if e.filename is not None or e.errno is None:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))


_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(e: BaseException, path: str | os.PathLike, need_bytes: int = 0, doing: str = "writing"
                    ) -> OSError | None:
    """The one-line OSError to raise when the failed write `e` under `path` ran out of space, else None.

    Found from an ENOSPC / EDQUOT OSError in `e`'s cause chain, or, for writers that drop the errno (torch's
    zip writer raises "RuntimeError: [enforce fail at inline_container.cc] unexpected pos ..."), from the free
    space at `path` being below `need_bytes` (measured after the partial output was removed)."""
    seen, c = 0, e
    while c is not None and seen < 20:
        if isinstance(c, OSError) and c.errno in _FULL:
            break
        c, seen = c.__cause__ or c.__context__, seen + 1
    try:
        free = shutil.disk_usage(_existing_parent(Path(path))).free
    except OSError:
        free = None
    if not (isinstance(c, OSError) and c.errno in _FULL) and not (free is not None and free < need_bytes):
        return None
    code = c.errno if isinstance(c, OSError) else errno.ENOSPC
    what = f"{doing} needs ~{need_bytes / 2**20:.1f} MiB, " if need_bytes else f"{doing}: "
    room = f"{free / 2**20:.1f} MiB free there" if free is not None else "free space unknown"
    return OSError(code, f"{os.strerror(code)} ({what}{room})", str(path))


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def umask() -> int:
    """The process umask (Linux: read from /proc, elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file written by a library that picks its own mode (safetensors writes 0600) or copied with its
    source's mode the mode open() gives new files: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~umask())


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the bytes (not the mode: shutil.copy2 would carry a 0600 cache file's mode into a shared run dir)."""
    shutil.copyfile(src, dst)
    follow_umask(dst)


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
