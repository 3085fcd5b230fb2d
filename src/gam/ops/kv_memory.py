"""Key-value slot memory: two slot matrices written with one set of weights.

The recurrence of Gated Slot Attention (Zhang et al., 2024), per head, with S
slots of d features for the keys and S for the values::

    K_t = diag(alpha_t) K_{t-1} + (1 - alpha_t) k_t^T      (S x d)
    V_t = diag(alpha_t) V_{t-1} + (1 - alpha_t) v_t^T      (S x d, the same alpha_t)
    o_t = V_t^T softmax(K_t q_t)                           (read after the write at t)

Because slot s receives k_t and v_t with the same weight, the key and the
value held in a slot come from the same tokens: a query that matches a slot's
key reads that slot's value (the binding a tied slot memory lacks).

Heads are folded into the batch by the caller: every function here sees
``q``, ``k``, ``v`` (B, T, d), ``log_alpha`` (B, T, S) (<= 0) and a state
``(K, V)``, two (B, S, d) tensors. Every form first bounds the forget gate,
``log_alpha >= LOG_ALPHA_MIN`` (at most 98% of a slot is replaced per token),
and computes the decays in fp32 (a bf16 cumulative sum of gates would be off by
a quarter in the exponent). Three forms of the same function:

- :func:`kv_memory_recurrent`: one token at a time. The reference.
- :func:`kv_memory_chunked`: O(T) training form, all batched matmuls. Chunks of
  Q tokens; the state is carried between chunks; inside a chunk, with
  ``a_i = sum_{l <= i} log alpha_l`` (chunk-local), ``A_i = exp(a_i)`` and
  ``u_j = (1 - alpha_j) / A_j``, the decay from j to i factorizes,
  ``prod_{j < l <= i} alpha_l (1 - alpha_j) = A_i u_j``, so::

      K_i q_i = A_i * (K_start q_i + sum_{j <= i} (q_i . k_j) u_j)
      p_i     = softmax(K_i q_i),   r_i = p_i * A_i
      o_i     = V_start^T r_i + sum_{j <= i} (r_i . u_j) v_j

  (the gated-linear-attention chunk form, with the gate on the slots). No
  T x T matrix and no Q x Q x S tensor: memory O(T S). The factorization needs
  ``exp(-a_j)`` to stay finite: with the gate bound, ``|a| <= Q |LOG_ALPHA_MIN|``,
  so the chunk is at most ``MAX_CHUNK`` tokens (exponents <= 64; fp32 and bf16
  hold e^88).
- :func:`kv_memory_step`: one decoding step on the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

State = tuple[torch.Tensor, torch.Tensor]

LOG_ALPHA_MIN = -4.0  # alpha >= 0.018
MAX_CHUNK = 16
DEFAULT_CHUNK = 16


def bounded_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """The forget gate every form uses: fp32 at least, clamped to ``[LOG_ALPHA_MIN, 0]``."""
    return log_alpha.to(torch.promote_types(log_alpha.dtype, torch.float32)).clamp(LOG_ALPHA_MIN, 0.0)


def kv_memory_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                   state: State) -> tuple[torch.Tensor, State]:
    """One token: ``q``, ``k``, ``v`` (B, d), ``log_alpha`` (B, S), state (K, V) (B, S, d).

    Returns the read (B, d) and the new state (the write comes first)."""
    K, V = state
    log_alpha = bounded_gate(log_alpha)
    alpha = log_alpha.exp().unsqueeze(-1).to(K.dtype)
    write = (-torch.expm1(log_alpha)).unsqueeze(-1).to(K.dtype)  # 1 - alpha, accurate near alpha = 1
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


def split_into_chunks(chunk_size: int, log_alpha: torch.Tensor,
                      *tensors: torch.Tensor) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """(Q, log_alpha, tensors), each (B, T, X) reshaped to (B, N, Q, X) chunks of
    Q = min(chunk_size, T) tokens. The last chunk is padded with no-op tokens:
    log alpha = 0 keeps everything and writes nothing."""
    B, T = log_alpha.shape[:2]
    Q = min(chunk_size, T)
    N = -(-T // Q)
    pad = N * Q - T
    chunks = [(F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(B, N, Q, x.shape[-1])
              for x in (log_alpha, *tensors)]
    return Q, chunks[0], chunks[1:]


def suffix_weights(log_alpha: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight of each write in the state at the end, total decay) along ``dim``:
    ``prod_{l > j} alpha_l (1 - alpha_j)`` and ``prod_l alpha_l``, from suffix sums
    (every exponent <= 0)."""
    suffix = torch.flip(torch.cumsum(torch.flip(log_alpha, [dim]), dim=dim), [dim])  # sum_{l >= j}
    after = torch.cat([suffix.narrow(dim, 1, suffix.shape[dim] - 1),
                       torch.zeros_like(suffix.narrow(dim, 0, 1))], dim=dim)  # sum_{l > j}
    return after.exp() * -torch.expm1(log_alpha), suffix.narrow(dim, 0, 1).exp()


