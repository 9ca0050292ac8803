"""PolicyEngine: token log-probs and training steps of a megatron-core model (TP / PP / DP).

One object per policy (teacher, student, signal policies). It owns the model chunks (wrapped in
megatron DDP), a megatron optimizer (Adam; DistributedOptimizer by default) and an LR schedule.

Batches follow the brief's token layout: right-padded `input_ids [B, T]`, `attention_mask`,
`response_mask` plus any per-row / per-token tensors the loss needs. Every rank passes the same
full batch; each DP rank works on its contiguous slice of rows and results are gathered, so
`forward_logprobs` returns the full [B, T] on every rank.

Padding: causal attention on right-padded rows is exact for the real tokens (they never see the
padding behind them), so no padding mask is built; positions past a row's length get log-prob 0.
The batch is trimmed to its longest row before the forward (all micro-batches share one shape,
as pipeline parallelism requires), then padded up to a multiple of `seq_multiple` when FP8 or
sequence parallelism needs one (see `seq_multiple`): padded positions have attention_mask 0 and
response_mask 0 (and every other per-token tensor 0), so their log-probs are 0 and they carry no loss.

Gradient accumulation: megatron's forward_backward_func runs the micro-batches (1F1B with PP) and
divides each micro-batch loss by the number of micro-batches; DDP averages over DP ranks. So the
gradient is that of the mean over micro-batches of `loss_fn(micro-batch)` -- equal to the
full-batch loss for per-sequence means and for token means of equal-length micro-batches.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from erpd_megatron.megatron.logprobs import DEFAULT_CHUNK_ELEMS, token_logprobs
from erpd_megatron.megatron.model import (
    BuildOptions,
    ModelConfig,
    build_model,
    layer_offset,
    local_to_global_name,
)
from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel, validate_layout

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, dict, torch.Tensor | None], tuple[torch.Tensor, dict]]


@dataclass
class OptimConfig:
    """Adam + LR schedule + clipping. Steps count optimizer steps."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; 0 disables
    warmup_steps: int = 0  # linear warmup: lr * (step + 1) / warmup_steps
    decay_steps: int | None = None  # steps after warmup to reach min_lr; None = constant lr
    decay_style: str = "constant"  # "constant" | "linear" | "cosine"
    micro_batch_size: int = 4  # rows per micro-batch (per DP rank)
    distributed_optimizer: bool = True  # shard optimizer state over DP (megatron DistributedOptimizer)

    def lr_at(self, step: int) -> float:
        """LR used by optimizer step number `step` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_style == "constant" or not self.decay_steps:
            return self.lr
        t = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        if self.decay_style == "linear":
            f = 1.0 - t
        elif self.decay_style == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            raise ValueError(f"OptimConfig.decay_style={self.decay_style!r}: constant | linear | cosine")
        return self.min_lr + (self.lr - self.min_lr) * f


def seq_multiple(par: ParallelConfig, fp8: bool) -> int:
    """Multiple the (trimmed) sequence length of every micro-batch is padded to (`padded_length`).

    Sequence parallelism splits the sequence dimension over the TP ranks (megatron's scatter_to_sequence_parallel
    _region needs s % tp == 0). Transformer Engine's FP8 GEMMs need the product of an input's leading dims divisible
    by 8 (`assert_dim_for_fp8_exec`): without SP that is s * b, padded to 16 (covers 8, as before); with SP the TE
    linears check their *local* input before the sequence all-gather, (s / tp) * b rows, so s is padded to a
    multiple of 8 * tp: then (s / tp) % 8 == 0 for any micro-batch size b (lcm(16, tp) left tp = 4, b = 1 at 4 rows
    per 16 tokens). lcm of what applies; 1 when neither is on. MXFP8 / blockwise recipes (32 / 128 blocks) are not
    covered."""
    m = 1
    if par.sp:
        m = math.lcm(m, par.tp)
    if fp8:
        m = math.lcm(m, 16)
        if par.sp:
            m = math.lcm(m, 8 * par.tp)
    return m


def padded_length(t: int, multiple: int) -> int:
    """`t` tokens rounded up to `multiple` (`seq_multiple`): the sequence length every micro-batch runs at."""
    return math.ceil(t / multiple) * multiple


#: OptimConfig fields baked into megatron's optimizer at construction; `PolicyEngine.reset` cannot change them
BAKED_OPTIM_FIELDS = ("adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "distributed_optimizer")


def baked_optim(optim_cfg) -> tuple:
    """The values of `BAKED_OPTIM_FIELDS` in `optim_cfg`."""
    return tuple(getattr(optim_cfg, f) for f in BAKED_OPTIM_FIELDS)


def reuse_key(model_cfg, par, optim_cfg, build_opts=None, trainable: bool = True) -> tuple:
    """What a reused engine must share with the one `PolicyEngine(model_cfg, par, optim_cfg, build_opts,
    trainable=...)` would build: model, layout, build options, trainability, construction-time optimizer settings."""
    return (model_cfg, par, build_opts or BuildOptions(), trainable, baked_optim(optim_cfg))


class PolicyEngine:
    """Megatron model + optimizer with `forward_logprobs` and `train_step` (see module docstring)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        par: ParallelConfig,
        optim_cfg: OptimConfig | None = None,
        build_opts: BuildOptions | None = None,
        *,
        seed: int = 1234,
        temperature: float = 1.0,
        logprob_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        trainable: bool = True,
    ):
        from megatron.core import parallel_state as ps

        self.model_cfg, self.par = model_cfg, par
        self.optim_cfg = optim_cfg or OptimConfig()
        self.build_opts = build_opts or BuildOptions()
        self.temperature = temperature
        self.logprob_chunk_elems = logprob_chunk_elems
        if par.cp > 1:
            raise NotImplementedError("PolicyEngine: context parallelism is not wired into the engine yet")
        world = dist.get_world_size() if dist.is_initialized() else par.world_size
        validate_layout(model_cfg, par, world)
        if not ps.model_parallel_is_initialized():
            init_parallel(par, seed)
        elif (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
              ps.get_data_parallel_world_size()) != (par.tp, par.pp, par.dp):
            raise ValueError(f"megatron parallel state is initialised with another layout than {par}")
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        if self.device.type == "cpu":
            from erpd_megatron.utils.cpu_malloc import keep_freed_memory

            keep_freed_memory()  # freed activations stay in the heap: no page faults per step (cpu_malloc.py)
        self.seq_multiple = seq_multiple(par, bool(self.build_opts.fp8))
        self.modules = self._build_modules()  # bare GPTModels
        self.tcfg = self.modules[0].config  # shared by all chunks; the schedules read it
        self.model = self._wrap_ddp(self.modules)
        self.optimizer = self._make_optimizer() if trainable else None
        self.step = 0  # optimizer steps taken
        self.trainer_state: dict = {}  # free-form, saved with checkpoints (data position, ...)
        self.generation = 0  # times `reset` handed this engine to a new owner (Context's engine pool)
        self.idle = False  # True between `Context.release` and the next `reset`: any use then is a bug
        self._set_lr()

    # ------------------------------------------------------------------ setup
    def _build_modules(self) -> list[torch.nn.Module]:
        """This rank's bare model chunks (a hook: value.ValueEngine swaps the output layer for a value head)."""
        return build_model(self.model_cfg, self.par, self.build_opts)

    def _wrap_ddp(self, modules):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.optim_cfg.distributed_optimizer,
            average_in_collective=False,
        )
        wrapped = [
            DistributedDataParallel(config=self.tcfg, ddp_config=ddp_cfg, module=m, disable_bucketing=(i > 0))
            for i, m in enumerate(modules)
        ]
        for w in wrapped:
            w.broadcast_params()  # DP replicas start identical (they already are when seeded alike)
        return wrapped

    def _make_optimizer(self):
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o = self.optim_cfg
        ocfg = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=self.tcfg.bf16,
            fp16=self.tcfg.fp16,
            params_dtype=self.tcfg.params_dtype,
            use_distributed_optimizer=o.distributed_optimizer,
        )
        opt = get_megatron_optimizer(ocfg, self.model)
        # what megatron's training loop wires into the model config before forward_backward_func
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        self.tcfg.grad_scale_func = opt.scale_loss
        self.tcfg.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        return opt

    def _set_lr(self):
        if self.optimizer is None:
            return
        lr = self.optim_cfg.lr_at(self.step)
        for g in self.optimizer.param_groups:
            # megatron's param groups carry multipliers (no weight decay on norms: wd_mult 0)
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = self.optim_cfg.weight_decay * g.get("wd_mult", 1.0)
        self.lr = lr

    # ------------------------------------------------------------------ reuse (pipeline/context.py's pool)
    def reuse_key(self) -> tuple:
        """See `reuse_key`: an engine may stand in for a build whose key equals this."""
        return reuse_key(self.model_cfg, self.par, self.optim_cfg, self.build_opts, self.optimizer is not None)

    @property
    def reusable(self) -> bool:
        """False when the engine holds state `reset` cannot clear: fp16's dynamic loss scale, FP8's scaling history
        (Transformer Engine `_extra_state`, which a local-spec checkpoint does not overwrite)."""
        from megatron.core.optimizer.grad_scaler import DynamicGradScaler

        if self.build_opts.fp8:
            return False
        return not any(isinstance(getattr(o, "grad_scaler", None), DynamicGradScaler) for o in self._optimizers())

    def _optimizers(self) -> list:
        """The megatron optimizers (one per chained param group set), [] when not trainable."""
        if self.optimizer is None:
            return []
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def reset(self, optim_cfg: OptimConfig, *, temperature: float | None = None) -> None:
        """Make this engine what a fresh `PolicyEngine(..., optim_cfg)` is, apart from its weights (load them next,
        `load(path, model_only=True)`, which also refreshes the optimizer's main params from them).

        Cleared: Adam's moments and step counts (torch keeps them in `optimizer.state[param]`, TE's / apex's FusedAdam
        its step count in each param group, `group["step"]`; a fresh megatron optimizer has neither), the grad buffers,
        `step`, `trainer_state`. Set: the OptimConfig
        (LR, warm-up, micro-batch size: read at each step), the temperature, and what megatron copied from the
        construction-time config into its param groups and config: `max_lr` / `min_lr` (also the keys that pair a
        checkpoint's param groups with the engine's on a full load), betas, eps, lr, weight decay. What differs
        from a build: the global torch RNG is not advanced by a weight initialisation (dropout is 0, so no result
        reads it)."""
        mine, theirs = baked_optim(self.optim_cfg), baked_optim(optim_cfg)
        if mine != theirs:
            raise ValueError(f"PolicyEngine.reset: {BAKED_OPTIM_FIELDS} are fixed at construction "
                             f"({mine} != {theirs}); build a new engine")
        if not self.reusable:
            raise ValueError("PolicyEngine.reset: fp16 loss scale or FP8 scaling state cannot be reset; build a new "
                             "engine")
        o = optim_cfg
        for opt in self._optimizers():
            opt.optimizer.state.clear()  # torch Adam(W): exp_avg, exp_avg_sq and step of every main param
            for g in opt.optimizer.param_groups:  # as megatron's _get_param_groups sets them (no overrides here)
                # FusedAdam's step count (bias correction), set by its first step; a torch Adam group carries one
                # only after a checkpoint load (megatron writes it there) and never reads it
                g.pop("step", None)
                g.update(max_lr=o.lr, min_lr=o.min_lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
            opt.config.lr, opt.config.min_lr, opt.config.weight_decay = o.lr, o.min_lr, o.weight_decay
        self._zero_grads()
        self.optim_cfg = optim_cfg
        if temperature is not None:
            self.temperature = temperature
        self.step = 0
        self.trainer_state = {}
        self.generation += 1
        self.idle = False
        self._set_lr()

    def _zero_grads(self) -> None:
        """DDP grad buffers and the optimizer's grads to zero (before a backward, and on reset)."""
        for m in self.model:
            m.zero_grad_buffer()
        if self.optimizer is not None:
            self.optimizer.zero_grad()

    def _check_live(self) -> None:
        if self.idle:
            raise RuntimeError("this PolicyEngine was released to the engine pool (Context.release) and is "
                               "used again by its previous owner")

    # ------------------------------------------------------------------ batching
    def _prepare(self, batch: dict, for_train: bool):
        """DP slice, row padding to whole micro-batches, trim to the longest row and pad that length up to
        `self.seq_multiple` (zeros); returns (micro-batches, mbs, padded length, rows per rank, B, T, trimmed length)."""
        from megatron.core import parallel_state as ps

        self._check_live()
        ids = batch["input_ids"]
        if ids.dim() != 2:
            raise ValueError(f"batch['input_ids'] must be [B, T], got shape {tuple(ids.shape)}")
        B, T = ids.shape
        am = batch.get("attention_mask")
        if am is None:
            am = torch.ones_like(ids)
        t_used = int(am.sum(1).max().item()) if B else 1
        t_used = max(t_used, 2)
        t_used = min(T, t_used)
        t_run = padded_length(t_used, self.seq_multiple)
        dp, mbs = self.par.dp, self.optim_cfg.micro_batch_size
        if for_train:
            if B % dp:
                raise ValueError(f"train_step: batch of {B} rows is not divisible by dp={dp}")
            local = B // dp
            mbs = min(mbs, local)
            if local % mbs:
                raise ValueError(f"train_step: {local} rows per DP rank are not divisible by micro_batch_size={mbs}")
            rows_per_rank = local
        else:
            per = math.ceil(B / dp)
            mbs = min(mbs, per)
            rows_per_rank = math.ceil(per / mbs) * mbs
        dp_rank = ps.get_data_parallel_rank()
        idx = torch.arange(dp_rank * rows_per_rank, (dp_rank + 1) * rows_per_rank)
        idx = idx.clamp(max=B - 1)  # forward-only padding rows repeat the last row; dropped afterwards

        def cut(v):
            if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] != B:
                return v
            v = v[idx]
            if v.dim() >= 2 and v.shape[1] == T:
                v = v[:, :t_used]
                if t_run > t_used:  # zeros: attention / response masks 0, so no log-prob and no loss there
                    v = torch.cat([v, v.new_zeros(v.shape[0], t_run - t_used, *v.shape[2:])], dim=1)
            return v.to(self.device) if v.device != self.device else v

        local_batch = {k: cut(v) for k, v in batch.items()}
        local_batch.setdefault("attention_mask", cut(am))
        micro = []
        for s in range(0, rows_per_rank, mbs):
            micro.append({k: (v[s:s + mbs] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows_per_rank
                              else v) for k, v in local_batch.items()})
        return micro, mbs, t_run, rows_per_rank, B, T, t_used

    def _forward_step(self, loss_builder, with_entropy: bool, temperature: float, need_logprobs: bool = True):
        from megatron.core import parallel_state as ps

        vocab = self.model_cfg.vocab_size

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            ids = mb["input_ids"]
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            if not need_logprobs:
                out = model(input_ids=ids, position_ids=pos, attention_mask=None)
            else:  # logits stay [s, b, V/tp]: no [b, s, V] transpose copy (nor its transpose in backward)
                out = model(input_ids=ids, position_ids=pos, attention_mask=None,
                            output_processor=functools.partial(_seq_first_logits, vocab_size=vocab))

            def loss_func(logits):
                if not need_logprobs:
                    return loss_builder(logits, mb, None)
                lp, ent = token_logprobs(
                    logits, ids, vocab_size=vocab, temperature=temperature,
                    tp_group=ps.get_tensor_model_parallel_group(), with_entropy=with_entropy,
                    chunk_elems=self.logprob_chunk_elems, seq_first=True,
                )
                m = mb["attention_mask"].to(lp.dtype)
                lp = lp * m
                ent = ent * m if ent is not None else None
                return loss_builder(lp, mb, ent)

            return out, loss_func

        return forward_step

    def _run(self, micro, mbs, t_used, forward_step, forward_only):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        fwd_bwd = get_forward_backward_func()
        n = len(micro)
        iters = [iter(micro) for _ in self.model] if len(self.model) > 1 else iter(micro)
        return fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iters,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=n,
            seq_length=t_used,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )

    @torch.no_grad()
    def _forward_only(self, batch: dict, forward_step_for, tails: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """Run a forward-only pass; per-micro-batch outputs {key: [mb, t, *tail]} -> full [B, T, *tail] on every rank."""
        from megatron.core import parallel_state as ps

        micro, mbs, t_run, rows, B, T, t_used = self._prepare(batch, for_train=False)
        for m in self.model:
            m.eval()
        try:
            store = self._run(micro, mbs, t_run, forward_step_for, True)
        finally:
            for m in self.model:
                m.train()
        out = {}
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        for key, tail in tails.items():
            if last:
                local = torch.cat([d[key] for d in store], 0).float().contiguous()
            else:
                local = torch.empty(rows, t_run, *tail, device=self.device)
            if self.par.pp > 1:
                dist.broadcast(local, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
            if self.par.dp > 1:
                parts = [torch.empty_like(local) for _ in range(self.par.dp)]
                dist.all_gather(parts, local, group=ps.get_data_parallel_group())
                local = torch.cat(parts, dim=0)
            full = local.new_zeros(B, T, *tail)
            full[:, :t_used] = local[:B, :t_used]  # the seq_multiple padding is dropped
            out[key] = full.to(batch["input_ids"].device)
        return out

    # ------------------------------------------------------------------ public API
    def forward_logprobs(self, batch: dict, with_entropy: bool = False, temperature: float | None = None):
        """Token log-probs [B, T] (float32, aligned with input_ids, 0 at position 0 and padding) on every rank.

        With `with_entropy=True` returns (logprobs, entropy), both [B, T].
        """
        temperature = self.temperature if temperature is None else temperature

        def builder(lp, mb, ent):
            out = {"lp": lp} if ent is None else {"lp": lp, "ent": ent}
            return lp.new_zeros(()), out

        tails = {"lp": (), "ent": ()} if with_entropy else {"lp": ()}
        res = self._forward_only(batch, self._forward_step(builder, with_entropy, temperature), tails)
        return (res["lp"], res["ent"]) if with_entropy else res["lp"]

    def forward_logits(self, batch: dict) -> torch.Tensor:
        """Full-vocabulary logits [B, T, vocab_size] on every rank (gathers the vocabulary: tests / debugging only)."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        vocab = self.model_cfg.vocab_size

        def builder(logits, mb, _):
            if ps.get_tensor_model_parallel_world_size() > 1:
                logits = gather_from_tensor_model_parallel_region(logits)
            return logits.new_zeros(()), {"logits": logits[..., :vocab]}

        fs = self._forward_step(builder, False, 1.0, need_logprobs=False)
        return self._forward_only(batch, fs, {"logits": (vocab,)})["logits"]

    def forward_backward(self, batch: dict, loss_fn: LossFn, need_entropy: bool = False,
                         temperature: float | None = None) -> dict[str, float]:
        """Accumulate gradients of `loss_fn` over the batch (no optimizer step). Returns metrics."""
        temperature = self.temperature if temperature is None else temperature
        micro, mbs, t_run, *_ = self._prepare(batch, for_train=True)
        self._zero_grads()

        def builder(lp, mb, ent):
            loss, metrics = loss_fn(lp, mb, ent)
            vals = {k: float(v) for k, v in metrics.items()}
            vals["loss"] = float(loss.detach())
            return loss, vals

        store = self._run(micro, mbs, t_run, self._forward_step(builder, need_entropy, temperature), False)
        return self._reduce_metrics(store)

    def train_step(self, batch: dict, loss_fn: LossFn, need_entropy: bool = False,
                   temperature: float | None = None) -> dict[str, float]:
        """One optimizer step on the batch: micro-batched forward/backward, clip, Adam, LR schedule."""
        if self.optimizer is None:
            raise RuntimeError("this PolicyEngine was built with trainable=False")
        self._set_lr()
        metrics = self.forward_backward(batch, loss_fn, need_entropy, temperature)
        ok, grad_norm, _ = self.optimizer.step()
        metrics["train/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["train/lr"] = self.lr
        metrics["train/update_ok"] = float(bool(ok))
        if ok:
            self.step += 1
        self._set_lr()
        return metrics

    def _reduce_metrics(self, store: list[dict]) -> dict[str, float]:
        """Mean over micro-batches and DP ranks, from the last pipeline stage to every rank."""
        from megatron.core import parallel_state as ps

        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        keys = sorted(store[0]) if (last and store) else None
        if self.par.pp > 1:
            obj = [keys]
            dist.broadcast_object_list(obj, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group(), device=self._obj_device())
            keys = obj[0]
        if not keys:
            return {}
        if last:
            vals = torch.tensor([[d.get(k, float("nan")) for k in keys] for d in store], dtype=torch.float64)
            vals = vals.nanmean(0).to(self.device)
        else:
            vals = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        if self.par.pp > 1:
            dist.broadcast(vals, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        if self.par.dp > 1:
            dist.all_reduce(vals, group=ps.get_data_parallel_group())
            vals /= self.par.dp
        return dict(zip(keys, vals.tolist()))

    def _obj_device(self):
        return self.device if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ parameters, checkpoints
    def named_parameters_global(self):
        """Yield (global Megatron name, local TP shard) for this rank's parameters (layer index global)."""
        from megatron.core import parallel_state as ps

        self._check_live()  # weight sync reads the parameters through here
        pp_rank = ps.get_pipeline_model_parallel_rank()
        for vp, m in enumerate(self.modules):
            off = layer_offset(self.model_cfg, self.par, pp_rank, vp if self.par.vpp else None)
            for name, p in m.named_parameters():
                yield local_to_global_name(name, off), p

    def save(self, directory: str, trainer_state: dict | None = None) -> str:
        from erpd_megatron.megatron.checkpoint import save_checkpoint

        self._check_live()
        if trainer_state is not None:
            self.trainer_state = dict(trainer_state)
        return save_checkpoint(self, directory)

    def load(self, directory: str, model_only: bool = False) -> dict:
        from erpd_megatron.megatron.checkpoint import load_checkpoint

        return load_checkpoint(self, directory, model_only=model_only)


def _seq_first_logits(*, hidden_states, output_layer, output_weight, runtime_gather_output, scale_logits,
                      vocab_size: int | None = None, **_):
    """GPTModel ``output_processor``: the output layer's logits in megatron's own [s, b, V/tp] layout.
    GPTModel would return ``logits.transpose(0, 1).contiguous()``, a full copy of the logits (and
    one more of their gradient in backward); ``token_logprobs(seq_first=True)`` reads [s, b, V]
    directly and transposes only its [s, b] results.

    With one TP rank the rows of the output weight past the true vocabulary (`vocab_size`; megatron pads it to a
    multiple of 128) are never used by the log-prob function: the logits are computed over the true vocabulary
    only (a row slice of the weight, no copy), which saves the padded columns' matmuls in forward and backward and
    gives the log-prob function unpadded logits (its no-copy gradient path). The toy vocabulary of 24 is padded to
    128: 5x the output-layer work otherwise. Same values for the real columns (tests/test_engine_fastpaths.py)."""
    from erpd_megatron.megatron.cpu_linear import plain_local_linear
    from erpd_megatron.utils.cpu_gemm import linear

    w = output_weight if output_weight is not None else output_layer.weight
    if w is not None and output_layer.bias is None and plain_local_linear(output_layer):
        # CPU fp32: oneDNN's GEMM (utils/cpu_gemm.py); the padded rows skipped when the true vocabulary is known
        return scale_logits(linear(hidden_states, w[:vocab_size] if vocab_size is not None else w))
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
    return scale_logits(logits)
