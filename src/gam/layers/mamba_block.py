"""The Mamba baseline block, in the two wirings the project compares.

- ``standard`` (default): pre-norm residual, ``x + Mamba(RMSNorm(x))``, and
  RMSNorm before the head, as mamba-ssm's MambaLMHeadModel stacks its mixers
  (``rms_norm=True``, no MLP, d_intermediate=0) and Hugging Face's
  MambaForCausalLM does, so their checkpoints load
  (:mod:`gam.models.mamba_convert`).
- ``paper``: ``x = Mamba(x)``, mixers stacked with no norm and no residual,
  exactly as the paper's benchmark script wired them. Deep stacks of bare
  mixers train poorly; the wiring is kept only to reproduce the paper.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gam.config import GAMConfig
from gam.layers.mamba import Mamba

RMS_NORM_EPS = 1e-5  # mamba-ssm's RMSNorm and Hugging Face's layer_norm_epsilon default


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the statistics in fp32 (as mamba-ssm
    and Hugging Face compute it; ``nn.RMSNorm`` needs torch >= 2.4)."""

    def __init__(self, n_embd: int, eps: float = RMS_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MambaBlock(nn.Module):
    def __init__(self, config: GAMConfig):
        super().__init__()
        self.wiring = config.mamba_wiring
        if self.wiring == "standard":
            self.norm = RMSNorm(config.n_embd)
        self.mixer = Mamba(
            config.n_embd,
            d_state=config.d_state,
            d_conv=config.d_conv,
            expand=config.expand,
            backend=config.mamba_backend,
        )

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.wiring == "standard":
            return x + self.mixer(self.norm(x), attention_mask=attention_mask)
        return self.mixer(x, attention_mask=attention_mask)

    # decoding: the mixer's conv and SSM states (constant size); see gam.generation
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None,
                                 dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> dict:
        return self.mixer.allocate_inference_cache(batch_size, dtype=dtype, device=device)

    def prefill(self, x: torch.Tensor, cache: dict, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.wiring == "standard":
            return x + self.mixer(self.norm(x), cache=cache, attention_mask=attention_mask)
        return self.mixer(x, cache=cache, attention_mask=attention_mask)

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        if self.wiring == "standard":
            return x + self.mixer.step(self.norm(x), cache)
        return self.mixer.step(x, cache)
