"""ValueEngine: a PPO critic = the policy's architecture with a scalar value head (TP / PP / DP).

The critic is a PolicyEngine whose GPTModel chunks carry a `ValueHead` in place of the vocabulary
output layer, so micro-batching, the PP schedule, DDP, the optimizer, LR schedule and checkpoints
are the PolicyEngine's own (only the model build and the per-micro-batch forward differ).

Value head. `v = w . h + b`, w `[1, hidden]`, b `[1]`, both zero-initialised (the critic starts at
V = 0; VC-PPO / VAPO pre-train it before any policy step). It is *replicated* on every TP rank rather
than vocab-parallel: a ColumnParallelLinear cannot split one output over tp > 1 ranks. Without
sequence parallelism the final hidden states are already whole and identical on all TP ranks, so
every rank computes the same value and the same gradients (nothing to reduce: dL/dh is already the
full gradient, which megatron's column-parallel head would otherwise all-reduce). With sequence
parallelism (GPU only, untested here) each rank computes the values of its sequence shard, the
values (not the hidden states) are all-gathered, and the head's parameters carry
`sequence_parallel=True` so finalize_model_grads sums their partial gradients over TP.
The head is computed in float32 (bf16 would quantise values to ~3 digits).

Tied embeddings: the critic is always built untied (its last stage has no vocabulary matrix at all);
a tied policy checkpoint still initialises it, because the backbone names are the same.
The model is built with the policy's full output layer first and the head swapped in right after
(megatron's GPTModel has no option to skip it), i.e. a transient `padded_vocab x hidden / tp`
allocation on the last stage at construction time.

Alignment (the brief's token layout): `values[b, t]` = V(input_ids[b, :t]), the value of the state
before token t, i.e. the head applied to the hidden state at position t - 1 -- the same shift as
log-probs. It estimates the return from response token t on. `values[:, 0] = 0`; forward_values
zeroes everything outside `response_mask` (or outside `attention_mask` if the batch has none).

Checkpoints: `save` / `load` are PolicyEngine's (checkpoint.py unchanged). The head is stored under
`value_head.weight` / `value_head.bias` (not `output_layer.*`), so a policy checkpoint is never
mistaken for a critic one. `load_policy_weights(path)` initialises the backbone from a policy
checkpoint (any layout) and leaves the head at zero.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
from erpd_megatron.megatron.model import BuildOptions, ModelConfig, build_model
from erpd_megatron.megatron.parallel import ParallelConfig

log = logging.getLogger(__name__)

HEAD_KEY = "value_head"  # checkpoint key prefix of the head (the module itself sits at `output_layer`)


class ValueHead(torch.nn.Module):
    """Scalar head in GPTModel's `output_layer` slot: `(hidden [s, b, h]) -> ([s, b, 1] float32, None)`."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, bias_dtype: torch.dtype, device,
                 sequence_parallel: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=bias_dtype, device=device))
        self.sequence_parallel = sequence_parallel
        if sequence_parallel:  # partial grads per sequence shard: summed over TP by finalize_model_grads
            self.weight.sequence_parallel = True
            self.bias.sequence_parallel = True

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        # `weight` / `runtime_gather_output`: GPTModel passes them to its vocabulary layer; unused here.
        v = F.linear(hidden_states.float(), self.weight.float(), self.bias.float())
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # the gathered values are identical on all TP ranks, so backward just splits (no reduce)
            v = gather_from_sequence_parallel_region(v, tensor_parallel_output_grad=False)
        return v, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        base = prefix[: -len("output_layer.")] if prefix.endswith("output_layer.") else prefix
        return {f"{prefix}{n}": make_sharded_tensor_for_checkpoint(p, f"{base}{HEAD_KEY}.{n}", sharded_offsets)
                for n, p in (("weight", self.weight), ("bias", self.bias))}


