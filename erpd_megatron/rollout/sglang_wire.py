"""SGLang 0.5.x weight-update wire format, written from its source (no sglang import needed).

Read in sglang 0.5.23 (and cross-checked against earlier 0.5.x files in the search index):
- ``POST /update_weights_from_tensor`` body (``UpdateWeightsFromTensorReqInput``):
  ``{"serialized_named_tensors": [str per TP rank], "load_format": "flattened_bucket",
  "flush_cache": bool, "abort_all_requests": bool, "weight_version": str | null}``.
  TP rank r deserializes entry r with ``MultiprocessingSerializer.deserialize``: base64 ->
  ``ForkingPickler`` payload, loaded by ``SafeUnpickler`` whose allowlist admits torch rebuild
  functions and ``sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata``, nothing of ours.
- With ``load_format == "flattened_bucket"`` the payload is ``{"flattened_tensor": Tensor,
  "metadata": [FlattenedTensorMetadata(name, shape: torch.Size, dtype: torch.dtype, start_idx,
  end_idx, numel)]}`` and the server rebuilds each tensor as ``flat[start:end]`` reshaped
  (earlier 0.5.x: ``.reshape(shape).to(dtype)`` with element offsets into a one-dtype tensor;
  later 0.5.x: ``.view(dtype).reshape(shape)`` over a uint8 tensor with byte offsets).
  Layout ``"typed"`` (our default: one dtype per payload, element offsets) is read correctly by
  both rules; layout ``"bytes"`` (uint8, mixed dtypes) only by the newer one.
- ``POST /init_weights_update_group``: ``{"master_address", "master_port", "rank_offset",
  "world_size", "group_name", "backend"}``; server TP rank r joins as rank ``rank_offset + r`` of a
  fresh process group created like ``init_custom_process_group`` below (tcp:// rendezvous whose
  rank 0, the trainer, hosts the store; ``PrefixStore(group_name)``; ``_new_process_group_helper``).
- ``POST /update_weights_from_distributed``: ``{"names", "dtypes" (e.g. "bfloat16"), "shapes",
  "group_name", "flush_cache", "weight_version"}``; the server posts one ``broadcast(src=0)`` per
  tensor, in list order, into ``torch.empty(shape, dtype)``.

Serialization uses sglang's own ``MultiprocessingSerializer`` / ``FlattenedTensorMetadata`` when
sglang is importable, after ``sglang.srt.utils.patch_torch.monkey_patch_torch_reductions()``: the
serializer itself does not patch anything, and torch's CUDA-IPC reducer sends the raw device index,
which names another GPU when trainer and server see different ``CUDA_VISIBLE_DEVICES``. The patch
sends the device UUID instead and names ``patch_torch._rebuild_cuda_tensor_modified`` as the
rebuild function, which the server (it calls the same patch before deserializing) maps back to its
own index. Without sglang a pure-Python ``ForkingPickler`` twin does the same: it writes the
metadata class under sglang's module path and CUDA tensors as (UUID, sglang's rebuild function),
so the bytes are what a patched sglang process would produce.

CPU tensors (a server on CPU, the tests) travel as shared-memory handles, and only torch's "file_system"
sharing strategy gives handles an independently started server can open: under the default
"file_descriptor" strategy the server fetches the fd from our resource sharer, which checks a process-family
key the server does not have, and sglang's scheduler dies ("AuthenticationError: digest sent was rejected";
seen with a real 0.5.23 server). ``serialize`` therefore switches this process to "file_system" when a payload
holds CPU tensors (process-wide: torch reads the strategy at pickling time), and starts torch's
``torch_shm_manager`` daemon (which that strategy needs) with stdin / stdout / stderr on /dev/null: it outlives
us and would otherwise keep our stdout open, so a piped command (``make test | tee``) would hang after we exit.
"""

from __future__ import annotations

import base64
import copyreg
import io
import os
import pickle
import sys
import threading
import types
from dataclasses import dataclass
from datetime import timedelta

import torch

