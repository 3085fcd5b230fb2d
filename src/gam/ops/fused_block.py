"""The fast path of the GAM block: the same function as the paper's eager code
(:meth:`gam.layers.gam.GAMBlock.forward_reference`), with fewer passes over
memory and less kept for backward. The ops take tensors and parameters; the
block passes its own in (:meth:`gam.layers.gam.GAMBlock.forward_fast`): the
mixing half is :func:`gam_mixer_residual`, the FFN half :func:`ffn_residual`.

- LayerNorm in fp32, its output cast once to the compute dtype (the autocast
  dtype, else the input's) and shared by the gate, the convolution and the
  memory read (the reference casts it three times under autocast).
- Causal depthwise convolution as k shifted multiply-adds in (B, T, C) layout:
  no transposes, no padded copy (:class:`CausalDepthwiseConv`).
- Memory read: the chunked maths of :func:`gam.ops.memory_read.memory_read`
  (softmax recomputed in backward, not stored).
- The full variant's mixer, gate, convolution, memory read, gated fusion and the
  residual add, in one function (:class:`GatedMixerResidual`): it keeps the gate
  values, not their pre-activations, recomputes the convolution output in
  backward, and adds the three gradients of the shared LayerNorm output into one
  buffer by the matmuls themselves.
- The kv-slot block's full mixer likewise (:class:`KVMixerResidual`,
  :func:`kv_mixer_residual`): its memory read is the fused CPU kernel with the gate's
  logsigmoid, the query's scale and the per-head RMSNorm inside
  (:func:`gam.ops.kv_memory.kv_memory_fused`).
- FFN as one function that keeps the GELU input only and recomputes the GELU in
  backward, over chunks of tokens (so the (T, 4C) hidden activations and their
  gradients exist one chunk at a time); its dropout mask comes from 16 random bits per element (about 8x
  cheaper than ``bernoulli_`` on CPU), so the drop probability is p rounded to
  a multiple of 1/65536 (kept values are scaled by 1/(1-p_used): unbiased).

Residual stream, LayerNorm statistics, softmax statistics and all parameter
gradients stay in fp32; matmuls run in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gam.ops.kv_memory as kv_ops
import gam.ops.memory_read as memory_read_ops
from gam.ops.memory_read import acc_dtype, compute_dtype, memory_read, read_backward, read_forward


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False)


# ---------------------------------------------------------------- convolution

def _conv_forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    C, k = weight.shape[0], weight.shape[-1]
    T = h.shape[1]
    w = weight.reshape(C, k).t().to(h.dtype).contiguous()  # (k, C); w[k-1]: the current token
    if bias is not None:
        out = torch.addcmul(bias.to(h.dtype), h, w[k - 1])
    else:
        out = h * w[k - 1]
    for shift in range(1, min(k, T)):
        out[:, shift:].addcmul_(h[:, : T - shift], w[k - 1 - shift])
    return out


def _conv_backward(dout: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                   need_h: bool = True, need_w: bool = True):
    """Gradients of :func:`_conv_forward` for h, weight (its dtype) and bias (fp32+)."""
    C, k = weight.shape[0], weight.shape[-1]
    T = h.shape[1]
    acc = acc_dtype(h.dtype)
    w = weight.reshape(C, k).t().to(h.dtype).contiguous()
    dh = dw = db = None
    if need_h:
        dh = dout * w[k - 1]
        for shift in range(1, min(k, T)):
            dh[:, : T - shift].addcmul_(dout[:, shift:], w[k - 1 - shift])
    if need_w:
        dw = torch.zeros(k, C, dtype=acc, device=h.device)
        for shift in range(0, min(k, T)):
            prod = dout[:, shift:] * h[:, : T - shift]
            dw[k - 1 - shift] = prod.sum(dim=(0, 1))  # fp32 accumulation inside
        dw = dw.t().reshape(weight.shape).to(weight.dtype)
    if has_bias:
        db = dout.sum(dim=(0, 1)).to(acc)
    return dh, dw, db


class CausalDepthwiseConv(torch.autograd.Function):
    """``out[:, t] = b + sum_j w[:, j] * h[:, t - (k-1) + j]`` on (B, T, C), zero history.

    The same function as ``Conv1d(C, C, k, padding=k-1, groups=C)`` cropped to
    the first T outputs, computed as k shifted multiply-adds without transposes.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return _conv_forward(h, weight, bias)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        h, weight = ctx.saved_tensors
        with _no_autocast(h.device.type):
            dh, dw, db = _conv_backward(dout.to(h.dtype), h, weight, ctx.has_bias and ctx.needs_input_grad[2],
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, db


def causal_depthwise_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv of (B, T, C) ``h`` with Conv1d weights (C, 1, k)."""
    with _no_autocast(h.device.type):
        return CausalDepthwiseConv.apply(h, weight, bias)


# ---------------------------------------------------------------- gated fusion

class GatedMixerResidual(torch.autograd.Function):
    """``x + sigmoid(g[..., :C]) * conv(h) + sigmoid(g[..., C:]) * read(h)`` with
    ``g = gate(h)`` and ``read(h) = softmax(h Mᵀ) M``: the full variant's mixer.

    One function, so that backward adds the three gradients of ``h`` (gate,
    convolution, memory read) into one buffer, the matmuls doing the adds, instead
    of autograd summing three tensors. Keeps ``h``, the gate values ``sigmoid(g)``
    (``g`` itself is not needed), the memory read's output and the weights cast to
    the compute dtype (small); the convolution output and the memory read's
    softmax are recomputed in backward. The output has the residual's dtype.
    """

    @staticmethod
    def forward(ctx, x, h, gate_weight, gate_bias, conv_weight, conv_bias, memory_bank, chunk: int):
        C = h.shape[-1]
        dtype = h.dtype
        h2 = h.reshape(-1, C)
        Wg, M = gate_weight.to(dtype), memory_bank.to(dtype)
        g = torch.addmm(gate_bias.to(dtype), h2, Wg.t()) if gate_bias is not None else h2 @ Wg.t()
        gates = g.sigmoid_().view(*h.shape[:-1], 2 * C)  # one pass over the contiguous (N, 2C)
        glob = read_forward(h2, M, chunk).view(h.shape)
        # The mix in the compute dtype (single-dtype ops are vectorized; mixed-dtype
        # ones are not), then one add into the residual's dtype.
        mix = _conv_forward(h, conv_weight, conv_bias).mul_(gates[..., :C])
        mix.addcmul_(gates[..., C:], glob)
        ctx.save_for_backward(h, gates, glob, Wg, M, conv_weight, conv_bias)
        ctx.chunk = chunk
        ctx.dtypes = (gate_weight.dtype, memory_bank.dtype)
        ctx.has_gate_bias = gate_bias is not None
        return x + mix

    @staticmethod
    def backward(ctx, dout):
        h, gates, glob, Wg, M, conv_weight, conv_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with _no_autocast(h.device.type):
            C = h.shape[-1]
            d = dout.to(h.dtype)
            sl, sg = gates[..., :C], gates[..., C:]
            local = _conv_forward(h, conv_weight, conv_bias)          # recomputed
            dg = torch.empty_like(gates)
            tmp = local.mul_(d)                                       # local no longer needed
            torch.ops.aten.sigmoid_backward.grad_input(tmp, sl, grad_input=dg[..., :C])
            torch.mul(d, glob, out=tmp)
            torch.ops.aten.sigmoid_backward.grad_input(tmp, sg, grad_input=dg[..., C:])
            dglob = torch.mul(sg, d)
            dlocal = torch.mul(sl, d, out=tmp)
            # dh: the convolution's part is written, the gate's and the memory read's
            # are added by their matmuls.
            dh, dw, db = _conv_backward(dlocal, h, conv_weight, conv_bias is not None and needs[5],
                                        True, needs[4])
            dh2, dg2, h2 = dh.view(-1, C), dg.view(-1, 2 * C), h.reshape(-1, C)
            dh2.addmm_(dg2, Wg)
            dWg = (dg2.t() @ h2).to(ctx.dtypes[0]) if needs[2] else None
            # (bf16's own sum, fp32 accumulation inside; sum(dtype=float32) would first copy dg)
            dbg = dg2.sum(0).to(acc_dtype(dg.dtype)) if ctx.has_gate_bias and needs[3] else None
            dM = read_backward(h2, M, dglob.view(-1, C), ctx.chunk, dh2, accumulate=True)
        return dout, dh, dWg, dbg, dw, db, dM.to(ctx.dtypes[1]), None


class KVMixerResidual(torch.autograd.Function):
    """``x + sigmoid(g[..., :C]) * conv(h) + sigmoid(g[..., C:]) * W_o read(h)`` with the
    kv-slot memory's read (:func:`gam.ops.kv_memory.kv_memory_fused`: forget logits in,
    query scaled and reads RMS-normalized inside the kernel; keys from the convolution's
    output): the kv-slot block's full mixer, as :class:`GatedMixerResidual` is the paper's.

    One matmul projects ``h`` for the gate, the query, the value and the forget logits (their
    weights cast and joined into one buffer); the gate's sigmoid is taken in place in that
    matmul's output, whose column slices the kernel reads as (B, H, T, X) views. Keeps ``h``,
    that output, the keys, the normalized reads, the memory's output and what the kernel keeps
    for its backward; the convolution is recomputed in backward. Backward: the gradients of
    the four projections are joined into one buffer, so that one matmul gives their share of
    ``dh`` and one their weights'; the keys' share of ``dh`` goes through the convolution's
    backward with the gate's.
    """

    @staticmethod
    def forward(ctx, x, h, gate_weight, gate_bias, query_weight, value_weight, forget_weight, forget_bias,
                conv_weight, conv_bias, key_weight, memory_bank, norm_weight, out_weight, heads: int,
                norm_eps: float):
        B, T, C = h.shape
        N, dtype, d = B * T, h.dtype, C // heads
        h2 = h.reshape(N, C)
        weights = [gate_weight, query_weight, value_weight, forget_weight]
        W = torch.cat([w.to(dtype) for w in weights])
        bias = torch.cat([gate_bias.to(dtype), h.new_zeros(2 * C), forget_bias.to(dtype)])
        P = torch.addmm(bias, h2, W.t())  # (N, 2C | C | C | H S): gate, query, value, forget logits
        gates = P[:, : 2 * C].sigmoid_()
        local = _conv_forward(h, conv_weight, conv_bias).view(N, C)
        Wk, Wo = key_weight.to(dtype), out_weight.to(dtype)
        keys = local @ Wk.t()
        q, k, v, z = (_head_view(y, B, T, heads) for y in (P[:, 2 * C: 3 * C], keys, P[:, 3 * C: 4 * C], P[:, 4 * C:]))
        slots = bank_slots(memory_bank, B, heads)
        keep = any(ctx.needs_input_grad)
        tiles = kv_ops.tiles_apply(q)
        reads, _, _, *kept = kv_ops.fused_forward(q, k, v, z, slots, slots, keep, True, d ** -0.5, norm_weight,
                                                  norm_eps, tiles)
        reads = reads.transpose(1, 2).reshape(N, C)  # (B, T, H, d) memory: a view
        glob = reads @ Wo.t()
        mix = local.mul_(gates[:, :C])
        mix.addcmul_(gates[:, C:], glob)
        ctx.save_for_backward(h, P, keys, reads, glob, W, Wk, Wo, conv_weight, conv_bias, norm_weight, slots, *kept)
        ctx.shapes = (heads, norm_eps, [w.shape[0] for w in weights], tiles)
        ctx.dtypes = [w.dtype for w in (*weights, forget_bias, key_weight, memory_bank, out_weight)]
        return x + mix.view(B, T, C)

    @staticmethod
    def backward(ctx, dout):
        h, P, keys, reads, glob, W, Wk, Wo, conv_weight, conv_bias, norm_weight, slots, *kept = ctx.saved_tensors
        heads, norm_eps, widths, tiles = ctx.shapes
        needs = ctx.needs_input_grad
        B, T, C = h.shape
        N, d = B * T, C // heads
        with _no_autocast(h.device.type):
            dy = dout.to(h.dtype).reshape(N, C)
            sl, sg = P[:, :C], P[:, C: 2 * C]
            local = _conv_forward(h, conv_weight, conv_bias).view(N, C)  # recomputed
            dP = torch.empty_like(P)  # the four projections' gradients, side by side: written in place
            dg = dP[:, : 2 * C]
            tmp = local * dy
            torch.ops.aten.sigmoid_backward.grad_input(tmp, sl, grad_input=dg[:, :C])
            torch.mul(dy, glob, out=tmp)
            torch.ops.aten.sigmoid_backward.grad_input(tmp, sg, grad_input=dg[:, C:])
            dglob = sg * dy
            dlocal = torch.mul(sl, dy, out=tmp)
            d_reads = dglob @ Wo
            dWo = dglob.t() @ reads
            q, k, v, z = (_head_view(y, B, T, heads) for y in (P[:, 2 * C: 3 * C], keys, P[:, 3 * C: 4 * C],
                                                                P[:, 4 * C:]))
            d_final = slots.new_zeros(B * heads, *slots.shape[2:])  # the final slots are not used
            dq, dv, dz = (_head_view(y, B, T, heads) for y in (dP[:, 2 * C: 3 * C], dP[:, 3 * C: 4 * C], dP[:, 4 * C:]))
            dk, dK0, dV0, d_norm = kv_ops.fused_backward_into(
                q, k, v, z, slots, *kept, _head_view(d_reads, B, T, heads), d_final, d_final, True, d ** -0.5,
                norm_weight, norm_eps, tiles, dq, dv, dz)
            d_keys = dk.transpose(1, 2).reshape(N, C)
            dlocal.addmm_(d_keys, Wk)
            dWk = d_keys.t() @ local
            dh, dw, db = _conv_backward(dlocal.view(B, T, C), h, conv_weight, conv_bias is not None and needs[9],
                                        True, needs[8])
            dh.view(N, C).addmm_(dP, W)
            dW = (dP.t() @ h.reshape(N, C)).split(widths)
            d_bias = dP.sum(0).to(acc_dtype(dP.dtype))
            d_bank = (dK0 + dV0).sum(0).transpose(0, 1).reshape(-1, C)  # (B, H, S, d) -> (S, C)
        dtypes = ctx.dtypes
        return (dout, dh, dW[0].to(dtypes[0]), d_bias[: 2 * C], dW[1].to(dtypes[1]), dW[2].to(dtypes[2]),
                dW[3].to(dtypes[3]), d_bias[4 * C:].to(dtypes[4]), dw, db, dWk.to(dtypes[5]), d_bank.to(dtypes[6]),
                d_norm, dWo.to(dtypes[7]), None, None)


def _head_view(y: torch.Tensor, B: int, T: int, heads: int) -> torch.Tensor:
    """(B T, H X) columns -> (B, H, T, X), a view."""
    return y.view(B, T, heads, -1).transpose(1, 2)


def bank_slots(memory_bank: torch.Tensor, B: int, heads: int) -> torch.Tensor:
    """The bank (S, C) as every row's initial slots, (B, H, S, C / H) fp32: a view (batch stride 0)."""
    S, C = memory_bank.shape
    return memory_bank.float().view(S, heads, C // heads).transpose(0, 1).expand(B, -1, -1, -1)


# ---------------------------------------------------------------- FFN

# Tokens per FFN chunk: 2048 x 4C x 4 bytes = 16 MiB of hidden activations at C = 512.
# A training batch of the paper (8-32 x 256 tokens) is one to four chunks; 1024 was
# ~5% slower in bf16 on the 2-core CPU (smaller GEMMs), 4096 no faster.
FFN_CHUNK = 2048
# On a GPU small chunks leave it idle between launches: 16384 x 4C x 2 bytes = 64 MiB.
FFN_CHUNK_CUDA = 16384


def dropout_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """A keep-mask with P(drop) = p rounded to a multiple of 2**-16, and the scale 1/(1-p_used)."""
    n = 1
    for s in shape:
        n *= s
    # 64 random bits per word, read as four int16 (out of place: torch.compile traces it;
    # the one word 2**63 - 1 is never drawn, a bias of 2**-64)
    words = torch.randint(-(2 ** 63), 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    r = words.view(torch.int16)[:n].view(shape)
    drop = round(p * 65536)
    if drop >= 65536:
        return torch.zeros(shape, dtype=torch.bool, device=device), 0.0
    keep = r >= (drop - 32768)
    return keep, 65536.0 / (65536 - drop)


class _MaskedScale(torch.autograd.Function):
    """``where(keep, x, 0) * scale``, keeping only the bool mask for backward.

    Masks multiply as their uint8 view: a bool -> float conversion or ``where`` on
    a bool mask is several times slower on CPU than a multiply by uint8."""

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep.view(torch.uint8)).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep.view(torch.uint8)).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with the 16-bit mask of :func:`dropout_mask`: ``F.dropout``'s
    function (P(drop) = p rounded to a multiple of 2**-16) at about a quarter of its
    cost on CPU, where ``bernoulli_`` dominates ``F.dropout``."""
    if not training or p == 0:
        return x
    keep, scale = dropout_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, keep, scale)


class FFNResidual(torch.autograd.Function):
    """``x + Dropout(Linear2(GELU(Linear1(h))))`` keeping h and the GELU input only.

    ``h`` is in the compute dtype; weights are cast to it (the casts are kept
    for backward: small); ``keep`` is a bool keep-mask or None and ``scale``
    1/(1-p); the output has the residual's dtype. Forward and backward run over
    chunks of ``chunk`` tokens, so the (tokens, 4C) GELU output and its
    gradients exist one chunk at a time. Every elementwise op has a single
    dtype (mixed-dtype ops are not vectorized on CPU).
    """

    @staticmethod
    def forward(ctx, x, h, w1, b1, w2, b2, keep, scale: float, chunk: int):
        dtype = h.dtype
        lead = h.shape[:-1]
        h2 = h.reshape(-1, h.shape[-1])
        N = h2.shape[0]
        W1, W2 = w1.to(dtype), w2.to(dtype)
        B1, B2 = b1.to(dtype), b2.to(dtype)
        u = torch.empty(N, W1.shape[0], dtype=dtype, device=h.device)
        y = torch.empty(N, W2.shape[0], dtype=dtype, device=h.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            torch.addmm(B1, h2[s:e], W1.t(), out=u[s:e])
            torch.addmm(B2, F.gelu(u[s:e]), W2.t(), out=y[s:e])
        y = y.view(*lead, -1)
        if keep is not None:
            y.mul_(keep.view(torch.uint8))  # (see _MaskedScale)
            out = torch.add(x, y, alpha=scale)
        else:
            out = x + y
        ctx.save_for_backward(h2, u, W1, W2, keep)
        ctx.dtypes = (w1.dtype, w2.dtype)
        ctx.scale = scale
        ctx.lead = lead
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        h2, u, W1, W2, keep = ctx.saved_tensors
        with _no_autocast(h2.device.type):
            dtype = h2.dtype
            acc = acc_dtype(dtype)
            d = dout.reshape(-1, dout.shape[-1])
            k = keep.reshape(d.shape) if keep is not None else None
            W2s = W2 * ctx.scale if k is not None else W2     # dropout's scale, folded in
            N = d.shape[0]
            need_h = ctx.needs_input_grad[1]
            dh = torch.empty_like(h2) if need_h else None
            dw1 = dw2 = db1 = db2 = None
            for s in range(0, N, ctx.chunk):
                e = min(s + ctx.chunk, N)
                uc = u[s:e]
                if k is None:
                    dyc = d[s:e].to(dtype)
                elif d.dtype == dtype:
                    dyc = d[s:e] * k[s:e].view(torch.uint8)        # not in place: d is also dx
                else:
                    dyc = d[s:e].to(dtype).mul_(k[s:e].view(torch.uint8))
                a = F.gelu(uc)                                    # recomputed
                part2 = dyc.t() @ a
                del a
                du = torch.ops.aten.gelu_backward(dyc @ W2s, uc)
                part1 = du.t() @ h2[s:e]
                parts = (part1, du.sum(0), part2, dyc.sum(0))
                if need_h:
                    torch.mm(du, W1, out=dh[s:e])
                del du
                if dw1 is None:
                    dw1, db1, dw2, db2 = (t.to(acc) for t in parts)
                else:
                    for total, part in zip((dw1, db1, dw2, db2), parts):
                        total += part
            if k is not None:
                dw2.mul_(ctx.scale)
                db2.mul_(ctx.scale)
        w1_dtype, w2_dtype = ctx.dtypes
        return (dout, (dh.view(*ctx.lead, -1) if need_h else None), dw1.to(w1_dtype), db1, dw2.to(w2_dtype),
                db2, None, None, None)


# ---------------------------------------------------------------- the block's two halves

def _layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm over the last dimension computed as autocast does (input in the
    parameters' dtype, fp32 under mixed precision), returned in the compute dtype. The
    cast matters for an fp16 residual stream with fp32 parameters: CUDA's kernel
    refuses mixed dtypes."""
    if weight is not None and x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(dtype)


