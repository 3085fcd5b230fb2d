"""The decoder-only language-model shell shared by GAM, Transformer and Mamba.

    token embedding + learned position embedding -> dropout -> n_layer blocks
    -> final LayerNorm -> head tied to the token embedding

The three models differ only in the block (``config.model``), so a comparison
between them is a comparison of mixers. With ``config.model="gam"`` this is
the paper's ``GAM_Model`` with the official parameter names. (The standard
Mamba wiring normalizes with RMSNorm, the final norm included, as mamba-ssm and
Hugging Face's Mamba do.)

Padding contract (shared by every block, as flash-linear-attention passes
``attention_mask`` to each layer): ``attention_mask`` is (B, T) with 1 at real
tokens and 0 at padding. Left padding is what matters (batched generation);
padding after the last real token is harmless in a causal model, so a
right-padded training batch takes the unpadded path, and only a prompt to
continue must not end in padding. :func:`padding_mask` turns the mask into a
bool tensor, or None when no real token has padding before it (the unpadded
fast path is then untouched). Positions follow the mask: the first real token
of each row is position 0. Each block keeps pad
positions out of real tokens: GAM zeroes its conv input (and makes the causal
memory skip the write) at pads, Mamba zeroes its conv input and the scan input,
attention masks padded keys. A real token's output is then what it is unpadded.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.config import GAMConfig
from gam.ops.cross_entropy import cross_entropy, linear_cross_entropy
from gam.ops.fused_block import dropout as fused_dropout
from gam.ops.fused_block import use_fast_path


def final_norm(config: GAMConfig) -> nn.Module:
    """The norm before the head: LayerNorm, or RMSNorm for the standard Mamba
    wiring (mamba-ssm's and Hugging Face's ``norm_f``)."""
    if config.model == "mamba" and config.mamba_wiring == "standard":
        from gam.layers.mamba_block import RMSNorm

        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd)


def make_block(config: GAMConfig) -> nn.Module:
    if config.model == "gam":
        from gam.layers.gam import GAMBlock

        return GAMBlock(config)
    if config.model == "transformer":
        from gam.layers.attention import TransformerBlock

        return TransformerBlock(config)
    from gam.layers.mamba_block import MambaBlock

    return MambaBlock(config)


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


class DecoderLM(nn.Module):
    """Decoder-only LM; ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, config: GAMConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.token_embedding = nn.Embedding(config.vocab_size, C)
        if config.pos_embedding == "learned":
            self.pos_embedding = nn.Embedding(config.block_size, C)  # N(0, 1), as the official code
            if config.pos_init_std != 1.0:  # rescale the same draw: the RNG stream stays the paper's
                with torch.no_grad():
                    self.pos_embedding.weight.mul_(config.pos_init_std)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(make_block(config) for _ in range(config.n_layer))
        self.ln_f = final_norm(config)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        # Weight tying as the official code does it: the embedding takes the
        # head's (nn.Linear-initialized) weight.
        self.token_embedding.weight = self.head.weight

    def embed(self, idx: torch.Tensor, start_pos: int = 0, sparse_grad: bool = False,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token (+ position) embeddings, dropout applied. Positions are
        ``start_pos, start_pos+1, ...`` or, for a padded batch, ``positions`` (B, T).
        ``sparse_grad``: the token
        embedding's gradient is sparse (its rows, not a zero-filled (vocab, C) array),
        for a forward whose loss also takes the tied head's dense gradient, which the
        sparse one is then added into (the weight's gradient stays dense). It calls
        ``F.embedding`` directly, so hooks on ``token_embedding`` see only the other calls."""
        if sparse_grad:
            x = F.embedding(idx, self.token_embedding.weight, sparse=True)
        else:
            x = self.token_embedding(idx)
        if self.config.pos_embedding == "learned":
            if positions is None:
                positions = torch.arange(start_pos, start_pos + idx.shape[1], device=idx.device)
            x = x + self.pos_embedding(positions)
        if use_fast_path(self.config.gam_impl, x):
            return fused_dropout(x, self.dropout.p, self.dropout.training)
        return self.dropout(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, return_logits: bool = True,
        attention_mask: torch.Tensor | None = None, hidden_states: list | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, loss); loss is None without ``targets``. ``return_logits=False``
        (a training step that needs only the loss) returns (None, loss) and, off the
        reference path, fuses the head into the loss so that no (tokens, vocab) logits
        are kept: :func:`gam.ops.cross_entropy.linear_cross_entropy`.

        ``attention_mask``: a left-padded batch (module docstring); each real
        token gets the logits it has unpadded. ``hidden_states``: a list to
        append the embeddings and each block's output to, the last one after
        the final norm (the Hugging Face convention, n_layer + 1 tensors)."""
        check_token_ids(idx, self.config.vocab_size, self.config.max_seq_len)
        real = padding_mask(attention_mask, idx)
        if targets is not None:
            check_targets(targets, idx, self.config.vocab_size)
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets: there is nothing else to return")
        fast = use_fast_path(self.config.gam_impl, idx)
        tied_head_in_loss = targets is not None and self.token_embedding.weight is self.head.weight
        # (not under torch.compile: Inductor has no sparse tensors)
        sparse_grad = fast and tied_head_in_loss and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        positions = None if real is None else positions_from_mask(real)
        x = self.embed(idx, sparse_grad=sparse_grad, positions=positions)
        for block in self.blocks:
            if hidden_states is not None:
                hidden_states.append(x)
            x = block(x) if real is None else block(x, attention_mask=real)
        h = self.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(h)
        if not return_logits and fast:
            return None, linear_cross_entropy(h, self.head.weight, targets)
        logits = self.head(h)
        loss = None
        if targets is not None:
            if not fast:  # the paper's expression
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
            else:  # the same loss and gradient, fewer passes over the logits
                loss = cross_entropy(logits, targets)
        return (logits if return_logits else None), loss

    # ------------------------------------------------------------ decoding (gam.generation)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None,
                                 dtype: torch.dtype | None = None, device=None):
        """Per-layer decoding state for ``batch_size`` sequences (a ``gam.generation.InferenceCache``)."""
        from gam.generation import InferenceCache

        return InferenceCache.allocate(self, batch_size, max_seqlen, dtype=dtype, device=device)

    def forward_cached(self, idx: torch.Tensor, cache, last_only: bool = False,
                       attention_mask: torch.Tensor | None = None,
                       hidden_states: list | None = None) -> torch.Tensor:
        """Logits (B, T, V) for tokens that continue the sequence held in ``cache``:
        one parallel pass when the cache is empty (prefill), then one step per token."""
        from gam.generation import forward_cached

        return forward_cached(self, idx, cache, last_only=last_only, attention_mask=attention_mask,
                              hidden_states=hidden_states)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt (B, T) -> (B, T + max_new_tokens) with the inference cache;
        ``temperature=0`` is greedy. See ``gam.generation.generate``."""
        from gam.generation import generate

        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, attention_mask=attention_mask)


# The paper's name for the LM, and ours: with the default config it is GAM.
GAMModel = DecoderLM
GAM_Model = DecoderLM


def build_model(name: str = "gam", **fields) -> DecoderLM:
    """Build a language model: ``build_model("transformer", n_layer=4)``.

    ``name`` is one of "gam", "transformer", "mamba"; ``fields`` are
    :class:`GAMConfig` fields (an unknown field raises ``ConfigError``).
    """
    return DecoderLM(GAMConfig(model=name, **fields))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters, each counted once (the tied head is the embedding).

    ``non_embedding`` leaves out the token and position embeddings (and so the
    tied head), the usual convention for comparing model sizes.
    """
    seen: set[int] = set()
    total = embedding = 0
    embedding_ids = set()
    for name in ("token_embedding", "pos_embedding"):
        module = getattr(model, name, None)
        if module is not None:
            embedding_ids.add(id(module.weight))
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in embedding_ids:
            embedding += p.numel()
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding}
