"""The code that runs INSIDE the sandbox (copied into it as /box/child.py; standard library only, Python >= 3.9).

Not imported by the trainer. Two roles, picked by argv[1]:

- `harness`: trusted. Reads one JSON job on stdin (test inputs, never expected outputs), runs every test of one
  sample and prints one JSON line: {"nonce": ..., "results": [...]}. It makes itself non-dumpable first
  (prctl PR_SET_DUMPABLE 0), so the program's processes (same uid) can neither ptrace it nor read its memory or
  its /proc/<pid>/fd. The untrusted program never runs in this process:
    stdio:  each test is `python /box/prog.py` with the test's input on stdin; its stdout goes to the parent.
    call:   a `serve` process runs the program; each test's arguments go to it, the returned value comes back as
            repr() text, is rebuilt with ast.literal_eval (plain data only) and sent on to the parent as JSON.
    assert: the test program (trusted, from the data set) runs HERE, with the entry point bound to a proxy that
            calls into a `serve` process; what the proxy returns is plain data rebuilt by literal_eval, so an object
            returned by the program cannot take part in the test's comparisons, and sys.exit / os._exit / patching
            builtins in the program only end or change the serve process.
- `serve`: untrusted. Executes /box/prog.py in a fresh namespace (not as __main__), then answers calls read from
  its (duplicated) stdin with ["ok", repr(value)] / ["err", text] on its (duplicated) stdout; the program's own
  prints and input() see /dev/null.

Every child gets rlimits (CPU s, address space, processes, file size, open files, no core) before exec, its own
session, and a wall limit per test; after a test fails or times out every other process in the sandbox (the pid
namespace is private: pid 1 is bwrap) is killed, so nothing a test leaves behind outlives it.
"""

import ast
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time

PY = sys.executable
BOX = os.path.dirname(os.path.abspath(__file__))  # /box in the sandbox; a temp dir when run unsandboxed
PROG = os.path.join(BOX, "prog.py")
WORKDIR = "/tmp"
SWEEP = False  # set from the job: only inside bwrap's private pid namespace
HEADER = "from typing import *\nimport math, collections, heapq, bisect, itertools, functools, re, string\n"


class RunnerGone(BaseException):
    """The serve process exited, or broke the protocol. BaseException: test code's `except Exception` can't eat it."""


class RunnerTimeout(BaseException):
    """A call into the serve process ran past the test's wall limit."""


class BadValue(BaseException):
    """The program returned something ast.literal_eval cannot rebuild (an object, inf, nan, ...)."""


class ProgramError(Exception):
    """The program raised (or failed to load); test code may catch it like the original exception."""


def _limits(lim):
    def apply():
        os.setsid()
        for name, value in (("RLIMIT_CPU", lim["cpu_s"]), ("RLIMIT_AS", lim["memory_mb"] << 20),
                            ("RLIMIT_FSIZE", lim["fsize_mb"] << 20), ("RLIMIT_NOFILE", lim["nofile"]),
                            ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", lim["nproc"])):
            if value is not None and value >= 0:
                resource.setrlimit(getattr(resource, name), (value, value))
    return apply


def _sweep():
    """Kill every process of the sandbox but pid 1 (bwrap) and this one. Never outside a private pid namespace."""
    if not SWEEP:
        return
    me = os.getpid()
    for _ in range(3):
        found = False
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in (1, me):
                try:
                    os.kill(int(d), signal.SIGKILL)
                    found = True
                except OSError:
                    pass
        if not found:
            break
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.01)


def _spawn(argv, lim):
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_limits(lim), close_fds=True, cwd=WORKDIR,
                            env={"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8"})


def _classify(rc, err):
    if b"MemoryError" in err:
        return "memory"
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one
    if rc == -signal.SIGXFSZ:
        return "file_limit"
    return "runtime_error"


