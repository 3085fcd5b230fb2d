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
a quarter in the exponent). Forms of the same function:

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
  T x T matrix and no Q x Q x S tensor: memory O(T S). The factors are taken
  about the chunk's middle token m (the product ``A_i u_j`` does not change):
  ``A'_i = exp(a_i - a_m)`` and ``u_j = (1 - alpha_j) exp(a_m - a_j)`` in the
  in-chunk terms, ``A_i <= 1`` on the chunk-start state, so that with the gate
  bound every exponent is at most ``|LOG_ALPHA_MIN| Q / 2``: the chunk is at
  most ``MAX_CHUNK`` tokens (exponents <= 64; fp32 and bf16 hold e^88). Centered,
  a chunk holds twice the tokens that factors from its start allowed, and the
  chunk-start states, S / Q times the size of q and the op's largest traffic,
  halve. Its backward is written by hand (:class:`KVMemoryChunked`): it
  keeps the inputs, the chunk-start states and the results of the forward's
  transcendental passes, and recomputes the cheap rest.
- :func:`kv_memory_chunked_autograd`: the same chunk form in plain PyTorch,
  differentiated by autograd: the reference for the hand-written backward.
- :func:`kv_memory_fused`: one C kernel for CPUs (``csrc/kv_memory_cpu.c``, built on
  first use by :mod:`gam.ops.native`), forward and backward, as custom ops, in two forms:
  the recurrence itself, token by token (fp32 arithmetic; the state stays in the cache,
  where the chunked form makes a few dozen passes over (T, S) tensors in memory), and for
  bf16 on CPUs with AMX the chunk form above on the matrix tiles (:func:`tiles_apply`
  says where it is taken: bf16 products with fp32 sums, bf16 pairs where terms cancel).
- :func:`kv_memory`: the training form a call should take: the fused kernel on a
  CPU where it builds, else the chunked form.
- :func:`kv_memory_step`: one decoding step on the state;
  :func:`kv_memory_final_state`: the state after a prompt, without the reads.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from gam.ops import native
from gam.ops.memory_read import compute_dtype

Tensor = torch.Tensor
State = tuple[Tensor, Tensor]

LOG_ALPHA_MIN = -4.0  # alpha >= 0.018
MAX_CHUNK = 32
DEFAULT_CHUNK = 32


def l2_cache_bytes(default: int = 512 * 1024) -> int:
    """The first CPU's L2 cache size, from Linux's sysfs (``default`` where it cannot be read)."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1024, "M": 1024**2}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return default


# KVMemoryChunked's tiles: one gate-sized fp32 tensor of a tile fills the L2 cache (the results
# are bitwise the same at any tile size), and the fewest chunks per tile when rows are plenty.
# Measured (op forward + backward, bf16, 2 threads): on the AMD EPYC host of the earlier figures
# 2^17 elements, 512 KiB, was best (tiles of one chunk 5% slower, whole tensors 2x; its L2 size
# was not recorded); on an Intel Xeon host with 2 MiB of L2, 2^19 made the op 1.08x faster than
# 2^17 at the paper configuration's shape and 1.25x at the cpu preset's, in the same runs
# (results/bench-kv-memory-cpu/op-tiles-l2-xeon.md).
TILE_ELEMENTS = max(2**15, min(2**20, 1 << (l2_cache_bytes() // 4).bit_length() - 1))
TILE_CHUNKS = 4


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


def _checked_chunk_size(chunk_size: int | None) -> int:
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK} (the decay factorization's range), got {chunk_size}")
    return chunk_size


class Decays(NamedTuple):
    """Decay factors of bounded gates in chunks (B, N, Q, S), fp32 at least, with
    ``a_i = sum_{l <= i} log alpha_l`` inside the chunk and m its middle token."""

    decay: torch.Tensor  # A_i = exp(a_i) <= 1: the weight of the chunk-start state at i
    centered: torch.Tensor  # A'_i = exp(a_i - a_m)
    u: torch.Tensor  # u_j = (1 - alpha_j) exp(a_m - a_j), so A'_i u_j = prod_{j < l <= i} alpha_l (1 - alpha_j)
    inv_centered: torch.Tensor  # exp(a_m - a_j) = 1 / A'_j
    chunk_decay: torch.Tensor  # A_Q (B, N, 1, S): how much of the chunk-start state is left at its end
    to_end: torch.Tensor  # A'_Q u_j: the weight of write j in the state at the chunk's end

    @classmethod
    def from_kept(cls, centered: torch.Tensor, u: torch.Tensor, decay: torch.Tensor) -> "Decays":
        """The factors from the three that need an ``exp`` (what :class:`KVMemoryChunked`
        keeps for its backward), the others by the same products as :func:`chunk_decays`
        outside autograd: bitwise its result."""
        return cls(decay, centered, u, centered.reciprocal(), decay[:, :, -1:], centered[:, :, -1:] * u)


def chunk_decays(log_alpha: torch.Tensor) -> Decays:
    """:class:`Decays` of bounded gates (B, N, Q, S). Every exponent is at most
    ``|LOG_ALPHA_MIN| Q / 2``: ``a_i - a_m`` and ``a_m - a_j`` span half a chunk each way."""
    a = torch.cumsum(log_alpha, dim=2)  # in [Q LOG_ALPHA_MIN, 0]
    middle = (a.shape[2] - 1) // 2
    centre = a[:, :, middle:middle + 1]
    centered = (a - centre).exp()
    # one exp over the chunk; a reciprocal and a product with the centre's exp are cheaper
    # (within an ulp or two; where exp(a_i) underflows, so does the product). Not the
    # reciprocal under autograd: its backward squares 1 / x, up to e^128 (inf in fp32).
    inv_centered = (-(a - centre)).exp() if torch.is_grad_enabled() and a.requires_grad else centered.reciprocal()
    u = -torch.expm1(log_alpha) * inv_centered
    decay = centered * centre.exp()
    return Decays(decay, centered, u, inv_centered, decay[:, :, -1:], centered[:, :, -1:] * u)


def kv_memory_chunked_autograd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                               state: State, chunk_size: int | None = None) -> tuple[torch.Tensor, State]:
    """The chunked form in plain PyTorch, differentiated by autograd (every
    intermediate kept): the reference of :func:`kv_memory_chunked`'s backward.
    Same arguments and results."""
    chunk_size = _checked_chunk_size(chunk_size)
    B, T, d = q.shape
    Q, log_alpha, (q, k, v) = split_into_chunks(chunk_size, bounded_gate(log_alpha), q, k, v)
    dtype = q.dtype

    # Inside each chunk: prod_{j < l <= i} alpha_l (1 - alpha_j) = A'_i u_j. The same
    # factors give the chunk's effect on the state: write j reaches the chunk's end
    # with weight A'_Q u_j, and the state decays by A_Q (fp32 products, then cast).
    f = chunk_decays(log_alpha)
    chunk_decay = f.chunk_decay
    to_end, decay, centered, u = (x.to(dtype) for x in (f.to_end, f.decay, f.centered, f.u))

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
    scores = decay * (q @ K_start.transpose(-1, -2)) + centered * (qk @ u)
    p = torch.softmax(scores, dim=-1)
    mix = ((p * centered) @ u.transpose(-1, -2)).masked_fill(~causal, 0.0)  # weight of v_j in the read at i
    out = (p * decay) @ V_start + mix @ v
    return out.reshape(B, -1, d)[:, :T], (K, V)


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``sum_{l >= j} x_l`` inside each chunk of ``x`` (b, n, Q, S): a matmul with a
    triangle of ones, faster on CPU than flipping around a cumsum."""
    Q = x.shape[2]
    return torch.ones(Q, Q, dtype=x.dtype, device=x.device).triu_() @ x


