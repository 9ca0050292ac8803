"""Colocated SGLang weight pushes with one sender per GPU (``receivers="per_gpu"``).

With ``receivers="rank0"`` every tensor reaches trainer rank 0 and rank 0 serializes CUDA-IPC handles of its
own GPU 0 copy for every server TP rank: each server process then opens handles on GPU 0 (one more CUDA
context per server process there) and all weight traffic goes through GPU 0. Here each trainer rank that
shares a GPU with a server TP rank serializes the handles of *its own* GPU's copy (``iter_hf_buckets(...,
receivers="all")`` gives every rank the full bucket), the payload strings are gathered to rank 0, and rank 0
posts to server k the payload of the rank on each of its GPUs, in TP-rank order (what sglang's own
colocated engines do). Server k's TP rank r runs on GPU ``base_gpu_id + k * tp + r`` (sglang's
``--base-gpu-id``); only GPUs of rank 0's node count, since the engine launches servers there.

The choice (``choose_receivers``) is pure and CPU-tested; the transport itself runs on CPU with shared-memory
handles (tests/test_weight_sync_colocated.py) -- CUDA IPC itself is not tested here.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


def choose_receivers(rollout_cfg, *, cuda: bool) -> str:
    """"per_gpu" for colocated SGLang (servers launched by this run, tensor transport, CUDA), else "rank0"
    (LocalEngine, disaggregated / attached servers, disk, NCCL broadcast, CPU)."""
    if (rollout_cfg.engine == "sglang" and rollout_cfg.sglang_weight_transport == "tensor"
            and not list(rollout_cfg.sglang_urls or []) and cuda):
        return "per_gpu"
    return "rank0"


def server_gpus(base_gpu_id: int, tp: int, num_servers: int) -> list[list[int]]:
    """GPU of each TP rank of each server: ``[[base, ..., base + tp - 1], [base + tp, ...], ...]``."""
    return [[base_gpu_id + k * tp + r for r in range(tp)] for k in range(num_servers)]


def owners_from(entries: list[tuple[str, int | None]]) -> dict[int, int]:
    """``{gpu: trainer rank}`` for the ranks on rank 0's host, from every rank's (host, CUDA device)."""
    host0 = entries[0][0]
    out: dict[int, int] = {}
    for rank, (host, gpu) in enumerate(entries):
        if host == host0 and gpu is not None:
            out.setdefault(gpu, rank)
    return out


def gpu_owners(local_gpu: int | None) -> dict[int, int]:
    """Collective: every rank's (host, GPU) -> the owner map of rank 0's node (the same on every rank)."""
    import torch.distributed as dist

    entries: list = [None] * dist.get_world_size()
    dist.all_gather_object(entries, (socket.gethostname(), local_gpu))
    return owners_from(entries)


def missing_gpus(owners: dict[int, int], gpus: list[list[int]]) -> list[int]:
    return [g for server in gpus for g in server if g not in owners]


def push_per_gpu(policy, engine, version, *, owners: dict[int, int], gpus: list[list[int]],
                 bucket_bytes: int = 512 << 20, layout: str = "typed") -> None:
    """Collective (every trainer rank): stream ``policy``'s weights into the servers, each server TP rank fed by
    the trainer rank on its GPU. ``engine`` is the SGLangEngine on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from erpd_megatron.rollout import sglang_wire
    from erpd_megatron.rollout.weight_sync import iter_hf_buckets

    rank = dist.get_rank()
    senders = set(owners[g] for server in gpus for g in server)
    if rank == 0:
        engine.begin_update()
    try:
        for bucket in iter_hf_buckets(policy, receivers="all", bucket_bytes=bucket_bytes):
            mine = [sglang_wire.serialize(p) for p in sglang_wire.flatten_bucket(bucket, layout)] \
                if rank in senders else None
            gathered = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
            if rank == 0:
                for j in range(len(gathered[owners[gpus[0][0]]])):  # one payload per dtype of the bucket
                    for k, server in enumerate(gpus):
                        engine.update_weights_from_serialized([gathered[owners[g]][j] for g in server], version,
                                                              server=k)
            dist.barrier()  # each sender keeps its bucket (the memory its handles name) until the servers read it
    finally:
        if rank == 0:
            engine.end_update(version)
