"""Selective scan (Mamba-1 SSM) in pure PyTorch, plus dispatch to mamba-ssm's CUDA kernel.

Argument layout follows ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``::

    u, delta : (batch, d_inner, L)      z : (batch, d_inner, L) or None
    A        : (d_inner, d_state)       D, delta_bias : (d_inner,) or None
    B, C     : (batch, d_state, L)

    delta <- softplus(delta + delta_bias)            (each step optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (h: (batch, d_inner, d_state))
    y_t    = <C_t, h_t> + D * u_t ;   out = y * silu(z)

Everything is computed in fp32 (autocast is disabled inside) and the output is returned in
``u.dtype``; the optional last state is fp32, as in mamba-ssm.

Functions
---------
``selective_scan_ref``  sequential loop over time steps; the oracle for tests.
``selective_scan_fn``   fast pure-PyTorch path (CPU, or GPU without mamba-ssm).
``selective_scan``      dispatcher: mamba-ssm CUDA kernel when available and on CUDA, else
                        ``selective_scan_fn`` (``backend`` = "auto" | "torch" | "cuda").

How ``selective_scan_fn`` works
-------------------------------
One ``torch.autograd.Function`` covers the whole scan (u, delta, A, B, C -> y, last state); the
D skip term, ``delta_bias``/softplus and the ``silu(z)`` gate are ordinary autograd ops around it.
Time is cut into *blocks* (``block_size`` steps) processed one after another with the state
carried between them, so the (block, batch, d_inner, d_state) work buffers stay bounded. Inside a
block the linear recurrence h_t = a_t h_{t-1} + b_t is solved by a two-level chunked scan: the
block is split into ``nc`` chunks of ``chunk_size`` steps, all chunks advance together in one
vectorised op per in-chunk position (pass 1 gives each chunk's end state from a zero start), a
short loop over chunks propagates the true carries (using the chunk decay products, computed as
products of the a_t, never divided), and pass 2 redoes the in-chunk scan in place from the right
carries. A block of S steps thus takes about 2*chunk + S/chunk (~3*sqrt(S)) vectorised ops
instead of S, and no division by cumulative decays (which underflow) ever happens.

The forward saves only its inputs and one (batch, d_inner, d_state) state per block; the
hand-written backward recomputes a block's states from that and runs the reverse recurrence
G_t = dL/dy_t C_t + a_{t+1} G_{t+1} with the same two-level scheme, then
dB, dC, du, ddelta, dA by batched matmuls. Activation memory is therefore O(batch*d_inner*L)
rather than the O(batch*d_inner*d_state*L) of autograd through an unrolled or parallel scan.

Measured (``python benchmarks/bench_selective_scan.py --lengths 256 1024 --threads 2``:
2-core CPU, fp32, forward+backward, batch 8, d_inner 1536, d_state 16; medians of 5 runs,
2 for the sequential reference):

    L       selective_scan_fn   selective_scan_ref   Hillis-Steele scan (autograd)
    256         0.47 s              1.77 s               18.9 s
    1024        2.02 s             12.20 s               (not run: > 1 min per call)
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "selective_scan_ref",
    "selective_scan_fn",
    "selective_scan",
    "mamba_ssm_selective_scan_fn",
    "has_mamba_ssm",
    "set_workspace_cache",
    "clear_workspace",
]


def _no_autocast(device_type: str):
    """Context that disables autocast for ``device_type`` (scan math must run in fp32)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except Exception:  # pragma: no cover - device types without autocast support
        return contextlib.nullcontext()


