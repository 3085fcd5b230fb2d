"""Training throughput of the paper-config LMs, side by side: ``gam bench speed``.

Rows (each a full training step: forward, backward, grad-norm clip 1.0, AdamW
step, as the paper's loop; lr 3e-4, betas (0.9, 0.95), weight decay 0.1; random
tokens, dropout 0.1 active):

- GAM, the paper's code end to end (``gam_impl="reference"``: eager block,
  ``cross_entropy(logits.float())``, PyTorch's default foreach AdamW) in fp32:
  the baseline; the same in bf16 autocast. Every other row takes the library's
  training step, as ``gam train`` runs it: ``model(idx, targets,
  return_logits=False)`` (head fused into the cross-entropy) and fused AdamW;
- GAM fast path (``gam_impl="fast"``) in fp32 and in bf16 autocast (fp32 master
  weights), eager, and the same model wrapped in ``torch.compile`` (Inductor fuses
  the elementwise work between the matmuls; ``gam train --compile``);
- Transformer (SDPA) and Mamba (when ``gam.layers.mamba`` is importable) in fp32 and
  bf16, and the Transformer compiled in bf16, so the compiled GAM has a compiled peer.

Compiled rows compile during their warm-up steps (at least one); compilation time
is logged, not timed.

Rows are measured in rounds of ``--steps`` timed steps per row, the steps
interleaved across rows (one step of each row in turn), so a change in machine
speed hits every row alike; the figure per row is the median step time over all
rounds. Also reported:

- the matmul peak of the machine for each dtype, measured in the same run, between
  the steps (the best, over the GEMM shapes the model uses and a 2048^3 GEMM, of
  each shape's median GFLOP/s);
- model FLOPs utilization (MFU) = training FLOPs per token x tokens/s / that peak,
  with the FLOPs per token counted as (forward, x 3 for training; recomputation
  not counted):
  2 x (weights of every nn.Linear and nn.Conv1d in the blocks)  [gate, FFN, conv, attention and Mamba projections]
  + 2 x n_layer x 2 x slots x C                                 [GAM memory read: h Mᵀ and P M]
  + 2 x n_layer x 2 x C x (T + 1) / 2                           [Transformer causal attention: QKᵀ and AV]
  + 2 x C x vocab                                               [LM head]
  (Mamba's selective scan is not counted: it is not a matmul);
- peak memory of one GAM block's forward+backward at T = ``--memory-seq``
  (batch ``--memory-batch``), reference vs fast path, each in a fresh
  subprocess: on CPU the peak resident set above the baseline (large
  allocations forced to mmap so freed memory leaves the resident set), on CUDA
  ``max_memory_allocated``; plus the bytes autograd keeps for backward.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROWS = (
    # key, label, model, config fields, precision, wrapped in torch.compile
    ("gam_ref_fp32", "GAM reference (paper code)", "gam", {"gam_impl": "reference"}, "fp32", False),
    ("gam_fast_fp32", "GAM fast path", "gam", {"gam_impl": "fast"}, "fp32", False),
    ("gam_ref_bf16", "GAM reference (paper code)", "gam", {"gam_impl": "reference"}, "bf16", False),
    ("gam_fast_bf16", "GAM fast path", "gam", {"gam_impl": "fast"}, "bf16", False),
    ("gam_fast_compiled_fp32", "GAM fast path + torch.compile", "gam", {"gam_impl": "fast"}, "fp32", True),
    ("gam_fast_compiled_bf16", "GAM fast path + torch.compile", "gam", {"gam_impl": "fast"}, "bf16", True),
    ("transformer_fp32", "Transformer (SDPA)", "transformer", {"attn_impl": "sdpa"}, "fp32", False),
    ("transformer_bf16", "Transformer (SDPA)", "transformer", {"attn_impl": "sdpa"}, "bf16", False),
    ("transformer_compiled_bf16", "Transformer (SDPA) + torch.compile", "transformer", {"attn_impl": "sdpa"},
     "bf16", True),
    ("mamba_fp32", "Mamba", "mamba", {"mamba_wiring": "standard"}, "fp32", False),
    ("mamba_bf16", "Mamba", "mamba", {"mamba_wiring": "standard"}, "bf16", False),
    # The opt-in key-value slot memory (docs/kv-memory.md), beside the paper GAM's fast path.
    ("gam_kv_slots_bf16", "GAM, key-value slot memory (64 slots per head)", "gam",
     {"memory": "kv_slots", "num_memory_slots": 64}, "bf16", False),
)
BASELINE = "gam_ref_fp32"
GOALS = {
    "fast_bf16_over_ref_fp32": 1.8,
    "fast_fp32_over_ref_fp32": 1.0,
    "fast_mfu": 0.70,
    "block_memory_fast_over_ref": 0.8,
}


# ----------------------------------------------------------------------------- environment

def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    PyTorch's CPU allocator does not cache: every large activation is a fresh
    ``malloc``, which glibc serves with ``mmap`` and page-faults in on first
    touch (several ms per step at this size). Raising the mmap and trim
    thresholds lets the heap reuse freed blocks. Process-wide; glibc only.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    return bool(ok and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _amp_dtype(precision: str):
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------- FLOPs

def flops_per_token(model, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token (forward and training = 3 x forward), as in the module doc."""
    import torch.nn as nn

    cfg = model.config
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    linear = 0
    for block in model.blocks:
        for m in block.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                linear += m.weight.numel()
    parts = {"blocks_linear": 2.0 * linear, "head": 2.0 * C * V}
    if cfg.model == "gam" and cfg.variant != "local_only":
        parts["memory_read"] = 2.0 * L * 2 * cfg.num_memory_slots * C
    if cfg.model == "transformer":
        parts["attention"] = 2.0 * L * 2 * C * (seq_len + 1) / 2
    forward = sum(parts.values())
    return {"forward": forward, "train": 3 * forward, "parts_forward": parts}


