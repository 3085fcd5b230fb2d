"""Scaling benchmark (the paper's Table 2): one block, forward + backward, growing T.

For each model and each sequence length T: one block (no embeddings, no
head) in training mode (dropout active) gets a random (batch, T, C) input;
the work timed is ``loss = block(x).sum(); loss.backward(); zero_grad`` (no
optimizer step), as the paper's ``scale.py``. Reported: the median time of
the timed runs (warm-up runs excluded, CUDA synchronized) and the peak memory
over the timed runs.

Every (model, T) point runs in a fresh Python subprocess, so one point cannot
inherit another's allocator cache and an out-of-memory failure cannot take the
benchmark down:

- CUDA: peak memory is ``torch.cuda.max_memory_allocated`` (parameters, input,
  activations, gradients), as the paper; precision fp16 autocast + GradScaler
  with an fp16 input, as ``scale.py``.
- CPU: peak memory is the peak resident set (``VmHWM``, reset after warm-up)
  minus the resident set measured just before the block is built, so it holds
  parameters, input, activations, gradients and what the allocator keeps. The
  subprocess's address space is capped at the memory budget, so a point that
  needs more fails with an allocation error (recorded as OOM) instead of
  pushing the machine into its OOM killer.

A point that would pass the per-point time budget is recorded as over budget
(measured, or predicted from the previous length when the prediction alone is
past the budget); a model that failed at some T is not run at larger T.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from gam.bench.common import (
    MIB,
    describe_environment,
    environment,
    fit_exponent,
    load_average,
    markdown_table,
    median,
    start_provenance,
    write_results,
)
from gam.config import described
from gam.models import registry
from gam.models.registry import ModelSpec

NAME = "scaling"
HELP = "Table 2: one block's forward+backward time and peak memory vs sequence length"
DEFAULT_OUT = "results/scaling"
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


# This benchmark's names -> registry keys (gam.models.registry): "gam" is the paper's
# block code (Table 2 timed the paper's code), "mamba" mamba-ssm's standard block.
ALIASES = {"gam": "gam_reference", "mamba": "mamba_standard"}
MODEL_NAMES = ("gam", "transformer_naive", "transformer_sdpa", "mamba", "gam_fast", "gam_kv_slots")


def block_specs() -> dict[str, ModelSpec]:
    """Every block this benchmark knows, from the registry under this benchmark's names."""
    return {s.key: s for s in registry.select(MODEL_NAMES, ALIASES)}


DEFAULT_MODELS = ("gam", "transformer_naive", "transformer_sdpa", "mamba")


