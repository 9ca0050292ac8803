"""Megatron model -> inference engine: HF-named full tensors, in size-capped buckets.

``iter_hf_buckets(policy)`` walks the model's parameters in Megatron order (``checkpoints_conv.maps``
order) and, per parameter:
1. TP: "all": the owning pipeline stage ``all_gather``s the TP shards and rebuilds the full tensor
   with ``maps.unshard_param`` (column / row / vocab / per-section layouts; replicated tensors are
   not gathered); "rank0": see below, shards go straight into the HF tensors;
2. PP: "all": the full tensor is broadcast from its owning stage;
3. un-fusing: ``maps.mcore_to_hf`` splits linear_qkv (per query group, gated for Qwen3.5),
   linear_fc1 [gate; up], the GDN in_proj, and drops the vocabulary padding rows;
4. bucketing: HF tensors are appended to the current bucket until the next one would exceed
   ``bucket_bytes``; the bucket is then yielded and dropped, so at most one bucket (plus the tensor
   being converted) is materialised. A single tensor larger than the cap is a bucket of its own.

Who receives (``receivers``):
- ``"all"`` (default): TP ``all_gather`` + PP ``broadcast``; every rank yields the same buckets.
  Needed for colocated SGLang, where each GPU's trainer process serializes CUDA-IPC handles for
  the engine TP rank on its own GPU. Costs (pp - 1) extra copies of each tensor per rank.
- ``"rank0"``: only global rank 0 yields buckets. Every rank first joins one world-wide exchange of
  (dp, cp, pp, tp) coordinates; then every TP rank of the owning stage (DP/CP rank 0; other replicas
  hold the same weights and stop there) sends its rows point-to-point to global rank 0, which receives them
  directly into the rows of preallocated HF tensors: the row routing (``_routes``) is derived once
  per parameter kind by pushing row labels through ``layouts.shard`` and ``maps.mcore_to_hf``, so
  stage 1-3 cost one receive per remote byte and one copy per local byte (no gather buffer, no
  ``cat``, no un-fusing copy; "row"-split tensors: one extra copy of the remote columns).
  Right for LocalEngine and for disaggregated SGLang (rank 0 broadcasts to the servers).
  Same host + gloo + CPU (default ``shm=None``): the same rows are written into shared-memory bucket
  places instead of being sent over TCP loopback (``weight_sync_shm``); NCCL / GPU: point-to-point.

The iterator runs collectives: every rank of the model must consume it to the end, in lockstep
(``sync_weights`` does that for you). The tied output layer (last stage's copy of the embedding) is
skipped: the HF checkpoint has no ``lm_head.weight`` either.
"""

from __future__ import annotations

import math
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


_ROUTES: dict = {}


def _routes(cfg, name: str, kind: str, full_shape: tuple[int, ...], tp: int):
    """How the HF tensors of one Megatron parameter are assembled from the TP shards ("rank0" path).

    Returns (hf_names, hf_shapes, runs) with runs = [(tp_rank, local_row, hf_index, hf_row, n_rows)]:
    rows [local_row, local_row + n) of TP rank tp_rank's shard land in rows [hf_row, hf_row + n) of HF
    tensor hf_index. Derived by pushing row labels (arange) through the same ``layouts.shard`` and
    ``maps.mcore_to_hf`` that define the layouts, so it cannot drift from them. Only for parameters
    split (or un-fused) along dim 0; "row" parameters are a plain column concatenation (runs None).
    Cached: one entry per (parameter kind, shapes, TP, config)."""
    from checkpoints_conv import layouts, maps

    names = maps.entry(cfg, name)[1]
    key = (maps._LAYER_RE.sub(r"\2", name), kind, full_shape, tp, repr(cfg))
    hit = _ROUTES.get(key)
    if hit is not None:
        return (names, *hit)
    rows = full_shape[0]
    labels = torch.arange(rows).view(rows, *([1] * (len(full_shape) - 1)))
    pieces = maps.mcore_to_hf(cfg, name, labels)
    if kind == "row" and tp > 1:
        shapes = [tuple(full_shape)]
        runs = None
    else:
        shapes = [(t.shape[0], *full_shape[1:]) for _, t in pieces]
        n_src = 1 if kind == "replicated" else tp
        _, sections = maps.tp_kind(cfg, name)
        src_rank = torch.full((rows,), -1, dtype=torch.long)
        src_row = torch.full((rows,), -1, dtype=torch.long)
        for r in range(n_src):
            lab = layouts.shard(kind, labels, n_src, r, sections).reshape(-1) if n_src > 1 else labels.reshape(-1)
            src_rank[lab] = r
            src_row[lab] = torch.arange(lab.numel())
        runs = []
        for i, (_, t) in enumerate(pieces):
            full_rows = t.reshape(-1)
            rk, lr = src_rank[full_rows], src_row[full_rows]
            # a run breaks where the source rank changes or its local row does not advance by one
            brk = torch.ones(full_rows.numel(), dtype=torch.bool)
            brk[1:] = (rk[1:] != rk[:-1]) | (lr[1:] != lr[:-1] + 1)
            starts = torch.nonzero(brk).squeeze(-1).tolist() + [full_rows.numel()]
            for a, b in zip(starts[:-1], starts[1:]):
                runs.append((int(rk[a]), int(lr[a]), i, a, b - a))
    _ROUTES[key] = (shapes, runs)
    return names, shapes, runs


