"""``SGLangEngine``: rollouts from one or more SGLang servers (written against sglang 0.5.23) over
their native HTTP API.

Stdlib only (``http.client`` + threads); sglang itself is imported lazily and only to serialize
weights when it is installed (see ``sglang_wire.py``). The parts live in their own files:
``sglang_launch.py`` (command line, process group, log file), ``sglang_http.py`` (one HTTP call,
the retry helper, request / response shapes), ``sglang_weights.py`` (update session, transports).

- Servers: started here (``LaunchSpec``: one DP=1 server per slot, own process group, log file in
  the run directory) or attached by URL. ``/health`` is polled until it answers 200; TP and DP sizes
  come from ``/server_info`` (``/get_server_info`` on servers that predate it).
- Security: servers bind 127.0.0.1 unless a host is given; a non-loopback host needs an API key
  (``--api-key``), which the client sends as ``Authorization: Bearer <key>`` on every call.
- ``generate``: one ``POST /generate`` per sample (``input_ids``, ``sampling_params`` with ``n = 1``
  and a per-sample ``sampling_seed``, ``return_logprob``), spread over servers by worker threads that
  pull from one queue. Response tokens and behaviour log-probs come from
  ``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` triples), the finish reason from
  ``meta_info.finish_reason.type``. Results are keyed by (prompt, sample): a retried request can
  never produce a duplicate, and ``generate`` raises rather than return fewer samples.
  ``sampling_seed`` only makes sampling reproducible on servers started with
  ``--enable-deterministic-inference`` (``LaunchSpec.deterministic_inference``).
- Failure handling: a refused / reset / timed-out request marks its server suspect; the worker
  checks ``/health``, aborts a hung request (``/abort_request``), restarts the server if we launched
  it (kill its process group, relaunch, wait for health; at most ``max_restarts`` times), and puts
  the request back in the queue (at most ``max_retries`` tries per sample). An aborted generation
  (``finish_reason.type == "abort"``) is retried the same way. Every control call has a timeout.
- Colocated memory (``offload_tags``): after each ``generate`` the servers release those memory
  tags (``/release_memory_occupation``) so the trainer has the GPU; ``update_weights`` resumes
  "weights" before writing, ``generate`` resumes the rest first.
- After a restart a server holds its launch checkpoint again. If weights were pushed before, the
  engine re-loads the last disk checkpoint when there is one, else calls ``resync_fn(url)`` when
  given; otherwise samples from that server carry the server's own reported version (never the
  trainer's), so staleness is visible.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from erpd_megatron.rollout import sglang_wire
from erpd_megatron.rollout.engine import (
    RolloutEngine,
    Sample,
    SamplingParams,
    check_score_args,
    derive_seed,
    expand_requests,
)
from erpd_megatron.rollout.sglang_http import (  # noqa: F401 - re-exported
    NotFound,
    RetryableGeneration,
    ServerUnreachable,
    SGLangError,
    control,
    http_json,
    parse_generate_response,
    retry,
    run_each,
    sglang_sampling_params,
)
from erpd_megatron.rollout.sglang_launch import LaunchSpec, is_loopback, start_server, stop_server, tail
from erpd_megatron.rollout.sglang_weights import WeightUpdates

log = logging.getLogger(__name__)

API_KEY_ENV = "ERPD_SGLANG_API_KEY"
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def launch_spec(rollout_cfg, model_path: str, *, log_dir: str | None, api_key: str | None = None) -> LaunchSpec:
    """The ``LaunchSpec`` of a ``RolloutConfig``'s ``sglang_*`` fields (pure; nothing starts)."""
    g = lambda name, default: getattr(rollout_cfg, name, default) or default  # noqa: E731
    return LaunchSpec(model_path=str(model_path), tp=int(g("sglang_tp", 1)), num_servers=int(g("sglang_num_servers", 1)),
                      host=g("sglang_host", "127.0.0.1"), base_port=int(g("sglang_port", 30000)),
                      base_gpu_id=int(g("sglang_base_gpu_id", 0)),
                      mem_fraction_static=g("sglang_mem_fraction_static", None),
                      enable_memory_saver=bool(g("sglang_offload", False)),
                      deterministic_inference=bool(g("sglang_deterministic", False)),
                      api_key=api_key or os.environ.get(API_KEY_ENV) or None, python=g("sglang_python", None),
                      extra_args=tuple(g("sglang_extra_args", ())), log_dir=log_dir,
                      startup_timeout=float(g("sglang_startup_timeout", 1800.0)),
                      device=None if g("sglang_device", "auto") == "auto" else g("sglang_device", None))


