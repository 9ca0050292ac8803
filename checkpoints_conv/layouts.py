"""Pure tensor layout functions: fusing HF tensors into Megatron's, and TP shard / unshard per parameter kind.

"Full" Megatron tensors are the TP=1 layout (what one rank holds at TP=1, vocabulary padding included).
The TP=N shards of a full tensor depend on the parameter kind:
  replicated   norms, (qk-norm weights), out_norm: every rank holds the full tensor
  column       split dim 0 in N contiguous blocks (linear_qkv: the per-group [q.., k, v] rows make
               contiguous blocks equal megatron's layout, even when TP > query groups), A_log, dt_bias
  vocab        like column, on the padded vocabulary (embedding, output_layer)
  row          split dim 1 (linear_proj, linear_fc2, out_proj)
  sections     split dim 0 into named sections, then each section in N blocks; rank r holds the
               concatenation of its blocks: linear_fc1 [gate_r; up_r], GDN in_proj
               [Q_r, K_r, V_r, Z_r, B_r, A_r], GDN conv1d [Q_r, K_r, V_r]
"""

from __future__ import annotations

import torch


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int, head_dim: int,
              gated: bool = False) -> torch.Tensor:
    """HF q/k/v projections -> Megatron linear_qkv rows, per query group [q heads, (gate heads,) k, v].

    gated: HF q_proj rows are per head [query (head_dim), gate (head_dim)] (Qwen3.5 output gate).
    """
    hidden = q.shape[-1]
    per = num_heads // num_groups
    qh = q.reshape(num_heads, 2 if gated else 1, head_dim, hidden)
    parts = [qh[:, 0].reshape(num_groups, per * head_dim, hidden)]
    if gated:
        parts.append(qh[:, 1].reshape(num_groups, per * head_dim, hidden))
    parts += [k.reshape(num_groups, head_dim, hidden), v.reshape(num_groups, head_dim, hidden)]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int, gated: bool = False):
    """Inverse of merge_qkv: returns (q, k, v) in HF layout."""
    hidden = qkv.shape[-1]
    per = num_heads // num_groups
    sizes = [per * head_dim] * (2 if gated else 1) + [head_dim, head_dim]
    pieces = torch.split(qkv.reshape(num_groups, -1, hidden), sizes, dim=1)
    if gated:
        q = torch.stack([pieces[0].reshape(num_heads, head_dim, hidden),
                         pieces[1].reshape(num_heads, head_dim, hidden)], dim=1)
    else:
        q = pieces[0]
    return q.reshape(-1, hidden), pieces[-2].reshape(-1, hidden), pieces[-1].reshape(-1, hidden)


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def shard(kind: str, full: torch.Tensor, tp: int, rank: int, sections: list[int] | None = None) -> torch.Tensor:
    """The TP-rank `rank` piece of a full tensor (contiguous copy)."""
    if kind == "replicated" or tp == 1:
        return full.clone()
    if kind in ("column", "vocab"):
        return full.chunk(tp, dim=0)[rank].clone()
    if kind == "row":
        return full.chunk(tp, dim=1)[rank].contiguous()
    if kind == "sections":
        _check_sections(full, tp, sections)
        return torch.cat([s.chunk(tp, dim=0)[rank] for s in torch.split(full, sections, dim=0)], dim=0)
    raise ValueError(f"unknown parameter kind {kind!r}")


def unshard(kind: str, shards: list[torch.Tensor], sections: list[int] | None = None) -> torch.Tensor:
    """Full tensor from the shards of all TP ranks (in rank order). `sections` are the FULL section sizes."""
    tp = len(shards)
    if kind == "replicated" or tp == 1:
        return shards[0]
    if kind in ("column", "vocab"):
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "sections":
        local = [s // tp for s in sections]
        per_rank = [torch.split(s, local, dim=0) for s in shards]
        return torch.cat([per_rank[r][i] for i in range(len(sections)) for r in range(tp)], dim=0)
    raise ValueError(f"unknown parameter kind {kind!r}")


def _check_sections(full, tp, sections):
    if sections is None or sum(sections) != full.shape[0] or any(s % tp for s in sections):
        raise ValueError(f"sections {sections} do not tile dim 0 of {tuple(full.shape)} for TP={tp}")
