"""Megatron side of the converters: stream tensors into / out of erpd dist checkpoints without a real model.

The checkpoint is exactly what `erpd_megatron.megatron.checkpoint` writes and loads (megatron
dist_checkpointing, torch_dist backend, keys from the model's own `sharded_state_dict()`, so any TP/PP can
load it). To get those keys without memory for the weights, the converter builds the model on the META
device at TP=1/PP=1 in a single process, takes its sharded state dict, and saves it with a planner that
resolves each chunk lazily: the chunk's meta view (shape, strides, offset into its parameter) is applied to
the full tensor computed from the HF shards at that moment. Peak memory ~ one parameter (+ its HF inputs).
Export reads per layer through the same sharded state dict (only that layer's chunks are read).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import torch


def ensure_single_process() -> None:
    """A world of one (gloo) with megatron TP=PP=1 groups, unless the caller already set one up."""
    from megatron.core import parallel_state as ps

    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel

    if ps.model_parallel_is_initialized():
        return
    if not torch.distributed.is_initialized():
        from erpd_megatron.megatron.parallel import _free_port

        if not torch.cuda.is_available():
            from erpd_megatron.megatron.compat import apply_cpu_compat

            apply_cpu_compat()
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())  # a private world: never reuse a finished world's port
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    init_parallel(ParallelConfig())


def meta_model(model_cfg, padded_vocab_size: int, dtype: torch.dtype):
    """GPTModel of `model_cfg` on the meta device at TP=PP=1 with the given (target-TP) vocabulary padding."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from erpd_megatron.megatron import model as mm
    from erpd_megatron.megatron.parallel import ParallelConfig

    ensure_single_process()
    opts = mm.BuildOptions(spec="local", dtype=dtype,
                           extra_transformer_config={"perform_initialization": False, "use_cpu_initialization": True})
    tcfg = mm.make_transformer_config(model_cfg, ParallelConfig(), opts)
    with torch.device("meta"):
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=mm.layer_spec(model_cfg, tcfg, "local"),
            vocab_size=padded_vocab_size,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=True, post_process=True, parallel_output=True,
            share_embeddings_and_output_weights=model_cfg.tie_embeddings,
            position_embedding_type="rope",
            rotary_percent=model_cfg.hybrid.partial_rotary_factor if model_cfg.hybrid else 1.0,
            rotary_base=model_cfg.rope_theta,
        )
    return model