def _check_shapes(u, delta, A, B, C):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, d_inner, L); got {tuple(u.shape)}, {tuple(delta.shape)}")
    batch, dim, L = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (d_inner, d_state) = ({dim}, N); got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported (Mamba-1 with real A only)")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, n, L):
            raise ValueError(f"{name} must be (batch, d_state, L) = ({batch}, {n}, {L}); got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------
# Reference (oracle)
# ----------------------------------------------------------------------------------------------
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Plain sequential selective scan, one Python iteration per time step (the test oracle)."""
    _check_shapes(u, delta, A, B, C)
    dtype_in = u.dtype
    with _no_autocast(u.device.type):
        u = u.float()
        delta = delta.float()
        if delta_bias is not None:
            delta = delta + delta_bias.float()[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        A, B, C = A.float(), B.float(), C.float()
        batch, dim, L = u.shape
        # time-major (L, b, d, n) so that each step reads contiguous slices; unbind (not
        # indexing) so that autograd does not build a full-size zero gradient per step
        dT = delta.permute(2, 0, 1)                                            # (L, b, d)
        dA = torch.exp(dT.unsqueeze(-1) * A).unbind(0)                         # L x (b, d, n)
        dBu = ((dT * u.permute(2, 0, 1)).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2)).unbind(0)
        Cs = C.permute(2, 0, 1).unbind(0)                                      # L x (b, n)
        h = u.new_zeros(batch, dim, A.shape[1])
        ys = []
        for t in range(L):
            h = dA[t] * h + dBu[t]
            ys.append(torch.einsum("bdn,bn->bd", h, Cs[t]))
        y = torch.stack(ys, dim=-1) if L > 0 else u.new_zeros(batch, dim, 0)
        if D is not None:
            y = y + u * D.float()[:, None]
        if z is not None:
            y = y * F.silu(z.float())
        out = y.to(dtype_in)
    return (out, h) if return_last_state else out


# ----------------------------------------------------------------------------------------------
# Two-level chunked linear recurrence on time-major buffers (first dim = time), in place
# ----------------------------------------------------------------------------------------------
def _scan_forward_(a: torch.Tensor, h: torch.Tensor, h0: Optional[torch.Tensor], chunk: int) -> torch.Tensor:
    """In place: ``h`` holds b_t on entry and h_t = a_t * h_{t-1} + b_t on exit (h_{-1} = h0 or 0).

    Returns the last state (a view of ``h``).
    """
    S = a.shape[0]
    nc = S // chunk
    if nc < 2:  # short block: at most 2*chunk-1 steps, a plain loop is cheapest
        if h0 is not None:
            h[0].addcmul_(a[0], h0)
        for t in range(1, S):
            h[t].addcmul_(a[t], h[t - 1])
        return h[S - 1]
    main = nc * chunk
    av = a[:main].unflatten(0, (nc, chunk))
    hv = h[:main].unflatten(0, (nc, chunk))
    # pass 1: every chunk's end state from a zero start, all chunks at once
    e = hv[:, 0].clone()
    for t in range(1, chunk):
        torch.addcmul(hv[:, t], av[:, t], e, out=e)
    p = av.prod(dim=1)  # chunk decay products (products of a_t in (0, 1], never divided)
    # carries: state entering each chunk
    carry = torch.empty_like(e)
    if h0 is None:
        carry[0].zero_()
    else:
        carry[0].copy_(h0)
    for c in range(1, nc):
        torch.addcmul(e[c - 1], p[c - 1], carry[c - 1], out=carry[c])
    # pass 2: in-place scan of every chunk from its true carry
    hv[:, 0].addcmul_(av[:, 0], carry)
    for t in range(1, chunk):
        hv[:, t].addcmul_(av[:, t], hv[:, t - 1])
    for t in range(main, S):  # ragged tail (< chunk steps)
        h[t].addcmul_(a[t], h[t - 1])
    return h[S - 1]


def _scan_backward_(a: torch.Tensor, g: torch.Tensor, K: Optional[torch.Tensor], chunk: int) -> torch.Tensor:
    """In place reverse recurrence: ``g`` holds g_t on entry and G_t on exit, where
    G_t = g_t + a_{t+1} G_{t+1} and G_{S-1} = g_{S-1} + K (K = a_S G_S from the following block).

    Returns a_0 * G_0, the K of the preceding block.
    """
    S = a.shape[0]
    nc = S // chunk
    if nc < 2:
        if K is not None:
            g[S - 1].add_(K)
        for t in range(S - 2, -1, -1):
            g[t].addcmul_(a[t + 1], g[t + 1])
        return a[0] * g[0]
    main = nc * chunk
    if main < S:  # ragged tail first (it is the latest in time)
        if K is not None:
            g[S - 1].add_(K)
        for t in range(S - 2, main - 1, -1):
            g[t].addcmul_(a[t + 1], g[t + 1])
        K = a[main] * g[main]
    av = a[:main].unflatten(0, (nc, chunk))
    gv = g[:main].unflatten(0, (nc, chunk))
    # pass 1: every chunk's first G from a zero carry
    f = gv[:, chunk - 1].clone()
    for t in range(chunk - 2, -1, -1):
        torch.addcmul(gv[:, t], av[:, t + 1], f, out=f)
    q = av[:, 1:].prod(dim=1)  # prod_{r=1}^{chunk-1} a[c, r]
    # carries: Kin[c] is added to G[c, chunk-1]
    kin = torch.empty_like(f)
    if K is None:
        kin[nc - 1].zero_()
    else:
        kin[nc - 1].copy_(K)
    for c in range(nc - 1, 0, -1):
        torch.addcmul(f[c], q[c], kin[c], out=kin[c - 1]).mul_(av[c, 0])
    # pass 2
    gv[:, chunk - 1].add_(kin)
    for t in range(chunk - 2, -1, -1):
        gv[:, t].addcmul_(av[:, t + 1], gv[:, t + 1])
    return a[0] * g[0]


def _auto_chunk(S: int) -> int:
    # about 2*chunk + 2*S/chunk sequential ops per block -> chunk ~ sqrt(S), a power of two
    return max(4, 1 << int(round(math.log2(max(1.0, math.sqrt(S))))))


def _auto_block(L: int, state_elems: int, device_type: str = "cpu") -> int:
    # Work buffers are (block, batch, d_state, d_inner) fp32, at most ~2**25 elements (128 MiB)
    # each on CPU (2**27 on GPUs, where fewer, larger ops matter more); a power of two so that
    # it splits into whole chunks.
    budget = 1 << (25 if device_type == "cpu" else 27)
    S = budget // max(1, state_elems)
    S = 1 << max(5, int(math.floor(math.log2(max(1, S)))))
    return max(1, min(L, S))


_WORKSPACE = threading.local()
_WORKSPACE_CACHE = True


def set_workspace_cache(enabled: bool) -> None:
    """Keep (default) or drop the per-thread CPU work buffer of ``selective_scan_fn`` between calls.

    The CPU path needs up to 3 buffers of (block, batch, d_state, d_inner) fp32 (at most ~128 MiB
    each). Freshly allocated memory of that size comes from mmap and pays a page fault per 4 KiB
    on first touch, which costs as much as the scan's own arithmetic, so the buffer is kept and
    reused (one per thread; CUDA has its caching allocator and never uses this).
    """
    global _WORKSPACE_CACHE
    _WORKSPACE_CACHE = bool(enabled)
    if not enabled:
        clear_workspace()


def clear_workspace() -> None:
    """Free this thread's cached CPU work buffer."""
    _WORKSPACE.buf = None


def _work_buffers(like: torch.Tensor, count: int, shape):
    numel = math.prod(shape)
    if like.device.type != "cpu" or not _WORKSPACE_CACHE:
        return [like.new_empty(shape) for _ in range(count)]
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.dtype != like.dtype or buf.numel() < 3 * numel:
        _WORKSPACE.buf = None
        buf = like.new_empty(3 * numel)  # room for the backward's 3 buffers from the first call
        _WORKSPACE.buf = buf
    return [buf[i * numel:(i + 1) * numel].view(shape) for i in range(count)]


def _time_major(x: torch.Tensor) -> torch.Tensor:
    """(..., L) -> contiguous (L, ...), as one 2-D transpose (ATen's blocked transpose-copy path,
    several times faster than copying a 3-D permutation)."""
    L = x.shape[-1]
    return x.reshape(-1, L).t().contiguous().view(L, *x.shape[:-1])


def _from_time_major(x: torch.Tensor) -> torch.Tensor:
    """(L, ...) -> contiguous (..., L)."""
    L = x.shape[0]
    return x.reshape(L, -1).t().contiguous().view(*x.shape[1:], L)


class _SelectiveScanTorch(torch.autograd.Function):
    """y[b, d, t] = sum_n C[b, n, t] h_t[b, d, n] with the recurrence of the module docstring (no
    bias/softplus/D/z here). Inputs fp32 contiguous; u, delta (b, d, L); A (d, n); B, C (b, n, L).

    Internally time-major with d_inner innermost: work buffers are (block, b, n, d), so that every
    elementwise op has long contiguous inner loops and the contractions are plain bmm's.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk_size, block_size):
        batch, dim, L = u.shape
        n = A.shape[1]
        S = block_size or _auto_block(L, batch * dim * n, u.device.type)
        S = max(1, min(S, L))
        chunk = chunk_size or _auto_chunk(S)
        with _no_autocast(u.device.type):
            AT = A.t().contiguous()                                             # (n, d)
            dT = _time_major(delta)                                             # (L, b, d)
            duT = _time_major(u) * dT  # (not in place: for L == 1 the "copy" is a view of u)
            BT = _time_major(B)                                                 # (L, b, n)
            CT = _time_major(C)
            yT = u.new_empty(L, batch, dim)
            a_buf, h_buf = _work_buffers(u, 2, (S, batch, n, dim))
            starts = []
            h0 = None
            for s in range(0, L, S):
                e = min(L, s + S)
                St = e - s
                SB = St * batch
                a = a_buf[:St]
                h = h_buf[:St]
                torch.mul(dT[s:e].unsqueeze(2), AT, out=a).exp_()               # a_t = exp(delta_t A)
                torch.mul(duT[s:e].unsqueeze(2), BT[s:e].unsqueeze(3), out=h)   # b_t = delta_t u_t B_t
                starts.append(h0)
                last = _scan_forward_(a, h, h0, chunk)
                torch.bmm(CT[s:e].view(SB, 1, n), h.view(SB, n, dim), out=yT[s:e].view(SB, 1, dim))
                h0 = last.clone()
        saved = [x if x is not None else u.new_empty(0) for x in starts]
        ctx.save_for_backward(u, delta, A, B, C, *saved)
        ctx.cfg = (S, chunk)
        ctx.set_materialize_grads(False)
        return _from_time_major(yT), h0.transpose(1, 2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, glast):
        u, delta, A, B, C, *starts = ctx.saved_tensors
        S, chunk = ctx.cfg
        batch, dim, L = u.shape
        n = A.shape[1]
        with _no_autocast(u.device.type):
            AT = A.t().contiguous()
            dT = _time_major(delta)                                             # (L, b, d)
            uT = _time_major(u)
            duT = dT * uT
            BT = _time_major(B)                                                 # (L, b, n)
            CT = _time_major(C)
            gyT = None if gy is None else _time_major(gy.float())
            guT = u.new_empty(L, batch, dim)
            gdT = u.new_empty(L, batch, dim)
            gBT = u.new_empty(L, batch, n)
            gCT = u.new_empty(L, batch, n)
            gAT = torch.zeros_like(AT)
            K = None if glast is None else glast.float().transpose(1, 2).contiguous()
            a_buf, h_buf, g_buf = _work_buffers(u, 3, (S, batch, n, dim))
            blocks = list(range(0, L, S))
            for k in range(len(blocks) - 1, -1, -1):
                s = blocks[k]
                e = min(L, s + S)
                St = e - s
                SB = St * batch
                h0 = starts[k] if starts[k].numel() else None
                dl, du, Bt = dT[s:e], duT[s:e], BT[s:e]
                a = a_buf[:St]
                h = h_buf[:St]
                g = g_buf[:St]
                torch.mul(dl.unsqueeze(2), AT, out=a).exp_()
                torch.mul(du.unsqueeze(2), Bt.unsqueeze(3), out=h)
                _scan_forward_(a, h, h0, chunk)                                 # recompute h_t
                if gyT is None:
                    gyb = u.new_zeros(St, batch, dim)
                    g.zero_()
                else:
                    gyb = gyT[s:e]
                    torch.mul(gyb.unsqueeze(2), CT[s:e].unsqueeze(3), out=g)    # dL/dh_t (direct)
                K = _scan_backward_(a, g, K, chunk)                             # g <- G_t = dL/dh_t
                hv = h.view(SB, n, dim)
                gv = g.view(SB, n, dim)
                # (1 x d) @ (d x n) with the (n, d) buffers transposed: far faster than (n x d) @ (d x 1)
                torch.bmm(gyb.reshape(SB, 1, dim), hv.transpose(1, 2), out=gCT[s:e].view(SB, 1, n))
                torch.bmm(du.view(SB, 1, dim), gv.transpose(1, 2), out=gBT[s:e].view(SB, 1, n))
                gdu = torch.bmm(Bt.view(SB, 1, n), gv).view(St, batch, dim)
                # W_t = G_t * a_t * h_{t-1} = dL/d(delta_t A), built in a's buffer
                a.mul_(g)
                if St > 1:
                    a[1:].mul_(h[:-1])
                if h0 is not None:
                    a[0].mul_(h0)
                else:
                    a[0].zero_()
                gd = torch.mul(a, AT, out=g).sum(2)                             # sum_n W A
                gAT += torch.mul(a, dl.unsqueeze(2), out=h).view(SB, n * dim).sum(0).view(n, dim)
                torch.addcmul(gd, gdu, uT[s:e], out=gdT[s:e])
                torch.mul(gdu, dl, out=guT[s:e])
        return (_from_time_major(guT), _from_time_major(gdT), gAT.t(),
                _from_time_major(gBT), _from_time_major(gCT), None, None)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, chunk_size: Optional[int] = None,
                      block_size: Optional[int] = None):
    """Fast pure-PyTorch selective scan; same signature/semantics as mamba-ssm's ``selective_scan_fn``.

    ``chunk_size``/``block_size`` are tuning knobs (defaults: automatic). Works on any device.
    """
    _check_shapes(u, delta, A, B, C)
    for name, v in (("chunk_size", chunk_size), ("block_size", block_size)):
        if v is not None and int(v) < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    dtype_in = u.dtype
    with _no_autocast(u.device.type):
        u32 = u.float()
        d32 = delta.float()
        if delta_bias is not None:
            d32 = d32 + delta_bias.float()[:, None]
        if delta_softplus:
            d32 = F.softplus(d32)
        if u.shape[-1] == 0:
            y = u32.new_zeros(u32.shape)
            last = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        else:
            y, last = _SelectiveScanTorch.apply(u32.contiguous(), d32.contiguous(), A.float().contiguous(),
                                                B.float().contiguous(), C.float().contiguous(),
                                                chunk_size, block_size)
        if D is not None:
            y = y + u32 * D.float()[:, None]
        if z is not None:
            y = y * F.silu(z.float())
        out = y.to(dtype_in)
    return (out, last) if return_last_state else out


# ----------------------------------------------------------------------------------------------
# mamba-ssm dispatch
# ----------------------------------------------------------------------------------------------
_MAMBA_SSM_FN = None
_MAMBA_SSM_ERR: Optional[BaseException] = None
_MAMBA_SSM_TRIED = False


def mamba_ssm_selective_scan_fn():
    """mamba-ssm's CUDA ``selective_scan_fn`` or None (import attempted once, lazily)."""
    global _MAMBA_SSM_FN, _MAMBA_SSM_ERR, _MAMBA_SSM_TRIED
    if not _MAMBA_SSM_TRIED:
        _MAMBA_SSM_TRIED = True
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn  # type: ignore
            _MAMBA_SSM_FN = fn
        except Exception as err:  # ImportError, missing CUDA libs, ABI mismatch, ...
            _MAMBA_SSM_ERR = err
    return _MAMBA_SSM_FN


def has_mamba_ssm() -> bool:
    return mamba_ssm_selective_scan_fn() is not None


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str = "auto"):
    """Dispatch: ``"auto"`` uses mamba-ssm's kernel for CUDA tensors when it imports, else the
    pure-PyTorch ``selective_scan_fn``; ``"torch"`` forces the latter; ``"cuda"`` requires mamba-ssm."""
    if backend not in ("auto", "torch", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {backend!r}")
    if backend == "cuda" or (backend == "auto" and u.is_cuda):
        fn = mamba_ssm_selective_scan_fn()
        if fn is None and backend == "cuda":
            raise RuntimeError("backend='cuda' needs mamba-ssm (pip install mamba-ssm causal-conv1d), "
                               f"which failed to import: {_MAMBA_SSM_ERR!r}")
        if fn is not None:
            if not u.is_cuda:
                raise RuntimeError("backend='cuda' (mamba-ssm) needs CUDA tensors; use backend='torch' on CPU")
            return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