SGLANG_BUCKET_MODULE = "sglang.srt.weight_sync.tensor_bucket"
LAYOUTS = ("typed", "bytes")
_BYTES_ALIGN = 16


@dataclass
class FlattenedTensorMetadata:
    """Field-for-field twin of sglang's ``FlattenedTensorMetadata`` (pickled under sglang's name)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


SGLANG_PATCH_MODULE = "sglang.srt.utils.patch_torch"
_DEVICE_ARG = 6  # index of storage_device in torch's rebuild_cuda_tensor arguments (as sglang's patch)


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _rebuild_cuda_tensor_by_uuid(*args):
    """Local twin of sglang's ``_rebuild_cuda_tensor_modified``: device UUID -> this process's index."""
    from torch.multiprocessing import reductions

    dev = args[_DEVICE_ARG]
    if isinstance(dev, str):
        matches = [i for i in range(torch.cuda.device_count()) if _device_uuid(i) == dev]
        if not matches:
            raise RuntimeError(f"no visible CUDA device has uuid {dev}")
        args = (*args[:_DEVICE_ARG], matches[0], *args[_DEVICE_ARG + 1:])
    return reductions.rebuild_cuda_tensor(*args)


def _reduce_tensor_by_uuid(t):
    """torch's tensor reducer, with a CUDA tensor's device index replaced by the device UUID and the
    rebuild function by sglang's UUID-aware one (what ``monkey_patch_torch_reductions`` does)."""
    from torch.multiprocessing import reductions

    fn, args = reductions.reduce_tensor(t)
    if fn is reductions.rebuild_cuda_tensor and isinstance(args[_DEVICE_ARG], int):
        args = (*args[:_DEVICE_ARG], _device_uuid(args[_DEVICE_ARG]), *args[_DEVICE_ARG + 1:])
        fn = _rebuild_cuda_tensor_by_uuid
    return fn, args


def _patch_sglang_reductions() -> None:
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()  # idempotent


def _sglang_classes():
    """sglang's (MultiprocessingSerializer, FlattenedTensorMetadata), or None when not importable."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata as SglMeta
    except Exception:  # ImportError, or one of sglang's own deps missing / failing on this host
        return None
    return MultiprocessingSerializer, SglMeta


# ---------------------------------------------------------------------- flattened buckets
def flatten_bucket(named_tensors: list[tuple[str, torch.Tensor]], layout: str = "typed",
                   meta_cls=FlattenedTensorMetadata) -> list[dict]:
    """Payload dicts ``{"flattened_tensor", "metadata"}`` for one bucket: one per dtype ("typed") or a
    single uint8 one ("bytes"). Tensors are flattened contiguously in input order."""
    if layout not in LAYOUTS:
        raise ValueError(f"flattened-bucket layout must be one of {LAYOUTS}, got {layout!r}")
    if not named_tensors:
        return []
    if layout == "bytes":
        groups = [named_tensors]
    else:
        by_dtype: dict[torch.dtype, list] = {}
        for name, t in named_tensors:
            by_dtype.setdefault(t.dtype, []).append((name, t))
        groups = list(by_dtype.values())
    payloads = []
    for group in groups:
        flats, metas, offset = [], [], 0
        for name, t in group:
            flat = t.detach().contiguous().reshape(-1)
            if layout == "bytes":
                flat = flat.view(torch.uint8)
                pad = -offset % _BYTES_ALIGN  # the receiver views [start:end] as dtype: keep starts aligned
                if pad:
                    flats.append(torch.zeros(pad, dtype=torch.uint8, device=flat.device))
                    offset += pad
            n = flat.numel()
            metas.append(meta_cls(name=name, shape=torch.Size(t.shape), dtype=t.dtype,
                                  start_idx=offset, end_idx=offset + n, numel=n))
            flats.append(flat)
            offset += n
        payloads.append({"flattened_tensor": torch.cat(flats), "metadata": metas})
    return payloads


def reconstruct_bucket(payload: dict) -> list[tuple[str, torch.Tensor]]:
    """Inverse of ``flatten_bucket``, by the same rules as sglang's ``reconstruct_tensors`` (both versions)."""
    flat = payload["flattened_tensor"]
    out = []
    for m in payload["metadata"]:
        piece = flat[m.start_idx:m.end_idx]
        if flat.dtype == torch.uint8 and m.dtype != torch.uint8:
            piece = piece.view(m.dtype)  # newer layout: byte offsets
        out.append((m.name, piece.reshape(m.shape).to(m.dtype)))
    return out