def gam_mixer_residual(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                       ln_eps: float, *, conv_weight: torch.Tensor | None = None,
                       conv_bias: torch.Tensor | None = None, gate_weight: torch.Tensor | None = None,
                       gate_bias: torch.Tensor | None = None,
                       memory_bank: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` + the paper's token mixer of ``h = LayerNorm(x)`` (static memory read), fused.

    The variant follows from the parameters given: the gate (with the convolution's
    Conv1d weights (C, 1, k) and the memory bank) is ``full``, the convolution and the
    bank without a gate ``sum_fusion``, one of them alone ``local_only`` or
    ``global_only``. Matmuls run in the compute dtype (autocast's, else the input's),
    the residual keeps its dtype.
    """
    if conv_weight is None and memory_bank is None:
        raise ValueError("gam_mixer_residual needs conv_weight, memory_bank or both")
    if gate_weight is not None and (conv_weight is None or memory_bank is None):
        raise ValueError("gam_mixer_residual: the gate fuses two paths, it needs conv_weight and memory_bank")
    dtype = compute_dtype(x)
    with _no_autocast(x.device.type):
        h = _layer_norm(x, ln_weight, ln_bias, ln_eps, dtype)
        if gate_weight is not None:
            chunk = memory_read_ops.DEFAULT_CHUNK_CUDA if x.is_cuda else memory_read_ops.DEFAULT_CHUNK
            return GatedMixerResidual.apply(x, h, gate_weight, gate_bias, conv_weight, conv_bias, memory_bank,
                                            chunk)
        local = None if conv_weight is None else causal_depthwise_conv(h, conv_weight, conv_bias)
        glob = None if memory_bank is None else memory_read(h, memory_bank)
        if local is not None and glob is not None:
            return x + (local + glob)
        return x + (glob if local is None else local)


def kv_mixer_residual(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, ln_eps: float,
                      *, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, gate_weight: torch.Tensor,
                      gate_bias: torch.Tensor, query_weight: torch.Tensor, value_weight: torch.Tensor,
                      forget_weight: torch.Tensor, forget_bias: torch.Tensor, key_weight: torch.Tensor,
                      memory_bank: torch.Tensor, norm_weight: torch.Tensor, norm_eps: float, out_weight: torch.Tensor,
                      heads: int) -> torch.Tensor:
    """``x`` + the kv-slot block's full mixer of ``h = LayerNorm(x)``, fused
    (:class:`KVMixerResidual`): keys from the convolution, a plain sigmoid forget gate
    (logits ``forget_weight h + forget_bias``), per-head RMSNorm of the reads, no feature map
    and no output gate, on the fused CPU kernel (where :func:`gam.ops.kv_memory.fused_applies`).
    Matmuls run in the compute dtype (autocast's, else the input's), the residual keeps its dtype.
    """
    dtype = compute_dtype(x)
    with _no_autocast(x.device.type):
        h = _layer_norm(x, ln_weight, ln_bias, ln_eps, dtype)
        return KVMixerResidual.apply(x, h, gate_weight, gate_bias, query_weight, value_weight, forget_weight,
                                     forget_bias, conv_weight, conv_bias, key_weight, memory_bank, norm_weight,
                                     out_weight, heads, norm_eps)


def ffn_residual(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, ln_eps: float,
                 w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 dropout_p: float = 0.0) -> torch.Tensor:
    """``x + Dropout(Linear2(GELU(Linear1(LayerNorm(x)))))``, fused (:class:`FFNResidual`).

    ``dropout_p``: the drop probability, 0 outside training; the mask is the 16-bit one
    of :func:`dropout_mask`. Matmuls run in the compute dtype (autocast's, else the
    input's), the residual keeps its dtype.
    """
    dtype = compute_dtype(x)
    with _no_autocast(x.device.type):
        h = _layer_norm(x, ln_weight, ln_bias, ln_eps, dtype)
        mask, scale = None, 1.0
        if dropout_p > 0:
            mask, scale = dropout_mask(x.shape, dropout_p, x.device)
        chunk = FFN_CHUNK_CUDA if x.is_cuda else FFN_CHUNK
        return FFNResidual.apply(x, h, w1, b1, w2, b2, mask, scale, chunk)


def use_fast_path(impl: str, x: torch.Tensor) -> bool:
    """Whether ``config.gam_impl == impl`` takes the fast path (block and LM loss) for ``x``.

    ``auto`` is the fast path on CPU, where it is measured faster (``gam bench
    speed``), and the paper's eager code on CUDA: on an H100 its few large cuBLAS
    calls beat the chunked fused ops (``benchmarks/bench_memory_read.py``,
    ``gam bench scaling --models gam,gam_fast``; docs/results.md, "Table 2 on the H100").
    """
    if impl == "fast":
        return True
    if impl == "reference":
        return False
    return x.device.type == "cpu"
