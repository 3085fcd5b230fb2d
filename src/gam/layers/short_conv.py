"""A causal depthwise convolution over time and its decoding state.

GAM's local path and the short convolution in front of a Transformer's attention
(``attn_short_conv``, Zoology's hybrid) are the same operation: each channel sees
its own last ``k`` positions. While decoding, a layer keeps the last ``k - 1``
inputs (``state``, shape (B, C, k - 1)); one step is then a product-sum over the
window instead of a convolution launch.

Padding (a left-padded batch, ``gam.models.lm``): pad positions enter the
convolution as zeros, which is what a real token sees left of the sequence start.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def causal_conv(conv: nn.Conv1d, h: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, C) -> (B, T, C): output t reads inputs t-k+1 .. t. ``conv`` pads k - 1 on both
    sides (``padding=k - 1``); the first T outputs are the causal ones. ``real``: (B, T)
    padding mask, False at pad positions."""
    if real is not None:
        h = h * real.unsqueeze(-1).to(h.dtype)
    T = h.shape[1]
    return conv(h.transpose(1, 2))[:, :, :T].transpose(1, 2)


def new_state(conv: nn.Conv1d, batch_size: int, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Zeros for the last k - 1 inputs: the state before any token."""
    w = conv.weight
    return torch.zeros(batch_size, w.shape[0], conv.kernel_size[0] - 1,
                       dtype=dtype or w.dtype, device=device or w.device)


def fill_state(state: torch.Tensor, h: torch.Tensor, real: torch.Tensor | None = None) -> None:
    """Write the last k - 1 inputs of a prompt h (B, T, C) into ``state`` (zeros before a
    prompt shorter than that; pad positions as zeros)."""
    keep = state.shape[-1]
    if not keep:
        return
    window = h if real is None else h * real.unsqueeze(-1).to(h.dtype)
    window = window[:, -keep:].transpose(1, 2)  # (B, C, <= k-1)
    state.zero_()
    state[:, :, keep - window.shape[-1]:] = window


def step(conv: nn.Conv1d, state: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The convolution at one new position h (B, 1, C) -> (B, 1, C), shifting ``state``."""
    window = torch.cat([state, h.transpose(1, 2)], dim=-1)  # (B, C, k)
    state.copy_(window[:, :, 1:])
    out = (window * conv.weight[:, 0]).sum(-1)
    if conv.bias is not None:
        out = out + conv.bias
    return out.unsqueeze(1)
