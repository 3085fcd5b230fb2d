"""Autoregressive generation with per-layer inference caches.

Every block type follows one contract (as mamba-ssm and flash-linear-attention
do)::

    state = block.allocate_inference_cache(batch_size, max_seqlen, dtype=None, device=None)  # a dict
    y     = block.prefill(x, state)    # parallel forward over a prompt (B, T, C), fills the state
    y_t   = block.step(x_t, state)     # one token (B, 1, C), updates the state in place

What the state holds:

- GAM: the last ``k-1`` LayerNorm1 outputs per layer (the causal conv's
  window), ``(B, C, k-1)``; nothing for ``global_only``. Its size does not
  depend on the context length, so every token costs the same.
- Transformer: a KV cache, preallocated ``(B, n_head, max_seqlen, head_dim)``
  buffers plus a length; grows (doubling) if a sequence outgrows it.
- Mamba: the mixer's ``conv_state`` and ``ssm_state`` (constant size).

:class:`InferenceCache` gathers the per-layer dicts of a :class:`DecoderLM`
with the position of the next token. :func:`forward_cached` runs a prefill when
the cache is empty, else one step per token; :func:`generate` samples from it.
:class:`GenerationMixin` makes them methods of the model (``model.generate``),
as mamba-ssm's ``GenerationMixin`` does: ``DecoderLM`` inherits it, and this
module reads the model only through its ``config``, ``embed``, ``blocks``,
``ln_f`` and ``head``, so it imports no model module.

Padding: a left-padded batch (``attention_mask``, see :mod:`gam.models.lm`)
is given at prefill. Each block keeps the pads out of its state (GAM and
Mamba store zeros for them; the KV cache records which keys are padding), and
the cache remembers each row's pad count, so every later token's position is
counted from that row's first real token. Steps take real tokens only.

Positions: with learned positions (the paper) a model never sees a position
past ``block_size - 1``. Generation past that slides the window: each new token
is predicted from the last ``block_size`` tokens, re-prefilled into a fresh
cache, which is what cropping the input to the last ``block_size`` tokens
gives. With ``pos_embedding="none"`` there is no limit, and GAM keeps its
constant-size state however long the text.
"""

from __future__ import annotations

import math
import types
import warnings
import weakref
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam.inputs import check_token_ids, padding_mask, positions_from_mask
from gam.ops import decode


class InferenceCache:
    """Decoding state of a :class:`gam.models.lm.DecoderLM`: one dict per block.

    ``position`` is the number of tokens the state holds (the position of the
    next token); ``seen_tokens`` counts every token fed since allocation
    (larger than ``position`` once a learned-position window has slid). It is
    also the cache object the Hugging Face wrapper hands to ``generate()``
    (``get_seq_length``, ``reorder_cache`` for beam search).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, layers: list[dict], batch_size: int, max_seqlen: int, compiled: bool = False):
        self.layers = layers
        self.batch_size = batch_size
        self.max_seqlen = max_seqlen
        self.compiled = compiled  # steps through the torch.compile'd token step (:func:`compiled_step`)
        self.warm = False  # a compiled step has run with this cache
        self.position = 0
        self.seen_tokens = 0
        self.pad_lengths: torch.Tensor | None = None  # (B,) left-pad count per row of a padded prompt

    @classmethod
    def allocate(cls, model: nn.Module, batch_size: int, max_seqlen: int | None = None,
                 dtype: torch.dtype | None = None, device=None, compiled: bool = False) -> "InferenceCache":
        if max_seqlen is None:
            max_seqlen = model.config.max_seq_len or model.config.block_size
        layers = [block.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, device=device)
                  for block in model.blocks]
        return cls(layers, batch_size, max_seqlen, compiled)

    def restart(self, model: nn.Module) -> None:
        """Empty the state (fresh buffers), keeping ``seen_tokens``: a window slide."""
        fresh = InferenceCache.allocate(model, self.batch_size, self.max_seqlen, compiled=self.compiled)
        self.layers, self.position, self.pad_lengths = fresh.layers, 0, None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers:
            for name, value in layer.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    layer[name] = value.index_select(0, beam_idx.to(value.device))
        if self.pad_lengths is not None:
            self.pad_lengths = self.pad_lengths.index_select(0, beam_idx.to(self.pad_lengths.device))
        self.batch_size = int(beam_idx.numel())

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (a KV cache counts its preallocated buffers)."""
        return sum(v.numel() * v.element_size() for layer in self.layers
                   for v in layer.values() if isinstance(v, torch.Tensor))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={len(self.layers)}, batch_size={self.batch_size}, "
                f"position={self.position}, seen_tokens={self.seen_tokens})")


