"""Distributed checkpoints (megatron dist_checkpointing), written atomically.

Layout of a checkpoint root:
    <root>/latest                  "iter_0000012" (replaced atomically with os.replace)
    <root>/iter_0000012/           dist_checkpointing files (model, optimizer), rng/, erpd_checkpoint.json
    <root>/iter_0000013.tmp/       a save in progress (or a crashed one; never loaded, cleaned next save)

Save: every rank writes into `iter_N.tmp`; after a barrier the ranks hash the files (sha256, split over
ranks and threads) and rank 0 writes `erpd_checkpoint.json` (step, trainer state, model config, layout, and
the size and sha256 of every file: the completion marker), renames the directory to `iter_N` and then points
`latest` at it. A crash at any point leaves the previous checkpoint complete and marked latest; a failed
save (disk full, quota) removes its `.tmp` directory and raises CheckpointError naming the path.

Load: a directory without the marker, or with a file missing / of another size, is refused with
CheckpointError; before anything is deserialised every file's sha256 is checked against the marker
(`verify_checkpoint_content`; a collective when a process group is up), so a file altered in place is refused
naming it. `load_latest_intact` (the pipeline's resume) falls back to the newest intact checkpoint and logs why.
Checksums catch damage, not malice: whoever can write the directory can rewrite the marker too, and
torch's dist-checkpoint metadata (`.metadata`, `common.pt`) is a pickle: load checkpoints from trusted places only.

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

from erpd_megatron.utils.io import atomic_write_text, follow_umask

if TYPE_CHECKING:
    from erpd_megatron.megatron.engine import PolicyEngine

log = logging.getLogger(__name__)

MARKER = "erpd_checkpoint.json"
LATEST = "latest"
FORMAT_VERSION = 2  # 2: per-file sha256 in the marker, RNG states as safetensors (1: sizes only, rng/*.pt)
RNG_FILE = "rng/rank_{rank:05d}.safetensors"
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


def _shard() -> tuple[int, int]:
    return (_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _file_records(directory: str) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file but the marker (a collective: ranks split the files)."""
    from erpd_megatron.utils.digest import digest_files, list_files

    rels = list_files(directory, exclude=(MARKER,))
    records = {}
    for part in _all_gather(digest_files(directory, rels, _shard())):
        records.update(part)
    return dict(sorted(records.items()))


def _rng_state() -> dict[str, torch.Tensor]:
    """Flat {name: uint8 tensor} (safetensors: no pickle on load)."""
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state()}
    for name, t in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker/{name}"] = t
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return {k: v.contiguous() for k, v in state.items()}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    if "tracker" not in state:  # flat safetensors layout
        state = {**state, "tracker": {k[len("tracker/"):]: v for k, v in state.items() if k.startswith("tracker/")}}
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _read_rng_state(path: str) -> dict | None:
    """This rank's saved RNG state: safetensors, or a format-1 `rank_N.pt` read with torch's weights-only
    unpickler (tensors and dicts only: never `weights_only=False`, which would run code from the file)."""
    new = os.path.join(path, RNG_FILE.format(rank=_rank()))
    if os.path.isfile(new):
        from safetensors.torch import load_file

        return load_file(new)
    old = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if os.path.isfile(old):
        return torch.load(old, weights_only=True)
    return None


