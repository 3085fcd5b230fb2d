"""Causal memory: slots that tokens write into as the sequence goes.

The paper's GAM reads a fixed bank, ``softmax(h_t M^T) M``, so its "global"
path is a per-token function. Here the bank is the *initial content* of a set
of slots that evolve with the sequence (the slot-memory recurrence of ABC,
Peng et al. 2022, and Gated Slot Attention, Zhang et al. 2024, with the keys
and values tied as in GAM's bank)::

    M_0 = memory_bank                                  (S slots x C)
    M_t = diag(alpha_t) M_{t-1} + (1 - alpha_t) v_t^T  alpha_t in (0, 1)^S
    o_t = softmax(h_t M_t^T) M_t                       (read after the write at t)

Each slot is a convex combination of its initial content and the values
written so far, so the state stays bounded. With no writes (alpha = 1) every
``M_t = M_0`` and the read is exactly the paper's.

Three implementations of the same function, all taking ``log_alpha`` (<= 0):

- :func:`causal_memory_recurrent`: one token at a time. The reference.
- :func:`causal_memory_chunked`: O(T) training form. The sequence is cut into
  chunks of Q tokens; the state is carried between chunks (one (B, S, C)
  update per chunk) and inside a chunk each slot has a Q x Q lower-triangular
  decay matrix ``D[i, j, s] = prod_{j < l <= i} alpha_l[s]``. No T x T matrix
  is formed. Decays are computed in log space, ``exp(la_i - la_j)`` with
  ``la`` the chunk-local cumulative sum of ``log_alpha``: every exponent is
  <= 0 (the upper triangle is set to -inf before ``exp``), so nothing
  overflows and nothing is divided by a product that may have underflowed.
- :func:`causal_memory_step`: one decoding step on a (B, S, C) state.

Within a chunk, with ``A_i = prod_{l <= i} alpha_l`` (the chunk's running decay),
``w_j = 1 - alpha_j`` and ``K[i, j, s] = D[i, j, s] w_j[s]``::

    M_i[s]   = A_i[s] M_start[s] + sum_{j <= i} K[i, j, s] v_j
    score_i  = A_i * (h_i M_start^T) + sum_j (h_i . v_j) K[i, j, :]
    p_i      = softmax(score_i)
    o_i      = (p_i * A_i) M_start + sum_j (sum_s p_i[s] K[i, j, s]) v_j
    M_end    = A_Q M_start + sum_j K[Q, j, :]^T v_j
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _initial_state(memory_bank: torch.Tensor, batch: int, state: torch.Tensor | None) -> torch.Tensor:
    if state is not None:
        return state
    return memory_bank.unsqueeze(0).expand(batch, *memory_bank.shape)


def causal_memory_step(h: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                       state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``h``, ``v`` (B, C), ``log_alpha`` (B, S), ``state`` (B, S, C).

    Returns the read (B, C) and the new state (B, S, C) (the write comes first).
    """
    alpha = log_alpha.exp().unsqueeze(-1)
    write = (-torch.expm1(log_alpha)).unsqueeze(-1)  # 1 - alpha, accurate near alpha = 1
    state = alpha * state + write * v.unsqueeze(1)
    p = torch.softmax(torch.einsum("bc,bsc->bs", h, state), dim=-1)
    return torch.einsum("bs,bsc->bc", p, state), state