def forward_cached(model: nn.Module, idx: torch.Tensor, cache: InferenceCache,
                   last_only: bool = False, attention_mask: torch.Tensor | None = None,
                   hidden_states: list | None = None) -> torch.Tensor:
    """Logits for tokens ``idx`` (B, T) that continue the sequence in ``cache``.

    An empty cache gets one parallel prefill pass; otherwise the tokens are fed
    one step at a time. Returns (B, T, V), or (B, 1, V) with ``last_only``.
    ``attention_mask``: a left-padded prompt (prefill only; later tokens are
    real). ``hidden_states``: a list to append the embeddings, each block's
    output and the final-normed output to (as ``DecoderLM.forward``).
    """
    check_token_ids(idx, model.config.vocab_size, None)
    B, T = idx.shape
    if B != cache.batch_size:
        raise ValueError(f"batch size {B} does not match the cache's {cache.batch_size}")
    limit = model.config.max_seq_len
    if limit is not None and cache.position + T > limit:
        raise ValueError(
            f"position {cache.position + T - 1} is past block_size {limit} (learned positions): "
            f"slide the window, i.e. prefill the last {limit} tokens into a fresh cache "
            "(generate() does this)")
    real = padding_mask(attention_mask, idx, prompt=True)
    if real is not None and cache.position > 0:
        raise ValueError("padding (zeros in attention_mask) is only allowed in the prompt, "
                         "not in tokens that continue a cached sequence")
    collect = hidden_states is not None
    if cache.position == 0:
        positions = None
        if real is not None:
            cache.pad_lengths = (~real).sum(dim=1)
            positions = positions_from_mask(real)
        x = model.embed(idx, 0, positions=positions)
        for block, state in zip(model.blocks, cache.layers):
            if collect:
                hidden_states.append(x[:, -1:] if last_only else x)
            x = block.prefill(x, state) if real is None else block.prefill(x, state, real)
        if last_only:
            x = x[:, -1:]
    elif cache.compiled and not collect:
        step, logits = compiled_step(model), []
        for t in range(T):
            positions = _step_positions(model, cache, cache.position + t)
            # After this cache's first step the graph for this model, batch and dtype exists, and
            # nothing a guard checks changes between steps: only the guards that tell compiled
            # graphs apart are evaluated (the full check cost ~0.02 ms a step here).
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=cache.warm):
                # (fresh strides: a graph is specialized to its inputs' strides)
                token = idx[:, t:t + 1].clone(memory_format=torch.contiguous_format)
                logits.append(step(model, token, positions, cache.layers))
            cache.warm = True
        cache.position += T
        cache.seen_tokens += T
        return logits[-1] if last_only else torch.cat(logits, dim=1)
    else:
        outs, layer_inputs = [], [[] for _ in model.blocks]
        for t in range(T):
            start = cache.position + t
            x_t = model.embed(idx[:, t:t + 1], start, positions=_step_positions(model, cache, start))
            for inputs, block, state in zip(layer_inputs, model.blocks, cache.layers):
                if collect:
                    inputs.append(x_t)
                x_t = block.step(x_t, state)
            outs.append(x_t)
        x = outs[-1] if last_only else torch.cat(outs, dim=1)
        if collect:
            hidden_states.extend(inputs[-1] if last_only else torch.cat(inputs, dim=1) for inputs in layer_inputs)
    cache.position += T
    cache.seen_tokens += T
    h = model.ln_f(x)
    if collect:
        hidden_states.append(h)
    return model.head(h)


def token_step(model: nn.Module, idx: torch.Tensor, positions: torch.Tensor | None,
               layers: list[dict]) -> torch.Tensor:
    """One token per row (B, 1) through every block's ``step`` and the head: logits (B, 1, V),
    the layers' state updated in place. ``positions``: (B, 1), or None without position
    embeddings. The computation of :func:`forward_cached`'s step loop for one token, as one
    function that :func:`compiled_step` compiles whole."""
    x = model.embed(idx, positions=positions)
    for block, state in zip(model.blocks, layers):
        x = block.step(x, state)
    return decode.linear(model.ln_f(x), model.head.weight, model.head.bias)


