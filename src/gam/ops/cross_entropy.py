"""Cross-entropy of a language model, fused, in two forms.

:func:`cross_entropy` (the shell's loss when logits are returned) is
``F.cross_entropy(logits.float(), targets)`` (mean, ignore_index -100) as a
custom autograd function over chunks of rows: forward reads the logits once
(fp32 log-softmax of a chunk, in cache) and keeps nothing new; backward
recomputes a chunk's softmax and writes ``softmax - onehot`` once, in the
logits' dtype. PyTorch's composite makes an fp32 copy of bf16 logits, writes an
fp32 log-softmax, zero-fills and scatters an fp32 gradient and casts it back:
about twice the passes over the (tokens, vocab) array.

:func:`linear_cross_entropy` (the training step's loss:
``DecoderLM.forward(idx, targets, return_logits=False)``, which ``gam train``
uses) fuses the head in as well: each chunk's logits are made, turned into the
loss and into ``softmax - onehot`` (fp32 arithmetic, in cache) and written once
as the logits gradient in the compute dtype; ``dW`` is then one matmul over all
tokens. The gradients are computed in the forward pass (when grad is enabled)
and scaled by the upstream gradient in backward, as Liger-Kernel's fused linear
cross-entropy does. No (tokens, vocab) array is kept between forward and backward
but that gradient.

``gam_impl="reference"`` keeps the paper's expression,
``cross_entropy(head(ln_f(x)).float(), targets)``, in both cases.
"""

from __future__ import annotations

import torch

from gam.ops.memory_read import acc_dtype, compute_dtype

# Tokens per chunk: 512 x 10,000 fp32 log-probabilities = 20 MB, in this CPU's 32 MB L3.
# The (512, C) x (C, V) head matmul runs ~20% faster than 256-row ones on the 2-core
# CPU (398 vs 323 GFLOP/s bf16); 1024 is no faster and no longer fits the cache.
DEFAULT_CHUNK = 512


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, V) ``logits`` against (N,) ``targets`` (-100 ignored).

    Forward keeps nothing of size (N, V) but the logits themselves; backward
    recomputes each chunk's softmax (one fused pass: on CPU ``log_softmax`` and
    ``softmax`` are ~4x faster than ``logsumexp`` followed by ``exp(z - lse)``).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        N = logits.shape[0]
        acc = acc_dtype(logits.dtype)
        valid = targets != -100
        safe = torch.where(valid, targets, 0)
        picked = torch.empty(N, dtype=acc, device=logits.device)  # log p(target) per row
        for s in range(0, N, chunk):
            lp = torch.log_softmax(logits[s:s + chunk], dim=-1, dtype=acc)  # fp32, this chunk only
            picked[s:s + chunk] = lp.gather(1, safe[s:s + chunk, None]).squeeze(1)
        n_valid = valid.sum()
        # mean over valid rows; no valid row gives nan, as F.cross_entropy does
        loss = -torch.where(valid, picked, 0.0).sum() / n_valid
        ctx.save_for_backward(logits, safe, valid, n_valid)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe, valid, n_valid = ctx.saved_tensors
        N = logits.shape[0]
        acc = acc_dtype(logits.dtype)
        # d loss / d logits[i] = (softmax(logits[i]) - onehot(target[i])) * g / n_valid on valid rows
        row_scale = valid.to(acc) * (grad_loss.to(acc) / n_valid)
        dlogits = torch.empty_like(logits)
        for s in range(0, N, ctx.chunk):
            e = min(s + ctx.chunk, N)
            p = torch.softmax(logits[s:e], dim=-1, dtype=acc).mul_(row_scale[s:e, None])
            p[torch.arange(e - s, device=p.device), safe[s:e]] -= row_scale[s:e]
            dlogits[s:e] = p
        return dlogits, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``F.cross_entropy(logits.float().view(-1, V), targets.view(-1))``: mean over
    targets != -100, fp32 arithmetic, gradient in the logits' dtype, fewer passes."""
    V = logits.shape[-1]
    with torch.autocast(logits.device.type, enabled=False):
        return CrossEntropy.apply(logits.reshape(-1, V), targets.reshape(-1), chunk)


def _bf16_softmax_loss_grad(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                            rows: torch.Tensor) -> torch.Tensor:
    """Per-row loss of one chunk, and ``softmax - onehot`` written into ``rows``, in bf16.

    Two passes over the (n, V) chunk after its matmul instead of five: the logits
    are written into ``rows`` and turned into their softmax in place (bf16 out, fp32
    arithmetic inside), then the entries other than the target are summed per row
    (fp32 accumulation; bf16's own sum, since a sum with ``dtype=float32`` first
    copies the chunk to fp32). With p the softmax (bf16) and q that sum: the target
    entry is -q (the exact p_t - 1 = -sum of the other entries, so each row of the
    gradient sums to zero as the exact one does, and a confident p_t = 0.999 keeps
    its -0.001 instead of rounding to 0), and the loss is -log p_t, or -log1p(-q)
    when p_t >= 1/2 (so the small loss of a confident token is not the log of a
    number rounded near 1). p_t and q have relative errors of at most 2**-9, so the
    loss of a row is within about 0.002 nats of the fp32 log-softmax's; the bf16
    rounding of the logits themselves (up to 0.03 at |logit| >= 8) moves it more.
    The gradient entries other than the target are the bf16 softmax the exact route
    writes too.
    """
    torch.mm(h, W.t(), out=rows)
    torch.ops.aten._softmax.out(rows, -1, False, out=rows)  # row-wise, in place: exact (tested)
    # (index assignment, not scatter_: on CPU scatter_ copies the whole chunk, twice)
    at = (torch.arange(rows.shape[0], device=rows.device), targets)
    p_t = rows[at]
    rows[at] = 0.0
    others = rows.sum(-1)  # 1 - p_t: fp32 accumulation, rounded once to bf16
    rows[at] = others.neg()
    p_t, others = p_t.float(), others.float()
    loss = torch.where(p_t < 0.5, -torch.log(p_t), -torch.log1p(-others))
    return torch.where(valid, loss, 0.0)


