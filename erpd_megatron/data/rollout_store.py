"""Rollout store: one Parquet file per batch, atomic writes, a checksum manifest, padded/packed loading.

Layout of a store directory:

    manifest.json                  {"format": ..., "files": {name: entry}}; the only source of truth
    batch_<k>.parquet              base columns of batch k (BASE_SCHEMA)
    batch_<k>.extra<j>.parquet     sidecar j of batch k: sample_id + per-token float32 columns added later
                                   (teacher / ref / unlearned log-probs ...), joined on read

Guarantees:
- Every file is written to a temp file in the same directory, fsynced and `os.replace`d; the manifest
  too. A file's manifest entry is "pending" while it is being renamed into place and "committed" after,
  so a crash at any point leaves the previous state readable and the manifest consistent (readers
  ignore pending entries and `.tmp-*` leftovers).
- Reading a batch checks every one of its files against the manifest (size, sha256, row count) and
  that no `batch_<k>*.parquet` file is missing from or extra to the manifest: a truncated or corrupt
  file raises `RolloutStoreError` naming it; nothing is read silently.
- Committed files are never rewritten: `write_batch` refuses an existing batch, `add_columns` adds a
  new sidecar file. One writer per store at a time (readers may run concurrently).

Loading follows the project token layout: `input_ids [B, T]` = prompt then response, right padded;
`attention_mask` (long), `response_mask` (float32, 1 exactly at response tokens); every per-token
column is placed at the response positions of `[B, T]`, so `behaviour_logprobs[b, t]` is the log-prob
of `input_ids[b, t]` and is 0 elsewhere (in particular at t = 0).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
FORMAT = "erpd-rollout-store/1"
TMP_PREFIX = ".tmp-"

BASE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("behaviour_logprobs", pa.list_(pa.float32())),
        ("reward", pa.float32()),
        ("group_id", pa.int64()),
        ("finish_reason", pa.string()),
        ("sampling_params", pa.string()),  # JSON text
        ("policy_version", pa.int64()),
    ]
)
BASE_PER_TOKEN = ("behaviour_logprobs",)
_COLUMN_NAME_RE = re.compile(r"[a-z_][a-z0-9_]*")
_BATCH_FILE_RE = re.compile(r"batch_(\d+)(?:\.extra(\d+))?\.parquet")


class RolloutStoreError(ValueError):
    """Bad rollout data or a damaged store; the message names the file / row / column."""


def _crash_point(stage: str) -> None:
    """No-op. Crash tests replace it to stop a write at `stage` (temp_written, pending, renamed)."""


@dataclass
class RolloutRecord:
    """One sampled response and what the trainer needs to know about it."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    behaviour_logprobs: Sequence[float]
    """log pi_behaviour(response_ids[j] | ...), one per response token (see rollout/engine.py)."""
    reward: float
    group_id: int
    """Samples of the same prompt share a group id (GRPO normalisation groups)."""
    prompt_id: str = ""
    sample_id: str | None = None
    """Unique within the store; default "b<batch>-<row>"."""
    finish_reason: str = "stop"
    sampling_params: Mapping[str, Any] | str = field(default_factory=dict)
    """Stored as JSON text (sorted keys)."""
    policy_version: int | None = 0
    """Weight version that generated it; None (initial weights) is stored as -1."""


# ----------------------------------------------------------------------------- validation helpers


