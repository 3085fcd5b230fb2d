"""The GAM block, exactly as the paper's official code defines it.

    h      = LayerNorm1(x)
    local  = causal depthwise Conv1d(h)               (kernel k, left context k-1)
    global = softmax(h @ M.T) @ M                      (M: num_memory_slots x C)
    g_l, g_g = Linear(C, 2C)(h).chunk(2)
    x      = x + sigmoid(g_l) * local + sigmoid(g_g) * global
    x      = x + FFN(LayerNorm2(x))                    (C -> 4C -> GELU -> C -> Dropout)

Parameter names (``causal_conv``, ``memory_bank``, ``gate``, ``ffn.0``,
``ffn.2``, ``ln1``, ``ln2``) are the official ones, so its checkpoints load
with ``strict=True``.

Note what the memory read is: ``softmax(h_t M^T) M`` uses token t's own
features and a bank of weights shared by all positions, so it is a per-token
function (like the FFN). Only the convolution moves information between
positions: a stack of n_layer blocks sees exactly 1 + n_layer*(k-1) tokens.

``memory="kv_slots"`` (opt-in, not the paper) keeps separate key and value
slots written with the same weights, the key read from the convolution's
output (:mod:`gam.layers.kv_memory`): a query recalls the value bound to its key.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.config import GAMConfig
from gam.layers import short_conv
from gam.ops import decode
from gam.ops.fused_block import (
    causal_depthwise_conv,
    ffn_residual,
    gam_mixer_residual,
    kv_mixer_residual,
    use_fast_path,
)
from gam.ops.memory_read import compute_dtype


def feed_forward(n_embd: int, dropout: float) -> nn.Sequential:
    """The FFN of every block: Linear(C, 4C) -> GELU -> Linear(4C, C) -> Dropout."""
    return nn.Sequential(
        nn.Linear(n_embd, 4 * n_embd),
        nn.GELU(),
        nn.Linear(4 * n_embd, n_embd),
        nn.Dropout(dropout),
    )


class GAMBlock(nn.Module):
    """One GAM block. ``config.variant`` selects the paper's ablations:

    - ``full``: gated fusion of both paths (the paper's model);
    - ``sum_fusion``: ``local + global``, no gate;
    - ``global_only``: memory read only (no conv, no gate);
    - ``local_only``: convolution only (no memory, no gate).
    """

    def __init__(self, config: GAMConfig):
        super().__init__()
        C, k = config.n_embd, config.conv_kernel_size
        self.variant = config.variant
        self.has_local = config.variant != "global_only"
        self.has_global = config.variant != "local_only"
        self.ln1 = nn.LayerNorm(C)
        if self.has_local:
            # padding=k-1 on both sides, then keep the first T outputs: output t
            # sees inputs t-k+1 .. t only (causal).
            self.causal_conv = nn.Conv1d(C, C, k, padding=k - 1, groups=C)
        self.memory = getattr(config, "memory", "static")  # static (paper) | kv_slots
        delta = self.memory == "kv_slots" and config.memory_write == "delta"
        if self.has_global and not delta:  # the delta rule's state starts empty: no bank
            self.memory_bank = nn.Parameter(torch.empty(config.num_memory_slots, C))
            nn.init.xavier_uniform_(self.memory_bank)
        else:
            self.register_parameter("memory_bank", None)
        if self.memory == "kv_slots":  # new parameters only in this case
            from gam.layers.kv_memory import DeltaRuleMemory, KVSlotMemory

            design = dict(gate_normalizer=config.memory_gate_normalizer, output_gate=config.memory_output_gate,
                          retention=(config.memory_retention_min, config.memory_retention_max),
                          feature_map=config.memory_feature_map)
            if delta:
                self.kv_memory = DeltaRuleMemory(C, config.memory_heads, **design)
            else:
                self.kv_memory = KVSlotMemory(C, config.num_memory_slots, config.memory_heads, **design)
            self.key_source = config.memory_key_source
        # the kv-slot mixer that runs as one function (KVMixerResidual) where the fused kernel applies
        self.fused_kv_mixer = (self.memory == "kv_slots" and not delta and config.variant == "full"
                               and config.memory_key_source == "conv" and config.memory_feature_map == "none"
                               and not config.memory_output_gate)
        if config.variant == "full":
            self.gate = nn.Linear(C, 2 * C)
        self.ln2 = nn.LayerNorm(C)
        self.ffn = feed_forward(C, config.dropout)
        self.impl = getattr(config, "gam_impl", "auto")  # auto | reference | fast

    def local_context(self, h: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """Causal depthwise conv of h; with a padding mask, pad positions enter the
        conv as zeros, which is what a real token sees left of the sequence start."""
        return short_conv.causal_conv(self.causal_conv, h, real)

    def global_context(self, h: torch.Tensor, cache: dict | None = None,
                       real: torch.Tensor | None = None, local: torch.Tensor | None = None) -> torch.Tensor:
        """``local``: the conv output at the same positions, which kv_slots' keys read
        (None without a local path: the keys read h)."""
        if self.memory == "kv_slots":  # key and value slots written by tokens <= t
            keys = self.keys_from(h, local, real, cache)
            if cache is None:
                return self.kv_memory(h, keys, self.memory_bank, real=real)
            return self.kv_memory.step(h, keys, cache)
        if cache is not None:  # one token: the bank streamed once per product when compiled (gam.ops.decode)
            return F.softmax(decode.linear(h, self.memory_bank), dim=-1) @ self.memory_bank
        weights = F.softmax(h @ self.memory_bank.T, dim=-1)  # (B, T, slots)
        return weights @ self.memory_bank

    def keys_from(self, h: torch.Tensor, local: torch.Tensor | None, real: torch.Tensor | None = None,
                  cache: dict | None = None) -> torch.Tensor:
        """What the kv-slot memory's keys read (``memory_key_source``): the conv output
        (h without a local path), h itself, or the previous token's h (zeros before the
        first; a pad counts as zeros, as in the conv). While decoding, the previous h is
        ``cache["previous_input"]``, updated here."""
        if self.key_source == "input" or (self.key_source == "conv" and local is None):
            return h
        if self.key_source == "conv":
            return local
        if cache is not None:  # one step
            previous = cache["previous_input"].clone()
            cache["previous_input"].copy_(h)
            return previous
        h = h if real is None else h * real.unsqueeze(-1).to(h.dtype)
        return F.pad(h, (0, 0, 1, 0))[:, :-1]

    def mix(self, h: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """The token-mixing part (what replaces attention), from normalized input h;
        ``real``: the padding mask of a left-padded batch (gam.models.lm)."""
        if self.variant == "full":
            g_local, g_global = self.gate(h).chunk(2, dim=-1)
            local = self.local_context(h, real)
            return (torch.sigmoid(g_local) * local
                    + torch.sigmoid(g_global) * self.global_context(h, real=real, local=local))
        if self.variant == "sum_fusion":
            local = self.local_context(h, real)
            return local + self.global_context(h, real=real, local=local)
        if self.variant == "global_only":
            return self.global_context(h, real=real)
        return self.local_context(h, real)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask``: None, or the bool padding mask of a left-padded batch
        (``gam.inputs.padding_mask``); padded batches take the reference path."""
        if attention_mask is None and use_fast_path(self.impl, x):
            return self.forward_fast(x)
        return self.forward_reference(x, attention_mask)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as :meth:`forward_reference` (unpadded input) on the fused
        ops of :mod:`gam.ops.fused_block`; with ``memory="kv_slots"``, its full mixer with keys
        from the convolution as one function where the fused kernel applies
        (:func:`gam.ops.fused_block.kv_mixer_residual`), else :meth:`mix_kv_fast`. The FFN is fused."""
        if self.memory == "static":
            x = gam_mixer_residual(
                x, self.ln1.weight, self.ln1.bias, self.ln1.eps,
                conv_weight=self.causal_conv.weight if self.has_local else None,
                conv_bias=self.causal_conv.bias if self.has_local else None,
                gate_weight=self.gate.weight if self.variant == "full" else None,
                gate_bias=self.gate.bias if self.variant == "full" else None,
                memory_bank=self.memory_bank if self.has_global else None)
        elif self.fused_kv_mixer and self.kv_memory.fused_read_applies(x):
            memory = self.kv_memory
            x = kv_mixer_residual(
                x, self.ln1.weight, self.ln1.bias, self.ln1.eps, conv_weight=self.causal_conv.weight,
                conv_bias=self.causal_conv.bias, gate_weight=self.gate.weight, gate_bias=self.gate.bias,
                query_weight=memory.query.weight, value_weight=memory.value.weight,
                forget_weight=memory.forget.weight, forget_bias=memory.forget.bias, key_weight=memory.key.weight,
                memory_bank=self.memory_bank, norm_weight=memory.norm.weight, norm_eps=memory.norm.eps,
                out_weight=memory.out.weight, heads=memory.num_heads)
        else:  # kv_slots: every variant it allows has a memory (local_only is refused)
            x = x + self.mix_kv_fast(x)
        linear1, linear2, dropout = self.ffn[0], self.ffn[2], self.ffn[3]
        return ffn_residual(x, self.ln2.weight, self.ln2.bias, self.ln2.eps, linear1.weight, linear1.bias,
                            linear2.weight, linear2.bias, dropout_p=dropout.p if dropout.training else 0.0)

    def mix_kv_fast(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`mix` of ``LayerNorm1(x)`` with the kv-slot memory (either write rule, any
        variant with a memory), on fewer passes over memory: the LayerNorm output cast
        once to the compute dtype (autocast casts it for every product), every
        projection that reads it (the gate and the memory's query, value and gates) as
        one matmul, and the convolution as shifted multiply-adds in (B, T, C) layout
        (:func:`gam.ops.fused_block.causal_depthwise_conv`: no transposed copies).
        The memory reads as in :meth:`gam.layers.kv_memory.KVSlotMemory.read_projections`."""
        memory = self.kv_memory
        h = self.ln1(x).to(compute_dtype(x))
        linears = ([self.gate] if self.variant == "full" else []) + memory.input_projections()
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
        projected = list(F.linear(h, weight, bias).split([m.out_features for m in linears], dim=-1))
        gates = projected.pop(0).chunk(2, dim=-1) if self.variant == "full" else None
        local = causal_depthwise_conv(h, self.causal_conv.weight, self.causal_conv.bias) if self.has_local else None
        keys = self.keys_from(h, local)
        glob = memory.read_projections(projected, F.linear(keys, memory.key.weight), h, self.memory_bank)
        if gates is not None:
            return torch.sigmoid(gates[0]) * local + torch.sigmoid(gates[1]) * glob
        return glob if local is None else local + glob

    def forward_reference(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's eager code, unchanged (plus the padding mask): the oracle and the speed baseline."""
        x = x + self.mix(self.ln1(x), attention_mask)
        return x + self.ffn(self.ln2(x))

    # ------------------------------------------------------------ decoding
    # Inference-cache contract shared by every block (see gam.generation):
    # allocate_inference_cache -> prefill(x, cache) over a prompt -> step(x_t, cache).
    # GAM's state is the last k-1 LayerNorm1 outputs (the conv window); it
    # does not grow with the context. A dict, so variants can add state.

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None,
                                 dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> dict:
        cache: dict = {}
        if self.has_local:
            cache["conv_state"] = short_conv.new_state(self.causal_conv, batch_size, dtype, device)
        if self.memory == "kv_slots":  # the memory's state: slots (B, H, S, C / H) or matrices (B, H, d, d)
            cache.update(self.kv_memory.new_cache(batch_size, self.memory_bank, dtype, device))
            if self.key_source == "shift":  # the last token's normalized input
                weight = self.ln1.weight
                cache["previous_input"] = torch.zeros(batch_size, 1, weight.shape[0], dtype=dtype or weight.dtype,
                                                      device=device or weight.device)
        return cache

    def prefill(self, x: torch.Tensor, cache: dict, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The parallel forward over a prompt (B, T, C), filling an empty ``cache``;
        pad positions of a left-padded prompt are kept out of the state (zeros)."""
        h = self.ln1(x)
        if self.has_local:
            short_conv.fill_state(cache["conv_state"], h, attention_mask)
        if self.memory == "kv_slots":
            local = self.local_context(h, attention_mask) if self.has_local else None
            self.kv_memory.fill_cache(cache, h, self.keys_from(h, local, attention_mask), self.memory_bank,
                                      real=attention_mask)
            if self.key_source == "shift":
                last = h[:, -1:] if attention_mask is None else h[:, -1:] * attention_mask[:, -1:, None].to(h.dtype)
                cache["previous_input"].copy_(last)
        return self(x, attention_mask)

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token (B, 1, C) -> (B, 1, C), updating ``cache`` in place."""
        h = self.ln1(x)
        local = None
        if self.has_local:
            local = short_conv.step(self.causal_conv, cache["conv_state"], h)
        if self.variant == "full":
            g_local, g_global = decode.linear(h, self.gate.weight, self.gate.bias).chunk(2, dim=-1)
            mixed = (torch.sigmoid(g_local) * local
                     + torch.sigmoid(g_global) * self.global_context(h, cache, local=local))
        elif self.variant == "sum_fusion":
            mixed = local + self.global_context(h, cache, local=local)
        elif self.variant == "global_only":
            mixed = self.global_context(h, cache)
        else:
            mixed = local
        x = x + mixed
        up, act, down, dropout = self.ffn
        return x + dropout(decode.linear(act(decode.linear(self.ln2(x), up.weight, up.bias)), down.weight, down.bias))
