"""Cross-entropy of an LM's logits, fused: :func:`cross_entropy` (the shell's
default loss) and the opt-in :func:`linear_cross_entropy` (head + loss, no logits).

:func:`cross_entropy` is ``F.cross_entropy(logits.float(), targets)`` (mean,
ignore_index -100) as a custom autograd function over chunks of rows: forward
reads the logits once for the fp32 log-sum-exp and keeps only it; backward
writes ``softmax - onehot`` once, in the logits' dtype. PyTorch's composite
makes an fp32 copy of bf16 logits, writes an fp32 log-softmax, zero-fills and
scatters an fp32 gradient and casts it back: about twice the passes over the
(tokens, vocab) array. ``gam_impl="reference"`` keeps the paper's expression.

The opt-in fused LM head + cross-entropy never materializes fp32 logits.

``DecoderLM.forward`` returns logits (the public API), so it computes the loss
the usual way: ``cross_entropy(head(ln_f(x)).float(), targets)``, which under
bf16 autocast builds the (tokens, vocab) logits in bf16, an fp32 copy, an fp32
log-softmax and an fp32 gradient: five passes over 2048 x 10,000 values per
step at the paper's configuration. :func:`linear_cross_entropy` computes the
same mean loss in chunks of tokens: each chunk's logits are made, turned into
the loss and into ``softmax - onehot`` (fp32 arithmetic, in cache) and written
once as the logits gradient in the compute dtype; ``dW`` is then one matmul
over all tokens. The gradients are computed in the forward pass (when grad is
enabled) and scaled by the upstream gradient in backward, as Liger-Kernel's
fused linear cross-entropy does.

:func:`lm_loss` runs a :class:`gam.models.lm.DecoderLM` with it: same loss as
``model(idx, targets)[1]``, no logits returned. A trainer opts in by calling it
instead of ``model(idx, targets)`` when it does not need the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gam.ops.memory_read import acc_dtype, compute_dtype

DEFAULT_CHUNK = 256  # tokens per chunk: 256 x 10,000 fp32 scores = 10 MB, in L3


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, V) ``logits`` against (N,) ``targets`` (-100 ignored)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        N = logits.shape[0]
        acc = acc_dtype(logits.dtype)
        valid = targets != -100
        safe = torch.where(valid, targets, 0)
        lse = torch.empty(N, dtype=acc, device=logits.device)
        for s in range(0, N, chunk):
            lse[s:s + chunk] = torch.logsumexp(logits[s:s + chunk].to(acc), dim=-1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).to(acc)
        n_valid = valid.sum()
        # mean over valid rows; no valid row gives nan, as F.cross_entropy does
        loss = torch.where(valid, lse - picked, 0.0).sum() / n_valid
        ctx.save_for_backward(logits, safe, valid, lse, n_valid)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe, valid, lse, n_valid = ctx.saved_tensors
        N = logits.shape[0]
        # d loss / d logits[i] = (softmax(logits[i]) - onehot(target[i])) * g / n_valid on valid rows
        row_scale = valid.to(lse.dtype) * (grad_loss.to(lse.dtype) / n_valid)
        dlogits = torch.empty_like(logits)
        for s in range(0, N, ctx.chunk):
            e = min(s + ctx.chunk, N)
            p = logits[s:e].to(lse.dtype).sub_(lse[s:e, None]).exp_().mul_(row_scale[s:e, None])
            p[torch.arange(e - s, device=p.device), safe[s:e]] -= row_scale[s:e]
            dlogits[s:e] = p
        return dlogits, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``F.cross_entropy(logits.float().view(-1, V), targets.view(-1))``: mean over
    targets != -100, fp32 arithmetic, gradient in the logits' dtype, fewer passes."""
    V = logits.shape[-1]
    with torch.autocast(logits.device.type, enabled=False):
        return CrossEntropy.apply(logits.reshape(-1, V), targets.reshape(-1), chunk)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (ignore_index -100)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        dtype = h.dtype
        N = h.shape[0]
        W = weight.to(dtype)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != -100
        n_valid = int(valid.sum())
        acc = acc_dtype(dtype)
        losses = torch.zeros(N, dtype=acc, device=h.device)
        dlogits = torch.empty(N, W.shape[0], dtype=dtype, device=h.device) if need_grad else None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = (h[s:e] @ W.t()).to(acc)                        # (n, V) fp32, this chunk only
            t = targets[s:e]
            ok = valid[s:e]
            tc = torch.where(ok, t, 0)
            lse = torch.logsumexp(z, dim=-1)
            losses[s:e] = torch.where(ok, lse - z.gather(1, tc[:, None]).squeeze(1), 0.0)
            if need_grad:
                p = z.sub_(lse[:, None]).exp_()                 # softmax, in place
                p[torch.arange(e - s, device=h.device), tc] -= 1.0
                p.mul_(ok[:, None] / max(n_valid, 1))
                dlogits[s:e] = p
        loss = losses.sum() / max(n_valid, 1) if n_valid else losses.sum() * float("nan")
        if need_grad:
            dh = dlogits @ W if ctx.needs_input_grad[0] else None
            dW = (dlogits.t() @ h).to(acc_dtype(dtype)) if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(dh, dW)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dW = ctx.saved_tensors
        if dh is not None:
            dh = dh * grad_loss.to(dh.dtype)
        if dW is not None:
            dW = dW * grad_loss.to(dW.dtype)
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


def lm_loss(model, idx: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The loss of ``model(idx, targets)`` for a DecoderLM, computed with
    :func:`linear_cross_entropy` (no logits materialized)."""
    from gam.models.lm import check_token_ids

    check_token_ids(idx, model.config.vocab_size, model.config.max_seq_len)
    if targets.shape != idx.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
    x = model.embed(idx)
    for block in model.blocks:
        x = block(x)
    return linear_cross_entropy(model.ln_f(x), model.head.weight, targets, chunk)


def reference_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The shell's loss: fp32 cross-entropy of the (autocast) logits."""
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
