"""Benchmark the kv-slot memory's training forms, forward and backward, over T.

The op alone (heads folded into the batch), with random q, k, v of (batch x heads, T, d),
gates ``logsigmoid(z) / 8`` of (batch x heads, T, slots) and an initial state that needs a
gradient (as the layer's memory bank), in forms side by side in the same run:
``kv_memory_chunked_autograd`` (the chunk form differentiated by autograd, every
intermediate kept), ``kv_memory_chunked`` (its hand-written backward), ``fused`` (the C kernel,
``kv_memory_fused``: slots a multiple of 16, the form it picks), ``recurrence`` and ``tiles``
(the kernel forced to its token-by-token recurrence or to its chunked form on AMX tiles, bf16
only). For each T, the
median forward time and backward time of each (one warm-up excluded; the forms take turns
each repeat, so that a change of load reaches both), the time per token, which should stay
flat in T, the memory each keeps for its backward (distinct storages of the saved tensors,
inputs included) and the first form's time over each one's. Also checks each
form's output and gradients against the step-by-step recurrence at the shortest T (in the
run's dtype: with bf16, against the fp64 recurrence of the bf16-rounded inputs), so a fast
but wrong form cannot pass unnoticed.

``--baseline FILE`` adds a third form, ``baseline``: ``kv_memory_chunked`` of another
version's ``src/gam/ops/kv_memory.py`` (``git show REV:src/gam/ops/kv_memory.py > old.py``),
timed in the same turns, so a change of the op is measured before and after in one run.

``--dtype bf16`` runs both under bf16 autocast with the state in fp32, as the layer trains.
glibc's malloc keeps freed memory (``gam.resources.tune_cpu_allocator``, as ``gam bench
speed`` does) unless ``--no-tune-malloc``: otherwise every large buffer is page-faulted in
afresh, a cost that lands unevenly on the two forms.

Usage::

    python benchmarks/bench_kv_memory.py                                   # 8 x T x 64, 64 slots
    python benchmarks/bench_kv_memory.py --batch-heads 256 --dim 16 --slots 64 --lengths 256
    python benchmarks/bench_kv_memory.py --forms baseline,hand-written --baseline old.py --dtype bf16
    python benchmarks/bench_kv_memory.py --forms hand-written,fused --dtype bf16 --threads 2
    python benchmarks/bench_kv_memory.py --forms recurrence,tiles --dtype bf16 --threads 2 --batch-heads 64 --lengths 256
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from gam.ops import native  # noqa: E402
from gam.ops.kv_memory import (  # noqa: E402
    TILES_MAX_DIM,
    fused_applies,
    kv_memory_chunked,
    kv_memory_chunked_autograd,
    kv_memory_fused,
    kv_memory_recurrent,
    tiles_available,
)
from gam.resources import tune_cpu_allocator  # noqa: E402

FORMS = {"autograd": kv_memory_chunked_autograd, "hand-written": kv_memory_chunked, "fused": kv_memory_fused,
         "recurrence": functools.partial(kv_memory_fused, tiles=False),
         "tiles": functools.partial(kv_memory_fused, tiles=True)}


def load_baseline(path: str):
    """``kv_memory_chunked`` of another version's op file, imported under its own name."""
    spec = importlib.util.spec_from_file_location("kv_memory_baseline", path)
    if spec is None:
        raise ImportError("not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kv_memory_chunked


def inputs(bh: int, T: int, d: int, slots: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bh, T, d, generator=gen).requires_grad_() for _ in range(3))
    log_alpha = (F.logsigmoid(torch.randn(bh, T, slots, generator=gen)) / 8).requires_grad_()
    state = tuple(torch.randn(bh, slots, d, generator=gen).requires_grad_() for _ in range(2))
    return q, k, v, log_alpha, state


