"""Parallel layout: validation before launch, process groups, seeds.

`validate_layout` runs before any process group exists, so an impossible layout fails in the
launcher with a sentence saying why, instead of as an assertion deep inside megatron-core.
`init_parallel` picks gloo without CUDA (and applies the CPU compat layer) and NCCL with it.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from erpd_megatron.megatron.model import ModelConfig

log = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A TP/PP/DP/CP layout that cannot work for this model or world size."""


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout. world size = tp * pp * dp * cp."""

    tp: int = 1  # tensor parallel: splits heads, KV groups, FFN and vocabulary
    pp: int = 1  # pipeline parallel: splits layers into pp stages
    dp: int = 1  # data parallel: splits the global batch
    cp: int = 1  # context parallel (GPU + Transformer Engine only)
    sp: bool = False  # sequence parallel (needs tp > 1 and TE/apex norms, i.e. GPU)
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule), None = off

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp


def validate_layout(model_cfg: ModelConfig, par: ParallelConfig, world_size: int | None = None) -> None:
    """Raise LayoutError (with the reason) if `par` cannot run `model_cfg` on `world_size` ranks."""
    errors = []
    for name in ("tp", "pp", "dp", "cp"):
        v = getattr(par, name)
        if not isinstance(v, int) or v < 1:
            errors.append(f"{name}={v!r} must be a positive integer")
    if errors:
        raise LayoutError("; ".join(errors))
    if world_size is not None and par.world_size != world_size:
        errors.append(
            f"tp*pp*dp*cp = {par.tp}*{par.pp}*{par.dp}*{par.cp} = {par.world_size} "
            f"but the job has {world_size} processes"
        )
    m = model_cfg
    if m.num_heads % par.tp:
        errors.append(f"num_heads={m.num_heads} is not divisible by tp={par.tp} (each rank needs whole heads)")
    if m.num_kv_heads % par.tp and par.tp % m.num_kv_heads:
        # megatron-core 0.19.2 (transformer/attention.py, get_query_key_value_tensors): with fewer KV groups than
        # TP ranks, the linear_qkv rows are still split evenly; ranks all-gather them and each keeps its group's
        # K/V and its share of the group's query heads. So either count may divide the other.
        errors.append(
            f"num_kv_heads={m.num_kv_heads} and tp={par.tp}: one must divide the other "
            "(megatron-core splits KV groups over TP ranks, or shares each group among tp/num_kv_heads ranks)"
        )
    if m.ffn_hidden_size % par.tp:
        errors.append(f"ffn_hidden_size={m.ffn_hidden_size} is not divisible by tp={par.tp}")
    stages = par.pp * (par.vpp or 1)
    if m.num_layers % stages:
        errors.append(
            f"num_layers={m.num_layers} is not divisible by pp={par.pp}"
            + (f" x vpp={par.vpp}" if par.vpp else "")
            + " (each pipeline stage needs the same number of layers)"
        )
    if par.vpp is not None and par.pp < 2:
        errors.append("vpp (interleaved pipeline) needs pp >= 2")
    if par.sp and par.tp < 2:
        errors.append("sequence parallel (sp) needs tp >= 2")
    if (par.sp or par.cp > 1) and not torch.cuda.is_available():
        errors.append("sequence/context parallel need CUDA and Transformer Engine; this machine has no CUDA")
    extra = getattr(m, "layout_errors", None)
    if extra is not None:
        errors.extend(extra(par))
    if errors:
        raise LayoutError(f"impossible parallel layout {par} for this model: " + "; ".join(errors))
    # The vocabulary is not a constraint: model.padded_vocab_size(tp) pads it to a multiple of 128*tp.


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(par: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Create the torch.distributed world (if needed) and megatron's process groups, and seed RNGs.

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun sets them); a single process
    without them runs as a world of one. Without CUDA: gloo + the CPU compat layer.
    """
    from megatron.core import parallel_state as ps

    from erpd_megatron.megatron.compat import apply_cpu_compat, apply_mcore_fixes

    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_compat()
    apply_mcore_fixes()
    if not torch.distributed.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ and world > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run (use torchrun)")
        if "RANK" not in os.environ and world == 1:
            # a world of one that no launcher set up: its own free port, never one inherited from a parent
            # process's world (that port is taken: EADDRINUSE)
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world = torch.distributed.get_world_size()
    if par.world_size != world:
        raise LayoutError(f"tp*pp*dp*cp = {par.world_size} but torch.distributed has {world} processes")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
    )
    set_seed(seed)
    log.info("parallel: %s on %d %s ranks", par, world, "cuda" if cuda else "cpu")


def set_seed(seed: int) -> None:
    """Seed python/torch RNGs; megatron's tracker gives TP ranks distinct model-parallel streams.

    The model-parallel seed differs per TP rank and the default seed is shared; on CPU the
    tracker works on the CPU generator (compat layer), on GPU on the CUDA one.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the torch.distributed world (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
