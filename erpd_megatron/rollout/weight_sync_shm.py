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

The arena is kept between syncs (no first-touch page faults) and grows when a larger bucket layout
needs it; every rank applies the same rule, so they agree on its name without a message. Rank 0
unlinks the file once every sender has mapped it (after the first sync on it): nothing is left in
/dev/shm even if a process dies later.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

ALIGN = 64
RING_BYTES = 64 << 20  # ring arena at least this large: small buckets get many places, senders run ahead
# Per process: the current arena {"gen", "size", "path", "buf", "fresh"} (same gen/size on every rank).
_STATE: dict = {"gen": 0, "size": 0, "path": None, "buf": None, "fresh": False}


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


def _arena(size: int, rank0_pid: int, me: int) -> torch.Tensor:
    """The uint8 arena (at least ``size`` bytes), same name on every rank."""
    st = _STATE
    if size > st["size"] or st["path"] is None or f"_{rank0_pid}_" not in st["path"]:
        st["gen"] += 1
        st["size"] = size
        st["path"] = f"/dev/shm/erpd_wsync_{rank0_pid}_{st['gen']}"
        st["buf"], st["fresh"] = None, True
    if st["buf"] is None:
        n = st["size"]
        if me == 0:
            fd = os.open(st["path"], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, n)
            finally:
                os.close(fd)
        st["buf"] = torch.from_file(st["path"], shared=True, size=n, dtype=torch.uint8)
    return st["buf"]


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
        flag, done = torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
        buf, sent = None, []
        for b in mine:
            dist.recv(flag, src=0, tag=b)  # "go b": its place is free
            buf = _arena(size, int(flag.item()), me) if buf is None else buf
            _write(buckets[b], _views(buf, offsets[b], buckets[b]), me, local)
            # "ready b", not waited for: gloo's send returns only once rank 0 posted the matching
            # receive, which would keep this rank from running ahead (measured: ~2 ms per bucket)
            sent.append(dist.isend(done, dst=0, tag=b))
        for q in sent:
            q.wait()
        return
    buf = _arena(size, os.getpid(), 0)
    st = _STATE
    pid = torch.tensor([os.getpid()], dtype=torch.int32)  # "go" carries rank 0's pid: the arena's name
    release: list[list[int]] = [[] for _ in buckets]
    for b, d in enumerate(dep):
        release[d + 1].append(b)  # dep[b] < b
    pending = []
    ack = torch.zeros(1, dtype=torch.int32)
    for c, items in enumerate(buckets):
        for b in release[c]:  # buckets before c are consumed: the consumer asked for bucket c
            pending.extend(dist.isend(pid, dst=g, tag=b) for g in senders[b])
        views = _views(buf, offsets[c], items)
        _write(items, views, 0, local)
        for g in senders[c]:
            dist.recv(ack, src=g, tag=c)
        if c == len(buckets) - 1:
            for q in pending:
                q.wait()
            if st["fresh"]:  # every sender has mapped it: the name is no longer needed
                os.unlink(st["path"])
                st["fresh"] = False
        yield [(it.hf_name, v.clone() if copy else v) for it, v in zip(items, views)]
