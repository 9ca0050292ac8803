"""Same-host transport of ``iter_hf_buckets(receivers="rank0")``: buckets assembled in shared memory.

With gloo on one host the point-to-point path pays TCP loopback (a kernel copy on each side, and
both busy processes scheduled around it). Here global rank 0 owns a ``/dev/shm`` file of
bucket places, mapped by every sender; every TP rank of the owning stage (rank 0 included) writes its
rows straight into their final HF positions in the current bucket's place (``weight_sync._routes``: one copy
per byte, ranks in parallel, cast on the way), and rank 0 yields views of it. Synchronisation
is two one-int gloo messages per bucket and sender: "go b" (place free) from rank 0, "ready b" back.

Double buffering (``ring``: buckets placed one after the other in an arena of at least twice the
largest bucket and ``RING_BYTES``): rank 0 sends "go b" as soon as the place of bucket b is free, so
the senders fill the next buckets while the engine copies this one. A place is reused only once the
consumer asked for the bucket after the one carved from it (the rule of ``weight_sync._Arena``);
``copy=True`` yields clones.

The arena is kept between syncs (no first-touch page faults) and replaced by a larger file when a
bucket layout needs it; "go" names it (rank 0's pid, generation, bytes). Rank 0 unlinks the file once
every rank of the streaming replica has mapped it (normally after the first sync on it), and at exit:
nothing is left in /dev/shm if a process dies later.
"""

from __future__ import annotations

import atexit
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

ALIGN = 64
RING_BYTES = 64 << 20  # ring arena at least this large: small buckets get many places, senders run ahead
# Per process: the current arena. Rank 0: {"gen", "size", "path", "buf", "mapped": senders that mapped
# it}; senders: {"path", "size", "buf"} of the arena named in rank 0's latest "go" message.
_STATE: dict = {"gen": 0, "size": 0, "path": None, "buf": None, "mapped": None}


def host_id() -> str:
    return socket.gethostname()


def usable(table: list, local: dict) -> bool:
    """All ranks on one host, gloo, CPU parameters. ``table``: every rank's ``host_id()``."""
    return (dist.get_backend() == "gloo" and len(set(table)) == 1
            and all(p.device.type == "cpu" for p in local.values()))


