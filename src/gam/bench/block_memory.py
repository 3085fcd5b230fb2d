"""Peak memory of one GAM block's forward + backward, measured in a process of its own.

``python -m gam.bench.block_memory IMPL PRECISION T BATCH DEVICE THREADS WIDTH`` prints
one JSON line: the peak above the baseline (CPU: the resident set, VmHWM reset after
warm-up; CUDA: ``max_memory_allocated``) and the bytes autograd keeps for backward.
A fresh process per measurement: no allocator cache or earlier peak carries over.
:func:`measure` is what ``gam bench speed`` calls; it starts that process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def measure(impl: str, precision: str, seq: int, batch: int, device: str, threads: int | None,
            n_embd: int = 512) -> dict[str, Any]:
    """Run :func:`main` in a fresh subprocess and return its result (or the error it printed)."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the gam package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # Large allocations go to mmap and are returned when freed, so the resident
    # set follows live memory (glibc; ignored elsewhere).
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    env["MALLOC_TRIM_THRESHOLD_"] = str(64 * 1024)
    args = [sys.executable, "-m", "gam.bench.block_memory", impl, precision, str(seq), str(batch), device,
            str(threads or 0), str(n_embd)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"impl": impl, "precision": precision, "T": seq, "error": proc.stderr.strip()[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> dict[str, Any]:
    import torch

    from gam.bench.common import peak_rss_bytes, reset_peak_rss, rss_bytes
    from gam.config import GAMConfig
    from gam.layers.gam import GAMBlock
    from gam.train import precision_dtype

    impl, precision, T, B, device, threads, C = argv
    T, B, C = int(T), int(B), int(C)
    if threads != "0":
        torch.set_num_threads(int(threads))
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    amp = precision_dtype(precision)
    torch.manual_seed(0)
    block = GAMBlock(GAMConfig(gam_impl=impl, dropout=0.1, n_embd=C, num_memory_slots=C)).to(dev).train()

    def run(x: torch.Tensor) -> None:
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            y = block(x)
        y.sum().backward()
        block.zero_grad(set_to_none=True)

    run(torch.randn(B, 64, C, device=dev))  # load kernels before the baseline
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:  # parameters are resident anyway
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(B, T, C, device=dev)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            y = block(x)
    del y
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        reset_peak_rss()
    run(x)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    return {"impl": impl, "precision": precision, "T": T, "batch": B, "peak_bytes": peak,
            "saved_for_backward_bytes": sum(saved.values()), "input_bytes": x.numel() * x.element_size()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