class ValueEngine(PolicyEngine):
    """Critic with PolicyEngine's machinery: `forward_values`, `train_step`, `save` / `load`,
    `load_policy_weights`. `model_cfg` is the policy's ModelConfig (checkpoints record it as is)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        par: ParallelConfig,
        optim_cfg: OptimConfig | None = None,
        build_opts: BuildOptions | None = None,
        *,
        seed: int = 1234,
        trainable: bool = True,
    ):
        super().__init__(model_cfg, par, optim_cfg, build_opts, seed=seed, trainable=trainable)

    # ------------------------------------------------------------------ model
    def _build_modules(self) -> list[torch.nn.Module]:
        untied = dataclasses.replace(self.model_cfg, tie_embeddings=False)
        chunks = build_model(untied, self.par, self.build_opts)
        for m in chunks:
            if not m.post_process:
                continue
            tcfg, device = m.config, m.output_layer.weight.device
            # Parameter dtypes follow their optimizer group's neighbours: the weight (2-D, weight-decay
            # group) that of the linear layers, the bias (1-D, no-decay group) that of the norms, which
            # the local spec keeps in fp32 on CPU. megatron's DistributedOptimizer maps state-dict
            # entries wrongly when one group mixes bf16 and fp32 params in its buffer order (measured:
            # a bf16 bias among fp32 norms broke save with "shape [1] vs [64]").
            norm_dtype = m.decoder.final_layernorm.weight.dtype
            m.output_layer = ValueHead(tcfg.hidden_size, tcfg.params_dtype, norm_dtype, device,
                                       sequence_parallel=tcfg.sequence_parallel)
        return chunks

    def _forward_step(self, loss_builder, with_entropy: bool = False, temperature: float = 1.0,
                      need_logprobs: bool = True):
        """Per-micro-batch forward handing `values [b, t]` to `loss_builder(values, mb, None)`."""

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            ids = mb["input_ids"]
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            out = model(input_ids=ids, position_ids=pos, attention_mask=None)

            def loss_func(out):
                return loss_builder(_aligned_values(out, mb), mb, None)

            return out, loss_func

        return forward_step

    # ------------------------------------------------------------------ public API
    def forward_values(self, batch: dict) -> torch.Tensor:
        """Values [B, T] (float32) on every rank: `values[b, t]` = V(state before token t); 0 off the response."""

        def builder(v, mb, _):
            return v.new_zeros(()), {"v": v}

        return self._forward_only(batch, self._forward_step(builder), {"v": ()})["v"]

    def forward_logprobs(self, *a, **k):
        raise TypeError("ValueEngine has a value head, not a vocabulary: use forward_values")

    def forward_logits(self, *a, **k):
        raise TypeError("ValueEngine has a value head, not a vocabulary: use forward_values")

    def load(self, directory: str, model_only: bool = False) -> dict:
        """Load a *critic* checkpoint (model, and unless model_only optimizer / step / RNG)."""
        from megatron.core import dist_checkpointing

        from erpd_megatron.megatron.checkpoint import CheckpointError, resolve_checkpoint_dir, verify_checkpoint_content

        path = resolve_checkpoint_dir(directory)
        verify_checkpoint_content(path)  # before the (pickled) metadata is read
        if f"{HEAD_KEY}.weight" not in dist_checkpointing.load_tensors_metadata(path):
            raise CheckpointError(f"checkpoint {path} has no value head ({HEAD_KEY}.weight): it is a policy "
                                  "checkpoint; initialise a critic from it with ValueEngine.load_policy_weights")
        return super().load(directory, model_only=model_only)

    @torch.no_grad()
    def load_policy_weights(self, directory: str) -> dict:
        """Backbone (embedding, layers, final norm) from a policy checkpoint of any layout; head reset to 0.
        Optimizer state and step are untouched. Returns the checkpoint's metadata."""

        from erpd_megatron.megatron.checkpoint import (
            _check_model_cfg,
            _load_sharded,
            _model_sharded_sd,
            resolve_checkpoint_dir,
            verify_checkpoint_content,
        )

        path = resolve_checkpoint_dir(directory)
        meta = verify_checkpoint_content(path)
        _check_model_cfg(meta, self.model_cfg, path)
        sd = _model_sharded_sd(self.modules)
        for chunk_sd in sd.values():  # the policy has no value head (and its vocabulary head is not wanted)
            for k in [k for k in chunk_sd if k.startswith("output_layer.")]:
                del chunk_sd[k]
        state = _load_sharded(sd, path)  # tolerates TE `_extra_state` keys a local-spec checkpoint lacks
        for key, chunk in zip(sd, self.modules):
            missing, unexpected = chunk.load_state_dict(state[key], strict=False)
            bad = [k for k in missing if not k.startswith("output_layer.") and not k.endswith("_extra_state")]
            if bad or unexpected:
                raise RuntimeError(f"load_policy_weights({path}): missing {bad}, unexpected {list(unexpected)}")
            if chunk.post_process:
                chunk.output_layer.weight.zero_()
                chunk.output_layer.bias.zero_()
        if self.optimizer is not None:
            # the DistributedOptimizer keeps fp32 master copies (bf16 runs); refresh them from the model
            self.optimizer.reload_model_params()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return meta


def _aligned_values(out: torch.Tensor, mb: dict) -> torch.Tensor:
    """Model output [b, t, 1] (position i = V after tokens 0..i) -> values [b, t] of the brief's layout."""
    v = out[..., 0].float()
    v = torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], dim=1)  # V(state before t) = head(h[t-1])
    mask = mb.get("response_mask")
    if mask is None:
        mask = mb["attention_mask"].clone()
        mask[:, 0] = 0
    return v * mask.to(v.dtype)
