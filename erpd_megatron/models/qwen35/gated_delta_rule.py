"""Gated delta rule (Yang et al., "Gated Delta Networks", 2024) in plain torch: recurrent and chunked forms.

State S_t [Dk, Dv] per head evolves as
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T (scale * q_t)
with g_t <= 0 the log decay and beta_t in (0, 1). Shapes follow flash-linear-attention (fla):
q, k [B, T, H, Dk], v [B, T, H, Dv], g, beta [B, T, H]; q/k are expected already L2-normalised (the caller
does it, as megatron's GDN does), heads already expanded to the value-head count.

`chunk_gated_delta_rule` is the portable training path (O(T C) memory, autograd through
`solve_triangular`); `recurrent_gated_delta_rule` is the step-by-step reference used by the tests.
On CUDA with fla installed, `gated_delta_rule` dispatches to fla's Triton kernel.
"""

from __future__ import annotations

import torch


def recurrent_gated_delta_rule(q, k, v, g, beta, scale: float | None = None) -> torch.Tensor:
    """Step-by-step reference. Returns o [B, T, H, Dv] in q's dtype (computed in fp32)."""
    dtype = q.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    state = q.new_zeros(b, h, dk, dv)
    out = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None, None]
        k_i = k[:, i]
        pred = torch.einsum("bhkv,bhk->bhv", state, k_i)
        delta = beta[:, i, :, None] * (v[:, i] - pred)
        state = state + k_i[..., :, None] * delta[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", state, q[:, i] * scale))
    return torch.stack(out, dim=1).to(dtype)


def chunk_gated_delta_rule(q, k, v, g, beta, scale: float | None = None, chunk_size: int = 64) -> torch.Tensor:
    """Chunked (WY-style) form of the same recurrence; equal to the recurrent form up to fp32 rounding.

    Inside a chunk with cumulative log decay G_i = sum_{j<=i} g_j and entering state S_0 the state is
    S_i = e^{G_i} S_0 + sum_{j<=i} e^{G_i - G_j} k_j u_j^T, where the "delta" rows u solve the unit lower
    triangular system (I + A) U = diag(beta) (V - diag(e^G) K S_0), A_ij = beta_i e^{G_i-G_j} k_i.k_j (j<i).
    Outputs: O = diag(e^G) Q S_0 + (causal e^{G_i-G_j} Q K^T) U; next state e^{G_C} S_0 + K^T diag(e^{G_C-G}) U.
    """
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    c = chunk_size
    pad = (-t) % c
    # [B, H, T, D] in fp32; padded steps have k = v = 0, g = 0, beta = 0: they leave the state unchanged.
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))
    g, beta = (x.float().transpose(1, 2) for x in (g, beta))
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // c
    q = q.reshape(b, h, n, c, dk) * scale
    k = k.reshape(b, h, n, c, dk)
    v = v.reshape(b, h, n, c, dv)
    g = g.reshape(b, h, n, c).cumsum(-1)  # G_i within each chunk
    beta = beta.reshape(b, h, n, c)

    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    # e^{G_i - G_j} only where j <= i (mask before exp: the upper triangle would overflow)
    diff = g[..., :, None] - g[..., None, :]
    decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
    kk = k @ k.transpose(-1, -2)
    a = torch.where(strict, beta[..., None] * decay * kk, torch.zeros_like(kk))
    eye = torch.eye(c, device=q.device, dtype=q.dtype)
    qk = (q @ k.transpose(-1, -2)) * decay  # decay is 0 above the diagonal

    state = q.new_zeros(b, h, dk, dv)
    outs = []
    for i in range(n):
        eg = g[:, :, i].exp()[..., None]  # [B, H, C, 1]
        rhs = beta[:, :, i, :, None] * (v[:, :, i] - eg * (k[:, :, i] @ state))
        u = torch.linalg.solve_triangular(eye + a[:, :, i], rhs, upper=False, unitriangular=True)
        outs.append(eg * (q[:, :, i] @ state) + qk[:, :, i] @ u)
        g_last = g[:, :, i, -1:]  # [B, H, 1]
        w = (g_last - g[:, :, i]).exp()[..., None]  # e^{G_C - G_j}
        state = g_last.exp()[..., None] * state + k[:, :, i].transpose(-1, -2) @ (w * u)
    o = torch.stack(outs, dim=2).reshape(b, h, n * c, dv)[:, :, :t]
    return o.transpose(1, 2).contiguous().to(dtype)


def gated_delta_rule(q, k, v, g, beta, scale: float | None = None) -> torch.Tensor:
    """fla's chunked Triton kernel on CUDA when importable, else the portable chunked form."""
    if q.is_cuda:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        except ImportError:
            fla_chunk = None
        if fla_chunk is not None:
            o, _ = fla_chunk(q, k, v, g=g, beta=beta, scale=scale, use_qk_l2norm_in_kernel=False)
            return o
    return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)
