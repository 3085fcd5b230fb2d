"""Triton kernels for GAM's memory read ``softmax(h Mᵀ) M`` on CUDA (forward + backward).

Imported lazily by :func:`gam.ops.memory_read.memory_read`; importing this
module never fails: without Triton (or without a CUDA device)
:func:`available` is False and the chunked PyTorch path is used instead.

Kernels (h: N x C, M: S x C, both in the compute dtype; fp32 accumulation):

- ``_fwd_kernel``, one program per BLOCK_N rows: loops over slot blocks with
  an online softmax (as flash-attention), ``acc += p @ M_blk``; writes the
  output and the row log-sum-exp (N floats, all that is kept besides the
  inputs and the output). The (N, S) scores never exist in global memory.
- ``_bwd_dh_kernel``, one program per BLOCK_N rows: recomputes
  ``p = exp(h M_blkᵀ - lse)``, ``dp = dout M_blkᵀ``,
  ``ds = p (dp - delta)`` with ``delta = rowsum(dout * out)`` and accumulates
  ``dh = ds M``; writes delta for the next kernel.
- ``_bwd_dm_kernel``, one program per (slot block, row segment): recomputes
  p and ds for its slots over its rows and accumulates both contributions to
  the memory bank's gradient, ``pᵀ dout`` (M as values) + ``dsᵀ h`` (M as
  keys), into a per-segment fp32 partial; the partials are summed after.

fp32 inputs use IEEE fp32 dot products (no TF32), so fp32 results match the
reference to ~1e-6. Widths up to C = 1024 (padded to a power of two) and any
number of slots are supported (:func:`supports`). Each kernel has a short list
of launch configurations, from fast to lean in shared memory (``_CONFIGS``);
one the GPU cannot hold is skipped at launch.

Status: correct on an H100 (``tests/test_fast_path.py`` compares forward and
both gradients with the reference in fp32, bf16 and fp16 at ragged sizes
wherever CUDA and Triton exist; CI runs the kernels in Triton's CPU
interpreter, ``TRITON_INTERPRET=1``, in fp32 and fp16), but slower than the
cuBLAS reference there (bf16: 0.3-0.7x; fp32: 0.02-0.03x, IEEE dots on CUDA
cores; ``benchmarks/bench_memory_read.py``), so :func:`gam.ops.memory_read.memory_read`
uses them only when asked (``backend="triton"``). Their one advantage is
memory: no (N, slots) scores at all. A fast version would tile C too (a
512-wide row block does not fit a tensor-core tile's registers).
"""

from __future__ import annotations

import torch

try:  # pragma: no cover - depends on the machine
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - ImportError, or a broken triton install
    triton = None
    tl = None
    HAVE_TRITON = False

MAX_WIDTH = 1024


def available() -> bool:
    """Triton is importable and a CUDA device exists."""
    return HAVE_TRITON and torch.cuda.is_available()


def supports(h: torch.Tensor, memory_bank: torch.Tensor) -> bool:
    return (available() and h.is_cuda and memory_bank.is_cuda and h.shape[-1] <= MAX_WIDTH
            and h.dtype in (torch.float32, torch.float16, torch.bfloat16))