def _optim_metadata(sharding: str) -> dict:
    # Without CUDA the optimizer state is gathered over the gloo DP group ("mem_efficient" variant):
    # the default variant all-gathers with tensors moved to CUDA (distrib_optimizer.py:1374).
    # Both variants write interchangeable checkpoints.
    return {"distrib_optim_sharding_type": sharding,
            "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def save_checkpoint(engine: PolicyEngine, root: str, step: int | None = None) -> str:
    """Save model, optimizer, LR-schedule step, RNG and engine.trainer_state; return the final directory."""
    step = engine.step if step is None else step
    final = os.path.join(root, iter_dirname(step))
    tmp = final + ".tmp"
    try:
        _save_into(engine, root, step, final, tmp)
    except BaseException as e:  # torch DCP raises CheckpointException, a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        # a full disk / quota / I/O error: drop the partial save (frees its space); `latest` and every earlier
        # checkpoint are untouched, so the run resumes from the previous one
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        where = _failed_path(e) or tmp
        try:
            free = f" ({shutil.disk_usage(root).free / 2**20:.0f} MiB free there now)"
        except OSError:
            free = ""
        raise CheckpointError(f"saving checkpoint {final} failed while writing {where}{free}: {_reason(e)}; "
                              f"the previous checkpoint ({_latest_name(root)}) is intact") from e
    return final


def _causes(e: BaseException, depth: int = 0):
    """e, its cause / context chain, and the per-rank failures torch DCP's CheckpointException carries."""
    while e is not None and depth < 20:
        yield e
        for failure in (getattr(e, "failures", None) or {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                yield from _causes(inner, depth + 1)
        e, depth = e.__cause__ or e.__context__, depth + 1


def _reason(e: BaseException) -> str:
    """The first OSError's text (e.g. "[Errno 28] No space left on device"), else the exception's own."""
    for c in _causes(e):
        if isinstance(c, OSError):
            return f"[Errno {c.errno}] {c.strerror or c}" if c.errno else str(c)
    # megatron's async writer reports only "error: <class 'OSError'>" (the message is lost): keep its last
    # error line, not the whole traceback text
    lines = [x.strip() for x in f"{type(e).__name__}: {e}".splitlines() if x.strip()]
    return next((x for x in reversed(lines) if "Error" in x), lines[-1])


def _failed_path(e: BaseException) -> str | None:
    return next((str(c.filename) for c in _causes(e) if isinstance(c, OSError) and c.filename), None)


def _latest_name(root: str) -> str:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip()
    except OSError:
        return "none yet"


def _save_into(engine: PolicyEngine, root: str, step: int, final: str, tmp: str) -> None:
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # leftover of a crashed save of the same step
            shutil.rmtree(tmp)
        # empty: dist_checkpointing.save warns "Overwriting old incomplete / corrupted checkpoint" on any entry
        os.makedirs(tmp)
    _barrier()

    sd = _model_sharded_sd(engine.modules)
    if engine.optimizer is not None:
        sd["optimizer"] = engine.optimizer.sharded_state_dict(sd, is_loading=False, metadata=_optim_metadata(OPTIM_SHARDING))
    _install_results_queue()
    dist_checkpointing.save(sd, tmp, content_metadata={"distrib_optim_sharding_type": OPTIM_SHARDING})
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)  # after the save (see above); every rank, race-free
    _write_rng(os.path.join(tmp, RNG_FILE.format(rank=_rank())))
    _barrier()

    files = _file_records(tmp)
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
            "files": files,
        }
        atomic_write_text(os.path.join(tmp, MARKER), json.dumps(meta, indent=1, default=str))
        if os.path.exists(final):  # re-saving the same step: replace the old directory
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_text(os.path.join(root, LATEST), iter_dirname(step) + "\n")
        log.info("checkpoint saved: %s (tp=%d pp=%d dp=%d)", final, engine.par.tp, engine.par.pp, engine.par.dp)
    _barrier()


def _write_rng(path: str) -> None:
    from safetensors.torch import save_file

    try:
        save_file(_rng_state(), path)
        follow_umask(path)  # safetensors creates its files 0600
    except OSError as e:
        from erpd_megatron.utils.io import named_os_error

        raise named_os_error(e, path) from e


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
    return verify_checkpoint_dir(resolve_checkpoint_dir(path))


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
    meta = _read_marker(marker, path)
    from erpd_megatron.utils.digest import check_files

    _raise_problems(path, check_files(path, meta.get("files", {}), content=False))
    return meta


def _read_marker(marker: str, path: str) -> dict:
    """The marker's JSON; any damage (invalid UTF-8 or JSON, another shape: a flipped byte) is a CheckpointError
    naming it, so `load_latest_intact` falls back as for a damaged shard."""
    try:
        with open(marker, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
        files = meta["files"] if isinstance(meta, dict) else None
        if not isinstance(files, dict) or not all(
                isinstance(r, int) or (isinstance(r, dict) and isinstance(r.get("size"), int)) for r in files.values()):
            raise ValueError("not an object with a 'files' map of sizes")
    except (ValueError, RecursionError, KeyError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"checkpoint {path}: {MARKER} is corrupt ({type(e).__name__}: {str(e)[:200]})") from None
    return meta


def _raise_problems(path: str, problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise CheckpointError(f"checkpoint {path} is cut short or damaged: {shown}")


_verified: set[tuple] = set()  # (path, (file, size, mtime, inode)...) already hashed by this process


def verify_checkpoint_content(path: str) -> dict:
    """verify_checkpoint_dir, then the sha256 of every file against the marker, before anything is read.

    When a process group is up this is a collective (every rank calls it; the files are split over the ranks
    and every rank raises the same CheckpointError, naming the damaged files). A directory is hashed once per
    process. Format-1 checkpoints (sizes only) are checked by size, with a warning."""
    from erpd_megatron.utils.digest import check_files

    meta = verify_checkpoint_dir(path)
    files = meta.get("files", {})
    stats = [(rel, os.stat(os.path.join(path, rel))) for rel in sorted(files) + [MARKER]]
    key = (os.path.realpath(path), tuple((rel, s.st_size, s.st_mtime_ns, s.st_ino) for rel, s in stats))
    if key in _verified:  # same files, untouched since (a write in place changes the mtime)
        return meta
    if files and not any(isinstance(r, dict) for r in files.values()):
        log.warning("checkpoint %s has no content checksums (format %s): only file sizes checked", path,
                    meta.get("format_version"))
    problems = [p for part in _all_gather(check_files(path, files, _shard())) for p in part]
    _raise_problems(path, sorted(problems))
    _verified.add(key)
    return meta


def load_latest_intact(engine: PolicyEngine, root: str, model_only: bool = False) -> dict | None:
    """Load the newest checkpoint under `root` that passes verification, newest first; log every damaged one
    skipped (the run resumes from an earlier step). None when no intact checkpoint is left."""
    candidates = sorted(list_checkpoints(root), reverse=True)
    for k, path in enumerate(candidates):
        try:
            verify_checkpoint_content(path)
        except CheckpointError as e:
            older = os.path.basename(candidates[k + 1]) if k + 1 < len(candidates) else "the initial weights"
            log.warning("checkpoint %s is damaged, resuming from %s instead: %s", path, older, e)
            continue
        return load_checkpoint(engine, path, model_only=model_only)
    return None


def load_checkpoint(engine: PolicyEngine, path: str, model_only: bool = False) -> dict:
    """Load into `engine` (any TP/PP layout for the model). Restores optimizer, step, trainer_state and
    (same layout only) RNG unless `model_only`. Returns the checkpoint's metadata."""
    path = resolve_checkpoint_dir(path)
    meta = verify_checkpoint_content(path)
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
        rng = _read_rng_state(path) if same_layout else None
        if rng is not None:
            _set_rng_state(rng)
        elif not same_layout:
            log.info("checkpoint %s: layout changed (%s -> %s), RNG states not restored", path, meta.get("parallel"),
                     asdict(engine.par))
    _barrier()
    return meta


def _init_empty_optimizer_state(optimizer) -> None:
    """Give a never-stepped Adam the state tensors megatron builds its loading state dict from (the loaded values
    replace them in place), as megatron-core 0.19.2 does itself: its Adam `init_state_fn` (optimizer/__init__.py:
    588-594) creates `exp_avg` and `exp_avg_sq` only. TE's FusedAdam (what megatron uses whenever Transformer Engine
    is importable; apex's alike) keeps the step count in the param group, and its state_dict() looks up a dtype for
    every per-parameter state key (`name_to_dtype_map`: exp_avg, exp_avg_sq, master_param), so a per-parameter
    `step` there is a KeyError on every resume that loads the optimizer. Only torch's Adam(W), megatron's fallback
    without TE and apex, gets a per-parameter `step` (zero) too: DistributedOptimizer.state_dict() then reads every
    param's 'step' (distrib_optimizer.py:837-839) and fails on a state without one."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        torch_adam = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if len(st) == 0:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                    if torch_adam:
                        st["step"] = torch.zeros((), dtype=torch.float32)


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
    meta = verify_checkpoint_content(path)
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


def prune_checkpoints(root: str, keep_last: int, keep_steps=()) -> list[str]:
    """Delete complete checkpoints under `root` except the newest `keep_last`, those at `keep_steps` (e.g. the
    unlearned checkpoints strategy 2 reads) and the one `latest` points at. keep_last <= 0 keeps everything.
    Rank 0 deletes; returns the deleted directories."""
    if keep_last <= 0 or _rank() != 0:
        return []
    ckpts = list_checkpoints(root)
    keep = {os.path.basename(p) for p in ckpts[-keep_last:]} | {iter_dirname(int(s)) for s in keep_steps}
    keep.add(_latest_name(root))
    gone = [p for p in ckpts if os.path.basename(p) not in keep]
    for p in gone:
        os.remove(os.path.join(p, MARKER))  # first: a crash mid-delete leaves an unmarked (never loaded) directory
        shutil.rmtree(p)
    if gone:
        log.info("checkpoints pruned under %s (keep_last=%d, kept %s): %s", root, keep_last, sorted(keep),
                 [os.path.basename(p) for p in gone])
    return gone
