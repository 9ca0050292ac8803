"""Hostile programs in the real bubblewrap sandbox: each ends with reward 0, a counted reason, the trainer untouched.

One batch holds every hostile program (the pool runs them two at a time, short limits), so the file takes seconds.
"Untouched" is checked from outside afterwards: sentinel files in the run dir and in /tmp are unchanged, nothing
was created under /usr, a listener on 127.0.0.1 saw no connection, this process is alive, and no process of a
sandbox uid is left on the host. Skipped without bwrap, except under CI (ERPD_REQUIRE_BWRAP=1), where it fails.
"""

import json
import logging
import os
import shutil
import socket
import threading
import time

import pytest

from erpd_megatron.rewards.code import CodeReward
from erpd_megatron.rewards.code_tests import parse_tests
from erpd_megatron.rewards.sandbox import _UID_BASE, Sandbox, SandboxLimits, SandboxUnavailable


def _need_bwrap():
    if shutil.which("bwrap") and os.path.isfile("/usr/bin/python3"):
        return
    if os.environ.get("ERPD_REQUIRE_BWRAP") == "1":
        pytest.fail("ERPD_REQUIRE_BWRAP=1 but bubblewrap or /usr/bin/python3 is missing")
    pytest.skip("bubblewrap or /usr/bin/python3 missing")


