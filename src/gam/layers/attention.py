"""The Transformer baseline block: pre-LN causal multi-head self-attention + FFN.

``attn_impl="naive"`` materializes the (T, T) scores and a causal mask as the
paper's benchmark did; ``"sdpa"`` (default) calls
``F.scaled_dot_product_attention(is_causal=True)``, which picks a fused
flash / memory-efficient kernel where one exists. Both compute the same
function (tested).

Padding (a left-padded batch, ``gam.models.lm``): padded keys are masked out of
every query's attention; a pad query attends to itself only, so its row stays
finite (its output is never read). The decoding cache then records which cached
keys are padding (``key_mask``); an unpadded batch has none and keeps
``is_causal=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.config import GAMConfig
from gam.layers import short_conv
from gam.layers.gam import feed_forward


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GAMConfig):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if attention_mask is not None:
            y = self._attend(q, k, v, causal=True, key_mask=attention_mask,
                             dropout_p=self.dropout if self.training else 0.0)
        elif self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
            y = self.attn_dropout(F.softmax(scores, dim=-1)) @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))

    # ------------------------------------------------------------ decoding
    # KV cache: preallocated (B, n_head, max_seqlen, head_dim) buffers and the
    # number of filled positions; the buffers double if a sequence outgrows them.

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> dict:
        w = self.qkv.weight
        shape = (batch_size, self.n_head, max(int(max_seqlen), 1), w.shape[1] // self.n_head)
        kw = dict(dtype=dtype or w.dtype, device=device or w.device)
        return {"k": torch.zeros(shape, **kw), "v": torch.zeros(shape, **kw), "length": 0}

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def _append(self, cache: dict, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write keys/values (and, for a padded prompt, which of them are real)
        after the cached ones; returns all cached k, v and the key mask (or None)."""
        start, T = cache["length"], k.shape[2]
        end = start + T
        if end > cache["k"].shape[2]:  # outgrown: double the buffers
            for name in ("k", "v"):
                old = cache[name]
                new = old.new_zeros(*old.shape[:2], max(end, 2 * old.shape[2]), old.shape[3])
                new[:, :, :start] = old[:, :, :start]
                cache[name] = new
        cache["k"][:, :, start:end] = k
        cache["v"][:, :, start:end] = v
        cache["length"] = end
        if key_mask is not None and "key_mask" not in cache:  # the first padded tokens: earlier ones were real
            cache["key_mask"] = torch.ones(k.shape[0], start, dtype=torch.bool, device=k.device)
        if "key_mask" in cache:
            new_keys = key_mask if key_mask is not None else torch.ones(k.shape[0], T, dtype=torch.bool,
                                                                         device=k.device)
            cache["key_mask"] = torch.cat([cache["key_mask"][:, :start], new_keys], dim=1)
        return cache["k"][:, :, :end], cache["v"][:, :, :end], cache.get("key_mask")

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                key_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        """Attention of q (B, H, Tq, D) over k, v (B, H, Tk, D); the queries are the
        last Tq positions. ``key_mask`` (B, Tk): False at padded keys."""
        if self.attn_impl == "sdpa" and key_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
        Tq, Tk = q.shape[2], k.shape[2]
        query_pos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        key_pos = torch.arange(Tk, device=q.device)[None, :]
        allowed = key_pos <= query_pos if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
        if key_mask is not None:  # a pad query keeps its own key: no empty row, no NaN
            allowed = (allowed & key_mask[:, None, None, :]) | (key_pos == query_pos)
        if self.attn_impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        scores = scores.masked_fill(~allowed, float("-inf"))
        return F.dropout(F.softmax(scores, dim=-1), dropout_p) @ v

    def prefill(self, x: torch.Tensor, cache: dict, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention over a prompt (B, T, C), writing its keys/values into an empty cache."""
        B, T, C = x.shape
        q, k, v = self._heads(x)
        self._append(cache, k, v, attention_mask)
        y = self._attend(q, k, v, causal=True, key_mask=attention_mask).transpose(1, 2).reshape(B, T, C)
        return self.proj(y)

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token (B, 1, C) attending to every cached (real) position and itself."""
        B, T, C = x.shape
        q, k, v = self._heads(x)
        k, v, key_mask = self._append(cache, k, v)
        y = self._attend(q, k, v, causal=False, key_mask=key_mask).transpose(1, 2).reshape(B, T, C)
        return self.proj(y)


class TransformerBlock(nn.Module):
    """Pre-LN attention + FFN. With ``attn_short_conv = k`` the attention reads
    ``h + conv(h)`` (h = LayerNorm1(x), conv causal depthwise with kernel k), as
    Zoology's attention baseline; its decoding state adds the last k - 1 h's."""

    def __init__(self, config: GAMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        k = getattr(config, "attn_short_conv", 0)
        self.short_conv = nn.Conv1d(config.n_embd, config.n_embd, k, padding=k - 1,
                                    groups=config.n_embd) if k else None
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ffn = feed_forward(config.n_embd, config.dropout)

    def attention_input(self, x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln1(x)
        return h if self.short_conv is None else h + short_conv.causal_conv(self.short_conv, h, real)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attention_input(x, attention_mask), attention_mask)
        return x + self.ffn(self.ln2(x))

    # decoding: see CausalSelfAttention and gam.generation
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> dict:
        cache = self.attn.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, device=device)
        if self.short_conv is not None:
            cache["conv_state"] = short_conv.new_state(self.short_conv, batch_size, dtype, device)
        return cache

    def prefill(self, x: torch.Tensor, cache: dict, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.short_conv is not None:
            short_conv.fill_state(cache["conv_state"], self.ln1(x), attention_mask)
        x = x + self.attn.prefill(self.attention_input(x, attention_mask), cache, attention_mask)
        return x + self.ffn(self.ln2(x))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        h = self.ln1(x)
        if self.short_conv is not None:
            h = h + short_conv.step(self.short_conv, cache["conv_state"], h)
        x = x + self.attn.step(h, cache)
        return x + self.ffn(self.ln2(x))