def _tiles(B: int, N: int, Q: int, S: int) -> list[tuple[slice, slice]]:
    """(rows, chunks) of the tiles :class:`KVMemoryChunked` works in, about
    :data:`TILE_ELEMENTS` gate-sized elements each, in the order the state flows
    (each group of rows, its chunks in time order). Tall tiles: the state is
    carried from chunk to chunk by one small op per chunk and group of rows, so
    as many rows as fit with :data:`TILE_CHUNKS` chunks. Under ``torch.compile``,
    one tile: the compiler fuses the passes itself."""
    if torch.compiler.is_compiling():
        return [(slice(0, B), slice(0, N))]
    rows = min(B, max(1, TILE_ELEMENTS // (TILE_CHUNKS * Q * S)))
    chunks = max(1, TILE_ELEMENTS // (rows * Q * S))
    return [(slice(b, min(b + rows, B)), slice(c, min(c + chunks, N)))
            for b in range(0, B, rows) for c in range(0, N, chunks)]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(b, n, X, Y) -> (b n, X, Y): the chunks of a tile as one batch of matrices."""
    return x.reshape(-1, *x.shape[2:])


def _slot_scores(q: torch.Tensor, k: torch.Tensor, K_start: torch.Tensor, decay: torch.Tensor,
                 centered: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks flattened to (b n, Q, X): ``qk`` (q_i . k_j for j <= i, zero above the
    diagonal), the slot scores ``K_i q_i = A_i K_start q_i + A'_i (qk u)_i`` and their
    softmax. q, k and ``K_start`` in the compute dtype; the decay factors, ``qk`` and
    everything after in fp32 (at least): the in-chunk products with u, whose entries
    span e^±64, are small (Q x Q x S) and in bf16 doubled the gates' gradient error."""
    qk = torch.bmm(q, k.transpose(1, 2)).tril_().to(u.dtype)
    scores = torch.addcmul(decay * torch.bmm(q, K_start.transpose(1, 2)), centered, torch.bmm(qk, u))
    return qk, scores, torch.softmax(scores, dim=-1)


def _chunk_start_states(keep: torch.Tensor, writes: torch.Tensor, state: torch.Tensor):
    """The state at each chunk's start (b, n, S, d, in the dtype of ``writes``) and after
    the last chunk (in that of ``state``): ``state_{c+1} = keep_c state_c + writes_c``,
    ``keep`` (b, n, S, 1). Each start is written once, cast on the way, into one buffer:
    no fp32 stack and no separate cast (passes over state-sized tensors, S / Q times the
    size of q, are most of the op's memory traffic). The key and the value slots are
    carried apart: side by side in one (.., 2d) state, one op per chunk for both, the
    op's backward was 7-17% slower (strided halves in the matmuls, a concatenation; one
    A/B in one process, 1 thread, quiet, not kept as a results file)."""
    starts = torch.empty_like(writes)
    for c, (keep_c, writes_c) in enumerate(zip(keep.unbind(1), writes.unbind(1))):
        starts[:, c].copy_(state)
        state = torch.addcmul(writes_c, keep_c, state)  # promoted to the state's dtype
    return starts, state


def _chunk_end_gradients(keep: torch.Tensor, local: torch.Tensor, grad: torch.Tensor):
    """Backward of :func:`_chunk_start_states`: the gradient of the state at each
    chunk's end (b, n, S, d, in the dtype of ``local``), from the gradients ``local``
    of the chunk-start states through the chunk's reads and ``grad`` of the state
    after the last chunk (carried in its dtype); and the gradient of the state before
    the first."""
    ends = torch.empty_like(local)
    for c in reversed(range(local.shape[1])):
        ends[:, c].copy_(grad)
        grad = torch.addcmul(local[:, c], keep[:, c], grad)
    return ends, grad


def _tile_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor,
                  K: torch.Tensor, V: torch.Tensor):
    """One tile of chunks (b, n, Q, X), bounded gates, and the state (b, S, d each, fp32
    at least) at its start: the reads (b n, Q, d), the chunk-start key and value slots
    (b, n, S, d, in the compute dtype), the state after the tile and what the backward
    keeps of the rest (:class:`Kept`)."""
    dtype = q.dtype
    f = chunk_decays(gates)
    keep, to_end = f.chunk_decay.transpose(-1, -2), f.to_end.to(dtype).transpose(-1, -2)
    K_start, K = _chunk_start_states(keep, to_end @ k, K)
    V_start, V = _chunk_start_states(keep, to_end @ v, V)

    u, decay, centered = _flat(f.u), _flat(f.decay), _flat(f.centered)
    _, scores, p = _slot_scores(_flat(q), _flat(k), _flat(K_start), decay, centered, u)
    mix = torch.bmm(p * centered, u.transpose(1, 2)).tril_().to(dtype)  # weight of v_j in the read at i
    out = torch.baddbmm(torch.bmm(mix, _flat(v)), (p * decay).to(dtype), _flat(V_start))
    return out, K_start, V_start, K, V, Kept(f.centered, f.u, f.decay, scores, p)


class Kept(NamedTuple):
    """What :class:`KVMemoryChunked` keeps of a tile's forward besides its inputs and
    chunk-start states: the results of its transcendental passes (the decay factors'
    ``exp``, the softmax): the backward is 1.12x / 1.25x faster without recomputing them at
    the paper configuration's / the cpu preset's shapes
    (results/bench-kv-memory-cpu/op-kept-before-after.md); the cheap products are
    recomputed (:meth:`Decays.from_kept`), so the backward sees bitwise the forward's
    values. Five gate-sized fp32 tensors (T S each per row)."""

    centered: torch.Tensor  # (b, n, Q, S)
    u: torch.Tensor
    decay: torch.Tensor
    scores: torch.Tensor  # (b n, Q, S)
    p: torch.Tensor


def _tile_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: Kept,
                   K_start: torch.Tensor, V_start: torch.Tensor, d_out: torch.Tensor,
                   dK: torch.Tensor, dV: torch.Tensor):
    """Gradients of :func:`_tile_forward` given those of its reads ``d_out`` (b, n, Q, d)
    and of the state after the tile: dq, dk, dv (b n, Q, d), the gates' (b, n, Q, S,
    fp32) and the state's at the tile's start.

    Each chunk's own terms first, batched over the tile: the reads are
    ``out = r V_start + mix v``, ``r = p A``, ``mix = tril(r' u^T)``, ``r' = p A'``,
    ``p = softmax(scores)``, ``scores = A (q K_start^T) + A' (qk u)``, ``qk = tril(q k^T)``
    (the centre of A' and u, a function of the gates, cancels in every product, so it
    is held constant). Then the state gradient carried back over the chunks
    (``(K, V)_{c+1} = A_Q (K, V)_c + to_end^T (k, v)``) and the terms that need it."""
    dtype = q.dtype
    f = Decays.from_kept(kept.centered, kept.u, kept.decay)
    q, k, v, dO = _flat(q), _flat(k), _flat(v), _flat(d_out)
    u, to_end = _flat(f.u), _flat(f.to_end.to(dtype))
    decay, centered = _flat(f.decay), _flat(f.centered)
    starts_shape = K_start.shape
    K_start, V_start = _flat(K_start), _flat(V_start)
    scores, p = kept.scores, kept.p

    qk = torch.bmm(q, k.transpose(1, 2)).tril_().to(u.dtype)  # the forward's, recomputed
    r_mix32 = p * centered
    mix = torch.bmm(r_mix32, u.transpose(1, 2)).tril_().to(dtype)

    d_mix = torch.bmm(dO, v.transpose(1, 2)).tril_().to(u.dtype)
    # dp = A dr + A' dr', from r = p A (dr = dO V_start^T) and r' = p A' (dr' = d_mix u)
    dp = torch.addcmul(decay * torch.bmm(dO, V_start.transpose(1, 2)), centered, torch.bmm(d_mix, u))
    pdp = p * dp
    d_scores = torch.addcmul(pdp, p, pdp.sum(-1, keepdim=True), value=-1)  # the softmax's backward
    dX = (d_scores * decay).to(dtype)  # of q K_start^T
    dY32 = d_scores * centered  # of qk u
    d_qk = torch.bmm(dY32, u.transpose(1, 2)).tril_().to(dtype)
    dq = torch.baddbmm(torch.bmm(d_qk, k), dX, K_start)
    dk = torch.bmm(d_qk.transpose(1, 2), q)
    dv = torch.bmm(mix.transpose(1, 2), dO)
    # fp32 even from bf16 inputs: du_j multiplies u_j (up to e^64) in the gates' gradient,
    # where the terms cancel, so its bf16 rounding would be amplified (1.9% -> 1.1% RMS error)
    du = torch.baddbmm(torch.bmm(qk.transpose(1, 2), dY32), d_mix.transpose(1, 2), r_mix32)

    keep = f.chunk_decay.transpose(-1, -2)
    dK_end, dK = _chunk_end_gradients(keep, torch.bmm(dX.transpose(1, 2), q).view(starts_shape), dK)
    dV_end, dV = _chunk_end_gradients(keep, torch.bmm((p * decay).to(dtype).transpose(1, 2), dO).view(starts_shape), dV)
    dK_end, dV_end = _flat(dK_end), _flat(dV_end)
    dk = torch.baddbmm(dk, to_end, dK_end)
    dv = torch.baddbmm(dv, to_end, dV_end)
    d_to_end = torch.baddbmm(torch.bmm(k, dK_end.transpose(1, 2)), v, dV_end.transpose(1, 2))

    # The gates, in fp32. With da_i the gradient of a_i = sum_{l <= i} log alpha_l:
    # A_i = exp(a_i) and A'_i = exp(a_i - a_m) enter the reads and the scores
    # (A dA + A' dA' = p dp + dscores scores), u_j = (1 - alpha_j) exp(a_m - a_j) enters
    # the reads and to_end_j = A'_Q u_j (du_j u_j, subtracted), A_Q = A_{Q-1} scales the
    # carried state and A'_Q to_end.
    shape = kept.u.shape
    du = torch.addcmul(du.view(shape), f.centered[:, :, -1:], d_to_end.view(shape))  # all of u's gradient
    da = torch.addcmul(pdp, d_scores, scores).view(shape).addcmul_(du, f.u, value=-1)
    # products in the compute dtype, sums in fp32
    acc = du.dtype
    carried = (K_start * dK_end).sum(-1, dtype=acc) + (V_start * dV_end).sum(-1, dtype=acc)
    da[:, :, -1] += f.chunk_decay[:, :, 0] * carried.view(*shape[:2], -1) + (d_to_end.view(shape) * f.to_end).sum(2)
    # u_j also depends on log alpha_j itself: d u_j / d log alpha_j = -alpha_j exp(a_m - a_j)
    # = u_j - exp(a_m - a_j) (no exp of the gate: a difference, whose error is that of u_j's own term)
    d_gates = _reverse_cumsum(da).addcmul_(du, f.u).addcmul_(du, f.inv_centered, value=-1)
    return dq, dk, dv, d_gates, dK, dV


class KVMemoryChunked(torch.autograd.Function):
    """:func:`kv_memory_chunked_autograd` with a hand-written backward: q, k, v (B, T, d)
    in the compute dtype, ``log_alpha`` (B, T, S), the initial state (B, S, 2d: the key
    and the value slots side by side, one tensor even where both are the same, as the
    layer's memory bank) and the chunk size in; the reads and the final state (in the
    initial state's dtype) out. Gradients flow into all of them (once: the backward
    is not itself differentiable).

    Keeps the inputs, the chunk-start states (O(T S d / Q), in the compute dtype;
    carried in fp32 at least) and the results of the forward's transcendental passes,
    the decay factors and the slot scores with their softmax (:class:`Kept`, five
    O(T S) tensors in fp32); the backward recomputes the cheap rest (the products of
    those, ``q k^T`` and the in-chunk mix). Matmuls run in the inputs' dtype; decays,
    softmax and every sum of gates in fp32. Both passes go over tiles of about
    :data:`TILE_ELEMENTS` gate-sized elements (:func:`_tiles`; the forward in time
    order, carrying the state, the backward in reverse, carrying its gradient), so
    that the intermediates, a few dozen passes over (T, S) in all, stay in cache.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_alpha, initial, chunk_size: int):
        B, T, d = q.shape
        Q, log_alpha, (q, k, v) = split_into_chunks(chunk_size, log_alpha, q, k, v)
        N, S = log_alpha.shape[1], log_alpha.shape[-1]
        state = initial.to(torch.promote_types(initial.dtype, torch.float32))
        final = torch.empty_like(state)
        out = q.new_empty(B, N, Q, d)
        per_tile = []  # each tile's K_start, V_start and Kept
        for rows, chunks in _tiles(B, N, Q, S):
            if chunks.start == 0:
                K, V = state[rows, :, :d], state[rows, :, d:]
            tile_out, K_start, V_start, K, V, kept = _tile_forward(
                q[rows, chunks], k[rows, chunks], v[rows, chunks], bounded_gate(log_alpha[rows, chunks]), K, V)
            out[rows, chunks] = tile_out.view(out[rows, chunks].shape)
            per_tile += [K_start, V_start, *kept]
            if chunks.stop == N:
                final[rows, :, :d], final[rows, :, d:] = K, V
        ctx.save_for_backward(q, k, v, log_alpha, *per_tile)
        ctx.state_dtype, ctx.T = initial.dtype, T
        return out.view(B, N * Q, d)[:, :T], final.to(initial.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_final):
        q, k, v, log_alpha, *per_tile = ctx.saved_tensors
        B, N, Q, d = q.shape
        S, T = log_alpha.shape[-1], ctx.T
        saved = 2 + len(Kept._fields)  # per tile: K_start, V_start, then Kept
        with torch.autocast(q.device.type, enabled=False):
            pad = N * Q - T
            d_out = (F.pad(d_out, (0, 0, 0, pad)) if pad else d_out).to(q.dtype).reshape(B, N, Q, d)
            d_final = d_final.to(torch.promote_types(d_final.dtype, torch.float32))
            d_initial = torch.empty_like(d_final)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            d_log_alpha = torch.empty_like(log_alpha)
            tiles = _tiles(B, N, Q, S)
            for i in reversed(range(len(tiles))):
                rows, chunks = tiles[i]
                if chunks.stop == N:
                    dK, dV = d_final[rows, :, :d], d_final[rows, :, d:]
                K_start, V_start, *kept = per_tile[saved * i: saved * (i + 1)]
                tile_dq, tile_dk, tile_dv, d_gates, dK, dV = _tile_backward(
                    q[rows, chunks], k[rows, chunks], v[rows, chunks], Kept(*kept), K_start, V_start,
                    d_out[rows, chunks], dK, dV)
                for grad, tile_grad in ((dq, tile_dq), (dk, tile_dk), (dv, tile_dv)):
                    grad[rows, chunks] = tile_grad.view(grad[rows, chunks].shape)
                # The clamp passes no gradient outside its range. A float mask: making and
                # applying a bool one is about 5x slower on CPU.
                raw = log_alpha[rows, chunks]
                tile_grad = d_log_alpha[rows, chunks]
                torch.eq(bounded_gate(raw), raw, out=tile_grad).mul_(d_gates)
                if chunks.start == 0:
                    d_initial[rows, :, :d], d_initial[rows, :, d:] = dK, dV

        def unpadded(x):
            return x.view(B, N * Q, -1)[:, :T]

        return unpadded(dq), unpadded(dk), unpadded(dv), unpadded(d_log_alpha), d_initial.to(ctx.state_dtype), None


def kv_memory_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                      state: State, chunk_size: int | None = None) -> tuple[torch.Tensor, State]:
    """Chunked parallel form of :func:`kv_memory_recurrent` (same arguments and results),
    the training form: :class:`KVMemoryChunked`. Any T: the last chunk is padded with
    no-op tokens (alpha = 1, nothing written). Under autocast, matmuls run in the
    autocast dtype; the final state has the initial state's dtype."""
    chunk_size = _checked_chunk_size(chunk_size)
    dtype, d = compute_dtype(q), q.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        out, final = KVMemoryChunked.apply(q.to(dtype), k.to(dtype), v.to(dtype), log_alpha,
                                           torch.cat(state, dim=-1), chunk_size)
    return out, (final[..., :d], final[..., d:])


def kv_memory_final_state(k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                          state: State) -> State:
    """The state after T writes, without the reads (O(T S d)): for a prefill."""
    weights, total = suffix_weights(bounded_gate(log_alpha), dim=1)  # (B, T, S), (B, 1, S)
    K, V = state
    weights, a = weights.to(k.dtype).transpose(1, 2), total.to(k.dtype).transpose(1, 2)  # (B, S, T), (B, S, 1)
    return a * K + weights @ k, a * V + weights @ v


# ----------------------------------------------------------------------------- the fused CPU kernel

class _Strides(ctypes.Structure):
    """Element strides of a (rows, T, d) operand whose row r is (batch r // heads, head r % heads)."""

    _fields_ = [("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("st", ctypes.c_int64)]


class _Options(ctypes.Structure):
    """The kernel's ``Options``: the gate operand's kind and bound, the query's scale, the norm."""

    _fields_ = [("gate_logits", ctypes.c_int), ("gate_bf16", ctypes.c_int), ("gate_min", ctypes.c_float),
                ("q_scale", ctypes.c_float), ("norm_weight", ctypes.c_void_p), ("norm_eps", ctypes.c_float)]


_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIZES = [_I64] * 6 + [_INT]  # rows, heads, T, d, S, span, bf16
_FORWARD_ARGS = _SIZES + [_PTR, _Strides] * 4 + [_Options] + [_PTR, _Strides] * 3 + [_PTR] * 6 + [_INT]
_BACKWARD_ARGS = (_SIZES + [_PTR, _Strides] * 4 + [_Options] + [_PTR] * 4 + [_PTR, _Strides]
                  + [_PTR] * 2 + [_PTR, _Strides] * 4 + [_PTR] * 3 + [_INT])
# The lowest forget logit: logsigmoid(z) >= LOG_ALPHA_MIN where z >= logit(exp(LOG_ALPHA_MIN))
LOGIT_MIN = LOG_ALPHA_MIN - math.log(-math.expm1(LOG_ALPHA_MIN))


def fused_kernel() -> ctypes.CDLL | None:
    """The fused kernel's library, or None where it cannot be built
    (:func:`gam.ops.native.unavailable_reason` says why)."""
    lib = native.library("kv_memory_cpu")
    if lib is not None and lib.kv_memory_forward.argtypes is None:
        lib.kv_memory_forward.argtypes, lib.kv_memory_forward.restype = _FORWARD_ARGS, ctypes.c_int
        lib.kv_memory_backward.argtypes, lib.kv_memory_backward.restype = _BACKWARD_ARGS, ctypes.c_int
        if hasattr(lib, "kv_memory_forward_tiles"):  # the recurrence's contracts, the scores kept in place of p
            lib.kv_memory_forward_tiles.argtypes = _FORWARD_ARGS
            lib.kv_memory_backward_tiles.argtypes = _BACKWARD_ARGS
            lib.kv_memory_forward_tiles.restype = lib.kv_memory_backward_tiles.restype = ctypes.c_int
    return lib


_tiles_ready: bool | None = None


def tiles_available() -> bool:
    """Whether the kernel's chunked form on AMX tiles runs here: built (the compiler targets a
    CPU with AMX-BF16), the process granted the tile registers by Linux (asked once), and not
    turned off with ``GAM_KV_TILES=0`` (bf16 then takes the recurrence, as on CPUs without AMX)."""
    global _tiles_ready
    if _tiles_ready is None:
        lib = fused_kernel() if os.environ.get("GAM_KV_TILES", "1") != "0" else None
        _tiles_ready = lib is not None and hasattr(lib, "kv_memory_forward_tiles") and lib.kv_memory_tiles_ready() == 1
    return _tiles_ready


FUSED_SLOTS = range(16, 129, 16)  # the kernel holds a token's slots in vectors of 16, at most 8 of them


# The kernel is written for 16-lane vectors: built without AVX-512 (its vectors then split in
# two AVX2 halves, short of registers) its backward ran 2.9x slower than with it (C harness,
# paper shape, 1 thread, Xeon host: 88.5 vs 30.5 ms), so other CPUs keep the chunked form.
FUSED_CPU_CAPABILITY = "AVX512"
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()  # read once: a call breaks torch.compile's graph


def fused_applies(q: torch.Tensor, slots: int) -> bool:
    """Whether :func:`kv_memory` takes the fused kernel for inputs like ``q`` and ``slots`` slots per
    head: a CPU tensor in fp32 or bf16 (compute dtype) on a CPU with AVX-512
    (:data:`FUSED_CPU_CAPABILITY`), slots in :data:`FUSED_SLOTS`, and the kernel built
    (eager or under ``torch.compile``: a custom op, whole in the graph)."""
    return (q.device.type == "cpu" and compute_dtype(q) in (torch.float32, torch.bfloat16) and slots in FUSED_SLOTS
            and CPU_CAPABILITY == FUSED_CPU_CAPABILITY and fused_kernel() is not None)


FUSED_SPAN = 32
TILES_MAX_DIM = 128  # the tiles' form holds d and S padded to at most this
# Below this head width the recurrence is faster: forward + backward, bf16, 2 threads, Xeon host, the
# tiles 1.14x faster than the recurrence at d = 64, 1.09x at 48, 0.97x at 32 (64 slots, 64 x 256 tokens,
# benchmarks/bench_kv_memory.py, one run each, ad hoc, git a30b131: the recurrence's backward without
# stored states; before it, 1.31x, 1.11x, 1.00x and 0.83x at 24)
TILES_MIN_DIM = 48


def tiles_apply(q: torch.Tensor) -> bool:
    """Whether :func:`kv_memory_fused` takes the kernel's chunked form on AMX tiles for inputs like
    ``q`` by default: bf16 (compute dtype; fp32 keeps the fp32 recurrence), :data:`TILES_MIN_DIM`
    to :data:`TILES_MAX_DIM` features a head, and :func:`tiles_available`."""
    return (compute_dtype(q) == torch.bfloat16 and TILES_MIN_DIM <= q.shape[-1] <= TILES_MAX_DIM
            and tiles_available())


def fused_span(T: int) -> int:
    """Tokens between the forward's checkpoints of the state, which the backward recomputes a
    span at a time: :data:`FUSED_SPAN` (16 and 64 were 1.1-1.4x slower in the forward at
    both benchmark shapes, Xeon host), or T if shorter."""
    return max(1, min(FUSED_SPAN, T))


def _operand(x: torch.Tensor, heads: int) -> tuple[_Strides, int]:
    """(strides, data pointer) of a (rows, T, X) or (B, H, T, X) operand with unit feature stride,
    for the kernel's addressing of row r as (r // heads, r % heads) (an empty one is never read)."""
    assert x.stride(-1) == 1 or x.numel() == 0
    if x.dim() == 3:
        return _Strides(heads * x.stride(0), x.stride(0), x.stride(1)), x.data_ptr()
    return _Strides(x.stride(0), x.stride(1), x.stride(2)), x.data_ptr()


def _like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor like ``x`` with unit feature stride: (B, H, T, X) over (B, T, H, X) memory,
    the layout of the projections the layer's head views come from (its gradients then join
    theirs without a transposing copy); else ``x``'s layout where that is dense."""
    if x.dim() == 4:
        B, H, T, X = x.shape
        return x.new_empty(B, T, H, X).transpose(1, 2)
    y = torch.empty_like(x)
    return y if y.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fused_shapes(q: torch.Tensor, gate: torch.Tensor, K0: torch.Tensor, keep: bool, norm: bool, tiles: bool):
    """The fused op's results, allocated (empty): reads, final key and value slots (rows, S, d),
    and what the backward needs (empty unless ``keep``): the softmax p (the tiles: the scores
    before it), the checkpoints, and with the norm the raw reads and their rsqrt."""
    T, d = q.shape[-2:]
    S = gate.shape[-1]
    rows = q.shape[0] * q.shape[1] if q.dim() == 4 else q.shape[0]
    span = fused_span(T)
    out = q.new_empty(q.shape[0], T, q.shape[1], d).transpose(1, 2) if q.dim() == 4 else q.new_empty(rows, T, d)

    def fp32(*shape):
        return q.new_empty(shape, dtype=torch.float32)

    def kept(*shape):
        return fp32(*shape) if keep else fp32(0)

    return (out, fp32(rows, S, d), fp32(rows, S, d), kept(rows, T, S), kept(rows, -(-T // span), 2, d, S),
            kept(rows, T, d) if norm else fp32(0), kept(rows, T) if norm else fp32(0))


def _options(gate: torch.Tensor, gate_logits: bool, q_scale: float, norm_weight: torch.Tensor | None,
             norm_eps: float) -> _Options:
    return _Options(int(gate_logits), int(gate.dtype == torch.bfloat16), LOGIT_MIN if gate_logits else LOG_ALPHA_MIN,
                    q_scale, None if norm_weight is None else norm_weight.data_ptr(), norm_eps)


def _check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, K0: torch.Tensor,
                    V0: torch.Tensor, norm_weight: torch.Tensor | None, tiles: bool) -> None:
    """The shapes the kernel addresses memory by, checked before it runs (a mismatch would read
    out of bounds): q, k, v alike, (rows, T, d) or (B, H, T, d); the gate (.., T, S); the slots
    (rows, S, d) or (B, H, S, d); the norm's weight (d,); all on the CPU."""
    rows, d, S = math.prod(q.shape[:-2]), q.shape[-1], gate.shape[-1]
    problems = []
    if q.dim() not in (3, 4) or k.shape != q.shape or v.shape != q.shape:
        problems.append(f"q, k, v must be alike, (rows, T, d) or (B, H, T, d): {[tuple(x.shape) for x in (q, k, v)]}")
    if tuple(gate.shape[:-1]) != tuple(q.shape[:-1]):
        problems.append(f"the gate must be (.., T, S) with q's leading dims {tuple(q.shape[:-1])}: {tuple(gate.shape)}")
    for name, x in (("K0", K0), ("V0", V0)):
        if tuple(x.shape[-2:]) != (S, d) or math.prod(x.shape[:-2]) != rows or x.dim() not in (3, q.dim()):
            problems.append(f"{name} must be (rows, S, d) or q's (B, H, S, d) with S = {S}, d = {d}: {tuple(x.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (d,):
        problems.append(f"norm_weight must be ({d},): {tuple(norm_weight.shape)}")
    if any(x is not None and x.device.type != "cpu" for x in (q, k, v, gate, K0, V0, norm_weight)):
        problems.append("every operand must be on the CPU")
    if tiles and (q.dtype != torch.bfloat16 or d > TILES_MAX_DIM or not tiles_available()):
        problems.append(f"tiles need bf16 q, k, v (got {q.dtype}), d <= {TILES_MAX_DIM} (got {d}) and a CPU with AMX-BF16 "
                        f"(available: {tiles_available()})")
    if problems:
        raise ValueError("gam::kv_memory_fused: " + "; ".join(problems))


def _checked_kernel(S: int) -> ctypes.CDLL:
    lib = fused_kernel()
    if lib is None:
        raise RuntimeError(f"the fused kv-memory kernel is unavailable: {native.unavailable_reason('kv_memory_cpu')}")
    if S not in FUSED_SLOTS:
        raise ValueError(f"the fused kv-memory kernel takes 16, 32, ..., 128 slots per head, got {S}")
    return lib


def _pointer(x: torch.Tensor) -> int | None:
    return x.data_ptr() if x.numel() else None


def _heads(x: torch.Tensor) -> int:
    return x.shape[1] if x.dim() == 4 else 1


# Inductor's on-disk cache keys a compiled graph on the names of the custom ops in it, not on
# their Python (the shapes their fake implementations give): a change to what these ops take or
# return comes with a new revision in their names, else a graph compiled with the old ops is served
# for the new ones (seen: when the tiles' forward began keeping the scores, graphs cached before
# failed to compile, "mismatch in length of strides and shape", until the cache was cleared).
OPS_REVISION = 2
FORWARD_OP = f"gam::kv_memory_fused_v{OPS_REVISION}"


def _fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, K0: torch.Tensor,
                   V0: torch.Tensor, keep: bool, gate_logits: bool, q_scale: float, norm_weight: torch.Tensor | None,
                   norm_eps: float, tiles: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, d = q.shape[-2:]
    S = gate.shape[-1]
    _check_operands(q, k, v, gate, K0, V0, norm_weight, tiles)
    lib = _checked_kernel(S)
    if K0.dim() == 4 and q.dim() == 3:  # slots per (batch, head), rows per row: as rows
        K0, V0 = K0.reshape(-1, *K0.shape[2:]), V0.reshape(-1, *V0.shape[2:])
    q, k, v, gate, K0, V0 = _unit_feature_stride(q, k, v, gate, K0, V0)
    norm_weight = None if norm_weight is None else norm_weight.float().contiguous()
    out, K_final, V_final, p, checkpoints, reads, rstd = _fused_shapes(q, gate, K0, keep, norm_weight is not None,
                                                                       tiles)
    heads = _heads(q)
    (sq, pq), (sk, pk), (sv, pv), (sg, pg), (sK, pK), (sV, pV), (so, po) = (
        _operand(x, heads) for x in (q, k, v, gate, K0, V0, out))
    sizes = (K_final.shape[0], heads, T, d, S, fused_span(T), int(q.dtype == torch.bfloat16))
    inputs = (pq, sq, pk, sk, pv, sv, pg, sg, _options(gate, gate_logits, q_scale, norm_weight, norm_eps),
              pK, sK, pV, sV, po, so)
    forward = lib.kv_memory_forward_tiles if tiles else lib.kv_memory_forward
    status = forward(*sizes, *inputs, *map(_pointer, (p, checkpoints, reads, rstd)), K_final.data_ptr(),
                     V_final.data_ptr(), torch.get_num_threads())
    assert status == 0, status
    return out, K_final, V_final, p, checkpoints, reads, rstd


@torch.library.custom_op(FORWARD_OP, mutates_args=())
def fused_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, K0: torch.Tensor,
                     V0: torch.Tensor, keep: bool, gate_logits: bool, q_scale: float,
                     norm_weight: torch.Tensor | None, norm_eps: float,
                     tiles: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel's forward (:func:`kv_memory_fused` has the arguments): reads, final key and
    value slots, and what the backward needs: the softmax (with ``tiles``, the chunked form on the
    tiles, the scores before it), checkpoints, and with the norm the raw reads and their rsqrt."""
    return _fused_forward(q, k, v, gate, K0, V0, keep, gate_logits, q_scale, norm_weight, norm_eps, tiles)


@fused_forward_op.register_fake
def _(q, k, v, gate, K0, V0, keep, gate_logits, q_scale, norm_weight, norm_eps, tiles):
    return _fused_shapes(q, gate, K0, keep, norm_weight is not None, tiles)


def _fused_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, K0: torch.Tensor,
                    p: torch.Tensor, checkpoints: torch.Tensor, reads: torch.Tensor,
                    rstd: torch.Tensor, d_out: torch.Tensor, dK_final: torch.Tensor, dV_final: torch.Tensor,
                    gate_logits: bool, q_scale: float, norm_weight: torch.Tensor | None, norm_eps: float,
                    tiles: bool, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                    d_gate: torch.Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's backward into ``dq``, ``dk``, ``dv``, ``d_gate`` (q's and the gate's shapes, any
    strides with unit feature stride); returns the gradients of the initial key and value slots
    and of the norm's weight."""
    T, d = q.shape[-2:]
    rows, S = math.prod(q.shape[:-2]), gate.shape[-1]
    _check_operands(q, k, v, gate, K0, K0, norm_weight, tiles)
    if d_out.shape != q.shape or dK_final.shape != (rows, S, d) or dV_final.shape != (rows, S, d):
        raise ValueError(f"gam::kv_memory_fused_backward: the gradients must be q's shape and (rows, S, d) = "
                         f"{(rows, S, d)}: {tuple(d_out.shape)}, {tuple(dK_final.shape)}, {tuple(dV_final.shape)}")
    if any(x.shape != y.shape or x.dtype != y.dtype or x.stride(-1) != 1
           for x, y in ((dq, q), (dk, k), (dv, v), (d_gate, gate))):
        raise ValueError("gam::kv_memory_fused_backward: the gradients' buffers must be q's and the gate's shapes and "
                         "dtypes, with unit feature stride")
    kept = {"p": (p, (rows, T, S)), "checkpoints": (checkpoints, (rows, -(-T // fused_span(T)), 2, d, S))}
    if norm_weight is not None:
        kept.update(reads=(reads, (rows, T, d)), rstd=(rstd, (rows, T)))
    wrong = [f"{name} {tuple(x.shape)} (wanted {shape})" for name, (x, shape) in kept.items()
             if tuple(x.shape) != shape or x.dtype != torch.float32 or not x.is_contiguous()]
    if wrong:
        raise ValueError("gam::kv_memory_fused_backward: what the forward kept does not match "
                         f"({'tiles' if tiles else 'the recurrence'}): " + ", ".join(wrong))
    lib = _checked_kernel(S)
    dK0, dV0 = (K0.new_empty(K0.shape, dtype=torch.float32) for _ in range(2))
    q, k, v, gate, d_out = _unit_feature_stride(q, k, v, gate, d_out.to(q.dtype))
    dK_final, dV_final = (x.float().contiguous() for x in (dK_final, dV_final))
    norm_weight = None if norm_weight is None else norm_weight.float().contiguous()
    threads = torch.get_num_threads()
    d_norm_weight = q.new_zeros((threads, d) if norm_weight is not None else (0,), dtype=torch.float32)
    heads = _heads(q)
    operands = [_operand(x, heads) for x in (q, k, v, gate, d_out, dq, dk, dv, d_gate)]
    (sq, pq), (sk, pk), (sv, pv), (sg, pg), (sdo, pdo), (sdq, pdq), (sdk, pdk), (sdv, pdv), (sdg, pdg) = operands
    sizes = (rows, heads, T, d, S, fused_span(T), int(q.dtype == torch.bfloat16))
    inputs = (pq, sq, pk, sk, pv, sv, pg, sg, _options(gate, gate_logits, q_scale, norm_weight, norm_eps))
    results = (dK_final.data_ptr(), dV_final.data_ptr(), pdq, sdq, pdk, sdk, pdv, sdv, pdg, sdg,
               _pointer(d_norm_weight), dK0.data_ptr(), dV0.data_ptr(), threads)
    backward = lib.kv_memory_backward_tiles if tiles else lib.kv_memory_backward
    status = backward(*sizes, *inputs, *map(_pointer, (p, checkpoints, reads, rstd)), pdo, sdo, *results)
    assert status == 0, status
    return dK0, dV0, d_norm_weight.sum(0) if norm_weight is not None else d_norm_weight


def _fake_state_grads(q, K0, norm_weight):
    d_state = [K0.new_empty(K0.shape, dtype=torch.float32) for _ in range(2)]
    return (*d_state, q.new_empty(q.shape[-1] if norm_weight is not None else 0, dtype=torch.float32))


@torch.library.custom_op(f"gam::kv_memory_fused_backward_v{OPS_REVISION}", mutates_args=())
def fused_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, K0: torch.Tensor,
                      p: torch.Tensor, checkpoints: torch.Tensor, reads: torch.Tensor, rstd: torch.Tensor,
                      d_out: torch.Tensor, dK_final: torch.Tensor, dV_final: torch.Tensor,
                      gate_logits: bool, q_scale: float, norm_weight: torch.Tensor | None, norm_eps: float,
                      tiles: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel's backward: gradients of q, k, v, the gate, the initial key and value slots
    (``K0``'s shape, fp32; the value slots' like it) and the norm's weight (empty without it).
    What the forward kept: ``p`` (with ``tiles``, the forward's choice, the scores before the
    softmax), ``checkpoints`` and with the norm ``reads`` and ``rstd``."""
    dq, dk, dv, d_gate = (_like(x) for x in (q, k, v, gate))
    state_grads = _fused_backward(q, k, v, gate, K0, p, checkpoints, reads, rstd, d_out, dK_final, dV_final,
                                  gate_logits, q_scale, norm_weight, norm_eps, tiles, dq, dk, dv, d_gate)
    return dq, dk, dv, d_gate, *state_grads


@fused_backward_op.register_fake
def _(q, k, v, gate, K0, p, checkpoints, reads, rstd, d_out, dK_final, dV_final, gate_logits, q_scale, norm_weight,
      norm_eps, tiles):
    return (*(_like(x) for x in (q, k, v, gate)), *_fake_state_grads(q, K0, norm_weight))


@torch.library.custom_op(f"gam::kv_memory_fused_backward_into_v{OPS_REVISION}", mutates_args=("dq", "dv", "d_gate"))
def fused_backward_into_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, K0: torch.Tensor,
                           p: torch.Tensor, checkpoints: torch.Tensor, reads: torch.Tensor, rstd: torch.Tensor,
                           d_out: torch.Tensor, dK_final: torch.Tensor, dV_final: torch.Tensor,
                           gate_logits: bool, q_scale: float, norm_weight: torch.Tensor | None, norm_eps: float,
                           tiles: bool, dq: torch.Tensor, dv: torch.Tensor,
                           d_gate: torch.Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`fused_backward_op` writing the gradients of q, v and the gate into the given
    buffers (views of a caller's larger one: the block's mixer has the kernel write them into
    its joined projection gradient, no concatenating copy); returns those of k, the initial
    slots and the norm's weight."""
    return _fused_backward_into(q, k, v, gate, K0, p, checkpoints, reads, rstd, d_out, dK_final, dV_final,
                                gate_logits, q_scale, norm_weight, norm_eps, tiles, dq, dv, d_gate)


def _fused_backward_into(q, k, v, gate, K0, p, checkpoints, reads, rstd, d_out, dK_final, dV_final, gate_logits,
                         q_scale, norm_weight, norm_eps, tiles, dq, dv, d_gate):
    dk = _like(k)
    state_grads = _fused_backward(q, k, v, gate, K0, p, checkpoints, reads, rstd, d_out, dK_final, dV_final,
                                  gate_logits, q_scale, norm_weight, norm_eps, tiles, dq, dk, dv, d_gate)
    return dk, *state_grads


@fused_backward_into_op.register_fake
def _(q, k, v, gate, K0, p, checkpoints, reads, rstd, d_out, dK_final, dV_final, gate_logits, q_scale, norm_weight,
      norm_eps, tiles, dq, dv, d_gate):
    return _like(k), *_fake_state_grads(q, K0, norm_weight)


def fused_forward(*args):
    """:func:`fused_forward_op` for a caller that differentiates it itself (the block's mixer,
    an autograd Function): the op where torch.compile traces (a node of its graph), else its
    function called directly: in eager mode the dispatcher's handling of a custom op cost about
    30 µs a forward and 140 µs a backward writing into given buffers (which it tracks as mutated)
    in the op alone, and a block's forward and backward at one token 0.36 ms (Xeon host,
    docs/kv-memory.md)."""
    return fused_forward_op(*args) if torch.compiler.is_compiling() else _fused_forward(*args)


def fused_backward_into(*args):
    """:func:`fused_backward_into_op` likewise: the op under torch.compile, else its function."""
    return fused_backward_into_op(*args) if torch.compiler.is_compiling() else _fused_backward_into(*args)


def _fused_setup_context(ctx, inputs, output):
    q, k, v, gate, K0, _, keep, ctx.gate_logits, ctx.q_scale, norm_weight, ctx.norm_eps, ctx.tiles = inputs
    ctx.save_for_backward(q, k, v, gate, K0, norm_weight, *output[3:])
    ctx.keep = keep


def _fused_autograd(ctx, d_out, dK_final, dV_final, *_d_kept):
    if not ctx.keep:
        raise RuntimeError("gam::kv_memory_fused ran with keep=False: nothing was kept for a backward")
    q, k, v, gate, K0, norm_weight, p, checkpoints, reads, rstd = ctx.saved_tensors
    rows, S, d = math.prod(q.shape[:-2]), gate.shape[-1], q.shape[-1]
    d_out = torch.zeros_like(q) if d_out is None else d_out
    dK_final, dV_final = (q.new_zeros(rows, S, d, dtype=torch.float32) if x is None else x
                          for x in (dK_final, dV_final))
    *grads, d_norm_weight = fused_backward_op(q, k, v, gate, K0, p, checkpoints, reads, rstd, d_out, dK_final,
                                              dV_final, ctx.gate_logits, ctx.q_scale, norm_weight, ctx.norm_eps,
                                              ctx.tiles)
    return (*grads, None, None, None, None if norm_weight is None else d_norm_weight, None, None)


torch.library.register_autograd(FORWARD_OP, _fused_autograd, setup_context=_fused_setup_context)


def kv_memory_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                    state: State, *, gate_logits: bool = False, q_scale: float = 1.0,
                    norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-5,
                    tiles: bool | None = None) -> tuple[torch.Tensor, State]:
    """:func:`kv_memory_recurrent` (same arguments and results) as the fused CPU kernel
    (:func:`fused_applies` says where it runs). Under autocast, q, k and v are cast to the
    autocast dtype; the final state has the initial state's dtype.

    Three options fold the layer's neighbouring passes into the kernel (all off: the
    recurrence as above): with ``gate_logits`` the fourth argument holds the forget logits
    ``z`` (fp32 or bf16), ``log_alpha = logsigmoid(z)``; ``q_scale`` reads ``q_scale * q``;
    with ``norm_weight`` (d,) each token's read leaves as ``F.rms_norm(read, (d,), norm_weight,
    norm_eps)`` (computed from the fp32 read, before any rounding to bf16).

    The recurrence as one C kernel per pass, registered as the custom ops
    ``gam::kv_memory_fused_v2`` and ``gam::kv_memory_fused_backward_v2`` (:data:`OPS_REVISION`; so that ``torch.compile``
    keeps them whole in its graph, and autograd runs the second for the first): q, k, v
    (rows, T, d) in fp32 or bf16 alike and ``log_alpha`` (rows, T, S, fp32); or all four
    (B, H, T, X) views of any strides with unit feature stride (rows = B H, head-major: the
    heads of a (B, T, H X) projection without copies); the initial key and value slots
    (rows, S, d), or (B, H, S, d) views (a bank shared by the batch: an expanded view, read in
    place). Returns the reads (rows, T, d; for views, (B, H, T, d) over (B, T, H, d) memory, so
    that the heads concatenate without a copy) in q's dtype and the final slots (rows, S, d);
    the op also returns what the backward needs: the softmax of every token (rows, T, S), the
    state every :func:`fused_span` tokens, and with the norm the raw reads and their rsqrt
    (fp32; empty unless a backward can run). The kernel computes the bounded gates' ``alpha``
    and ``1 - alpha`` from ``log_alpha`` (or the logits) as it goes. fp32 arithmetic throughout.

    The backward runs each span forward from its checkpoint twice (the states updated in place,
    for ``dp`` and then ``dq`` and the scores below), then the recurrence in reverse, with ``g``
    the carried gradient of a state: through the read ``o = V_t^T p``,
    ``dp = V_t do``, ``dV_t += p do^T``, ``dz = p (dp - p . dp)``, ``dq = K_t^T dz``,
    ``dK_t += dz q^T``; through the write ``K_t = alpha K_{t-1} + (1 - alpha) k^T``,
    ``dk = dK_t^T (1 - alpha)``, ``d log alpha = alpha (dK_t . (K_{t-1} - k) + ...)``
    per slot, which is ``dK_t . (K_t - k) + dV_t . (V_t - v)`` (as ``1 - alpha`` and ``alpha`` sum
    to one; no earlier state needed), taken as ``Z_t - R_t`` with ``R_t = dK_t . k + dV_t . v``
    (swept with the gradients) and ``Z_t = dK_t . K_t + dV_t . V_t``, which runs back as
    ``Z_{t-1} = Z_t - (1 - alpha_t) R_t + F_{t-1}``, ``F = p * dp + dz * (K q)`` (what a read
    adds to the gradients, against its state), from its value at the span's end: no state is
    kept per token. ``dK_{t-1} = alpha dK_t`` (and the same for V); for
    logits, ``dz = d log alpha * sigmoid(-z) = d log alpha * (1 - alpha)``; through the norm
    the usual RMSNorm backward per token."""
    dtype = compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        gate = log_alpha if gate_logits and log_alpha.dtype in (torch.float32, torch.bfloat16) else log_alpha.float()
        K0, V0 = state
        inputs = (q, k, v, gate, K0, V0, norm_weight)
        keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
        out, K, V, *_ = fused_forward_op(q, k, v, gate, K0.float(), V0.float(), keep, gate_logits, q_scale,
                                         norm_weight, norm_eps, tiles_apply(q) if tiles is None else tiles)
    return out, (K.to(K0.dtype), V.to(V0.dtype))


def _unit_feature_stride(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [x if x.stride(-1) == 1 else x.contiguous() for x in tensors]


def kv_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
              state: State, chunk_size: int | None = None) -> tuple[torch.Tensor, State]:
    """The kv-slot memory's training form for these inputs: :func:`kv_memory_fused` where
    :func:`fused_applies`, else :func:`kv_memory_chunked` (GPUs, fp16, ``torch.compile``,
    no C compiler). Same arguments and results as :func:`kv_memory_recurrent`; q, k, v and
    ``log_alpha`` may also be (B, H, T, X) views (the reads then (B, H, T, d)): the kernel
    reads them in place, the chunked form from copies."""
    if fused_applies(q, log_alpha.shape[-1]):
        return kv_memory_fused(q, k, v, log_alpha, state)
    if q.dim() == 4:
        B, H = q.shape[:2]
        rows = [x.reshape(B * H, *x.shape[2:]) for x in (q, k, v, log_alpha)]
        out, final = kv_memory_chunked(*rows, state, chunk_size)
        return out.view(B, H, *out.shape[1:]), final
    return kv_memory_chunked(q, k, v, log_alpha, state, chunk_size)
