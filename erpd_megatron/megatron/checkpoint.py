"""Distributed checkpoints (megatron dist_checkpointing), written atomically.

Layout of a checkpoint root:
    <root>/latest                  "iter_0000012" (replaced atomically with os.replace)
    <root>/iter_0000012/           dist_checkpointing files (model, optimizer), rng/, erpd_checkpoint.json
    <root>/iter_0000013.tmp/       a save in progress (or a crashed one; never loaded, cleaned next save)

Save: every rank writes into `iter_N.tmp`; after a barrier rank 0 writes `erpd_checkpoint.json`
(step, trainer state, model config, layout, and the size of every file: the completion marker),
renames the directory to `iter_N` and then points `latest` at it. A crash at any point leaves the
previous checkpoint complete and marked latest. A directory without the marker, or with a file
missing / shorter than recorded, is refused with CheckpointError.

Model tensors are saved as megatron ShardedTensors keyed by global names, so they load into any
TP/PP layout. The optimizer uses the 'fully_reshardable' DistributedOptimizer format (reshardable
over TP/PP/DP, gathered through DP rank 0 at save time). RNG states are per rank and are restored
only when the layout is unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from erpd_megatron.utils.io import atomic_write_text

if TYPE_CHECKING:
    from erpd_megatron.megatron.engine import PolicyEngine

log = logging.getLogger(__name__)

MARKER = "erpd_checkpoint.json"
LATEST = "latest"
FORMAT_VERSION = 1
OPTIM_SHARDING = "fully_reshardable"


class CheckpointError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def iter_dirname(step: int) -> str:
    return f"iter_{step:07d}"


def _model_sharded_sd(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _file_sizes(directory: str) -> dict[str, int]:
    sizes = {}
    for base, _, files in os.walk(directory):
        for f in files:
            if f == MARKER:
                continue
            p = os.path.join(base, f)
            sizes[os.path.relpath(p, directory)] = os.path.getsize(p)
    return sizes


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _optim_metadata(sharding: str) -> dict:
    # Without CUDA the optimizer state is gathered over the gloo DP group ("mem_efficient" variant):
    # the default variant all-gathers with tensors moved to CUDA (distrib_optimizer.py:1374).
    # Both variants write interchangeable checkpoints.
    return {"distrib_optim_sharding_type": sharding,
            "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def save_checkpoint(engine: PolicyEngine, root: str, step: int | None = None) -> str:
    """Save model, optimizer, LR-schedule step, RNG and engine.trainer_state; return the final directory."""
    from megatron.core import dist_checkpointing

    step = engine.step if step is None else step
    final = os.path.join(root, iter_dirname(step))
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # leftover of a crashed save of the same step
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier()

    sd = _model_sharded_sd(engine.modules)
    if engine.optimizer is not None:
        sd["optimizer"] = engine.optimizer.sharded_state_dict(sd, is_loading=False, metadata=_optim_metadata(OPTIM_SHARDING))
    _install_results_queue()
    dist_checkpointing.save(sd, tmp, content_metadata={"distrib_optim_sharding_type": OPTIM_SHARDING})
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    _barrier()

    if _rank() == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "trainer_state": engine.trainer_state,
            "model_cfg": engine.model_cfg.to_dict(),
            "parallel": asdict(engine.par),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "has_optimizer": engine.optimizer is not None,
            "optim_sharding": OPTIM_SHARDING,
            "files": _file_sizes(tmp),
        }
        atomic_write_text(os.path.join(tmp, MARKER), json.dumps(meta, indent=1, default=str))
        if os.path.exists(final):  # re-saving the same step: replace the old directory
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_text(os.path.join(root, LATEST), iter_dirname(step) + "\n")
        log.info("checkpoint saved: %s (tp=%d pp=%d dp=%d)", final, engine.par.tp, engine.par.pp, engine.par.dp)
    _barrier()
    return final


def _die_with_parent() -> None:
    """Manager-server initializer: ask Linux to SIGKILL this process when its parent dies."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: keep megatron's behaviour
        pass


