"""Decode benchmark: per-token latency while generating at growing context lengths.

For each model (GAM, Transformer with a KV cache, Mamba; same width and depth)
and each context length L, a random prompt of L tokens is prefilled into the
model's inference cache, then single-token decode steps are timed. All models
use ``pos_embedding="none"`` so contexts beyond the paper's block_size of 256
are possible (with learned positions generation would slide a 256-token
window instead). After every prompt is prefilled, steps are timed in sweeps
that visit every (model, context) pair once, in a fresh random order each
time, so a slow-down of the machine hits all pairs alike. A visit is a run of
``run_length`` consecutive steps, as a user generating text sees them: the
first step of a visit follows another model (the CPU's caches hold that
model's data) and is reported apart (``after a switch``); the figure reported
is the median of the others.

A GAM layer's state is its last k-1 normalized inputs, so its per-token cost
does not depend on L; a Transformer step reads a KV cache that grows with L.

**The floor.** At batch 1 a decode step is bound by memory traffic: it reads
every weight once (the tied embedding once, as the output head) and the
decoding state (a recurrent state is also written back). The same run
measures the bandwidth its threads reach streaming a large buffer
(:func:`stream_read_gbs`, ``torch.sum`` over 400 MB) and reports each row's
bytes per token, the time those bytes take at that bandwidth (the floor) and
the measured time over it; and a second floor, for weights that stay in the
CPU's caches between steps: the same bytes streamed from a buffer of their size
read again and again (:func:`add_cached_floor`). ``precisions`` adds rows with bf16 weights and
state: half the bytes, so half the floor. ``modes`` adds rows whose steps run through
one ``torch.compile``'d graph for the whole model (:func:`gam.generation.compiled_step`:
every product with a weight one streaming loop over it, or, on a CPU with AMX, the
weights frozen into the graph with tuned matmuls), for the models with a
constant-size state (the Transformer's KV cache grows each step, which would recompile).
"""

from __future__ import annotations

import gc
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from gam.bench.common import end_provenance, environment, start_provenance, synchronize, write_results
from gam.config import check_threads, described
from gam.models import registry

DEFAULT_CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
# This benchmark's names -> registry keys (gam.models.registry)
ALIASES = {"gam": "gam", "transformer": "transformer_sdpa", "mamba": "mamba_standard", "kv_slots": "gam_kv_slots"}
MODELS = tuple(ALIASES)
DEFAULT_MODELS = ("gam", "transformer", "mamba")
LABELS = {"gam": "GAM", "transformer": "Transformer (KV cache)", "mamba": "Mamba", "kv_slots": "GAM (kv-slot memory)"}
PRECISIONS = ("fp32", "bf16")
MODES = ("eager", "compiled")
COMPILABLE = ("gam", "kv_slots", "mamba")  # constant-size state: one graph serves every step
STREAM_BYTES = 400 * 2**20  # far past any cache: the bandwidth of memory, not of L3


