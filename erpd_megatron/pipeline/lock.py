"""One `erpd` process per run directory: `<run_dir>/.erpd.lock` names its owner (pid, host, start time).

Taken with O_EXCL before any work, removed on exit (also after an exception). A second `erpd run` on the same
run dir is refused with a message naming the owner. A lock left by a process that is gone (SIGKILL, node
crash) is stale: on the same host it is detected (no such pid, or the pid now belongs to a process that
started later) and taken over with a warning; a lock from another host cannot be checked from here, so the
message says how to remove it, except for a requeued Slurm job (same job id, higher SLURM_RESTART_COUNT: the
earlier attempt is over, wherever it ran). Under torchrun the launching process holds the lock for its ranks
(`ERPD_RUN_LOCK` in their environment); when torchrun is called directly, rank 0 takes it.

Races: the lock file never exists half-written (the owner is written to a private temp file, then hard-linked
into place: link fails if the name exists), and the read-decide-remove-create of a stale lock runs under an
flock on the run dir, so of several processes started at one instant exactly one gets the lock
(tests/test_lock.py::test_simultaneous_acquire_has_one_winner). An unreadable lock (written by an older erpd,
or damaged) counts as held while it is younger than `UNREADABLE_GRACE_S`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from erpd_megatron.config import ConfigError

log = logging.getLogger("erpd.lock")

LOCK_NAME = ".erpd.lock"
ENV = "ERPD_RUN_LOCK"
UNREADABLE_GRACE_S = 10.0


class RunDirLocked(ConfigError):
    """Another live process owns the run directory."""


def _start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc; None elsewhere or if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may contain spaces


def _alive(owner: dict) -> bool:
    try:
        pid = int(owner.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    ticks = _start_ticks(pid)
    return ticks is None or owner.get("start_ticks") in (None, ticks)  # a reused pid started later


def _owner_text(owner: dict) -> str:
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("time", 0))))
    except (TypeError, ValueError, OverflowError, OSError):
        since = "?"
    return f"pid {owner.get('pid')} on host {owner.get('host')} (since {since}, `{owner.get('cmd', '?')}`)"


@contextlib.contextmanager
def _dir_flock(root: Path):
    """Exclusive flock on the run dir for the take-over's read-decide-remove-create (released by the kernel
    if the process dies). Where the file system has no flock (some NFS mounts) the block runs without it."""
    fd = os.open(root, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _read_owner(path: Path) -> dict | None:
    """The lock's owner; {} when gone, unreadable and old (stale); None when unreadable but young (held)."""
    try:
        owner = json.loads(path.read_bytes().decode())
        if isinstance(owner, dict):
            return owner
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError):
        pass
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return {}
    return {} if age > UNREADABLE_GRACE_S else None


def _create(path: Path, me: dict) -> bool:
    """Create `path` holding `me`, atomically: it appears complete or not at all. False if it exists."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            os.link(tmp, path)  # fails with FileExistsError if any lock is there
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # no hard links on this file system: O_EXCL, written after creation (read as held while young)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def acquire(run_dir: str | os.PathLike) -> Path:
    """Create the lock (or take over a stale one); RunDirLocked if a live process holds it."""
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
          "start_ticks": _start_ticks(os.getpid()), "cmd": " ".join(sys.argv[:3]),
          "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0")}
    with _dir_flock(root):
        for _ in range(3):
            if _create(path, me):
                return path
            owner = _read_owner(path)
            if owner is None:
                raise RunDirLocked(f"run_dir {root} is being locked by another process ({path} is not readable "
                                   f"yet); if none runs, delete {path}")
            requeued = me["slurm_job"] is not None and owner.get("slurm_job") == me["slurm_job"] \
                and owner.get("slurm_restart") != me["slurm_restart"]
            if owner.get("host") not in (None, me["host"]) and not requeued:
                raise RunDirLocked(f"run_dir {root} is in use by {_owner_text(owner)}; if no erpd process runs "
                                   f"there any more, delete {path}")
            if owner and not requeued and _alive(owner):
                raise RunDirLocked(f"run_dir {root} is in use by {_owner_text(owner)}: wait for it to finish, "
                                   "or use another run_dir")
            log.warning("run_dir %s: removing the stale lock of %s (that process is gone)", root,
                        _owner_text(owner) if owner else "an unknown process")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    raise RunDirLocked(f"run_dir {root}: could not take {path} (another process keeps recreating it)")


def release(path: Path) -> None:
    """Remove the lock if it is still ours."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike):
    """Hold the run dir's lock for the block, unless a parent (torchrun launcher) or another rank holds it."""
    root = Path(run_dir)
    held = os.environ.get(ENV)
    if held == str(root.resolve()) or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    created = not root.exists()
    path = acquire(root)
    os.environ[ENV] = str(root.resolve())  # inherited by torchrun's ranks
    try:
        yield path
    finally:
        os.environ.pop(ENV, None)
        release(path)
        if created:  # refused before writing anything: leave no empty run dir behind
            with contextlib.suppress(OSError):
                root.rmdir()