def _install_results_queue() -> None:
    """megatron-core 0.19.2 dist_checkpointing/strategies/filesystem_async.py:get_write_results_queue starts a
    spawned multiprocessing Manager on first save and never stops it. If the trainer is SIGKILLed that server is
    orphaned (and keeps its parent's stdout open, so a caller waiting for EOF hangs). We create the same queue
    from a Manager whose server dies with us; megatron then reuses it (module-level cache)."""
    import multiprocessing
    import multiprocessing.managers

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", None) is None:
        manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_die_with_parent)
        fa._results_queue = manager.Queue()
        fa._erpd_manager = manager  # keep it alive as long as the module


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint root (follows `latest`) or an iter_N directory -> the verified iter_N directory."""
    if os.path.isfile(os.path.join(path, LATEST)):
        with open(os.path.join(path, LATEST)) as f:
            name = f.read().strip()
        path = os.path.join(path, name)
        if not os.path.isdir(path):
            raise CheckpointError(f"{os.path.join(os.path.dirname(path), LATEST)} points at {name}, which does not exist")
    verify_checkpoint_dir(path)
    return path


def read_checkpoint_meta(path: str) -> dict:
    path = resolve_checkpoint_dir(path)
    with open(os.path.join(path, MARKER)) as f:
        return json.load(f)


def verify_checkpoint_dir(path: str) -> dict:
    """Raise CheckpointError unless `path` is a complete checkpoint (marker present, all files whole)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if path.rstrip("/").endswith(".tmp"):
        raise CheckpointError(f"{path} is an unfinished save (.tmp); load the root to get the latest complete one")
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        raise CheckpointError(
            f"checkpoint {path} is incomplete: no {MARKER} completion marker (the save was interrupted, "
            "or this is not an erpd checkpoint)"
        )
    try:
        with open(marker) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: {MARKER} is corrupt ({e})") from e
    problems = []
    for rel, size in meta.get("files", {}).items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            problems.append(f"missing {rel}")
        elif os.path.getsize(p) != size:
            problems.append(f"{rel} has {os.path.getsize(p)} bytes, expected {size}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise CheckpointError(f"checkpoint {path} is cut short or damaged: {shown}")
    return meta


def load_checkpoint(engine: PolicyEngine, path: str, model_only: bool = False) -> dict:
    """Load into `engine` (any TP/PP layout for the model). Restores optimizer, step, trainer_state and
    (same layout only) RNG unless `model_only`. Returns the checkpoint's metadata."""
    path = resolve_checkpoint_dir(path)
    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    _check_model_cfg(meta, engine.model_cfg, path)
    sd = _model_sharded_sd(engine.modules)
    load_optim = not model_only and engine.optimizer is not None
    if load_optim:
        if not meta.get("has_optimizer"):
            raise CheckpointError(f"checkpoint {path} has no optimizer state (load it with model_only=True)")
        _init_empty_optimizer_state(engine.optimizer)
        sd["optimizer"] = engine.optimizer.sharded_state_dict(
            sd, is_loading=True, metadata=_optim_metadata(meta.get("optim_sharding", OPTIM_SHARDING))
        )
    state = _load_sharded(sd, path)
    _load_model_state(engine.modules, state)
    if engine.optimizer is not None and not load_optim:
        # bf16/fp16 runs: the optimizer's fp32 main params are copies made at construction; without
        # this the first step would write the random-init weights back (measured on CPU bf16).
        engine.optimizer.reload_model_params()
    if load_optim:
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.step = int(meta["step"])
        engine.trainer_state = dict(meta.get("trainer_state") or {})
        engine._set_lr()
        same_layout = meta.get("parallel") == asdict(engine.par) and meta.get("world_size") == (
            dist.get_world_size() if dist.is_initialized() else 1)
        rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
        if same_layout and os.path.isfile(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=False))
        elif not same_layout:
            log.info("checkpoint %s: layout changed (%s -> %s), RNG states not restored", path, meta.get("parallel"),
                     asdict(engine.par))
    _barrier()
    return meta


def _init_empty_optimizer_state(optimizer) -> None:
    """Give a never-stepped Adam its state tensors (zeros, step 0) so megatron can build the loading
    state dict: DistributedOptimizer.state_dict() reads every param's 'step' when neither TE nor apex
    is installed (distrib_optimizer.py:837-839) and fails on an empty state. The loaded values
    replace these in place."""
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    for opt in inner:
        if opt is None:
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if len(st) == 0:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)


def _load_sharded(sd: dict, path: str) -> dict:
    """dist_checkpointing.load that tolerates `_extra_state` entries the checkpoint does not have.

    Transformer Engine modules carry an `_extra_state` (FP8 scaling metadata) that the local spec's modules
    lack (TEDotProductAttention's `core_attention._extra_state`, for one): a checkpoint written with the local
    spec (the converters always use it) must still load into a TE model. Such keys are dropped from the load
    (megatron's RETURN_UNEXPECTED mode); any other key the checkpoint lacks is an error naming it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state, _, unexpected = dist_checkpointing.load(sd, path, strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in unexpected if not k.endswith("_extra_state"))
    if absent:
        raise CheckpointError(f"checkpoint {path} has no tensor {absent[0]!r} ({len(absent)} absent in all)")
    skipped = sorted(k for k in unexpected if k.endswith("_extra_state"))
    if skipped:
        log.info("checkpoint %s: %d `_extra_state` entries not in it (written by another layer spec): "
                 "left at their initial values, e.g. %s", path, len(skipped), skipped[0])
    return state


def _load_model_state(chunks, state: dict) -> None:
    """load_state_dict, strict except for `_extra_state` keys the checkpoint did not have (_load_sharded)."""
    for i, c in enumerate(chunks):
        res = c.load_state_dict(state["model"] if len(chunks) == 1 else state[f"model{i}"], strict=False)
        bad = [k for k in res.missing_keys if not k.endswith("_extra_state")] + list(res.unexpected_keys)
        if bad:
            raise CheckpointError(f"model state mismatch: missing {[k for k in res.missing_keys if k in bad][:5]}, "
                                  f"unexpected {list(res.unexpected_keys)[:5]}")


def _check_model_cfg(meta: dict, cfg, path: str) -> None:
    saved = meta.get("model_cfg") or {}
    mine = cfg.to_dict()
    # shape-defining fields must agree; init_std / max_position_embeddings may differ
    keys = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "ffn_hidden_size", "tie_embeddings", "qk_norm")
    diff = {k: (saved.get(k), mine.get(k)) for k in keys if saved.get(k) != mine.get(k)}
    if diff:
        raise CheckpointError(f"checkpoint {path} was saved for another model: (saved, given) = {diff}")


def load_model_weights(chunks: list[torch.nn.Module], path: str) -> dict:
    """Model-only load into bare or DDP-wrapped model chunks of any layout (converters, signal precompute)."""
    from erpd_megatron.megatron.model import unwrap_model

    chunks = [unwrap_model(c) for c in chunks]
    path = resolve_checkpoint_dir(path)
    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    state = _load_sharded(_model_sharded_sd(chunks), path)
    _load_model_state(chunks, state)
    _barrier()
    return meta


def list_checkpoints(root: str) -> list[str]:
    """Complete iter_N directories under root, oldest first (unfinished .tmp ones excluded)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name)
        if name.startswith("iter_") and not name.endswith(".tmp") and os.path.isfile(os.path.join(p, MARKER)):
            out.append(p)
    return out
