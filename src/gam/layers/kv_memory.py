"""GAM's opt-in key-value slot memory (``GAMConfig(memory="kv_slots")``).

The global path of a GAM block becomes a gated slot memory in the pattern of
Gated Slot Attention (see :mod:`gam.ops.kv_memory` for the recurrence and its
forms). With ``H = memory_heads`` heads of ``d = C / H`` features and
``S = num_memory_slots`` slots per head::

    q_t = W_q h_t / sqrt(d)      k_t = W_k local_t      v_t = W_v h_t       (split in H heads)
    log alpha_t = logsigmoid(W_f h_t + b_f) / gate_normalizer               (H x S)
    K_t = diag(alpha_t) K_{t-1} + (1 - alpha_t) k_t^T,  V_t likewise, K_0 = V_0 = memory_bank
    read_t = W_o RMSNorm(V_t^T softmax(K_t q_t))                            (heads concatenated)

Why each choice:

- Separate key and value slots written with the same weights: the binding.
  A slot holds the key and the value of the same tokens.
- The key reads the block's causal convolution output ``local_t`` (which sees
  tokens t-k+1 .. t): the key written at a value's position can carry the
  token before it, as Zoology's short convolution does for every mixer. The
  query and the value read the token itself (``h_t``). Without the local path
  (``variant="global_only"``) the key reads ``h_t``.
- The learned ``memory_bank`` (S x C, split in H column blocks of d) is the
  initial content of both the key and the value slots: with no writes, head h
  reads ``softmax(bank_h q_t) bank_h``, the paper's read on a projected query.
- A plain sigmoid forget gate, ``gate_normalizer = 1`` (GSA divides the log gate
  by 8, ``alpha = sigmoid(z)^(1/8)``, a gate 8x slower to move): with the retention
  start below, 1 was 0.025 nats better on WikiText-2 over 3 seeds and recalls as
  well on MQAR (docs/kv-memory.md, "Design choices, measured").
- The forget bias starts each head's slots at retention times ``1 / (1 - alpha)``
  log-spaced from 4 to 256 tokens (:func:`retention_bias`), not all at a zero
  bias's (12 tokens with GSA's normalizer 8, 2 with 1): with 16 pairs queried up to 224 tokens later (MQAR, T = 256) the
  uniform start stayed on the 1/P plateau for 1,000 steps and this one reached
  0.995 in 300 (docs/kv-memory.md).
- The gate is bounded, ``log alpha >= -4`` (:data:`gam.ops.kv_memory.LOG_ALPHA_MIN`),
  which the chunked form's decay factorization needs: at most 98% of a slot is
  replaced per token (a forget logit below -4; with GSA's normalizer 8, below -32).
- ``num_memory_slots`` is the number of slots per head (the bank is S x C);
  the benches use 64, as GSA does: the forget projection (C -> H S) and the
  slot reads cost O(H S) per token, 8x less than with the paper's 512.
- RMSNorm per head on the read (shared weight), then an output projection, as
  GSA: the softmax-weighted mix of slots has a scale that drifts with how much
  has been written.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.ops import decode
from gam.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent, delta_rule_step
from gam.ops.fused_block import bank_slots
from gam.ops.kv_memory import (
    fused_applies,
    kv_memory,
    kv_memory_final_state,
    kv_memory_fused,
    kv_memory_recurrent,
    kv_memory_step,
)

RETENTION_TOKENS = (4.0, 256.0)  # initial retention times of each head's slots, shortest and longest (the default)


def retention_bias(num_slots: int, gate_normalizer: float,
                   retention: tuple[float, float] = RETENTION_TOKENS) -> torch.Tensor:
    """Forget-gate biases (S,) that give slot s a retention ``1 / (1 - alpha_s)`` of
    r_s tokens at z = bias, r_s log-spaced over ``retention`` (shortest, longest):
    ``sigmoid(b)^(1/normalizer) = 1 - 1/r``."""
    shortest, longest = retention
    retention = torch.logspace(math.log10(shortest), math.log10(longest), num_slots, dtype=torch.float64)
    return torch.logit((1 - 1 / retention) ** gate_normalizer).float()


def query_key_map(name: str):
    """The map on queries and keys before the memory (``memory_feature_map``): none or
    swish (GSA's default)."""
    return F.silu if name == "swish" else None


class KVSlotMemory(nn.Module):
    """Projections, gate and output of the key-value slot memory; the slots'
    initial content is passed in (the block's ``memory_bank``)."""

    def __init__(self, n_embd: int, num_slots: int, num_heads: int, gate_normalizer: float = 1.0,
                 chunk_size: int | None = None, output_gate: bool = False,
                 retention: tuple[float, float] = RETENTION_TOKENS, feature_map: str = "none"):
        super().__init__()
        self.num_heads, self.num_slots, self.head_dim = num_heads, num_slots, n_embd // num_heads
        self.query = nn.Linear(n_embd, n_embd, bias=False)
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.forget = nn.Linear(n_embd, num_heads * num_slots)
        with torch.no_grad():  # the weights start small, so the bias sets the initial retention
            self.forget.bias.copy_(retention_bias(num_slots, gate_normalizer, retention).repeat(num_heads))
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.out = nn.Linear(n_embd, n_embd, bias=False)
        # GSA's output gate (off by default: docs/kv-memory.md, "Design choices, measured")
        self.out_gate = nn.Linear(n_embd, n_embd, bias=False) if output_gate else None
        self.gate_normalizer = gate_normalizer
        self.chunk_size = chunk_size
        self.feature_map = query_key_map(feature_map)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B*H, T, d)."""
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2).reshape(B * self.num_heads, T, -1)

    def _head_views(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H X) -> (B, H, T, X), a view: the fused kernel reads it in place."""
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, -1).transpose(1, 2)

    @staticmethod
    def _rows(x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, X) -> (B*H, T, X), the layout of the step-by-step forms (a copy)."""
        return x.reshape(-1, *x.shape[2:])

    def input_projections(self) -> list[nn.Linear]:
        """The projections that read h, in the order :meth:`from_projections` takes their
        outputs (the block's fast path runs them as one matmul)."""
        return [self.query, self.value, self.forget]

    def from_projections(self, projected: list[torch.Tensor], keys: torch.Tensor,
                         real: torch.Tensor | None = None):
        """q, k, v (B, H, T, d) and log_alpha (B, H, T, S), views of (B, T, H, .) tensors, from
        the outputs (B, T, .) of :meth:`input_projections` and the key projection. With a
        padding mask ``real`` (B, T), pad positions get alpha = 1: they write nothing."""
        q, v, forget = projected
        if self.feature_map is not None:
            q, keys = self.feature_map(q), self.feature_map(keys)
        log_alpha = F.logsigmoid(forget)
        if self.gate_normalizer != 1:  # a division by 1 is a pass over (B, T, H S) for nothing
            log_alpha = log_alpha / self.gate_normalizer
        if real is not None:
            log_alpha = log_alpha * real.unsqueeze(-1).to(log_alpha.dtype)
        return tuple(self._head_views(x) for x in (q * self.head_dim ** -0.5, keys, v, log_alpha))

    def inputs(self, h: torch.Tensor, key_source: torch.Tensor, real: torch.Tensor | None = None):
        """:meth:`from_projections` for normalized input h and the key source."""
        projected = [decode.linear(h, m.weight, m.bias) for m in self.input_projections()]
        return self.from_projections(projected, decode.linear(key_source, self.key.weight), real)

    def initial_state(self, memory_bank: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank (S, C) as the key and the value slots of every head: two (B*H, S, d)."""
        bank = memory_bank.view(self.num_slots, self.num_heads, self.head_dim).transpose(0, 1)
        bank = bank.unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * self.num_heads, self.num_slots, -1)
        return bank, bank

    def _output(self, reads: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(B, H, T, d) or (B*H, T, d) -> (B, T, C): per-head RMSNorm, then :meth:`_project`. The
        fused kernel's reads lie in (B, T, H, d) memory: they concatenate without a copy."""
        reads = reads.view(h.shape[0], self.num_heads, h.shape[1], self.head_dim)
        return self._project(self.norm(reads.to(self.norm.weight.dtype)), h)  # fp32 under autocast: one kernel

    def _project(self, reads: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Normalized reads (B, H, T, d) -> (B, T, C): heads concatenated, (gated by swish(W_g h)
        with the output gate,) projected."""
        batch, T = h.shape[:2]
        heads = reads.transpose(1, 2).reshape(batch, T, -1)
        if self.out_gate is not None:
            heads = heads * F.silu(decode.linear(h, self.out_gate.weight))
        return decode.linear(heads, self.out.weight)

    def forward(self, h: torch.Tensor, key_source: torch.Tensor, memory_bank: torch.Tensor,
                reference: bool = False, real: torch.Tensor | None = None) -> torch.Tensor:
        """Reads (B, T, C) for normalized input h and the key source (B, T, C): the training
        form (:meth:`read_projections`; with a padding mask, :meth:`read`), or with
        ``reference`` the step-by-step recurrence."""
        if reference or real is not None:
            return self.read(self.inputs(h, key_source, real), h, memory_bank, reference)
        projected = [decode.linear(h, m.weight, m.bias) for m in self.input_projections()]
        return self.read_projections(projected, decode.linear(key_source, self.key.weight), h, memory_bank)

    def fused_read_applies(self, q: torch.Tensor) -> bool:
        """Whether :meth:`read_projections` takes the fused kernel with the gate's logsigmoid, the
        query's scale and the RMSNorm inside it: where the kernel applies
        (:func:`gam.ops.kv_memory.fused_applies`) and the gate is a plain sigmoid (normalizer 1)."""
        return self.gate_normalizer == 1 and fused_applies(q, self.num_slots)

    def read_projections(self, projected: list[torch.Tensor], keys: torch.Tensor, h: torch.Tensor,
                         memory_bank: torch.Tensor) -> torch.Tensor:
        """Reads (B, T, C) from the outputs (B, T, .) of :meth:`input_projections` and the key
        projection, no padding: where :meth:`fused_read_applies`, one kernel from the forget
        logits to the normalized reads (no passes for the logsigmoid, the query's scale, the
        norm or their gradients); else :meth:`from_projections` and :meth:`read`."""
        q, v, forget = projected
        if not self.fused_read_applies(q):
            return self.read(self.from_projections(projected, keys), h, memory_bank)
        if self.feature_map is not None:
            q, keys = self.feature_map(q), self.feature_map(keys)
        q, keys, v, forget = (self._head_views(x) for x in (q, keys, v, forget))
        slots = bank_slots(memory_bank, h.shape[0], self.num_heads)  # a view: the kernel reads the bank in place
        reads, _ = kv_memory_fused(q, keys, v, forget, (slots, slots), gate_logits=True, q_scale=self.head_dim ** -0.5,
                                   norm_weight=self.norm.weight, norm_eps=self.norm.eps)
        return self._project(reads, h)

    def read(self, inputs: tuple, h: torch.Tensor, memory_bank: torch.Tensor,
             reference: bool = False) -> torch.Tensor:
        """Reads (B, T, C) from :meth:`inputs` (or :meth:`from_projections`)."""
        q, k, v, log_alpha = inputs
        state = self.initial_state(memory_bank, h.shape[0])
        if reference:
            reads, _ = kv_memory_recurrent(*map(self._rows, inputs), state)
        else:
            reads, _ = kv_memory(q, k, v, log_alpha, state, self.chunk_size)
        return self._output(reads, h)

    def final_state(self, h: torch.Tensor, key_source: torch.Tensor, memory_bank: torch.Tensor,
                    real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots after a prompt, (B, H, S, d) each (the cache's layout), without the reads."""
        B = h.shape[0]
        _, k, v, log_alpha = map(self._rows, self.inputs(h, key_source, real))
        K, V = kv_memory_final_state(k, v, log_alpha, self.initial_state(memory_bank, B))
        return K.view(B, self.num_heads, self.num_slots, -1), V.view(B, self.num_heads, self.num_slots, -1)

    # the cache contract of both write rules (GAMBlock.allocate_inference_cache / prefill / step)
    def new_cache(self, batch: int, memory_bank: torch.Tensor, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> dict:
        """Key and value slots, (B, H, S, d) each, holding the bank."""
        bank = memory_bank.detach().view(self.num_slots, self.num_heads, self.head_dim).transpose(0, 1)
        bank = bank.to(dtype=dtype or bank.dtype, device=device or bank.device)
        return {"key_slots": bank.expand(batch, *bank.shape).clone(),
                "value_slots": bank.expand(batch, *bank.shape).clone()}

    def fill_cache(self, cache: dict, h: torch.Tensor, key_source: torch.Tensor, memory_bank: torch.Tensor,
                   real: torch.Tensor | None = None) -> None:
        """The slots after a prompt, without the reads."""
        keys, values = self.final_state(h, key_source, memory_bank, real)
        cache["key_slots"].copy_(keys)
        cache["value_slots"].copy_(values)

    def step(self, h: torch.Tensor, key_source: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token per row, (B, 1, C); updates the cache's slots in place."""
        key_slots, value_slots = cache["key_slots"], cache["value_slots"]
        B = h.shape[0]
        q, k, v, log_alpha = (x[:, :, 0].reshape(B * self.num_heads, -1) for x in self.inputs(h, key_source))
        flat = (B * self.num_heads, self.num_slots, self.head_dim)
        out, (K, V) = kv_memory_step(q, k, v, log_alpha,
                                     (key_slots.reshape(flat).to(h.dtype), value_slots.reshape(flat).to(h.dtype)))
        key_slots.copy_(K.view_as(key_slots))
        value_slots.copy_(V.view_as(value_slots))
        return self._output(out.unsqueeze(1), h)


class DeltaRuleMemory(nn.Module):
    """The kv-slot GAM's alternative write rule (``memory_write="delta"``): per head
    one d x d matrix written by the gated delta rule (Gated DeltaNet; the
    recurrence and its forms in :mod:`gam.ops.delta_rule`)::

        q_t = l2norm(W_q h_t) / sqrt(d)   k_t = l2norm(W_k local_t)   v_t = W_v h_t     (split in H heads)
        log alpha_t = logsigmoid(W_f h_t + b_f) / gate_normalizer     beta_t = sigmoid(W_b h_t)   (H each)
        S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   S_0 = 0
        read_t = W_o RMSNorm(S_t^T q_t)

    Keys and queries are unit length, which keeps ``I - beta k k^T`` a
    contraction (the delta rule's stability condition, as in DeltaNet). One
    forget gate per head (a scalar, as Gated DeltaNet), its bias starting the
    heads at retention times log-spaced over :data:`RETENTION_TOKENS` as the
    slots' are. No memory bank: the state starts empty. The keys' source, the
    normalizer, the RMSNorm and the output projection (and the optional output
    gate) are the slot memory's, so the write rule is the one thing changed.
    """

    def __init__(self, n_embd: int, num_heads: int, gate_normalizer: float = 1.0,
                 chunk_size: int | None = None, output_gate: bool = False,
                 retention: tuple[float, float] = RETENTION_TOKENS, feature_map: str = "none"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, n_embd // num_heads
        self.query = nn.Linear(n_embd, n_embd, bias=False)
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.forget = nn.Linear(n_embd, num_heads)
        self.write_strength = nn.Linear(n_embd, num_heads)  # beta, 0.5 at the start
        with torch.no_grad():
            self.forget.bias.copy_(retention_bias(num_heads, gate_normalizer, retention))
            self.write_strength.bias.zero_()
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.out = nn.Linear(n_embd, n_embd, bias=False)
        self.out_gate = nn.Linear(n_embd, n_embd, bias=False) if output_gate else None
        self.gate_normalizer = gate_normalizer
        self.chunk_size = chunk_size
        self.feature_map = query_key_map(feature_map)

    _heads = KVSlotMemory._heads
    _output = KVSlotMemory._output
    _project = KVSlotMemory._project

    def _per_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B*H, T)."""
        return x.transpose(1, 2).reshape(-1, x.shape[1])

    def input_projections(self) -> list[nn.Linear]:
        """The projections that read h, in the order :meth:`from_projections` takes them."""
        return [self.query, self.value, self.forget, self.write_strength]

    def from_projections(self, projected: list[torch.Tensor], keys: torch.Tensor,
                         real: torch.Tensor | None = None):
        """q, k, v (B*H, T, d), log_alpha and beta (B*H, T) from the outputs of
        :meth:`input_projections` and the key projection. With a padding mask ``real``
        (B, T), pad positions get alpha = 1 and beta = 0: they change nothing."""
        q, v, forget, strength = projected
        if self.feature_map is not None:  # before the unit normalization, as Gated DeltaNet
            q, keys = self.feature_map(q), self.feature_map(keys)
        log_alpha = F.logsigmoid(forget) / self.gate_normalizer
        beta = torch.sigmoid(strength)
        if real is not None:
            keep = real.unsqueeze(-1).to(log_alpha.dtype)
            log_alpha, beta = log_alpha * keep, beta * keep
        q = F.normalize(self._heads(q), dim=-1) * self.head_dim ** -0.5
        k = F.normalize(self._heads(keys), dim=-1)
        return q, k, self._heads(v), self._per_head(log_alpha), self._per_head(beta)

    inputs = KVSlotMemory.inputs

    def read_projections(self, projected: list[torch.Tensor], keys: torch.Tensor, h: torch.Tensor,
                         memory_bank: None = None) -> torch.Tensor:
        """Reads (B, T, C) from the outputs of :meth:`input_projections` and the key projection."""
        return self.read(self.from_projections(projected, keys), h, memory_bank)

    def _empty_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch * self.num_heads, self.head_dim, self.head_dim)

    def forward(self, h: torch.Tensor, key_source: torch.Tensor, memory_bank: None = None,
                reference: bool = False, real: torch.Tensor | None = None) -> torch.Tensor:
        """Reads (B, T, C): the chunked form, or with ``reference`` the recurrence."""
        return self.read(self.inputs(h, key_source, real), h, memory_bank, reference)

    def read(self, inputs: tuple, h: torch.Tensor, memory_bank: None = None, reference: bool = False) -> torch.Tensor:
        """Reads (B, T, C) from :meth:`inputs` (or :meth:`from_projections`)."""
        q, k, v, log_alpha, beta = inputs
        state = self._empty_state(h.shape[0], v)
        if reference:
            reads, _ = delta_rule_recurrent(q, k, v, log_alpha, beta, state)
        else:
            reads, _ = delta_rule_chunked(q, k, v, log_alpha, beta, state, self.chunk_size)
        return self._output(reads, h)

    def new_cache(self, batch: int, memory_bank: None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> dict:
        """The matrix of every head, (B, H, d, d), empty."""
        weight = self.value.weight
        return {"delta_state": torch.zeros(batch, self.num_heads, self.head_dim, self.head_dim,
                                           dtype=dtype or weight.dtype, device=device or weight.device)}

    def fill_cache(self, cache: dict, h: torch.Tensor, key_source: torch.Tensor, memory_bank: None = None,
                   real: torch.Tensor | None = None) -> None:
        """The state after a prompt (the chunked form's; its reads are dropped)."""
        q, k, v, log_alpha, beta = self.inputs(h, key_source, real)
        _, state = delta_rule_chunked(q, k, v, log_alpha, beta, self._empty_state(h.shape[0], v), self.chunk_size)
        cache["delta_state"].copy_(state.view_as(cache["delta_state"]))

    def step(self, h: torch.Tensor, key_source: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token per row, (B, 1, C); updates the cache's state in place."""
        state = cache["delta_state"]
        q, k, v, log_alpha, beta = self.inputs(h, key_source)
        out, new = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], log_alpha[:, 0], beta[:, 0],
                                   state.reshape(-1, self.head_dim, self.head_dim).to(h.dtype))
        state.copy_(new.view_as(state))
        return self._output(out.unsqueeze(1), h)
