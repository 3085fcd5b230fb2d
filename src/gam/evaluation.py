"""Validation loss by position in the block: how much of its context a model uses.

Every validation block is scored in one forward pass, so the target at block
position p is predicted from p + 1 tokens of context. The mean loss at each
position (over all blocks) shows how a model turns more context into lower
loss: a model that uses long context keeps lowering its loss as the position
grows; one that cannot (the paper's GAM sees only its last
``1 + n_layer * (kernel - 1)`` tokens) flattens once its window is full.

- :func:`loss_by_position`: the per-position mean cross-entropy of a model on a
  token stream (non-overlapping blocks, as :func:`gam.train.evaluate` cuts them);
- :func:`position_buckets` / :func:`bucket_means`: 0, 1, 2-3, 4-7, ... for printing;
- :func:`split_at`: mean loss inside a receptive field and beyond it;
- :func:`plot_loss_by_position`: one curve per model, with a spread band.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int,
                     device: torch.device | str, precision: str = "fp32") -> list[float]:
    """Mean cross-entropy (nats) at each block position 0 .. block_size-1.

    Blocks are the non-overlapping ``block_size + 1``-token slices that
    :func:`gam.train.evaluate` scores, so the mean of the returned list is its
    ``val_loss`` (every position has the same number of targets).
    """
    from gam.progress import progress
    from gam.train import autocast_context, batches

    n_blocks = len(tokens) // (block_size + 1)
    if n_blocks == 0:
        raise ValueError(f"validation data has {len(tokens)} tokens, fewer than one block of {block_size + 1}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    order = torch.arange(n_blocks)
    totals = torch.zeros(block_size, dtype=torch.float64, device=device)
    try:
        for start in progress(range(0, n_blocks, batch_size), "loss by position"):
            xy = batches(tokens, block_size, order, start, batch_size).to(device)
            with autocast_context(precision, device):
                logits, _ = model(xy[:, :-1])
            per_token = F.cross_entropy(logits.float().transpose(1, 2), xy[:, 1:], reduction="none")
            totals += per_token.double().sum(dim=0)
    finally:
        model.train(was_training)
    return (totals / n_blocks).tolist()


def position_buckets(block_size: int) -> list[tuple[int, int]]:
    """(first, last) positions of the printing buckets: 0, 1, 2-3, 4-7, 8-15, ..."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    buckets = [(0, 0)]
    first = 1
    while first < block_size:
        last = min(2 * first - 1, block_size - 1)
        buckets.append((first, last))
        first = last + 1
    return buckets


def bucket_means(losses: Sequence[float]) -> list[dict[str, Any]]:
    """Mean loss over each bucket of :func:`position_buckets`."""
    return [{"first": a, "last": b, "loss": float(np.mean(losses[a:b + 1]))}
            for a, b in position_buckets(len(losses))]


