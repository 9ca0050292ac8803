"""Starting and stopping ``sglang.launch_server`` processes: the command line and the process group.

The server runs from its own Python environment (``LaunchSpec.python``): sglang pins exact torch /
transformers versions that cannot be installed beside this project's (see docs/rollout.md for the
pinned sglang version). Flags are sglang 0.5.23's ``ServerArgs`` spelling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


@dataclass
class LaunchSpec:
    """How to start the servers ourselves (``python -m sglang.launch_server``), one per slot."""

    model_path: str
    tp: int = 1
    """``--tp-size`` of each server (each server is DP=1: sglang refuses weight updates when dp_size > 1)."""
    num_servers: int = 1
    host: str = "127.0.0.1"
    """Bind address. Anything but loopback needs ``api_key`` (the admin endpoints update weights)."""
    base_port: int = 30000
    """Server k listens on ``base_port + k``."""
    gpus_per_server: int | None = None
    """GPUs between consecutive servers' ``--base-gpu-id``; default ``tp``."""
    base_gpu_id: int = 0
    """``--base-gpu-id`` of server 0."""
    mem_fraction_static: float | None = None
    """``--mem-fraction-static`` (weights + KV cache share of the GPU); None = sglang's default."""
    enable_memory_saver: bool = False
    """Pass ``--enable-memory-saver`` (needed by ``release_memory`` / ``resume_memory``)."""
    deterministic_inference: bool = False
    """Pass ``--enable-deterministic-inference``: without it sglang ignores ``sampling_seed``."""
    api_key: str | None = None
    """Pass ``--api-key``; the client then sends ``Authorization: Bearer <key>``."""
    python: str | None = None
    """Interpreter of the environment sglang is installed in (default: this one)."""
    extra_args: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    """Full command override; ``{port}``, ``{host}``, ``{index}``, ``{tp}``, ``{model_path}`` are filled in."""
    env: dict[str, str] | None = None
    log_dir: str | None = None
    """Where ``sglang_server{k}.log`` goes (the run directory's ``logs/``). Required to launch."""
    startup_timeout: float = 900.0

    def __post_init__(self):
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"SGLang server host {self.host!r} is reachable from other machines: set an api_key "
                             "(rollout.sglang_api_key or ERPD_SGLANG_API_KEY), or bind 127.0.0.1")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")

    def port(self, index: int) -> int:
        return self.base_port + index

    def url(self, index: int) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port(index)}"

    def argv(self, index: int) -> list[str]:
        fill = dict(port=self.port(index), host=self.host, index=index, tp=self.tp, model_path=self.model_path)
        if self.command is not None:
            return [str(a).format(**fill) for a in self.command]
        argv = [self.python or sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--tp-size", str(self.tp), "--host", self.host, "--port", str(fill["port"]),
                "--base-gpu-id", str(self.base_gpu_id + index * (self.gpus_per_server or self.tp))]
        if self.mem_fraction_static is not None:
            argv += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.enable_memory_saver:
            argv.append("--enable-memory-saver")
        if self.deterministic_inference:
            argv.append("--enable-deterministic-inference")
        if self.api_key:
            argv += ["--api-key", self.api_key]
        return argv + list(self.extra_args)


def redact(argv: list[str], secret: str | None) -> str:
    """The command line for logs, without the API key."""
    return " ".join("***" if secret and a == secret else a for a in argv)


def start_server(argv: list[str], log_path: str, env: dict[str, str] | None, banner: str,
                 secret: str | None = None) -> subprocess.Popen:
    """Start one server in its own session (= process group), output appended to ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "ab") as fh:
        fh.write(f"\n=== {banner}: {redact(argv, secret)}\n".encode())
        fh.flush()
        # Own session = own process group, so the whole tree (scheduler, detokenizer, TP workers)
        # can be stopped by the group id without touching anything else.
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)


def stop_server(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: str | None, n: int = 2000) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - n))
        return fh.read().decode(errors="replace")