def kv_memory_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                      state: State, chunk_size: int | None = None) -> tuple[torch.Tensor, State]:
    """Chunked parallel form of :func:`kv_memory_recurrent` (same arguments and results).
    Any T: the last chunk is padded with no-op tokens (alpha = 1, nothing written)."""
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK} (the decay factorization's range), got {chunk_size}")
    B, T, d = q.shape
    Q, log_alpha, (q, k, v) = split_into_chunks(chunk_size, bounded_gate(log_alpha), q, k, v)
    N = log_alpha.shape[1]
    dtype = q.dtype

    # Inside each chunk: prod_{j < l <= i} alpha_l (1 - alpha_j) = A_i u_j.
    cum = torch.cumsum(log_alpha, dim=2)  # a_i, in [Q LOG_ALPHA_MIN, 0]
    decay32 = cum.exp()  # A_i
    u32 = (-cum).exp() * -torch.expm1(log_alpha)  # (1 - alpha_j) / A_j
    # The same factors give the chunk's effect on the state: write j reaches the chunk's
    # end with weight A_Q u_j, and the state decays by A_Q (fp32 products, then cast).
    chunk_decay = decay32[:, :, -1:]  # (B, N, 1, S)
    to_end = (chunk_decay * u32).to(dtype)
    decay, u = decay32.to(dtype), u32.to(dtype)

    # Chunk-start states: (K, V)_{c+1} = A_Q (K, V)_c + the chunk's writes (N small steps).
    writes_k = to_end.transpose(-1, -2) @ k  # (B, N, S, d)
    writes_v = to_end.transpose(-1, -2) @ v
    # unbind, not writes_k[:, c]: the backward of one index fills a zero tensor
    # the size of all N chunks, so N indexings cost O(N^2) (10x slower at T = 4096).
    K, V = state
    K_starts, V_starts = [], []
    for a, wk, wv in zip(chunk_decay.to(dtype).transpose(-1, -2).unbind(1), writes_k.unbind(1), writes_v.unbind(1)):
        K_starts.append(K)
        V_starts.append(V)
        K = a * K + wk  # a: (B, S, 1)
        V = a * V + wv
    K_start, V_start = torch.stack(K_starts, 1), torch.stack(V_starts, 1)  # (B, N, S, d)

    causal = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()
    qk = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, N, Qi, Qj): q_i . k_j, j <= i
    scores = decay * (q @ K_start.transpose(-1, -2) + qk @ u)
    r = torch.softmax(scores, dim=-1) * decay
    mix = (r @ u.transpose(-1, -2)).masked_fill(~causal, 0.0)  # weight of v_j in the read at i
    out = r @ V_start + mix @ v
    return out.reshape(B, N * Q, d)[:, :T], (K, V)


def kv_memory_final_state(k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                          state: State) -> State:
    """The state after T writes, without the reads (O(T S d)): for a prefill."""
    weights, total = suffix_weights(bounded_gate(log_alpha), dim=1)  # (B, T, S), (B, 1, S)
    K, V = state
    weights, a = weights.to(k.dtype).transpose(1, 2), total.to(k.dtype).transpose(1, 2)  # (B, S, T), (B, S, 1)
    return a * K + weights @ k, a * V + weights @ v