def matmul_peak(precision: str, device, shapes, reps: int = 5, cpu_time: bool = False) -> dict[str, Any]:
    """Median GFLOP/s of each GEMM (M, K, N) in ``precision`` (wall clock, or
    process CPU time with ``cpu_time``)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    result = {}
    for M, K, N in shapes:
        a = torch.randn(M, K, device=device).to(dtype)
        b = torch.randn(K, N, device=device).to(dtype)
        for _ in range(2):
            a @ b
        times = []
        clock = time.process_time if cpu_time else time.perf_counter
        for _ in range(reps):
            _sync(device)
            t0 = clock()
            a @ b
            _sync(device)
            times.append(clock() - t0)
        result[f"{M}x{K}x{N}"] = 2 * M * K * N / max(statistics.median(times), 1e-9) / 1e9
    return result


# ----------------------------------------------------------------------------- training step

def make_trainer(key: str, model_name: str, fields: dict, precision: str, *,
                 device, batch: int, seq: int, seed: int, overrides: dict | None = None,
                 compiled: bool = False):
    import torch

    from gam.models.lm import build_model

    torch.manual_seed(seed)
    config = {"block_size": max(seq, 256), "dropout": 0.1, **fields, **(overrides or {})}
    model = build_model(model_name, **config).to(device).train()
    opt_kwargs = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    # Reference rows are the paper's code end to end: its eager block, cross-entropy
    # of fp32 logits and PyTorch's default (foreach) AdamW. Every other row (GAM fast,
    # Transformer, Mamba) takes the library's training step: head fused into the loss,
    # fused AdamW.
    paper_code = model.config.gam_impl == "reference"
    opt = torch.optim.AdamW(model.parameters(), **opt_kwargs, **({} if paper_code else {"fused": True}))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
    tgt = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
    amp = _amp_dtype(precision)
    dev_type = torch.device(device).type
    forward = torch.compile(model) if compiled else model  # compiles on its first step

    def step() -> float:
        with torch.autocast(dev_type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = forward(idx, tgt, return_logits=paper_code)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return model, step


def mamba_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("gam.layers.mamba") is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------- block memory

_CHILD = r"""
import json, sys, torch
def _kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
def rss_bytes():
    return _kib("VmRSS")
