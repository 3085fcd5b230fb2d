"""How long a trained bench will take on the 2-core budget machine, from the committed measurements.

Before ``gam bench paper|ablation`` trains anything on the CPU it prints the
projected wall time of the whole grid. The projection reads two committed
results files of the machine they were measured on (2-core AMD EPYC, 2 torch
threads), not constants copied from them:

- :data:`SPEED_RESULTS` (``gam bench speed``): training tokens/s of the
  paper-size GAM (fast path), Transformer (SDPA) and Mamba (standard wiring),
  in bf16 and fp32, and their training FLOPs per token;
- :data:`SMALL_MODEL_RESULTS` (``gam bench paper --preset cpu``): the
  tokens/s the cpu preset's small GAM trained at.

How they combine (docs/loss-by-position.md, "The cpu preset's budget"):

1. A small model's matmuls run at the GFLOP/s the small GAM reached (its
   training FLOPs per token x tokens/s; in the other precision scaled by the
   speed bench's GAM rate ratio between the two).
2. Another model family's matmuls run slower by the ratio of its GFLOP/s to
   GAM's in the speed bench (attention and softmax run slower per FLOP).
3. Mamba's selective scan is elementwise work the FLOP count leaves out: its
   time per d_inner x d_state x n_layer element is what the speed bench's Mamba
   row leaves over after its matmul FLOPs at GAM's rate.

Outside a checkout (no ``results/`` beside ``src/``) there is no projection and
the bench says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gam.models.registry import ModelSpec

# The repository's results folder (src/gam/bench/projection.py -> the checkout's root).
RESULTS_DIR = Path(__file__).resolve().parents[3] / "results"
SPEED_RESULTS = "bench-speed-cpu/speed.json"
SMALL_MODEL_RESULTS = "paper-cpu/paper.json"
FAMILIES = ("gam", "transformer", "mamba")


@dataclass(frozen=True)
class Calibration:
    """The measured rates the projection scales from."""

    family_tokens_per_s: dict[str, dict[str, float]]  # precision -> family -> tokens/s (speed bench)
    family_train_flops: dict[str, float]  # family -> training FLOPs per token (speed bench)
    scan_elements: int  # the speed bench Mamba's d_inner x d_state x n_layer
    small_gflops: dict[str, float]  # precision -> GFLOP/s of the small GAM's matmuls on 2 threads
    threads: int  # threads of the measurements
    sources: tuple[str, ...]


def _speed_row(rows: list[dict[str, Any]], family: str, precision: str) -> dict[str, Any]:
    """The speed bench's eager row of a family (GAM: the fast path) in ``precision``."""
    for row in rows:
        if (row["model"] == family and row["precision"] == precision and not row["compiled"]
                and row["fields"].get("gam_impl", "fast") == "fast"):
            return row
    raise ValueError(f"no eager {family} {precision} row")


def load_calibration(results_dir: str | Path | None = None) -> Calibration | None:
    """The calibration from the committed results under ``results_dir`` (default the checkout's
    ``results/``); None where those files are absent."""
    from gam.bench.speed import flops_per_token
    from gam.config import GAMConfig

    root = Path(results_dir) if results_dir is not None else RESULTS_DIR
    speed_path, small_path = root / SPEED_RESULTS, root / SMALL_MODEL_RESULTS
    if not (speed_path.is_file() and small_path.is_file()):
        return None
    speed = json.loads(speed_path.read_text())
    precisions = sorted({row["precision"] for row in speed["rows"]})
    rates = {p: {f: _speed_row(speed["rows"], f, p)["tokens_per_s"] for f in FAMILIES} for p in precisions}
    flops = {f: _speed_row(speed["rows"], f, precisions[0])["train_flops_per_token"] for f in FAMILIES}
    mamba = GAMConfig(model="mamba", **_speed_row(speed["rows"], "mamba", precisions[0])["fields"])  # the paper size
    threads = speed["provenance"]["torch_threads"]

    small = json.loads(small_path.read_text())
    gam_row = next(s for s in small["summary"] if s["model"] == "gam")
    small_precision = small["train_fields"]["precision"]
    small_threads = small["train_fields"]["threads"]
    model = _meta_model("gam", {**small["model_fields"], **small["models"]["gam"]["fields"]})
    small_rate = gam_row["tokens_per_s"]["mean"] * flops_per_token(model, small["model_fields"]["block_size"])["train"]
    small_rate *= threads / small_threads  # as if run on the speed bench's threads
    small_gflops = {p: small_rate / 1e9 * rates[p]["gam"] / rates[small_precision]["gam"] for p in precisions}
    return Calibration(rates, flops, mamba.expand * mamba.n_embd * mamba.d_state * mamba.n_layer, small_gflops,
                       threads, (f"{root.name}/{SPEED_RESULTS}", f"{root.name}/{SMALL_MODEL_RESULTS}"))


