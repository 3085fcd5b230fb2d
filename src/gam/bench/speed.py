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
  bf16, and the Transformer compiled in bf16, so the compiled GAM has a compiled peer;
- the opt-in kv-slot memory (``memory="kv_slots"``) in bf16, eager and compiled.

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

import dataclasses
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gam.bench import block_memory
from gam.bench.common import (
    bench_preset,
    describe_provenance,
    end_provenance,
    environment,
    markdown_table,
    start_provenance,
    synchronize,
    write_results,
)
from gam.config import check_threads, described
from gam.models import registry
from gam.models.registry import ModelSpec


@dataclass(frozen=True)
class Row:
    """One row: a registry model (gam.models.registry), a precision, compiled or eager."""

    key: str
    model: str  # registry key
    precision: str
    compiled: bool = False

    @property
    def spec(self) -> ModelSpec:
        return registry.get(self.model)

    @property
    def label(self) -> str:
        return self.spec.label + (" + torch.compile" if self.compiled else "")

    @property
    def paper_code(self) -> bool:
        return self.spec.fields.get("gam_impl") == "reference"


ROWS = (
    Row("gam_ref_fp32", "gam_reference", "fp32"),
    Row("gam_fast_fp32", "gam_fast", "fp32"),
    Row("gam_ref_bf16", "gam_reference", "bf16"),
    Row("gam_fast_bf16", "gam_fast", "bf16"),
    Row("gam_fast_compiled_fp32", "gam_fast", "fp32", compiled=True),
    Row("gam_fast_compiled_bf16", "gam_fast", "bf16", compiled=True),
    Row("transformer_fp32", "transformer_sdpa", "fp32"),
    Row("transformer_bf16", "transformer_sdpa", "bf16"),
    Row("transformer_compiled_bf16", "transformer_sdpa", "bf16", compiled=True),
    Row("mamba_fp32", "mamba_standard", "fp32"),
    Row("mamba_bf16", "mamba_standard", "bf16"),
    # The opt-in key-value slot memory (docs/kv-memory.md), beside the paper GAM's fast path.
    Row("gam_kv_slots_bf16", "gam_kv_slots", "bf16"),
    Row("gam_kv_slots_compiled_bf16", "gam_kv_slots", "bf16", compiled=True),
)
ROW_KEYS = tuple(r.key for r in ROWS)
BASELINE = "gam_ref_fp32"
GOALS = {
    "fast_bf16_over_ref_fp32": 1.8,
    "fast_fp32_over_ref_fp32": 1.0,
    "fast_mfu": 0.70,
    "block_memory_fast_over_ref": 0.8,
}


# ----------------------------------------------------------------------------- environment

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

    from gam.train import precision_dtype

    dtype = precision_dtype(precision) or torch.float32
    result = {}
    for M, K, N in shapes:
        a = torch.randn(M, K, device=device).to(dtype)
        b = torch.randn(K, N, device=device).to(dtype)
        for _ in range(2):
            a @ b
        times = []
        clock = time.process_time if cpu_time else time.perf_counter
        for _ in range(reps):
            synchronize(device)
            t0 = clock()
            a @ b
            synchronize(device)
            times.append(clock() - t0)
        result[f"{M}x{K}x{N}"] = 2 * M * K * N / max(statistics.median(times), 1e-9) / 1e9
    return result


# ----------------------------------------------------------------------------- training step

def speed_train_config(precision: str):
    """lr 3e-4 constant (min_lr = lr), betas (0.9, 0.95), weight decay 0.1, clip 1.0."""
    from gam.config import TrainConfig

    return TrainConfig(lr=3e-4, min_lr=3e-4, warmup_steps=0, beta1=0.9, beta2=0.95, weight_decay=0.1,
                       grad_clip=1.0, precision=precision)


SIZES = ("paper", "cpu")
SIZE_BATCH = {"paper": (8, 256), "cpu": (16, 128)}  # (sequences, tokens) per step


def model_shape(size: str, seq: int) -> dict[str, Any]:
    """GAMConfig fields every row is built at (each row's own fields win): ``paper``, the
    registry's defaults (the paper's configuration: width 512, 6 layers, vocabulary
    10,000) with dropout 0.1; ``cpu``, the cpu bench preset's model (width 96, 4 layers,
    context 128, vocabulary 8,192, no dropout), the size every WikiText-2 and MQAR
    figure of the cpu preset trains at."""
    if size == "cpu":
        fields = bench_preset("cpu", "paper", "cpu")[0]
        return {**fields, "block_size": max(seq, fields["block_size"])}
    return {"block_size": max(seq, 256), "dropout": 0.1}


