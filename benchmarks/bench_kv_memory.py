"""Benchmark the kv-slot memory's chunked training form, forward and backward, over T.

``kv_memory_chunked`` alone (heads folded into the batch), with random q, k, v of
(batch x heads, T, d) and gates ``logsigmoid(z) / 8`` of (batch x heads, T, slots): the median
forward time and backward time (warm-up excluded), so that a cost that grows faster than T
shows at once (the time per token column should stay flat). Also checks the output and the
gradients against the step-by-step recurrence at the shortest T (fp32), so a fast but wrong
form cannot pass unnoticed.

Usage::

    python benchmarks/bench_kv_memory.py                                   # 8 x T x 64, 64 slots
    python benchmarks/bench_kv_memory.py --batch-heads 256 --dim 16 --slots 64 --lengths 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from gam.ops.kv_memory import kv_memory_chunked, kv_memory_recurrent  # noqa: E402


def inputs(bh: int, T: int, d: int, slots: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bh, T, d, generator=gen).requires_grad_() for _ in range(3))
    log_alpha = (F.logsigmoid(torch.randn(bh, T, slots, generator=gen)) / 8).requires_grad_()
    state = (torch.randn(bh, slots, d, generator=gen), torch.randn(bh, slots, d, generator=gen))
    return q, k, v, log_alpha, state


def max_error_vs_recurrence(bh: int, T: int, d: int, slots: int) -> float:
    errors = []
    results = []
    for form in (kv_memory_chunked, kv_memory_recurrent):
        q, k, v, log_alpha, state = inputs(bh, T, d, slots)
        out, _ = form(q, k, v, log_alpha, state)
        out.square().sum().backward()
        results.append([out.detach(), q.grad, k.grad, v.grad, log_alpha.grad])
    for a, b in zip(*results):
        errors.append(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    return max(errors)


def time_one(bh: int, T: int, d: int, slots: int, repeats: int) -> tuple[float, float]:
    q, k, v, log_alpha, state = inputs(bh, T, d, slots)
    forward, backward = [], []
    for i in range(repeats + 1):
        for x in (q, k, v, log_alpha):
            x.grad = None
        t0 = time.perf_counter()
        out, _ = kv_memory_chunked(q, k, v, log_alpha, state)
        t1 = time.perf_counter()
        out.square().sum().backward()
        t2 = time.perf_counter()
        if i:  # the first run is the warm-up
            forward.append(t1 - t0)
            backward.append(t2 - t1)
    return statistics.median(forward), statistics.median(backward)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-heads", type=int, default=8, help="batch x heads (folded)")
    p.add_argument("--dim", type=int, default=64, help="features per head")
    p.add_argument("--slots", type=int, default=64, help="slots per head")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated T")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per T (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if min(lengths) < 1 or min(args.batch_heads, args.dim, args.slots, args.repeats, args.threads) < 1:
        p.error("lengths, --batch-heads, --dim, --slots, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    error = max_error_vs_recurrence(min(args.batch_heads, 4), min(min(lengths), 40), args.dim, args.slots)
    print(f"kv_memory_chunked: batch x heads {args.batch_heads}, d {args.dim}, {args.slots} slots, "
          f"{args.threads} thread(s), fp32; median of {args.repeats} after 1 warm-up")
    print(f"max relative error vs the recurrence (outputs and gradients, T <= 40): {error:.1e}")
    print("| T | forward ms | backward ms | µs per token (fwd + bwd) |")
    print("|---:|---:|---:|---:|")
    for T in lengths:
        fwd, bwd = time_one(args.batch_heads, T, args.dim, args.slots, args.repeats)
        print(f"| {T:,} | {fwd * 1e3:,.1f} | {bwd * 1e3:,.1f} | {(fwd + bwd) * 1e6 / T:,.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
