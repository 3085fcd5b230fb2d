"""The write side of GAM's opt-in causal memory (``GAMConfig(memory="causal")``).

The block keeps the paper's ``memory_bank`` (S x C) as the slots' initial
content; this module holds the two projections that let tokens write into the
slots (see :mod:`gam.ops.causal_memory` for the recurrence and its forms)::

    v_t       = W_v h_t                         (value written, C)
    log alpha = logsigmoid(W_f h_t + b_f)       (per-slot retention, S)
    M_t       = diag(alpha_t) M_{t-1} + (1 - alpha_t) v_t^T
    read_t    = softmax(h_t M_t^T) M_t

Initialization: the forget bias gives each slot a retention time
``1 / (1 - alpha)`` between ``min_timescale`` and ``max_timescale`` tokens,
log-spaced (as Mamba spreads its step sizes), so at the start every slot
forgets slowly and all of them still receive a gradient; ``W_f`` starts at
nn.Linear's default, so the gate is mildly content-dependent from step one
and can learn to open (write) or close (keep) per slot and per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.ops.causal_memory import (causal_memory_chunked, causal_memory_final_state,
                                   causal_memory_recurrent, causal_memory_step)


class CausalMemory(nn.Module):
    """Write projections of the causal memory; the slots' initial content is
    passed in (the block's ``memory_bank``)."""

    def __init__(self, n_embd: int, num_slots: int, min_timescale: float = 4.0,
                 max_timescale: float = 256.0, chunk_size: int | None = None):
        super().__init__()
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.forget = nn.Linear(n_embd, num_slots)
        self.chunk_size = chunk_size
        self.min_timescale, self.max_timescale = min_timescale, max_timescale
        self.reset_forget_bias()

    @torch.no_grad()
    def reset_forget_bias(self) -> None:
        S = self.forget.out_features
        tau = torch.exp(torch.linspace(math.log(self.min_timescale), math.log(self.max_timescale), S))
        self.forget.bias.copy_(torch.log(tau - 1.0))  # sigmoid(b) = 1 - 1/tau

    def gates(self, h: torch.Tensor, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, log_alpha) for normalized input h (..., C). With a padding mask
        ``real`` (B, T), pad positions get alpha = 1: they write nothing."""
        log_alpha = F.logsigmoid(self.forget(h))
        if real is not None:
            log_alpha = log_alpha * real.unsqueeze(-1).to(log_alpha.dtype)
        return self.value(h), log_alpha

    def forward(self, h: torch.Tensor, memory_bank: torch.Tensor,
                state: torch.Tensor | None = None, reference: bool = False,
                real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads (B, T, C) and final state (B, S, C) for h (B, T, C), starting
        from ``state`` or, when None, from ``memory_bank``; ``real``: padding mask."""
        v, log_alpha = self.gates(h, real)
        if reference:
            return causal_memory_recurrent(h, v, log_alpha, memory_bank, state)
        return causal_memory_chunked(h, v, log_alpha, memory_bank, state, self.chunk_size)

    def final_state(self, h: torch.Tensor, memory_bank: torch.Tensor,
                    state: torch.Tensor | None = None, real: torch.Tensor | None = None) -> torch.Tensor:
        v, log_alpha = self.gates(h, real)
        return causal_memory_final_state(v, log_alpha, memory_bank, state)

    def step(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One token per row, h (B, 1, C); updates ``state`` (B, S, C) in place."""
        v, log_alpha = self.gates(h[:, 0])
        out, new_state = causal_memory_step(h[:, 0], v, log_alpha, state.to(h.dtype))
        state.copy_(new_state)
        return out.unsqueeze(1)
