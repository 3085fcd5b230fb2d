"""The multi-query associative recall (MQAR) task: its data and its accuracy.

Each sequence opens with a block of key-value pairs, then asks for those keys
again, one by one, at power-law distances, among filler tokens::

    k1 v1 k2 v2 ... kP vP | . . k2 . . . . k1 . . . kP ...     (the answer to k is its v)

Keys come from the lower half of the vocabulary (token 0 excluded), values
from the upper half; fillers from the value half (``fillers="values"``), so a
key occurs only at its pair and at its query, or, as Zoology's generator, from
the whole vocabulary (``fillers="vocabulary"``; with a large vocabulary a
filler rarely repeats a key). Query i sits at position ``2P + 2*gap_i``; the gaps are
distinct and drawn without replacement with ``P(gap = g) ∝ (g + 1)^(a - 1)``
(``a = 0.01``: mostly short gaps, a long tail), as Zoology's generator. Loss
and accuracy count the answer positions only (targets are -100 elsewhere): at
a query key the model must predict the value that followed that key in the
block. The *distance* of a query is its position minus its key's position.
``gam bench recall`` (:mod:`gam.bench.recall`) trains models on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ---------------------------------------------------------------- data


@dataclass
class MQARBatch:
    inputs: torch.Tensor  # (N, T) token ids
    targets: torch.Tensor  # (N, T): the value at query positions, -100 elsewhere
    query_pos: torch.Tensor  # (N, P): position of each query, ascending
    key_pos: torch.Tensor  # (N, P): position of the same key in the key-value block
    distance: torch.Tensor  # (N, P): query_pos - key_pos


def gap_probabilities(space: int, power_a: float = 0.01) -> torch.Tensor:
    """P(gap = g) for g = 0 .. space-1, proportional to (g + 1)^(power_a - 1)."""
    g = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * g ** (power_a - 1)
    return p / p.sum()


FILLERS = ("values", "vocabulary")


def mqar(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, power_a: float = 0.01,
         seed: int | None = None, generator: torch.Generator | None = None,
         fillers: str = "values") -> MQARBatch:
    """Generate ``num_examples`` MQAR sequences (see the module docstring)."""
    if fillers not in FILLERS:
        raise ValueError(f"fillers must be one of {', '.join(FILLERS)}, got {fillers!r}")
    P, T, V = num_pairs, seq_len, vocab_size
    if P < 1 or T < 4 * P or T % 2:
        raise ValueError(f"need num_pairs >= 1, an even seq_len >= 4*num_pairs; got {P} pairs, length {T}")
    if V // 2 - 1 < P:
        raise ValueError(f"vocab_size {V} too small for {P} distinct keys and values")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    N, half, context = num_examples, V // 2, 2 * P
    space = (T - context) // 2

    def distinct(low: int, high: int) -> torch.Tensor:  # P distinct tokens in [low, high) per row
        return torch.rand(N, high - low, generator=generator).argsort(dim=1)[:, :P] + low

    keys, values = distinct(1, half), distinct(half, V)
    # Gaps without replacement, weighted by p (Gumbel top-k = sequential sampling).
    logp = gap_probabilities(space, power_a).log().float()
    u = torch.rand(N, space, generator=generator).clamp_min(1e-20)
    gaps = (logp - torch.log(-torch.log(u))).topk(P, dim=1).indices  # (N, P), in sampling order
    query_pos = context + 2 * gaps  # query j asks for key j
    key_pos = 2 * torch.arange(P).expand(N, P)

    # Fillers from the value half: never a key, so a key occurs exactly at its pair and at
    # its query (Zoology draws fillers from the whole vocabulary; with its 8,192 tokens a
    # filler rarely repeats a key, with the small vocabularies of the recall presets it often would).
    inputs = torch.randint(half if fillers == "values" else 0, V, (N, T), generator=generator)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((N, T), -100, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    order = query_pos.argsort(dim=1)
    query_pos, key_pos = query_pos.gather(1, order), key_pos.gather(1, order)
    return MQARBatch(inputs, targets, query_pos, key_pos, query_pos - key_pos)


@torch.no_grad()
def evaluate(model, data: MQARBatch, device: torch.device, rf: int, batch_size: int = 250) -> dict:
    model.eval()
    correct, in_context = [], []
    for s in range(0, data.inputs.shape[0], batch_size):
        x = data.inputs[s:s + batch_size].to(device)
        logits, _ = model(x)
        q = data.query_pos[s:s + batch_size]
        pred = logits.argmax(-1).gather(1, q.to(device)).cpu()
        truth = data.targets[s:s + batch_size].gather(1, q)
        correct.append((pred == truth).float())
        values = data.targets[s:s + batch_size].gather(1, q)  # the sequence's P values
        in_context.append((pred.unsqueeze(-1) == values.unsqueeze(1)).any(-1).float())
    model.train()
    c = torch.cat(correct)
    near = data.distance <= rf
    return {
        "accuracy": c.mean().item(),
        # predictions that are one of the sequence's values (right or not): 1/P of them
        # right is what a model gets that sees the values but cannot match the keys
        "in_context_value": torch.cat(in_context).mean().item(),
        "accuracy_near": c[near].mean().item() if near.any() else float("nan"),
        "accuracy_far": c[~near].mean().item() if (~near).any() else float("nan"),
        "frac_near": near.float().mean().item(),
    }
