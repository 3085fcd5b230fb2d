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
continue must not end in padding. :func:`gam.inputs.padding_mask` turns the mask into a
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
from gam.generation import GenerationMixin
from gam.inputs import check_targets, check_token_ids, padding_mask, positions_from_mask
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


class DecoderLM(nn.Module, GenerationMixin):
    """Decoder-only LM; ``forward(idx, targets=None) -> (logits, loss)``; cached decoding
    (``allocate_inference_cache``, ``forward_cached``, ``generate``) from
    :class:`gam.generation.GenerationMixin`."""

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