@dataclass
class ScalingConfig:
    """One block each of GAM, the Transformer (naive attention as the paper, and SDPA) and Mamba;
    forward+backward time (median, warm-up excluded) and peak memory for each T, every point in a
    fresh subprocess. CUDA defaults follow the paper's scale.py (batch 16, fp16 autocast, 5 warm-up
    + 20 timed runs); CPU defaults fit a shared 2-core machine in under 10 minutes (batch 1, fp32,
    1 thread, 1 warm-up + 3 timed runs, 60 s and min(6 GiB, 40% of available memory) per point).
    Writes scaling.md/.json/.csv, compute_time.png and peak_memory.png into --out."""

    device: str = described("cpu", "where to measure", choices=("cpu", "cuda"))
    models: tuple[str, ...] = described(DEFAULT_MODELS, "the blocks", choices=MODEL_NAMES)
    lengths: tuple[int, ...] = described(DEFAULT_LENGTHS, "sequence lengths T")
    batch_size: int | None = described(None, "default 16 on CUDA (paper), 1 on CPU")
    n_embd: int = described(512, "block width")
    n_head: int = described(8, "attention heads")
    dropout: float = described(0.1, "dropout in the blocks (paper: 0.1, training mode)")
    precision: str | None = described(None, "default fp16 autocast on CUDA (paper), fp32 on CPU",
                                      choices=("fp32", "bf16", "fp16"))
    warmup: int | None = described(None, "untimed runs per point (default 5 CUDA, 1 CPU)")
    repeats: int | None = described(None, "timed runs per point (default 20 CUDA, 3 CPU)")
    min_time_s: float | None = described(None, "add timed runs (up to --max-repeats) until they add up to this many "
                                               "seconds (default 3 on CPU, 0 on CUDA)", flag="--min-time")
    rounds: int | None = described(None, "measure the cheap points again in this many rounds in all "
                                         "(default 2 CPU, 1 CUDA)")
    rerun_below_s: float = 20.0  # later rounds repeat the points whose first run took less than this
    max_repeats: int | None = described(None, "default 15 on CPU")
    time_budget_s: float | None = described(None, "seconds per point (default 300 CUDA, 60 CPU)",
                                            flag="--time-budget")
    memory_budget_gib: float | None = described(None, "per point (default: all GPU memory; CPU min(6, 40% of "
                                                      "available))")
    threads: int | None = described(None, "CPU torch threads (default 1, steadiest on a shared machine)")
    seed: int = described(0, "seed of the blocks and inputs")

    def resolved(self) -> "ScalingConfig":
        cuda = self.device.startswith("cuda")
        c = ScalingConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        c.models = tuple(self.models)
        c.lengths = tuple(sorted(set(int(t) for t in self.lengths)))
        c.batch_size = self.batch_size or (16 if cuda else 1)
        c.precision = self.precision or ("fp16" if cuda else "fp32")
        c.warmup = (5 if cuda else 1) if self.warmup is None else self.warmup
        c.repeats = (20 if cuda else 3) if self.repeats is None else self.repeats
        # CPU: cheap points get more timed runs (a steadier median on a shared machine)
        c.min_time_s = (0.0 if cuda else 3.0) if self.min_time_s is None else self.min_time_s
        c.max_repeats = max(c.repeats, self.max_repeats or (c.repeats if cuda else 15))
        c.rounds = self.rounds or (1 if cuda else 2)
        c.time_budget_s = self.time_budget_s or (300.0 if cuda else 60.0)
        if self.memory_budget_gib is None and not cuda:
            import torch

            from gam.resources import available_memory

            free = available_memory(torch.device("cpu"))
            c.memory_budget_gib = round(min(6.0, 0.4 * (free / 2**30 if free else 8.0)), 2)
        c.threads = self.threads if self.threads is not None else (None if cuda else 1)
        return c

    def validate(self) -> None:
        known = block_specs()
        for m in self.models:
            if m not in known:
                raise ValueError(f"unknown model {m!r}; choose from {', '.join(known)}")
        if not self.lengths or any(int(t) < 1 for t in self.lengths):
            raise ValueError(f"lengths must be integers >= 1, got {self.lengths!r}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("precision fp16 (autocast + GradScaler) needs CUDA; use fp32 or bf16 on CPU")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        for name in ("batch_size", "repeats", "threads", "rounds"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


# ----------------------------------------------------------------------------- one point (subprocess)

def measure_point(spec: dict[str, Any], T: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Build one block, time forward+backward at length T, measure peak memory.

    Runs inside the point's own process (see :func:`run_point`).
    """
    import torch

    from gam.bench.common import is_oom, limit_memory, peak_rss_bytes, reset_peak_rss, rss_bytes, time_runs
    from gam.config import GAMConfig
    from gam.models.lm import make_block
    from gam.train import precision_dtype

    dev = torch.device(cfg["device"])
    cuda = dev.type == "cuda"
    if cfg.get("threads") and not cuda:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    precision = cfg["precision"]
    B, C = cfg["batch_size"], cfg["n_embd"]
    out: dict[str, Any] = {"model": spec["key"], "T": T, "batch_size": B, "threads": torch.get_num_threads()}
    start = time.perf_counter()
    budget = cfg["time_budget_s"]
    mem_budget = cfg.get("memory_budget_gib")
    config = GAMConfig(model=spec["model"], n_embd=C, n_head=cfg["n_head"], dropout=cfg["dropout"],
                       block_size=max(T, 1), pos_embedding="none", **spec["fields"])
    torch.ones(8, 8) @ torch.ones(8, 8)  # load the CPU kernels before the baseline
    if cuda:
        if dev.index is None:  # torch.cuda.set_device needs an index
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        if mem_budget:
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, mem_budget * 1024 ** 3 / total), dev)
        torch.cuda.empty_cache()
        baseline = 0
    else:
        baseline = rss_bytes() or 0
        if mem_budget:
            out["memory_limit_set"] = limit_memory(int(mem_budget * 1024 ** 3))
    try:
        block = make_block(config).to(dev).train()
        x_dtype = torch.float16 if (cuda and precision == "fp16") else torch.float32
        x = torch.randn(B, T, C, device=dev, dtype=x_dtype)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and precision == "fp16")
        amp_dtype = precision_dtype(precision)

        def step() -> None:
            with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = block(x).sum()
            scaler.scale(loss).backward()
            block.zero_grad(set_to_none=True)

        def after_warmup() -> None:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            else:
                out["peak_reset"] = reset_peak_rss()

        timing = time_runs(step, dev, cfg["warmup"], cfg["repeats"],
                           budget_s=budget - (time.perf_counter() - start), after_warmup=after_warmup,
                           min_time_s=cfg.get("min_time_s") or 0.0, max_repeats=cfg.get("max_repeats"))
        if cuda:
            peak = torch.cuda.max_memory_allocated(dev)
        else:
            peak = (peak_rss_bytes() or 0) - baseline
        elapsed = time.perf_counter() - start
        out.update(status="ok", median_ms=timing["median_s"] * 1e3,
                   times_ms=[t * 1e3 for t in timing["times_s"]],
                   warmup_ms=[t * 1e3 for t in timing["warmup_s"]], peak_mib=peak / MIB,
                   point_s=elapsed)
        if elapsed > budget:
            out.update(status="time", note=f"took {elapsed:.0f} s, over the {budget:.0f} s budget")
    except Exception as err:  # noqa: BLE001 - OOM is a result, anything else is reported
        # Under the address-space cap, oneDNN reports a failed scratch allocation as
        # "could not create a primitive": that is the memory budget too.
        capped = out.get("memory_limit_set") and "could not create a primitive" in str(err)
        if not (is_oom(err) or capped):
            raise
        out.update(status="oom", note=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                   + (" (under the memory budget)" if capped else ""))
    if not cuda:
        out["baseline_rss_mib"] = baseline / MIB
    return out


def _point_worker(conn, spec: dict[str, Any], T: int, cfg: dict[str, Any]) -> None:
    try:
        result = measure_point(spec, T, cfg)
    except BaseException as err:  # noqa: BLE001 - reported, never raised across the process boundary
        text = str(err).splitlines()[0][:300] if str(err) else ""
        result = {"model": spec["key"], "T": T, "status": "error", "note": f"{type(err).__name__}: {text}"}
    conn.send(result)
    conn.close()


_CONTEXT = None


def _mp_context():
    """A forkserver that has imported torch and the models once: each point is
    a fresh process (own allocator, own peak memory) without paying the torch
    import each time. Falls back to spawn where there is no forkserver."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing as mp

        try:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "gam.config", "gam.models.lm", "gam.bench.scaling"])
        except ValueError:
            ctx = mp.get_context("spawn")
        _CONTEXT = ctx
    return _CONTEXT