def _set_event() -> threading.Event:
    e = threading.Event()
    e.set()
    return e


class RolloutError(RuntimeError):
    """``generate`` could not produce every requested sample."""


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
    session: bool | None = None
    """Has /begin_weight_update (None: not asked yet; False: older server, 404)."""
    in_group: bool = False
    """Its ranks are members of the current weight-update group (``distributed``)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    ready: threading.Event = field(default_factory=lambda: _set_event())
    """Cleared while the server restarts: workers wait instead of sending requests that fail and use up their
    retries (found with a real server, whose restart takes minutes on a loaded CPU)."""


class SGLangEngine(WeightUpdates, RolloutEngine):
    def __init__(self, urls: Sequence[str] | None = None, launch: LaunchSpec | None = None, *,
                 tp: int | None = None,
                 api_key: str | None = None,
                 weight_transport: str = "tensor",
                 bucket_layout: str = "typed",
                 pause_mode: str = "retract",
                 offload_tags: Sequence[str] | None = None,
                 request_timeout: float = 1800.0,
                 control_timeout: float = 600.0,
                 health_timeout: float = 30.0,
                 attach_timeout: float = 1800.0,
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
                 send_sampling_seed: bool = True,
                 allow_nccl_mismatch: bool = False):
        """Attach to ``urls`` or start servers from ``launch`` (exactly one of them).
        ``tp``: TP size of attached servers (default: read from ``/server_info``).
        ``api_key``: sent as a Bearer token (default: ``launch.api_key``, else $ERPD_SGLANG_API_KEY).
        ``weight_transport``: "tensor" (colocated, CUDA IPC: same node) | "distributed" (NCCL
        broadcast from this process) | "disk" (safetensors + ``/update_weights_from_disk``).
        ``bucket_layout``: "typed" (every 0.5.x) | "bytes" (newer 0.5.x, mixed dtypes per payload).
        ``pause_mode``: body of ``/pause_generation`` ("retract" | "abort" | "in_place").
        ``offload_tags``: memory tags released after each ``generate`` (colocated; servers need
        ``--enable-memory-saver``); None = keep everything resident.
        ``health_timeout``: one ``/health`` call. ``attach_timeout``: how long attached servers may take to
        answer ``/health`` at start (a batch script may have started them moments before: a large TP server
        loads and captures CUDA graphs for minutes, longer on a requeue); launched servers wait
        ``launch.startup_timeout``.
        ``send_sampling_seed``: send per-sample ``sampling_seed``. sglang 0.5.23 uses it only when
        started with ``--enable-deterministic-inference`` (which also selects its pytorch sampler);
        otherwise it is dropped and sampling is not reproducible. Set False for older servers whose
        flashinfer sampler asserts on seeds."""
        if (urls is None) == (launch is None):
            raise ValueError("SGLangEngine: give exactly one of urls= (attach) or launch= (start servers)")
        if weight_transport not in ("tensor", "distributed", "disk"):
            raise ValueError(f"weight_transport must be tensor|distributed|disk, got {weight_transport!r}")
        if bucket_layout not in sglang_wire.LAYOUTS:
            raise ValueError(f"bucket_layout must be one of {sglang_wire.LAYOUTS}, got {bucket_layout!r}")
        if weight_transport == "disk" and disk_dir is None:
            raise ValueError("weight_transport='disk' needs disk_dir=")
        bad = set(offload_tags or ()) - set(MEMORY_TAGS)
        if bad:
            raise ValueError(f"offload_tags must be among {MEMORY_TAGS}, got {sorted(bad)}")
        if launch is not None and launch.command is None and launch.log_dir is None:
            raise ValueError("LaunchSpec.log_dir is required (the server logs go into the run directory)")
        self.launch = launch
        self.api_key = api_key or (launch.api_key if launch else None) or os.environ.get(API_KEY_ENV) or None
        self.weight_transport = weight_transport
        self.bucket_layout = bucket_layout
        self.pause_mode = pause_mode
        self.offload_tags = tuple(offload_tags) if offload_tags else ()
        self.request_timeout = request_timeout
        self.control_timeout = control_timeout
        self.health_timeout = health_timeout
        self.attach_timeout = attach_timeout
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
        self._released: set[str] = set()
        self._dist_group = None
        self._dist_stale = False
        self._nccl_versions: dict[str, str | None] = {}
        self.allow_nccl_mismatch = allow_nccl_mismatch
        self._call_id = 0
        self._closed = False

        if urls is not None:
            self.servers = [_Server(url=u.rstrip("/"), index=k, tp=tp) for k, u in enumerate(urls)]
            remote = [s.url for s in self.servers if not is_loopback(_host(s.url))]
            if remote and not self.api_key:
                log.warning("attaching to %s without an API key: anyone on that network can update its weights "
                            "(start the servers with --api-key and set %s)", remote, API_KEY_ENV)
        else:
            self.servers = [_Server(url=launch.url(k), index=k, tp=launch.tp, argv=launch.argv(k))
                            for k in range(launch.num_servers)]
        try:
            if launch is not None:
                for s in self.servers:
                    self._start(s)
            for s in self.servers:
                self._wait_healthy(s, launch.startup_timeout if launch else self.attach_timeout)
                self._read_server_info(s)
        except BaseException:
            self.shutdown()  # never leave launched servers behind
            raise

    @classmethod
    def from_config(cls, rollout_cfg, model_path: str, *, log_dir: str | None = None, **kw) -> SGLangEngine:
        """From a ``RolloutConfig``: attach to ``sglang_urls`` when given, else launch
        ``sglang_num_servers`` servers of ``sglang_tp`` GPUs from ``model_path`` with the ``sglang_*``
        settings, logs into ``log_dir``. Keyword arguments override / add constructor arguments."""
        g = lambda name, default: getattr(rollout_cfg, name, default)  # noqa: E731
        kw.setdefault("weight_transport", g("sglang_weight_transport", "tensor"))
        kw.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)  # never from the config (it is saved)
        kw.setdefault("attach_timeout", float(g("sglang_startup_timeout", 1800.0)))
        kw.setdefault("allow_nccl_mismatch", bool(g("sglang_allow_nccl_mismatch", False)))
        if g("sglang_offload", False):
            kw.setdefault("offload_tags", tuple(g("sglang_offload_tags", ("kv_cache", "cuda_graph"))))
        urls = list(g("sglang_urls", []) or [])
        if kw["weight_transport"] == "distributed" and "dist_master_address" not in kw:
            # trainer rank 0 (this process) as the servers reach it: the address of our route to the first one
            kw["dist_master_address"] = g("sglang_dist_master_address", "") or (
                route_address(urls[0]) if urls else "127.0.0.1")
        if kw["weight_transport"] == "distributed" and "dist_master_port" not in kw:
            kw["dist_master_port"] = int(g("sglang_dist_master_port", 0) or 0) or _free_port()
        if urls:
            return cls(urls=urls, **kw)
        return cls(launch=launch_spec(rollout_cfg, model_path, log_dir=log_dir, api_key=kw.get("api_key")), **kw)

    # ------------------------------------------------------------------ process management
    def _start(self, s: _Server) -> None:
        log_dir = Path(self.launch.log_dir) if self.launch.log_dir else None
        if log_dir is None:  # tests with a command override only: a private directory, never a fixed /tmp name
            import tempfile

            log_dir = Path(tempfile.mkdtemp(prefix="erpd_sglang_"))
            self.launch.log_dir = str(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        s.log_path = str(log_dir / f"sglang_server{s.index}.log")
        s.proc = start_server(s.argv, s.log_path, self.launch.child_env(), f"start (epoch {s.epoch})",
                              secret=self.launch.api_key)
        s.alive = True

    def _stop(self, s: _Server, grace: float = 15.0) -> None:
        proc, s.proc = s.proc, None
        stop_server(proc, grace, log_path=s.log_path)

    def _wait_healthy(self, s: _Server, timeout: float) -> None:
        def once():
            if s.proc is not None and s.proc.poll() is not None:
                raise SGLangError(f"server {s.url} exited with code {s.proc.returncode} while starting; "
                                  f"log: {s.log_path}\n{tail(s.log_path)}")
            if not self._healthy(s):
                raise ServerUnreachable(f"{s.url}/health not 200 yet")

        try:
            retry(once, timeout=timeout, delay=0.25, max_delay=1.0, what=f"waiting for {s.url}")
        except SGLangError as e:
            if isinstance(e.__cause__, ServerUnreachable):
                raise SGLangError(f"server {s.url} not healthy after {timeout:.0f}s; log: {s.log_path}") from e
            raise

    def _healthy(self, s: _Server) -> bool:
        try:
            status, _ = http_json(s.url, "GET", "/health", timeout=self.health_timeout, api_key=self.api_key)
            return status == 200
        except ServerUnreachable:
            return False

    def _read_server_info(self, s: _Server) -> None:
        """TP / DP size from ``/server_info`` (``/get_server_info`` on older servers): sglang refuses
        weight updates from a server with dp_size > 1."""
        info = None
        for path in ("/server_info", "/get_server_info"):
            try:
                info = self._control(s, path, method="GET")
                break
            except NotFound:
                continue
        if not isinstance(info, dict):
            if s.tp is None:
                raise SGLangError(f"cannot read tp_size of {s.url} from /server_info; pass tp= to SGLangEngine")
            return
        if s.tp is None:
            if "tp_size" not in info:
                raise SGLangError(f"{s.url}/server_info has no tp_size; pass tp= to SGLangEngine")
            s.tp = int(info["tp_size"])
        dp = int(info.get("dp_size", 1) or 1)
        if dp > 1 and self.weight_transport != "disk":
            raise SGLangError(f"{s.url} runs dp_size={dp}: sglang refuses weight updates unless dp_size == 1; "
                              "start one DP=1 server per TP group instead")

    def _control(self, s: _Server, path: str, body: dict | None = None, method: str = "POST",
                 timeout: float | None = None):
        return control(s.url, path, body, method=method, timeout=timeout or self.control_timeout, api_key=self.api_key)

    @property
    def dtype(self):
        """The servers' weight dtype when this engine fixed it (``--dtype`` of launched servers: ``cpu_dtype`` on
        CPU, or one in ``extra_args``), else None (sglang's "auto": unknown here). The weights-arrived guard
        picks its tolerance from it (None: the loosest, bf16's)."""
        import torch

        if self.launch is None or self.launch.command is not None:
            return None
        args = list(self.launch.argv(0))
        name = args[len(args) - 1 - args[::-1].index("--dtype") + 1] if "--dtype" in args else None  # the last wins
        return getattr(torch, name, None) if name and name != "auto" else None

    def _server_nccl_version(self, s: _Server) -> str | None:
        """NCCL of a launched server's environment (its interpreter, asked once); None when attached."""
        if self.launch is None or self.launch.command is not None:
            return None
        python = self.launch.python or sys.executable
        if python not in self._nccl_versions:
            self._nccl_versions[python] = sglang_wire.interpreter_nccl_version(python)
        return self._nccl_versions[python]

    def _live(self) -> list[_Server]:
        return [s for s in self.servers if s.alive]

    def _recover(self, s: _Server, epoch_seen: int) -> bool:
        """After a failed call on incarnation ``epoch_seen``: True when the server is usable again. The caller
        cleared ``s.ready`` (no worker sends to it meanwhile); it is set again whatever the outcome."""
        try:
            return self._recover_locked(s, epoch_seen)
        finally:
            s.ready.set()

    def _recover_locked(self, s: _Server, epoch_seen: int) -> bool:
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
            s.session = None
            self._start(s)
            try:
                self._wait_healthy(s, self.launch.startup_timeout)
            except SGLangError as e:
                log.error("%s", e)
                s.alive = False
                return False
            s.in_group = False  # its ranks left the update group: the next update rebuilds it everywhere
            if self._dist_group is not None:
                self._dist_stale = True
            if self.weight_version is not None:
                self._resync(s)
            return True

    def _resync(self, s: _Server) -> None:
        if self._last_disk_path is not None:
            self._reload_disk(s)
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
        if "weights" in self._released:
            raise RolloutError("the servers' weights were released (offload_tags) and not pushed again since: "
                               "call update_weights before generate")
        self._resume_released(MEMORY_TAGS)
        try:
            return self._generate(prompt_ids, sampling)
        finally:
            if self.offload_tags and not self._closed:  # colocated: hand the memory to the trainer
                self.release_memory(self.offload_tags)

    def _generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Sample]:
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
                while not s.ready.wait(0.5):  # restarting: a request now would fail and count as a retry
                    if done():
                        return
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
                    s.ready.clear()  # hold this server's other workers until it is checked / restarted
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
        from erpd_megatron.utils.console import progress

        with progress(total=len(keys), desc="sampling (sglang)", unit="sample") as bar:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():  # the main thread only waits: it moves the bar as samples arrive
                    t.join(0.5)
                    bar.update(len(results) - bar.n)
            bar.update(len(results) - bar.n)
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
        status, data = http_json(s.url, "POST", "/generate", body, timeout=self.request_timeout, api_key=self.api_key)
        if status == 503:
            raise RetryableGeneration(f"{s.url}/generate: 503 {data}")
        if status != 200:
            raise SGLangError(f"{s.url}/generate: HTTP {status}: {data}")
        return self._parse_generation(s, data, key)

    def _parse_generation(self, s: _Server, data, key: tuple[int, int]) -> Sample:
        ids, logprobs, reason, meta = parse_generate_response(data, where=f"{s.url} rid {_rid('', key)}")
        server_version = meta.get("weight_version")
        version = server_version if s.stale_weights else self.weight_version
        return Sample(prompt_index=key[0], sample_index=key[1], response_ids=ids, logprobs=logprobs,
                      finish_reason=reason, weight_version=version,
                      info={"server": s.url, "server_weight_version": server_version,
                            "matched_stop": (meta.get("finish_reason") or {}).get("matched")})

    def _abort_quietly(self, s: _Server, rid: str) -> None:
        try:
            http_json(s.url, "POST", "/abort_request", {"rid": rid}, timeout=min(5.0, self.control_timeout),
                      api_key=self.api_key)
        except SGLangError:
            pass

    # ------------------------------------------------------------------ scoring (the weights-arrived guard)
    def score_logprobs(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                       temperature: float = 1.0) -> list[list[float]]:
        """See ``RolloutEngine.score_logprobs``. One ``POST /generate`` per sequence: ``input_ids``,
        ``sampling_params.max_new_tokens = 0`` (prefill only), ``return_logprob`` and ``logprob_start_len =
        prompt_len - 1``. sglang 0.5.23 answers ``meta_info.input_token_logprobs``, one ``[logprob, token_id, text]``
        per input token from ``logprob_start_len`` on, the first one's logprob None
        (managers/scheduler_components/logprob_result_processor.py: ``[None] + input_token_logprobs[:-1]``): entries
        1.. are the tokens from ``prompt_len`` on. Their token ids are checked against the sequence. Sequence k goes
        to live server k mod (live servers), so with as many sequences as servers every server is checked. sglang
        computes prompt log-probs from untempered logits (layers/logprob_processor.py): temperature must be 1."""
        self._check_open()
        check_score_args(sequences, prompt_lens)
        if temperature != 1.0:
            raise ValueError("SGLangEngine.score_logprobs: sglang computes prompt log-probs from untempered logits; "
                             f"temperature must be 1, got {temperature}")
        live = self._live()
        if not live:
            raise RolloutError("no live SGLang server")
        self._resume_released(MEMORY_TAGS)
        try:
            return [self._score_one(live[k % len(live)], [int(t) for t in seq], int(p), k)
                    for k, (seq, p) in enumerate(zip(sequences, prompt_lens))]
        finally:
            if self.offload_tags and not self._closed:  # colocated: hand the memory back to the trainer
                self.release_memory(self.offload_tags)

    def _score_one(self, s: _Server, seq: list[int], prompt_len: int, k: int) -> list[float]:
        body = {"rid": f"erpd{os.getpid()}-score{k}-{uuid.uuid4().hex[:6]}", "input_ids": seq,
                "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}, "return_logprob": True,
                "logprob_start_len": prompt_len - 1, "stream": False}
        where = f"{s.url}/generate (scoring sequence {k})"
        status, data = http_json(s.url, "POST", "/generate", body, timeout=self.request_timeout, api_key=self.api_key)
        if status != 200:
            raise SGLangError(f"{where}: HTTP {status}: {data}")
        entries = (data.get("meta_info") or {}).get("input_token_logprobs") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise SGLangError(f"{where}: no meta_info.input_token_logprobs in the answer: {str(data)[:300]}")
        want = seq[prompt_len - 1:]
        got = [int(e[1]) for e in entries]
        if got != want or any(e[0] is None for e in entries[1:]):
            raise SGLangError(f"{where}: input_token_logprobs holds tokens {got[:8]}... ({len(got)}), expected "
                              f"{want[:8]}... ({len(want)}) with a log-prob from the second on")
        return [float(e[0]) for e in entries[1:]]

    # ------------------------------------------------------------------ control calls
    def pause(self) -> None:
        run_each(self._live(), lambda s: self._control(s, "/pause_generation", {"mode": self.pause_mode}))

    def resume(self) -> None:
        run_each(self._live(), lambda s: self._control(s, "/continue_generation", {}))

    def flush_cache(self, attempts: int = 20) -> None:
        """``/flush_cache`` answers 400 while requests are still running: retry briefly."""
        def flush(s):
            def once():
                status, data = http_json(s.url, "POST", "/flush_cache", None, timeout=self.control_timeout,
                                         api_key=self.api_key)
                if status != 200:
                    raise _Busy(f"{s.url}/flush_cache: HTTP {status}: {data}")
            retry(once, retry_on=(_Busy,), attempts=attempts, what=f"{s.url}/flush_cache")
        run_each(self._live(), flush)

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        body = {} if tags is None else {"tags": list(tags)}
        run_each(self._live(), lambda s: self._control(s, "/release_memory_occupation", body))
        self._released |= set(tags or MEMORY_TAGS)

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        body = {} if tags is None else {"tags": list(tags)}
        run_each(self._live(), lambda s: self._control(s, "/resume_memory_occupation", body))
        self._released -= set(tags or MEMORY_TAGS)

    def _resume_released(self, tags: Sequence[str]) -> None:
        """Resume those of ``tags`` that this engine released (in sglang's tag order)."""
        todo = [t for t in MEMORY_TAGS if t in tags and t in self._released]
        if todo:
            self.resume_memory(todo)

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


class _Busy(SGLangError):
    """``/flush_cache`` refused while requests still run."""


def _rid(call: str, key: tuple[int, int]) -> str:
    return f"{call}-p{key[0]}-s{key[1]}"


def route_address(url: str) -> str:
    """This host's address on the route to ``url``'s host (a UDP "connect" sends nothing)."""
    import socket

    host, port = _host(url), urlsplit(url).port or 80
    if is_loopback(host):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, port))
            return sock.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _free_port() -> int:
    """A free TCP port on this host (trainer rank 0 hosts the weight-update group's store)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _host(url: str) -> str:
    return urlsplit(url).hostname or ""