def peak_rss_bytes():
    return _kib("VmHWM")
def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
from gam.config import GAMConfig
from gam.layers.gam import GAMBlock
impl, precision, T, B, device, threads, C = sys.argv[1:8]
T, B, C = int(T), int(B), int(C)
if threads != "0":
    torch.set_num_threads(int(threads))
dev = torch.device(device)
cuda = dev.type == "cuda"
amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
torch.manual_seed(0)
block = GAMBlock(GAMConfig(gam_impl=impl, dropout=0.1, n_embd=C, num_memory_slots=C)).to(dev).train()
def run(x):
    with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        y = block(x)
    y.sum().backward()
    block.zero_grad(set_to_none=True)
run(torch.randn(B, 64, C, device=dev))            # load kernels before the baseline
saved = {}
params = {p.untyped_storage().data_ptr() for p in block.parameters()}
def pack(t):
    ptr = t.untyped_storage().data_ptr()
    if ptr not in params:  # parameters are resident anyway
        saved[ptr] = t.untyped_storage().nbytes()
    return t
x = torch.randn(B, T, C, device=dev)
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        y = block(x)
del y
saved_bytes = sum(saved.values())
if cuda:
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    base = rss_bytes(); reset_peak_rss()
run(x)
if cuda:
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    peak = peak_rss_bytes() - base
print(json.dumps({"impl": impl, "precision": precision, "T": T, "batch": B, "peak_bytes": peak,
                  "saved_for_backward_bytes": saved_bytes, "input_bytes": x.numel() * x.element_size()}))