if HAVE_TRITON:  # pragma: no cover - needs a GPU
    import inspect

    try:
        _HAS_INPUT_PRECISION = "input_precision" in inspect.signature(tl.dot).parameters
    except (TypeError, ValueError):
        _HAS_INPUT_PRECISION = True

    if _HAS_INPUT_PRECISION:
        @triton.jit
        def _dot(a, b, IEEE: tl.constexpr):
            if IEEE:
                r = tl.dot(a, b, input_precision="ieee")
            else:
                r = tl.dot(a, b)
            return r
    else:
        @triton.jit
        def _dot(a, b, IEEE: tl.constexpr):
            if IEEE:
                r = tl.dot(a, b, allow_tf32=False)
            else:
                r = tl.dot(a, b)
            return r

    @triton.jit
    def _fwd_kernel(H, M, OUT, LSE, N, S, C, stride_h, stride_m, stride_o,
                    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                    IEEE: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < N
        cmask = cols < C
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            slots = s0 + tl.arange(0, BLOCK_S)
            smask = slots < S
            mt = tl.load(M + slots[:, None] * stride_m + cols[None, :],
                         mask=smask[:, None] & cmask[None, :], other=0.0)
            sc = _dot(h, tl.trans(mt), IEEE)                     # (BLOCK_N, BLOCK_S) fp32
            sc = tl.where(smask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(mt.dtype), mt, IEEE)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(OUT + rows[:, None] * stride_o + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
        tl.store(LSE + rows, m_i + tl.log(l_i), mask=rmask)

    @triton.jit
    def _bwd_dh_kernel(H, M, OUT, DOUT, LSE, DH, DELTA, N, S, C, stride_h, stride_m, stride_o,
                       stride_do, stride_dh,
                       BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                       IEEE: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < N
        cmask = cols < C
        mask2 = rmask[:, None] & cmask[None, :]
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask2, other=0.0)
        do = tl.load(DOUT + rows[:, None] * stride_do + cols[None, :], mask=mask2, other=0.0)
        o = tl.load(OUT + rows[:, None] * stride_o + cols[None, :], mask=mask2, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dP * P)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        dh = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            slots = s0 + tl.arange(0, BLOCK_S)
            smask = slots < S
            mt = tl.load(M + slots[:, None] * stride_m + cols[None, :],
                         mask=smask[:, None] & cmask[None, :], other=0.0)
            sc = _dot(h, tl.trans(mt), IEEE)
            p = tl.exp(sc - lse[:, None])
            p = tl.where(smask[None, :] & rmask[:, None], p, 0.0)
            dp = _dot(do, tl.trans(mt), IEEE)
            ds = p * (dp - delta[:, None])
            dh += _dot(ds.to(mt.dtype), mt, IEEE)
        tl.store(DH + rows[:, None] * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask2)
        tl.store(DELTA + rows, delta, mask=rmask)

    @triton.jit
    def _bwd_dm_kernel(H, M, DOUT, LSE, DELTA, PART, N, S, C, rows_per_seg,
                       stride_h, stride_m, stride_do, stride_pr, stride_ps,
                       BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                       IEEE: tl.constexpr):
        sb = tl.program_id(0)
        seg = tl.program_id(1)
        slots = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.arange(0, BLOCK_C)
        smask = slots < S
        cmask = cols < C
        mt = tl.load(M + slots[:, None] * stride_m + cols[None, :],
                     mask=smask[:, None] & cmask[None, :], other=0.0)
        acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        row_start = seg * rows_per_seg
        row_end = tl.minimum(row_start + rows_per_seg, N)
        for n0 in range(row_start, row_end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            rmask = rows < row_end
            mask2 = rmask[:, None] & cmask[None, :]
            h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask2, other=0.0)
            do = tl.load(DOUT + rows[:, None] * stride_do + cols[None, :], mask=mask2, other=0.0)
            lse = tl.load(LSE + rows, mask=rmask, other=0.0)
            delta = tl.load(DELTA + rows, mask=rmask, other=0.0)
            sc = _dot(h, tl.trans(mt), IEEE)                     # (BLOCK_N, BLOCK_S)
            p = tl.exp(sc - lse[:, None])
            p = tl.where(rmask[:, None] & smask[None, :], p, 0.0)
            dp = _dot(do, tl.trans(mt), IEEE)
            ds = p * (dp - delta[:, None])
            acc += _dot(tl.trans(p.to(h.dtype)), do, IEEE)     # M as values
            acc += _dot(tl.trans(ds.to(h.dtype)), h, IEEE)     # M as keys
        tl.store(PART + seg * stride_pr + slots[:, None] * stride_ps + cols[None, :], acc,
                 mask=smask[:, None] & cmask[None, :])


# Launch configurations (BLOCK_N, BLOCK_S, num_warps, num_stages), tried in
# order: the first is the fast one for 16-bit inputs at C <= 512; the next ones
# need less shared memory (fp32 operands take twice the bytes: at C = 512 the
# first dM configuration asks for 292 KiB with 3 stages, over an H100's 227).
# A launch that Triton refuses for want of resources moves on to the next one,
# and the one that worked is remembered per (kernel, device, dtype, width).
_CONFIGS = {
    "fwd": ((16, 32, 4, 3), (16, 32, 4, 1), (16, 16, 4, 1)),
    "dh": ((16, 32, 4, 3), (16, 32, 4, 1), (16, 16, 4, 1)),
    "dm": ((32, 16, 8, 3), (32, 16, 8, 1), (16, 16, 4, 1)),
}
_CHOSEN: dict = {}


def _launch(kind: str, key: tuple, launch) -> None:
    """Call ``launch(BLOCK_N, BLOCK_S, num_warps, num_stages)`` with the first
    configuration of ``kind`` that the GPU has the resources for."""
    from triton.runtime.errors import OutOfResources

    configs = _CONFIGS[kind]
    key = (kind, configs, *key)
    first = _CHOSEN.get(key, 0)
    for i in range(first, len(configs)):
        try:
            launch(*configs[i])
        except OutOfResources:
            if i == len(configs) - 1:
                raise
            continue
        _CHOSEN[key] = i
        return


def _block_c(C: int) -> int:
    return max(16, 1 << (C - 1).bit_length())


class TritonMemoryRead(torch.autograd.Function):
    """``softmax(h Mᵀ) M`` for (N, C) ``h`` in the compute dtype; see the module doc."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, memory_bank: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        dtype = h.dtype
        h = h.contiguous()
        M = memory_bank.to(dtype).contiguous()
        N, C = h.shape
        S = M.shape[0]
        out = torch.empty(N, C, dtype=dtype, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        ieee = dtype == torch.float32
        BC = _block_c(C)
        if N > 0:
            def launch(bn, bs, warps, stages):
                _fwd_kernel[(triton.cdiv(N, bn),)](
                    h, M, out, lse, N, S, C, h.stride(0), M.stride(0), out.stride(0),
                    BLOCK_N=bn, BLOCK_S=bs, BLOCK_C=BC, IEEE=ieee, num_warps=warps, num_stages=stages)

            _launch("fwd", (h.device, dtype, BC), launch)
        ctx.save_for_backward(h, memory_bank, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # pragma: no cover
        h, memory_bank, out, lse = ctx.saved_tensors
        dtype = h.dtype
        M = memory_bank.to(dtype).contiguous()
        dout = dout.to(dtype).contiguous()
        N, C = h.shape
        S = M.shape[0]
        ieee = dtype == torch.float32
        BC = _block_c(C)
        dh = torch.empty_like(h)
        delta = torch.empty(N, dtype=torch.float32, device=h.device)
        if N == 0:
            return dh, torch.zeros_like(memory_bank)

        def launch_dh(bn, bs, warps, stages):
            _bwd_dh_kernel[(triton.cdiv(N, bn),)](
                h, M, out, dout, lse, dh, delta, N, S, C, h.stride(0), M.stride(0), out.stride(0),
                dout.stride(0), dh.stride(0), BLOCK_N=bn, BLOCK_S=bs, BLOCK_C=BC, IEEE=ieee,
                num_warps=warps, num_stages=stages)

        _launch("dh", (h.device, dtype, BC), launch_dh)
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 8
        result = {}

        def launch_dm(bn, bs, warps, stages):
            # rows split into segments so that slot blocks x segments fill the GPU;
            # each segment writes an fp32 partial of dM, summed afterwards
            slot_blocks = triton.cdiv(S, bs)
            segments = max(1, min(triton.cdiv(N, bn), triton.cdiv(2 * sms, slot_blocks)))
            rows_per_seg = triton.cdiv(triton.cdiv(N, segments), bn) * bn
            segments = triton.cdiv(N, rows_per_seg)
            part = torch.empty(segments, S, C, dtype=torch.float32, device=h.device)
            _bwd_dm_kernel[(slot_blocks, segments)](
                h, M, dout, lse, delta, part, N, S, C, rows_per_seg, h.stride(0), M.stride(0),
                dout.stride(0), part.stride(0), part.stride(1), BLOCK_N=bn, BLOCK_S=bs, BLOCK_C=BC,
                IEEE=ieee, num_warps=warps, num_stages=stages)
            result["part"] = part

        _launch("dm", (h.device, dtype, BC), launch_dm)
        part = result["part"]
        dM = part.sum(0) if part.shape[0] > 1 else part[0]
        return dh, dM.to(memory_bank.dtype)


def memory_read_triton(h: torch.Tensor, memory_bank: torch.Tensor) -> torch.Tensor:
    """Fused memory read on CUDA; ``h`` (..., C) in the compute dtype, output in it too."""
    if not HAVE_TRITON:
        raise RuntimeError("memory_read_triton needs the triton package")
    if not supports(h, memory_bank):
        raise RuntimeError(f"memory_read_triton: unsupported input ({h.device}, {h.dtype}, width {h.shape[-1]})")
    shape = h.shape
    with torch.autocast("cuda", enabled=False):
        out = TritonMemoryRead.apply(h.reshape(-1, shape[-1]), memory_bank)
    return out.view(*shape[:-1], memory_bank.shape[1])