def make_trainer(row: Row, *, device, batch: int, seq: int, seed: int, overrides: dict | None = None,
                 size: str = "paper"):
    """The row's model and a function that takes one training step on fixed random tokens
    (the trainer's :class:`gam.train.TrainingStep`), at ``size`` (:func:`model_shape`).

    Reference rows are the paper's code end to end: its eager block, cross-entropy of the
    full logits and PyTorch's default (foreach) AdamW. Every other row takes the library's
    step as ``gam train`` does: head fused into the loss, fused AdamW."""
    import torch

    from gam.train import TrainingStep

    torch.manual_seed(seed)
    model = row.spec.build(model_shape(size, seq), overrides).to(device).train()
    forward = torch.compile(model) if row.compiled else model  # compiles on its first step
    stepper = TrainingStep(model, speed_train_config(row.precision), device, total_steps=1, forward=forward,
                           fused_optimizer=not row.paper_code, full_logits=row.paper_code)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
    tgt = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)

    def step() -> torch.Tensor:
        return stepper(0, idx, tgt)

    return model, step


# ----------------------------------------------------------------------------- run

NAME = "speed"
HELP = ("training tokens/s of the paper-config LMs: GAM reference vs fast path, fp32/bf16, Transformer, "
        "Mamba; MFU; block peak memory")
DEFAULT_OUT = "results/bench-speed"