@dataclass
class _Item:
    """One HF tensor: where it lives in its bucket, and which rows each source rank writes."""
    name: str  # Megatron parameter
    kind: str
    local_shape: tuple
    srcs: list  # global rank of each TP source
    runs: list | None
    index: int  # HF tensor index within the parameter's un-fusing
    hf_name: str
    shape: tuple
    dtype: torch.dtype
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def layout(cfg, plan, tp: int, dtype, owners: dict, bucket_bytes: int) -> tuple[list[list[_Item]], list[int]]:
    """Buckets (closed by the rule of ``iter_hf_buckets``) and the aligned bytes of each."""
    from checkpoints_conv import maps
    from erpd_megatron.rollout.weight_sync import _full_shape, _routes

    buckets, cur, size = [], [], 0
    for name, stage, local_shape, pdtype in plan:
        kind, _ = maps.tp_kind(cfg, name)
        names, shapes, runs = _routes(cfg, name, kind, _full_shape(kind, local_shape, tp), tp)
        srcs = [owners[(stage, r)] for r in range(1 if kind == "replicated" else tp)]
        for i, (hf, shp) in enumerate(zip(names, shapes)):
            it = _Item(name, kind, local_shape, srcs, runs, i, hf, tuple(shp), dtype or pdtype)
            if cur and size + it.nbytes > bucket_bytes:
                buckets.append(cur)
                cur, size = [], 0
            cur.append(it)
            size += it.nbytes
    if cur:
        buckets.append(cur)
    sizes = []
    for b in buckets:
        off = 0
        for it in b:
            it.offset = off
            off = -(-(off + it.nbytes) // ALIGN) * ALIGN
        sizes.append(off)
    return buckets, sizes


def ring(sizes: list[int]) -> tuple[list[int], list[int], int]:
    """Bucket places in one arena used as a ring: (offsets, dep, arena bytes). Buckets are placed one
    after the other, wrapping to 0 when the next does not fit; bucket b may be written once the
    consumer asked for bucket dep[b] + 1, dep[b] being the latest earlier bucket sharing a byte with
    it (-1: none). Arena: max(RING_BYTES, 2 x largest bucket): small buckets get many places (each
    costs a round trip, and a sender can run ahead), large ones at least double buffering."""
    size = max(RING_BYTES, 2 * max(sizes, default=0))
    offsets, dep, end = [], [], 0
    for b, n in enumerate(sizes):
        o = end if end + n <= size else 0
        offsets.append(o)
        end = o + n
        dep.append(max((j for j in range(b) if offsets[j] < o + n and o < offsets[j] + sizes[j]), default=-1))
    return offsets, dep, size


def _own_arena(size: int) -> tuple[torch.Tensor, int, int]:
    """Rank 0: the uint8 arena (at least ``size`` bytes), a new file when it must grow.
    Returns (arena, generation, bytes)."""
    st = _STATE
    if size > st["size"] or st["buf"] is None:
        if st["path"] is not None and os.path.exists(st["path"]):
            os.unlink(st["path"])
        st["gen"] += 1
        st["size"], st["path"], st["mapped"] = size, f"/dev/shm/erpd_wsync_{os.getpid()}_{st['gen']}", set()
        fd = os.open(st["path"], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)  # a stale file of a reused pid: reset
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        st["buf"] = torch.from_file(st["path"], shared=True, size=size, dtype=torch.uint8)
    return st["buf"], st["gen"], st["size"]


def _map_arena(pid: int, gen: int, size: int) -> torch.Tensor:
    """Sender: rank 0's arena named in its "go" message, mapped once per generation. A missing file
    raises (never create one: that would be a private, silently wrong arena)."""
    st = _STATE
    path = f"/dev/shm/erpd_wsync_{pid}_{gen}"
    if st["path"] != path:
        os.close(os.open(path, os.O_RDWR))  # FileNotFoundError if rank 0 has unlinked it
        st["path"], st["size"], st["buf"] = path, size, torch.from_file(path, shared=True, size=size,
                                                                         dtype=torch.uint8)
    return st["buf"]


def _cleanup() -> None:
    path = _STATE.get("path")
    if _STATE.get("mapped") is not None and path and os.path.exists(path):
        os.unlink(path)


atexit.register(_cleanup)


def _views(buf: torch.Tensor, base: int, items: list[_Item]) -> list[torch.Tensor]:
    return [buf[base + it.offset:base + it.offset + it.nbytes].view(it.dtype).view(it.shape) for it in items]


def _write(items: list[_Item], views: list[torch.Tensor], me: int, local: dict) -> None:
    """Copy the rows this rank holds into their HF positions (cast by ``copy_``)."""
    for it, v in zip(items, views):
        if me not in it.srcs:
            continue
        shard = local[it.name].detach()
        if it.runs is None:  # "row" kind, TP > 1: column block r of the HF tensor
            c = it.local_shape[1]
            for r, g in enumerate(it.srcs):
                if g == me:
                    v[:, r * c:(r + 1) * c].copy_(shard)
            continue
        for rk, lr, i, hr, n in it.runs:
            if i == it.index and it.srcs[rk] == me:
                v[hr:hr + n].copy_(shard[lr:lr + n])


def stream(cfg, plan, local: dict, dtype, copy: bool, owners: dict, bucket_bytes: int, tp: int):
    """Buckets on global rank 0 (nothing elsewhere); every streaming rank must run it to the end."""
    me = dist.get_rank()
    buckets, sizes = layout(cfg, plan, tp, dtype, owners, bucket_bytes)
    offsets, dep, size = ring(sizes)
    senders = [sorted({g for it in b for g in it.srcs} - {0}) for b in buckets]
    if me != 0:
        mine = [b for b, s in enumerate(senders) if me in s]
        if not mine:
            return
        flag, done = torch.zeros(3, dtype=torch.int64), torch.ones(1, dtype=torch.int32)
        buf, sent = None, []
        for b in mine:
            dist.recv(flag, src=0, tag=b)  # "go b": its place is free; (pid, generation, bytes) of the arena
            buf = _map_arena(*flag.tolist()) if buf is None else buf
            _write(buckets[b], _views(buf, offsets[b], buckets[b]), me, local)
            # "ready b", not waited for: gloo's send returns only once rank 0 posted the matching
            # receive, which would keep this rank from running ahead (measured: ~2 ms per bucket)
            sent.append(dist.isend(done, dst=0, tag=b))
        for q in sent:
            q.wait()
        return
    buf, gen, nbytes = _own_arena(size)
    st = _STATE
    name = torch.tensor([os.getpid(), gen, nbytes], dtype=torch.int64)  # "go" names the arena
    release: list[list[int]] = [[] for _ in buckets]
    for b, d in enumerate(dep):
        release[d + 1].append(b)  # dep[b] < b
    pending = []
    ack = torch.zeros(1, dtype=torch.int32)
    for c, items in enumerate(buckets):
        for b in release[c]:  # buckets before c are consumed: the consumer asked for bucket c
            pending.extend(dist.isend(name, dst=g, tag=b) for g in senders[b])
        views = _views(buf, offsets[c], items)
        _write(items, views, 0, local)
        for g in senders[c]:
            dist.recv(ack, src=g, tag=c)
        if c == len(buckets) - 1:
            for q in pending:
                q.wait()
            st["mapped"].update(g for s in senders for g in s)
            if st["mapped"] >= set(owners.values()) - {0} and os.path.exists(st["path"]):
                os.unlink(st["path"])  # every possible sender has mapped it: the name is no longer needed
        yield [(it.hf_name, v.clone() if copy else v) for it, v in zip(items, views)]