def causal_memory_recurrent(h: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                            memory_bank: torch.Tensor, state: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step reference. ``h``, ``v``: (B, T, C); ``log_alpha``: (B, T, S);
    ``memory_bank``: (S, C), the initial slots (or ``state`` (B, S, C)).

    Returns the reads (B, T, C) and the final state (B, S, C).
    """
    M = _initial_state(memory_bank, h.shape[0], state)
    outs = []
    for t in range(h.shape[1]):
        o, M = causal_memory_step(h[:, t], v[:, t], log_alpha[:, t], M)
        outs.append(o)
    return torch.stack(outs, dim=1), M


def auto_chunk_size(n_embd: int) -> int:
    """Chunk length balancing the two O(T) terms, the chunk-start states
    (T/Q x S x C) and the intra-chunk decays (T x Q x S): about sqrt(C), >= 8."""
    return max(8, 2 ** round(math.log2(math.sqrt(n_embd))))


def split_into_chunks(chunk_size: int, log_alpha: torch.Tensor,
                      *tensors: torch.Tensor) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """(Q, log_alpha, tensors), each (B, T, X) reshaped to (B, N, Q, X) chunks of
    Q = min(chunk_size, T) tokens. The last chunk is padded with no-op tokens:
    log alpha = 0 keeps everything and writes nothing."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T = log_alpha.shape[:2]
    Q = min(chunk_size, T)
    N = -(-T // Q)
    pad = N * Q - T
    chunks = [F.pad(x, (0, 0, 0, pad)).reshape(B, N, Q, x.shape[-1]) for x in (log_alpha, *tensors)]
    return Q, chunks[0], chunks[1:]


def suffix_weights(log_alpha: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight of each write in the state at the end, total decay) along ``dim``:
    ``prod_{l > j} alpha_l (1 - alpha_j)`` and ``prod_l alpha_l``, from suffix sums
    (every exponent <= 0)."""
    suffix = torch.flip(torch.cumsum(torch.flip(log_alpha, [dim]), dim=dim), [dim])  # sum_{l >= j}
    after = torch.cat([suffix.narrow(dim, 1, suffix.shape[dim] - 1),
                       torch.zeros_like(suffix.narrow(dim, 0, 1))], dim=dim)  # sum_{l > j}
    return after.exp() * -torch.expm1(log_alpha), suffix.narrow(dim, 0, 1).exp()


def _segment_matrix(Q: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(Q*Q, Q) 0/1 matrix: ``(sums @ x)[i*Q + j] = sum_{j < l <= i} x[l]``."""
    idx = torch.arange(Q, device=device)
    i, j, l = idx.view(Q, 1, 1), idx.view(1, Q, 1), idx.view(1, 1, Q)
    return ((j < l) & (l <= i)).to(dtype).reshape(Q * Q, Q)


def _intra_weights(log_alpha: torch.Tensor, write: torch.Tensor, sums: torch.Tensor,
                   with_decays: bool = False):
    """K[b, n, i, j, s] = D[i, j, s] w_j[s] for chunks (B, N, Q, S); zero for j > i.

    ``D = exp(seg)`` with ``seg[i, j] = sum_{j < l <= i} log alpha_l``, summed
    directly (a 0/1 matrix product: no difference of cumulative sums, which would
    cancel once decays saturate). Every exponent is <= 0 and the upper triangle
    is -inf before ``exp``: nothing overflows, nothing is divided.
    """
    B, N, Q, S = log_alpha.shape
    D = (sums @ log_alpha).view(B, N, Q, Q, S)
    upper = torch.ones(Q, Q, dtype=torch.bool, device=D.device).triu(1).unsqueeze(-1)
    D.masked_fill_(upper, float("-inf")).exp_()
    K = D * write.unsqueeze(2)
    return (K, D) if with_decays else K


class _ChunkRead(torch.autograd.Function):
    """Reads inside chunks, given each chunk's starting state (see the module docstring)::

        score_i = A_i * (h_i M_start^T) + sum_j (h_i . v_j) K[i, j, :]
        p_i     = softmax(score_i)
        o_i     = (p_i * A_i) M_start + sum_j (sum_s p_i[s] K[i, j, s]) v_j

    Shapes: h, v (B, N, Q, C); log_alpha, decay = A (B, N, Q, S); M_start (B, N, S, C).
    Keeps only Q x S and Q x Q tensors for backward; the (Q, Q, S) weights K are
    rebuilt there, so memory stays O(T (S + Q + C)) besides the chunk states.
    """

    @staticmethod
    def forward(ctx, h, v, log_alpha, decay, M_start):
        B, N, Q, S = log_alpha.shape
        sums = _segment_matrix(Q, log_alpha.dtype, log_alpha.device)
        K = _intra_weights(log_alpha, -torch.expm1(log_alpha), sums)  # (B, N, Qi, Qj, S)
        Kb = K.view(B * N * Q, Q, S)
        G = h @ v.transpose(-1, -2)  # (B, N, Qi, Qj): h_i . v_j
        X = h @ M_start.transpose(-1, -2)  # (B, N, Q, S)
        scores = decay * X + torch.bmm(G.reshape(-1, 1, Q), Kb).view(B, N, Q, S)
        p = torch.softmax(scores, dim=-1)
        R = (K * p.unsqueeze(3)).sum(-1)  # (B, N, Qi, Qj): sum_s p_i[s] K[i, j, s]
        out = (p * decay) @ M_start + R @ v
        ctx.save_for_backward(h, v, log_alpha, decay, M_start, p, X, G)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, v, log_alpha, decay, M_start, p, X, G = ctx.saved_tensors
        B, N, Q, S = log_alpha.shape
        sums = _segment_matrix(Q, log_alpha.dtype, log_alpha.device)
        write = -torch.expm1(log_alpha)
        K, D = _intra_weights(log_alpha, write, sums, with_decays=True)
        Kb = K.view(B * N * Q, Q, S)
        R = (K * p.unsqueeze(3)).sum(-1)

        d_pa = dout @ M_start.transpose(-1, -2)  # d(p * A): (B, N, Q, S)
        dM = (p * decay).transpose(-1, -2) @ dout
        dR = dout @ v.transpose(-1, -2)  # (B, N, Qi, Qj)
        dv = R.transpose(-1, -2) @ dout
        dp = d_pa * decay + torch.bmm(dR.reshape(-1, 1, Q), Kb).view(B, N, Q, S)
        dscores = p * (dp - (p * dp).sum(-1, keepdim=True))
        ddecay = d_pa * p + dscores * X
        dX = dscores * decay
        dh = dX @ M_start
        dM = dM + dX.transpose(-1, -2) @ h
        dG = (K * dscores.unsqueeze(3)).sum(-1)
        dh = dh + dG @ v
        dv = dv + dG.transpose(-1, -2) @ h
        # dK[i, j, s] = dR[i, j] p_i[s] + G[i, j] dscores_i[s], one (Q x 2) @ (2 x S) per (b, n, i)
        left = torch.stack([dR, G], dim=-1).view(-1, Q, 2)
        right = torch.stack([p, dscores], dim=-2).view(-1, 2, S)
        dK = torch.bmm(left, right).view(B, N, Q, Q, S)
        dwrite = (dK * D).sum(2)  # (B, N, Qj, S)
        dseg = dK.mul_(K)  # d/dseg of D * w = K
        dlog_alpha = sums.t() @ dseg.view(B, N, Q * Q, S) - dwrite * log_alpha.exp()  # w = 1 - e^la
        return dh, dv, dlog_alpha, ddecay, dM


def causal_memory_chunked(h: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                          memory_bank: torch.Tensor, state: torch.Tensor | None = None,
                          chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form of :func:`causal_memory_recurrent` (same arguments and
    results). Time O(T S (C + Q)), memory O(T S (C/Q + Q)) per sequence; any T (the
    last chunk is padded with no-op tokens: alpha = 1, nothing written)."""
    B, T, C = h.shape
    if chunk_size is None:
        chunk_size = auto_chunk_size(C)
    Q, log_alpha, (h, v) = split_into_chunks(chunk_size, log_alpha, h, v)
    N = log_alpha.shape[1]

    # Decays in log space, every exponent <= 0: from the chunk start, A_i =
    # prod_{l <= i} alpha_l; to the chunk end, prod_{j < l <= Q} alpha_l (suffix sums).
    decay = torch.cumsum(log_alpha, dim=2).exp()  # (B, N, Q, S)
    to_end, _ = suffix_weights(log_alpha, dim=2)
    U = to_end.transpose(-1, -2) @ v  # (B, N, S, C): the chunk's writes

    # States at chunk starts: M_{c+1} = A_Q M_c + U_c (N small steps).
    M = _initial_state(memory_bank, B, state)
    starts = []
    for d_c, U_c in zip(decay[:, :, -1].unbind(1), U.unbind(1)):
        starts.append(M)
        M = d_c.unsqueeze(-1) * M + U_c
    M_start = torch.stack(starts, dim=1)  # (B, N, S, C)

    out = _ChunkRead.apply(h, v, log_alpha, decay, M_start)
    return out.reshape(B, N * Q, C)[:, :T], M


def causal_memory_final_state(v: torch.Tensor, log_alpha: torch.Tensor, memory_bank: torch.Tensor,
                              state: torch.Tensor | None = None) -> torch.Tensor:
    """The state after T writes, without the reads (O(T S C)): for a prefill.

    ``M_T = (prod_t alpha_t) M_0 + sum_j (prod_{l > j} alpha_l) (1 - alpha_j) v_j^T``,
    with the products as exponentiated suffix sums of ``log_alpha``.
    """
    weights, total = suffix_weights(log_alpha, dim=1)  # (B, T, S), (B, 1, S)
    M0 = _initial_state(memory_bank, v.shape[0], state)
    return total.transpose(1, 2) * M0 + weights.transpose(1, 2) @ v
