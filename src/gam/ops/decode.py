"""Products with a weight for one row of input: what a batch-1 decode step is made of.

At batch 1 a decode step does two FLOPs per weight it reads, so its time is the time to
stream the weights from memory. On the AMD EPYC host most figures here come from,
PyTorch's CPU matmul for one row (MKL's sgemv, oneDNN for bf16) reads a weight at 13-17
GB/s, where a plain streaming reduction (``torch.sum``) reaches 36-40 GB/s. Written as an
elementwise product summed over the input features, the same product becomes, under
``torch.compile`` (Inductor), one vectorized loop that reads the weight once at 33-39 GB/s
(docs/generation-and-hf.md, "Decoding at the floor"). How much that gains depends on the
CPU: on an Intel Xeon host (AVX-512) MKL's fp32 product reads 27 GB/s and the loop 18-24
(the compiled fp32 step 9.0 ms with it, 8.4 with the matmul: 7% slower), while in bf16 the
loop wins there too (7.6 against 8.4 ms; one thread, the other job stopped, ad hoc runs not
kept as results files; the host's decode bench: docs/speed.md, "Two CPU hosts"). Eagerly that expression would first write the
whole product to memory, so each op here takes the reduction form only while being
compiled and for a single row, and is the ordinary matmul otherwise: one function, the
same values (up to the order of the sums).

Only ``x @ W.T`` (a weight's rows against the input) gains: the other product of a step,
``p @ M`` (the memory read's weights against the bank's rows), is faster as the matmul
inside the compiled graph (2.75 vs 3.15 ms a token for the paper GAM: the reduction over
the bank's first dimension walks it a column block at a time; in bf16 too, with the bank
read as int32 pairs (a form since removed, below): 1.97 vs 1.77 ms, measured under load; the bank is still in L2
from the scores).

A bf16 weight goes through the same reduction: Inductor converts it to fp32 as it reads it
(25-33 GB/s of bf16 on one thread on the AMD EPYC host, conversion-bound; 15-19 GB/s on an
Intel Xeon host where PyTorch's bf16 product reads 11-14). Reading the weight as int32 lanes
of two bf16 numbers, converted by integer shifts, was 2.5% faster on the EPYC host and made
the compiled step 2.7x slower than eager on the Xeon (Inductor vectorized that loop across the
output rows, with 32 x 32 transposes and the bit-casts done element by element;
results/decode-bf16-pairs-xeon): not kept (docs/generation-and-hf.md).

For bf16 weights on a CPU with AMX tiles (the Intel Xeon host) neither form is the fastest:
the compiled step takes the weights as constants of its graph (Inductor's freezing) and the
products stay matmuls, for which Inductor's tuning (``max_autotune``) picks its own C++ GEMM
kernels (AMX's) on weights packed once: the paper GAM's bf16 step 2.3-2.5x faster than with
the reduction (2.52-2.55 vs 5.83-6.37 ms, results/decode-frozen-bf16-xeon and -before; 14.1 vs
23.3 ms at 24 layers, whose 149 MB are beyond the caches, ad hoc), the kv-slot GAM's 2.1x
(:func:`gam.generation.compiled_step`, docs/generation-and-hf.md). fp32 weights gain nothing
from AMX (the kv-slot GAM's fp32 step was slower so, 11.0 vs 9.8 ms in one pair of runs, not
kept) and keep the reduction, as does every CPU without AMX (the AMD EPYC host, where freezing
alone gained nothing). Where the tuned form is the step's, :func:`tuned_matmul` is
True and :func:`linear` is the matmul under compile too.

Ops take tensors, never modules (:func:`linear` is ``F.linear``'s signature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _has_amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without the query
        return False


# The CPU has AMX tiles: its compiled step for bf16 weights freezes them and tunes its matmuls.
TUNED_MATMULS = _has_amx()


def tuned_matmul(weight: torch.Tensor) -> bool:
    """True where a compiled step freezes ``weight`` and tunes its products: bf16 on an AMX CPU."""
    return TUNED_MATMULS and weight.device.type == "cpu" and weight.dtype == torch.bfloat16


def _streamed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where the reduction form is the fast one: one row of input, being compiled, and a
    weight that is not frozen with tuned matmuls (:func:`tuned_matmul`)."""
    return torch.compiler.is_compiling() and x.numel() == x.shape[-1] and not tuned_matmul(weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., K) @ weight (N, K).T + bias (N)."""
    if not _streamed(x, weight):
        return F.linear(x, weight, bias)
    y = (x.unsqueeze(-2) * weight).sum(-1)  # each output reads one contiguous row of the weight
    return y if bias is None else y + bias

