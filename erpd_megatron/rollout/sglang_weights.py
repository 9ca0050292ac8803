"""Weight updates of ``SGLangEngine``: the update session and the three transports.

A mixin: ``SGLangEngine`` supplies ``servers``, ``_control``, ``_live``, ``pause`` / ``resume`` /
``flush_cache`` and the settings read here. One update (``update_weights``) for "tensor" and
"distributed":

    /pause_generation -> /flush_cache -> /begin_weight_update -> buckets -> /end_weight_update
    -> /flush_cache -> /continue_generation

sglang 0.5.23 refuses ``update_weights_from_tensor`` / ``_from_distributed`` outside a session
(``SchedulerWeightUpdaterManager`` asserts an open ``begin_weight_update`` session); servers from
before the session endpoints answer 404 to ``/begin_weight_update``: that server then gets the
older protocol (no session calls), remembered per server. "disk" needs no session
(``update_weights_from_disk`` pauses and flushes by itself).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from erpd_megatron.rollout import sglang_wire
from erpd_megatron.rollout.engine import WeightBucket
from erpd_megatron.rollout.sglang_http import NotFound, SGLangError, run_each

log = logging.getLogger(__name__)


def _version(version) -> str | None:
    return None if version is None else str(version)


def check_nccl_versions(trainer: str | None, servers: dict[str, str | None], *, allow: bool = False) -> None:
    """Log the NCCL versions of the trainer and of every server joining the update group; a server whose known
    version differs from the trainer's stops the update (``SGLangError``) unless ``allow``."""
    log.info("weight-update group: NCCL %s on the trainer; %s", trainer or "unknown",
             ", ".join(f"{u}: {v or 'unknown (attached; not checked)'}" for u, v in servers.items()))
    bad = {u: v for u, v in servers.items() if v and trainer and v != trainer}
    if not bad:
        return
    msg = (f"NCCL version mismatch in the weight-update group: trainer {trainer}, servers {bad}; NCCL does not "
           "promise communicators across versions (align the two environments' torch / nvidia-nccl builds, or set "
           "rollout.sglang_allow_nccl_mismatch=true to try anyway)")
    if not allow:
        raise SGLangError(msg)
    log.warning("%s -- continuing (allowed)", msg)


