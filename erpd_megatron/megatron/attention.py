"""Core attention on torch.nn.functional.scaled_dot_product_attention (portable spec).

Drop-in for megatron-core's local `DotProductAttention` (ModuleSpec `core_attention`): same
constructor and forward signature, inputs [s, b, heads, d], output [s, b, heads * d].
Differences from the local one:
- causal masking is SDPA's `is_causal` (no [s, s] mask tensor; megatron's default mask builder
  hard-codes device="cuda"), GQA through SDPA's `enable_gqa` (no repeat of K/V);
- on GPU SDPA dispatches to flash / memory-efficient kernels, on CPU to its math kernel.
Right-padded batches need no padding mask: with causal attention a real token never attends to
the padding that follows it, so its output is exactly that of the unpadded sequence.
An explicit boolean `attention_mask` (megatron convention: True = masked out, [b or 1, 1, s, s])
is honoured when given, e.g. block-diagonal masks for packed sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not implement context parallelism (use the TE spec)")
        self.layer_number = max(1, layer_number)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None -> 1/sqrt(d), SDPA's default, as megatron's

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed_seq_params: pass a block-diagonal attention_mask instead")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        if attention_mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=True
            )
        else:
            # megatron masks are True where attention is NOT allowed; SDPA wants True where it is.
            allowed = ~attention_mask.to(torch.bool)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=True
            )
        # [b, n, s, d] -> [s, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
