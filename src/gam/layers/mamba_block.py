"""The Mamba baseline block, in the two wirings the project compares.

- ``standard`` (default): pre-norm residual, ``x + Mamba(LayerNorm(x))``, as
  mamba-ssm's MambaLMHeadModel stacks its mixers (no MLP, d_intermediate=0).
- ``paper``: ``x = Mamba(x)``, mixers stacked with no norm and no residual,
  exactly as the paper's benchmark script wired them. Deep stacks of bare
  mixers train poorly; the wiring is kept only to reproduce the paper.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gam.config import GAMConfig
from gam.layers.mamba import Mamba


class MambaBlock(nn.Module):
    def __init__(self, config: GAMConfig):
        super().__init__()
        self.wiring = config.mamba_wiring
        if self.wiring == "standard":
            self.norm = nn.LayerNorm(config.n_embd)
        self.mixer = Mamba(
            config.n_embd,
            d_state=config.d_state,
            d_conv=config.d_conv,
            expand=config.expand,
            backend=config.mamba_backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wiring == "standard":
            return x + self.mixer(self.norm(x))
        return self.mixer(x)

    # decoding: the mixer's conv and SSM states (constant size); see gam.generation
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None,
                                 dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> dict:
        return self.mixer.allocate_inference_cache(batch_size, dtype=dtype, device=device)

    def prefill(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        if self.wiring == "standard":
            return x + self.mixer(self.norm(x), cache=cache)
        return self.mixer(x, cache=cache)

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        if self.wiring == "standard":
            return x + self.mixer.step(self.norm(x), cache)
        return self.mixer.step(x, cache)
