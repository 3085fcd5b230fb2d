"""Helpers shared by the ``gam bench`` benchmarks.

- :func:`environment`: what a result depends on (package versions, device
  name, threads, machine load, git revision), stored in every raw JSON;
- :func:`write_results`: one results folder: ``NAME.md`` (the table and its
  setup), ``NAME.json`` (raw rows, full config, environment), optional
  ``NAME.csv``;
- timing: :func:`time_runs` (warm-up excluded, CUDA synchronized) and
  :func:`median`;
- :func:`fit_exponent`: slope of log y against log x (the scaling exponent);
- CPU memory: peak resident memory of this process above a baseline, read
  from ``/proc/self/status`` (``VmHWM``, reset through ``/proc/self/clear_refs``).

Nothing here imports torch at module level, so ``gam --help`` stays fast.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

MIB = 1024 * 1024


# ----------------------------------------------------------------------------- environment

def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision(path: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout holding ``path`` (default: this package)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha or None, "dirty": bool(status.strip()) if sha else None}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def environment(device: str = "cpu") -> dict[str, Any]:
    """Everything a benchmark number depends on, for the raw JSON."""
    import torch

    from gam.ops.kv_memory import l2_cache_bytes
    from gam.resources import cpu_allocator_tuned

    env: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "l2_cache_bytes": l2_cache_bytes(),  # sets the kv-slot op's tile size
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in
                     ("gam", "torch", "numpy", "tokenizers", "matplotlib", "mamba-ssm", "triton")},
        "git": git_revision(),
        "argv": list(sys.argv),
        "malloc_tuned": cpu_allocator_tuned(),  # gam.resources.tune_cpu_allocator
    }
    env["load_average"] = load_average()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("MemTotal", "MemAvailable")):
                key, value = line.split(":", 1)
                env[key.lower() + "_mib"] = int(value.split()[0]) // 1024
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env["cuda"] = {"version": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "capability": f"{props.major}.{props.minor}",
                       "memory_mib": props.total_memory // MIB}
    return env


PROVENANCE_FIELDS = ("git_commit", "git_dirty", "argv", "start_utc", "end_utc", "load_average_start",
                     "load_average_end", "torch", "torch_threads")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def start_provenance() -> dict[str, Any]:
    """What a result's JSON must say of how it was made, as a run starts: git revision
    and whether the tree was dirty, the exact argv, start time and load, torch and its
    threads. :func:`end_provenance` adds the end time and load."""
    import torch

    git = git_revision()
    return {"git_commit": git["commit"] or "unknown",
            "git_dirty": git["dirty"] if git["dirty"] is not None else "unknown",
            "argv": list(sys.argv), "start_utc": utc_now(), "end_utc": None,
            "load_average_start": load_average() or "unknown", "load_average_end": None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def end_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    return {**provenance, "end_utc": utc_now(), "load_average_end": load_average() or "unknown"}


def describe_provenance(provenance: dict[str, Any]) -> str:
    """One line for a markdown report: git, when, load at start and end, torch and threads."""
    p = provenance
    commit = str(p.get("git_commit") or "unknown")
    rev = commit[:10] + (" (uncommitted changes)" if p.get("git_dirty") is True else "")
    load = [x[0] if isinstance(x, list) and x else None for x in (p.get("load_average_start"),
                                                                    p.get("load_average_end"))]
    load_text = ("load average (1 min) " + " -> ".join(f"{x:.2f}" for x in load if x is not None)
                 if any(x is not None for x in load) else "load average unknown")
    return (f"git {rev}; {p.get('start_utc')} to {p.get('end_utc')}; {load_text}; torch {p.get('torch')}, "
            f"{p.get('torch_threads')} thread(s)")


def describe_environment(env: dict[str, Any]) -> str:
    """One line for a markdown report: device, threads, load, torch, git."""
    git = env.get("git") or {}
    rev = (git.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    load = env.get("load_average")
    parts = [f"{env.get('device_name')} ({env.get('device')})"]
    if env.get("device", "cpu") == "cpu":
        parts.append(f"{env.get('logical_cpus')} logical CPUs, {env.get('torch_threads')} torch thread(s)")
        if load:
            end = env.get("load_average_end")
            parts.append(f"load average (1 min) {load[0]:.2f} at start"
                         + (f", {end[0]:.2f} at end" if end else ""))
    parts.append(f"torch {env.get('packages', {}).get('torch')}")
    parts.append(f"git {rev}")
    if env.get("timestamp_utc"):
        parts.append(env["timestamp_utc"])
    return "; ".join(parts)


# ----------------------------------------------------------------------------- results folder

def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths, tuples and non-finite floats in a form json.dumps accepts."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    Path(path).write_text(buf.getvalue())


def write_results(out: str | Path, name: str, markdown: str, raw: dict[str, Any],
                  csv_rows: Sequence[dict[str, Any]] | None = None,
                  csv_columns: Sequence[str] | None = None) -> list[Path]:
    """Write ``NAME.md``, ``NAME.json`` (and ``NAME.csv``) into ``out``; return the paths.

    ``raw`` should hold ``bench``, ``config``, ``environment``, ``provenance``
    (:func:`start_provenance`, ended here if it was not) and the rows.
    """
    if "provenance" not in raw:
        raise ValueError("a results JSON needs its provenance (gam.bench.common.start_provenance)")
    if raw["provenance"].get("end_utc") is None:
        raw = {**raw, "provenance": end_provenance(raw["provenance"])}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md", out / f"{name}.json"]
    paths[0].write_text(markdown.rstrip() + "\n")
    paths[1].write_text(json.dumps(to_jsonable(raw), indent=2, default=str) + "\n")
    if csv_rows is not None:
        paths.append(out / f"{name}.csv")
        write_csv(paths[-1], csv_rows, csv_columns)
    return paths


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """``align``: one character per column, ``l`` or ``r`` (default: first left, rest right)."""
    headers = list(headers)
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- statistics

def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def mean_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), None
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def fmt_mean_spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``"6.12"`` for one value, ``"6.12 ± 0.03"`` (mean ± sample sd) for several, ``"—"`` for none."""
    mean, sd = mean_spread(values)
    if not math.isfinite(mean):
        return "—"
    return fmt.format(mean) if sd is None else f"{fmt.format(mean)} ± {fmt.format(sd)}"


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): y ∝ x^slope. None for < 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
           if x and y and x > 0 and y > 0 and math.isfinite(y)]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


