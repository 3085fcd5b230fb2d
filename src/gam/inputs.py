"""What a language model takes as input, checked: token ids, targets, and the
padding mask of a left-padded batch with the positions it gives.

Shared by the forward pass (:mod:`gam.models.lm`, whose docstring states the
padding contract) and cached decoding (:mod:`gam.generation`), which sit on
either side of the model and must not import each other.
"""

from __future__ import annotations

import torch


def check_token_ids(idx: torch.Tensor, vocab_size: int, max_len: int | None, name: str = "idx") -> None:
    """Raise a ValueError naming the problem instead of a deep torch error."""
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, time), got {tuple(idx.shape)}")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(idx.shape)}")
    if max_len is not None and idx.shape[1] > max_len:
        raise ValueError(
            f"sequence length {idx.shape[1]} exceeds block_size {max_len} "
            "(learned positions); crop the input or use pos_embedding='none'"
        )
    if torch.compiler.is_compiling():
        return
    if idx.numel() == 1:  # a decode step: one read instead of two reductions
        lo = hi = int(idx.item())
    else:
        lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad} outside [0, {vocab_size}) (vocab_size={vocab_size})")


def padding_mask(attention_mask: torch.Tensor | None, idx: torch.Tensor,
                 prompt: bool = False) -> torch.Tensor | None:
    """The (B, T) bool mask of real tokens for a padded batch, or None when no
    real token has padding before it (the fast unpadded path: padding after the
    last real token cannot reach it in a causal model). Each row's real tokens
    must be one run. ``prompt``: the batch is a prompt to continue (a cache
    prefill), so the last token of every row must be real: right padding is
    refused. One-line ValueErrors for a mask of the wrong shape or values, real
    tokens not in one run, or a row with no real token."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(idx.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must have the shape of the input ids {tuple(idx.shape)}, got {shape}")
    real = attention_mask.to(idx.device).bool()
    if torch.compiler.is_compiling():
        return real
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (real token) only")
    if bool(real.all()):
        return None
    count = real.sum(dim=1, keepdim=True)
    if not bool((count > 0).all()):
        raise ValueError("attention_mask has a row with no real token (all padding)")
    first = real.long().argmax(dim=1, keepdim=True)
    column = torch.arange(idx.shape[1], device=real.device)
    if not torch.equal(real, (column >= first) & (column < first + count)):
        raise ValueError("attention_mask: the real tokens of a row must be one run (padding before or after them)")
    if prompt and not bool(real[:, -1].all()):
        raise ValueError("right padding cannot be continued: pad prompts on the left "
                         "(tokenizer.padding_side = 'left')")
    if bool(real[:, 0].all()):
        return None  # right padding only: every real token already sees what it sees unpadded
    return real


def positions_from_mask(real: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids (B, T) for a left-padded batch: the first real token of a row
    is ``start`` (pad positions get ``start`` too; they are never read)."""
    return (real.long().cumsum(dim=1) - 1).clamp(min=0) + start


def check_targets(targets: torch.Tensor, idx: torch.Tensor, vocab_size: int) -> None:
    """Targets: integer ids in [0, vocab_size), or -100 (ignored), shaped like ``idx``."""
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype.is_complex \
            or targets.dtype == torch.bool:
        raise ValueError("targets must be a tensor of integer token ids")
    if targets.shape != idx.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
    if torch.compiler.is_compiling():
        return
    bad = targets[(targets != -100) & ((targets < 0) | (targets >= vocab_size))]
    if bad.numel():
        raise ValueError(f"targets hold token id {int(bad[0])} outside [0, {vocab_size}) "
                         f"(vocab_size={vocab_size}; -100 marks an ignored position)")
