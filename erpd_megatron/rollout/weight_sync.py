"""Megatron model -> inference engine: HF-named full tensors, in size-capped buckets.

``iter_hf_buckets(policy)`` walks the model's parameters in Megatron order (``checkpoints_conv.maps``
order) and, per parameter:
1. TP: the owning pipeline stage gathers the TP shards (``all_gather`` or ``gather`` to TP rank 0)
   and rebuilds the full tensor with ``maps.unshard_param`` (column / row / vocab / per-section
   layouts; replicated tensors are not gathered);
2. PP: the full tensor goes from its owning stage to the receivers;
3. un-fusing: ``maps.mcore_to_hf`` splits linear_qkv (per query group, gated for Qwen3.5),
   linear_fc1 [gate; up], the GDN in_proj, and drops the vocabulary padding rows;
4. bucketing: HF tensors are appended to the current bucket until the next one would exceed
   ``bucket_bytes``; the bucket is then yielded and dropped, so at most one bucket (plus the tensor
   being converted) is materialised. A single tensor larger than the cap is a bucket of its own.

Who receives (``receivers``):
- ``"all"`` (default): TP ``all_gather`` + PP ``broadcast``; every rank yields the same buckets.
  Needed for colocated SGLang, where each GPU's trainer process serializes CUDA-IPC handles for
  the engine TP rank on its own GPU. Costs (pp - 1) extra copies of each tensor per rank.
- ``"rank0"``: only global rank 0 yields buckets; TP shards are ``gather``-ed to TP rank 0 of the
  owning stage (DP replicas other than DP rank 0 do nothing) and sent point-to-point to stage 0.
  Right for LocalEngine and for disaggregated SGLang (rank 0 broadcasts to the servers).

The iterator runs collectives: every rank of the model must consume it to the end, in lockstep
(``sync_weights`` does that for you). The tied output layer (last stage's copy of the embedding) is
skipped: the HF checkpoint has no ``lm_head.weight`` either.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

WeightBucket = list[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 512 << 20


def _full_shape(kind: str, local: tuple[int, ...], tp: int) -> tuple[int, ...]:
    if kind == "replicated" or tp == 1:
        return local
    if kind == "row":
        return (local[0], local[1] * tp, *local[2:])
    return (local[0] * tp, *local[1:])  # column, vocab, sections (dim 0)


def _plan(policy, cfg, skip_tied: bool):
    """[(name, owning pp rank, local shape, dtype)] in Megatron order, identical on every rank."""
    from megatron.core import parallel_state as ps

    from checkpoints_conv import maps

    mine = [(n, tuple(p.shape), str(p.dtype).removeprefix("torch."))
            for n, p in policy.named_parameters_global() if not (skip_tied and n == "output_layer.weight")]
    pp = ps.get_pipeline_model_parallel_world_size()
    per_stage: list = [None] * pp
    if pp > 1:
        dist.all_gather_object(per_stage, mine, group=ps.get_pipeline_model_parallel_group())
    else:
        per_stage[0] = mine
    owner = {}
    for stage, entries in enumerate(per_stage):
        for n, shape, dt in entries:
            if n in owner:
                raise ValueError(f"weight sync: {n} is held by pipeline stages {owner[n][0]} and {stage}")
            owner[n] = (stage, shape, getattr(torch, dt))
    order = maps.mcore_names(cfg)
    unknown = sorted(set(owner) - set(order))
    if unknown:
        raise ValueError(f"weight sync: Megatron parameters without an HF mapping: {unknown[:5]}")
    missing = [n for n in order if n not in owner]
    if missing:
        raise ValueError(f"weight sync: the model has no parameter {missing[:5]} (config / model mismatch)")
    return [(n, *owner[n]) for n in order]


class _Chunks:
    """Adapter: the model chunks of a PolicyEngine (``engine.model`` / ``engine.modules``) + its ModelConfig."""

    def __init__(self, chunks, model_cfg):
        from megatron.core import parallel_state as ps

        from erpd_megatron.megatron.model import layer_offset, local_to_global_name, unwrap_model
        from erpd_megatron.megatron.parallel import ParallelConfig

        self.model_cfg = model_cfg
        self._chunks = [unwrap_model(c) for c in (chunks if isinstance(chunks, (list, tuple)) else [chunks])]
        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        self._par = ParallelConfig(tp=ps.get_tensor_model_parallel_world_size(),
                                   pp=ps.get_pipeline_model_parallel_world_size(), vpp=vpp)
        self._offset, self._global = layer_offset, local_to_global_name

    def named_parameters_global(self):
        from megatron.core import parallel_state as ps

        pp_rank = ps.get_pipeline_model_parallel_rank()
        for vp, m in enumerate(self._chunks):
            off = self._offset(self.model_cfg, self._par, pp_rank, vp if self._par.vpp else None)
            for name, p in m.named_parameters():
                yield self._global(name, off), p


@torch.no_grad()
def iter_hf_buckets(policy, model_cfg=None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, receivers: str = "all",
                    dtype: torch.dtype | None = None, conv_cfg=None) -> Iterator[WeightBucket]:
    """Buckets of (HF name, full tensor) from a ``PolicyEngine`` (anything with ``model_cfg`` and
    ``named_parameters_global()``), or from its list of model chunks plus ``model_cfg``.
    ``dtype``: cast on the way out (e.g. bf16 for SGLang). ``conv_cfg``: HF config dict / ConvConfig
    naming the target checkpoint (default: from the ModelConfig: text-model names, prefix ``model.``)."""
    from megatron.core import parallel_state as ps

    from checkpoints_conv import maps

    if not hasattr(policy, "named_parameters_global"):
        if model_cfg is None:
            raise TypeError("iter_hf_buckets(chunks, model_cfg): model chunks need their ModelConfig")
        policy = _Chunks(policy, model_cfg)
    if receivers not in ("all", "rank0"):
        raise ValueError(f"receivers must be 'all' or 'rank0', got {receivers!r}")
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    cfg = maps.as_conv_config(conv_cfg if conv_cfg is not None else policy.model_cfg)
    plan = _plan(policy, cfg, skip_tied=cfg.tie_word_embeddings)
    local = dict(policy.named_parameters_global())

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    tp_ranks = dist.get_process_group_ranks(tp_group) if tp > 1 else None
    pp_ranks = dist.get_process_group_ranks(pp_group) if ps.get_pipeline_model_parallel_world_size() > 1 else None
    device = next(iter(local.values())).device
    if receivers == "rank0":
        receiver = dist.get_rank() == 0 if dist.is_initialized() else True
        if dp_rank != 0:  # other DP replicas hold the same weights: nothing to do
            return
    else:
        receiver = True

    bucket: WeightBucket = []
    size = 0
    for name, stage, local_shape, pdtype in plan:
        kind, _ = maps.tp_kind(cfg, name)
        full = None
        # 1. TP gather on the owning stage.
        if pp_rank == stage:
            shard = local[name].detach()
            if tp > 1 and kind != "replicated":
                if receivers == "all":
                    shards = [torch.empty_like(shard) for _ in range(tp)]
                    dist.all_gather(shards, shard.contiguous(), group=tp_group)
                    full = maps.unshard_param(cfg, name, shards)
                else:
                    shards = [torch.empty_like(shard) for _ in range(tp)] if tp_rank == 0 else None
                    dist.gather(shard.contiguous(), shards, dst=tp_ranks[0], group=tp_group)
                    full = maps.unshard_param(cfg, name, shards) if tp_rank == 0 else None
            else:
                full = shard.clone()  # never hand out a live parameter
        # 2. PP transfer from the owning stage.
        if pp_ranks is not None:
            shape = _full_shape(kind, local_shape, tp)
            if receivers == "all":
                if pp_rank != stage:
                    full = torch.empty(shape, dtype=pdtype, device=device)
                dist.broadcast(full, src=pp_ranks[stage], group=pp_group)
            elif tp_rank == 0 and stage != 0:
                if pp_rank == stage:
                    dist.send(full.contiguous(), dst=pp_ranks[0], group=pp_group)
                elif pp_rank == 0:
                    full = torch.empty(shape, dtype=pdtype, device=device)
                    dist.recv(full, src=pp_ranks[stage], group=pp_group)
        if not receiver:
            continue
        # 3. Un-fuse into HF tensors, 4. bucket.
        for hf_name, t in maps.mcore_to_hf(cfg, name, full):
            t = t.to(dtype) if dtype is not None else t
            t = t.contiguous()
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((hf_name, t))
            size += nbytes
        del full
    if bucket and receiver:
        yield bucket


def sync_weights(policy, engine, version=None, *, receivers: str = "all", **kw) -> dict[str, float]:
    """Push the policy's weights into a rollout engine. Call on every rank of the model; ``engine`` is
    used where buckets arrive (every rank for "all", rank 0 for "rank0"; it may be None elsewhere).
    Returns {"weight_sync/bytes", "weight_sync/seconds", "weight_sync/gbps"} (local view)."""
    stats = {"bytes": 0, "buckets": 0, "peak_bucket_bytes": 0}

    def counted():
        for b in iter_hf_buckets(policy, receivers=receivers, **kw):
            n = sum(t.numel() * t.element_size() for _, t in b)
            stats["bytes"] += n
            stats["buckets"] += 1
            stats["peak_bucket_bytes"] = max(stats["peak_bucket_bytes"], n)
            yield b

    t0 = time.perf_counter()
    gen = counted()
    if engine is not None:
        engine.update_weights(gen, version)
    for _ in gen:  # ranks without an engine (or an engine that stopped early) still run the collectives
        pass
    secs = time.perf_counter() - t0
    return {"weight_sync/bytes": float(stats["bytes"]), "weight_sync/seconds": secs,
            "weight_sync/gbps": stats["bytes"] / secs / 1e9 if secs > 0 else 0.0,
            "weight_sync/buckets": float(stats["buckets"]),
            "weight_sync/peak_bucket_bytes": float(stats["peak_bucket_bytes"])}


def _bench(argv=None) -> None:
    """``python -m erpd_megatron.rollout.weight_sync [--hidden H --layers L --vocab V --bucket-mb M]``:
    GB/s of iter_hf_buckets into a no-op consumer (run under torchrun for TP/PP: --tp/--pp)."""
    import argparse

    from erpd_megatron.megatron.engine import PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig

    ap = argparse.ArgumentParser()
    for name, default in (("hidden", 512), ("layers", 8), ("vocab", 32000), ("tp", 1), ("pp", 1), ("bucket_mb", 64)):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    ap.add_argument("--receivers", default="all")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = ModelConfig(family="qwen3", vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers,
                      num_heads=a.hidden // 64, num_kv_heads=max(1, a.hidden // 256), head_dim=64,
                      ffn_hidden_size=3 * a.hidden)
    policy = PolicyEngine(cfg, ParallelConfig(tp=a.tp, pp=a.pp), trainable=False)
    for _ in range(2):  # the first pass warms allocators
        stats = sync_weights(policy, None, receivers=a.receivers, bucket_bytes=a.bucket_mb << 20)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print({k: round(v, 4) for k, v in stats.items()}, flush=True)


if __name__ == "__main__":
    _bench()
