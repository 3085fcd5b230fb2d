"""Gated delta-rule memory: one d x d matrix per head, written by the delta rule.

The alternative write rule of the kv-slot GAM (``GAMConfig(memory="kv_slots",
memory_write="delta")``), the recurrence of Gated DeltaNet (Yang, Kautz and
Hatamizadeh, 2024), per head, with a state ``S`` of d_k x d_v::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t                                   (read after the write at t)

With a unit-length key the write replaces the value stored under ``k_t`` by a
``beta_t`` step towards ``v_t`` instead of adding to it (the slot memory adds):
a key written twice holds its last value, not the sum. ``alpha_t`` forgets
the whole matrix.

Heads are folded into the batch by the caller: every function here sees
``q``, ``k`` (B, T, d_k), ``v`` (B, T, d_v), ``log_alpha`` and ``beta`` (B, T)
and a state (B, d_k, d_v). Forms of the same function:

- :func:`delta_rule_recurrent`: one token at a time. The reference.
- :func:`delta_rule_chunked`: the training form (chunks of Q tokens). With
  ``G_i = sum_{l <= i} log alpha_l`` (chunk-local) and the state ``S_0`` at the
  chunk's start, the write can be read as ``S_i = alpha_i S_{i-1} + k_i u_i^T``
  with ``u_i = beta_i (v_i - alpha_i S_{i-1}^T k_i)``; unrolled inside the chunk
  the ``u`` solve one unit lower-triangular system (the WY form of DeltaNet)::

      (I + L) U = diag(beta) (V - diag(e^G) K S_0),   L_ij = beta_i e^{G_i - G_j} k_i.k_j  (j < i)
      o_i  = e^{G_i} S_0^T q_i + sum_{j <= i} e^{G_i - G_j} (q_i.k_j) u_j
      S_Q  = e^{G_Q} S_0 + sum_j e^{G_Q - G_j} k_j u_j^T

  Every chunk's system and products are batched; only the state pass runs over
  the chunks. All decays are ``e^{G_i - G_j} <= 1``: no chunk size limit.
  fp32 at least inside (the triangular solve has no bf16 kernel on CPU),
  differentiated by autograd.
- :func:`delta_rule_step`: one decoding step on the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# fwd+bwd at the cpu preset's shape (64 rows x 128 tokens x 24), timed beside a bench (noisy):
# 16-64 within the noise (23-54 ms), 128 about 2x slower
DEFAULT_CHUNK = 32


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                    beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``q``, ``k`` (B, d_k), ``v`` (B, d_v), ``log_alpha``, ``beta`` (B,),
    state (B, d_k, d_v). Returns the read (B, d_v) and the new state (write first)."""
    S = state * log_alpha.exp().to(state.dtype)[:, None, None]
    u = beta.to(state.dtype)[:, None] * (v - torch.einsum("bkv,bk->bv", S, k))
    S = S + k.unsqueeze(-1) * u.unsqueeze(-2)
    return torch.einsum("bkv,bk->bv", S, q), S


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                         beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step reference: reads (B, T, d_v) and the final state."""
    outs = []
    for t in range(q.shape[1]):
        o, state = delta_rule_step(q[:, t], k[:, t], v[:, t], log_alpha[:, t], beta[:, t], state)
        outs.append(o)
    return torch.stack(outs, dim=1), state


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                       beta: torch.Tensor, state: torch.Tensor,
                       chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form of :func:`delta_rule_recurrent` (same arguments and
    results). Any T: the last chunk is padded with tokens that write nothing and
    keep everything (beta = 0, alpha = 1). Reads in q's dtype, the state in the
    initial state's."""
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    out_dtype, state_dtype = q.dtype, state.dtype
    B, T, d_k = q.shape
    Q = min(chunk_size, T)
    N = -(-T // Q)
    pad = N * Q - T
    with torch.autocast(q.device.type, enabled=False):
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v, S, g, beta = (x.to(dtype) for x in (q, k, v, state, log_alpha, beta))
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
        q, k, v = (x.reshape(B, N, Q, x.shape[-1]) for x in (q, k, v))
        G = g.reshape(B, N, Q).cumsum(-1)
        beta = beta.reshape(B, N, Q, 1)
        causal = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()
        # e^{G_i - G_j} for j <= i, 0 above the diagonal (masked before exp: no overflow)
        decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
        L = (beta * (k @ k.transpose(-1, -2)) * decay).tril(-1)
        eye = torch.eye(Q, dtype=q.dtype, device=q.device)
        solve = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
        values = solve @ (beta * v)  # U = values - starts @ S_0
        starts = solve @ (beta * G.exp().unsqueeze(-1) * k)
        scores = (q @ k.transpose(-1, -2)) * decay
        q_decayed = q * G.exp().unsqueeze(-1)
        k_to_end = k * (G[..., -1:] - G).exp().unsqueeze(-1)
        chunk_decay = G[..., -1].exp()  # (B, N)
        outs = []
        for n in range(N):
            u = values[:, n] - starts[:, n] @ S
            outs.append(q_decayed[:, n] @ S + scores[:, n] @ u)
            S = chunk_decay[:, n, None, None] * S + k_to_end[:, n].transpose(-1, -2) @ u
        out = torch.cat(outs, dim=1)[:, :T]
    return out.to(out_dtype), S.to(state_dtype)