class WeightUpdates:
    # ------------------------------------------------------------------ session
    def _begin_session(self, s) -> None:
        if s.session is False:  # known to predate the session endpoints
            return
        try:
            self._control(s, "/begin_weight_update", {})
            s.session = True
        except NotFound:
            log.info("%s has no /begin_weight_update (sglang before the update session): older protocol", s.url)
            s.session = False

    def _end_session(self, s) -> None:
        if s.session:
            self._control(s, "/end_weight_update", {})

    # ------------------------------------------------------------------ one update
    def update_weights(self, buckets: Iterable[WeightBucket], version: int | str | None = None) -> None:
        self._check_open()
        if self.weight_transport == "disk":
            path = self.write_disk_checkpoint(buckets, version)
            self._resume_released(("weights",))
            self.update_weights_from_disk(path, version)
            return
        self._resume_released(("weights",))  # colocated: weights memory back before writing into it
        self.pause()
        try:
            self._flush_unless_released()
            opened = []
            try:
                for s in self._live():
                    self._begin_session(s)
                    opened.append(s)
                for bucket in buckets:
                    if not bucket:
                        continue
                    if self.weight_transport == "tensor":
                        self._push_tensor_bucket(bucket, version)
                    else:
                        self._push_distributed_bucket(bucket, version)
            finally:
                # Close what was opened even after a failure: a server left in a session refuses the next begin.
                run_each(opened, self._end_session)
            self._flush_unless_released()
        finally:
            self.resume()
        self._weights_pushed(version, disk_path=None)

    def _flush_unless_released(self) -> None:
        # A released KV cache was flushed by the release itself and nothing has run since; flushing
        # again would touch the paused pool.
        if "kv_cache" not in self._released:
            self.flush_cache()

    def _weights_pushed(self, version, disk_path: str | None) -> None:
        self.weight_version = version
        self._last_disk_path = disk_path
        self._released.discard("weights")
        for s in self.servers:
            s.stale_weights = False

    # ------------------------------------------------------------------ "tensor" (colocated, CUDA IPC)
    def _push_tensor_bucket(self, bucket: WeightBucket, version) -> None:
        for payload in sglang_wire.flatten_bucket(bucket, self.bucket_layout):
            def send(s, payload=payload):
                # One serialization per TP rank: each rank consumes its own handles (as sglang's Engine does).
                body = {"serialized_named_tensors": [sglang_wire.serialize(payload) for _ in range(s.tp)],
                        "load_format": "flattened_bucket", "flush_cache": False, "abort_all_requests": False,
                        "weight_version": _version(version)}
                self._control(s, "/update_weights_from_tensor", body)
            run_each(self._live(), send)

    def update_weights_from_serialized(self, payloads_per_rank: Sequence[str], version=None, server: int = 0) -> None:
        """Low-level: post payloads already serialized per TP rank (e.g. gathered from the trainer ranks
        that share GPUs with server ``server``), as ``flattened_bucket``. The caller pauses and opens the
        session (``begin_update`` / ``end_update``)."""
        self._control(self.servers[server], "/update_weights_from_tensor",
                      {"serialized_named_tensors": list(payloads_per_rank), "load_format": "flattened_bucket",
                       "flush_cache": False, "weight_version": _version(version)})

    def begin_update(self) -> None:
        """For ``update_weights_from_serialized`` callers: pause, flush, open the session everywhere."""
        self._resume_released(("weights",))
        self.pause()
        self._flush_unless_released()
        run_each(self._live(), self._begin_session)

    def end_update(self, version=None) -> None:
        run_each(self._live(), self._end_session)
        self._flush_unless_released()
        self.resume()
        self._weights_pushed(version, disk_path=None)

    # ------------------------------------------------------------------ "distributed" (NCCL broadcast)
    def _ensure_dist_group(self) -> None:
        if self._dist_group is not None and not self._dist_stale:
            return
        if self.dist_master_port is None:
            raise ValueError("weight_transport='distributed' needs dist_master_port=")
        if self._dist_group is not None:
            self._destroy_dist_group()
        live = self._live()
        self._check_nccl(live)
        world = 1 + sum(s.tp for s in live)
        offsets, off = {}, 1
        for s in live:
            offsets[s.index], off = off, off + s.tp
        init_method = f"tcp://{self.dist_master_address}:{self.dist_master_port}"

        def join(s):
            self._control(s, "/init_weights_update_group", {
                "master_address": self.dist_master_address, "master_port": self.dist_master_port,
                "rank_offset": offsets[s.index], "world_size": world,
                "group_name": self.dist_group_name, "backend": self.dist_backend})

        # The servers block in rendezvous until rank 0 (us) joins: post from threads, join here.
        group = {}

        def me():
            group["pg"] = sglang_wire.init_custom_process_group(
                backend=self.dist_backend, init_method=init_method, world_size=world, rank=0,
                group_name=self.dist_group_name)

        run_each(live, join, meanwhile=me)
        self._dist_group = group["pg"]
        self._dist_stale = False
        for s in live:
            s.in_group = True

    def _destroy_dist_group(self) -> None:
        """After a server restart the group lost members: the survivors and this process destroy their side
        (``/destroy_weights_update_group``, ``destroy_process_group``) so that a new group can be created under
        the same name -- torch refuses a second group of a name that still exists, on both sides. A survivor
        that answers "does not exist" (or fails) is logged and left: the new group uses the same name anyway."""
        import torch.distributed as dist

        def leave(s):
            try:
                self._control(s, "/destroy_weights_update_group", {"group_name": self.dist_group_name})
            except SGLangError as e:
                log.warning("%s: destroying the old weight-update group failed: %s", s.url, e)
            s.in_group = False

        run_each([s for s in self._live() if s.in_group], leave)
        try:
            dist.destroy_process_group(self._dist_group)
        except Exception as e:  # a peer is gone: the local teardown may complain, the name is released anyway
            log.warning("destroying the old weight-update group: %s", e)
        self._dist_group = None

    def _check_nccl(self, live) -> None:
        """NCCL promises nothing across versions: log both sides' at group creation and refuse a known mismatch
        unless ``allow_nccl_mismatch``. Server versions are known for launched servers (their interpreter is
        asked once); attached ones are unknown here (logged, not refused)."""
        if self.dist_backend != "nccl":
            return
        mine = sglang_wire.nccl_version()
        theirs = {s.url: self._server_nccl_version(s) for s in live}
        check_nccl_versions(mine, theirs, allow=self.allow_nccl_mismatch)

    def _push_distributed_bucket(self, bucket: WeightBucket, version) -> None:
        import torch.distributed as dist

        self._ensure_dist_group()
        body = {"names": [n for n, _ in bucket], "dtypes": [sglang_wire.dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.dist_group_name,
                "flush_cache": False, "weight_version": _version(version)}

        def broadcast():
            # Same order as the names list: the servers post one broadcast per tensor, in order.
            for _, t in bucket:
                dist.broadcast(t.detach().contiguous(), src=0, group=self._dist_group)

        run_each(self._live(), lambda s: self._control(s, "/update_weights_from_distributed", body),
                 meanwhile=broadcast)

    # ------------------------------------------------------------------ "disk"
    def write_disk_checkpoint(self, buckets: Iterable[WeightBucket], version) -> str:
        """Write buckets as ``model-0000k.safetensors`` (one file per bucket, with an index) plus the
        non-weight files of ``disk_template_dir`` (config, tokenizer) into ``disk_dir/v{version}``."""
        from safetensors.torch import save_file

        from erpd_megatron.utils.io import copy_file, follow_umask

        out = Path(self.disk_dir) / f"v{version}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if self.disk_template_dir:
            for f in Path(self.disk_template_dir).iterdir():
                if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")) \
                        and f.name != "model.safetensors.index.json":
                    copy_file(f, out / f.name)  # the umask's mode (run-dir rule), not the template's
        weight_map, total = {}, 0
        for k, bucket in enumerate(buckets):
            if not bucket:
                continue
            fname = f"model-{k:05d}.safetensors"
            save_file({n: t.detach().contiguous().cpu() for n, t in bucket}, str(out / fname))
            follow_umask(out / fname)  # safetensors creates its files 0600
            for n, t in bucket:
                weight_map[n] = fname
                total += t.numel() * t.element_size()
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        return str(out)

    def update_weights_from_disk(self, model_path: str, version=None) -> None:
        """``/update_weights_from_disk`` on every server (sglang pauses / flushes itself for this one)."""
        run_each(self._live(), lambda s: self._control(s, "/update_weights_from_disk", {
            "model_path": str(model_path), "weight_version": _version(version)}))
        self._weights_pushed(version, disk_path=str(model_path))

    def _reload_disk(self, s) -> None:
        if self._last_disk_path is None:
            raise SGLangError("no disk checkpoint to reload")
        self._control(s, "/update_weights_from_disk",
                      {"model_path": self._last_disk_path, "weight_version": _version(self.weight_version)})
