"""GAM's memory read, ``softmax(h @ M.T) @ M``, in two implementations.

- :func:`memory_read_reference`: the paper's eager expression. Autograd keeps
  the (tokens, slots) softmax for backward.
- :func:`memory_read`: a custom autograd function that keeps only its inputs.
  Forward and backward run over chunks of tokens; backward recomputes each
  chunk's softmax (one extra ``h @ M.T`` matmul) instead of storing it, so the
  memory held between forward and backward is O(tokens x C), not
  O(tokens x slots), and each chunk's scores stay in cache.

The memory bank M is both the keys and the values, so its gradient has two
contributions. With S = h Mᵀ, P = softmax(S), out = P M and upstream dout::

    dP = dout Mᵀ
    dS = P ⊙ (dP - rowsum(dP ⊙ P))
    dh = dS M
    dM = Pᵀ dout   (M as values)  +  dSᵀ h   (M as keys)

Under autocast (CPU bf16, CUDA bf16/fp16) the inputs are cast once to the
autocast dtype, the matmuls run in it, the softmax and its statistics are
computed in fp32 and the memory-bank gradient is accumulated in fp32. The
output has the autocast dtype, as the reference's would.

On CUDA, :func:`memory_read` uses the Triton kernels of
:mod:`gam.ops.triton_memory_read` when Triton is installed (same maths, one
kernel launch per direction); elsewhere it runs the chunked PyTorch code here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows (tokens) per chunk. 1024 x 512 slots x 4 bytes = 2 MiB of scores per
# chunk: large enough for efficient matmuls, small enough to stay in L2/L3.
DEFAULT_CHUNK = 1024


def memory_read_reference(h: torch.Tensor, memory_bank: torch.Tensor) -> torch.Tensor:
    """``softmax(h @ M.T, -1) @ M`` exactly as the paper's code writes it."""
    weights = F.softmax(h @ memory_bank.T, dim=-1)
    return weights @ memory_bank


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls of ``t`` run in: the autocast dtype when autocast is on."""
    device_type = t.device.type
    if t.dtype.is_floating_point and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for sums and parameter gradients: at least fp32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class MemoryRead(torch.autograd.Function):
    """Chunked ``softmax(h Mᵀ) M`` that recomputes the softmax in backward.

    ``h``: (N, C) in the compute dtype; ``memory_bank``: (slots, C), any float
    dtype (cast to the compute dtype inside). Returns (N, C) in the compute dtype.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, memory_bank: torch.Tensor, chunk: int) -> torch.Tensor:
        dtype = h.dtype
        M = memory_bank.to(dtype)
        N = h.shape[0]
        out = torch.empty(N, M.shape[1], dtype=dtype, device=h.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            p = torch.softmax(h[s:e] @ M.T, dim=-1)
            torch.mm(p, M, out=out[s:e])
        ctx.save_for_backward(h, memory_bank)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        h, memory_bank = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            return MemoryRead._backward(ctx, h, memory_bank, dout)

    @staticmethod
    def _backward(ctx, h, memory_bank, dout):
        dtype = h.dtype
        M = memory_bank.to(dtype)
        dout = dout.to(dtype).contiguous()
        N = h.shape[0]
        chunk = ctx.chunk
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dM = torch.zeros(M.shape, dtype=acc_dtype(dtype), device=h.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            hc, dc = h[s:e], dout[s:e]
            p = torch.softmax(hc @ M.T, dim=-1)              # recomputed, (n, slots)
            dp = dc @ M.T
            # P * (dP - rowsum(dP * P)), one fused pass, fp32 arithmetic inside
            ds = torch._softmax_backward_data(dp, p, -1, dtype)
            if dh is not None:
                torch.mm(ds, M, out=dh[s:e])
            part = p.T @ dc                                   # M as values
            part = torch.addmm(part, ds.T, hc)                # M as keys
            dM += part
        return dh, dM.to(memory_bank.dtype), None


_TRITON_CHECKED: dict = {}


def _triton_self_check(device: torch.device, dtype: torch.dtype, bank_shape) -> bool:
    """Once per (device, dtype, bank shape): run the Triton kernels forward and
    backward on a small input and compare with the PyTorch path. On any error or
    mismatch, warn and use the PyTorch path for the rest of the process."""
    key = (str(device), dtype, tuple(bank_shape))
    if key not in _TRITON_CHECKED:
        import warnings

        from gam.ops import triton_memory_read

        ok, why = False, ""
        try:
            with torch.autocast(device.type, enabled=False), torch.enable_grad():
                gen = torch.Generator(device=device).manual_seed(0)
                S, C = bank_shape
                h = torch.randn(67, C, device=device, generator=gen).to(dtype).requires_grad_()
                M = (torch.randn(S, C, device=device, generator=gen) * C ** -0.5).requires_grad_()
                g = torch.randn(67, C, device=device, generator=gen).to(dtype)
                out = triton_memory_read.memory_read_triton(h, M)
                got = (out, *torch.autograd.grad(out, [h, M], g))
                ref = MemoryRead.apply(h, M, 32)
                want = (ref, *torch.autograd.grad(ref, [h, M], g))
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                errs = [((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
                        for a, b in zip(got, want)]
                ok = all(e < tol for e in errs)
                why = f"relative errors {errs} over tolerance {tol}"
        except Exception as err:  # noqa: BLE001 - any failure means: do not use the kernel
            why = f"{type(err).__name__}: {err}"
        if not ok:
            warnings.warn(f"gam: Triton memory-read kernel disabled on {device} {dtype} ({why}); "
                          "using the PyTorch path", RuntimeWarning, stacklevel=3)
        _TRITON_CHECKED[key] = ok
    return _TRITON_CHECKED[key]


def memory_read(h: torch.Tensor, memory_bank: torch.Tensor, chunk: int | None = None,
                backend: str = "auto") -> torch.Tensor:
    """Fused memory read, numerically the reference's ``softmax(h Mᵀ) M``.

    ``h``: (..., C). ``backend``: ``auto`` (Triton on CUDA when available,
    else chunked PyTorch), ``torch`` or ``triton``.
    """
    dtype = compute_dtype(h)
    shape = h.shape
    h2 = h.reshape(-1, shape[-1])
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, got {backend!r}")
    if backend != "torch" and h.is_cuda:
        from gam.ops import triton_memory_read

        if triton_memory_read.supports(h2.to(dtype), memory_bank) and (
                backend == "triton" or _triton_self_check(h.device, dtype, memory_bank.shape)):
            out = triton_memory_read.memory_read_triton(h2.to(dtype), memory_bank)
            return out.view(*shape[:-1], memory_bank.shape[1])
    if backend == "triton":
        raise RuntimeError("backend='triton' needs the triton package, a CUDA tensor and width <= 1024")
    with torch.autocast(h.device.type, enabled=False):
        out = MemoryRead.apply(h2.to(dtype).contiguous(), memory_bank, chunk or DEFAULT_CHUNK)
    return out.view(*shape[:-1], memory_bank.shape[1])