_COMPILED_STEP = None
# The frozen step's Inductor options: each product's GEMM kernel picked by timing Inductor's C++
# templates against oneDNN's, its table not printed. (Freezing itself is not an option of the
# compile: Dynamo reads it as it traces, so the step runs with it patched into the config.)
FROZEN_STEP_OPTIONS = {"max_autotune": True, "autotune_num_choices_displayed": 0,
                       "max_autotune_report_choices_stats": False}


class _FrozenStep:
    """A model's compiled step with its weights frozen, and what tells that they have changed:
    the model's tables of weights and of submodules, read again before each step: the identity
    of every submodule and tensor, each tensor's storage and in-place version counter (23 us a
    step for the decode bench's 6-layer GAM; walking its modules instead took 134 us)."""

    def __init__(self, model: nn.Module):
        tables = [(m._parameters, m._buffers, m._modules) for m in model.modules()]
        self.weights = [t for p, b, _ in tables for t in (p, b) if t]
        self.modules = [m for _, _, m in tables if m]
        self.version = self.current_version()
        # torch.compile keeps its graphs on the function's code object: a code object of this
        # step's own, so that its graphs (and the packed copy of the weights) go with it
        own = token_step.__code__.replace()
        step = torch.compile(types.FunctionType(own, token_step.__globals__, token_step.__name__),
                             fullgraph=True, dynamic=False, options=FROZEN_STEP_OPTIONS)

        def frozen(*args):
            # (the tuning's timing code calls the deprecated TypedStorage: a warning, not ours)
            with torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                return step(*args)  # freezing applies in inference; with gradients on, inputs
        self.step = frozen

    def current_version(self) -> list:
        version = [id(m) for table in self.modules for m in table.values()]
        version += [(id(t), t.data_ptr(), t._version) for table in self.weights for t in table.values()
                    if t is not None]
        return version


_FROZEN_STEPS: "weakref.WeakKeyDictionary[nn.Module, _FrozenStep]" = weakref.WeakKeyDictionary()


def compiled_step(model: nn.Module):
    """:func:`token_step` under ``torch.compile`` (one graph, static shapes): the step for
    ``model``. The first call for a model, batch size or dtype compiles (seconds to a minute
    on CPU); later calls reuse it.

    For bf16 weights on a CPU with AMX tiles (:func:`gam.ops.decode.tuned_matmul`) the step
    freezes the weights: they are constants of the graph, packed once for the GEMM kernels
    Inductor's tuning picks, 2.1-2.5x faster than the streamed products on the Intel Xeon
    host (docs/generation-and-hf.md). The packed copy costs the weights' bytes again, and a frozen
    graph would not see a weight that has changed: each model gets its own step, compiled
    anew whenever a weight has changed since (in place: an optimizer step, ``load_state_dict``;
    or replaced by another tensor in its module).

    Elsewhere one step serves every model, the weights being inputs: at batch 1 each product
    with a weight becomes one streaming loop over it (:mod:`gam.ops.decode`), and the step's
    small ops fuse: what brings batch-1 decoding near the time to read the weights."""
    global _COMPILED_STEP
    if decode.tuned_matmul(model.head.weight):
        frozen = _FROZEN_STEPS.get(model)
        if frozen is None or frozen.current_version() != frozen.version:
            frozen = _FROZEN_STEPS[model] = _FrozenStep(model)
        return frozen.step
    if _COMPILED_STEP is None:
        # Inductor inlines a cheap elementwise producer into the loop that consumes it; inside a
        # product with a weight that means recomputing it once per weight row (GELU 512 times per
        # layer). At batch 1 every activation is a vector, so writing each one out costs nothing:
        # threshold 0 writes them all (measured: 5.0 -> 3.1 ms a token, docs/generation-and-hf.md).
        _COMPILED_STEP = torch.compile(token_step, fullgraph=True, dynamic=False,
                                       options={"realize_opcount_threshold": 0})
    return _COMPILED_STEP


def _step_positions(model: nn.Module, cache: InferenceCache, start: int) -> torch.Tensor | None:
    """Positions (B, 1) of the token at ``start``, each row counted from its first real token;
    a tensor (a new Python int per step would make the compiled step recompile); None
    without position embeddings."""
    if model.config.pos_embedding != "learned":
        return None
    device = cache.pad_lengths.device if cache.pad_lengths is not None else model.head.weight.device
    positions = torch.full((cache.batch_size, 1), start, dtype=torch.long, device=device)
    if cache.pad_lengths is not None:  # each row counts from its first real token
        positions = positions - cache.pad_lengths[:, None]
    return positions


