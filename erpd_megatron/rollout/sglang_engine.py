"""``SGLangEngine``: rollouts from one or more SGLang 0.5.x servers over their native HTTP API.

Stdlib only (``http.client`` + threads); sglang itself is imported lazily and only to serialize
weights when it is installed (see ``sglang_wire.py``).

- Servers: started here (``python -m sglang.launch_server --tp-size N ...``, one per ``LaunchSpec``
  slot, own process group, log file) or attached by URL. ``/health`` is polled until it answers 200.
- ``generate``: one ``POST /generate`` per sample (``input_ids``, ``sampling_params`` with ``n = 1``
  and a per-sample ``sampling_seed``, ``return_logprob``), spread over servers by worker threads that
  pull from one queue. Response tokens and behaviour log-probs come from
  ``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` triples), the finish reason from
  ``meta_info.finish_reason.type``. Results are keyed by (prompt, sample): a retried request can
  never produce a duplicate, and ``generate`` raises rather than return fewer samples.
- Failure handling: a refused / reset / timed-out request marks its server suspect; the worker
  checks ``/health``, aborts a hung request (``/abort_request``), restarts the server if we launched
  it (kill its process group, relaunch, wait for health; at most ``max_restarts`` times), and puts
  the request back in the queue (at most ``max_retries`` tries per sample). An aborted generation
  (``finish_reason.type == "abort"``) is retried the same way. Every control call has a timeout.
- Weights: ``update_weights(buckets, version)`` pauses every server (``/pause_generation``), streams
  the buckets (each bucket goes to every server before the next is read), then ``/flush_cache`` and
  ``/continue_generation``. Three transports:
  ``"tensor"`` (colocated: ``/update_weights_from_tensor``, ``load_format="flattened_bucket"``,
  one base64 ForkingPickler payload per server TP rank; CUDA IPC, so same node),
  ``"distributed"`` (disaggregated: ``/init_weights_update_group`` once, then per bucket
  ``/update_weights_from_distributed`` while this process broadcasts each tensor from rank 0 of the
  custom group), ``"disk"`` (write safetensors + the model's config files into a directory, then
  ``/update_weights_from_disk``).
- After a restart a server holds its launch checkpoint again. If weights were pushed before, the
  engine re-loads the last disk checkpoint when there is one, else calls ``resync_fn(url)`` when
  given; otherwise samples from that server carry the server's own reported version (never the
  trainer's), so staleness is visible.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from erpd_megatron.rollout import sglang_wire
from erpd_megatron.rollout.engine import (
    RolloutEngine,
    Sample,
    SamplingParams,
    WeightBucket,
    derive_seed,
    expand_requests,
)

log = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """A server answered, but with an error (HTTP >= 400 or ``success: false``)."""


class ServerUnreachable(SGLangError):
    """Connection refused / reset / timed out: the server may be dead or hung."""


class RetryableGeneration(SGLangError):
    """The server aborted a generation (paused in abort mode, restarting, overloaded)."""


class RolloutError(RuntimeError):
    """``generate`` could not produce every requested sample."""


@dataclass
class LaunchSpec:
    """How to start the servers ourselves (``sglang.launch_server``)."""

    model_path: str
    tp: int = 1
    num_servers: int = 1
    host: str = "127.0.0.1"
    base_port: int = 30000
    """Server k listens on ``base_port + k``."""
    gpus_per_server: int | None = None
    """GPUs between consecutive servers' ``--base-gpu-id``; default ``tp``."""
    enable_memory_saver: bool = False
    """Pass ``--enable-memory-saver`` (needed by ``release_memory`` / ``resume_memory``)."""
    extra_args: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    """Full command override; ``{port}``, ``{host}``, ``{index}``, ``{tp}``, ``{model_path}`` are filled in."""
    env: dict[str, str] | None = None
    log_dir: str | None = None
    startup_timeout: float = 900.0

    def argv(self, index: int) -> list[str]:
        fill = dict(port=self.base_port + index, host=self.host, index=index, tp=self.tp, model_path=self.model_path)
        if self.command is not None:
            return [str(a).format(**fill) for a in self.command]
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--tp-size", str(self.tp), "--host", self.host, "--port", str(fill["port"]),
                "--base-gpu-id", str(index * (self.gpus_per_server or self.tp))]
        if self.enable_memory_saver:
            argv.append("--enable-memory-saver")
        return argv + list(self.extra_args)