"""


def block_memory(impl: str, precision: str, seq: int, batch: int, device: str, threads: int | None,
                 n_embd: int = 512) -> dict:
    """Peak memory of one GAM block's forward+backward, in a fresh subprocess."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # Large allocations go to mmap and are returned when freed, so the resident
    # set follows live memory (glibc; ignored elsewhere).
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    env["MALLOC_TRIM_THRESHOLD_"] = str(64 * 1024)
    args = [sys.executable, "-c", _CHILD, impl, precision, str(seq), str(batch), device, str(threads or 0),
            str(n_embd)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"impl": impl, "precision": precision, "T": seq, "error": proc.stderr.strip()[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- results

def environment(device: str) -> dict[str, Any]:
    import platform

    import torch

    env: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                           "torch_threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
                           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        env["cpu"] = platform.processor()
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        env["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        env["git"] = rev or None
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    return env


def describe_environment(env: dict[str, Any]) -> str:
    where = env.get("gpu") or env.get("cpu")
    load = env.get("load_average_start")
    return (f"{where} ({env['device']}), {env['logical_cpus']} logical CPUs, {env['torch_threads']} torch threads"
            + (f", load average at start {load[0]:.2f}" if load else "")
            + f"; torch {env['torch']}; git {env.get('git')}; {env['timestamp']}")


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out, name: str, markdown: str, raw: dict) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md", out / f"{name}.json"]
    paths[0].write_text(markdown)
    paths[1].write_text(json.dumps(raw, indent=2, default=str) + "\n")
    return paths


# ----------------------------------------------------------------------------- run

def run(out: str | Path = "results/bench-speed", **kwargs) -> dict[str, Any]:
    """Run the benchmark (see :func:`_run` for the options); restores torch's thread count."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(out, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _run(out: str | Path = "results/bench-speed", *, device: str = "cpu", batch: int = 8, seq: int = 256,
        steps: int = 4, rounds: int = 3, warmup: int = 2, threads: int | None = None,
        rows: list[str] | None = None, memory_seq: int = 8192, memory_batch: int = 1,
        tune_malloc: bool = True, seed: int = 0, overrides: dict | None = None,
        log=print) -> dict[str, Any]:
    """Run the benchmark; ``overrides`` (config fields for every model) exist for smoke tests."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    malloc_tuned = tune_cpu_allocator() if (tune_malloc and device == "cpu") else False
    env = environment(device)
    env["malloc_tuned"] = malloc_tuned
    keys = rows or [r[0] for r in ROWS]
    specs = [r for r in ROWS if r[0] in keys]
    if not mamba_available():
        skipped = [r[0] for r in specs if r[2] == "mamba"]
        specs = [r for r in specs if r[2] != "mamba"]
        if skipped:
            log(f"skipping {', '.join(skipped)}: gam.layers.mamba is not available")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")

    # GEMM peak, same dtypes as the rows.
    N, C = batch * seq, (overrides or {}).get("n_embd", 512)
    V = (overrides or {}).get("vocab_size", 10000)
    gemm_shapes = [(N, C, 4 * C), (N, 4 * C, C), (N, C, V), (2048, 2048, 2048)]
    precisions = sorted({r[4] for r in specs})
    gemm: dict[str, dict[str, list[float]]] = {p: {} for p in precisions}
    gemm_cpu: dict[str, dict[str, list[float]]] = {p: {} for p in precisions}
    one_thread = device == "cpu" and torch.get_num_threads() == 1

    def measure_gemm() -> None:
        for p in precisions:
            for shape, gflops in matmul_peak(p, device, gemm_shapes, reps=3).items():
                gemm[p].setdefault(shape, []).append(gflops)
            if one_thread:
                for shape, gflops in matmul_peak(p, device, gemm_shapes, reps=3, cpu_time=True).items():
                    gemm_cpu[p].setdefault(shape, []).append(gflops)

    log(f"building {len(specs)} models (batch {batch} x {seq} tokens, device {device}, "
        f"{torch.get_num_threads()} threads, malloc tuned: {malloc_tuned})")
    trainers = {}
    skipped_rows = {}
    for key, label, model_name, fields, precision, compiled in specs:
        model, step = make_trainer(key, model_name, fields, precision, device=device, batch=batch,
                                   seq=seq, seed=seed, overrides=overrides, compiled=compiled)
        t0 = time.perf_counter()
        try:
            for _ in range(max(warmup, 1) if compiled else warmup):  # compilation stays out of the timing
                step()
        except Exception as err:  # noqa: BLE001 - Inductor needs a C++ compiler (CPU) or Triton (CUDA)
            if not compiled:
                raise
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            skipped_rows[key] = f"torch.compile failed: {reason}"
            log(f"skipping {key}: {skipped_rows[key]}")
            continue
        if compiled:
            log(f"{key}: compiled and warmed up in {time.perf_counter() - t0:.0f} s")
        _sync(device)
        trainers[key] = (model, step)
    specs = [r for r in specs if r[0] in trainers]
    env["skipped_rows"] = skipped_rows
    times: dict[str, list[float]] = {r[0]: [] for r in specs}
    cpu_times: dict[str, list[float]] = {r[0]: [] for r in specs}
    losses: dict[str, float] = {}
    load = []
    for rnd in range(rounds):
        # Steps interleaved across rows (A B C A B C ...), not a block of steps per
        # row, and the GEMM peak measured between them: a host whose speed drifts
        # over seconds then slows every row, and the peak, alike.
        for _ in range(steps):
            measure_gemm()
            for key, *_ in specs:
                _, step = trainers[key]
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                loss = step()
                _sync(device)
                times[key].append(time.perf_counter() - t0)
                cpu_times[key].append(time.process_time() - c0)
                losses[key] = float(loss.detach())
        load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        log(f"round {rnd + 1}/{rounds}: " + ", ".join(
            f"{k} {batch * seq / statistics.median(times[k]):.0f} tok/s" for k, *_ in specs))
    measure_gemm()

    peaks = {p: max(statistics.median(v) for v in gemm[p].values()) for p in precisions}
    peaks_cpu = ({p: max(statistics.median(v) for v in gemm_cpu[p].values()) for p in precisions}
                 if one_thread else {})
    results = []
    base_tps = None
    for key, label, model_name, fields, precision, compiled in specs:
        model, _ = trainers[key]
        med = statistics.median(times[key])
        tps = batch * seq / med
        fl = flops_per_token(model, seq)
        achieved = fl["train"] * tps / 1e9
        row = {"key": key, "label": label, "model": model_name, "fields": fields, "precision": precision,
               "paper_code": fields.get("gam_impl") == "reference", "compiled": compiled, "median_step_s": med, "step_s": times[key],
               "cpu_util": statistics.median(c / w for c, w in zip(cpu_times[key], times[key])),
               "tokens_per_s": tps, "train_flops_per_token": fl["train"], "flops_parts_forward": fl["parts_forward"],
               "achieved_gflops": achieved, "matmul_peak_gflops": peaks[precision],
               "mfu": achieved / peaks[precision], "last_loss": losses.get(key)}
        if one_thread:
            # Load-robust variant for a shared machine: the same, on process CPU time
            # (one thread: the time the core actually worked on this process).
            cpu_med = statistics.median(cpu_times[key])
            row["tokens_per_cpu_s"] = batch * seq / cpu_med
            row["matmul_peak_gflops_cpu_time"] = peaks_cpu[precision]
            row["mfu_cpu_time"] = fl["train"] * row["tokens_per_cpu_s"] / 1e9 / peaks_cpu[precision]
        if key == BASELINE:
            base_tps = tps
        results.append(row)
    base_cpu = next((r.get("tokens_per_cpu_s") for r in results if r["key"] == BASELINE), None)
    for row in results:
        row["speedup_vs_ref_fp32"] = row["tokens_per_s"] / base_tps if base_tps else None
        if base_cpu and "tokens_per_cpu_s" in row:
            row["speedup_vs_ref_fp32_cpu_time"] = row["tokens_per_cpu_s"] / base_cpu
    del trainers
    gc.collect()

    memory = []
    if memory_seq:
        for precision in ("fp32", "bf16"):
            for impl in ("reference", "fast"):
                log(f"block memory: {impl} {precision}, T={memory_seq}, batch {memory_batch}")
                memory.append(block_memory(impl, precision, memory_seq, memory_batch, device, threads, C))

    by_key = {r["key"]: r for r in results}
    summary = {}
    if "gam_fast_bf16" in by_key and base_tps:
        summary["fast_bf16_over_ref_fp32"] = by_key["gam_fast_bf16"]["speedup_vs_ref_fp32"]
    if "gam_fast_fp32" in by_key and base_tps:
        summary["fast_fp32_over_ref_fp32"] = by_key["gam_fast_fp32"]["speedup_vs_ref_fp32"]
    for k in ("gam_fast_compiled_bf16", "gam_fast_compiled_fp32"):
        if k in by_key and base_tps:
            summary[f"{k.removeprefix('gam_')}_over_ref_fp32"] = by_key[k]["speedup_vs_ref_fp32"]
    for k in ("gam_fast_fp32", "gam_fast_bf16", "gam_fast_compiled_fp32", "gam_fast_compiled_bf16"):
        if k in by_key:
            summary[f"mfu_{k}"] = by_key[k]["mfu"]
    if one_thread:
        for k in ("gam_fast_bf16", "gam_fast_fp32"):
            if k in by_key and "speedup_vs_ref_fp32_cpu_time" in by_key[k]:
                summary[f"cpu_time_{k}_over_ref_fp32"] = by_key[k]["speedup_vs_ref_fp32_cpu_time"]
                summary[f"cpu_time_mfu_{k}"] = by_key[k]["mfu_cpu_time"]
    for precision in ("fp32", "bf16"):
        m = {r["impl"]: r for r in memory if r.get("precision") == precision and "peak_bytes" in r}
        if "reference" in m and "fast" in m:
            summary[f"block_memory_fast_over_ref_{precision}"] = m["fast"]["peak_bytes"] / m["reference"]["peak_bytes"]

    env["load_average_per_round"] = load
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    md = render_markdown(results, peaks, gemm, memory, summary, env, batch, seq, steps, rounds,
                         describe_environment(env), markdown_table)
    raw = {"bench": "speed", "config": {"device": device, "batch": batch, "seq": seq, "steps": steps,
                                        "rounds": rounds, "warmup": warmup, "memory_seq": memory_seq,
                                        "memory_batch": memory_batch, "seed": seed,
                                        "optimizer": "AdamW lr 3e-4 betas (0.9, 0.95) wd 0.1, clip 1.0"},
           "environment": env, "matmul_gflops": {p: {s: v for s, v in d.items()} for p, d in gemm.items()},
           "matmul_peak_gflops": peaks, "matmul_peak_gflops_cpu_time": peaks_cpu, "rows": results, "block_memory": memory, "summary": summary,
           "goals": GOALS}
    paths = write_results(out, "speed", md, raw)
    return {"markdown": md, "rows": results, "summary": summary, "memory": memory, "paths": paths}


def render_markdown(results, peaks, gemm, memory, summary, env, batch, seq, steps, rounds, env_line,
                    markdown_table) -> str:
    on_cpu = env.get("device") == "cpu"  # CPU util means nothing for a GPU's host thread
    lines = [f"# gam bench speed: training tokens/s, batch {batch} x {seq} tokens", "",
             env_line + f"; malloc tuned: {env.get('malloc_tuned')}; load average per round: "
             + ", ".join(f"{x:.2f}" for x in env.get("load_average_per_round", []) if x is not None), "",
             f"Median over {rounds} rounds x {steps} steps of a full training step (forward, backward, "
             "clip, AdamW), steps interleaved across rows. MFU: training FLOPs per token (see `gam.bench.speed`) x tokens/s over the "
             "measured matmul peak of the row's dtype."
             + (" CPU util: process CPU time / wall time per step (below the thread count means the "
                "machine was shared)." if on_cpu else ""), ""]
    table = []
    for r in results:
        table.append([f"{r['label']} ({r['precision']})", f"{r['tokens_per_s']:,.0f}",
                      f"{r['median_step_s'] * 1e3:,.0f}", f"{r['speedup_vs_ref_fp32']:.2f}x"
                      if r["speedup_vs_ref_fp32"] else "—",
                      f"{r['train_flops_per_token'] / 1e6:.1f}", f"{r['achieved_gflops']:.0f}",
                      f"{100 * r['mfu']:.0f}%"] + ([f"{r['cpu_util']:.2f}"] if on_cpu else []))
    lines.append(markdown_table(["model", "tokens/s", "step ms", "vs GAM ref fp32", "train MFLOP/token",
                                 "GFLOP/s", "MFU"] + (["CPU util"] if on_cpu else []), table))
    for key, why in env.get("skipped_rows", {}).items():
        lines += ["", f"Row `{key}` not measured: {why}"]
    lines += ["", "Matmul peak (best median GFLOP/s over the GEMMs below, same run): "
              + ", ".join(f"{p} {v:.0f}" for p, v in peaks.items()), ""]
    if any("tokens_per_cpu_s" in r for r in results):
        lines += ["One torch thread: the same measured on process CPU time (the time the core worked "
                  "for this process, robust to other jobs on a shared machine); matmul peak on CPU time: "
                  + ", ".join(f"{p} {r['matmul_peak_gflops_cpu_time']:.0f}" for p, r in
                              {r["precision"]: r for r in results}.items()) + " GFLOP/s.", ""]
        lines.append(markdown_table(
            ["model", "tokens per CPU-s", "vs GAM ref fp32", "MFU (CPU time)"],
            [[f"{r['label']} ({r['precision']})", f"{r['tokens_per_cpu_s']:,.0f}",
              f"{r.get('speedup_vs_ref_fp32_cpu_time', float('nan')):.2f}x", f"{100 * r['mfu_cpu_time']:.0f}%"]
             for r in results]))
        lines.append("")
    gem = []
    for p, d in gemm.items():
        gem.append([p] + [f"{statistics.median(v):.0f}" for v in d.values()])
    shapes = list(next(iter(gemm.values())).keys()) if gemm else []
    lines.append(markdown_table(["dtype"] + [f"GEMM {s}" for s in shapes], gem))
    if memory:
        lines += ["", "Peak memory of one GAM block, forward + backward (fresh subprocess each):", ""]
        mem_rows = []
        for m in memory:
            if "peak_bytes" in m:
                mem_rows.append([f"{m['impl']} ({m['precision']})", m["T"], m["batch"],
                                 f"{m['peak_bytes'] / 2**20:.0f}", f"{m['saved_for_backward_bytes'] / 2**20:.0f}"])
            else:
                mem_rows.append([f"{m['impl']} ({m['precision']})", m.get("T"), "", "error", m.get("error", "")[:80]])
        lines.append(markdown_table(["GAM block", "T", "batch", "peak MiB above baseline", "kept for backward MiB"],
                                    mem_rows))
    if summary:
        lines += ["", "Against the goals" + ("" if on_cpu else " (set for the 2-core CPU, batch 8 x 256)") + ":", ""]
        goal_rows = []
        names = {"fast_bf16_over_ref_fp32": ("fast bf16 / reference fp32 tokens/s", ">= 1.8"),
                 "fast_fp32_over_ref_fp32": ("fast fp32 / reference fp32 tokens/s", ">= 1.0"),
                 "fast_compiled_bf16_over_ref_fp32": ("fast + torch.compile bf16 / reference fp32 tokens/s",
                                                      ">= 1.8"),
                 "fast_compiled_fp32_over_ref_fp32": ("fast + torch.compile fp32 / reference fp32 tokens/s",
                                                      ">= 1.0"),
                 "mfu_gam_fast_fp32": ("MFU fast fp32", ">= 70%"),
                 "mfu_gam_fast_bf16": ("MFU fast bf16", ">= 70%"),
                 "mfu_gam_fast_compiled_fp32": ("MFU fast + torch.compile fp32", ">= 70%"),
                 "mfu_gam_fast_compiled_bf16": ("MFU fast + torch.compile bf16", ">= 70%"),
                 "block_memory_fast_over_ref_fp32": ("block peak memory fast / reference (fp32)", "<= 0.8"),
                 "block_memory_fast_over_ref_bf16": ("block peak memory fast / reference (bf16)", "<= 0.8"),
                 "cpu_time_gam_fast_bf16_over_ref_fp32": ("CPU time: fast bf16 / reference fp32", ">= 1.8"),
                 "cpu_time_gam_fast_fp32_over_ref_fp32": ("CPU time: fast fp32 / reference fp32", ">= 1.0"),
                 "cpu_time_mfu_gam_fast_bf16": ("CPU time: MFU fast bf16", ">= 70%"),
                 "cpu_time_mfu_gam_fast_fp32": ("CPU time: MFU fast fp32", ">= 70%")}
        for k, v in summary.items():
            name, goal = names.get(k, (k, ""))
            val = f"{100 * v:.0f}%" if "mfu" in k else f"{v:.2f}"
            goal_rows.append([name, val, goal])
        lines.append(markdown_table(["measure", "value", "goal"], goal_rows))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line

def add_parser(bench_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = bench_sub.add_parser(
        "speed", help="training tokens/s of the paper-config LMs: GAM reference vs fast path, fp32/bf16, "
                      "Transformer, Mamba; MFU; block peak memory",
        description=__doc__.split("\n\n")[0] + " Writes speed.md and speed.json into --out.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="results/bench-speed", help="output folder (default results/bench-speed)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="timed steps per row per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all rows (the median pools them)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--rows", default=",".join(r[0] for r in ROWS), help="comma-separated row keys")
    p.add_argument("--memory-seq", type=int, default=8192, help="T of the block memory test (0: skip)")
    p.add_argument("--memory-batch", type=int, default=1)
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="keep glibc's default malloc thresholds (see tune_cpu_allocator)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd)
    return p


def cmd(args: argparse.Namespace) -> None:
    known = [r[0] for r in ROWS]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in known:
            raise ValueError(f"unknown row {r!r}; choose from {', '.join(known)}")
    for name in ("batch", "seq", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    result = run(args.out, device=args.device, batch=args.batch, seq=args.seq, steps=args.steps,
                 rounds=args.rounds, warmup=args.warmup, threads=args.threads, rows=rows,
                 memory_seq=args.memory_seq, memory_batch=args.memory_batch,
                 tune_malloc=not args.no_tune_malloc, seed=args.seed)
    print(result["markdown"])
    print("wrote " + ", ".join(str(p) for p in result["paths"]))