def _meta_model(model: str, fields: dict[str, Any]):
    import torch

    from gam.models.lm import build_model

    with torch.device("meta"):  # shapes only: nothing allocated
        return build_model(model, **fields)


def scan_seconds_per_element(cal: Calibration, precision: str) -> float:
    """Mamba's selective scan time per token per d_inner x d_state x n_layer element: what the speed
    bench's Mamba row leaves over after its matmul FLOPs at GAM's rate there."""
    rates, flops = cal.family_tokens_per_s[precision], cal.family_train_flops
    mamba_s = 1 / rates["mamba"] - flops["mamba"] / (rates["gam"] * flops["gam"])
    return mamba_s / cal.scan_elements


def projected_tokens_per_s(cal: Calibration, model: str, fields: dict[str, Any], precision: str,
                           threads: int | None) -> float | None:
    """Training tokens/s of ``model`` with ``fields`` on the budget machine (None: not measured)."""
    from gam.bench.speed import flops_per_token

    rates = cal.family_tokens_per_s.get(precision)
    if rates is None or model not in rates:
        return None
    built = _meta_model(model, fields)
    flops = flops_per_token(built, fields["block_size"])["train"]
    gam_gflops = rates["gam"] * cal.family_train_flops["gam"]
    family_share = 1.0 if model == "mamba" else rates[model] * cal.family_train_flops[model] / gam_gflops
    seconds = flops / (cal.small_gflops[precision] * 1e9 * family_share)
    if model == "mamba":
        cfg = built.config
        seconds += scan_seconds_per_element(cal, precision) * cfg.expand * cfg.n_embd * cfg.d_state * cfg.n_layer
    return min(threads or cal.threads, cal.threads) / cal.threads / seconds


def total_steps(train_fields: dict[str, Any], steps_per_epoch: int) -> int:
    """Optimizer steps of one run: max_steps if set, else epochs x steps per epoch."""
    return train_fields.get("max_steps") or train_fields["epochs"] * max(1, steps_per_epoch)


def project_grid(cal: Calibration, datasets: Sequence[str], specs: Sequence[ModelSpec], n_seeds: int,
                 model_fields: dict[str, Any], train_fields: dict[str, Any],
                 data_info: dict[str, Any], evals_per_run: int) -> dict[str, Any] | None:
    """Projected wall time of a grid: training tokens, plus every evaluation (during training, the
    final one and the loss-by-position pass) at a third of the cost of training (forward only)."""
    per_model: dict[str, float] = {}
    for dataset in datasets:
        info = data_info[dataset]
        fields = {**model_fields, "vocab_size": info["vocab_size"]}
        steps = total_steps(train_fields, info["steps_per_epoch"])
        eval_every = train_fields.get("eval_every") or max(1, steps // evals_per_run)
        eval_tokens = (steps // eval_every + 2) * info["valid_tokens_used"]
        train_tokens = steps * train_fields["batch_size"] * fields["block_size"]
        for spec in specs:
            rate = projected_tokens_per_s(cal, spec.model, {**fields, **spec.fields}, train_fields["precision"],
                                          train_fields.get("threads"))
            if rate is None:
                return None
            per_model[spec.label] = per_model.get(spec.label, 0.0) + (train_tokens + eval_tokens / 3) / rate * n_seeds
    total = sum(per_model.values())
    text = (f"projected time on the 2-core budget machine: {total / 60:.0f} min ("
            + ", ".join(f"{label} {s / 60:.0f}" for label, s in per_model.items())
            + f" min, {n_seeds} seed(s) each; from {', '.join(cal.sources)} (gam.bench.projection), "
              "not counting tokenizer training)")
    return {"total_s": total, "per_model_s": per_model, "text": text}
