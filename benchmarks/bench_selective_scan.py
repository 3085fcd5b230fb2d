"""Benchmark the pure-PyTorch selective scans on CPU: forward + backward, fp32.

Compares, side by side (medians over repeats, warm-up excluded, methods interleaved so that
load from other processes hits all of them alike):

* ``fast``     -- ``gam.ops.selective_scan.selective_scan_fn`` (chunked scan, hand-written backward)
* ``mambapy``  -- mambapy's Blelloch ``pscan`` (``pip install mambapy``; benchmark-only, not a
                  dependency of gam) wrapped into the same selective scan; if mambapy is missing
                  a Hillis-Steele log-step scan differentiated by autograd stands in (``hillis``)
* ``ref``      -- ``selective_scan_ref``, the sequential loop (one Python iteration per step)

Usage::

    python benchmarks/bench_selective_scan.py                       # batch 8, d_inner 1536, d_state 16, L 256 1024
    python benchmarks/bench_selective_scan.py --lengths 256 --repeats 9 --memory
    python benchmarks/bench_selective_scan.py --tune 16:128 32:256  # extra fast-path chunk:block variants
    python benchmarks/bench_selective_scan.py --ref-repeats 3        # fewer runs of the slow reference

``--memory`` also reports each method's peak resident-memory increase for one forward+backward,
measured in a fresh subprocess per method and length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from gam.ops.selective_scan import selective_scan_fn, selective_scan_ref  # noqa: E402

try:  # benchmark-only comparison target
    from mambapy.pscan import pscan as _mambapy_pscan
except Exception:  # pragma: no cover
    _mambapy_pscan = None


def _hillis_steele(a, b):
    """Inclusive scan h_t = a_t h_{t-1} + b_t along dim 1 in log2(L) steps (autograd-differentiable)."""
    L = a.shape[1]
    k = 1
    while k < L:
        b = torch.cat([b[:, :k], b[:, k:] + a[:, k:] * b[:, :-k]], dim=1)
        if 2 * k < L:
            a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return b


def scan_pscan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Selective scan built the way mambapy does it, in the (batch, d_inner, L) argument layout."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    x = u.transpose(1, 2)                                   # (b, L, d)
    dt = delta.transpose(1, 2)
    Bm = B.transpose(1, 2)                                  # (b, L, n)
    Cm = C.transpose(1, 2)
    deltaA = torch.exp(dt.unsqueeze(-1) * A)                # (b, L, d, n)
    BX = (dt * x).unsqueeze(-1) * Bm.unsqueeze(2)           # (b, L, d, n)
    hs = _mambapy_pscan(deltaA, BX) if _mambapy_pscan is not None else _hillis_steele(deltaA, BX)
    y = (hs @ Cm.unsqueeze(-1)).squeeze(-1)                 # (b, L, d)
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z.transpose(1, 2))
    return y.transpose(1, 2)


PSCAN_NAME = "mambapy" if _mambapy_pscan is not None else "hillis"


def make_inputs(batch, dim, n, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    ins = dict(
        u=torch.randn(batch, dim, L, generator=g),
        delta=0.1 * torch.randn(batch, dim, L, generator=g),
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, n, L, generator=g),
        C=torch.randn(batch, n, L, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, L, generator=g),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )
    for t in ins.values():
        t.requires_grad_(True)
    go = torch.randn(batch, dim, L, generator=g)
    return ins, go


def make_methods(tune):
    methods = {
        "fast": lambda **kw: selective_scan_fn(**kw, delta_softplus=True),
        PSCAN_NAME: lambda **kw: scan_pscan(**kw, delta_softplus=True),
        "ref": lambda **kw: selective_scan_ref(**kw, delta_softplus=True),
    }
    for spec in tune:
        c, b = (int(v) for v in spec.split(":"))
        methods[f"fast[{c}:{b}]"] = lambda c=c, b=b, **kw: selective_scan_fn(
            **kw, delta_softplus=True, chunk_size=c, block_size=b)
    return methods


def fwd_bwd(fn, ins, go):
    for t in ins.values():
        t.grad = None
    y = fn(**ins)
    y.backward(go)


def child(method, L, args):
    """Run one forward+backward in this (fresh) process and print the peak-RSS increase."""
    torch.set_num_threads(args.threads)
    ins, go = make_inputs(args.batch, args.d_inner, args.d_state, L)
    fn = make_methods(args.tune)[method]
    base = _peak_rss_kib()
    fwd_bwd(fn, ins, go)
    peak = _peak_rss_kib()
    print(json.dumps({"peak_mib": (peak - base) / 1024.0}))


def _peak_rss_kib():
    # VmHWM belongs to this process image; ru_maxrss would include the parent's peak, which Linux
    # carries across fork+exec
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-inner", type=int, default=1536)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (after 1 warm-up)")
    p.add_argument("--ref-repeats", type=int, default=None,
                   help="timed runs of the (slow) sequential reference; default: --repeats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods to run")
    p.add_argument("--tune", nargs="*", default=[], metavar="CHUNK:BLOCK")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS per method (subprocesses)")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args)
        return

    torch.set_num_threads(args.threads)
    methods = make_methods(args.tune)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, "
          f"d_inner={args.d_inner}, d_state={args.d_state}, fp32, forward+backward, "
          f"{args.repeats} timed repeats (median), pscan impl: {PSCAN_NAME}")
    results = {}
    for L in args.lengths:
        ins, go = make_inputs(args.batch, args.d_inner, args.d_state, L)
        times = {m: [] for m in methods}
        for m, fn in methods.items():  # warm-up (the sequential reference: on a short prefix only)
            if m == "ref":
                short, gshort = make_inputs(args.batch, args.d_inner, args.d_state, min(L, 64))
                fwd_bwd(fn, short, gshort)
            else:
                fwd_bwd(fn, ins, go)
        names = list(methods)
        ref_repeats = args.repeats if args.ref_repeats is None else args.ref_repeats
        for r in range(max(args.repeats, ref_repeats)):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate to spread load noise
            for m in order:
                if len(times[m]) >= (ref_repeats if m == "ref" else args.repeats):
                    continue
                t0 = time.perf_counter()
                fwd_bwd(methods[m], ins, go)
                times[m].append(time.perf_counter() - t0)
        results[L] = {m: statistics.median(v) for m, v in times.items()}
        for m, v in times.items():
            print(f"  L={L:5d} {m:14s} median {statistics.median(v):8.3f} s   runs " +
                  " ".join(f"{x:.3f}" for x in v), flush=True)
    mem = {}
    if args.memory:
        for L in args.lengths:
            for m in methods:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", m, str(L),
                       "--batch", str(args.batch), "--d-inner", str(args.d_inner),
                       "--d-state", str(args.d_state), "--threads", str(args.threads)]
                if args.tune:
                    cmd += ["--tune", *args.tune]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                mem[(L, m)] = json.loads(out.strip().splitlines()[-1])["peak_mib"]

    print()
    names = list(methods)
    print("forward+backward median seconds" + (" (peak RSS increase, MiB)" if mem else ""))
    print(f"{'L':>6} " + " ".join(f"{m:>22s}" for m in names))
    for L in args.lengths:
        cells = []
        for m in names:
            c = f"{results[L][m]:.3f}s"
            if mem:
                c += f" ({mem[(L, m)]:.0f})"
            cells.append(f"{c:>22s}")
        print(f"{L:>6} " + " ".join(cells))
    for L in args.lengths:
        print(f"L={L}: speed-up of fast vs {PSCAN_NAME}: {results[L].get(PSCAN_NAME, float('nan')) / results[L]['fast']:.2f}x, "
              f"vs ref: {results[L].get('ref', float('nan')) / results[L]['fast']:.2f}x"
              if "fast" in results[L] else "")


if __name__ == "__main__":
    main()
