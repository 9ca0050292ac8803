"""Hugging Face checkpoint directories: lazy safetensors reading and sharded, atomic writing.

Reading never loads a whole shard: each tensor is read on request through `safe_open` (memory-mapped).
Every shard's header is checked up front against the file size, so a truncated shard is refused before
anything is written. Writing streams each tensor into pre-planned shards of at most `max_shard_bytes`
(header first, then the bytes as they come), then writes model.safetensors.index.json; the caller writes into a temporary directory and renames it at the end
(`atomic_output_dir`), so an interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch

from erpd_megatron.utils.io import copy_file

from .config import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# non-weight files copied along (config.json is written from the parsed config)
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_json(path: Path):
    """json.load of a file; a malformed (or non-UTF-8) file is a ConversionError naming it (CLI: exit 2)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def read_header(path: Path) -> dict:
    """Parse a safetensors header and check the file holds every byte it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = struct.unpack("<Q", raw)[0]
        if 8 + n > size:
            raise ConversionError(f"{path}: truncated safetensors file (header of {n} bytes, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ConversionError(
            f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}"
        )
    return header


class HFCheckpoint:
    """Lazy view of a HF model directory: config, tensor names / shapes / dtypes, tensors on request."""

    def __init__(self, path: str | os.PathLike, require_config: bool = True):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if require_config and not cfg.is_file():
            raise ConversionError(f"{self.path}: no config.json (not a Hugging Face model directory)")
        self.config = read_json(cfg) if cfg.is_file() else {}
        if (self.path / INDEX).is_file():
            index = read_json(self.path / INDEX)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{self.path / INDEX}: no weight_map")
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        else:
            raise ConversionError(f"{self.path}: neither {INDEX} nor {SINGLE}")
        self.meta: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}  # name -> (file, dtype, shape)
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise ConversionError(f"{self.path / INDEX}: shard {fname} is missing")
            for name, info in read_header(fpath).items():
                self.meta[name] = (fname, _DTYPES.get(info["dtype"], info["dtype"]), tuple(info["shape"]))
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self.meta.get(name, (fname,))[0] != fname:
                    raise ConversionError(f"{self.path / INDEX}: {name} is not in {fname}")
                if name not in self.meta:
                    raise ConversionError(f"{self.path / INDEX}: {name} listed in {fname} but not stored there")

    def names(self) -> list[str]:
        return list(self.meta)

    def get(self, name: str, pad_rows_to: int | None = None) -> torch.Tensor:
        """Read one tensor. The file is opened per call: its memory map (resident pages) goes with it.

        pad_rows_to: return a [pad_rows_to, ...] tensor with zero rows after the stored ones, filled in
        row blocks so that no second full-size copy exists (vocabulary padding of 2.5 GB embeddings).
        """
        if name not in self.meta:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        from safetensors import safe_open

        fname, dtype, shape = self.meta[name]
        with safe_open(str(self.path / fname), framework="pt") as f:
            if pad_rows_to is None or pad_rows_to == shape[0]:
                return f.get_tensor(name)
            out = torch.zeros((pad_rows_to, *shape[1:]), dtype=dtype)
            rows = f.get_slice(name)
            step = max(1, (64 * 2**20) // max(1, math.prod(shape[1:]) * dtype.itemsize))
            for i in range(0, shape[0], step):
                end = min(i + step, shape[0])
                out[i:end] = rows[i:end]
            return out

    def close(self):
        pass  # nothing stays open between reads

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_ST_DTYPES = {v: k for k, v in _DTYPES.items()}


class ShardedWriter:
    """Stream tensors into model-0000k-of-0000n.safetensors shards of at most max_shard_bytes, plus the index.

    The tensor list (name, shape, dtype) is planned up front, so each shard's header is written first and
    every tensor's bytes go straight to the file as it arrives: memory use is one tensor, not one shard.
    Tensors must then arrive in plan order (a mismatch is an error naming the tensor).
    """

    def __init__(self, out_dir: str | os.PathLike, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 2**30):
        self.out = Path(out_dir)
        self.plan = plan
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        self.shards = shards
        self.files = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
        self.total = sum(math.prod(s) * d.itemsize for _, s, d in plan)
        self._i = 0  # next tensor in plan order
        self._shard = -1
        self._f = None
        self._left: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        self._shard += 1
        entries = self.shards[self._shard]
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in entries:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte aligned data section
        self._f = open(self.out / self.files[self._shard], "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._left = list(entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._i >= len(self.plan) or self.plan[self._i][0] != name:
            want = self.plan[self._i][0] if self._i < len(self.plan) else "nothing"
            raise ConversionError(f"writer: got tensor {name!r}, expected {want!r}")
        _, shape, dtype = self.plan[self._i]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ConversionError(f"writer: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        if not self._left:
            self._open_next()
        self._left.pop(0)
        t = tensor.detach().to("cpu").contiguous()
        self._f.write(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        self._i += 1

    def finish(self) -> list[str]:
        if self._i != len(self.plan):
            raise ConversionError(f"writer: {len(self.plan) - self._i} planned tensors were never written, "
                                  f"first {self.plan[self._i][0]!r}")
        if self._f is not None:
            self._f.close()
        if not self.plan:  # an empty checkpoint is still a valid (empty) shard
            self._open_next()
            self._f.close()
        weight_map = {name: self.files[k] for k, entries in enumerate(self.shards) for name, _, _ in entries}
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.files


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory; rename it to `out` only if the body completes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists (refusing to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            copy_file(src / name, dst / name)  # the umask's mode, not the source's
            copied.append(name)
    return copied