def stream_read_gbs(device, nbytes: int = STREAM_BYTES, repeats: int = 7) -> float:
    """GB/s reading an fp32 buffer of ``nbytes`` (400 MB: far past the caches) with ``torch.sum``
    (median of ``repeats`` after one warm-up), with the threads torch has now: the bandwidth a
    decode step can reach."""
    import torch

    x = torch.ones(max(nbytes // 4, 1), device=device)
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads: every parameter once (``parameters()``
    yields a tied embedding once: it is read whole as the output head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class _Runner:
    """One model with a prefilled cache per context length, stepped one token at a time."""

    def __init__(self, name: str, contexts: Sequence[int], *, n_embd: int, n_layer: int, vocab_size: int,
                 batch_size: int, total_steps: int, device, precision: str = "fp32", mode: str = "eager",
                 seed: int = 0):
        import torch

        from gam.generation import sample_next
        from gam.train import precision_dtype

        torch.manual_seed(seed)
        spec = registry.select([name], ALIASES)[0]
        sizing = {"n_head": max(h for h in (8, 4, 2, 1) if n_embd % h == 0)} if spec.model == "transformer" else {}
        shape = dict(n_embd=n_embd, n_layer=n_layer, vocab_size=vocab_size, dropout=0.0, pos_embedding="none")
        self.model = spec.build(shape, sizing).to(device, precision_dtype(precision) or torch.float32).eval()
        self.name, self.precision, self.device, self.batch_size, self.mode = name, precision, device, batch_size, mode
        self.greedy = sample_next  # as generate picks (imported here: this module loads without torch)
        self.recurrent = spec.model != "transformer"  # its whole state is written back every step
        self.caches, self.tokens, self.prefill_s = {}, {}, {}
        with torch.no_grad():
            for L in contexts:
                prompt = torch.randint(0, vocab_size, (batch_size, L), device=device)
                cache = self.model.allocate_inference_cache(batch_size, L + total_steps + 2, device=device,
                                                            compiled=mode == "compiled")
                synchronize(device)
                start = time.perf_counter()
                logits = self.model.forward_cached(prompt, cache, last_only=True)
                synchronize(device)
                self.prefill_s[L] = time.perf_counter() - start
                self.caches[L], self.tokens[L] = cache, self.greedy(logits[:, -1], temperature=0)[:, None]
        # the first step compiles (compiled mode); it stays out of the timed steps
        self.first_step_s = max(self.step(L) for L in contexts)

    def step(self, L: int) -> float:
        """Decode one token at context L (greedy); return its wall time."""
        import torch

        with torch.no_grad():
            synchronize(self.device)
            start = time.perf_counter()
            logits = self.model.forward_cached(self.tokens[L], self.caches[L], last_only=True)
            self.tokens[L] = self.greedy(logits[:, -1], temperature=0)[:, None]  # as generate picks
            synchronize(self.device)
            return time.perf_counter() - start


def time_steps(runners: Sequence[_Runner], contexts: Sequence[int], steps: int, warmup: int,
               seed: int = 0, run_length: int = 8) -> list[dict[str, Any]]:
    """Median step times. Each sweep visits every (model, context) pair once, in a fresh
    random order: whatever else the machine does at a given moment, and whichever model ran
    just before, hits all pairs alike. A visit runs ``run_length`` consecutive steps; the
    first (after another pair's) is kept apart from the ``steps`` timed ones."""
    pairs = [(r, L) for r in runners for L in contexts]
    for r, L in pairs:
        for _ in range(warmup):
            r.step(L)
    times: dict[tuple[_Runner, int], list[float]] = {(r, L): [] for r, L in pairs}
    switch: dict[tuple[_Runner, int], list[float]] = {(r, L): [] for r, L in pairs}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no GC pauses inside timed steps
    try:
        rng = random.Random(seed)
        for _ in range(visits(steps, run_length)):
            order = pairs[:]
            rng.shuffle(order)
            for r, L in order:
                switch[(r, L)].append(r.step(L))
                if run_length == 1:  # every step follows another pair's
                    times[(r, L)].append(switch[(r, L)][-1])
                for _ in range(run_length - 1):
                    times[(r, L)].append(r.step(L))
    finally:
        if gc_was_enabled:
            gc.enable()
    rows = []
    for r, L in pairs:
        t = sorted(times[(r, L)])
        median = statistics.median(t)
        state = r.caches[L].nbytes()
        weights = weight_bytes(r.model)
        if r.recurrent:  # read and written back whole
            state_traffic = 2 * state
        else:  # the keys and values of the L tokens in the cache (its buffers are preallocated longer)
            cfg, size = r.model.config, next(r.model.parameters()).element_size()
            state_traffic = 2 * cfg.n_layer * r.batch_size * L * cfg.n_embd * size
        rows.append({
            "model": r.name, "precision": r.precision, "context": L, "batch_size": r.batch_size,
            "ms_per_token": median * 1e3,
            "p10_ms": t[len(t) // 10] * 1e3, "p90_ms": t[(9 * len(t)) // 10] * 1e3,
            "after_switch_ms": statistics.median(switch[(r, L)]) * 1e3,
            "tokens_per_s": r.batch_size / median,
            "state_bytes": state,
            "weight_bytes": weights,
            "bytes_per_token": weights + state_traffic,
            "mode": r.mode,
            "prefill_s": r.prefill_s[L],
            "first_step_s": r.first_step_s,
            "timed_steps": len(t),
        })
    return rows


def visits(steps: int, run_length: int) -> int:
    """Visits per (model, context) pair that give at least ``steps`` timed steps."""
    return -(-steps // max(run_length - 1, 1))


def add_floor(rows: list[dict[str, Any]], gbs: float) -> None:
    """Each row's floor (its bytes at the measured bandwidth) and its time over the floor."""
    for r in rows:
        r["floor_ms"] = r["bytes_per_token"] / (gbs * 1e9) * 1e3
        r["over_floor"] = r["ms_per_token"] / r["floor_ms"]


def add_cached_floor(rows: list[dict[str, Any]], device) -> None:
    """Each row's floor where its bytes stay in the CPU's caches between steps: the same bytes
    streamed from a buffer of their size, read again and again (``cached_gbs``, measured once per
    size; the best of three medians: near the cache's capacity one reading varies, 13-17 GB/s
    for 55 MiB on the Intel Xeon host). A model whose weights fit the last-level cache can step
    faster than the floor from memory (that host's L3 held a 43 MiB model but not an 86 MiB one)."""
    gbs_of: dict[int, float] = {}
    for r in rows:
        size = r["bytes_per_token"]
        if size not in gbs_of:
            gbs_of[size] = max(stream_read_gbs(device, size) for _ in range(3))
        r["cached_gbs"] = gbs_of[size]
        r["cached_floor_ms"] = size / (gbs_of[size] * 1e9) * 1e3
        r["over_cached_floor"] = r["ms_per_token"] / r["cached_floor_ms"]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | weights | steps | context | ms / token (median) | p10–p90 ms | tokens/s | decode state | "
             "bytes / token | floor ms | x floor | x cached floor | after a switch ms | prefill s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cached = f"{r['over_cached_floor']:.2f}" if "over_cached_floor" in r else "—"
        lines.append(f"| {LABELS.get(r['model'], r['model'])} | {r['precision']} | {r['mode']} | {r['context']:,} | "
                     f"{r['ms_per_token']:.2f} | {r['p10_ms']:.2f}–{r['p90_ms']:.2f} | {r['tokens_per_s']:,.1f} | "
                     f"{_size(r['state_bytes'])} | {_size(r['bytes_per_token'])} | {r['floor_ms']:.2f} | "
                     f"{r['over_floor']:.2f} | {cached} | {r['after_switch_ms']:.2f} | {r['prefill_s']:.2f} |")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """GAM's per-token time at the longest vs the shortest context, and vs the Transformer
    (the first precision's and mode's rows); each compiled row's speed-up over its eager row."""
    first, mode = rows[0]["precision"], rows[0]["mode"]
    by = {(r["model"], r["context"]): r["ms_per_token"] for r in rows
          if r["precision"] == first and r["mode"] == mode}
    contexts = sorted({r["context"] for r in rows})
    lo, hi = contexts[0], contexts[-1]
    out: dict[str, Any] = {"shortest_context": lo, "longest_context": hi}
    if ("gam", lo) in by and ("gam", hi) in by:
        out["gam_longest_over_shortest"] = by[("gam", hi)] / by[("gam", lo)]
    if ("gam", hi) in by and ("transformer", hi) in by:
        out["transformer_over_gam_at_longest"] = by[("transformer", hi)] / by[("gam", hi)]
    if ("gam", hi) in by and ("mamba", hi) in by:
        out["mamba_over_gam_at_longest"] = by[("mamba", hi)] / by[("gam", hi)]
    eager = {(r["model"], r["precision"], r["context"]): r["ms_per_token"] for r in rows if r["mode"] == "eager"}
    speedups = {f"{r['model']} {r['precision']}": eager[(r["model"], r["precision"], hi)] / r["ms_per_token"]
                for r in rows if r["mode"] == "compiled" and r["context"] == hi
                and (r["model"], r["precision"], hi) in eager}
    if speedups:
        out["compiled_over_eager_at_longest"] = speedups
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in MODELS:
        for precision, style in zip(PRECISIONS, ("-", "--")):
            for mode, marker in zip(MODES, ("o", "s")):
                pts = [(r["context"], r["ms_per_token"]) for r in rows
                       if r["model"] == name and r["precision"] == precision and r["mode"] == mode]
                if pts:
                    ax.plot(*zip(*pts), style, marker=marker, label=f"{LABELS[name]}, {precision}, {mode}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens already in the cache)")
    ax.set_ylabel("ms per generated token (median)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NAME = "decode"
HELP = "per-token decode latency vs context length: GAM, Transformer (KV cache), Mamba"
DEFAULT_OUT = "results/bench-decode"


@dataclass
class DecodeConfig:
    """Per-token latency and tokens/s while generating with 256 ... 8192 tokens of context
    already in the cache, for GAM, the Transformer (KV cache) and Mamba at the same width and
    depth. All use pos_embedding='none' so contexts past block_size work. Writes decode.md,
    decode.json and decode.png."""

    device: str = described("cpu", "where to decode", choices=("cpu", "cuda"))
    contexts: tuple[int, ...] = described(DEFAULT_CONTEXTS, "context lengths already in the cache")
    models: tuple[str, ...] = described(DEFAULT_MODELS, "models to decode with", choices=MODELS)
    precisions: tuple[str, ...] = described(("fp32",), "weights and state in these precisions, a row each",
                                            choices=PRECISIONS)
    modes: tuple[str, ...] = described(("eager",), "steps run eagerly or through one torch.compile'd graph "
                                       f"(models {', '.join(COMPILABLE)}), a row each", choices=MODES)
    n_embd: int = described(512, "width (paper: 512)")
    n_layer: int = described(6, "depth (paper: 6)")
    vocab_size: int = described(10000, "vocabulary size")
    batch_size: int = described(1, "sequences decoded together")
    steps: int = described(128, "timed decode steps per model and context (median reported)")
    warmup: int = described(4, "untimed steps per context first")
    run_length: int = described(8, "consecutive steps of one model and context per visit; the first of each "
                                "(after another model's) is reported apart, the others timed (1: every step "
                                "after another model's)")
    threads: int | None = described(None, "torch CPU threads (1 is steadiest on a busy machine)")
    seed: int = described(0, "seed of the weights, prompts and visiting order")

    def validate(self) -> None:
        for label in ("steps", "batch_size", "n_embd", "n_layer", "vocab_size", "run_length"):
            if getattr(self, label) < 1:
                raise ValueError(f"{label} must be >= 1, got {getattr(self, label)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        check_threads(self.threads)
        if not self.modes or not self.precisions or not self.models:
            raise ValueError("models, precisions and modes each need at least one value")
        if not self.contexts or any(v < 1 for v in self.contexts):
            raise ValueError(f"contexts must be integers >= 1, got {self.contexts}")


Config = DecodeConfig


def run(config: DecodeConfig, log=print) -> dict[str, Any]:
    """Time decoding for every model and context of ``config``; restores torch's thread count."""
    import torch

    config.validate()
    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, log, dev)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: DecodeConfig, log, dev) -> dict[str, Any]:
    import torch

    provenance = start_provenance()
    wall_start = time.perf_counter()
    contexts = sorted(set(config.contexts))
    skipped: dict[str, str] = {}
    runners = []
    for name in config.models:
        for precision in config.precisions:
            for mode in config.modes:
                what = f"{LABELS[name]}, {precision}, {mode}"
                if mode == "compiled" and name not in COMPILABLE:
                    skipped[what] = "its state grows every step (a compiled step would recompile)"
                    continue
                try:
                    log(f"{what}: prefilling {', '.join(map(str, contexts))} tokens ...")
                    runners.append(_Runner(name, contexts, n_embd=config.n_embd, n_layer=config.n_layer,
                                           vocab_size=config.vocab_size, batch_size=config.batch_size,
                                           total_steps=config.warmup + config.run_length
                                           * visits(config.steps, config.run_length), device=dev,
                                           precision=precision, mode=mode, seed=config.seed))
                except ImportError as err:  # e.g. a missing optional kernel
                    skipped[what] = str(err)
                    log(f"{what}: skipped ({err})")
                except Exception as err:  # noqa: BLE001 - Inductor needs a C++ compiler (CPU) or Triton (CUDA)
                    if mode != "compiled":
                        raise
                    skipped[what] = f"torch.compile failed: {str(err).strip().splitlines()[0][:200]}"
                    log(f"{what}: skipped ({skipped[what]})")
    gbs = stream_read_gbs(dev)
    log(f"streaming read: {gbs:.1f} GB/s; timing {config.steps} decode steps per model and context, interleaved ...")
    rows = time_steps(runners, contexts, config.steps, config.warmup, config.seed, config.run_length)
    gbs_after = stream_read_gbs(dev)
    add_floor(rows, max(gbs, gbs_after))
    add_cached_floor(rows, dev)
    title = (f"decode on {config.device} ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads): width {config.n_embd}, {config.n_layer} layers, "
             f"batch {config.batch_size}")
    return {
        "bench": NAME, "config": config, "title": title,
        "settings": {"pos_embedding": "none"},
        "stream_read_gbs": {"before": gbs, "after": gbs_after, "used": max(gbs, gbs_after),
                            "how": f"torch.sum over {STREAM_BYTES // 2**20} MB of fp32, median of 7"},
        "results": rows, "summary": summarize(rows) if rows else {}, "skipped": skipped,
        "wall_s": time.perf_counter() - wall_start, "table": markdown_table(rows),
        "environment": environment(config.device), "provenance": end_provenance(provenance),
    }


def render(result: dict[str, Any]) -> str:
    notes = ["# Decode benchmark", "", result["title"] + ".", "",
             "All models use pos_embedding='none' (no block_size limit); per-token time is the median "
             "of single-token decode steps after warm-up, with the context already in the cache, taken in "
             f"runs of {result['config'].run_length} consecutive steps of one model and context (as generation "
             "runs); `after a switch`: the median first step of a run, which follows another model's steps "
             "(its weights and state not in the CPU's caches).", "",
             f"Floor: bytes per token (the weights once, the decoding state read, a recurrent state also "
             f"written) at the streaming-read bandwidth measured in this run with the same threads, "
             f"{result['stream_read_gbs']['used']:.1f} GB/s ({result['stream_read_gbs']['how']}; "
             f"{result['stream_read_gbs']['before']:.1f} before the timed steps, "
             f"{result['stream_read_gbs']['after']:.1f} after; the higher is used). `x floor`: the measured "
             "time over it. `x cached floor`: over the time to stream the same bytes from a buffer of their "
             "size read again and again (where the weights stay in the CPU's caches between steps, a step "
             "can beat the floor from memory).", "",
             result["table"], ""]
    notes += summary_lines(result)
    for what, why in result["skipped"].items():
        notes.append(f"{what} skipped: {why}")
    return "\n".join(notes) + "\n"


def summary_lines(result: dict[str, Any]) -> list[str]:
    s, lines = result["summary"], []
    if "gam_longest_over_shortest" in s:
        lines.append(f"GAM per-token time at {s['longest_context']:,} tokens / at "
                     f"{s['shortest_context']:,}: {s['gam_longest_over_shortest']:.3f}")
    if "transformer_over_gam_at_longest" in s:
        lines.append(f"Transformer / GAM per-token time at {s['longest_context']:,} tokens: "
                     f"{s['transformer_over_gam_at_longest']:.2f}x")
    for what, ratio in s.get("compiled_over_eager_at_longest", {}).items():
        lines.append(f"{what}: compiled step {ratio:.2f}x faster than eager at {s['longest_context']:,} tokens")
    return lines


def summary(result: dict[str, Any]) -> str:
    return "\n".join([result["table"], *summary_lines(result)])


def write(result: dict[str, Any], out: str | Path) -> list[Path]:
    raw = {**result, "config": asdict(result["config"])}
    paths = write_results(out, NAME, render(result), raw)
    if result["results"]:
        plot(result["results"], Path(out) / "decode.png", result["title"])
        paths.append(Path(out) / "decode.png")
    return paths