def _owner_ranks() -> tuple[dict[tuple[int, int], int], list[str]]:
    """{(pp_rank, tp_rank): global rank} of the model replica that streams (DP rank 0, CP rank 0), and
    every rank's host (``weight_sync_shm.host_id``). A collective over the whole world (every rank of
    every replica must call it)."""
    from megatron.core import parallel_state as ps

    from erpd_megatron.rollout.weight_sync_shm import host_id

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return {(0, 0): 0}, [host_id()]
    me = (ps.get_data_parallel_rank(), ps.get_context_parallel_rank(),
          ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), dist.get_rank(), host_id())
    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, me)
    return {(pp, t): g for dp, cp, pp, t, g, _ in table if dp == 0 and cp == 0}, [h for *_, h in table]


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
                    dtype: torch.dtype | None = None, conv_cfg=None, copy: bool = True,
                    shm: bool | None = None) -> Iterator[WeightBucket]:
    """Buckets of (HF name, full tensor) from a ``PolicyEngine`` (anything with ``model_cfg`` and
    ``named_parameters_global()``), or from its list of model chunks plus ``model_cfg``.
    ``dtype``: cast on the way out (e.g. bf16 for SGLang). ``conv_cfg``: HF config dict / ConvConfig
    naming the target checkpoint (default: from the ModelConfig: text-model names, prefix ``model.``).
    ``copy=False``: an HF tensor that is a contiguous slice of a local parameter (replicated norms,
    everything at TP=1 except un-fused Q/K/V) is yielded as a view of the live parameter instead of a
    copy. Only for consumers that copy what they receive before the parameters change again (every
    engine's ``update_weights`` does; ``sync_weights`` uses it).
    ``shm`` ("rank0" only): assemble the buckets in shared memory (``weight_sync_shm``) instead of
    point-to-point sends; None (default): when every rank is on one host with gloo and CPU
    parameters (the NCCL / GPU path is unchanged). Must be the same on every rank."""
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
    if receivers == "rank0":
        # The owner table is an all_gather over the whole world: every replica must join it before
        # the non-streaming ones (DP or CP rank != 0, same weights) leave; leaving first hung DP > 1.
        owners, hosts = _owner_ranks()
        if ps.get_data_parallel_rank() != 0 or ps.get_context_parallel_rank() != 0:
            return
        from erpd_megatron.rollout import weight_sync_shm

        if shm is None:
            shm = set(owners.values()) != {0} and weight_sync_shm.usable(hosts, local)
        _LAST["transport"] = "shm" if shm else "p2p"
        if shm:
            tp = ps.get_tensor_model_parallel_world_size()
            yield from weight_sync_shm.stream(cfg, plan, local, dtype, copy, owners, bucket_bytes, tp)
            return
        arena = None if copy else _Arena(bucket_bytes, _device(local))
        tensors = _rank0_tensors(cfg, plan, local, dtype, copy, arena, owners)
    else:
        tensors = _all_tensors(cfg, plan, local, dtype, copy)

    bucket: WeightBucket = []
    size = 0
    for hf_name, t in tensors:  # 4. bucket
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((hf_name, t))
        size += nbytes
    if bucket:
        yield bucket


