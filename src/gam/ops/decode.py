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
the bank's first dimension walks it a column block at a time; in bf16 too, with the bank
read as int32 pairs as below: 1.97 vs 1.77 ms, measured under load; the bank is still in L2
from the scores).

A bf16 weight is converted to fp32 as it is read, and Inductor's conversion of a bf16
vector (widen, then shift, for the weight and again for the input) made that loop
conversion-bound: 25-33 GB/s of bf16 on one thread, below the streaming floor. Read as
int32 lanes instead, each lane holds two bf16 numbers, and the fp32 value of each is one
integer op away: the high one is the lane with its low 16 bits cleared, the low one is
the lane shifted left by 16 (a bf16 number is the top half of the fp32 one). The input's
even and odd features, converted once per product, pair with them, so the loop does one
load, two integer ops and two fused multiply-adds per 32 weights (:func:`_bf16_pairs`).

Ops take tensors, never modules (:func:`linear` is ``F.linear``'s signature).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def _streamed(x: torch.Tensor) -> bool:
    """True where the reduction form is the fast one: one row of input, being compiled."""
    return torch.compiler.is_compiling() and x.numel() == x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., K) @ weight (N, K).T + bias (N)."""
    if not _streamed(x):
        return F.linear(x, weight, bias)
    if _pairs_apply(weight):
        y = _bf16_pairs(x, weight).to(x.dtype)
    else:
        y = (x.unsqueeze(-2) * weight).sum(-1)  # each output reads one contiguous row of the weight
    return y if bias is None else y + bias


def _pairs_apply(weight: torch.Tensor) -> bool:
    """A bf16 matrix whose rows can be read as int32 lanes of two numbers, low half first."""
    return (weight.dtype == torch.bfloat16 and weight.shape[-1] % 2 == 0 and weight.is_contiguous()
            and sys.byteorder == "little")


def _bf16_pairs(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in fp32 for a bf16 weight of even width, read as int32 lanes of two
    bf16 numbers (little-endian: feature 2i in the low half, 2i + 1 in the high half).
    Exact: the same products as converting the weight, summed in another order."""
    lanes = weight.view(torch.int32)  # (N, K / 2)
    low = (lanes << 16).view(torch.float32)  # features 0, 2, 4, ...
    high = (lanes & -65536).view(torch.float32)  # features 1, 3, 5, ... (-65536 = 0xFFFF0000)
    even = x[..., 0::2].float().unsqueeze(-2)
    odd = x[..., 1::2].float().unsqueeze(-2)
    return (low * even + high * odd).sum(-1)
