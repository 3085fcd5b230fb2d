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

``memory_read(..., backend="triton")`` runs the Triton kernels of
:mod:`gam.ops.triton_memory_read` instead (CUDA; same maths, one kernel launch
per direction, the (N, slots) scores never in global memory). They are not the
default: on an H100 they are correct but slower than cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows (tokens) per chunk. 2048 x 512 slots x 2 bytes = 2 MiB of bf16 scores per
# chunk (4 MiB in fp32): large enough for efficient matmuls, small enough to stay
# in L3. A training batch of 8 x 256 tokens is one chunk: forward + backward of the
# read ran ~5% faster than with 1024-token chunks on the 2-core CPU (23.6 vs 24.8 ms).
DEFAULT_CHUNK = 2048
# On a GPU, 1024-row chunks leave it idle between launches (5-14x slower than
# the unchunked reference on an H100); 16384 x 512 slots x 2 bytes = 16 MiB.
DEFAULT_CHUNK_CUDA = 16384


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


def read_forward(h: torch.Tensor, M: torch.Tensor, chunk: int) -> torch.Tensor:
    """``softmax(h Mᵀ) M`` over chunks of rows; ``h`` (N, C) and ``M`` in one dtype."""
    N = h.shape[0]
    out = torch.empty(N, M.shape[1], dtype=h.dtype, device=h.device)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        p = torch.softmax(h[s:e] @ M.T, dim=-1)
        torch.mm(p, M, out=out[s:e])
    return out


def read_backward(h: torch.Tensor, M: torch.Tensor, dout: torch.Tensor, chunk: int,
                  dh: torch.Tensor | None, accumulate: bool = False) -> torch.Tensor:
    """Gradients of :func:`read_forward`: returns dM (fp32 or wider) and, when ``dh``
    (N, C) is given, writes the gradient of ``h`` into it, or with ``accumulate``
    adds it (one rounding per entry: the add is the matmul's own). The softmax of
    each chunk is recomputed."""
    dtype = h.dtype
    N = h.shape[0]
    dM = torch.zeros(M.shape, dtype=acc_dtype(dtype), device=h.device)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        hc, dc = h[s:e], dout[s:e]
        p = torch.softmax(hc @ M.T, dim=-1)              # recomputed, (n, slots)
        dp = dc @ M.T
        # P * (dP - rowsum(dP * P)), one fused pass, fp32 arithmetic inside
        ds = torch._softmax_backward_data(dp, p, -1, dtype)
        if dh is not None and accumulate:
            torch.addmm(dh[s:e], ds, M, out=dh[s:e])
        elif dh is not None:
            torch.mm(ds, M, out=dh[s:e])
        part = p.T @ dc                                   # M as values
        part = torch.addmm(part, ds.T, hc)                # M as keys
        dM += part
    return dM


class MemoryRead(torch.autograd.Function):
    """Chunked ``softmax(h Mᵀ) M`` that recomputes the softmax in backward.

    ``h``: (N, C) in the compute dtype; ``memory_bank``: (slots, C), any float
    dtype (cast to the compute dtype inside). Returns (N, C) in the compute dtype.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, memory_bank: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(h, memory_bank)
        ctx.chunk = chunk
        return read_forward(h, memory_bank.to(h.dtype), chunk)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        h, memory_bank = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            dM = read_backward(h, memory_bank.to(h.dtype), dout.to(h.dtype).contiguous(), ctx.chunk, dh)
        return dh, dM.to(memory_bank.dtype), None


def memory_read(h: torch.Tensor, memory_bank: torch.Tensor, chunk: int | None = None,
                backend: str = "auto") -> torch.Tensor:
    """Fused memory read, numerically the reference's ``softmax(h Mᵀ) M``.

    ``h``: (..., C). ``backend``: ``auto`` or ``torch`` (the chunked PyTorch
    function), or ``triton`` (the Triton kernels; CUDA only). ``auto`` does not
    pick Triton: on an H100 the kernels are correct but slower than cuBLAS
    (``benchmarks/bench_memory_read.py``).
    """
    dtype = compute_dtype(h)
    shape = h.shape
    h2 = h.reshape(-1, shape[-1])
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, got {backend!r}")
    if backend == "triton":
        from gam.ops import triton_memory_read

        if not triton_memory_read.supports(h2.to(dtype), memory_bank):
            raise RuntimeError("backend='triton' needs the triton package, a CUDA tensor and width <= 1024")
        out = triton_memory_read.memory_read_triton(h2.to(dtype), memory_bank)
        return out.view(*shape[:-1], memory_bank.shape[1])
    chunk = chunk or (DEFAULT_CHUNK_CUDA if h.is_cuda else DEFAULT_CHUNK)
    with torch.autocast(h.device.type, enabled=False):
        out = MemoryRead.apply(h2.to(dtype).contiguous(), memory_bank, chunk)
    return out.view(*shape[:-1], memory_bank.shape[1])
