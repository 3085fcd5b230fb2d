"""Which input positions can influence an output position, measured with autograd.

For the paper's GAM the answer is fixed by design: the memory read
``softmax(h Mᵀ) M`` is computed per token, so only the causal convolutions move
information between positions, and the logits at position t depend on tokens
``t - n_layer*(k-1) .. t`` and nothing earlier.
"""

from __future__ import annotations

import torch

from gam.models.lm import DecoderLM


def influence(model: DecoderLM, seq_len: int, position: int, seed: int = 0) -> torch.Tensor:
    """Gradient norm of the logits at ``position`` w.r.t. each input embedding.

    Returns a (seq_len,) tensor; entry s is zero exactly when token s cannot
    affect the output at ``position`` (for these weights and inputs).
    """
    if not 0 <= position < seq_len:
        raise ValueError(f"position {position} outside [0, {seq_len})")
    max_len = model.config.max_seq_len
    if max_len is not None and seq_len > max_len:
        raise ValueError(f"seq_len {seq_len} exceeds block_size {max_len} (learned positions)")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator)
    captured: list[torch.Tensor] = []

    def keep_grad(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    was_training = model.training
    model.eval()
    hook = model.token_embedding.register_forward_hook(keep_grad)
    try:
        device = next(model.parameters()).device
        logits, _ = model(idx.to(device))
        logits[0, position].float().pow(2).sum().backward()
    finally:
        hook.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return captured[0].grad[0].float().norm(dim=-1).cpu()


def receptive_field(model: DecoderLM, seq_len: int, position: int, seed: int = 0) -> tuple[int, int]:
    """(first, last) input positions with non-zero influence on ``position``."""
    nonzero = torch.nonzero(influence(model, seq_len, position, seed)).flatten()
    return int(nonzero.min()), int(nonzero.max())


def plot_influence(weights: torch.Tensor, position: int, path, title: str = "") -> None:
    """Bar plot of :func:`influence` (log scale; positions with no influence left empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = weights.detach().float().cpu()
    nonzero = w > 0
    fig, ax = plt.subplots(figsize=(8, 3))
    xs = torch.arange(len(w))
    ax.bar(xs[nonzero].tolist(), w[nonzero].tolist(), width=0.9, color="tab:blue")
    ax.axvline(position, color="tab:red", lw=1, ls="--", label=f"output position {position}")
    if nonzero.any():
        ax.set_yscale("log")
        first = int(xs[nonzero].min())
        ax.set_title((title + "\n" if title else "") + f"inputs {first} .. {int(xs[nonzero].max())} "
                     f"influence it ({int(nonzero.sum())} of {position + 1})", fontsize=9)
    ax.set_xlim(-0.5, len(w) - 0.5)
    ax.set_xlabel("input position")
    ax.set_ylabel("|d logits / d input embedding|")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