_LAST: dict = {"transport": None}


def last_transport() -> str | None:
    """How this process's latest ``receivers="rank0"`` stream moved the weights: "shm" or "p2p"."""
    return _LAST["transport"]


class _Arena:
    """Receive buffers for ``copy=False``: HF tensors are carved out of two reused flat buffers, one
    per bucket in turn, instead of fresh allocations (a fresh large CPU allocation page-faults on its
    first write; measured ~2x slower than writing into reused memory). It switches buffer by the very
    rule ``iter_hf_buckets`` uses to close a bucket, so a buffer is only reused after the bucket carved
    from it was yielded and the consumer asked for the next one. Tensors larger than the cap get
    their own allocation. Memory: at most 2 x bucket_bytes (touched only as far as used)."""

    SLACK = 64 * 1024  # room for 64-byte alignment of up to 1024 tensors per bucket

    def __init__(self, cap: int, device: torch.device):
        self.cap, self.device = cap, device
        self.bufs: list = [None, None]
        self.cur, self.size, self.off = 0, 0, 0

    def take(self, shape, dtype: torch.dtype, materialize: bool = True):
        nbytes = math.prod(shape) * dtype.itemsize
        if self.size and self.size + nbytes > self.cap:  # iter_hf_buckets closes the bucket here too
            self.cur, self.size, self.off = 1 - self.cur, 0, 0
        self.size += nbytes
        if not materialize:
            return None
        off = -(-self.off // 64) * 64
        if nbytes > self.cap or off + nbytes > self.cap + self.SLACK:
            return torch.empty(shape, dtype=dtype, device=self.device)
        if self.bufs[self.cur] is None:
            self.bufs[self.cur] = torch.empty(self.cap + self.SLACK, dtype=torch.uint8, device=self.device)
        self.off = off + nbytes
        return self.bufs[self.cur][off:off + nbytes].view(dtype).view(shape)


def _rank0_tensors(cfg, plan, local, dtype, copy: bool, arena: _Arena | None,
                   owners: dict[tuple[int, int], int]) -> Iterator[tuple[str, torch.Tensor]]:
    """receivers="rank0": every TP rank of the owning stage (DP/CP rank 0) sends the rows it holds
    point-to-point to global rank 0, which receives them straight into the rows of preallocated HF
    tensors (``_routes``): no gather buffer, no ``cat``, no un-fusing copy. Its own rows are copied
    once (or handed out as views of the live parameter when ``copy=False`` and no assembly is
    needed). Yields only on global rank 0."""
    from megatron.core import parallel_state as ps

    from checkpoints_conv import maps

    tp = ps.get_tensor_model_parallel_world_size()
    me = dist.get_rank() if dist.is_initialized() else 0
    for name, stage, local_shape, pdtype in plan:
        kind, _ = maps.tp_kind(cfg, name)
        full_shape = _full_shape(kind, local_shape, tp)
        names, shapes, runs = _routes(cfg, name, kind, full_shape, tp)
        out_dtype = dtype or pdtype
        srcs = [owners[(stage, r)] for r in range(1 if kind == "replicated" else tp)]
        if me != 0 and me not in srcs:
            continue
        shard = local[name].detach() if me in srcs else None
        if me != 0:  # 1. sender: contiguous row slices of the live shard (cast when asked)
            r = srcs.index(me)
            mine = [shard] if runs is None else [shard[lr:lr + n] for rk, lr, _, _, n in runs if rk == r]
            sent = [t.to(out_dtype).contiguous() for t in mine]  # no-op unless dtype / layout differs
            for q in [dist.isend(t, dst=0, tag=k) for k, t in enumerate(sent)]:
                q.wait()
            continue
        # 2. receiver (global rank 0): post every receive first, then copy its own rows meanwhile
        reqs = []
        if runs is None:  # "row" kind, TP > 1: HF tensor = column concatenation of the shards
            full = arena.take(shapes[0], out_dtype) if arena else torch.empty(shapes[0], dtype=out_dtype,
                                                                               device=_device(local))
            c = local_shape[1]
            tmps = {}
            for r, g in enumerate(srcs):
                if g != 0:
                    tmps[r] = torch.empty(local_shape, dtype=out_dtype, device=full.device)
                    reqs.append(dist.irecv(tmps[r], src=g, tag=0))
                else:
                    full[:, r * c:(r + 1) * c].copy_(shard)
            for q in reqs:
                q.wait()
            for r, t in tmps.items():
                full[:, r * c:(r + 1) * c].copy_(t)
            yield names[0], full
            continue
        outs: list = [None] * len(names)
        if not copy and out_dtype == pdtype and len(srcs) == 1 and srcs[0] == 0:
            for i in range(len(names)):  # one run covering the HF tensor: a view of the live parameter
                own = [run for run in runs if run[2] == i]
                if len(own) == 1 and own[0][4] == shapes[i][0]:
                    outs[i] = shard[own[0][1]:own[0][1] + own[0][4]]
        fresh = [o is None for o in outs]
        for i, o in enumerate(outs):
            if arena is not None:
                t = arena.take(shapes[i], out_dtype, materialize=o is None)
                outs[i] = t if o is None else o
            elif o is None:
                outs[i] = torch.empty(shapes[i], dtype=out_dtype, device=_device(local))
        count = [0] * len(srcs)
        mine = []
        for rk, lr, i, hr, n in runs:
            k, count[rk] = count[rk], count[rk] + 1
            if srcs[rk] != 0:
                reqs.append(dist.irecv(outs[i][hr:hr + n], src=srcs[rk], tag=k))
            elif fresh[i]:
                mine.append((outs[i][hr:hr + n], shard[lr:lr + n]))
        for dst, src in mine:
            dst.copy_(src)
        for q in reqs:
            q.wait()
        yield from zip(names, outs)


def _all_tensors(cfg, plan, local, dtype, copy: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """receivers="all": TP ``all_gather`` + ``unshard_param`` on the owning stage, PP ``broadcast``;
    every rank yields the same tensors."""
    from megatron.core import parallel_state as ps

    from checkpoints_conv import maps

    tp = ps.get_tensor_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group) if ps.get_pipeline_model_parallel_world_size() > 1 else None
    for name, stage, local_shape, pdtype in plan:
        kind, _ = maps.tp_kind(cfg, name)
        full = None
        # 1. TP gather on the owning stage.
        if pp_rank == stage:
            shard = local[name].detach()
            if tp > 1 and kind != "replicated":
                shards = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(shards, shard.contiguous(), group=tp_group)
                full = maps.unshard_param(cfg, name, shards)
            else:
                full = shard.clone() if copy else shard  # never hand out a live parameter unless asked
        # 2. PP broadcast from the owning stage.
        if pp_ranks is not None:
            if pp_rank != stage:
                full = torch.empty(_full_shape(kind, local_shape, tp), dtype=pdtype, device=_device(local))
            dist.broadcast(full, src=pp_ranks[stage], group=pp_group)
        # 3. Un-fuse into HF tensors (views where the layout allows; copies only when asked).
        for hf_name, t in maps.mcore_to_hf(cfg, name, full):
            t = t.to(dtype) if dtype is not None else t
            yield hf_name, (t.contiguous() if copy else t)
        del full


def _device(local: dict) -> torch.device:
    return next(iter(local.values())).device


def sync_weights(policy, engine, version=None, *, receivers: str = "all", copy: bool = False,
                 **kw) -> dict[str, float]:
    """Push the policy's weights into a rollout engine. Call on every rank of the model; ``engine`` is
    used where buckets arrive (every rank for "all", rank 0 for "rank0"; it may be None elsewhere).
    ``copy=False`` (default): tensors may be views of live parameters (see ``iter_hf_buckets``); right
    for every engine here, whose ``update_weights`` copies (LocalEngine ``copy_``, SGLang flattening /
    broadcast / safetensors). Pass ``copy=True`` for an engine that keeps references to the tensors.
    Returns {"weight_sync/bytes", "weight_sync/seconds", "weight_sync/gbps"} (local view)."""
    stats = {"bytes": 0, "buckets": 0, "peak_bucket_bytes": 0}

    def counted():
        for b in iter_hf_buckets(policy, receivers=receivers, copy=copy, **kw):
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