def _int_tokens(x: Any, what: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
        if arr.ndim != 1:
            raise ValueError
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise ValueError
        arr = arr.astype(np.int64)
    except (ValueError, TypeError):
        raise RolloutStoreError(f"{where}: {what} must be a 1-D sequence of integers") from None
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise RolloutStoreError(f"{where}: {what} has token ids outside [0, 2^31)")
    return arr.astype(np.int32)


def _float_tokens(x: Any, what: str, where: str, length: int) -> np.ndarray:
    try:
        if hasattr(x, "detach"):  # torch tensor without importing torch here
            x = x.detach().cpu().float().numpy()
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError
    except (ValueError, TypeError):
        raise RolloutStoreError(f"{where}: {what} must be a 1-D sequence of floats") from None
    if arr.size != length:
        raise RolloutStoreError(f"{where}: {what} has {arr.size} values but the response has {length} tokens")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise RolloutStoreError(
            f"{where}: {what} has non-finite values (NaN/inf) at response positions {bad[:8].tolist()}"
        )
    return arr.astype(np.float32)


def _records_to_table(batch: int, records: Sequence[RolloutRecord]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in BASE_SCHEMA}
    seen: dict[str, int] = {}
    for row, rec in enumerate(records):
        where = f"batch {batch} row {row} (0-based)"
        if not isinstance(rec, RolloutRecord):
            raise RolloutStoreError(f"{where}: expected a RolloutRecord, got {type(rec).__name__}")
        prompt = _int_tokens(rec.prompt_ids, "prompt_ids", where)
        if prompt.size == 0:
            raise RolloutStoreError(f"{where}: prompt_ids is empty (the first token must be a prompt token)")
        response = _int_tokens(rec.response_ids, "response_ids", where)
        lps = _float_tokens(rec.behaviour_logprobs, "behaviour_logprobs", where, response.size)
        try:
            reward = float(rec.reward)
        except (TypeError, ValueError):
            raise RolloutStoreError(f"{where}: reward must be a number, got {rec.reward!r}") from None
        if not math.isfinite(reward):
            raise RolloutStoreError(f"{where}: reward is {reward}")
        if isinstance(rec.group_id, bool) or not isinstance(rec.group_id, int | np.integer):
            raise RolloutStoreError(f"{where}: group_id must be an int, got {rec.group_id!r}")
        version = -1 if rec.policy_version is None else rec.policy_version
        if isinstance(version, bool) or not isinstance(version, int | np.integer):
            raise RolloutStoreError(f"{where}: policy_version must be an int or None, got {rec.policy_version!r}")
        if isinstance(rec.sampling_params, str):
            params = rec.sampling_params
        else:
            try:
                params = json.dumps(dict(rec.sampling_params), sort_keys=True)
            except (TypeError, ValueError) as e:
                raise RolloutStoreError(f"{where}: sampling_params is not JSON-serialisable: {e}") from None
        sample_id = f"b{batch}-{row}" if rec.sample_id is None else str(rec.sample_id)
        if sample_id in seen:
            raise RolloutStoreError(f"{where}: sample_id {sample_id!r} repeats row {seen[sample_id]}")
        seen[sample_id] = row
        cols["sample_id"].append(sample_id)
        cols["prompt_id"].append(str(rec.prompt_id))
        cols["prompt_ids"].append(prompt)
        cols["response_ids"].append(response)
        cols["behaviour_logprobs"].append(lps)
        cols["reward"].append(reward)
        cols["group_id"].append(int(rec.group_id))
        cols["finish_reason"].append(str(rec.finish_reason))
        cols["sampling_params"].append(params)
        cols["policy_version"].append(int(version))
    return pa.table({name: pa.array(cols[name], type=BASE_SCHEMA.field(name).type) for name in cols})


# ----------------------------------------------------------------------------- file helpers


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, name: str, data: bytes) -> Path:
    tmp = directory / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # disk full / quota: no partial temp file left behind, and say which file it was
        from erpd_megatron.utils.io import named_os_error

        tmp.unlink(missing_ok=True)
        raise named_os_error(e, directory / name) from e
    return tmp


def _atomic_write(directory: Path, name: str, data: bytes) -> None:
    tmp = _write_temp(directory, name, data)
    try:
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


# ----------------------------------------------------------------------------- the store