def fence(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


STDIO = parse_tests({"input_output": {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}})
ASSERT = parse_tests({"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(5, 7) == 12\n",
                      "entry_point": "add"})
ABS_ASSERT = parse_tests({"test": "def check(candidate):\n    assert abs(candidate(1.0, 2.0) - 3.0) < 1e-9\n",
                          "entry_point": "add"})
CALL = parse_tests({"input_output": {"inputs": [[1, 2], [5, 7]], "outputs": [3, 12], "fn_name": "add"}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Host-side things a hostile program would like to reach."""
    _need_bwrap()
    run = tmp_path_factory.mktemp("run_dir")
    secret = run / "checkpoint.pt"
    secret.write_text("trainer secret")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                hits.append(listener.accept())
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield {"secret": secret, "port": listener.getsockname()[1], "hits": hits}
    stop.set()
    t.join(2)
    listener.close()


def hostile_cases(w):
    s, port, me = str(w["secret"]), w["port"], os.getpid()
    return {
        # name: (program, task, reasons accepted)
        "infinite_loop": ("while True:\n    pass", STDIO, {"timeout"}),
        "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                      STDIO, {"timeout"}),
        "alloc_10GB": ("x = bytearray(10 * 1024**3)\nprint(3)", STDIO, {"memory"}),
        "write_outside_tmp": (f"import os\nfor p in ['/usr/lib/erpd_evil', '/box/prog.py', '/etc/erpd_evil', {s!r}]:\n"
                              "    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n"
                              f"os.remove({s!r})", STDIO, {"runtime_error"}),
        "delete_outside_tmp": ("import shutil\nshutil.rmtree('/usr')", STDIO, {"runtime_error"}),
        "read_shadow": ("print(open('/etc/shadow').read())", STDIO, {"runtime_error"}),
        "read_run_dir": (f"print(open({s!r}).read())", STDIO, {"runtime_error"}),
        "socket_localhost": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint(3)",
                             STDIO, {"runtime_error"}),
        "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)",
                        STDIO, {"sandbox_error", "runtime_error"}),
        "kill_trainer": (f"import os, signal\nos.kill({me}, signal.SIGKILL)", STDIO, {"runtime_error"}),
        "output_100MB": ("import sys\nsys.stdout.write('x' * 100_000_000)", STDIO, {"output_limit"}),
        "sys_exit_before_asserts": ("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b", ASSERT, {"exited"}),
        "os_exit_before_asserts": ("import os\nos._exit(0)\ndef add(a, b):\n    return a + b", ASSERT, {"exited"}),
        "exit_inside_call": ("import os\ndef add(a, b):\n    os._exit(0)", ASSERT, {"exited"}),
        "eq_always_true": ("class Any:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
                           "def add(a, b):\n    return Any()", ASSERT, {"bad_value"}),
        "eq_always_true_call": ("class Any(int):\n    def __eq__(self, o):\n        return True\n"
                                "def add(a, b):\n    return Any(0)", CALL, {"wrong_answer"}),
        "rebind_assert_and_abs": ("import builtins\nbuiltins.AssertionError = type('X', (BaseException,), {})\n"
                                  "builtins.abs = lambda x: 0\ndef add(a, b):\n    return 0.0", ABS_ASSERT,
                                  {"wrong_answer"}),
        "fake_harness_answer": ('print(\'{"nonce": "0", "results": [{"status": "ok"}, {"status": "ok"}]}\')', STDIO,
                                {"wrong_answer"}),
        "read_harness_memory": ("got = []\nfor p in ('/proc/2/environ', '/proc/2/mem', '/proc/2/fd/0', '/proc/2/maps'):\n"
                                "    try:\n        open(p, 'rb').read(1)\n        got.append(p)\n"
                                "    except OSError:\n        pass\nif not got:\n    raise SystemExit(1)",
                                STDIO, {"runtime_error"}),
    }


def _host_sandbox_procs(wait_s: float = 3.0) -> list[str]:
    """Processes of a sandbox uid still on the host, after giving a torn-down pid namespace `wait_s` to empty."""
    deadline = time.monotonic() + wait_s
    while True:
        left = _sandbox_pids()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out = []
    for pid in left:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f"{pid}: {f.read().replace(b'\0', b' ').decode(errors='replace')[:120]}")
        except OSError:
            pass
    return out


def _sandbox_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                uid = os.stat(f"/proc/{d}").st_uid
            except OSError:
                continue
            if _UID_BASE <= uid < _UID_BASE + 64:
                pids.append(int(d))
    return pids


def test_hostile_programs_score_zero_with_a_reason(world):
    cases = hostile_cases(world)
    # also two honest programs: printing the expected output IS how stdin/stdout judging passes
    cases["prints_expected_output"] = ("import sys\nprint({'1 2': 3, '5 7': 12}[sys.stdin.read().strip()])", STDIO,
                                       {"passed"})
    cases["honest_assert"] = ("def add(a, b):\n    return a + b", ASSERT, {"passed"})
    names = list(cases)
    limits = SandboxLimits(memory_mb=512, output_bytes=1 << 20, nproc=32)
    t0 = time.monotonic()
    with CodeReward(num_workers=2, timeout_per_test_s=1.5, timeout_per_sample_s=8.0, limits=limits) as reward:
        rewards = reward.score_batch([fence(cases[n][0]) for n in names], [cases[n][1] for n in names])
        reasons, stats = reward.last_reasons, reward.last_stats
    elapsed = time.monotonic() - t0
    got = {n: (r, why) for n, r, why in zip(names, rewards, reasons)}
    for n in names:
        want = 1.0 if cases[n][2] == {"passed"} else 0.0
        assert got[n][0] == want and got[n][1] in cases[n][2], f"{n}: {got[n]} (details {reward.last_details})"
    assert sum(stats.reasons.values()) == len(names) and stats.items == len(names)
    assert stats.reasons["passed"] == 2 and stats.failures()["runtime_error"] >= 5
    # the trainer is untouched
    assert world["secret"].read_text() == "trainer secret"
    assert not os.path.exists("/usr/lib/erpd_evil") and not os.path.exists("/etc/erpd_evil")
    time.sleep(0.3)  # a connection would be accepted within the listener's 0.2 s poll
    assert world["hits"] == [], "a sandboxed program reached a listener on 127.0.0.1"
    assert _host_sandbox_procs() == [], "sandbox processes outlived their run"
    assert elapsed < 60, elapsed


def test_sample_wall_limit_kills_the_whole_sandbox(world):
    """Per-test limits are generous here, the per-sample one is not: the parent kills bwrap and everything in it."""
    prog = "import os, time\nos.fork()\nos.fork()\ntime.sleep(100)"
    with CodeReward(num_workers=1, timeout_per_test_s=30, timeout_per_sample_s=1.5) as reward:
        t0 = time.monotonic()
        assert reward.score_batch([fence(prog)], [STDIO]) == [0.0]
        assert reward.last_reasons == ["sample_timeout"] and time.monotonic() - t0 < 10
    assert _host_sandbox_procs() == []


def test_refuses_without_bwrap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    with pytest.raises(SandboxUnavailable, match="bubblewrap .*not installed.*sandbox=none"):
        Sandbox("bwrap").check()
    with pytest.raises(SandboxUnavailable, match="does not exist"):
        Sandbox("bwrap", python=str(tmp_path / "nope")).check()


def test_unsandboxed_only_when_set_and_warns_every_batch(caplog):
    _need_bwrap()
    prog = fence("print(sum(map(int, input().split())))")
    # the level explicitly: bench/code_sandbox (run earlier in the same pytest process) quiets this logger
    caplog.set_level(logging.WARNING, logger="erpd_megatron.rewards.code")
    with CodeReward(num_workers=1, sandbox="none") as reward:
        for _ in range(2):
            assert reward.score_batch([prog], [STDIO]) == [1.0]
    warnings = [r for r in caplog.records if "UNSANDBOXED" in r.getMessage()]
    assert len(warnings) == 2
    with pytest.raises(ValueError, match="sandbox mode"):
        Sandbox("off")


def test_harness_answer_needs_the_nonce(monkeypatch):
    """A harness answer without this run's nonce is a sandbox_error, never a result."""
    _need_bwrap()
    import erpd_megatron.rewards.sandbox as sb

    forged = sb.CHILD_SOURCE.replace('json.dumps({"nonce": job["nonce"]', 'json.dumps({"nonce": "forged"')
    assert forged != sb.CHILD_SOURCE
    monkeypatch.setattr(sb, "CHILD_SOURCE", forged)
    out = Sandbox().run({"mode": "stdio", "tests": [{"input": ""}]}, "print(1)", wall_s=20, slot=0)
    assert out.results is None and out.failure == "sandbox_error"
    json.dumps(out.detail)


def test_non_root_trainer_gets_the_same_sandbox():
    """A trainer running as an ordinary user: bwrap in an unprivileged user namespace, RLIMIT_NPROC relative to the
    user's current task count (a fork bomb ends at the per-test limit), /etc/shadow absent. Run as a throwaway uid
    with Debian's python3 on a copy of the package (the venv may sit in /root, unreadable to that uid)."""
    _need_bwrap()
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root (to switch to a throwaway uid) and setpriv")
    import subprocess
    import tempfile
    from pathlib import Path

    import erpd_megatron

    top = Path(tempfile.mkdtemp(prefix="erpd-nonroot-", dir="/tmp"))  # pytest's tmp_path is 0700 root
    try:
        _run_as_other_uid(top, erpd_megatron, subprocess)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _run_as_other_uid(tmp_path, erpd_megatron, subprocess):
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.dirname(erpd_megatron.__file__), pkg / "erpd_megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = pkg / "run.py"
    script.write_text(
        "import json, os\nfrom erpd_megatron.rewards.code import CodeReward\n"
        "from erpd_megatron.rewards.code_tests import parse_tests\n"
        "t = parse_tests({'input_output': {'inputs': ['1 2\\n'], 'outputs': ['3\\n']}})\n"
        "progs = ['print(sum(map(int, input().split())))',\n"
        "         'import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass',\n"
        "         'print(open(\"/etc/shadow\").read())']\n"
        "with CodeReward(num_workers=2, timeout_per_test_s=1.5, timeout_per_sample_s=20) as r:\n"
        "    v = r.score_batch(['```python\\n' + p + '\\n```' for p in progs], [t] * 3)\n"
        "print(json.dumps([os.getuid(), v, r.last_reasons]))\n")
    for root, dirs, files in os.walk(tmp_path):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    os.chmod(tmp_path, 0o755)
    uid = str(_UID_BASE + 63)  # not a slot uid of this process's pools (those are base + 0..num_workers-1)
    out = subprocess.run(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "/usr/bin/python3",
                          str(script)], capture_output=True, text=True, timeout=120, cwd=str(pkg),
                         env={"PYTHONPATH": str(pkg), "HOME": "/tmp", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    got_uid, rewards, reasons = json.loads(out.stdout.strip().splitlines()[-1])
    assert got_uid == int(uid) and rewards == [1.0, 0.0, 0.0]
    assert reasons == ["passed", "timeout", "runtime_error"]