# ---------------------------------------------------------------------- (de)serialization
class _SGLangCompatPickler(pickle._Pickler):
    """``ForkingPickler`` (torch's shared-memory / CUDA-IPC tensor reducers) in pure Python, writing our
    metadata twin as ``sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata``."""

    def __init__(self, file):
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401 - registers torch's reducers with ForkingPickler

        super().__init__(file, protocol=pickle.DEFAULT_PROTOCOL)
        self.dispatch_table = copyreg.dispatch_table.copy()
        self.dispatch_table.update(ForkingPickler._extra_reducers)
        self.dispatch_table[torch.Tensor] = _reduce_tensor_by_uuid
        self.dispatch_table[torch.nn.Parameter] = _reduce_tensor_by_uuid
        # pickle's dispatch maps functions to the base class's save_global: route them through ours
        self.dispatch = {**pickle._Pickler.dispatch, types.FunctionType: type(self).save_global}

    def save_global(self, obj, name=None):
        where = {FlattenedTensorMetadata: (SGLANG_BUCKET_MODULE, "FlattenedTensorMetadata"),
                 _rebuild_cuda_tensor_by_uuid: (SGLANG_PATCH_MODULE, "_rebuild_cuda_tensor_modified")}.get(obj)
        if where is not None:
            self.save(where[0])
            self.save(where[1])
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


_SHM_MANAGER_LOCK = threading.Lock()
_shm_manager_started = False


def share_cpu_tensors_by_name() -> None:
    """Make CPU tensors pickle as named shared memory that another process tree can open (module docstring)."""
    global _shm_manager_started
    import torch.multiprocessing as mp

    if mp.get_sharing_strategy() != "file_system":
        mp.set_sharing_strategy("file_system")
    with _SHM_MANAGER_LOCK:
        if _shm_manager_started:
            return
        # The first file_system share starts torch_shm_manager, which inherits fds 0-2: hand it /dev/null.
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        saved = [os.dup(fd) for fd in (0, 1, 2)]
        null = os.open(os.devnull, os.O_RDWR)
        try:
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            torch.empty(1).share_memory_()
        finally:
            for fd, old in zip((0, 1, 2), saved):
                os.dup2(old, fd)
                os.close(old)
            os.close(null)
        _shm_manager_started = True


def _holds_cpu_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if isinstance(obj, dict):
        return any(_holds_cpu_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_cpu_tensor(v) for v in obj)
    return False


def serialize(obj, *, use_sglang: bool | None = None) -> str:
    """base64 text of a ForkingPickler payload, as ``MultiprocessingSerializer.serialize(obj, output_str=True)``.
    ``use_sglang``: None = sglang's serializer when importable, else ours; True/False forces. CPU tensors are
    shared by name (``share_cpu_tensors_by_name``)."""
    if _holds_cpu_tensor(obj):
        share_cpu_tensors_by_name()
    sgl = _sglang_classes() if use_sglang in (None, True) else None
    if use_sglang and sgl is None:
        raise ImportError("serialize(use_sglang=True): sglang.srt.utils is not importable here")
    if sgl is not None:
        serializer, sgl_meta = sgl
        _patch_sglang_reductions()  # the serializer does not: without it CUDA tensors carry raw device indices
        obj = _convert_meta(obj, sgl_meta)
        return serializer.serialize(obj, output_str=True)
    buf = io.BytesIO()
    _SGLangCompatPickler(buf).dump(_convert_meta(obj, FlattenedTensorMetadata))
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _convert_meta(obj, meta_cls):
    """Swap metadata objects (ours <-> sglang's) inside a flattened-bucket payload dict."""
    if isinstance(obj, dict) and "metadata" in obj:
        metas = [m if isinstance(m, meta_cls) else meta_cls(m.name, m.shape, m.dtype, m.start_idx, m.end_idx, m.numel)
                 for m in obj["metadata"]]
        return {**obj, "metadata": metas}
    return obj