# ----------------------------------------------------------------------------- timing

def synchronize(device: Any) -> None:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_runs(fn: Callable[[], Any], device: Any, warmup: int, repeats: int,
              budget_s: float | None = None,
              after_warmup: Callable[[], Any] | None = None,
              min_time_s: float = 0.0, max_repeats: int | None = None) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` timed runs.

    Each timed run is wall-clock from before the call to after a device
    synchronize. ``min_time_s``: keep adding timed runs (up to ``max_repeats``)
    until the timed runs add up to this much, so cheap points get more runs
    and a steadier median. With ``budget_s``, timed runs stop early (after at
    least one) once the next would likely pass the budget (counted from the
    first warm-up). ``after_warmup`` runs between warm-up and timing (e.g. to
    reset peak-memory counters). Returns ``median_s``, ``times_s``, ``warmup_s``.
    """
    start = time.perf_counter()
    warm = []
    for _ in range(warmup):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        warm.append(time.perf_counter() - t0)
    if after_warmup is not None:
        after_warmup()
    times: list[float] = []
    cap = max(repeats, max_repeats or repeats)
    while len(times) < cap:
        if len(times) >= repeats and sum(times) >= min_time_s:
            break
        if times and budget_s is not None:
            spent = time.perf_counter() - start
            if spent + max(times) > budget_s:
                break
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": median(times), "times_s": times, "warmup_s": warm}


# ----------------------------------------------------------------------------- CPU memory

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size (VmHWM) since the process started or since :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource  # fallback: ru_maxrss (KiB on Linux), cannot be reset

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    peak, now = _status_kib("VmHWM"), _status_kib("VmRSS")
    return peak is not None and now is not None and peak <= now + 1024


def limit_memory(budget_bytes: int) -> bool:
    """Cap this process's address space at its current size + ``budget_bytes``,
    so an allocation past the budget fails with a MemoryError/RuntimeError
    instead of waking the kernel's OOM killer. Returns whether it was set."""
    try:
        import resource

        vm = _status_kib("VmSize")
        if vm is None:
            return False
        limit = vm * 1024 + int(budget_bytes)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        return True
    except (ImportError, OSError, ValueError):
        return False


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error from torch (CUDA or CPU allocator) or Python."""
    if isinstance(err, MemoryError):
        return True
    name = type(err).__name__
    text = str(err).lower()
    return (name == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text
            or "cannot allocate memory" in text or "failed to allocate" in text)


# ----------------------------------------------------------------------------- bench presets

# The cpu preset: whole epochs of WikiText-2, 3 seeds, bf16 on both threads of
# the 2-core budget machine, the same model in both benches. The width is the
# one whose projected time (gam.bench.projection) leaves each command room under
# 90 minutes; the calculation is written out in docs/loss-by-position.md.
CPU_BUDGET: dict[str, Any] = {
    "model": {"n_embd": 96, "n_head": 4},  # over the cpu training preset (width 192, 6 heads; 4 layers kept)
    "epochs": {"paper": 1, "ablation": 3},
    "datasets": {"paper": ("wikitext2",), "ablation": ("wikitext2",)},
    "seeds": 3,
    "threads": 2,
    "minutes": 90,
}
CPU_VALID_TOKENS = 64 * 1024


def bench_preset(preset: str, bench: str, device: str) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """(model fields, TrainConfig fields, validation token cap) of a bench preset."""
    from gam.config import preset as train_preset

    model_fields, train_fields = train_preset(preset)
    # The tokenizer is the training preset's: the paper's recipe at --preset paper (as its
    # tables were made), the round-trip byte-level BPE at --preset cpu, like every other run.
    valid_tokens = None
    if preset == "cpu":
        model_fields.update(CPU_BUDGET["model"])
        train_fields.update(max_steps=None, epochs=CPU_BUDGET["epochs"][bench], log_every=25, eval_batch_size=64)
        valid_tokens = CPU_VALID_TOKENS
        if device == "cpu":
            train_fields["threads"] = CPU_BUDGET["threads"]
    else:
        train_fields.setdefault("precision", "fp32")
    return model_fields, train_fields, valid_tokens
