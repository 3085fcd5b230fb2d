"""Mamba (Mamba-1, selective SSM) mixer, used as a baseline.

Parameter names and shapes are those of ``mamba_ssm.modules.mamba_simple.Mamba`` so that a
mamba-ssm mixer ``state_dict`` loads with ``strict=True``:

    in_proj   Linear(d_model, 2*d_inner, bias=False)
    conv1d    Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv-1, bias=True)
    x_proj    Linear(d_inner, dt_rank + 2*d_state, bias=False)
    dt_proj   Linear(dt_rank, d_inner, bias=True)
    A_log     (d_inner, d_state)
    D         (d_inner,)
    out_proj  Linear(d_inner, d_model, bias=False)

Forward (B, T, C) -> (B, T, C): x, z = in_proj(u); x = silu(causal depthwise conv(x));
dt, B, C = x_proj(x); dt = softplus(dt_proj(dt)) (bias inside the softplus, as ``delta_bias``);
A = -exp(A_log); selective scan; y * silu(z); out_proj. The scan runs in fp32 (also under
autocast); the output has the input's dtype.

Backends (``backend``): "auto" -- mamba-ssm's CUDA selective-scan kernel for CUDA tensors when
mamba-ssm imports, else the pure-PyTorch chunked scan (``gam.ops.selective_scan``); "torch" --
always the pure-PyTorch scan; "cuda" -- require mamba-ssm (error at construction if missing).

Generation: ``allocate_inference_cache`` gives ``{"conv_state": (B, d_inner, d_conv),
"ssm_state": (B, d_inner, d_state)}``; ``forward(x, cache)`` runs a prefill from an empty state
and leaves the final states in ``cache``; ``step(x_t, cache)`` advances one token in place.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.ops.selective_scan import has_mamba_ssm, selective_scan

__all__ = ["Mamba"]


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        backend: str = "auto",
        *,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if backend not in ("auto", "torch", "cuda"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {backend!r}")
        if backend == "cuda" and not has_mamba_ssm():
            raise ImportError("Mamba(backend='cuda') needs mamba-ssm's CUDA kernels "
                              "(pip install mamba-ssm causal-conv1d, on a CUDA machine); "
                              "use backend='auto' or 'torch' for the pure-PyTorch scan")
        fk = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)

        # dt_proj init: weight so that dt's variance is preserved; bias = softplus^-1(dt) with
        # dt log-uniform in [dt_min, dt_max] (clamped below by dt_init_floor)
        std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            elif dt_init == "random":
                nn.init.uniform_(self.dt_proj.weight, -std, std)
            else:
                raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
            dt = torch.exp(torch.rand(self.d_inner, device=device, dtype=torch.float32)
                           * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
            inv_dt = dt + torch.log(-torch.expm1(-dt))
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real init: A = -(1..d_state) for every channel
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    # ------------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"d_conv={self.d_conv}, dt_rank={self.dt_rank}, backend={self.backend!r}")

    def _scan_backend(self, x: torch.Tensor) -> str:
        if self.backend == "torch":
            return "torch"
        if self.backend == "cuda":
            return "cuda"
        return "auto" if x.is_cuda else "torch"

    def forward(self, x: torch.Tensor, cache: Optional[Dict[str, torch.Tensor]] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model). With ``cache``, x is a prefill from the start of
        the sequence and the final conv/ssm states are written into ``cache`` (allocated if absent).
        ``attention_mask`` (B, T) bool, False at the padding of a left-padded batch: pad positions
        enter the conv as zeros and the scan with zero input, so the states a real token sees are
        those of an unpadded sequence (as mamba-ssm and Hugging Face's Mamba do)."""
        Bsz, T, _ = x.shape
        xz = self.in_proj(x).transpose(1, 2)                                  # (B, 2*d_inner, T)
        xs, z = xz.chunk(2, dim=1)
        real = None if attention_mask is None else attention_mask.unsqueeze(1).to(xs.dtype)  # (B, 1, T)
        if real is not None:
            xs = xs * real
        if cache is not None:
            if "conv_state" not in cache or "ssm_state" not in cache:
                cache.update(self.allocate_inference_cache(Bsz, device=x.device))
            conv_state = cache["conv_state"]
            if T >= self.d_conv:
                conv_state.copy_(xs[:, :, T - self.d_conv:])
            else:
                conv_state.copy_(F.pad(xs, (self.d_conv - T, 0)))
        xs = F.silu(self.conv1d(xs)[..., :T])                                 # causal depthwise conv
        if real is not None:  # zero scan input: the state stays zero through the left padding
            xs = xs * real
        x_dbl = self.x_proj(xs.transpose(1, 2))                               # (B, T, R + 2N)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)               # (B, d_inner, T), bias in softplus
        A = -torch.exp(self.A_log.float())
        res = selective_scan(
            xs, dt, A, Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(),
            self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=cache is not None, backend=self._scan_backend(x))
        if cache is not None:
            y, last = res
            cache["ssm_state"].copy_(last)
        else:
            y = res
        out = self.out_proj(y.transpose(1, 2))
        return out.to(x.dtype)

    # ------------------------------------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, dtype=None, device=None) -> Dict[str, torch.Tensor]:
        """Zero states for ``batch_size`` sequences. conv_state defaults to the conv weight's dtype,
        ssm_state to fp32 (the recurrence is kept in fp32, like the scan)."""
        device = self.conv1d.weight.device if device is None else device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = torch.float32 if dtype is None else dtype
        return {
            "conv_state": torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype),
            "ssm_state": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype),
        }

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, cache: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One decoding step: x_t (B, 1, d_model) or (B, d_model) -> same shape; updates ``cache``."""
        squeeze = x_t.dim() == 2
        if not squeeze:
            if x_t.shape[1] != 1:
                raise ValueError(f"step() takes one token, got x_t of shape {tuple(x_t.shape)}")
            x_t = x_t[:, 0]
        conv_state, ssm_state = cache["conv_state"], cache["ssm_state"]
        xz = self.in_proj(x_t)                                                # (B, 2*d_inner)
        xs, z = xz.chunk(2, dim=-1)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = xs.to(conv_state.dtype)
        xc = (conv_state.float() * self.conv1d.weight[:, 0, :].float()).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias.float()
        xc = F.silu(xc)                                                       # (B, d_inner) fp32
        x_dbl = self.x_proj(xc.to(xz.dtype))
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).float()
        dt = F.softplus(dt + self.dt_proj.bias.float())                      # (B, d_inner)
        A = -torch.exp(self.A_log.float())
        dA = torch.exp(dt.unsqueeze(-1) * A)                                  # (B, d_inner, N)
        dBx = (dt * xc).unsqueeze(-1) * Bm.float().unsqueeze(1)
        h = ssm_state.float() * dA + dBx
        ssm_state.copy_(h)
        y = (h * Cm.float().unsqueeze(1)).sum(-1) + self.D.float() * xc     # elementwise: stays fp32 under autocast
        y = y * F.silu(z.float())
        out = self.out_proj(y.to(xz.dtype)).to(x_t.dtype)
        return out if squeeze else out.unsqueeze(1)
