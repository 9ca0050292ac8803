"""Starting and stopping ``sglang.launch_server`` processes: the command line and the process group.

The server runs from its own Python environment (``LaunchSpec.python``): sglang pins exact torch /
transformers versions that cannot be installed beside this project's (see docs/rollout.md for the
pinned sglang version). Flags are sglang 0.5.23's ``ServerArgs`` spelling.

On a host without CUDA (``device="cpu"``, the default there) the server runs sglang's CPU path:
``SGLANG_USE_CPU_ENGINE=1`` and ``--device cpu --attention-backend torch_native --disable-cuda-graph`` with a
small KV pool (``--max-total-tokens``); ``--enable-memory-saver`` is dropped there (it needs libcuda), so
release / resume are API calls that free nothing, and so is ``--enable-deterministic-inference`` (0.5.23
refuses it with torch_native attention), so ``sampling_seed`` is accepted but has no effect on CPU. ``make sglang-env`` builds such an environment.

The child's environment is the trainer's minus what belongs to the trainer's own process world
(``TRAINER_ONLY_VARS``: torchrun's rank / rendezvous variables, ``CUDA_DEVICE_MAX_CONNECTIONS``): a server
that inherits ``RANK`` / ``MASTER_PORT`` can join (and hang) the trainer's rendezvous, and
``CUDA_DEVICE_MAX_CONNECTIONS=1`` (Megatron's overlap setting) serializes the server's kernel launches.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

LOOPBACK = ("127.0.0.1", "localhost", "::1")

#: Trainer-process settings a server must not inherit (torchrun's world, Megatron's CUDA stream setting).
TRAINER_ONLY_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                     "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
                     "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                     "CUDA_DEVICE_MAX_CONNECTIONS")
CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph")


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
    startup_timeout: float = 1800.0
    """Seconds to wait for a started server's ``/health`` (load + CUDA-graph capture of a large model)."""
    device: str | None = None
    """"cuda" | "cpu"; None = "cpu" when this process sees no CUDA device, else "cuda"."""
    cpu_max_total_tokens: int = 16384
    """``--max-total-tokens`` on CPU (KV-cache slots; sglang would otherwise size the pool from host memory)."""
    cpu_mem_fraction_static: float = 0.3
    """``--mem-fraction-static`` on CPU when ``mem_fraction_static`` is not given."""
    cpu_dtype: str | None = "float32"
    """``--dtype`` on CPU: the trainer's CPU path is fp32, and sglang would serve an fp32 checkpoint in fp16 (its
    "auto"), beyond the weights-arrived guard's fp32 tolerance. None = sglang's choice."""

    def __post_init__(self):
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"SGLang server host {self.host!r} is reachable from other machines: set an api_key "
                             "(rollout.sglang_api_key or ERPD_SGLANG_API_KEY), or bind 127.0.0.1")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")

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
        mem = self.mem_fraction_static
        if self.device == "cpu":
            argv += [*CPU_FLAGS, "--max-total-tokens", str(self.cpu_max_total_tokens)]
            if self.cpu_dtype:
                argv += ["--dtype", self.cpu_dtype]
            mem = mem if mem is not None else self.cpu_mem_fraction_static
        if mem is not None:
            argv += ["--mem-fraction-static", str(mem)]
        if self.enable_memory_saver and self.device != "cpu":  # torch_memory_saver needs libcuda
            argv.append("--enable-memory-saver")
        if self.deterministic_inference and self.device != "cpu":  # refused with torch_native attention
            argv.append("--enable-deterministic-inference")
        if self.api_key:
            argv += ["--api-key", self.api_key]
        return argv + list(self.extra_args)

    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The server's environment: ``base`` (default ``os.environ``) without ``TRAINER_ONLY_VARS``, plus
        ``SGLANG_USE_CPU_ENGINE=1`` on CPU, plus ``env``."""
        out = {k: v for k, v in (os.environ if base is None else base).items() if k not in TRAINER_ONLY_VARS}
        if self.device == "cpu":
            out["SGLANG_USE_CPU_ENGINE"] = "1"
        return {**out, **(self.env or {})}


def redact(argv: list[str], secret: str | None) -> str:
    """The command line for logs, without the API key."""
    return " ".join("***" if secret and a == secret else a for a in argv)


def start_server(argv: list[str], log_path: str, env: dict[str, str], banner: str,
                 secret: str | None = None) -> subprocess.Popen:
    """Start one server in its own session (= process group) with exactly ``env``, output appended to
    ``log_path``. A ``<log_path>.pid`` file names the group, so that the next start from the same run
    directory stops a server that a killed trainer left behind (``stop_leftover``)."""
    if stop_leftover(log_path):
        logging.getLogger(__name__).warning("stopped the server an earlier, killed run left behind (%s.pid)", log_path)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "ab") as fh:
        fh.write(f"\n=== {banner}: {redact(argv, secret)}\n".encode())
        fh.flush()
        # Own session = own process group, so the whole tree (scheduler, detokenizer, TP workers)
        # can be stopped by the group id without touching anything else.
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    with open(log_path + ".pid", "w") as fh:  # the command line only as a hash: it may hold the API key
        fh.write(f"{proc.pid} {_argv_hash(argv)}\n")
    return proc


def _argv_hash(argv: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\0".join(argv).encode()).hexdigest()[:32]


def stop_leftover(log_path: str) -> bool:
    """Kill the process group named in ``<log_path>.pid`` when it is still a server of ours: an SGLang server
    runs in its own session, so a SIGKILLed trainer leaves it running (holding its port and memory) and the
    resumed run would find the port taken. Only a group leader whose command line is the one we started
    (same hash) is killed, never a process that reused the pid. True if one was killed."""
    pid_file = log_path + ".pid"
    try:
        pid_text, digest = open(pid_file).read().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    os.unlink(pid_file)
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").rstrip("\0").split("\0")
        if os.getpgid(pid) != pid or _argv_hash(argv) != digest:
            return False
    except OSError:  # gone (or no /proc to check it by)
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    import time

    for _ in range(100):  # the port is free once the group is gone (it is not our child: poll, not wait)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    return True


def stop_server(proc: subprocess.Popen | None, grace: float = 15.0, log_path: str | None = None) -> None:
    """SIGTERM the server's process group, SIGKILL after ``grace`` seconds."""
    if log_path and os.path.exists(log_path + ".pid"):
        os.unlink(log_path + ".pid")
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
