"""Products with a weight for one row of input: what a batch-1 decode step is made of.

At batch 1 a decode step does two FLOPs per weight it reads, so its time is the time to
stream the weights from memory. PyTorch's CPU matmul for one row (MKL's sgemv, oneDNN
for bf16) reads a weight at 13-17 GB/s on our 2-core host, where a plain streaming
reduction (``torch.sum``) reaches 36-40 GB/s. Written as an elementwise product summed
over the input features, the same product becomes, under ``torch.compile`` (Inductor),
one vectorized loop that reads the weight once at 33-39 GB/s (docs/generation-and-hf.md,
"Decoding at the floor"). Eagerly that expression would first write the whole product to memory,
so each op here takes the reduction form only while being compiled and for a single
row, and is the ordinary matmul otherwise: one function, the same values (up to the
order of the sums).

Only ``x @ W.T`` (a weight's rows against the input) gains: the other product of a step,
``p @ M`` (the memory read's weights against the bank's rows), is faster as the matmul
inside the compiled graph (2.75 vs 3.15 ms a token for the paper GAM: the reduction over
the bank's first dimension walks it a column block at a time).

Ops take tensors, never modules (:func:`linear` is ``F.linear``'s signature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _streamed(x: torch.Tensor) -> bool:
    """True where the reduction form is the fast one: one row of input, being compiled."""
    return torch.compiler.is_compiling() and x.numel() == x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., K) @ weight (N, K).T + bias (N)."""
    if not _streamed(x):
        return F.linear(x, weight, bias)
    y = (x.unsqueeze(-2) * weight).sum(-1)  # each output reads one contiguous row of the weight
    return y if bias is None else y + bias
