"""Key-value slot memory: two slot matrices written with one set of weights.

The recurrence of Gated Slot Attention (Zhang et al., 2024), per head, with S
slots of d features for the keys and S for the values::

    K_t = diag(alpha_t) K_{t-1} + (1 - alpha_t) k_t^T      (S x d)
    V_t = diag(alpha_t) V_{t-1} + (1 - alpha_t) v_t^T      (S x d, the same alpha_t)
    o_t = V_t^T softmax(K_t q_t)                           (read after the write at t)

Because slot s receives k_t and v_t with the same weight, the key and the
value held in a slot come from the same tokens: a query that matches a slot's
key reads that slot's value (the binding the tied causal memory lacks).

Heads are folded into the batch by the caller: every function here sees
``q``, ``k``, ``v`` (B, T, d), ``log_alpha`` (B, T, S) (<= 0) and a state
``(K, V)``, two (B, S, d) tensors. Three forms of the same function:

- :func:`kv_memory_recurrent`: one token at a time. The reference.
- :func:`kv_memory_chunked`: O(T) training form. Chunks of Q tokens; the state
  is carried between chunks and inside a chunk each slot has a Q x Q
  lower-triangular weight ``W[i, j, s] = prod_{j < l <= i} alpha_l[s] (1 - alpha_j[s])``.
  With ``A_i = prod_{l <= i} alpha_l`` (decay since the chunk start)::

      K_i q_i = A_i * (K_start q_i) + sum_j W[i, j, :] (k_j . q_i)
      p_i     = softmax(K_i q_i)
      o_i     = V_start^T (p_i * A_i) + sum_j (sum_s p_i[s] W[i, j, s]) v_j

  No T x T matrix is formed: memory O(T Q S) for the weights plus O(T/Q S d)
  for the chunk-start states. The decays' exponents are exact segment sums of
  ``log_alpha`` (see :func:`gam.ops.causal_memory._segment_matrix`), all <= 0.
- :func:`kv_memory_step`: one decoding step on the state.
"""

from __future__ import annotations

import torch

# The same exact-segment-sum trick as the tied causal memory (one 0/1 matmul).
from gam.ops.causal_memory import _segment_matrix, auto_chunk_size, split_into_chunks, suffix_weights

State = tuple[torch.Tensor, torch.Tensor]


def kv_memory_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                   state: State) -> tuple[torch.Tensor, State]:
    """One token: ``q``, ``k``, ``v`` (B, d), ``log_alpha`` (B, S), state (K, V) (B, S, d).

    Returns the read (B, d) and the new state (the write comes first)."""
    K, V = state
    alpha = log_alpha.exp().unsqueeze(-1)
    write = (-torch.expm1(log_alpha)).unsqueeze(-1)  # 1 - alpha, accurate near alpha = 1
    K = alpha * K + write * k.unsqueeze(1)
    V = alpha * V + write * v.unsqueeze(1)
    p = torch.softmax(torch.einsum("bsd,bd->bs", K, q), dim=-1)
    return torch.einsum("bs,bsd->bd", p, V), (K, V)


def kv_memory_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                        state: State) -> tuple[torch.Tensor, State]:
    """Step-by-step reference: reads (B, T, d) and the final state."""
    outs = []
    for t in range(q.shape[1]):
        o, state = kv_memory_step(q[:, t], k[:, t], v[:, t], log_alpha[:, t], state)
        outs.append(o)
    return torch.stack(outs, dim=1), state


def kv_memory_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                      state: State, chunk_size: int | None = None) -> tuple[torch.Tensor, State]:
    """Chunked parallel form of :func:`kv_memory_recurrent` (same arguments and results).
    Any T: the last chunk is padded with no-op tokens (alpha = 1, nothing written)."""
    B, T, d = q.shape
    S = log_alpha.shape[-1]
    if chunk_size is None:  # balances the weights (T Q S) against the two states (T/Q S d)
        chunk_size = auto_chunk_size(2 * d)
    Q, log_alpha, (q, k, v) = split_into_chunks(chunk_size, log_alpha, q, k, v)
    N = log_alpha.shape[1]

    # Chunk-start states: (K, V)_{c+1} = A_Q (K, V)_c + the chunk's writes (N small steps).
    to_end, chunk_decay = suffix_weights(log_alpha, dim=2)  # (B, N, Q, S), (B, N, 1, S)
    writes_k = to_end.transpose(-1, -2) @ k  # (B, N, S, d)
    writes_v = to_end.transpose(-1, -2) @ v
    K, V = state
    K_starts, V_starts = [], []
    for c in range(N):
        K_starts.append(K)
        V_starts.append(V)
        a = chunk_decay[:, c, 0].unsqueeze(-1)  # (B, S, 1)
        K = a * K + writes_k[:, c]
        V = a * V + writes_v[:, c]
    K_start, V_start = torch.stack(K_starts, 1), torch.stack(V_starts, 1)  # (B, N, S, d)

    # Inside each chunk: W[i, j, s] = exp(sum_{j < l <= i} log alpha_l) (1 - alpha_j), 0 for j > i.
    sums = _segment_matrix(Q, log_alpha.dtype, log_alpha.device)
    seg = (sums @ log_alpha).view(B, N, Q, Q, S)
    upper = torch.ones(Q, Q, dtype=torch.bool, device=q.device).triu(1).unsqueeze(-1)
    W = seg.masked_fill(upper, float("-inf")).exp() * -torch.expm1(log_alpha).unsqueeze(2)
    decay = torch.cumsum(log_alpha, dim=2).exp()  # A_i: (B, N, Q, S)

    qk = q @ k.transpose(-1, -2)  # (B, N, Qi, Qj): q_i . k_j
    scores = decay * (q @ K_start.transpose(-1, -2)) + torch.einsum("bnij,bnijs->bnis", qk, W)
    p = torch.softmax(scores, dim=-1)
    mix = torch.einsum("bnis,bnijs->bnij", p, W)  # weight of v_j in the read at i
    out = (p * decay) @ V_start + mix @ v
    return out.reshape(B, N * Q, d)[:, :T], (K, V)


def kv_memory_final_state(k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                          state: State) -> State:
    """The state after T writes, without the reads (O(T S d)): for a prefill."""
    weights, total = suffix_weights(log_alpha, dim=1)  # (B, T, S), (B, 1, S)
    K, V = state
    a = total.transpose(1, 2)  # (B, S, 1)
    return a * K + weights.transpose(1, 2) @ k, a * V + weights.transpose(1, 2) @ v
