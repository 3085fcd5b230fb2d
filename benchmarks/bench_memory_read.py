"""Benchmark GAM's memory read ``softmax(h Mᵀ) M``, forward + backward, per implementation.

Side by side, at the paper's width (C 512, 512 slots) and N = batch x T tokens:

* ``reference`` -- ``memory_read_reference``: the paper's eager expression (autograd keeps the
                   (N, slots) softmax)
* ``torch``     -- ``memory_read(backend="torch")``: chunked custom autograd function, softmax
                   recomputed in backward
* ``triton``    -- ``memory_read(backend="triton")``: the Triton kernels (CUDA only)

For each: relative error of the output and both gradients against a float64 reference (on a
smaller slice when N is large), median forward+backward time (warm-up excluded, methods
interleaved), and peak memory above the inputs (CUDA: ``max_memory_allocated``). Also prints
the time floor from the matmul FLOPs (6 matmuls of N x slots x C, counting the recompute)
at the matmul rate measured in the same run.

Usage::

    python benchmarks/bench_memory_read.py --device cuda                 # N = 16 x (1024, 4096, 8192)
    python benchmarks/bench_memory_read.py --device cpu --tokens 2048 --dtypes fp32,bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from gam.ops.memory_read import memory_read, memory_read_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_N = {"cuda": 4096, "cpu": 2048}  # size of the square GEMM whose rate sets the floor


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Extra Triton launch configurations to try, (BLOCK_N, BLOCK_S, num_warps, num_stages)
# for the forward, dh and dM kernels; the library's fallbacks follow each.
TRITON_VARIANTS = {
    "n32": {"fwd": (32, 32, 4, 3), "dh": (32, 32, 4, 3), "dm": (64, 32, 8, 3)},
    "n64": {"fwd": (64, 32, 8, 3), "dh": (64, 32, 8, 3), "dm": (64, 64, 8, 3)},
    "n64s64": {"fwd": (64, 64, 8, 2), "dh": (64, 64, 8, 2), "dm": (128, 32, 8, 2)},
}


def _impls(device: str, dtype: torch.dtype, variants: bool) -> dict:
    impls = {
        "reference": memory_read_reference,
        "torch": lambda h, M: memory_read(h, M, backend="torch"),
    }
    if device == "cuda":
        from gam.ops import triton_memory_read as tmr

        if tmr.available():
            default = dict(tmr._CONFIGS)

            def with_configs(configs):
                def fn(h, M):
                    tmr._CONFIGS.update(configs)
                    try:
                        return memory_read(h, M, backend="triton")
                    finally:
                        tmr._CONFIGS.update(default)
                return fn

            impls["triton"] = with_configs(default)
            if variants and dtype != torch.float32:
                for name, v in TRITON_VARIANTS.items():
                    configs = {k: (v[k],) + default[k] for k in default}
                    impls[f"triton-{name}"] = with_configs(configs)
    return impls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(fn, device: str, dtype: torch.dtype, C: int, S: int, n: int = 4099) -> float:
    """Worst relative error (output, dh, dM) against float64, on fresh random inputs."""
    h = torch.randn(n, C, device=device).to(dtype).requires_grad_()
    M = (torch.randn(S, C, device=device) * C ** -0.25).requires_grad_()
    g = torch.randn(n, C, device=device).to(dtype)
    h64, M64 = h.detach().double().requires_grad_(), M.detach().double().requires_grad_()
    ref = memory_read_reference(h64, M64)
    ref_g = torch.autograd.grad(ref, [h64, M64], g.double())
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = fn(h, M)
    got = (out, *torch.autograd.grad(out, [h, M], g))
    return max(_rel(a, b) for a, b in zip(got, (ref, *ref_g)))


def matmul_peak(device: str, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", default=None, help="comma-separated N (default CUDA 16384,65536,131072; CPU 2048)")
    p.add_argument("--dtypes", default=None, help="comma-separated from fp32,bf16,fp16 (default CUDA all, CPU fp32,bf16)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--slots", type=int, default=512)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (default CUDA 30, CPU 5)")
    p.add_argument("--triton-variants", action="store_true",
                   help="also time the Triton launch configurations in TRITON_VARIANTS (16-bit dtypes)")
    args = p.parse_args()
    dev, C, S = args.device, args.width, args.slots
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    try:
        tokens = [int(x) for x in (args.tokens or ("16384,65536,131072" if dev == "cuda" else "2048")).split(",")]
    except ValueError:
        p.error(f"--tokens: comma-separated integers, got {args.tokens!r}")
    if min(tokens) < 1:
        p.error("--tokens: every N must be >= 1")
    dtypes = (args.dtypes or ("fp32,bf16,fp16" if dev == "cuda" else "fp32,bf16")).split(",")
    if not set(dtypes) <= set(DTYPES):
        p.error(f"--dtypes: from {', '.join(DTYPES)}, got {args.dtypes!r}")
    repeats = args.repeats or (30 if dev == "cuda" else 5)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(f"memory read fwd+bwd on {name}, C {C}, slots {S}, torch {torch.__version__}")
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        impls = _impls(dev, dtype, args.triton_variants)
        torch.manual_seed(0)
        errs = {k: check(fn, dev, dtype, C, S) for k, fn in impls.items()}
        peak = matmul_peak(dev, dtype, n=PEAK_N[dev])
        for N in tokens:
            h = torch.randn(N, C, device=dev).to(dtype).requires_grad_()
            M = (torch.randn(S, C, device=dev) * C ** -0.25).requires_grad_()
            g = torch.randn(N, C, device=dev).to(dtype)

            def step(fn, h=h, M=M, g=g, dtype=dtype):  # bound now: called within this iteration
                with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                    out = fn(h, M)
                torch.autograd.grad(out, [h, M], g)

            times: dict[str, list[float]] = {k: [] for k in impls}
            mem: dict[str, float] = {}
            for k, fn in impls.items():  # warm-up (and Triton compile), peak memory
                step(fn)
                _sync(dev)
                if dev == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    step(fn)
                    torch.cuda.synchronize()
                    mem[k] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            for _ in range(repeats):
                for k, fn in impls.items():
                    _sync(dev)
                    t = time.perf_counter()
                    step(fn)
                    _sync(dev)
                    times[k].append(time.perf_counter() - t)
            floor_ms = 6 * 2 * N * S * C / peak * 1e3
            ref_ms = statistics.median(times["reference"]) * 1e3
            for k in impls:
                ms = statistics.median(times[k]) * 1e3
                rows.append((dname, N, k, ms, ref_ms / ms, floor_ms / ms, mem.get(k), errs[k]))
    print(f"{'dtype':5} {'N':>7} {'impl':14} {'ms':>8} {'vs ref':>7} {'floor/t':>7} {'peak MiB':>9} {'rel err':>9}")
    for dname, N, k, ms, speed, eff, m, err in rows:
        mtxt = f"{m:9.0f}" if m is not None else f"{'-':>9}"
        print(f"{dname:5} {N:7d} {k:14} {ms:8.3f} {speed:6.2f}x {eff:7.0%} {mtxt} {err:9.1e}")
    print("floor/t: the matmul FLOPs (6 x 2 N slots C, recompute included) at the measured "
          f"{PEAK_N[dev]}^3 matmul rate of the dtype, over the measured time")


if __name__ == "__main__":
    main()