def bucket_label(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def split_at(losses: Sequence[float], field: int) -> tuple[float, float | None]:
    """(mean loss at positions 0 .. field-1, mean loss at positions field ..; None if there are none).

    Position p predicts from p + 1 tokens, so positions below ``field`` are the
    ones where a model with a receptive field of ``field`` tokens still sees
    the whole context, and the ones from ``field`` on are where it no longer does.
    """
    if field < 1:
        raise ValueError(f"receptive field must be >= 1 token, got {field}")
    inside = float(np.mean(losses[:field]))
    beyond = float(np.mean(losses[field:])) if len(losses) > field else None
    return inside, beyond


def draw_loss_by_position(ax, curves: dict[str, tuple[Sequence[float], Sequence[float] | None]],
                          receptive_field: int | None = None, field_label: str = "paper GAM receptive field") -> bool:
    """Draw on ``ax`` one line per model (``label -> (mean per position, spread per position or None)``):
    the bucket means of :func:`position_buckets` (0, 1, 2-3, 4-7, ...) as a bold line with
    markers, the per-position curve faint behind it with a shaded band of mean ± spread,
    and a dashed line where the receptive field ends. The buckets are what the eye should
    compare: a single position's mean over a few hundred validation blocks is noisy
    (about ±0.1 nats), and that noise is shared by the models (the same targets).
    Returns whether any band was drawn."""
    banded = False
    colours = matplotlib_colours()
    for i, (label, (mean, spread)) in enumerate(curves.items()):
        colour = colours[i % len(colours)]  # model i has the same colour in draw_gap_to_reference
        mean_a = np.asarray(mean, dtype=float)
        xs = np.arange(1, len(mean_a) + 1)  # tokens of context seen at each position
        ax.plot(xs, mean_a, color=colour, lw=0.6, alpha=0.35)
        if spread is not None:
            spread_a = np.asarray(spread, dtype=float)
            ax.fill_between(xs, mean_a - spread_a, mean_a + spread_a, color=colour, alpha=0.15, lw=0)
            banded = True
        buckets = bucket_means(mean_a)
        centres = [math.sqrt((b["first"] + 1) * (b["last"] + 1)) for b in buckets]  # geometric, in tokens
        ax.plot(centres, [b["loss"] for b in buckets], color=colour, lw=1.8, marker="o", ms=4, label=label)
    if receptive_field is not None:
        ax.axvline(receptive_field + 0.5, color="grey", ls="--", lw=1,
                   label=f"{field_label} ({receptive_field} token{'s' if receptive_field != 1 else ''})")
    ax.set_xscale("log")
    ax.set_xlabel("tokens of context (block position + 1)")
    ax.set_ylabel("validation loss (nats)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return banded


def draw_gap_to_reference(ax, curves: dict[str, tuple[Sequence[float], Sequence[float] | None]], reference: str,
                          receptive_field: int | None = None) -> None:
    """Draw on ``ax`` each model's loss minus the ``reference`` model's, bucket means as in
    :func:`draw_loss_by_position` (same colours, in the same order). The models are scored on
    the same targets, so the noise that a single position's mean shares across models
    cancels here: what is left is what one model gains over the other at each context length."""
    colours = matplotlib_colours()
    ref = np.asarray(curves[reference][0], dtype=float)
    for i, (label, (mean, _)) in enumerate(curves.items()):
        buckets = bucket_means(np.asarray(mean, dtype=float) - ref)
        centres = [math.sqrt((b["first"] + 1) * (b["last"] + 1)) for b in buckets]
        ax.plot(centres, [b["loss"] for b in buckets], color=colours[i % len(colours)],
                lw=1.0 if label == reference else 1.8, ls="--" if label == reference else "-",
                marker=None if label == reference else "o", ms=4, label=label)
    if receptive_field is not None:
        ax.axvline(receptive_field + 0.5, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("tokens of context (block position + 1)")
    ax.set_ylabel(f"loss minus {reference} (nats)", fontsize=8)
    ax.grid(alpha=0.3, which="both")


def matplotlib_colours() -> list[str]:
    import matplotlib.pyplot as plt

    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def plot_loss_by_position(curves: dict[str, tuple[Sequence[float], Sequence[float] | None]], path: str | Path,
                          title: str = "", receptive_field: int | None = None,
                          field_label: str = "paper GAM receptive field", spread_label: str = "sd over seeds") -> Path:
    """One panel of :func:`draw_loss_by_position`, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    banded = draw_loss_by_position(ax, curves, receptive_field, field_label)
    ax.set_title(title + "\nbold: mean over positions 0, 1, 2-3, 4-7, ...; faint: each position"
                 + (f"; band: mean ± {spread_label}" if banded else ""), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(model: torch.nn.Module, tokens: np.ndarray, batch_size: int, device: torch.device | str,
           precision: str, plot_path: str | Path, title: str = "") -> dict[str, Any]:
    """``gam eval --by-position``: per-position losses, buckets, the split at the
    receptive field (paper GAM only) and the plot; returns them for printing/JSON."""
    plot_path = Path(plot_path)
    if plot_path.is_dir() or plot_path.suffix.lower() != ".png":
        raise ValueError(f"--by-position: the plot path must be a file name ending in .png, got {str(plot_path)!r}")
    config = model.config
    losses = loss_by_position(model, tokens, config.block_size, batch_size, device, precision)
    field = config.receptive_field()
    result: dict[str, Any] = {"loss_by_position": losses, "buckets": bucket_means(losses),
                              "receptive_field": field}
    if field is not None:
        result["loss_inside_field"], result["loss_beyond_field"] = split_at(losses, field)
    result["plot"] = str(plot_loss_by_position({title or config.model: (losses, None)}, plot_path,
                                               title=title, receptive_field=field,
                                               field_label="this model's receptive field"))
    return result


def format_report(result: dict[str, Any]) -> list[str]:
    """Text lines of :func:`report`: one line per bucket, then the split and the plot path."""
    lines = ["  loss by position (tokens of context = position + 1):"]
    for b in result["buckets"]:
        lines.append(f"    {bucket_label(b['first'], b['last']):>9}  {b['loss']:.4f}")
    field = result.get("receptive_field")
    if field is not None:
        beyond = result["loss_beyond_field"]
        lines.append(f"  receptive field {field} tokens: loss {result['loss_inside_field']:.4f} at positions "
                     f"0-{field - 1}" + ("" if beyond is None else f", {beyond:.4f} at {field}+"))
    lines.append(f"  plot: {result['plot']}")
    return lines