def _bf16_softmax_loss_grad_functional(logits: torch.Tensor, targets: torch.Tensor,
                                       valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_bf16_softmax_loss_grad` without in-place writes, for torch.compile:
    (per-row loss, ``softmax - onehot``) of bf16 ``logits``, the same arithmetic."""
    p = torch.softmax(logits, dim=-1)
    is_target = torch.arange(logits.shape[1], device=logits.device) == targets[:, None]
    p_t = p.gather(1, targets[:, None]).squeeze(1)
    others = torch.where(is_target, 0.0, p).sum(-1)  # 1 - p_t, rounded once to bf16
    grad = torch.where(is_target, others.neg()[:, None], p)
    p_t, others = p_t.float(), others.float()
    loss = torch.where(p_t < 0.5, -torch.log(p_t), -torch.log1p(-others))
    return torch.where(valid, loss, 0.0), grad


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (ignore_index -100)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        dtype = h.dtype
        N = h.shape[0]
        W = weight.to(dtype)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != -100
        n_valid = valid.sum()  # a tensor: no host sync (a device sync on CUDA, a graph break under compile)
        acc = acc_dtype(dtype)
        # bf16 training: the loss is read off the softmax (see _bf16_softmax_loss_grad).
        from_softmax = need_grad and dtype == torch.bfloat16
        if from_softmax and torch.compiler.is_compiling():
            # Inductor fuses the whole (N, V) array's softmax, sum and target entries
            # into one kernel; chunks written into one buffer would each become a copy
            # of the buffer (functionalization), so no chunks here.
            losses, dlogits = _bf16_softmax_loss_grad_functional(h @ W.t(), torch.where(valid, targets, 0), valid)
        else:
            losses = torch.zeros(N, dtype=acc, device=h.device)
            dlogits = torch.empty(N, W.shape[0], dtype=dtype, device=h.device) if need_grad else None
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                ok = valid[s:e]
                tc = torch.where(ok, targets[s:e], 0)
                if from_softmax:
                    losses[s:e] = _bf16_softmax_loss_grad(h[s:e], W, tc, ok, dlogits[s:e])
                    continue
                # (n, V) fp32 log-probabilities of this chunk only (the cast to fp32 is
                # log_softmax's own, on a chunk that stays in cache)
                logits = h[s:e] @ W.t()
                lp = torch.log_softmax(logits, dim=-1, dtype=acc)
                lp_target = lp.gather(1, tc[:, None]).squeeze(1)
                losses[s:e] = torch.where(ok, -lp_target, 0.0)
                if need_grad:
                    # softmax - onehot, unscaled (the 1/n_valid of the mean is applied to the
                    # (N, C) and (V, C) results in backward, not to the (N, V) array here).
                    # The softmax of the logits is written in the compute dtype directly (fp32
                    # arithmetic inside; faster on CPU than exp(lp), whose exp is the precise
                    # one); the target entries, p - 1, are computed in fp32 (expm1) and
                    # rounded once, as fp32 p - 1 would be.
                    rows = dlogits[s:e]
                    torch.ops.aten._softmax.out(logits, -1, False, out=rows)
                    del logits
                    rows[torch.arange(e - s, device=h.device), tc] = torch.expm1(lp_target).to(dtype)
        loss = losses.sum() / n_valid  # no valid target: 0 / 0 = nan, as F.cross_entropy
        if need_grad:
            # Ignored positions keep their (meaningless) rows in dlogits: zeroing them would
            # be a pass over the (N, V) array. Their rows of dh are zeroed instead, and their
            # rows of h are zeroed before dW = dlogitsᵀ h: two passes over (N, C).
            keep = valid.to(dtype)[:, None]
            dh = (dlogits @ W).mul_(keep) if ctx.needs_input_grad[0] else None
            dW = (dlogits.t() @ (h * keep)).to(acc) if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(dh, dW, n_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dW, n_valid = ctx.saved_tensors
        scale = grad_loss.float() / n_valid.clamp(min=1)  # in fp32: 1/n is not exact in bf16
        if dh is not None:
            dh = (dh.float() * scale).to(dh.dtype)
        if dW is not None:
            dW = (dW.float() * scale).to(dW.dtype)
        return dh, dW, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, targets)`` (mean), without the full logits.

    ``h``: (..., C); ``targets``: (...) with -100 ignored. Under autocast the
    matmuls run in the autocast dtype and the softmax in fp32.
    """
    dtype = compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]).to(dtype).contiguous(), weight,
                                        targets.reshape(-1), chunk)


def lm_loss(model, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of a DecoderLM with the head fused into it (no logits materialized):
    ``model(idx, targets, return_logits=False)[1]``."""
    return model(idx, targets, return_logits=False)[1]