FILE_BYTES = 512 * 2**20  # size cap of one .distcp data file written by the converter


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def save_lazy(model, ckpt_dir: str, full_tensor: Callable[[str], torch.Tensor]) -> None:
    """dist_checkpointing.save of {"model": model.sharded_state_dict()} (erpd layout) with lazily computed data.

    full_tensor(param_name) -> the TP=1 tensor of that parameter (cast to the parameter dtype here).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    params = dict(model.state_dict(keep_vars=True))
    owner = {_storage_id(t): (name, t) for name, t in params.items() if isinstance(t, torch.Tensor)}
    cache: dict[str, torch.Tensor] = {}
    written = [0]  # bytes computed since the last collection

    def real_for(name: str) -> torch.Tensor:
        if name not in cache:
            cache.clear()  # chunks of one parameter are written one after the other: keep one
            # DCP's write path leaves each written chunk in a reference cycle: only the cyclic GC frees it, and
            # the GC counts objects, not bytes. Collect every ~256 MB written.
            if written[0] > 256 * 2**20:
                written[0] = 0
                release_memory()
            want = params[name]
            t = full_tensor(name).to(want.dtype).contiguous()
            if tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"{name}: computed shape {tuple(t.shape)} != model {tuple(want.shape)}")
            written[0] += t.numel() * t.element_size()
            cache[name] = t
        return cache[name]

    class BoundedFileWriter(FileSystemWriter):
        """torch's writer keeps every tensor of a file alive until the file is closed (it collects them for an
        optional safetensors footer): cap each .distcp file at FILE_BYTES so that is bounded too."""

        def write_data(self, plan, planner):
            import queue

            from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _item_size

            buckets, size = [[]], 0
            for item in plan.items:  # plan order = parameter order, so the lazy cache keeps working
                n = _item_size(item) if item.type != WriteItemType.BYTE_IO else 0
                if buckets[-1] and size + n > FILE_BYTES:
                    buckets.append([])
                    size = 0
                buckets[-1].append(item)
                size += n
            files: queue.Queue = queue.Queue()
            for k, bucket in enumerate(buckets):
                name = f"{plan.storage_data.prefix}{k}{DEFAULT_SUFFIX}"
                files.put((self.fs.concat_path(self.path, name), name, bucket))
            return self._write_data(planner, files)

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if write_item.type == WriteItemType.BYTE_IO or not isinstance(data, torch.Tensor) or not data.is_meta:
                return data
            sid = _storage_id(data)
            if sid not in owner:
                raise RuntimeError(f"checkpoint chunk {write_item.index.fqn} is not a view of a model parameter")
            name, _ = owner[sid]
            real = real_for(name)
            # a view: the DCP loader copies it only if it does not span its whole storage
            return real.as_strided(data.size(), data.stride(), data.storage_offset())

    class LazyStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt = mcore_to_pyt_state_dict(sd, False)
            writer = BoundedFileWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1,
                                       sync_files=False)
            dcp_save(pyt, storage_writer=writer, no_dist=True,
                     planner=LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False,
                                         flatten_sharded_tensors=False))

    os.makedirs(ckpt_dir, exist_ok=True)
    try:
        dist_checkpointing.save({"model": model.sharded_state_dict()}, ckpt_dir, sharded_strategy=LazyStrategy())
    finally:
        cache.clear()
        release_memory()


def release_memory() -> None:
    """Free garbage cycles, then give freed heap pages back to the OS (glibc keeps parameter-sized holes)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_params(model, ckpt_dir: str, names: Iterable[str],
                stored_dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Read the full (TP=1) tensors of the given parameters of `model` (meta) from a dist checkpoint.

    Only the requested chunks are read. Chunks of layers stacked under one key (dense models) carry
    "prepended" layer axes, which megatron's loader can only read for a whole stack; they are re-declared
    here as plain chunks of the stacked global tensor (same key, shape, offset), which torch DCP reads alone.
    The chunks are views of freshly allocated full tensors, filled in place, in the dtype the checkpoint
    stores (`stored_dtypes`, from checkpoint_dtypes: exact, and no conversion copy).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, apply_factories

    names = list(names)
    sd = model.sharded_state_dict()
    stored_dtypes = stored_dtypes or {}

    def dtype_of(obj):
        key = obj.key
        hit = stored_dtypes.get(key) or next((d for k, d in stored_dtypes.items() if k.startswith(key + ".")), None)
        return hit or obj.data.dtype

    buffers = {n: torch.empty(sd[n].data.shape, dtype=dtype_of(sd[n])) for n in names}
    sub = {}
    for n in names:
        obj = sd[n]
        sub[n] = dataclasses.replace(obj, data=buffers[n]) if isinstance(obj, ShardedTensorFactory) else \
            dataclasses.replace(obj, data=buffers[n].view(obj.data.shape), dtype=buffers[n].dtype)
    apply_factories(sub)

    def flat(x):
        if isinstance(x, dict):
            return {k: flat(v) for k, v in x.items()}
        if isinstance(x, list):
            return [flat(v) for v in x]
        if isinstance(x, ShardedTensor) and x.prepend_axis_num:
            p = x.prepend_axis_num
            return dataclasses.replace(x, data=x.data.view((1,) * p + tuple(x.data.shape)),
                                       local_shape=(1,) * p + tuple(x.local_shape), prepend_axis_num=0)
        return x

    dist_checkpointing.load({"model": flat(sub)}, ckpt_dir, validate_access_integrity=False)
    return buffers


def checkpoint_dtypes(ckpt_dir: str) -> dict[str, torch.dtype]:
    """dtype of every tensor key stored in a dist checkpoint (reads only the metadata)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(ckpt_dir).read_metadata()
    return {k: v.properties.dtype for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
