"""Content checksums (sha256) of the files of a directory, for checkpoints written by the trainer and the
converters, checked before anything in them is deserialised.

Files are hashed by a thread pool (hashlib releases the GIL on large buffers, so threads use several cores);
in a distributed job the files are also split round-robin over the ranks (`shard=(rank, world)`), so a
checkpoint of N bytes costs about N / (ranks x threads) of hashing per rank. A record is
`{"size": bytes, "sha256": hex}` per relative path; older records that hold only a size are checked by size.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 8 * 2**20


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def list_files(root: str | os.PathLike, exclude: tuple[str, ...] = ()) -> list[str]:
    """Relative paths of every regular file under `root`, sorted (names in `exclude` skipped at any depth)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in exclude)


def _threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _mine(rels: list[str], shard: tuple[int, int]) -> list[str]:
    rank, world = shard
    return [r for i, r in enumerate(sorted(rels)) if i % world == rank]


def digest_files(root: str | os.PathLike, rels: list[str], shard: tuple[int, int] = (0, 1)) -> dict[str, dict]:
    """{rel: {"size", "sha256"}} of this shard's part of `rels`."""
    root = Path(root)
    mine = _mine(rels, shard)

    def one(rel: str) -> tuple[str, dict]:
        p = root / rel
        return rel, {"size": p.stat().st_size, "sha256": file_sha256(p)}

    with ThreadPoolExecutor(_threads()) as pool:
        return dict(pool.map(one, mine))


def check_files(root: str | os.PathLike, records: dict, shard: tuple[int, int] = (0, 1),
                content: bool = True) -> list[str]:
    """Problems (one line each, naming the file) of this shard's files against `records`; [] when all match.
    Sizes are checked first (cheap); `content=False` stops there."""
    root = Path(root)
    problems, to_hash = [], []
    for rel in _mine(list(records), shard):
        rec = records[rel]
        size = rec["size"] if isinstance(rec, dict) else int(rec)
        p = root / rel
        if not p.is_file():
            problems.append(f"missing {rel}")
        elif p.stat().st_size != size:
            problems.append(f"{rel} has {p.stat().st_size} bytes, expected {size}")
        elif content and isinstance(rec, dict) and rec.get("sha256"):
            to_hash.append(rel)
    if to_hash:
        with ThreadPoolExecutor(_threads()) as pool:
            for rel, got in zip(to_hash, pool.map(lambda r: file_sha256(root / r), to_hash)):
                if got != records[rel]["sha256"]:
                    problems.append(f"{rel} content does not match its checksum (sha256 {got[:12]}... != "
                                    f"{records[rel]['sha256'][:12]}... recorded at save)")
    return problems