class RolloutStore:
    """A directory of rollout batches. See the module docstring for layout and guarantees."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise RolloutStoreError(f"rollout store {self.root} does not exist")

    # -- manifest
    def _load_manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.exists():
            strays = sorted(p.name for p in self.root.glob("batch_*.parquet")) if self.root.is_dir() else []
            if strays:
                raise RolloutStoreError(
                    f"{path} is missing but the store holds batch files {strays[:5]}: they are not in any "
                    "manifest, refusing to read them"
                )
            return {"format": FORMAT, "files": {}}
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
                raise ValueError(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise RolloutStoreError(f"{path} is not a valid rollout-store manifest: {e}") from None
        return manifest

    def _save_manifest(self, manifest: dict) -> None:
        _atomic_write(self.root, MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())

    @staticmethod
    def _committed(manifest: dict, batch: int | None = None) -> dict[str, dict]:
        return {
            name: e
            for name, e in manifest["files"].items()
            if e.get("state") == "committed" and (batch is None or e["batch"] == batch)
        }

    def batches(self) -> list[int]:
        """Committed batch indices, ascending."""
        return sorted({e["batch"] for e in self._committed(self._load_manifest()).values() if e["kind"] == "base"})

    def columns(self, batch: int) -> list[str]:
        """All columns of a committed batch (base + sidecars)."""
        files = self._files_of(self._load_manifest(), batch)
        return [c for _, e in files for c in e["columns"]]

    def per_token_columns(self, batch: int) -> list[str]:
        """Float32 per-token columns of a batch: behaviour_logprobs and every added column."""
        files = self._files_of(self._load_manifest(), batch)
        return list(BASE_PER_TOKEN) + [c for _, e in files if e["kind"] == "sidecar" for c in e["columns"]]

    def _files_of(self, manifest: dict, batch: int) -> list[tuple[str, dict]]:
        files = self._committed(manifest, batch)
        base = [(n, e) for n, e in files.items() if e["kind"] == "base"]
        if not base:
            raise RolloutStoreError(f"{self.root}: batch {batch} is not in the store (batches: {self.batches()})")
        sidecars = sorted(((n, e) for n, e in files.items() if e["kind"] == "sidecar"), key=lambda ne: ne[1]["index"])
        return base + sidecars

    # -- writing
    def _commit_file(self, manifest: dict, name: str, table: pa.Table, entry: dict) -> Path:
        """temp file -> pending manifest entry -> rename -> committed entry. Crash-safe at each step."""
        data = _table_bytes(table)
        entry = dict(entry, sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data), num_rows=table.num_rows)
        tmp = _write_temp(self.root, name, data)
        try:
            _crash_point("temp_written")
            manifest["files"][name] = dict(entry, state="pending")
            self._save_manifest(manifest)
            _crash_point("pending")
            os.replace(tmp, self.root / name)
            _fsync_dir(self.root)
            _crash_point("renamed")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        manifest["files"][name] = dict(entry, state="committed")
        self._save_manifest(manifest)
        return self.root / name

    def _clear_pending(self, manifest: dict, name: str) -> None:
        """Remove what a crashed, never-committed write of `name` left; refuse to touch unknown files."""
        path = self.root / name
        if name not in manifest["files"]:
            if path.exists():
                raise RolloutStoreError(f"{path} exists but is not in the manifest; not overwriting an unknown file")
            return
        path.unlink(missing_ok=True)  # a pending entry: the write never committed

    def write_batch(self, batch: int, records: Sequence[RolloutRecord]) -> Path:
        """Validate and write batch `batch` (refuses an existing one). Returns the file's path."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise RolloutStoreError(f"batch index must be an int >= 0, got {batch!r}")
        if len(records) == 0:
            raise RolloutStoreError(f"batch {batch}: no records to write")
        table = _records_to_table(batch, records)
        manifest = self._load_manifest()
        if self._committed(manifest, batch):
            raise RolloutStoreError(f"{self.root}: batch {batch} already exists; committed batches are never rewritten")
        name = f"batch_{batch}.parquet"
        self._clear_pending(manifest, name)
        return self._commit_file(manifest, name, table, {"batch": batch, "kind": "base", "columns": table.column_names})

    def add_columns(self, batch: int, columns: Mapping[str, Any]) -> Path:
        """Add per-token float32 columns to a committed batch, as a new sidecar file.

        Each value is either a list (one 1-D array per row, length = that row's response length) or a
        padded [B, T] tensor/array in the `load_tensors` layout of this batch alone (values are taken
        at the response positions).
        """
        if not columns:
            raise RolloutStoreError(f"batch {batch}: add_columns got no columns")
        manifest = self._load_manifest()
        existing = set(self.columns(batch))
        base = self.read_table(batch, columns=["sample_id", "prompt_ids", "response_ids"])
        prompt_lens = base.column("prompt_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        resp_lens = base.column("response_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        out: dict[str, pa.Array] = {"sample_id": base.column("sample_id")}
        for col, values in columns.items():
            if not isinstance(col, str) or not _COLUMN_NAME_RE.fullmatch(col):
                raise RolloutStoreError(f"batch {batch}: column name {col!r} must match [a-z_][a-z0-9_]*")
            if col in existing:
                raise RolloutStoreError(f"batch {batch}: column {col!r} already exists")
            rows = _rows_from_values(values, prompt_lens, resp_lens, f"batch {batch} column {col!r}")
            arrays = [
                _float_tokens(v, col, f"batch {batch} row {i} (0-based)", int(resp_lens[i])) for i, v in enumerate(rows)
            ]
            out[col] = pa.array(arrays, type=pa.list_(pa.float32()))
        table = pa.table(out)
        index = 1 + max(
            (e["index"] for e in self._committed(manifest, batch).values() if e["kind"] == "sidecar"), default=0
        )
        name = f"batch_{batch}.extra{index}.parquet"
        self._clear_pending(manifest, name)
        entry = {"batch": batch, "kind": "sidecar", "index": index, "columns": [c for c in out if c != "sample_id"]}
        return self._commit_file(manifest, name, table, entry)

    # -- reading
    def _read_verified(self, name: str, entry: dict) -> pa.Table:
        path = self.root / name
        if not path.exists():
            raise RolloutStoreError(f"{path} is listed in the manifest but missing")
        data = path.read_bytes()
        if len(data) != entry["num_bytes"]:
            what = "truncated" if len(data) < entry["num_bytes"] else "longer than recorded"
            raise RolloutStoreError(f"{path} is {what}: {len(data)} bytes, manifest says {entry['num_bytes']}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise RolloutStoreError(f"{path} is corrupt: sha256 {digest[:16]}... != manifest {entry['sha256'][:16]}...")
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as e:
            raise RolloutStoreError(f"{path} matches its checksum but is not readable Parquet: {e}") from None
        if table.num_rows != entry["num_rows"]:
            raise RolloutStoreError(f"{path} has {table.num_rows} rows, manifest says {entry['num_rows']}")
        return table

    def _check_no_strays(self, manifest: dict, batch: int | None) -> None:
        known = set(manifest["files"])
        for p in sorted(self.root.iterdir()):
            m = _BATCH_FILE_RE.fullmatch(p.name)
            if m and (batch is None or int(m.group(1)) == batch) and p.name not in known:
                raise RolloutStoreError(
                    f"{p} is not in {self.root / MANIFEST}: refusing to read a store with unknown files"
                )

    def read_table(self, batch: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Verified read of one batch, sidecars joined (row order = write order)."""
        manifest = self._load_manifest()
        files = self._files_of(manifest, batch)
        self._check_no_strays(manifest, batch)
        table = None
        for name, entry in files:
            if columns is not None and entry["kind"] == "sidecar" and not set(entry["columns"]) & set(columns):
                continue
            t = self._read_verified(name, entry)
            if table is None:
                table = t
                continue
            if not t.column("sample_id").equals(table.column("sample_id")):
                raise RolloutStoreError(f"{self.root / name}: sample_id order differs from its batch file")
            for col in entry["columns"]:
                table = table.append_column(col, t.column(col))
        if columns is not None:
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise RolloutStoreError(f"{self.root}: batch {batch} has no column(s) {missing}")
            table = table.select(list(columns))
        return table

    def verify(self) -> None:
        """Check every committed file and look for unknown batch files; raise on the first problem."""
        manifest = self._load_manifest()
        self._check_no_strays(manifest, None)
        for name, entry in sorted(self._committed(manifest).items()):
            self._read_verified(name, entry)

    def _gather(self, batches: int | Sequence[int], per_token: Sequence[str] | None) -> tuple[pa.Table, list[str]]:
        batches = [batches] if isinstance(batches, int) else list(batches)
        if not batches:
            raise RolloutStoreError(f"{self.root}: no batches requested")
        tables, names = [], None
        for b in batches:
            cols = list(per_token) if per_token is not None else self.per_token_columns(b)
            if names is None:
                names = cols
            elif set(cols) != set(names):
                raise RolloutStoreError(
                    f"{self.root}: batch {b} has per-token columns {sorted(cols)}, batch {batches[0]} has "
                    f"{sorted(names)}; pass columns= explicitly"
                )
            keep = ["prompt_ids", "response_ids", "reward", "group_id", "policy_version", *names]
            tables.append(self.read_table(b, columns=keep))
        return pa.concat_tables(tables), names

    def load_tensors(
        self,
        batches: int | Sequence[int],
        pad_id: int = 0,
        columns: Sequence[str] | None = None,
        pad_to_multiple_of: int = 1,
    ) -> dict:
        """Padded [B, T] tensors of the given batches (concatenated in order); see `pad_rollouts`."""
        table, names = self._gather(batches, columns)
        return pad_rollouts(table, names, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)

    def load_packed(self, batches: int | Sequence[int], columns: Sequence[str] | None = None) -> dict:
        """Packed (concatenated) tensors of the given batches; see `pack_rollouts`."""
        table, names = self._gather(batches, columns)
        return pack_rollouts(table, names)


def _rows_from_values(values: Any, prompt_lens: np.ndarray, resp_lens: np.ndarray, where: str) -> list:
    """Per-row 1-D arrays from a list of arrays or from a padded [B, T] array / tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().float().numpy()
    if isinstance(values, np.ndarray) and values.ndim == 2:
        need = int((prompt_lens + resp_lens).max())
        if values.shape[0] != len(resp_lens) or values.shape[1] < need:
            raise RolloutStoreError(
                f"{where}: padded values have shape {values.shape}, need [{len(resp_lens)}, >= {need}]"
            )
        return [values[i, p : p + r] for i, (p, r) in enumerate(zip(prompt_lens, resp_lens))]
    values = list(values)
    if len(values) != len(resp_lens):
        raise RolloutStoreError(f"{where}: {len(values)} rows given, the batch has {len(resp_lens)}")
    return values


# ----------------------------------------------------------------------------- tensor layouts


def _lists(table: pa.Table, col: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list column."""
    arr = table.column(col).combine_chunks()
    offsets = arr.offsets.to_numpy()
    flat = arr.values.to_numpy(zero_copy_only=False)
    return flat[offsets[0] : offsets[-1]], offsets - offsets[0]


def pad_rollouts(
    table: pa.Table, per_token: Sequence[str] = BASE_PER_TOKEN, pad_id: int = 0, pad_to_multiple_of: int = 1
) -> dict:
    """Right-padded tensors in the project token layout.

    Returns input_ids [B,T] long, attention_mask [B,T] long, response_mask [B,T] float32,
    one [B,T] float32 tensor per `per_token` column (values at response positions, 0 elsewhere),
    rewards [B] float32, group_ids [B] long, policy_versions [B] long, prompt_lengths [B] long,
    response_lengths [B] long.
    """
    import torch

    p_flat, p_off = _lists(table, "prompt_ids")
    r_flat, r_off = _lists(table, "response_ids")
    p_len, r_len = np.diff(p_off), np.diff(r_off)
    total = p_len + r_len
    B = table.num_rows
    T = int(total.max()) if B else 0
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention = np.zeros((B, T), dtype=np.int64)
    response = np.zeros((B, T), dtype=np.float32)
    per = {c: np.zeros((B, T), dtype=np.float32) for c in per_token}
    per_flat = {c: _lists(table, c) for c in per_token}
    for b in range(B):
        p, r = int(p_len[b]), int(r_len[b])
        input_ids[b, :p] = p_flat[p_off[b] : p_off[b + 1]]
        input_ids[b, p : p + r] = r_flat[r_off[b] : r_off[b + 1]]
        attention[b, : p + r] = 1
        response[b, p : p + r] = 1
        for c, (flat, off) in per_flat.items():
            per[c][b, p : p + r] = flat[off[b] : off[b + 1]]
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "response_mask": torch.from_numpy(response),
    }
    out.update({c: torch.from_numpy(v) for c, v in per.items()})
    out.update(_per_sequence(table, p_len, r_len))
    return out


def pack_rollouts(table: pa.Table, per_token: Sequence[str] = BASE_PER_TOKEN) -> dict:
    """Packed tensors: all sequences (prompt + response) concatenated without padding.

    Returns input_ids [N] long, position_ids [N] long (restart at 0 per sequence), cu_seqlens [B+1]
    int32 (sequence b is [cu_seqlens[b], cu_seqlens[b+1])), response_mask [N] float32, one [N]
    float32 tensor per `per_token` column, plus the per-sequence tensors of `pad_rollouts`.
    """
    import torch

    p_flat, p_off = _lists(table, "prompt_ids")
    r_flat, r_off = _lists(table, "response_ids")
    p_len, r_len = np.diff(p_off), np.diff(r_off)
    cu = np.concatenate([[0], np.cumsum(p_len + r_len)]).astype(np.int64)
    N = int(cu[-1])
    input_ids = np.empty(N, dtype=np.int64)
    positions = np.empty(N, dtype=np.int64)
    response = np.zeros(N, dtype=np.float32)
    per = {c: np.zeros(N, dtype=np.float32) for c in per_token}
    per_flat = {c: _lists(table, c) for c in per_token}
    for b in range(table.num_rows):
        s, p, r = int(cu[b]), int(p_len[b]), int(r_len[b])
        input_ids[s : s + p] = p_flat[p_off[b] : p_off[b + 1]]
        input_ids[s + p : s + p + r] = r_flat[r_off[b] : r_off[b + 1]]
        positions[s : s + p + r] = np.arange(p + r)
        response[s + p : s + p + r] = 1
        for c, (flat, off) in per_flat.items():
            per[c][s + p : s + p + r] = flat[off[b] : off[b + 1]]
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(positions),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "response_mask": torch.from_numpy(response),
    }
    out.update({c: torch.from_numpy(v) for c, v in per.items()})
    out.update(_per_sequence(table, p_len, r_len))
    return out


def _per_sequence(table: pa.Table, p_len: np.ndarray, r_len: np.ndarray) -> dict:
    import torch

    return {
        "rewards": torch.from_numpy(table.column("reward").to_numpy().astype(np.float32)),
        "group_ids": torch.from_numpy(table.column("group_id").to_numpy().astype(np.int64)),
        "policy_versions": torch.from_numpy(table.column("policy_version").to_numpy().astype(np.int64)),
        "prompt_lengths": torch.from_numpy(p_len.astype(np.int64)),
        "response_lengths": torch.from_numpy(r_len.astype(np.int64)),
    }