def run_stdio(test_input, lim, timeout, cap):
    """One `python prog.py < input` run: (status, stdout text, stderr tail)."""
    proc = _spawn([PY, "-I", "-B", PROG], lim)
    data, pos = test_input.encode(), 0
    out, err = bytearray(), bytearray()
    open_fds = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    win = proc.stdin.fileno()
    os.set_blocking(win, False)
    if not data:
        proc.stdin.close()
        win = None
    deadline, status = time.monotonic() + timeout, None
    while open_fds or win is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            status = "timeout"
            break
        r, w, _ = select.select(list(open_fds), [win] if win is not None else [], [], left)
        if w:
            try:
                pos += os.write(win, data[pos:pos + 65536])
            except BlockingIOError:
                pass
            except OSError:  # the program closed its stdin (or exited): the rest of the input is not needed
                pos = len(data)
            if pos >= len(data):
                proc.stdin.close()
                win = None
        for fd in r:
            chunk = os.read(fd, 65536)
            if not chunk:
                del open_fds[fd]
                continue
            buf = open_fds[fd]
            buf += chunk
            if buf is out and len(buf) > cap:
                status = "output_limit"
            elif buf is err and len(buf) > 65536:
                del buf[:-4096]  # keep the stderr tail only
        if status:
            break
    if status:
        proc.kill()
    try:
        rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()) if not status else 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc, status = proc.wait(), "timeout"
    for f in (proc.stdout, proc.stderr):
        f.close()
    if status is None and rc != 0:
        status = _classify(rc, bytes(err))
    _sweep()  # also whatever the program left running in the background
    return status or "ok", out[:cap].decode("utf-8", "replace"), bytes(err[-2000:]).decode("utf-8", "replace")


class Runner:
    """Parent side of a `serve` process (the program, loaded once, answering calls)."""

    def __init__(self, fn_name, lim, cap):
        self.cap = cap
        self.proc = _spawn([PY, "-I", "-B", os.path.join(BOX, "child.py"), "serve", fn_name], lim)
        self.buf = b""

    def call(self, args, kwargs, timeout, wire="repr"):
        """Returns the rebuilt value; raises RunnerGone / RunnerTimeout / ProgramError / BadValue.

        wire "json" (call-based tests: JSON arguments, tuples come back as lists; 10x faster than literal_eval on
        10^5-element inputs) or "repr" (assert tests: arguments and values keep tuples / sets)."""
        if wire == "json":
            msg = json.dumps(["json", json.dumps(list(args))]).encode() + b"\n"
        else:
            msg = json.dumps(["repr", repr(tuple(args)), repr(dict(kwargs))]).encode() + b"\n"
        deadline = time.monotonic() + timeout
        win = self.proc.stdin.fileno()
        os.set_blocking(win, False)  # large arguments and a program stuck while loading: keep the deadline
        while msg:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunnerTimeout()
            if not select.select([], [win], [], left)[1]:
                continue
            try:
                msg = msg[os.write(win, msg):]
            except BlockingIOError:
                continue
            except OSError:
                raise RunnerGone("the program's process exited") from None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunnerTimeout()
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RunnerGone("the program's process exited")
            self.buf += chunk
            if len(self.buf) > self.cap:
                raise RunnerGone("output_limit")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            kind, text = json.loads(line)
        except (ValueError, TypeError):
            raise RunnerGone("protocol") from None
        if kind not in ("ok", "okj"):
            raise ProgramError(str(text)[:500])
        try:  # plain data only: no object of the program's survives this
            return json.loads(text) if kind == "okj" else ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise BadValue(f"the returned value is not plain data (repr: {text[:100]})") from None

    def stderr_tail(self):
        """After EOF on its reply pipe: let the process finish exiting (killing it now would turn a plain exit into
        SIGKILL), then kill whatever is left and read its stderr."""
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
            return self.proc.stderr.read()[-2000:]
        except Exception:
            return b""

    def close(self):
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (set, frozenset)):
        return sorted((_jsonable(x) for x in v), key=repr)
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def _runner_failure(runner, e):
    if isinstance(e, RunnerTimeout):
        return "timeout"
    if str(e) == "output_limit":
        return "output_limit"
    err = runner.stderr_tail()
    if b"MemoryError" in err:
        return "memory"
    if runner.proc.returncode == -signal.SIGXCPU:
        return "timeout"  # RLIMIT_CPU
    return "exited"  # sys.exit / os._exit / a crash of the program's process before it answered


def run_calls(job, lim, timeout, cap):
    results, runner = [], None
    for t in job["tests"]:
        if runner is None:
            runner = Runner(job["fn_name"], lim, cap)
        try:
            value = runner.call(t["args"], {}, timeout, wire="json")
            results.append({"status": "ok", "value": _jsonable(value)})
        except ProgramError as e:
            results.append({"status": "runtime_error", "detail": str(e)[:300]})
        except BadValue as e:
            results.append({"status": "bad_value", "detail": str(e)[:300]})
        except (RunnerGone, RunnerTimeout) as e:
            results.append({"status": _runner_failure(runner, e)})
            runner.close()
            _sweep()
            runner = None
    if runner is not None:
        runner.close()
    return results