@dataclass
class _Server:
    url: str
    index: int
    tp: int | None = None
    proc: subprocess.Popen | None = None
    argv: list[str] | None = None
    log_path: str | None = None
    epoch: int = 0
    """Bumped on every restart; a worker only restarts the server incarnation it saw fail."""
    restarts: int = 0
    alive: bool = True
    stale_weights: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


# ---------------------------------------------------------------------- HTTP
def http_json(url: str, method: str, path: str, body: dict | None = None, timeout: float = 60.0):
    """One HTTP call; returns (status, parsed JSON or text). Network failures -> ``ServerUnreachable``."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as e:  # refused, reset, socket timeout, bad status line
        raise ServerUnreachable(f"{method} {url}{path}: {type(e).__name__}: {e}") from e
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode(errors="replace")
    except ValueError:
        data = raw.decode(errors="replace")
    return resp.status, data


class SGLangEngine(RolloutEngine):
    def __init__(self, urls: Sequence[str] | None = None, launch: LaunchSpec | None = None, *,
                 tp: int | None = None,
                 weight_transport: str = "tensor",
                 bucket_layout: str = "typed",
                 pause_mode: str = "retract",
                 request_timeout: float = 1800.0,
                 control_timeout: float = 600.0,
                 health_timeout: float = 30.0,
                 max_retries: int = 3,
                 max_restarts: int = 3,
                 concurrency_per_server: int = 64,
                 disk_dir: str | None = None,
                 disk_template_dir: str | None = None,
                 dist_master_address: str = "127.0.0.1",
                 dist_master_port: int | None = None,
                 dist_backend: str = "nccl",
                 dist_group_name: str = "erpd_weight_update",
                 resync_fn: Callable[[str], None] | None = None,
                 send_sampling_seed: bool = True):
        """Attach to ``urls`` or start servers from ``launch`` (exactly one of them).
        ``tp``: TP size of attached servers (default: read from ``/get_server_info``).
        ``weight_transport``: "tensor" | "distributed" | "disk" (see module docstring).
        ``bucket_layout``: "typed" (every 0.5.x) | "bytes" (newer 0.5.x, mixed dtypes per payload).
        ``pause_mode``: body of ``/pause_generation`` ("retract" | "abort" | "in_place"; ignored by
        old 0.5.x servers, which take no body).
        ``send_sampling_seed``: send per-sample ``sampling_seed``; set False for servers whose sampling
        backend refuses seeds (0.5.x flashinfer with top-p / top-k asserts on them)."""
        if (urls is None) == (launch is None):
            raise ValueError("SGLangEngine: give exactly one of urls= (attach) or launch= (start servers)")
        if weight_transport not in ("tensor", "distributed", "disk"):
            raise ValueError(f"weight_transport must be tensor|distributed|disk, got {weight_transport!r}")
        if bucket_layout not in sglang_wire.LAYOUTS:
            raise ValueError(f"bucket_layout must be one of {sglang_wire.LAYOUTS}, got {bucket_layout!r}")
        if weight_transport == "disk" and disk_dir is None:
            raise ValueError("weight_transport='disk' needs disk_dir=")
        self.launch = launch
        self.weight_transport = weight_transport
        self.bucket_layout = bucket_layout
        self.pause_mode = pause_mode
        self.request_timeout = request_timeout
        self.control_timeout = control_timeout
        self.health_timeout = health_timeout
        self.max_retries = max_retries
        self.max_restarts = max_restarts
        self.concurrency_per_server = concurrency_per_server
        self.disk_dir = disk_dir
        self.disk_template_dir = disk_template_dir or (launch.model_path if launch else None)
        self.dist_master_address = dist_master_address
        self.dist_master_port = dist_master_port
        self.dist_backend = dist_backend
        self.dist_group_name = dist_group_name
        self.resync_fn = resync_fn
        self.send_sampling_seed = send_sampling_seed
        self.weight_version = None
        self._last_disk_path: str | None = None
        self._dist_group = None
        self._call_id = 0
        self._closed = False

        if urls is not None:
            self.servers = [_Server(url=u.rstrip("/"), index=k, tp=tp) for k, u in enumerate(urls)]
        else:
            self.servers = [_Server(url=f"http://{launch.host}:{launch.base_port + k}", index=k, tp=launch.tp,
                                    argv=launch.argv(k)) for k in range(launch.num_servers)]
            for s in self.servers:
                self._start(s)
        for s in self.servers:
            self._wait_healthy(s, launch.startup_timeout if launch else self.health_timeout)
            if s.tp is None:
                s.tp = self._query_tp(s)

    @classmethod
    def from_config(cls, rollout_cfg, model_path: str, **kw) -> SGLangEngine:
        """From a ``RolloutConfig``-like object: attach to ``sglang_urls`` when given, else launch
        ``sglang_num_servers`` (default 1) servers of ``sglang_tp`` (default 1) GPUs from ``model_path``.
        Optional fields read when present: ``sglang_port``, ``sglang_extra_args``, ``weight_transport``,
        ``sglang_log_dir``; keyword arguments override / add constructor arguments."""
        g = lambda name, default: getattr(rollout_cfg, name, default) or default  # noqa: E731
        kw.setdefault("weight_transport", g("weight_transport", "tensor"))
        urls = list(g("sglang_urls", []))
        if urls:
            return cls(urls=urls, **kw)
        spec = LaunchSpec(model_path=str(model_path), tp=int(g("sglang_tp", 1)),
                          num_servers=int(g("sglang_num_servers", 1)), base_port=int(g("sglang_port", 30000)),
                          extra_args=tuple(g("sglang_extra_args", ())), log_dir=g("sglang_log_dir", None),
                          enable_memory_saver=bool(g("sglang_memory_saver", False)))
        return cls(launch=spec, **kw)

    # ------------------------------------------------------------------ process management
    def _start(self, s: _Server) -> None:
        log_dir = Path(self.launch.log_dir or os.environ.get("TMPDIR", "/tmp"))
        log_dir.mkdir(parents=True, exist_ok=True)
        s.log_path = str(log_dir / f"sglang_server{s.index}.log")
        env = {**os.environ, **(self.launch.env or {})}
        with open(s.log_path, "ab") as fh:
            fh.write(f"\n=== start (epoch {s.epoch}): {' '.join(s.argv)}\n".encode())
            fh.flush()
            # Own session = own process group, so the whole tree (scheduler, detokenizer, TP workers)
            # can be stopped by the group id without touching anything else.
            s.proc = subprocess.Popen(s.argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        s.alive = True

    def _stop(self, s: _Server, grace: float = 15.0) -> None:
        proc, s.proc = s.proc, None
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

    def _wait_healthy(self, s: _Server, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if s.proc is not None and s.proc.poll() is not None:
                raise SGLangError(f"server {s.url} exited with code {s.proc.returncode} while starting; "
                                  f"log: {s.log_path}\n{_tail(s.log_path)}")
            if self._healthy(s):
                return
            if time.monotonic() > deadline:
                raise SGLangError(f"server {s.url} not healthy after {timeout:.0f}s; log: {s.log_path}")
            time.sleep(0.25)

    def _healthy(self, s: _Server) -> bool:
        try:
            status, _ = http_json(s.url, "GET", "/health", timeout=self.health_timeout)
            return status == 200
        except ServerUnreachable:
            return False

    def _query_tp(self, s: _Server) -> int:
        try:
            status, info = http_json(s.url, "GET", "/get_server_info", timeout=self.control_timeout)
        except ServerUnreachable:
            status, info = 0, None
        if status == 200 and isinstance(info, dict) and "tp_size" in info:
            return int(info["tp_size"])
        raise SGLangError(f"cannot read tp_size of {s.url} from /get_server_info; pass tp= to SGLangEngine")

    def _recover(self, s: _Server, epoch_seen: int) -> bool:
        """After a failed call on incarnation ``epoch_seen``: True when the server is usable again."""
        with s.lock:
            if not s.alive:
                return False
            if s.epoch != epoch_seen:  # another worker already restarted it
                return True
            process_dead = s.proc is not None and s.proc.poll() is not None
            if not process_dead and self._healthy(s):
                return True
            if s.proc is None and s.argv is None:  # attached, not ours to restart
                log.error("server %s is unreachable and was not started by us; dropping it", s.url)
                s.alive = False
                return False
            if s.restarts >= self.max_restarts:
                log.error("server %s failed again after %d restarts; dropping it", s.url, s.restarts)
                self._stop(s)
                s.alive = False
                return False
            log.warning("restarting server %s (restart %d)", s.url, s.restarts + 1)
            self._stop(s)
            s.restarts += 1
            s.epoch += 1
            self._start(s)
            try:
                self._wait_healthy(s, self.launch.startup_timeout)
            except SGLangError as e:
                log.error("%s", e)
                s.alive = False
                return False
            if self._dist_group is not None:  # its ranks left the custom group: rebuild on next update
                self._dist_group = None
            if self.weight_version is not None:
                self._resync(s)
            return True

    def _resync(self, s: _Server) -> None:
        if self._last_disk_path is not None:
            self._control(s, "/update_weights_from_disk",
                          {"model_path": self._last_disk_path, "weight_version": str(self.weight_version)})
        elif self.resync_fn is not None:
            self.resync_fn(s.url)
        else:
            s.stale_weights = True
            log.warning("server %s restarted with its launch weights; its samples carry the server's version", s.url)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Sample]:
        self._check_open()
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        self._call_id += 1
        call = f"erpd{os.getpid()}-{self._call_id}-{uuid.uuid4().hex[:6]}"
        keys = expand_requests(len(prompt_ids), sampling)
        pending = deque(keys)
        results: dict[tuple[int, int], Sample] = {}
        tries: dict[tuple[int, int], int] = {}
        cond = threading.Condition()
        failure: list[BaseException] = []

        def done() -> bool:
            return len(results) == len(keys) or bool(failure)

        def worker(s: _Server) -> None:
            while True:
                with cond:
                    while not pending and not done():
                        cond.wait(0.2)
                    if done() or not s.alive:
                        return
                    key = pending.popleft()
                epoch = s.epoch
                try:
                    sample = self._generate_one(s, prompt_ids[key[0]], key, sampling, call)
                except (ServerUnreachable, RetryableGeneration) as e:
                    with cond:
                        tries[key] = tries.get(key, 0) + 1
                        if tries[key] > self.max_retries:
                            failure.append(RolloutError(f"sample {key} failed {tries[key]} times; last: {e}"))
                        else:
                            pending.appendleft(key)
                        cond.notify_all()
                    if isinstance(e, ServerUnreachable):
                        self._abort_quietly(s, _rid(call, key))
                    if not self._recover(s, epoch):
                        return
                    continue
                except BaseException as e:  # protocol / HTTP 4xx errors are bugs, not retryable
                    with cond:
                        failure.append(e)
                        cond.notify_all()
                    return
                with cond:
                    results.setdefault(key, sample)
                    cond.notify_all()

        threads = [threading.Thread(target=worker, args=(s,), daemon=True, name=f"sglang-gen{s.index}.{k}")
                   for s in self.servers if s.alive
                   for k in range(min(self.concurrency_per_server, len(keys)))]
        if not threads:
            raise RolloutError("no live SGLang server")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failure:
            raise failure[0] if isinstance(failure[0], RolloutError) else RolloutError(str(failure[0])) from failure[0]
        if len(results) != len(keys):
            raise RolloutError(f"only {len(results)}/{len(keys)} samples generated: every server is down")
        return [results[k] for k in keys]

    def _generate_one(self, s: _Server, prompt: Sequence[int], key: tuple[int, int], sampling: SamplingParams,
                      call: str) -> Sample:
        body = {
            "rid": _rid(call, key),
            "input_ids": [int(t) for t in prompt],
            "sampling_params": sglang_sampling_params(
                sampling, derive_seed(sampling.seed, *key) if self.send_sampling_seed else None),
            "return_logprob": True,
            "stream": False,
        }
        status, data = http_json(s.url, "POST", "/generate", body, timeout=self.request_timeout)
        if status == 503:
            raise RetryableGeneration(f"{s.url}/generate: 503 {data}")
        if status != 200:
            raise SGLangError(f"{s.url}/generate: HTTP {status}: {data}")
        return self._parse_generation(s, data, key)

    def _parse_generation(self, s: _Server, data, key: tuple[int, int]) -> Sample:
        ids, logprobs, reason, meta = parse_generate_response(data, where=f"{s.url} rid {_rid('', key)}")
        server_version = meta.get("weight_version")
        if s.stale_weights:
            version = server_version
        else:
            version = self.weight_version
        return Sample(prompt_index=key[0], sample_index=key[1], response_ids=ids, logprobs=logprobs,
                      finish_reason=reason, weight_version=version,
                      info={"server": s.url, "server_weight_version": server_version,
                            "matched_stop": (meta.get("finish_reason") or {}).get("matched")})

    def _abort_quietly(self, s: _Server, rid: str) -> None:
        try:
            http_json(s.url, "POST", "/abort_request", {"rid": rid}, timeout=min(5.0, self.control_timeout))
        except SGLangError:
            pass

    # ------------------------------------------------------------------ control calls
    def _control(self, s: _Server, path: str, body: dict | None = None, method: str = "POST",
                 timeout: float | None = None):
        status, data = http_json(s.url, method, path, body, timeout=timeout or self.control_timeout)
        if status != 200 or (isinstance(data, dict) and data.get("success") is False):
            raise SGLangError(f"{s.url}{path}: HTTP {status}: {data}")
        return data

    def _each(self, fn: Callable[[_Server], object]) -> list:
        """Run ``fn`` on every live server concurrently; re-raise the first error."""
        live = [s for s in self.servers if s.alive]
        out: list = [None] * len(live)
        errs: list[BaseException] = []

        def run(k, s):
            try:
                out[k] = fn(s)
            except BaseException as e:
                errs.append(e)

        threads = [threading.Thread(target=run, args=(k, s), daemon=True) for k, s in enumerate(live)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errs:
            raise errs[0]
        return out

    def pause(self) -> None:
        self._each(lambda s: self._control(s, "/pause_generation", {"mode": self.pause_mode}))

    def resume(self) -> None:
        self._each(lambda s: self._control(s, "/continue_generation", {}))

    def flush_cache(self, attempts: int = 20) -> None:
        """``/flush_cache`` answers 400 while requests are still running: retry briefly."""
        def flush(s):
            for k in range(attempts):
                status, data = http_json(s.url, "POST", "/flush_cache", None, timeout=self.control_timeout)
                if status == 200:
                    return
                time.sleep(min(0.05 * 2 ** k, 2.0))
            raise SGLangError(f"{s.url}/flush_cache kept failing: {data}")
        self._each(flush)

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        body = {} if tags is None else {"tags": list(tags)}
        self._each(lambda s: self._control(s, "/release_memory_occupation", body))

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        body = {} if tags is None else {"tags": list(tags)}
        self._each(lambda s: self._control(s, "/resume_memory_occupation", body))

    def health(self) -> bool:
        return not self._closed and all(s.alive and self._healthy(s) for s in self.servers)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self.servers:
            self._stop(s)
        if self._dist_group is not None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group(self._dist_group)
            except Exception:  # best effort at teardown
                pass
            self._dist_group = None

    def _check_open(self):
        if self._closed:
            raise RuntimeError("SGLangEngine is shut down")

    # ------------------------------------------------------------------ weights
    def update_weights(self, buckets: Iterable[WeightBucket], version: int | str | None = None) -> None:
        self._check_open()
        if self.weight_transport == "disk":
            path = self.write_disk_checkpoint(buckets, version)
            self.update_weights_from_disk(path, version)
            return
        self.pause()
        try:
            self.flush_cache()
            for bucket in buckets:
                if not bucket:
                    continue
                if self.weight_transport == "tensor":
                    self._push_tensor_bucket(bucket, version)
                else:
                    self._push_distributed_bucket(bucket, version)
            self.flush_cache()
        finally:
            self.resume()
        self.weight_version = version
        self._last_disk_path = None
        for s in self.servers:
            s.stale_weights = False

    def _push_tensor_bucket(self, bucket: WeightBucket, version) -> None:
        for payload in sglang_wire.flatten_bucket(bucket, self.bucket_layout):
            def send(s, payload=payload):
                # One serialization per TP rank: each rank consumes its own handles (as sglang's Engine does).
                body = {"serialized_named_tensors": [sglang_wire.serialize(payload) for _ in range(s.tp)],
                        "load_format": "flattened_bucket", "flush_cache": False, "abort_all_requests": False,
                        "weight_version": None if version is None else str(version)}
                self._control(s, "/update_weights_from_tensor", body)
            self._each(send)

    def update_weights_from_serialized(self, payloads_per_rank: Sequence[str], version=None, server: int = 0) -> None:
        """Low-level: post payloads already serialized per TP rank (e.g. gathered from the trainer ranks
        that share GPUs with server ``server``), as ``flattened_bucket``. No pause / flush here."""
        self._control(self.servers[server], "/update_weights_from_tensor",
                      {"serialized_named_tensors": list(payloads_per_rank), "load_format": "flattened_bucket",
                       "flush_cache": False, "weight_version": None if version is None else str(version)})

    def _ensure_dist_group(self) -> None:
        if self._dist_group is not None:
            return
        if self.dist_master_port is None:
            raise ValueError("weight_transport='distributed' needs dist_master_port=")
        live = [s for s in self.servers if s.alive]
        world = 1 + sum(s.tp for s in live)
        offsets, off = {}, 1
        for s in live:
            offsets[s.index], off = off, off + s.tp
        init_method = f"tcp://{self.dist_master_address}:{self.dist_master_port}"
        errs: list[BaseException] = []

        def join(s):
            try:
                self._control(s, "/init_weights_update_group", {
                    "master_address": self.dist_master_address, "master_port": self.dist_master_port,
                    "rank_offset": offsets[s.index], "world_size": world,
                    "group_name": self.dist_group_name, "backend": self.dist_backend})
            except BaseException as e:
                errs.append(e)

        # The servers block in rendezvous until rank 0 (us) joins: post first, then join ourselves.
        threads = [threading.Thread(target=join, args=(s,), daemon=True) for s in live]
        for t in threads:
            t.start()
        group = sglang_wire.init_custom_process_group(backend=self.dist_backend, init_method=init_method,
                                                      world_size=world, rank=0, group_name=self.dist_group_name)
        for t in threads:
            t.join()
        if errs:
            raise errs[0]
        self._dist_group = group

    def _push_distributed_bucket(self, bucket: WeightBucket, version) -> None:
        import torch.distributed as dist

        self._ensure_dist_group()
        body = {"names": [n for n, _ in bucket], "dtypes": [sglang_wire.dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.dist_group_name,
                "flush_cache": False, "weight_version": None if version is None else str(version)}
        errs: list[BaseException] = []

        def post(s):
            try:
                self._control(s, "/update_weights_from_distributed", body)
            except BaseException as e:
                errs.append(e)

        threads = [threading.Thread(target=post, args=(s,), daemon=True) for s in self.servers if s.alive]
        for t in threads:
            t.start()
        # Same order as the names list: the servers post one broadcast per tensor, in order.
        for _, t in bucket:
            dist.broadcast(t.detach().contiguous(), src=0, group=self._dist_group)
        for t in threads:
            t.join()
        if errs:
            raise errs[0]

    def write_disk_checkpoint(self, buckets: Iterable[WeightBucket], version) -> str:
        """Write buckets as ``model-0000k.safetensors`` (one file per bucket, with an index) plus the
        non-weight files of ``disk_template_dir`` (config, tokenizer) into ``disk_dir/v{version}``."""
        from safetensors.torch import save_file

        out = Path(self.disk_dir) / f"v{version}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if self.disk_template_dir:
            for f in Path(self.disk_template_dir).iterdir():
                if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")) \
                        and f.name != "model.safetensors.index.json":
                    shutil.copy2(f, out / f.name)
        weight_map, total = {}, 0
        for k, bucket in enumerate(buckets):
            if not bucket:
                continue
            fname = f"model-{k:05d}.safetensors"
            save_file({n: t.detach().contiguous().cpu() for n, t in bucket}, str(out / fname))
            for n, t in bucket:
                weight_map[n] = fname
                total += t.numel() * t.element_size()
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        return str(out)

    def update_weights_from_disk(self, model_path: str, version=None) -> None:
        """``/update_weights_from_disk`` on every server (sglang pauses / flushes itself for this one)."""
        self._each(lambda s: self._control(s, "/update_weights_from_disk", {
            "model_path": str(model_path), "weight_version": None if version is None else str(version)}))
        self.weight_version = version
        self._last_disk_path = str(model_path)
        for s in self.servers:
            s.stale_weights = False


# ---------------------------------------------------------------------- wire helpers (pure)
def sglang_sampling_params(sampling: SamplingParams, seed: int | None) -> dict:
    """``sampling_params`` of one ``/generate`` request (field names of sglang's ``SamplingParams``)."""
    p = {"n": 1, "temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
         "max_new_tokens": int(sampling.max_new_tokens)}
    if sampling.top_k > 0:
        p["top_k"] = int(sampling.top_k)
    if sampling.stop:
        p["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        p["stop_token_ids"] = list(sampling.stop_token_ids)
    if seed is not None:
        p["sampling_seed"] = int(seed)
    return p


def parse_generate_response(data, where: str = "") -> tuple[list[int], list[float], str, dict]:
    """(response ids, behaviour log-probs, "stop" | "length", meta_info) of a non-streamed /generate
    answer. Raises ``RetryableGeneration`` for an aborted request, ``SGLangError`` for a malformed one."""
    if isinstance(data, list):  # a batch answer for a single request
        if len(data) != 1:
            raise SGLangError(f"{where}: expected one generation, got {len(data)}")
        data = data[0]
    if not isinstance(data, dict) or "meta_info" not in data:
        raise SGLangError(f"{where}: /generate answer without meta_info: {str(data)[:300]}")
    meta = data["meta_info"]
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind == "abort":
        raise RetryableGeneration(f"{where}: generation aborted: {fr}")
    if kind not in ("stop", "length"):
        raise SGLangError(f"{where}: unexpected finish_reason {fr!r}")
    triples = meta.get("output_token_logprobs")
    if triples is None:
        raise SGLangError(f"{where}: meta_info has no output_token_logprobs (was return_logprob sent?)")
    ids, lps = [], []
    for k, tr in enumerate(triples):
        lp, tok = tr[0], tr[1]
        if lp is None:
            raise SGLangError(f"{where}: output token {k} has no logprob")
        ids.append(int(tok))
        lps.append(float(lp))
    out_ids = data.get("output_ids")
    if out_ids is not None and list(out_ids) != ids:
        raise SGLangError(f"{where}: output_ids and output_token_logprobs disagree")
    return ids, lps, kind, meta


def _rid(call: str, key: tuple[int, int]) -> str:
    return f"{call}-p{key[0]}-s{key[1]}"


def _tail(path: str | None, n: int = 2000) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - n))
        return fh.read().decode(errors="replace")
