"""Hugging Face checkpoint directories: lazy safetensors reading and sharded, atomic writing.

Reading never loads a whole shard: each tensor is read on request through `safe_open` (memory-mapped).
Every shard's header is checked up front against the file size, so a truncated shard is refused before
anything is written. Writing fills shards up to `max_shard_bytes`, then writes
model.safetensors.index.json; the caller writes into a temporary directory and renames it at the end
(`atomic_output_dir`), so an interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch

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
        try:
            self.config = json.loads(cfg.read_text()) if cfg.is_file() else {}
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg}: not valid JSON ({e})") from None
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text()).get("weight_map")
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
        self._handles: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def names(self) -> list[str]:
        return list(self.meta)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.meta:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        fname = self.meta[name][0]
        if fname not in self._handles:
            from safetensors import safe_open

            self._handles[fname] = self._stack.enter_context(safe_open(str(self.path / fname), framework="pt"))
        return self._handles[fname].get_tensor(name)

    def close(self):
        self._stack.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardedWriter:
    """Write tensors into model-0000k-of-0000n.safetensors shards of at most max_shard_bytes, plus the index."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30):
        self.out = Path(out_dir)
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in s for s in self.shards):
            raise ConversionError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        k = len(self.shards) + 1
        save_file(self.pending, str(self.out / f"part-{k:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for k, names in enumerate(self.shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"part-{k:05d}.safetensors", self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return sorted(set(weight_map.values()))


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
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