def run_asserts(job, lim, timeout, cap):
    results = []
    for t in job["tests"]:
        runner = Runner(job["entry_point"], lim, cap)
        deadline = time.monotonic() + timeout

        def proxy(*args, _runner=runner, _deadline=deadline, **kwargs):
            return _runner.call(args, kwargs, max(0.0, _deadline - time.monotonic()))

        ns = {"__name__": "__erpd_test__", job["entry_point"]: proxy}  # MBPP-style asserts call it by name
        try:
            exec(compile(HEADER + job.get("setup", "") + "\n" + t["code"], "<test>", "exec"), ns)
            if callable(ns.get("check")):  # HumanEval: the program defines check(candidate)
                ns["check"](proxy)
            results.append({"status": "ok"})
        except (RunnerGone, RunnerTimeout) as e:
            results.append({"status": _runner_failure(runner, e)})
        except BadValue as e:
            results.append({"status": "bad_value", "detail": str(e)[:300]})
        except ProgramError as e:
            results.append({"status": "runtime_error", "detail": str(e)[:300]})
        except AssertionError as e:
            results.append({"status": "failed", "detail": f"AssertionError: {e}"[:300]})
        except Exception as e:
            results.append({"status": "failed", "detail": f"{type(e).__name__}: {e}"[:300]})
        runner.close()
        _sweep()
    return results


def harness():
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: no ptrace, no /proc/<pid>/mem by same uid
    except Exception:
        pass
    global SWEEP, WORKDIR
    job = json.loads(sys.stdin.read())
    WORKDIR = job.get("workdir", "/tmp")
    try:
        with open("/proc/1/comm") as f:
            SWEEP = bool(job.get("sweep")) and f.read().strip() == "bwrap"
    except OSError:
        SWEEP = False
    lim, timeout, cap = job["limits"], float(job["timeout_per_test_s"]), int(job["output_bytes"])
    if job["mode"] == "stdio":
        results = []
        for t in job["tests"]:
            status, out, err = run_stdio(t["input"], lim, timeout, cap)
            results.append({"status": status, "stdout": out, "detail": err[-300:]})
    elif job["mode"] == "call":
        results = run_calls(job, lim, timeout, cap)
    else:
        results = run_asserts(job, lim, timeout, cap)
    sys.stdout.write(json.dumps({"nonce": job["nonce"], "results": results}) + "\n")
    sys.stdout.flush()


def serve():
    reply = os.fdopen(os.dup(1), "w")
    requests = os.fdopen(os.dup(0), "r")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    sys.stdin, sys.stdout = open(os.devnull), open(os.devnull, "w")
    fn_name = sys.argv[2]

    def send(kind, text):
        reply.write(json.dumps([kind, text]) + "\n")
        reply.flush()

    ns = {"__name__": "__erpd_solution__", "__builtins__": __builtins__}
    try:
        with open(PROG) as f:
            exec(compile(HEADER + f.read(), "solution.py", "exec"), ns)
        sol = ns.get("Solution")
        fn = getattr(sol(), fn_name) if isinstance(sol, type) and hasattr(sol, fn_name) else ns[fn_name]
    except SystemExit:
        raise  # exiting while loading: the harness sees the process gone (reason "exited")
    except BaseException as e:  # the program failed to load: every call answers with its error
        fn, load_error = None, f"{type(e).__name__}: {e}"
    for line in requests:
        if fn is None:
            send("err", load_error)
            continue
        req = json.loads(line)
        try:
            if req[0] == "json":
                value = fn(*json.loads(req[1]))
                try:
                    send("okj", json.dumps(value))
                    continue
                except (TypeError, ValueError):
                    pass  # not JSON (a set, bytes, an object): repr, and the harness decides
            else:
                value = fn(*ast.literal_eval(req[1]), **ast.literal_eval(req[2]))
            send("ok", repr(value))
        except Exception as e:
            send("err", f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    {"harness": harness, "serve": serve}[sys.argv[1]]()
