"""CPU compatibility layer for megatron-core 0.19.2.

megatron-core assumes a CUDA device in a few dozen places even when the math is device-agnostic.
On a machine without CUDA (CI, laptops, the 2-core demo) those call sites raise before any model
code runs. `apply_cpu_compat()` replaces exactly those call sites, once, and only when
`torch.cuda.is_available()` is False: a GPU run never sees a single patch.

Three kinds of patch, each recorded in `PATCHES` with the megatron-core call sites it replaces
(paths under megatron/core/, line numbers of 0.19.2):

1. torch.cuda entry points that can only raise without a driver (`current_device`,
   `current_stream`, `synchronize`) get CPU meanings ("cpu", a no-op stream, no-op).
2. Modules that create tensors with a literal `device="cuda"` get a module-local view of `torch`
   whose tensor factories map "cuda" to "cpu". The rest of `torch` is untouched and shared.
3. Functions that check `tensor.type() == 'torch.cuda.FloatTensor'` (or call `tensor.cuda()`) run
   with `Tensor.type()` reporting CPU tensors under their CUDA names (`Tensor.cuda()` a no-op),
   for the duration of that call only.
4. The RNG tracker (tensor_parallel/random.py) keeps CPU generator states instead of CUDA ones.

The version guard refuses any other megatron-core release: line-level assumptions do not carry.
Set ERPD_MCORE_UNCHECKED=1 to try anyway (at your own risk).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

SUPPORTED_MCORE_VERSIONS = ("0.19.2",)


class UnsupportedMegatronVersion(RuntimeError):
    pass


@dataclass
class Patch:
    name: str
    call_sites: tuple[str, ...]  # megatron/core/<path>:<line> in 0.19.2
    target: str  # "module" or "module:Class" that holds the replaced attribute
    attr: str
    original: Any = field(default=None, repr=False)


PATCHES: list[Patch] = []
_APPLIED = False


def is_applied() -> bool:
    return _APPLIED


def installed_mcore_version() -> str:
    """Version of the installed megatron-core distribution (read from metadata: no heavy import)."""
    from importlib.metadata import version

    return version("megatron-core")


def check_mcore_version() -> str:
    version = installed_mcore_version()
    if version not in SUPPORTED_MCORE_VERSIONS and os.environ.get("ERPD_MCORE_UNCHECKED") != "1":
        raise UnsupportedMegatronVersion(
            f"erpd_megatron.megatron.compat was written for megatron-core {SUPPORTED_MCORE_VERSIONS}, "
            f"found {version}. Its CPU patches replace specific call sites of that release; "
            "install megatron-core==0.19.2 (pyproject pins it) or set ERPD_MCORE_UNCHECKED=1 to try anyway."
        )
    return version


# --------------------------------------------------------------------------- helpers


class _NullStream:
    """Stands in for torch.cuda.current_stream() on CPU: CPU ops are synchronous."""

    def wait_event(self, event):
        return None

    def wait_stream(self, stream):
        return None

    def synchronize(self):
        return None


_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand")


def _is_cuda_device(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.split(":")[0] == "cuda"
    return isinstance(dev, int)  # an int device index means a CUDA ordinal


class _CpuTorchView:
    """A module-local `torch` whose tensor factories map device="cuda" to "cpu".

    Installed as the `torch` global of a megatron module, so only that module's literal
    `device='cuda'` calls change; every other attribute is the real torch object.
    """

    def __init__(self, real):
        self.__dict__["_real"] = real

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name in _FACTORIES:
            return _cpu_factory(attr)
        return attr


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names():
    """Within this context, CPU float tensors report `.type()` under their CUDA names."""
    real_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = real_type(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return real_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = real_type


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__erpd_compat_wrapped__ = fn
    return wrapper


@contextlib.contextmanager
def _tensor_cuda_stays_on_cpu():
    """Within this context `tensor.cuda()` returns the tensor itself (CPU is the only device)."""
    real_cuda = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = real_cuda


def _with_tensor_cuda_on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensor_cuda_stays_on_cpu():
            return fn(*args, **kwargs)

    wrapper.__erpd_compat_wrapped__ = fn
    return wrapper


# --------------------------------------------------------------------------- RNG tracker (CPU)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add on the CPU generator (original: torch.cuda.get_rng_state/manual_seed)."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _cpu_tracker_fork(self, name="model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator.

    The original also compares the CPU state before/after to warn about CPU draws inside a
    "GPU" region; on CPU the two generators are the same one, so that warning is meaningless.
    """
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