# The globals sglang 0.5.23's SafeUnpickler admits that a weight payload actually uses.
_ALLOWED_GLOBALS = {
    "torch": None,  # dtypes, Size, storages (checked by name below)
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"},
    "torch.multiprocessing.reductions": {"rebuild_tensor", "rebuild_cuda_tensor", "rebuild_storage_fd",
                                         "rebuild_storage_filename", "rebuild_storage_empty",
                                         "rebuild_typed_storage", "rebuild_typed_storage_child",
                                         "rebuild_meta_tensor"},
    "torch.storage": {"UntypedStorage", "TypedStorage", "_UntypedStorage"},
    "multiprocessing.resource_sharer": {"DupFd"},
    "copyreg": {"__newobj__", "__newobj_ex__"},
    "builtins": {"dict", "list", "tuple", "int", "float", "str", "bytes", "bool", "slice"},
    "collections": {"OrderedDict"},
    "sglang.srt.utils.patch_torch": {"_rebuild_cuda_tensor_modified"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Decoder for tests and debugging: admits roughly sglang's SafeUnpickler allowlist and maps
    sglang's metadata class to our twin (so sglang need not be installed)."""

    def find_class(self, module, name):
        if (module, name) == (SGLANG_BUCKET_MODULE, "FlattenedTensorMetadata"):
            return FlattenedTensorMetadata
        if (module, name) == (SGLANG_PATCH_MODULE, "_rebuild_cuda_tensor_modified"):
            return _rebuild_cuda_tensor_by_uuid
        allowed = _ALLOWED_GLOBALS.get(module, set())
        if module == "torch":
            if (isinstance(getattr(torch, name, None), torch.dtype) or name in ("Size", "Tensor", "device")
                    or name.endswith("Storage")):
                return super().find_class(module, name)
        elif name in allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"blocked global {module}.{name} (not in sglang's weight-payload allowlist)")


def deserialize(data: str | bytes, *, use_sglang: bool | None = None):
    """Inverse of ``serialize``: sglang's ``MultiprocessingSerializer.deserialize`` when importable (or
    forced), else an allowlisted unpickler of our own."""
    sgl = _sglang_classes() if use_sglang in (None, True) else None
    if use_sglang and sgl is None:
        raise ImportError("deserialize(use_sglang=True): sglang.srt.utils is not importable here")
    if sgl is not None:
        _patch_sglang_reductions()  # as the server does before deserializing: device UUIDs -> local indices
        return sgl[0].deserialize(data)
    raw = base64.b64decode(data, validate=True) if isinstance(data, str) else bytes(data)
    return _RestrictedUnpickler(io.BytesIO(raw)).load()


# ---------------------------------------------------------------------- distributed weight updates
NCCL_VERSION_CODE = "import torch; v = torch.cuda.nccl.version(); print('.'.join(map(str, v)) if isinstance(v, tuple) else v)"


def nccl_version() -> str | None:
    """This process's NCCL version as "2.27.5" (torch's bundled build), None when torch has none."""
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # a CPU-only torch build
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def interpreter_nccl_version(python: str, timeout: float = 120.0) -> str | None:
    """The NCCL version of another environment's torch (a launched server's interpreter), None if unknown."""
    import subprocess

    try:
        out = subprocess.run([python, "-c", NCCL_VERSION_CODE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None

def dtype_name(dtype: torch.dtype) -> str:
    """sglang resolves dtypes with ``getattr(torch, name)``: "bfloat16", not "torch.bfloat16"."""
    return str(dtype).removeprefix("torch.")


def init_custom_process_group(*, backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: timedelta = timedelta(minutes=10)):
    """A process group outside the default world (trainer rank 0 + every inference TP rank), created the
    way sglang's ``init_custom_process_group`` does so both sides agree on store keys."""
    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                           group_name=group_name, backend_options=None, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