# ---------------------------------------------------------------- sampling

def check_sampling(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any = None) -> None:
    """Raise a one-line ValueError for a bad generation setting."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None = off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); temperature 0 is greedy."""
    if temperature == 0:  # fp32 first: the same index (exact), and PyTorch's bf16 argmax is
        return logits.float().argmax(dim=-1)  # scalar on CPU (32 vs 9 us over 10,000 logits)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _prompt(model: nn.Module, idx: Any) -> torch.Tensor:
    if isinstance(idx, torch.Tensor) and idx.numel() == 0:
        raise ValueError("empty prompt: generation needs at least one token")
    if isinstance(idx, torch.Tensor) and idx.dim() == 1:
        idx = idx.unsqueeze(0)
    check_token_ids(idx, model.config.vocab_size, None, name="prompt")
    return idx


def _prompt_mask(idx: torch.Tensor, attention_mask: Any) -> torch.Tensor | None:
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    return padding_mask(attention_mask, idx, prompt=True)


def stream(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, attention_mask: torch.Tensor | None = None,
           compiled: bool = False) -> Iterator[torch.Tensor]:
    """Yield each new token (B,) as it is sampled; see :func:`generate`."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    idx = _prompt(model, idx)
    real = _prompt_mask(idx, attention_mask)
    return _stream(model, idx, max_new_tokens, temperature, top_k, top_p, seed, real, compiled)


def _stream(model, idx, max_new_tokens, temperature, top_k, top_p, seed, real=None, compiled=False):
    if max_new_tokens == 0:
        return
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=idx.device)
        generator.manual_seed(seed)
    limit = model.config.max_seq_len  # None: no limit (pos_embedding="none")
    B, T = idx.shape
    was_training = model.training
    model.eval()
    try:
        tokens = idx[:, -limit:] if limit is not None else idx
        if real is not None and limit is not None:
            real = real[:, -limit:]
        with torch.no_grad():
            max_seqlen = limit if limit is not None else T + max_new_tokens
            cache = model.allocate_inference_cache(B, max_seqlen, device=idx.device, compiled=compiled)
            logits = forward_cached(model, tokens, cache, last_only=True, attention_mask=real)[:, -1]
        for i in range(max_new_tokens):
            with torch.no_grad():
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
            yield nxt
            if i == max_new_tokens - 1:
                break
            with torch.no_grad():
                if limit is not None and cache.position >= limit:
                    # the window is full: slide it and re-prefill the last block_size tokens
                    tokens = torch.cat([tokens, nxt[:, None]], dim=1)[:, -limit:]
                    if real is not None:  # the pads still in the window stay masked
                        real = torch.cat([real, real.new_ones(B, 1)], dim=1)[:, -limit:]
                    cache.restart(model)
                    logits = forward_cached(model, tokens, cache, last_only=True, attention_mask=real)[:, -1]
                else:
                    if limit is not None:
                        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                        if real is not None:
                            real = torch.cat([real, real.new_ones(B, 1)], dim=1)
                    logits = forward_cached(model, nxt[:, None], cache, last_only=True)[:, -1]
    finally:
        model.train(was_training)


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, attention_mask: torch.Tensor | None = None,
             compiled: bool = False) -> torch.Tensor:
    """Extend prompt ``idx`` (B, T) by ``max_new_tokens`` tokens: returns (B, T + max_new_tokens).

    ``temperature=0`` picks the most likely token (greedy); otherwise tokens are
    sampled from ``softmax(logits / temperature)``, restricted to the ``top_k``
    most likely (0 or None: all) and to the smallest set whose probability
    reaches ``top_p`` (nucleus). ``seed`` makes sampling reproducible without
    touching the global RNG. The prompt is prefilled in one parallel pass, then
    each token costs one cached step. A 1-D prompt gives a 1-D result.

    Prompts of different lengths go in one batch left-padded, with
    ``attention_mask`` (B, T) 1 at real tokens and 0 at the padding: each row
    then generates what it generates alone (greedy), and the result keeps the
    padding in front.

    ``compiled``: each step after the prompt runs through :func:`compiled_step`, one
    ``torch.compile``'d graph for the whole model (the first step compiles it).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    one_d = isinstance(idx, torch.Tensor) and idx.dim() == 1
    idx = _prompt(model, idx)
    real = _prompt_mask(idx, attention_mask)
    new = list(_stream(model, idx, max_new_tokens, temperature, top_k, top_p, seed, real, compiled))
    out = torch.cat([idx] + [t[:, None].to(idx.dtype) for t in new], dim=1)
    return out[0] if one_d else out