@dataclass
class SpeedConfig:
    """Training throughput of the paper-config LMs, side by side, each a full training step
    (the trainer's); model FLOPs utilization against the matmul peak measured in the same
    run; peak memory of one GAM block. Writes speed.md and speed.json."""

    device: str = described("cpu", "where to measure", choices=("cpu", "cuda"))
    size: str = described("paper", "the models' size: paper (width 512, 6 layers, vocabulary 10,000, batch 8 x 256) "
                                   "or cpu (the cpu bench preset's: width 96, 4 layers, vocabulary 8,192, "
                                   "batch 16 x 128)", choices=SIZES)
    batch: int | None = described(None, "sequences per step (default: the size's)")
    seq: int | None = described(None, "tokens per sequence (default: the size's)")
    steps: int = described(4, "timed steps per row per round")
    rounds: int = described(3, "rounds over all rows (the median pools them)")
    warmup: int = described(2, "untimed steps per row first")
    threads: int | None = described(None, "torch CPU threads (default: torch's)")
    rows: tuple[str, ...] = described(ROW_KEYS, "rows to measure", choices=ROW_KEYS)
    memory_seq: int = described(8192, "T of the block memory test (0: skip)")
    memory_batch: int = described(1, "batch of the block memory test")
    no_tune_malloc: bool = described(False, "keep glibc's default malloc thresholds (gam.resources.tune_cpu_allocator)")
    seed: int = described(0, "seed of the models and the random tokens")
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields for every model (smoke tests)

    def validate(self) -> None:
        for name in ("batch", "seq", "steps", "rounds"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        check_threads(self.threads)


Config = SpeedConfig


def run(config: SpeedConfig, log=print) -> dict[str, Any]:
    """Measure every row of ``config``; restores torch's thread count."""
    import torch

    config.validate()
    batch, seq = SIZE_BATCH[config.size]
    config = dataclasses.replace(config, batch=config.batch or batch, seq=config.seq or seq)  # as recorded
    threads = torch.get_num_threads()
    try:
        return _run(config, log)
    finally:
        torch.set_num_threads(threads)


def _run(config: SpeedConfig, log) -> dict[str, Any]:
    provenance = start_provenance()
    device, batch, seq, steps, size = config.device, config.batch, config.seq, config.steps, config.size
    rounds, warmup, threads, seed = config.rounds, config.warmup, config.threads, config.seed
    memory_seq, memory_batch, overrides = config.memory_seq, config.memory_batch, config.overrides
    import torch

    from gam.resources import tune_cpu_allocator  # (here: `gam --help` imports this module, never torch)

    if threads:
        torch.set_num_threads(threads)
    malloc_tuned = tune_cpu_allocator() if (not config.no_tune_malloc and device == "cpu") else False
    env = environment(device)
    env["malloc_tuned"] = malloc_tuned
    specs = [r for r in ROWS if r.key in config.rows]
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")

    # GEMM peak, same dtypes as the rows.
    shape = {**model_shape(size, seq), **(overrides or {})}
    N, C, V = batch * seq, shape.get("n_embd", 512), shape.get("vocab_size", 10000)
    gemm_shapes = [(N, C, 4 * C), (N, 4 * C, C), (N, C, V), (2048, 2048, 2048)]
    precisions = sorted({r.precision for r in specs})
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
    for row in specs:
        key, compiled = row.key, row.compiled
        model, step = make_trainer(row, device=device, batch=batch, seq=seq, seed=seed, overrides=overrides,
                                   size=size)
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
        synchronize(device)
        trainers[key] = (model, step)
    specs = [r for r in specs if r.key in trainers]
    env["skipped_rows"] = skipped_rows
    times: dict[str, list[float]] = {r.key: [] for r in specs}
    cpu_times: dict[str, list[float]] = {r.key: [] for r in specs}
    losses: dict[str, float] = {}
    load = []
    for rnd in range(rounds):
        # Steps interleaved across rows (A B C A B C ...), not a block of steps per
        # row, and the GEMM peak measured between them: a host whose speed drifts
        # over seconds then slows every row, and the peak, alike.
        for _ in range(steps):
            measure_gemm()
            for key in (r.key for r in specs):
                _, step = trainers[key]
                synchronize(device)
                t0, c0 = time.perf_counter(), time.process_time()
                loss = step()
                synchronize(device)
                times[key].append(time.perf_counter() - t0)
                cpu_times[key].append(time.process_time() - c0)
                losses[key] = float(loss.detach())
        load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        log(f"round {rnd + 1}/{rounds}: " + ", ".join(
            f"{r.key} {batch * seq / statistics.median(times[r.key]):.0f} tok/s" for r in specs))
    measure_gemm()

    peaks = {p: max(statistics.median(v) for v in gemm[p].values()) for p in precisions}
    peaks_cpu = ({p: max(statistics.median(v) for v in gemm_cpu[p].values()) for p in precisions}
                 if one_thread else {})
    results = []
    base_tps = None
    for r in specs:
        key, precision = r.key, r.precision
        model, _ = trainers[key]
        med = statistics.median(times[key])
        tps = batch * seq / med
        fl = flops_per_token(model, seq)
        achieved = fl["train"] * tps / 1e9
        row = {"key": key, "label": r.label, "model": r.model, "fields": dict(r.spec.fields),
               "precision": precision, "paper_code": r.paper_code, "compiled": r.compiled, "median_step_s": med, "step_s": times[key],
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
                memory.append(block_memory.measure(impl, precision, memory_seq, memory_batch, device, threads, C))

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
    return {"bench": NAME, "config": config,
            "setup": {"optimizer": "AdamW lr 3e-4 betas (0.9, 0.95) wd 0.1 (matrices), clip 1.0"},
            "environment": env, "matmul_gflops": {p: {s: v for s, v in d.items()} for p, d in gemm.items()},
            "matmul_peak_gflops": peaks, "matmul_peak_gflops_cpu_time": peaks_cpu, "rows": results,
            "block_memory": memory, "summary": summary, "goals": GOALS,
            "provenance": end_provenance(provenance)}


def render(result: dict[str, Any]) -> str:
    c, env = result["config"], result["environment"]
    # the machine from the environment; git, times, load and threads once, from the provenance
    machine = f"{env.get('device_name')} ({env.get('device')}), {env.get('logical_cpus')} logical CPUs"
    return render_markdown(result["rows"], result["matmul_peak_gflops"], result["matmul_gflops"],
                           result["block_memory"], result["summary"], env, c.batch, c.seq,
                           c.steps, c.rounds, machine + "; " + describe_provenance(result["provenance"]),
                           c.size)


def write(result: dict[str, Any], out: str | Path) -> list[Path]:
    return write_results(out, NAME, render(result), result)


def summary(result: dict[str, Any]) -> str:
    return render(result)


def render_markdown(results, peaks, gemm, memory, summary, env, batch, seq, steps, rounds, env_line,
                    size: str = "paper") -> str:
    on_cpu = env.get("device") == "cpu"  # CPU util means nothing for a GPU's host thread
    sized = "the paper's configuration" if size == "paper" else "the cpu bench preset's models (width 96, 4 layers)"
    lines = [f"# gam bench speed: training tokens/s, {sized}, batch {batch} x {seq} tokens", "",
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
