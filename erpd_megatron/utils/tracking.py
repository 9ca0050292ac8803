"""Experiment tracking beside the JSONL / TensorBoard logs: Weights & Biases (optional), run provenance.

- `run_info(cfg)`: the resolved config, the git commit of the code and the command line; written to
  `<run_dir>/run_info.json` (one entry per invocation), as TensorBoard text and as the W&B run config.
- `WandbSink`: one W&B run per method (grouped by the run dir's name), the same way TensorBoard gets one
  directory per method (`tb/<method>/`), so metric names are identical in all three: `loss`,
  `policy/kl_fwd_k3_tok_batch`, `train/grad_norm`, ... The run id is a pure function of (run dir, method), so a
  resumed invocation continues the same W&B run. `wandb` is imported only when `logging.wandb.mode` is not
  "disabled" (install with `pip install -e '.[wandb]'`).
- `read_offline_run(path)`: the history and config of an offline `.wandb` file, read with wandb's own
  protobuf records (wandb >= 0.20 ships no Python reader; the file is a LevelDB-style log of `Record`s).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

_PKG_DIR = Path(__file__).resolve().parent.parent


def git_commit(path: Path = _PKG_DIR) -> str | None:
    """HEAD of the git checkout holding this package, with "-dirty" when tracked files changed; None outside
    a checkout (an installed wheel)."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(cfg) -> dict:
    from erpd_megatron.config import to_dict

    return {"config": to_dict(cfg), "git_commit": git_commit(), "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def record_invocation(cfg, info: dict | None = None) -> dict:
    """Append this invocation (git commit, argv, start time) to `<run_dir>/run_info.json`; returns the info."""
    from erpd_megatron.utils.io import atomic_write_json

    info = info or run_info(cfg)
    path = Path(cfg.run_dir) / "run_info.json"
    old = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    old["invocations"].append({k: info[k] for k in ("git_commit", "argv", "started")})
    atomic_write_json(path, old)
    return info


# ----------------------------------------------------------------------------- W&B


def wandb_run_id(run_dir: str, method: str) -> str:
    """Stable W&B id of one method of one run dir (resuming the command resumes the W&B run)."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in method)
    return f"{safe}-{digest}"


class WandbSink:
    """A MetricLog sink: `log(step, metrics)` / `close()` into one W&B run."""

    def __init__(self, wcfg, run_dir: str, method: str, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logging.wandb.mode is not 'disabled' but wandb is not installed: "
                              "pip install -e '.[wandb]' (or set logging.wandb.mode=disabled)") from e
        root = Path(run_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=wcfg.project, entity=wcfg.entity or None, mode=wcfg.mode, dir=str(root),
            group=wcfg.group or root.resolve().name, name=method, job_type=method.split("_")[0],
            id=wandb_run_id(run_dir, method), resume="allow", config=config, reinit="finish_previous",
            # no stdout capture (the console is ours) and no banner per method
            settings=wandb.Settings(console="off", quiet=True, silent=wcfg.mode != "online"),
        )

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_sinks(cfg, method: str, info: dict | None = None) -> list:
    """Extra metric sinks for `method` on this rank (W&B when configured, main rank only)."""
    lc = getattr(cfg, "logging", None)
    if lc is None or lc.wandb.mode == "disabled" or os.environ.get("RANK", "0") != "0":
        return []
    info = info or run_info(cfg)
    return [WandbSink(lc.wandb, cfg.run_dir, method, {**info["config"], "git_commit": info["git_commit"],
                                                      "method": method})]


# ----------------------------------------------------------------------------- reading an offline run

_BLOCK, _HEADER = 32768, 7


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B":
        raise ValueError(f"{path}: not a .wandb file")
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 2):  # full / first fragment
            buf = chunk
        elif kind in (3, 4):  # middle / last fragment
            buf += chunk
        else:
            break
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def read_offline_run(path: str | Path) -> dict:
    """{"run_id", "name", "group", "config": {...}, "history": [{"_step": s, key: value, ...}, ...]} of a
    `run-<id>.wandb` file (internal `_timestamp` / `_runtime` dropped)."""
    out = {"config": {}, "history": []}
    for rec in _records(Path(path)):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(run_id=rec.run.run_id, name=rec.run.display_name, group=rec.run.run_group)
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            out["history"].append({k: v for k, v in row.items() if k not in ("_timestamp", "_runtime")})
    out["config"].pop("_wandb", None)
    return out


def offline_runs(run_dir: str | Path) -> dict[str, Path]:
    """name -> .wandb file of every offline run under `<run_dir>/wandb/` (the latest file per run id)."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    return {p.stem.removeprefix("run-"): p for p in files}