def max_error_vs_recurrence(form, bh: int, T: int, d: int, slots: int, bf16: bool) -> float:
    """The largest error over the output and every gradient, relative to the largest entry: against
    the fp32 recurrence, or with ``bf16`` (the form under autocast) against the fp64 recurrence of
    the bf16-rounded q, k, v."""
    results = []
    for f in (form, kv_memory_recurrent):
        q, k, v, log_alpha, state = inputs(bh, T, d, slots)
        if bf16:
            rounded = [x.detach().bfloat16().to(torch.float64 if f is kv_memory_recurrent else torch.float32)
                       for x in (q, k, v)]
            q, k, v = (x.requires_grad_() for x in rounded)
            if f is kv_memory_recurrent:
                log_alpha, state = log_alpha.detach().double().requires_grad_(), tuple(
                    x.detach().double().requires_grad_() for x in state)
        with autocast(bf16 and f is not kv_memory_recurrent):
            out, _ = f(q, k, v, log_alpha, state)
        out.double().square().sum().backward()
        results.append([out.detach(), q.grad, k.grad, v.grad, log_alpha.grad, state[0].grad, state[1].grad])
    return max(((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(*results))


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def kept_for_backward(form, q, k, v, log_alpha, state, bf16: bool) -> int:
    """Bytes of the distinct storages a forward keeps for its backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(bf16):
        form(q, k, v, log_alpha, state)
    return sum(storages.values())


def time_forms(forms: list[str], bh: int, T: int, d: int, slots: int, repeats: int,
               bf16: bool) -> dict[str, tuple[float, float, int]]:
    """Median (forward, backward) seconds of each form, the forms taking turns each
    repeat, and the bytes it keeps for backward."""
    q, k, v, log_alpha, state = inputs(bh, T, d, slots)
    leaves = (q, k, v, log_alpha, *state)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in forms}
    for i in range(repeats + 1):
        for name in forms:
            for x in leaves:
                x.grad = None
            t0 = time.perf_counter()
            with autocast(bf16):
                out, _ = FORMS[name](q, k, v, log_alpha, state)
            t1 = time.perf_counter()
            out.float().square().sum().backward()
            t2 = time.perf_counter()
            if i:  # the first run is the warm-up
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    return {name: (statistics.median(fwd), statistics.median(bwd),
                   kept_for_backward(FORMS[name], q, k, v, log_alpha, state, bf16))
            for name, (fwd, bwd) in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-heads", type=int, default=8, help="batch x heads (folded)")
    p.add_argument("--dim", type=int, default=64, help="features per head")
    p.add_argument("--slots", type=int, default=64, help="slots per head")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated T")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per T and form (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--forms", default="autograd,hand-written",
                   help=f"comma-separated forms to time, of {', '.join(FORMS)}, baseline (with --baseline)")
    p.add_argument("--baseline", metavar="FILE", help="another version's src/gam/ops/kv_memory.py: form 'baseline'")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: under bf16 autocast, the state in fp32 (as the layer trains)")
    p.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    args = p.parse_args(argv)
    try:
        lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    forms = args.forms.split(",")
    if args.baseline:
        if not os.path.isfile(args.baseline):
            p.error(f"--baseline: no such file: {args.baseline}")
        try:
            FORMS["baseline"] = load_baseline(args.baseline)
        except Exception as e:  # a file that is not an op of this library
            p.error(f"--baseline: cannot load kv_memory_chunked from {args.baseline}: {type(e).__name__}: {e}")
    if not forms or any(f not in FORMS for f in forms):
        p.error(f"--forms must be comma-separated names of {', '.join(FORMS)}, got {args.forms!r}")
    if min(lengths) < 1 or min(args.batch_heads, args.dim, args.slots, args.repeats, args.threads) < 1:
        p.error("lengths, --batch-heads, --dim, --slots, --repeats and --threads must be >= 1")
    for name in {"fused", "recurrence", "tiles"} & set(forms):
        if not fused_applies(torch.zeros(()), args.slots):
            reason = (native.unavailable_reason("kv_memory_cpu")
                      or f"--slots {args.slots} is not one of 16, 32, ..., 128")
            p.error(f"form {name!r} cannot run: {reason}")
    if "tiles" in forms and (args.dtype != "bf16" or args.dim > TILES_MAX_DIM or not tiles_available()):
        p.error(f"form 'tiles' needs --dtype bf16, --dim <= {TILES_MAX_DIM} and a CPU with AMX-BF16 "
                f"(available: {tiles_available()})")
    torch.set_num_threads(args.threads)
    malloc = "default malloc" if args.no_tune_malloc else f"malloc tuned: {tune_cpu_allocator()}"
    check = (min(args.batch_heads, 4), min(min(lengths), 40), args.dim, args.slots)
    errors = ", ".join(f"{name} {max_error_vs_recurrence(FORMS[name], *check, args.dtype == 'bf16'):.1e}"
                       for name in forms)
    print(f"kv-slot memory, training forms: batch x heads {args.batch_heads}, d {args.dim}, {args.slots} slots, "
          f"{args.threads} thread(s), {args.dtype}, {malloc}; median of {args.repeats} after 1 warm-up")
    against = "fp32" if args.dtype == "fp32" else "fp64, of the bf16-rounded inputs"
    print(f"max relative error vs the recurrence (outputs and gradients, T <= 40, {against}): {errors}")
    print("| T | form | forward ms | backward ms | µs per token (fwd + bwd) | kept for backward MiB "
          f"| {forms[0]} time / this |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for T in lengths:
        times = time_forms(forms, args.batch_heads, T, args.dim, args.slots, args.repeats, args.dtype == "bf16")
        for name, (fwd, bwd, kept) in times.items():
            ratio = f"{sum(times[forms[0]][:2]) / (fwd + bwd):.2f}x"
            print(f"| {T:,} | {name} | {fwd * 1e3:,.1f} | {bwd * 1e3:,.1f} | {(fwd + bwd) * 1e6 / T:,.1f} "
                  f"| {kept / 2**20:,.3g} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
