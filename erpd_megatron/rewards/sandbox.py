"""Run one sample's tests in a bubblewrap sandbox (Debian `bubblewrap`, the sandbox Flatpak uses).

What a sandboxed run sees and may do (`bwrap_argv` builds it):
- its own user, pid, network, ipc, uts and cgroup namespaces (`--unshare-all`): no network at all (not even
  127.0.0.1, where the trainer's servers listen), no view of any process outside the sandbox, and it cannot
  create further user namespaces (`--disable-userns`);
- a read-only /usr (and the /bin, /lib, ... links into it), /etc/ld.so.cache, the Python that runs the tests,
  a private /proc and a minimal /dev, a read-only /box holding the program and the harness, and a private empty
  tmpfs /tmp (size-capped) as the only writable place. Nothing else of the host exists in it: no run directory,
  checkpoints, home, /etc/shadow, /work, /root;
- `--die-with-parent` (the trainer dying kills it), `--new-session` (no terminal injection); the parent kills the
  whole sandbox (its pid namespace) at the per-sample wall limit;
- when the trainer runs as root, bwrap itself runs as an unprivileged uid of its own per concurrent slot (so the
  RLIMIT_NPROC count is per sandbox, root's files are other people's files, and no capability is held);
- rlimits on every test process (set by the harness before exec): CPU seconds, address space, processes, file
  size, open files, no core files; plus an output cap per test.

The harness (`sandbox_child.py`) gets the test inputs on stdin; expected outputs never enter the sandbox: the
parent compares. Where bwrap cannot start, `Sandbox.check()` raises `SandboxUnavailable` with the reason;
mode "none" (explicit opt-in) runs the same harness in a plain subprocess and warns on every batch.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MODES = ("bwrap", "none")
CHILD_SOURCE = (Path(__file__).parent / "sandbox_child.py").read_text()
# uids of the sandbox slots when we are root: far above any real account, spread by pid so that two trainers
# on one machine do not share RLIMIT_NPROC counts
_UID_BASE = 1_000_000 + (os.getpid() % 50_000) * 64


class SandboxUnavailable(RuntimeError):
    """bwrap cannot run here; the message says why and what to do."""


@dataclass
class SandboxLimits:
    memory_mb: int = 1024
    """RLIMIT_AS of each test process (address space, MiB)."""
    nproc: int = 32
    """RLIMIT_NPROC of each test process: processes + threads the sandbox may add (see Sandbox._nproc)."""
    fsize_mb: int = 16
    """RLIMIT_FSIZE: largest file a test process may write (MiB)."""
    nofile: int = 64
    """RLIMIT_NOFILE: open files per test process."""
    output_bytes: int = 2 << 20
    """stdout cap per test (bytes); past it the test is killed (reason output_limit)."""
    tmp_mb: int = 64
    """Size of the private /tmp tmpfs (MiB)."""


def _system_links() -> list[str]:
    """/bin, /lib, ... : a symlink into /usr on merged-/usr systems (recreated), else a directory (bound)."""
    args: list[str] = []
    for name in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    return args


def bwrap_argv(bwrap: str, python: str, box: str, tmp_mb: int) -> list[str]:
    py_root = os.path.dirname(os.path.dirname(os.path.realpath(python)))  # .../bin/python3 -> ...
    extra = [] if py_root == "/usr" or py_root.startswith("/usr/") else ["--ro-bind", py_root, py_root]
    return [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--ro-bind", "/usr", "/usr", *_system_links(), "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
        *extra, "--proc", "/proc", "--dev", "/dev", "--size", str(tmp_mb << 20), "--tmpfs", "/tmp",
        "--ro-bind", box, "/box", "--chdir", "/tmp", "--hostname", "sandbox", "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
        python, "-I", "-B", "/box/child.py", "harness",
    ]


@dataclass
class RunOutcome:
    results: list[dict] | None
    """Per test, from the harness: status (ok, runtime_error, timeout, memory, output_limit, file_limit, exited,
    bad_value, failed) and stdout / value / detail. None when the whole run failed (see `failure`)."""
    failure: str = ""
    """sample_timeout | sandbox_error, when results is None."""
    detail: str = ""


class Sandbox:
    """Runs harness jobs; one instance per reward, shared by its worker threads (each passes its slot)."""

    def __init__(self, mode: str = "bwrap", python: str = "/usr/bin/python3", limits: SandboxLimits | None = None):
        if mode not in MODES:
            raise ValueError(f"sandbox mode must be one of {MODES}, got {mode!r}")
        self.mode, self.python = mode, python
        self.limits = limits or SandboxLimits()
        self._checked = False

    # ------------------------------------------------------------------ availability
    def check(self) -> None:
        """Raise SandboxUnavailable unless a trivial program runs in the sandbox (cached after success)."""
        if self._checked:
            return
        if not os.path.isfile(self.python):
            raise SandboxUnavailable(f"code reward: the sandbox's Python {self.python} does not exist "
                                     "(install Debian's python3, or set reward.sandbox_python)")
        if self.mode == "bwrap":
            if shutil.which("bwrap") is None:
                raise SandboxUnavailable("code reward: bubblewrap (bwrap) is not installed; `apt-get install "
                                         "bubblewrap` (make setup does it as root), or set reward.sandbox=none to run "
                                         "model-written programs UNSANDBOXED")
            out = self.run({"mode": "stdio", "tests": [{"input": ""}]}, "print('ok')", wall_s=30.0, slot=0)
            ok = out.results is not None and out.results[0].get("stdout", "").strip() == "ok"
            if not ok:
                raise SandboxUnavailable(f"code reward: bubblewrap cannot start a sandbox here ({out.failure}: "
                                         f"{out.detail.strip()[-300:] or out.results}); user namespaces may be "
                                         "disabled (sysctl user.max_user_namespaces / kernel.unprivileged_userns_clone)")
        self._checked = True

    # ------------------------------------------------------------------ one run
    def run(self, job: dict, program: str, wall_s: float, slot: int, timeout_per_test_s: float = 5.0) -> RunOutcome:
        """Run `job` (mode, tests, fn_name / entry_point / setup) against `program` with a wall limit for the whole
        sample. The harness's answer counts only if it carries this run's random nonce."""
        lim = self.limits
        nonce = secrets.token_hex(16)
        cpu_s = int(timeout_per_test_s) + 1
        job = {**job, "nonce": nonce, "timeout_per_test_s": timeout_per_test_s, "output_bytes": lim.output_bytes,
               "sweep": self.mode == "bwrap",
               "limits": {"cpu_s": cpu_s, "memory_mb": lim.memory_mb, "fsize_mb": lim.fsize_mb, "nofile": lim.nofile,
                          "nproc": self._nproc()}}
        box = tempfile.mkdtemp(prefix="erpd-box-", dir="/tmp" if os.path.isdir("/tmp") else None)
        try:
            os.chmod(box, 0o755)  # the slot uid must be able to read it (bwrap binds it read-only)
            for name, text in (("child.py", CHILD_SOURCE), ("prog.py", program)):
                with open(os.path.join(box, name), "w", encoding="utf-8", errors="replace") as f:
                    f.write(text)
                os.chmod(os.path.join(box, name), 0o644)
            kwargs: dict = {}
            if self.mode == "bwrap":
                argv = bwrap_argv(shutil.which("bwrap"), self.python, box, lim.tmp_mb)
                if os.geteuid() == 0:
                    uid = _UID_BASE + slot
                    kwargs = {"user": uid, "group": uid, "extra_groups": []}
            else:
                work = os.path.join(box, "tmp")
                os.mkdir(work)
                job["workdir"] = work
                argv = [self.python, "-I", "-B", os.path.join(box, "child.py"), "harness"]
            return self._communicate(argv, json.dumps(job).encode(), wall_s, nonce, kwargs)
        finally:
            shutil.rmtree(box, ignore_errors=True)

    def _nproc(self) -> int:
        """RLIMIT_NPROC for the test processes. It counts every task of the REAL uid: as root each slot has a uid of
        its own, so the limit is the sandbox's; otherwise the sandbox shares your uid, so the limit is what your
        uid runs now plus `nproc` (the trainer's own rlimit is untouched, only the sandbox's forks are capped)."""
        if os.geteuid() == 0:
            return self.limits.nproc if self.mode == "bwrap" else -1  # root ignores RLIMIT_NPROC anyway
        uid, tasks = os.getuid(), 0
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.stat(f"/proc/{d}").st_uid == uid:
                        tasks += len(os.listdir(f"/proc/{d}/task"))
                except OSError:
                    pass
        return tasks + self.limits.nproc

    def _communicate(self, argv, data: bytes, wall_s: float, nonce: str, kwargs: dict) -> RunOutcome:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True, env=env, cwd="/", **kwargs)
        except OSError as e:
            return RunOutcome(None, "sandbox_error", f"cannot start {argv[0]}: {e}")
        try:
            out, err = proc.communicate(data, timeout=wall_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return RunOutcome(None, "sample_timeout", f"whole sample ran past {wall_s:g} s")
        except BaseException:
            _kill_group(proc)
            proc.communicate()
            raise
        try:
            answer = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
            if not isinstance(answer, dict) or answer.get("nonce") != nonce:
                raise ValueError("nonce")
            results = answer["results"]
            if not isinstance(results, list):
                raise ValueError("results")
        except (ValueError, IndexError, KeyError):
            return RunOutcome(None, "sandbox_error", f"exit {proc.returncode}; {err.decode('utf-8', 'replace')[-500:]}")
        return RunOutcome(results)

    def describe(self) -> dict:
        return {"mode": self.mode, "python": self.python, **asdict(self.limits)}


def _kill_group(proc: subprocess.Popen) -> None:
    """bwrap leads its own session: killing the group kills bwrap; --die-with-parent and the pid namespace take
    everything inside down with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass
