"""Main-results benchmark (the paper's Table 1): GAM vs Transformer vs Mamba, trained.

Every model is trained with :func:`gam.train.train` on data prepared once per
dataset (one tokenizer, one token stream, the same blocks in the same order,
the same steps and seeds for every model), then:

- parameters, with and without the token/position embeddings;
- average training time per epoch (optimizer steps only: no evaluation, no
  checkpointing; extrapolated from the steps run when a run is shorter than an
  epoch, and marked so) and training tokens per second;
- validation loss and perplexity at the end of training (Table 1's metric) and
  the best seen during training (Table 3's metric);

with the paper's figures beside ours.

Two ways to run the baselines:

- as the paper (default): naive attention (materialized scores and mask), bare
  Mamba mixers (no norm, no residual), fp32 for everyone (the official code
  uses no AMP);
- ``--fair``: SDPA attention, Mamba in the standard pre-norm residual wiring,
  and one mixed precision for everyone (bf16 on CPU and on GPUs that support
  it, else fp16).

At the ``cpu`` preset both sets of baselines are trained side by side (the
paper's wiring and the fair one), all in bf16, so Table 1 shows both in one table.

Also per run: the validation loss at each block position
(:mod:`gam.evaluation`), summarized as the mean loss at the positions inside the
paper GAM's receptive field (``1 + n_layer * (kernel - 1)`` tokens, from the
model config) and beyond it, and drawn as one curve per model.

Every number is the mean ± sample standard deviation over seeds; the rank
column marks models whose difference is smaller than their spread (see
:func:`rank_cells`).

Presets: ``paper`` (the paper's model and schedule: 5 epochs, batch 32,
first 50,000/5,000 rows; for a GPU) and ``cpu`` (a small model trained for
whole epochs of WikiText-2 with 3 seeds, sized so each command fits in 90
minutes on 2 cores: see :data:`CPU_BUDGET` and docs/loss-by-position.md; the
command prints its projected time before it starts).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from gam.bench.common import (
    describe_environment,
    environment,
    fmt_mean_spread,
    load_average,
    markdown_table,
    mean_spread,
    start_provenance,
    write_results,
)
from gam.models import registry
from gam.models.registry import ModelSpec

NAME = "paper"
DATASETS = ("wikitext2", "tinystories")
DATASET_LABELS = {"wikitext2": "WikiText-2", "tinystories": "TinyStories"}


# ``--models`` names: registry keys (gam.models.registry), and "transformer" / "mamba" for
# the paper's Table 1 rows: the paper's wiring, or with --fair the fair baseline.
TABLE1_NAMES = ("gam", "transformer", "mamba")
MODEL_NAMES = (*TABLE1_NAMES, "transformer_naive", "mamba_paper", "transformer_sdpa", "mamba_standard",
               "gam_kv_slots")
DEFAULT_MODELS = TABLE1_NAMES
# The cpu preset (unless --fair): the paper's wiring and the fair baselines in one table.
CPU_DEFAULT_MODELS = ("gam", "transformer_naive", "mamba_paper", "transformer_sdpa", "mamba_standard")


def table1_aliases(fair: bool) -> dict[str, str]:
    return {"transformer": "transformer_sdpa" if fair else "transformer_naive",
            "mamba": "mamba_standard" if fair else "mamba_paper"}


def model_specs(models: Sequence[str], fair: bool) -> dict[str, ModelSpec]:
    """The registry's specs of ``models`` (``--models`` names), keyed by those names."""
    return {s.key: s for s in registry.select(models, table1_aliases(fair))}


def table1_row(key: str, spec: ModelSpec) -> str:
    """The paper's Table 1 row shown beside a model: the row its spec reproduces, or, for
    "transformer" / "mamba" asked for with --fair, the row the user named."""
    row = spec.paper_rows.get("Table 1") or (key if key in TABLE1_NAMES else "")
    return row.lower()


# The paper's Table 1 (T4 GPU, fp32, 5 epochs, batch 32, vocab 10k, context 256).
PAPER_TABLE1: dict[tuple[str, str], dict[str, Any]] = {
    ("wikitext2", "transformer"): {"params": "24.2 M", "epoch_s": 131.9, "val_loss": 6.8233, "val_ppl": 918.99},
    ("wikitext2", "mamba"): {"params": "20.5 M", "epoch_s": 127.1, "val_loss": 6.9251, "val_ppl": 1017.54},
    ("wikitext2", "gam"): {"params": "22.6 M", "epoch_s": 117.2, "val_loss": 6.7828, "val_ppl": 882.57},
    ("tinystories", "transformer"): {"params": "24.2 M", "epoch_s": 671.6, "val_loss": 3.1591, "val_ppl": 23.55},
    ("tinystories", "gam"): {"params": "22.6 M", "epoch_s": 601.4, "val_loss": 3.1418, "val_ppl": 23.15},
}


# ----------------------------------------------------------------------------- presets

# The cpu preset: whole epochs of WikiText-2, 3 seeds, bf16 on both threads of
# the 2-core budget machine, the same model in both benches. The width is the
# one whose projected time (projected_seconds, from the speed measurements
# below) leaves each command room under 90 minutes; the calculation is written
# out in docs/loss-by-position.md.
CPU_BUDGET: dict[str, Any] = {
    "model": {"n_embd": 96, "n_head": 4},  # over the cpu training preset (width 192, 6 heads; 4 layers kept)
    "epochs": {"paper": 1, "ablation": 3},
    "datasets": {"paper": ("wikitext2",), "ablation": ("wikitext2",)},
    "seeds": 3,
    "threads": 2,
    "minutes": 90,
}
CPU_VALID_TOKENS = 64 * 1024
# Evaluations per run, evenly spaced (one at 75% of the steps, for the last-quarter
# gain; and one at the end): the curve that shows
# whether the validation loss has stopped improving.
EVALS_PER_RUN = 8


def bench_preset(preset: str, bench: str, device: str) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """(model fields, TrainConfig fields, validation token cap) of a bench preset."""
    from gam.train import preset as train_preset

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


def default_seeds(preset: str) -> int:
    return CPU_BUDGET["seeds"] if preset == "cpu" else 1


# ----------------------------------------------------------------------------- projected time

# Training throughput measured on the budget machine (AMD EPYC, 2 cores, 2 torch
# threads): results/bench-speed-cpu, width 512, 6 layers, T 256, batch 8, fast
# path, the Transformer with SDPA, Mamba in the standard wiring (expand 3,
# d_state 16). Training FLOPs per token as gam.bench.speed.flops_per_token counts them.
SPEED_BENCH_TOKENS_PER_S = {
    "bf16": {"gam": 1989.6, "transformer": 1265.0, "mamba": 570.1},
    "fp32": {"gam": 945.2, "transformer": 763.1, "mamba": 443.4},
}
SPEED_BENCH_TRAIN_FLOPS = {"gam": 144.02e6, "transformer": 148.70e6, "mamba": 121.18e6}
SPEED_BENCH_SCAN_SIZE = 1536 * 16 * 6  # Mamba's d_inner x d_state x n_layer there
# Small matmuls run less efficiently. The cpu training preset's GAM (width 192,
# 4 layers, T 128, batch 16: 19.48 training MFLOP/token) ran, with 1 thread,
# 5,342 tokens/s in bf16 (results/ablation-cpu) and 2,851 in fp32
# (results/paper-cpu); counted as 2 threads (2x), that is the GFLOP/s a small
# model's matmul FLOPs run at (bf16: 208, where the speed bench's paper-size
# GAM reaches 286.5).
SMALL_MODEL_TOKENS_PER_S = {"bf16": 5342.0, "fp32": 2851.0}
SMALL_MODEL_TRAIN_FLOPS = 19.478e6


def matmul_gflops(precision: str) -> float:
    """GFLOP/s of a small model's matmul FLOPs on the budget machine (2 threads)."""
    return 2 * SMALL_MODEL_TOKENS_PER_S[precision] * SMALL_MODEL_TRAIN_FLOPS / 1e9


def scan_seconds_per_element(precision: str) -> float:
    """Mamba's selective scan is elementwise work, not matmuls (flops_per_token leaves it out): its
    time per token per d_inner x d_state x n_layer element, from the speed bench's Mamba row (what
    its matmul FLOPs at GAM's rate there leave over)."""
    gam_rate = SPEED_BENCH_TOKENS_PER_S[precision]["gam"] * SPEED_BENCH_TRAIN_FLOPS["gam"]
    mamba_s = 1 / SPEED_BENCH_TOKENS_PER_S[precision]["mamba"] - SPEED_BENCH_TRAIN_FLOPS["mamba"] / gam_rate
    return mamba_s / SPEED_BENCH_SCAN_SIZE


def projected_tokens_per_s(model: str, fields: dict[str, Any], precision: str, threads: int | None) -> float | None:
    """Training tokens/s on the budget machine from the measurements above (None: not measured).

    Matmul FLOPs at the GFLOP/s measured for the small cpu-preset GAM, scaled by
    the ratio of the speed bench's GFLOP/s for this model family to GAM's
    (the Transformer's attention and softmax run slower per FLOP); Mamba's
    matmuls at GAM's rate plus its selective scan per element (as
    :func:`scan_seconds_per_element` was fitted). Threads: measured with 2; 1 thread
    counts half.
    """
    from gam.bench.speed import flops_per_token
    from gam.models.lm import build_model

    measured = SPEED_BENCH_TOKENS_PER_S.get(precision)
    if measured is None or model not in measured:
        return None
    import torch

    with torch.device("meta"):
        built = build_model(model, **fields)
    flops = flops_per_token(built, fields["block_size"])["train"]
    family_rate = measured[model] * SPEED_BENCH_TRAIN_FLOPS[model] / (measured["gam"] * SPEED_BENCH_TRAIN_FLOPS["gam"])
    seconds = flops / (matmul_gflops(precision) * 1e9 * (1.0 if model == "mamba" else family_rate))
    if model == "mamba":
        cfg = built.config
        seconds += scan_seconds_per_element(precision) * cfg.expand * cfg.n_embd * cfg.d_state * cfg.n_layer
    thread_share = min(threads or 2, 2) / 2
    return thread_share / seconds


def projected_seconds(model: str, fields: dict[str, Any], precision: str, threads: int | None,
                      train_tokens: int, eval_tokens: int) -> float | None:
    """Seconds of one run: training tokens, plus evaluation tokens at a third of the cost (forward only)."""
    rate = projected_tokens_per_s(model, fields, precision, threads)
    return None if rate is None else (train_tokens + eval_tokens / 3) / rate


def mixed_precision(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


# ----------------------------------------------------------------------------- training runs

def prepare(dataset: str, model_fields: dict[str, Any], train_fields: dict[str, Any],
            source: str, cache_dir: str | Path | None, valid_tokens: int | None):
    """The dataset's tokenizer and token arrays, once for every model."""
    from gam.data import prepare_data
    from gam.train import TrainConfig

    rows = TrainConfig(**train_fields)  # the trainer's defaults: the paper's 50,000 / 5,000 rows
    data = prepare_data(dataset, block_size=model_fields["block_size"], vocab_size=model_fields["vocab_size"],
                        cache_dir=cache_dir, source=source, train_rows=rows.train_rows,
                        valid_rows=rows.valid_rows, tokenizer_kind=rows.tokenizer)
    full_valid = len(data.valid)
    if valid_tokens is not None and len(data.valid) > valid_tokens:
        data = dataclasses.replace(data, valid=data.valid[:valid_tokens])
    return data, full_valid


def parameter_counts(model: str, fields: dict[str, Any]) -> dict[str, int]:
    import torch

    from gam.models.lm import build_model, count_parameters

    try:
        with torch.device("meta"):  # no memory, no init work
            return count_parameters(build_model(model, **fields))
    except Exception:  # noqa: BLE001 - a module whose init needs real tensors
        return count_parameters(build_model(model, **fields))


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_run(records: list[dict[str, Any]], final: dict[str, Any], steps_per_epoch: int,
                  batch_size: int, block_size: int) -> dict[str, Any]:
    """Time per epoch, tokens/s and validation metrics of one run from its metrics.jsonl."""
    epochs = [r for r in records if "epoch_train_s" in r]
    evals = [r for r in records if "val_loss" in r]
    steps = max((r["step"] for r in records), default=0)
    train_s = sum(r["epoch_train_s"] for r in epochs)
    full = [r["epoch_train_s"] for r in epochs if r["step"] % steps_per_epoch == 0]
    if full:
        per_epoch, extrapolated = sum(full) / len(full), False
    else:
        # no timed epoch record (a run stopped by a nan loss has none): no time to report
        per_epoch, extrapolated = (train_s / steps * steps_per_epoch if steps and train_s else float("nan")), True
    best = min(evals, key=lambda r: r["val_loss"]) if evals else final
    # Still improving? The validation loss gained over the last quarter of the steps.
    earlier = [r for r in evals if r["step"] <= 0.75 * steps]
    last_quarter_gain = earlier[-1]["val_loss"] - final["val_loss"] if earlier else float("nan")
    return {
        "steps": steps, "tokens": steps * batch_size * block_size, "train_s": train_s,
        "steps_per_epoch": steps_per_epoch, "epochs_completed": len(full),
        "epoch_s": per_epoch, "epoch_s_extrapolated": extrapolated,
        "tokens_per_s": steps * batch_size * block_size / train_s if train_s else float("nan"),
        "val_loss": final["val_loss"], "val_ppl": final["val_ppl"],
        "best_val_loss": best["val_loss"], "best_val_ppl": best["val_ppl"], "best_step": best.get("step"),
        "last_quarter_gain": last_quarter_gain,
        "unigram_ppl": final.get("unigram_ppl"),
        "evals": [{"step": r["step"], "val_loss": r["val_loss"], "val_ppl": r["val_ppl"]} for r in evals],
        "train_loss": [[r["step"], r["loss"]] for r in records if "loss" in r],
    }


def train_grid(datasets: Sequence[str], specs: Sequence[ModelSpec], seeds: Sequence[int],
               model_fields: dict[str, Any], train_fields: dict[str, Any], *, device: str,
               valid_tokens: int | None, data_source: str = "auto", cache_dir: str | Path | None = None,
               runs_dir: str | Path | None = None,
               log: Callable[[str], None] = print) -> tuple[list, dict, dict | None]:
    """Train every (dataset, model, seed); return (run records, per-dataset data info,
    the projected time of the grid or None).

    Every dataset is prepared first, so the projected time of the whole grid is
    printed before the first run starts. After each run, the validation loss at
    each block position of its final weights is recorded (``loss_by_position``)
    with its means inside and beyond the paper GAM's receptive field.
    """
    from gam.checkpoint import load_checkpoint
    from gam.config import GAMConfig
    from gam.evaluation import loss_by_position, paper_receptive_field, split_at
    from gam.train import TrainConfig, TrainingDiverged, train

    field_tokens = paper_receptive_field(model_fields)
    prepared = {}
    data_info: dict[str, Any] = {}
    for dataset in datasets:
        t0 = time.perf_counter()
        data, full_valid = prepare(dataset, model_fields, train_fields, data_source, cache_dir, valid_tokens)
        steps_per_epoch = len(data.train) // (model_fields["block_size"] + 1) // train_fields["batch_size"]
        prepared[dataset] = data
        data_info[dataset] = {
            "source": data.source, "vocab_size": data.vocab_size, "tokenizer_hash": data.tokenizer_hash,
            "train_tokens": len(data.train), "valid_tokens_used": len(data.valid),
            "valid_tokens_available": full_valid, "steps_per_epoch": steps_per_epoch,
            "prepare_s": time.perf_counter() - t0,
        }
        log(f"{DATASET_LABELS.get(dataset, dataset)}: {data.source}; train {len(data.train):,} tokens "
            f"({steps_per_epoch} steps/epoch), validation {len(data.valid):,} of {full_valid:,} tokens, "
            f"vocab {data.vocab_size}")
    projection = project_grid(datasets, specs, len(seeds), model_fields, train_fields, data_info, device)
    if projection is not None:
        log(projection["text"])

    keep = runs_dir is not None
    root = Path(runs_dir) if keep else Path(tempfile.mkdtemp(prefix="gam-bench-"))
    runs: list[dict[str, Any]] = []
    try:
        for dataset in datasets:
            data = prepared[dataset]
            fields = {**model_fields, "vocab_size": data.vocab_size}
            block = fields["block_size"]
            steps_per_epoch = data_info[dataset]["steps_per_epoch"]
            run_fields = {**train_fields, "data": dataset, "device": device}
            run_fields.setdefault("eval_every", None)
            if run_fields["eval_every"] is None:
                run_fields["eval_every"] = max(1, total_steps(train_fields, steps_per_epoch) // EVALS_PER_RUN)
            for spec in specs:
                counts = parameter_counts(spec.model, {**fields, **spec.fields})
                for seed in seeds:
                    run_dir = root / _slug(dataset) / spec.key / f"seed{seed}"
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    model_config = GAMConfig(model=spec.model, **{**fields, **spec.fields})
                    cfg = TrainConfig(**{**run_fields, "seed": seed})
                    log(f"-- {DATASET_LABELS.get(dataset, dataset)} / {spec.label} / seed {seed}")
                    w0 = time.perf_counter()
                    diverged = None
                    try:
                        final = train(model_config, cfg, run_dir, data=data,
                                      print_fn=lambda text: log("   " + text)).metrics
                    except TrainingDiverged as err:  # a result of the comparison, not a crash of it
                        diverged = str(err).split(";")[0]
                        final = {"val_loss": float("nan"), "val_ppl": float("nan")}
                    by_position: dict[str, Any] = {"loss_by_position": None, "loss_inside_field": float("nan"),
                                                   "loss_beyond_field": float("nan")}
                    if not diverged:
                        model = load_checkpoint(run_dir).build_model(device)
                        losses = loss_by_position(model, data.valid, block, cfg.eval_batch_size, device,
                                                  cfg.precision)
                        inside, beyond = split_at(losses, field_tokens)
                        by_position = {"loss_by_position": losses, "loss_inside_field": inside,
                                       "loss_beyond_field": float("nan") if beyond is None else beyond}
                        del model
                    wall = time.perf_counter() - w0
                    record = {"dataset": dataset, "model": spec.key, "label": spec.label, "seed": seed,
                              "params": counts["total"], "non_embedding_params": counts["non_embedding"],
                              "precision": cfg.precision, "wall_s": wall, "diverged": diverged,
                              "receptive_field": field_tokens, **by_position,
                              **summarize_run(_read_metrics(run_dir), final, steps_per_epoch,
                                              cfg.batch_size, block)}
                    runs.append(record)
                    if diverged:
                        log(f"   -> diverged: {diverged} (recorded; the other runs go on); {wall:.0f} s wall")
                    else:
                        log(f"   -> val loss {record['val_loss']:.4f}, ppl {record['val_ppl']:.2f} (best "
                            f"{record['best_val_ppl']:.2f}); loss at positions 0-{field_tokens - 1} "
                            f"{record['loss_inside_field']:.4f}, {field_tokens}+ {record['loss_beyond_field']:.4f}; "
                            f"{record['tokens_per_s']:,.0f} tokens/s; {wall:.0f} s wall")
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return runs, data_info, projection


def total_steps(train_fields: dict[str, Any], steps_per_epoch: int) -> int:
    """Optimizer steps of one run: max_steps if set, else epochs x steps per epoch."""
    return train_fields.get("max_steps") or train_fields["epochs"] * max(1, steps_per_epoch)


def project_grid(datasets: Sequence[str], specs: Sequence[ModelSpec], n_seeds: int, model_fields: dict[str, Any],
                 train_fields: dict[str, Any], data_info: dict[str, Any], device: str) -> dict[str, Any] | None:
    """Projected wall time of the grid on the 2-core budget machine (CPU only), from
    :func:`projected_seconds`: training tokens, the evaluations during training,
    the final one and the loss-by-position pass."""
    if device != "cpu":
        return None
    per_model: dict[str, float] = {}
    for dataset in datasets:
        info = data_info[dataset]
        fields = {**model_fields, "vocab_size": info["vocab_size"]}
        steps = total_steps(train_fields, info["steps_per_epoch"])
        eval_every = train_fields.get("eval_every") or max(1, steps // EVALS_PER_RUN)
        evals = steps // eval_every + 2  # during training, at the end, and by position
        train_tokens = steps * train_fields["batch_size"] * fields["block_size"]
        for spec in specs:
            seconds = projected_seconds(spec.model, {**fields, **spec.fields}, train_fields["precision"],
                                        train_fields.get("threads"), train_tokens, evals * info["valid_tokens_used"])
            if seconds is None:
                return None
            per_model[spec.label] = per_model.get(spec.label, 0.0) + seconds * n_seeds
    total = sum(per_model.values())
    text = (f"projected time on the 2-core budget machine: {total / 60:.0f} min ("
            + ", ".join(f"{label} {s / 60:.0f}" for label, s in per_model.items())
            + f" min, {n_seeds} seed(s) each; from the committed speed measurements (gam.bench.paper.projected_tokens_per_s), "
              "not counting tokenizer training)")
    return {"total_s": total, "per_model_s": per_model, "text": text}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in Path(str(text)).name).strip("-") or "data"


def aggregate(runs: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Mean and sample sd over seeds of each metric in ``keys``."""
    out: dict[str, Any] = {}
    for k in keys:
        mean, sd = mean_spread([r[k] for r in runs])
        out[k] = {"mean": mean, "sd": sd, "values": [r[k] for r in runs]}
    return out


def position_summary(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean and sample sd over seeds of the loss at each block position (runs that finished)."""
    import numpy as np

    losses = [r["loss_by_position"] for r in runs if r.get("loss_by_position")]
    if not losses:
        return None
    stack = np.asarray(losses)
    return {"mean": stack.mean(axis=0).tolist(),
            "sd": stack.std(axis=0, ddof=1).tolist() if len(losses) > 1 else None, "seeds": len(losses)}


METRICS = ("epoch_s", "tokens_per_s", "val_loss", "val_ppl", "best_val_loss", "best_val_ppl", "train_s",
           "loss_inside_field", "loss_beyond_field", "last_quarter_gain")


def metric_cell(rs: list[dict[str, Any]], key: str, fmt: str) -> str:
    """Mean ± sd of ``key`` over the runs that finished, then how many diverged."""
    done = [r[key] for r in rs if not r.get("diverged")]
    text = fmt_mean_spread(done, fmt) if done else ""
    failed = len(rs) - len(done)
    if failed:
        text = (f"{text}, " if text else "") + ("diverged" if len(rs) == 1 else f"diverged ({failed}/{len(rs)})")
    return text


def diverged_lines(runs: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """One line per run stopped by a nan/inf loss (the trainer's guard), for under a table."""
    return [f"- Diverged: {labels.get(r['model'], r['model'])} on {DATASET_LABELS.get(r['dataset'], r['dataset'])}, "
            f"seed {r['seed']}: {r['diverged']}." for r in runs if r.get("diverged")]


def _epoch_cell(rs: list[dict[str, Any]]) -> str:
    done = [r for r in rs if not r.get("diverged")]  # a diverged run's time would mix in steps of nan
    text = fmt_mean_spread([r["epoch_s"] for r in done], "{:,.1f}")
    return text + ("*" if text != "—" and any(r["epoch_s_extrapolated"] for r in done) else "")


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def model_unavailable(spec: ModelSpec) -> str | None:
    """None if the model can be built here, else why not (e.g. a module that is not installed)."""
    try:
        import torch

        from gam.models.lm import build_model

        with torch.device("meta"):
            build_model(spec.model, **{"n_embd": 16, "n_head": 2, "n_layer": 1, "vocab_size": 16,
                                       "block_size": 8, "num_memory_slots": 4, "d_state": 2, "expand": 1,
                                       **spec.fields})
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def _paper_num(value: Any, fmt: str) -> str:
    return "—" if value is None else (value if isinstance(value, str) else fmt.format(value))


# ----------------------------------------------------------------------------- the benchmark

@dataclass
class PaperConfig:
    device: str = "cpu"
    preset: str = "cpu"
    fair: bool = False
    datasets: tuple[str, ...] | None = None  # default: the preset's (see with_defaults)
    models: tuple[str, ...] | None = None
    seeds: int | None = None
    seed: int = 0
    precision: str | None = None  # default: fp32 (as the paper), or the fair mixed precision
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    valid_tokens: int | None = None  # default: the preset's (cpu: 32,768; paper: the whole 5,000 rows)
    data_source: str = "auto"
    cache_dir: str | None = None
    runs_dir: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.preset not in ("paper", "cpu"):
            raise ValueError(f"preset must be paper or cpu, got {self.preset!r}")
        if self.seeds is not None and self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("precision fp16 needs CUDA (it uses a GradScaler); use bf16 on CPU")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device available")


def with_defaults(cfg: PaperConfig, bench: str) -> PaperConfig:
    """``cfg`` with the preset's datasets, models and seeds where it names none: at the
    cpu preset WikiText-2, both wirings of the baselines (unless --fair) and 3 seeds."""
    cpu = cfg.preset == "cpu"
    datasets = cfg.datasets or (CPU_BUDGET["datasets"][bench] if cpu else DATASETS)
    models = cfg.models or (CPU_DEFAULT_MODELS if cpu and not cfg.fair else DEFAULT_MODELS)
    seeds = cfg.seeds if cfg.seeds is not None else default_seeds(cfg.preset)
    return dataclasses.replace(cfg, datasets=tuple(datasets), models=tuple(models), seeds=seeds)


def resolve(cfg: PaperConfig, bench: str) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """The model fields, TrainConfig fields and validation cap a bench config runs with."""
    model_fields, train_fields, valid_tokens = bench_preset(cfg.preset, bench, cfg.device)
    if cfg.precision:
        train_fields["precision"] = cfg.precision
    elif bench == "paper" and cfg.preset != "cpu":
        # the paper preset: fp32 as the paper ran it, or one mixed precision for all (--fair)
        train_fields["precision"] = mixed_precision(cfg.device) if cfg.fair else "fp32"
    elif cfg.preset == "cpu" or train_fields.get("precision") == "bf16":
        # the cpu preset: one mixed precision for every model, both wirings
        train_fields["precision"] = mixed_precision(cfg.device)
    if cfg.max_steps is not None:
        train_fields["max_steps"] = cfg.max_steps
    if cfg.epochs is not None:
        train_fields["epochs"] = cfg.epochs
        if cfg.max_steps is None:
            train_fields["max_steps"] = None
    if cfg.batch_size is not None:
        train_fields["batch_size"] = cfg.batch_size
    if cfg.valid_tokens is not None:
        valid_tokens = cfg.valid_tokens
    train_fields["data_source"] = cfg.data_source
    model_fields.update(cfg.model_overrides)
    train_fields.update(cfg.train_overrides)
    return model_fields, train_fields, valid_tokens


def rank_cells(values: dict[str, Sequence[float]]) -> dict[str, str]:
    """Rank models by the mean of their values (lowest first), marking ties.

    Two models are told apart only when the difference of their means is at
    least the sum of their spreads (sample sd over seeds: the mean ± sd
    intervals do not overlap). A model that cannot be told apart from others
    gets their ranks after ``≈``: ``"2 (≈ 1, 3)"``. With one seed there is no
    spread, so nothing is marked (the table notes it). Models without a
    finite value (every run diverged) get ``"—"``.
    """
    stats = {k: mean_spread(v) for k, v in values.items()}
    ranked = sorted((k for k, (m, _) in stats.items() if math.isfinite(m)), key=lambda k: stats[k][0])
    rank = {k: i + 1 for i, k in enumerate(ranked)}
    cells = {k: "—" for k in values}
    for k in ranked:
        mean_k, sd_k = stats[k]
        tied = [rank[o] for o in ranked if o != k and sd_k is not None and stats[o][1] is not None
                and abs(stats[o][0] - mean_k) < sd_k + stats[o][1]]
        cells[k] = str(rank[k]) + (f" (≈ {', '.join(map(str, tied))})" if tied else "")
    return cells


def field_headers(runs: list[dict[str, Any]], fallback: int) -> tuple[str, str]:
    """Column names of the loss inside / beyond the paper GAM's receptive field, e.g. ``loss 0-12``, ``loss 13+``."""
    field_tokens = next((r["receptive_field"] for r in runs if r.get("receptive_field")), fallback)
    return f"loss 0-{field_tokens - 1}", f"loss {field_tokens}+"


def render_table1(cfg: PaperConfig, runs: list[dict[str, Any]], specs: dict[str, ModelSpec],
                  receptive_field: int = 13) -> str:
    inside, beyond = field_headers(runs, receptive_field)
    headers = ["dataset", "model", "rank", "params", "w/o emb.", "s / epoch", "tokens/s", "val loss", "val PPL",
               inside, beyond, "last ¼ gain", "paper params", "paper s / epoch", "paper val loss", "paper val PPL"]
    body = []
    for dataset in cfg.datasets:
        groups = {key: rs for key in cfg.models
                  if (rs := [r for r in runs if r["dataset"] == dataset and r["model"] == key])}
        ranks = rank_cells({key: [r["val_loss"] for r in rs if not r.get("diverged")] for key, rs in groups.items()})
        for key, rs in groups.items():
            paper = PAPER_TABLE1.get((dataset, table1_row(key, specs[key])), {})
            body.append([
                DATASET_LABELS.get(dataset, dataset), specs[key].label, ranks[key],
                fmt_params(rs[0]["params"]), fmt_params(rs[0]["non_embedding_params"]),
                _epoch_cell(rs), fmt_mean_spread([r["tokens_per_s"] for r in rs if not r.get("diverged")], "{:,.0f}"),
                metric_cell(rs, "val_loss", "{:.4f}"), metric_cell(rs, "val_ppl", "{:.2f}"),
                *position_cells(rs), metric_cell(rs, "last_quarter_gain", "{:.4f}"),
                _paper_num(paper.get("params"), "{}"), _paper_num(paper.get("epoch_s"), "{:.1f}"),
                _paper_num(paper.get("val_loss"), "{:.4f}"), _paper_num(paper.get("val_ppl"), "{:.2f}"),
            ])
        uni = unigram_ppl(runs, dataset)
        if uni:
            body.append([DATASET_LABELS.get(dataset, dataset), UNIGRAM_LABEL, "", "", "", "", "",
                         f"{math.log(uni):.4f}", f"{uni:.2f}", "", "", "", "", "", "", ""])
    return markdown_table(headers, body, "lll" + "r" * 13)


def position_cells(rs: list[dict[str, Any]]) -> list[str]:
    """Mean ± sd over seeds of the loss inside and beyond the paper GAM's receptive field."""
    return [metric_cell(rs, "loss_inside_field", "{:.4f}"), metric_cell(rs, "loss_beyond_field", "{:.4f}")]


def table_notes(runs: list[dict[str, Any]], rank_metric: str) -> list[str]:
    """What the rank, spread, loss-by-position and last-quarter columns mean (under Tables 1 and 3)."""
    field_tokens = next((r["receptive_field"] for r in runs if r.get("receptive_field")), None)
    seeds = max((len({r["seed"] for r in runs if r["model"] == m}) for m in {r["model"] for r in runs}), default=0)
    lines = [f"Every measured number is the mean ± sample standard deviation over the seeds. Rank: by {rank_metric} "
             "(1 = lowest); `≈ k`: the difference to the model ranked k is smaller than the sum of the two "
             "standard deviations, so the two are not told apart."
             + (" One seed: no spread, so the ranks are untested." if seeds == 1 else "")]
    if field_tokens:
        lines.append(f"`loss 0-{field_tokens - 1}` / `loss {field_tokens}+`: mean validation loss at the block "
                     f"positions inside / beyond the paper GAM's receptive field (1 + n_layer x (kernel - 1) = "
                     f"{field_tokens} tokens at this config): position p predicts from p + 1 tokens, so up to "
                     f"position {field_tokens - 1} every model sees all its context; from {field_tokens} on the "
                     "paper GAM sees only the last "
                     f"{field_tokens} (see `loss_by_position.png` and docs/loss-by-position.md).")
    lines.append("`last ¼ gain`: how much the validation loss fell over the last quarter of the training steps "
                 "(from the last evaluation at or before 75% of the steps to the end); near zero means the run "
                 "had nearly stopped improving.")
    return lines


# The model the lower panel of the loss-by-position plot subtracts (the paper's GAM in
# either bench), when it is among the runs.
GAP_REFERENCES = ("gam", "full")


def plot_by_position(runs: list[dict[str, Any]], specs: dict[str, ModelSpec], path: Path, title: str) -> Path:
    """Loss by position: one column per dataset, one curve per model (mean over seeds, band ± sd);
    below, each model's loss minus the paper GAM's, when the paper GAM is among the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gam.evaluation import draw_gap_to_reference, draw_loss_by_position

    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    keys = list(dict.fromkeys(r["model"] for r in runs))
    reference = next((k for k in GAP_REFERENCES if k in keys), None)
    rows = 2 if reference else 1
    fig, axes = plt.subplots(rows, max(1, len(datasets)), figsize=(7.0 * max(1, len(datasets)), 4.4 + 2.8 * (rows - 1)),
                             squeeze=False, height_ratios=[1.6, 1][:rows])
    for column, dataset in enumerate(datasets):
        ax = axes[0][column]
        curves, labels = {}, {}
        for key in keys:
            summary = position_summary([r for r in runs if r["dataset"] == dataset and r["model"] == key])
            if summary:
                n = summary["seeds"]
                labels[key] = f"{specs[key].label} ({n} seed{'s' if n > 1 else ''})"
                curves[labels[key]] = (summary["mean"], summary["sd"])
        field_tokens = next((r["receptive_field"] for r in runs if r.get("receptive_field")), None)
        banded = draw_loss_by_position(ax, curves, field_tokens)
        if reference:
            if reference in labels:
                draw_gap_to_reference(axes[1][column], curves, labels[reference], field_tokens)
            else:
                axes[1][column].set_visible(False)
        ax.set_title(f"{DATASET_LABELS.get(dataset, dataset)}: validation loss by position ({title})\n"
                     "bold: mean over positions 0, 1, 2-3, 4-7, ...; faint: each position"
                     + ("; band: mean ± sd over seeds" if banded else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replot_by_position(folders: Sequence[str | Path], path: str | Path, models: Sequence[str] | None = None) -> Path:
    """One loss-by-position plot from the runs saved in several results folders of
    ``gam bench paper`` or ``gam bench ablation`` (``paper.json`` / ``ablation.json``):
    e.g. a model benchmarked later beside the table it joins. ``models``: keys to draw,
    in this order (default: every model, first folder first). A (dataset, model, seed)
    run found in two folders is taken from the first; runs made with other model or
    training settings are refused, so the curves stay comparable."""
    runs: list[dict[str, Any]] = []
    specs: dict[str, ModelSpec] = {}
    settings = None
    title = ""
    seen = set()
    for folder in map(Path, folders):
        found = [folder / f"{name}.json" for name in ("paper", "ablation") if (folder / f"{name}.json").is_file()]
        if not found:
            raise FileNotFoundError(f"{folder}: no paper.json or ablation.json (a gam bench paper/ablation results folder)")
        data = json.loads(found[0].read_text())
        these = (data["model_fields"], {k: v for k, v in data["train_fields"].items() if k != "eval_every"},
                 data["valid_tokens"])
        if settings is None:
            settings = these
            env = data["environment"]
            title = f"{data['config']['preset']} preset, {data['train_fields']['precision']}, {env['device_name']}"
        elif these != settings:
            raise ValueError(f"{folder}: its runs used other model or training settings than {folders[0]}")
        specs.update({k: ModelSpec(**v) for k, v in data["models"].items() if k not in specs})
        for r in data["rows"]:
            key = (r["dataset"], r["model"], r["seed"])
            if key not in seen:
                seen.add(key)
                runs.append(r)
    if models is not None:
        unknown = [m for m in models if m not in specs]
        if unknown:
            raise ValueError(f"no runs of {', '.join(unknown)} in {', '.join(map(str, folders))}")
        runs = sorted((r for r in runs if r["model"] in models), key=lambda r: list(models).index(r["model"]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_by_position(runs, specs, path, title)


UNIGRAM_LABEL = "*unigram model (token frequencies)*"


def unigram_ppl(runs: list[dict[str, Any]], dataset: str | None = None) -> float | None:
    """The perplexity of a unigram model fitted on the training tokens, on the same
    validation tokens (a trained model must beat it to have learned any context)."""
    values = [r["unigram_ppl"] for r in runs if r.get("unigram_ppl") and (dataset is None or r["dataset"] == dataset)]
    return values[0] if values else None


def setup_lines(cfg: PaperConfig, model_fields: dict[str, Any], train_fields: dict[str, Any],
                valid_tokens: int | None, data_info: dict[str, Any], env: dict[str, Any], wall_s: float,
                seeds: Sequence[int], projection: dict[str, Any] | None = None) -> list[str]:
    from dataclasses import asdict

    from gam.config import GAMConfig

    steps = train_fields.get("max_steps")
    epochs = train_fields["epochs"]
    schedule = f"{steps} optimizer steps" if steps else f"{epochs} epoch{'s' if epochs != 1 else ''}"
    model_fields = {**asdict(GAMConfig()), **model_fields}  # a preset names only what it changes
    lines = [
        f"Machine: {describe_environment(env)}.", "",
        f"Preset `{cfg.preset}`: width {model_fields['n_embd']}, {model_fields['n_layer']} layers, context "
        f"{model_fields['block_size']}, vocab ≤ {model_fields['vocab_size']}, {model_fields['num_memory_slots']} "
        f"memory slots, {model_fields['n_head']} heads, Mamba expand {model_fields['expand']}, dropout "
        f"{model_fields['dropout']}; {schedule} of batch {train_fields['batch_size']}, AdamW lr "
        f"{train_fields['lr']:g} (warm-up {train_fields['warmup_steps']}, cosine), {train_fields['precision']}"
        + (f", {train_fields['threads']} CPU thread(s)" if train_fields.get("threads") else "")
        + f"; seeds {', '.join(map(str, seeds))} (mean ± sample sd over seeds). Whole command: "
        f"{wall_s / 60:.1f} min"
        + (f" (projected before the start for the 2-core budget machine: {projection['total_s'] / 60:.0f} min)"
           if projection else "") + ".", "",
    ]
    for dataset, info in data_info.items():
        lines.append(f"- {DATASET_LABELS.get(dataset, dataset)}: {info['source']}; vocab {info['vocab_size']}, "
                     f"{info['train_tokens']:,} train tokens ({info['steps_per_epoch']} steps/epoch), "
                     f"validation {info['valid_tokens_used']:,} of {info['valid_tokens_available']:,} tokens"
                     + (f"; unigram-model PPL on the same tokens {info['unigram_ppl']:.2f}"
                        if info.get("unigram_ppl") else ""))
    lines += ["",
              "Time per epoch counts optimizer steps only (data, forward, backward, clip, step; no "
              "evaluation or checkpointing). `*`: the run was shorter than an epoch, so the time per "
              "epoch is the measured time per step x steps per epoch. Tokens/s: training tokens per "
              "second of that time. Parameters count the tied embedding once; `w/o emb.` leaves out "
              "the token and position embeddings. The unigram row is a model of token frequencies alone "
              "(fitted on the training tokens, scored on the same validation tokens): a model has learned "
              "something from context only where it beats that row.", ""]
    return lines


def run(cfg: PaperConfig, out: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the grid and write paper.md/.json/.csv, curves.png and loss_by_position.png into ``out``."""
    provenance = start_provenance()
    cfg.validate()
    cfg = with_defaults(cfg, NAME)
    for d in cfg.datasets:
        if d not in DATASETS and not Path(d).exists():
            raise ValueError(f"unknown dataset {d!r}; use {', '.join(DATASETS)} or a path")
    fair_specs = model_specs(cfg.models, cfg.fair)
    skipped = {k: why for k, s in fair_specs.items() if (why := model_unavailable(s))}
    for k, why in skipped.items():
        log(f"{fair_specs[k].label}: skipped, cannot be built here ({why})")
    model_fields, train_fields, valid_tokens = resolve(cfg, NAME)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    start = time.perf_counter()
    import torch

    if train_fields.get("threads"):
        torch.set_num_threads(train_fields["threads"])
    env = environment(cfg.device)
    log(f"paper: {', '.join(cfg.models)} on {', '.join(cfg.datasets)}; preset {cfg.preset}"
        f"{' (fair baselines)' if cfg.fair else ' (baselines as the paper ran them)'}, "
        f"{train_fields['precision']} on {cfg.device}, seeds {seeds}")
    runs, data_info, projection = train_grid(cfg.datasets, [s for k, s in fair_specs.items() if k not in skipped], seeds, model_fields, train_fields,
                                 device=cfg.device, valid_tokens=valid_tokens, data_source=cfg.data_source,
                                 cache_dir=cfg.cache_dir, runs_dir=cfg.runs_dir, log=log)
    wall = time.perf_counter() - start
    env["load_average_end"] = load_average()
    for dataset in data_info:
        uni = [r["unigram_ppl"] for r in runs if r["dataset"] == dataset and r.get("unigram_ppl")]
        data_info[dataset]["unigram_ppl"] = uni[0] if uni else None
    from gam.evaluation import paper_receptive_field

    table = render_table1(cfg, runs, fair_specs, paper_receptive_field(model_fields))
    precision = train_fields["precision"]
    if cfg.fair:
        mode = f"fair baselines: SDPA attention, standard Mamba wiring, {precision} for all"
    elif {"transformer_sdpa", "mamba_standard"} & set(cfg.models):
        mode = (f"the paper's baselines (naive attention, bare Mamba) beside the fair ones (SDPA, standard "
                f"Mamba), {precision} for all")
    else:
        mode = f"baselines as the paper ran them: naive attention, bare Mamba mixers, {precision}"
    lines = [f"# Main results (Table 1): GAM vs Transformer vs Mamba, {mode}", "",
             *setup_lines(cfg, model_fields, train_fields, valid_tokens, data_info, env, wall, seeds, projection),
             table, "", *table_notes(runs, "final validation loss"), "",
             *diverged_lines(runs, {k: s.label for k, s in fair_specs.items()}),
             "Models:", *[f"- {s.label}: {s.note}" + (f" (skipped: {skipped[k]})" if k in skipped else "")
                          for k, s in fair_specs.items()], "",
             "The paper's columns are its Table 1 (T4 GPU, fp32, 5 epochs of batch 32 at width 512, 6 layers, "
             "context 256, vocab 10,000; final validation PPL; Mamba was not reported on TinyStories). "
             + ("They compare with ours only in direction: the `cpu` preset is a much smaller model trained "
                "on far fewer tokens." if cfg.preset == "cpu" else ""), ""]
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    summary = [{"dataset": d, "model": m, "label": fair_specs[m].label, "seeds": len(rs),
                "params": rs[0]["params"], "non_embedding_params": rs[0]["non_embedding_params"],
                "epoch_s_extrapolated": any(r["epoch_s_extrapolated"] for r in rs),
                **aggregate(rs, METRICS), "loss_by_position": position_summary(rs),
                "paper": PAPER_TABLE1.get((d, table1_row(m, fair_specs[m])))}
               for (d, m), rs in groups.items()]
    raw = {"bench": NAME, "config": cfg, "model_fields": model_fields, "train_fields": train_fields,
           "valid_tokens": valid_tokens, "seeds": seeds, "environment": env, "wall_s": wall, "projection": projection,
           "data": data_info, "models": fair_specs, "skipped": skipped, "summary": summary, "rows": runs,
           "paper_table1": {f"{d}/{m}": v for (d, m), v in PAPER_TABLE1.items()}, "provenance": provenance}
    csv_rows = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in runs]
    out = Path(out)
    paths = write_results(out, NAME, "\n".join(lines), raw, csv_rows)
    title = f"{cfg.preset} preset, {train_fields['precision']}, {env['device_name']}"
    paths.append(plot_curves(runs, fair_specs, out / "curves.png", title))
    paths.append(plot_by_position(runs, fair_specs, out / "loss_by_position.png", title))
    return {"markdown": "\n".join(lines), "table": table, "runs": runs, "summary": summary,
            "paths": paths, "wall_s": wall}


def plot_curves(runs: list[dict[str, Any]], specs: dict[str, ModelSpec], path: Path, title: str) -> Path:
    """Training loss (lines) and validation loss (markers) against steps, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(5.2 * max(1, len(datasets)), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, dataset in zip(axes[0], datasets):
        for i, key in enumerate(dict.fromkeys(r["model"] for r in runs)):
            for j, r in enumerate(x for x in runs if x["dataset"] == dataset and x["model"] == key):
                c = colors[i % len(colors)]
                if r["train_loss"]:
                    ax.plot(*zip(*r["train_loss"]), color=c, alpha=0.7, lw=1,
                            label=specs[key].label if j == 0 else None)
                if r["evals"]:
                    ax.plot([e["step"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], "o",
                            color=c, ms=5)
        uni = unigram_ppl(runs, dataset)
        if uni:
            ax.axhline(math.log(uni), color="grey", ls="--", lw=1, label="unigram model (validation)")
        ax.set_title(f"{DATASET_LABELS.get(dataset, dataset)} ({title})", fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (line: train, dots: validation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