# --------------------------------------------------------------------------- application


def _resolve(target: str):
    if ":" in target:
        mod, cls = target.split(":")
        return getattr(importlib.import_module(mod), cls)
    return importlib.import_module(target)


def _patch(name: str, call_sites: tuple[str, ...], target: str, attr: str, replacement) -> None:
    holder = _resolve(target)
    original = holder.__dict__[attr] if isinstance(holder, type) else getattr(holder, attr)
    setattr(holder, attr, replacement)
    PATCHES.append(Patch(name, call_sites, target, attr, original))


def apply_cpu_compat(force: bool = False) -> bool:
    """Apply the CPU patches once. Returns True if they are (now) applied, False on a CUDA machine.

    `force=True` is for tests only: it applies the patches regardless of CUDA availability.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_mcore_version()

    # 1. torch.cuda entry points that can only raise without a driver.
    _patch(
        "current_device->cpu",
        (
            "models/common/embeddings/rotary_pos_embedding.py:162",
            "utils.py:715",
            "tensor_parallel/mappings.py:95,145,152,185,447",
            "tensor_parallel/layers.py:305,647,708,718",
            "distributed/param_and_grad_buffer.py:1180,1186",
            "optimizer/distrib_optimizer.py:998",
            "pipeline_parallel/p2p_communication.py:211-223,334,342",
            "dist_checkpointing/strategies/state_dict_saver.py:252",
        ),
        "torch.cuda",
        "current_device",
        lambda: torch.device("cpu"),
    )
    _patch(
        "current_stream->null",
        ("distributed/param_and_grad_buffer.py:632",),
        "torch.cuda",
        "current_stream",
        lambda device=None: _NullStream(),
    )
    _patch(
        "synchronize->noop",
        ("pipeline_parallel/p2p_communication.py:263,419", "dist_checkpointing/strategies/filesystem_async.py:248"),
        "torch.cuda",
        "synchronize",
        lambda device=None: None,
    )

    # 2. literal device="cuda" tensor factories, per module.
    literal_sites = {
        "megatron.core.optimizer.optimizer": ("optimizer/optimizer.py:315,690,698,702,1249",),
        "megatron.core.optimizer.clip_grads": ("optimizer/clip_grads.py:96,108,112,180,231",),
        "megatron.core.utils": ("utils.py:1332 (local_multi_tensor_l2_norm)",),
        "megatron.core.pipeline_parallel.schedules": ("pipeline_parallel/schedules.py:749,1121,2292",),
        "megatron.core.transformer.utils": ("transformer/utils.py:39,44 (default causal mask)",),
        "megatron.core.dist_checkpointing.strategies.state_dict_saver": (
            "dist_checkpointing/strategies/state_dict_saver.py:204",
        ),
    }
    for module, sites in literal_sites.items():
        _patch(f"{module.removeprefix('megatron.core.')}.torch->cpu-factories", sites, module, "torch",
               _CpuTorchView(torch))

    # 3. `.type() == 'torch.cuda.FloatTensor'` checks, scoped to the checking function.
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer_mod

    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    _patch("clip_grad_by_total_norm_fp32 type check", ("optimizer/clip_grads.py:174",),
           "megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", clip)
    # optimizer.py imported the function by name (optimizer.py:52), so patch its binding too.
    _patch("clip_grad_by_total_norm_fp32 type check (optimizer.py binding)", ("optimizer/optimizer.py:410,420",),
           "megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", clip)
    assert optimizer_mod.clip_grad_by_total_norm_fp32 is clip
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _patch("DistributedOptimizer.__init__ type checks", ("optimizer/distrib_optimizer.py:401,466,758",),
           "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer", "__init__",
           _with_cuda_type_names(DistributedOptimizer.__init__))

    # `.cuda()` on a tensor, scoped to the calling function.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _patch("LanguageModule.setup_embeddings_and_output_layer .cuda()",
           ("models/common/language_module/language_module.py:307 (tied embeddings, pp > 1)",),
           "megatron.core.models.common.language_module.language_module:LanguageModule",
           "setup_embeddings_and_output_layer",
           _with_tensor_cuda_on_cpu(LanguageModule.setup_embeddings_and_output_layer))

    # 4. RNG tracker on the CPU generator.
    rnd = "megatron.core.tensor_parallel.random"
    _patch("_get_cuda_rng_state->cpu", ("tensor_parallel/random.py:104-130",), rnd, "_get_cuda_rng_state",
           _cpu_get_rng_state)
    _patch("_set_cuda_rng_state->cpu", ("tensor_parallel/random.py:133-172",), rnd, "_set_cuda_rng_state",
           _cpu_set_rng_state)
    _patch("CudaRNGStatesTracker.add->cpu", ("tensor_parallel/random.py:303-308",), f"{rnd}:CudaRNGStatesTracker",
           "add", _cpu_tracker_add)
    _patch("CudaRNGStatesTracker.fork->cpu", ("tensor_parallel/random.py:311-346",), f"{rnd}:CudaRNGStatesTracker",
           "fork", _cpu_tracker_fork)

    _APPLIED = True
    log.info("megatron CPU compat: %d patches applied (megatron-core %s)", len(PATCHES), SUPPORTED_MCORE_VERSIONS[0])
    return True


# --------------------------------------------------------------------------- megatron-core bug shims

FIXES: list[Patch] = []


def apply_mcore_fixes() -> list[str]:
    """Shims for megatron-core 0.19.2 bugs that are not about CUDA (applied on CPU and GPU alike).

    - (1) Without TE / apex the DistributedOptimizer runs torch Adam, whose state has a tensor 'step'.
      load_state_dict puts that tensor into every param state (distrib_optimizer.py:1026-1031), and
      _set_main_param_and_optimizer_states (distrib_optimizer.py:1216-1224) then looks 'step' up in
      the loaded tensors, which never carry it -> KeyError on every optimizer checkpoint load. The
      shim lets the lookup of absent keys return None, which that function already skips.
    - (2) The same load path shares one 'step' tensor among all param states; torch Adam increments
      it in place once per param, corrupting the bias correction of the first step after a resume.
    Only applied when neither TE nor apex is importable (megatron's own HAVE_APEX_OR_TE flag).
    Idempotent; returns the names of the shims now active.
    """
    if FIXES:
        return [f.name for f in FIXES]
    check_mcore_version()
    import collections

    from megatron.core.optimizer import distrib_optimizer as dopt

    if not dopt.HAVE_APEX_OR_TE:
        original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

        @functools.wraps(original)
        def set_states(self, model_param, tensors):
            return original(self, model_param, collections.defaultdict(lambda: None, tensors))

        dopt.DistributedOptimizer._set_main_param_and_optimizer_states = set_states
        FIXES.append(Patch("torch-Adam 'step' KeyError on optimizer load", ("optimizer/distrib_optimizer.py:1223",),
                           "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
                           "_set_main_param_and_optimizer_states", original))

        original_load = dopt.DistributedOptimizer.load_state_dict

        @functools.wraps(original_load)
        def load_state_dict(self, state_dict):
            out = original_load(self, state_dict)
            # one 'step' tensor object is shared by every param state (distrib_optimizer.py:1031);
            # torch Adam increments it in place per param, so after a load the bias correction
            # would use step 4, 5, 6, ... within one optimizer step. Give each param its own copy.
            for st in self.optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()
            return out

        dopt.DistributedOptimizer.load_state_dict = load_state_dict
        FIXES.append(Patch("shared torch-Adam 'step' tensor after optimizer load", ("optimizer/distrib_optimizer.py:1031",),
                           "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer", "load_state_dict",
                           original_load))
    return [f.name for f in FIXES]


def revert_cpu_compat() -> None:
    """Undo every patch (tests use it to check the layer is self-contained)."""
    global _APPLIED
    for p in reversed(PATCHES):
        setattr(_resolve(p.target), p.attr, p.original)
    PATCHES.clear()
    _APPLIED = False


def patch_table() -> str:
    """Markdown table of the patches (docs/backend.md is generated from it)."""
    rows = ["| patch | replaces (megatron/core/, 0.19.2) |", "|---|---|"]
    for p in PATCHES + FIXES:
        rows.append(f"| `{p.target}.{p.attr}`: {p.name} | {'; '.join(p.call_sites)} |")
    return "\n".join(rows)