class GenerationMixin:
    """Cached decoding as methods of a language model (``DecoderLM`` inherits it)."""

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None,
                                 dtype: torch.dtype | None = None, device=None,
                                 compiled: bool = False) -> InferenceCache:
        """Per-layer decoding state for ``batch_size`` sequences; ``compiled``: steps run
        through the compiled token step (:func:`compiled_step`)."""
        return InferenceCache.allocate(self, batch_size, max_seqlen, dtype=dtype, device=device,
                                       compiled=compiled)

    def forward_cached(self, idx: torch.Tensor, cache: InferenceCache, last_only: bool = False,
                       attention_mask: torch.Tensor | None = None,
                       hidden_states: list | None = None) -> torch.Tensor:
        """Logits (B, T, V) for tokens that continue the sequence held in ``cache``:
        one parallel pass when the cache is empty (prefill), then one step per token."""
        return forward_cached(self, idx, cache, last_only=last_only, attention_mask=attention_mask,
                              hidden_states=hidden_states)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, attention_mask: torch.Tensor | None = None,
                 compiled: bool = False) -> torch.Tensor:
        """Prompt (B, T) -> (B, T + max_new_tokens) with the inference cache;
        ``temperature=0`` is greedy. See :func:`generate`."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, attention_mask=attention_mask, compiled=compiled)


# ---------------------------------------------------------------- text

def unk_token_of(tokenizer) -> str | None:
    unk = getattr(tokenizer.model, "unk_token", None)
    if unk:
        return unk
    return "[UNK]" if tokenizer.token_to_id("[UNK]") is not None else None


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``; characters the tokenizer cannot encode become [UNK], with a warning.
    Text that is not Unicode (a lone surrogate: what Python makes of non-UTF-8 bytes on a
    command line) is a one-line ValueError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the prompt is not valid UTF-8 text: {text[err.start:err.end]!r} at character "
                         f"{err.start} (bytes that are not UTF-8, or a lone surrogate)") from None
    enc = tokenizer.encode(text, add_special_tokens=False)
    unk = unk_token_of(tokenizer)
    unk_id = tokenizer.token_to_id(unk) if unk else None
    pieces = list(zip((s for s, _ in enc.offsets), enc.ids))
    unknown = [text[s:e] for i, (s, e) in zip(enc.ids, enc.offsets) if unk_id is not None and i == unk_id]
    # A model without an unk token drops what it cannot encode: put [UNK] there.
    covered = [False] * len(text)
    for s, e in enc.offsets:
        for j in range(s, min(e, len(text))):
            covered[j] = True
    dropped = [j for j, ch in enumerate(text) if not covered[j] and not ch.isspace()]
    if dropped:
        unknown += [text[j] for j in dropped]
        if unk_id is not None:
            pieces = sorted(pieces + [(j, unk_id) for j in dropped], key=lambda p: p[0])
    if unknown:
        shown = ", ".join(repr(c) for c in dict.fromkeys(unknown))
        what = f"became {unk}" if unk_id is not None else "were dropped (the tokenizer has no [UNK])"
        warnings.warn(f"{len(unknown)} piece(s) of the prompt the tokenizer cannot encode {what}: {shown}",
                      UserWarning, stacklevel=2)
    return [i for _, i in pieces]


class TextStreamer:
    """Text increments of a generated continuation, for printing token by token.

    ``printed`` starts as the prompt exactly as the user typed it (``prompt_text``; by default
    the decoded prompt ids) and grows with every piece :meth:`push` returns. Pieces come from
    :class:`gam.tokenizer.StreamDecoder`: a character split across byte-level tokens is printed
    once its last byte arrives.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], prompt_text: str | None = None):
        from gam.tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.printed = prompt_text if prompt_text is not None else tokenizer.decode(list(prompt_ids))

    def push(self, token_id: int) -> str:
        new = self.decoder.push(token_id)
        self.printed += new
        return new

    def finish(self) -> str:
        """What is still held back at the end (an incomplete character becomes U+FFFD)."""
        new = self.decoder.flush()
        self.printed += new
        return new