def run_point(spec: ModelSpec, T: int, cfg: ScalingConfig, hard_timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`measure_point` in a fresh process; a crash, a kill or a
    timeout becomes a status, never an exception."""
    point_cfg = {k: getattr(cfg, k) for k in ("device", "batch_size", "n_embd", "n_head", "dropout", "precision",
                                              "warmup", "repeats", "min_time_s", "max_repeats",
                                              "time_budget_s", "memory_budget_gib", "threads", "seed")}
    spec_d = {"key": spec.key, "model": spec.model, "fields": dict(spec.fields)}
    if hard_timeout is None:
        hard_timeout = cfg.time_budget_s + 60 + 2 * cfg.time_budget_s / max(1, cfg.repeats)
    ctx = _mp_context()
    receiver, sender = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_point_worker, args=(sender, spec_d, T, point_cfg), daemon=True)
    proc.start()
    sender.close()
    result = None
    try:
        if receiver.poll(hard_timeout):
            result = receiver.recv()
    except EOFError:  # the process died without answering
        result = None
    finally:
        receiver.close()
    proc.join(5 if result is not None else 0.5)
    if proc.is_alive():
        proc.kill()
        proc.join()
        if result is None:
            return {"model": spec.key, "T": T, "batch_size": cfg.batch_size, "status": "time",
                    "note": f"killed after {hard_timeout:.0f} s (budget {cfg.time_budget_s:.0f} s)"}
    if result is not None:
        result["process_s"] = time.perf_counter() - t0
        return result
    code = proc.exitcode
    if code is not None and code < 0 and -code == 9:
        return {"model": spec.key, "T": T, "batch_size": cfg.batch_size, "status": "oom",
                "note": "process killed (SIGKILL, likely the kernel's OOM killer)"}
    return {"model": spec.key, "T": T, "batch_size": cfg.batch_size, "status": "error",
            "note": f"process exited with code {code} without a result"}


# ----------------------------------------------------------------------------- the sweep

def _predict(previous: list[dict[str, Any]], T: int, key: str, low: float) -> float | None:
    """``key`` (median_ms or peak_mib) at T extrapolated from the last two successful
    lengths, with the local exponent clamped to [low, 2] (2 from a single point)."""
    ok = [p for p in previous if p.get("status") == "ok"]
    if not ok:
        return None
    last = ok[-1]
    exponent = 2.0
    if len(ok) >= 2:
        e = fit_exponent([ok[-2]["T"], last["T"]], [ok[-2][key], last[key]])
        exponent = min(2.0, max(low, e if e is not None else low))
    return last[key] * (T / last["T"]) ** exponent


def sweep(cfg: ScalingConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every (model, T) point, length by length: the models at one T run one after
    another, so a change in the machine's load hits them alike."""
    specs = block_specs()
    done: dict[str, list[dict[str, Any]]] = {key: [] for key in cfg.models}
    failed: dict[str, dict[str, Any] | None] = {key: None for key in cfg.models}
    for T in cfg.lengths:
        for key in cfg.models:
            spec = specs[key]
            if failed[key] is not None:
                row = {"model": key, "T": T, "batch_size": cfg.batch_size, "status": failed[key]["status"],
                       "note": f"not run: {failed[key]['status']} at T={failed[key]['T']}"}
            else:
                predicted = _predict(done[key], T, "median_ms", 1.0)
                memory = _predict(done[key], T, "peak_mib", 0.5)
                # Past the memory budget the point fails fast with a measured OOM: run it.
                # Otherwise a point predicted to pass the time budget is not run.
                over_memory = bool(cfg.memory_budget_gib and memory and memory > cfg.memory_budget_gib * 1024)
                if (not over_memory and predicted is not None
                        and (cfg.warmup + 1) * predicted / 1e3 > cfg.time_budget_s):
                    row = {"model": key, "T": T, "batch_size": cfg.batch_size, "status": "time",
                           "predicted_ms": predicted,
                           "note": f"not run: predicted {predicted / 1e3:.0f} s per run x "
                                   f"{cfg.warmup + 1} runs > {cfg.time_budget_s:.0f} s budget"}
                else:
                    # A point expected to fail on memory gets only the time budget before it is stopped.
                    row = run_point(spec, T, cfg, hard_timeout=cfg.time_budget_s if over_memory else None)
            row["label"] = spec.label
            done[key].append(row)
            if row["status"] != "ok" and failed[key] is None:
                failed[key] = row
            log(f"  {spec.label:22s} T={T:>6}: " + (
                f"{row['median_ms']:9.1f} ms, {row['peak_mib']:9.1f} MiB peak"
                + (f"  ({row['process_s']:.0f} s)" if "process_s" in row else "")
                if row["status"] == "ok" else f"{row['status'].upper()} ({row.get('note', '')})"))
    for round_ in range(2, (cfg.rounds or 1) + 1):
        # Later rounds repeat the cheap points (most exposed to a burst of load) in a fresh
        # process, in reverse order of T on even rounds, and pool their timed runs.
        lengths = list(reversed(cfg.lengths)) if round_ % 2 == 0 else list(cfg.lengths)
        for T in lengths:
            for key in cfg.models:
                row = next(r for r in done[key] if r["T"] == T)
                if row["status"] != "ok" or row.get("process_s", 0.0) > cfg.rerun_below_s:
                    continue
                again = run_point(specs[key], T, cfg)
                if again["status"] != "ok":
                    row.setdefault("later_rounds", []).append({"status": again["status"], "note": again.get("note")})
                    continue
                row.setdefault("round_medians_ms", [row["median_ms"]]).append(again["median_ms"])
                row["times_ms"] = row["times_ms"] + again["times_ms"]
                row["median_ms"] = median(row["times_ms"])
                row["peak_mib"] = max(row["peak_mib"], again["peak_mib"])
                row["rounds"] = len(row["round_medians_ms"])
                log(f"  round {round_}: {specs[key].label:22s} T={T:>6}: {again['median_ms']:9.1f} ms "
                    f"(pooled median {row['median_ms']:.1f} ms over {len(row['times_ms'])} runs)")
    return [row for key in cfg.models for row in done[key]]


def exponents(rows: list[dict[str, Any]], models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Fitted exponent of time and memory against T over each model's successful points."""
    out = {}
    for key in models:
        ok = [r for r in rows if r["model"] == key and r["status"] == "ok"]
        out[key] = {
            "time": fit_exponent([r["T"] for r in ok], [r["median_ms"] for r in ok]),
            "memory": fit_exponent([r["T"] for r in ok], [r["peak_mib"] for r in ok]),
            "points": len(ok),
            "lengths": [r["T"] for r in ok],
        }
    return out


# ----------------------------------------------------------------------------- output

# The paper's Table 2 (one block, batch 16, C 512; GPU not named, fp16 autocast in scale.py).
PAPER_TABLE2 = {
    256: (8.97, 8.90, 179.42, 216.03),
    512: (13.09, 23.86, 325.48, 552.98),
    1024: (25.86, 74.19, 617.60, 1964.79),
    2048: (51.94, 279.37, 1201.85, 7483.92),
    4096: (105.03, None, 2370.35, None),
    8192: (217.30, None, 4707.35, None),
}

_STATUS_TEXT = {"oom": "OOM", "time": "> budget", "error": "error"}


def _cell(row: dict[str, Any] | None, key: str, fmt: str) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return _STATUS_TEXT.get(row["status"], row["status"])
    return fmt.format(row[key])


def fmt_exponent(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def render_table(cfg: ScalingConfig, rows: list[dict[str, Any]], fits: dict[str, Any]) -> str:
    specs = block_specs()
    labels = [specs[m].label for m in cfg.models]
    by = {(r["model"], r["T"]): r for r in rows}
    headers = ["T"] + [f"{l} ms" for l in labels] + [f"{l} MiB" for l in labels]
    body = []
    for T in cfg.lengths:
        body.append([f"{T:,}"] + [_cell(by.get((m, T)), "median_ms", "{:,.1f}") for m in cfg.models]
                    + [_cell(by.get((m, T)), "peak_mib", "{:,.1f}") for m in cfg.models])
    body.append(["**exponent**"] + [fmt_exponent(fits[m]["time"]) for m in cfg.models]
                + [fmt_exponent(fits[m]["memory"]) for m in cfg.models])
    return markdown_table(headers, body)


def render_markdown(cfg: ScalingConfig, rows: list[dict[str, Any]], fits: dict[str, Any],
                    env: dict[str, Any], wall_s: float) -> str:
    specs = block_specs()
    mem_what = ("peak allocated (torch.cuda.max_memory_allocated)" if cfg.device.startswith("cuda")
                else "peak resident memory above the process's baseline (VmHWM)")
    precision = {"fp16": "fp16 autocast + GradScaler, fp16 input (as the paper's scale.py)",
                 "bf16": "bf16 autocast", "fp32": "fp32"}[cfg.precision]
    lines = [
        "# Scaling benchmark: one block, forward + backward (Table 2)", "",
        f"Machine: {describe_environment(env)}.", "",
        f"One block, batch {cfg.batch_size}, C {cfg.n_embd}, {cfg.n_head} heads, dropout {cfg.dropout} "
        f"(training mode), {precision}. Time: median of the timed runs of forward + `sum().backward()` + "
        f"zero_grad after {cfg.warmup} warm-up run(s): {cfg.repeats} runs"
        + (f", more (up to {cfg.max_repeats}) until they add up to {cfg.min_time_s:g} s"
           if cfg.max_repeats > cfg.repeats and cfg.min_time_s else "") + f". Memory: {mem_what}. Each point "
        f"in a fresh subprocess; per-point budget {cfg.time_budget_s:.0f} s"
        + (f" and {cfg.memory_budget_gib:g} GiB" if cfg.memory_budget_gib else "") + ". "
        + (f"Points whose first run took under {cfg.rerun_below_s:g} s were measured again in {cfg.rounds - 1} "
           "more round(s) (fresh processes, reverse order of T), and their median pools all rounds' timed "
           "runs. " if cfg.rounds > 1 else "")
        + f"Lengths run one at a time, all models at each T. "
        f"Whole run: {wall_s / 60:.1f} min.", "",
        render_table(cfg, rows, fits), "",
        "The exponent row is the least-squares slope of log(time) and log(memory) against log(T) over a "
        "model's measured points: 1 is linear, 2 quadratic.",
        "OOM: the allocation failed (memory budget or device memory); > budget: the point would pass the "
        "time budget; n/a: the block cannot be built here.", "",
    ]
    notes = [f"- {specs[m].label}: {specs[m].note}" for m in cfg.models if specs[m].note]
    errors = {r["model"]: r["note"] for r in rows if r["status"] == "error"}
    notes += [f"- {specs[m].label}: {why}" for m, why in errors.items()]
    lines += ["Blocks:", *notes, ""]
    paper_rows = [[f"{T:,}"] + [("Failed (OOM)" if v is None else f"{v:,.2f}") for v in PAPER_TABLE2[T]]
                  for T in cfg.lengths if T in PAPER_TABLE2]
    if paper_rows:
        lines += ["The paper's Table 2 (GPU not named; the paper trained on a T4; batch 16, C 512, fp16 "
                  "autocast, mean of 20 runs):", "",
                  markdown_table(["T", "GAM ms", "Transformer ms", "GAM MB", "Transformer MB"], paper_rows),
                  "", "Paper exponents over 256–8192 (GAM) and 256–2048 (Transformer): time "
                  f"{fit_exponent(list(PAPER_TABLE2), [v[0] for v in PAPER_TABLE2.values()]):.2f} / "
                  f"{fit_exponent([256, 512, 1024, 2048], [PAPER_TABLE2[t][1] for t in (256, 512, 1024, 2048)]):.2f}, "
                  f"memory {fit_exponent(list(PAPER_TABLE2), [v[2] for v in PAPER_TABLE2.values()]):.2f} / "
                  f"{fit_exponent([256, 512, 1024, 2048], [PAPER_TABLE2[t][3] for t in (256, 512, 1024, 2048)]):.2f}.",
                  ""]
    return "\n".join(lines)


def plot(cfg: ScalingConfig, rows: list[dict[str, Any]], fits: dict[str, Any], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = block_specs()
    paths = []
    for key, fname, ylabel, what in (("median_ms", "compute_time.png", "forward + backward time (ms)", "time"),
                                     ("peak_mib", "peak_memory.png", "peak memory (MiB)", "memory")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m in cfg.models:
            pts = [(r["T"], r[key]) for r in rows if r["model"] == m and r["status"] == "ok"]
            fails = [r for r in rows if r["model"] == m and r["status"] in ("oom", "time")]
            label = specs[m].label
            if fits[m][what] is not None:
                label += f" (exponent {fits[m][what]:.2f})"
            if fails:
                label += f"; {_STATUS_TEXT[fails[0]['status']]} from T={fails[0]['T']:,}"
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        paths.append(out / fname)
    return paths


CSV_COLUMNS = ("model", "label", "T", "batch_size", "status", "median_ms", "peak_mib", "times_ms", "note")


Config = ScalingConfig


def run(config: ScalingConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep; the result :func:`write` turns into the results folder."""
    provenance = start_provenance()
    config.validate()
    cfg = config.resolved()
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device available")
    start = time.perf_counter()
    log(f"scaling: {', '.join(cfg.models)} at T = {', '.join(map(str, cfg.lengths))}; batch {cfg.batch_size}, "
        f"{cfg.precision} on {cfg.device}" + (f", {cfg.threads} thread(s)" if cfg.threads else ""))
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # what environment() records; the points set their own
    env = environment(cfg.device)
    rows = sweep(cfg, log)
    wall = time.perf_counter() - start
    env["load_average_end"] = load_average()
    fits = exponents(rows, cfg.models)
    return {"bench": NAME, "config": cfg, "environment": env, "wall_s": wall, "rows": rows, "exponents": fits,
            "blocks": {m: block_specs()[m] for m in cfg.models}, "provenance": provenance,
            "markdown": render_markdown(cfg, rows, fits, env, wall), "table": render_table(cfg, rows, fits)}


def write(result: dict[str, Any], out: str | Path) -> list[Path]:
    cfg, rows, fits, env = result["config"], result["rows"], result["exponents"], result["environment"]
    csv_rows = [{**r, "times_ms": " ".join(f"{t:.2f}" for t in r["times_ms"]) if r.get("times_ms") else ""}
                for r in rows]
    raw = {"bench": NAME, "config": cfg, "environment": env, "wall_s": result["wall_s"], "rows": rows,
           "exponents": fits, "blocks": result["blocks"], "paper_table2": PAPER_TABLE2,
           "provenance": result["provenance"]}
    out = Path(out)
    paths = write_results(out, NAME, result["markdown"], raw, csv_rows, CSV_COLUMNS)
    title = (f"one block, batch {cfg.batch_size}, C {cfg.n_embd}, {cfg.precision}, {env['device_name']}"
             + (f", {cfg.threads} thread(s)" if cfg.threads and not cfg.device.startswith("cuda") else ""))
    return paths + plot(cfg, rows, fits, out, title)


def summary(result: dict[str, Any]) -> str:
    specs = block_specs()
    return "\n".join(["", result["table"], "fitted exponents (time, memory): " + "; ".join(
        f"{specs[m].label} {fmt_exponent(f['time'])}, {fmt_exponent(f['memory'])}"
        for m, f in result["exponents"].items()), f"measured in {result['wall_s'] / 60:.1f} min"])
