"""The runner behind the benches that train language models (``gam bench paper`` and ``ablation``).

Every model is trained with :func:`gam.train.train` on data prepared once per
dataset (one tokenizer, one token stream, the same blocks in the same order,
the same steps and seeds for every model), then evaluated at each block
position of its final weights (:mod:`gam.evaluation`). One run's record holds:

- parameters, with and without the token/position embeddings;
- average training time per epoch (optimizer steps only: no evaluation, no
  checkpointing; extrapolated from the steps run when a run is shorter than an
  epoch, and marked so) and training tokens per second;
- validation loss and perplexity at the end of training (Table 1's metric) and
  the best seen during training (Table 3's metric), and how much the last
  quarter of the steps still gained;
- the loss at each block position and its means inside and beyond the paper
  GAM's receptive field (``GAMConfig.receptive_field``).

Presets: ``paper`` (the paper's model and schedule: 5 epochs, batch 32,
first 50,000/5,000 rows; for a GPU) and ``cpu`` (a small model trained for
whole epochs of WikiText-2 with 3 seeds, sized so each command fits in 90
minutes on 2 cores: see :data:`gam.bench.common.CPU_BUDGET` and docs/loss-by-position.md; the
command prints its projected time, :mod:`gam.bench.projection`, before it starts).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from gam.bench.common import (
    CPU_BUDGET,
    CPU_VALID_TOKENS,
    bench_preset,
    environment,
    load_average,
    start_provenance,
)
from gam.bench.projection import load_calibration, project_grid
from gam.config import described
from gam.models.registry import ModelSpec

DATASETS = ("wikitext2", "tinystories")
DATASET_LABELS = {"wikitext2": "WikiText-2", "tinystories": "TinyStories"}

# Evaluations per run, evenly spaced (one at 75% of the steps, for the last-quarter
# gain; and one at the end): the curve that shows whether the validation loss has
# stopped improving.
EVALS_PER_RUN = 8


@dataclass
class TrainedConfig:
    """The settings every trained bench shares; any model or training field can be
    overridden on top, as in gam train (``--n-layer 2``, ``--lr 1e-3``, ``--eval-every 50``)."""

    device: str = described("cpu", "where to train", choices=("cpu", "cuda"))
    preset: str = described("cpu", "cpu: small model, whole epochs of WikiText-2, 3 seeds, bf16 on 2 threads, "
                                   "projected to fit 90 minutes on 2 cores (printed at the start); "
                                   "paper: the paper's model and 5-epoch schedule (GPU)", choices=("cpu", "paper"))
    seeds: int | None = described(None, "runs per model (seeds SEED .. SEED+N-1); mean ± sd "
                                        "(default: cpu preset 3, paper preset 1)")
    seed: int = described(0, "first seed")
    precision: str | None = described(None, "default: the cpu preset bf16 for every model; the paper preset fp32 "
                                            "(as the paper), with --fair one mixed precision",
                                      choices=("fp32", "bf16", "fp16"))
    max_steps: int | None = described(None, "optimizer steps per run (overrides the preset)")
    epochs: int | None = described(None, "epochs per run (without --max-steps)")
    batch_size: int | None = described(None, "sequences per step (default: the preset's)")
    valid_tokens: int | None = described(None, f"validation tokens used (default: cpu preset {CPU_VALID_TOKENS:,}; "
                                               "paper preset all 5,000 rows)")
    data_source: str = described("auto", "where the corpora come from", choices=("auto", "hub", "shipped"))
    cache_dir: str | None = described(None, "tokenizer/token cache (default $GAM_CACHE_DIR or ~/.cache/gam)")
    runs_dir: str | None = described(None, "keep checkpoints and metrics here (default: a temporary folder)")
    model_overrides: dict[str, Any] = field(default_factory=dict)  # from the free-form --field value options
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


def default_seeds(preset: str) -> int:
    return CPU_BUDGET["seeds"] if preset == "cpu" else 1


def check_datasets(datasets: Sequence[str]) -> None:
    for d in datasets:
        if d not in DATASETS and not Path(d).exists():
            raise ValueError(f"unknown dataset {d!r}; use {', '.join(DATASETS)} or a path")


def mixed_precision(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def resolve(cfg: TrainedConfig, bench: str, fair: bool = False) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """The model fields, TrainConfig fields and validation cap a bench config runs with."""
    model_fields, train_fields, valid_tokens = bench_preset(cfg.preset, bench, cfg.device)
    if cfg.precision:
        train_fields["precision"] = cfg.precision
    elif bench == "paper" and cfg.preset != "cpu":
        # the paper preset: fp32 as the paper ran it, or one mixed precision for all (--fair)
        train_fields["precision"] = mixed_precision(cfg.device) if fair else "fp32"
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

    with torch.device("meta"):  # no memory, no init work
        return count_parameters(build_model(model, **fields))


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


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in Path(str(text)).name).strip("-") or "data"


def total_steps(train_fields: dict[str, Any], steps_per_epoch: int) -> int:
    """Optimizer steps of one run: max_steps if set, else epochs x steps per epoch."""
    return train_fields.get("max_steps") or train_fields["epochs"] * max(1, steps_per_epoch)


def train_one(spec: ModelSpec, fields: dict[str, Any], run_fields: dict[str, Any], seed: int, data,
              steps_per_epoch: int, run_dir: Path, field_tokens: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Train one (model, seed) and evaluate its final weights by position; its record."""
    from gam.checkpoint import load_checkpoint
    from gam.config import GAMConfig
    from gam.evaluation import loss_by_position, split_at
    from gam.train import TrainConfig, TrainingDiverged, train

    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = TrainConfig(**{**run_fields, "seed": seed})
    diverged = None
    try:
        final = train(GAMConfig(model=spec.model, **{**fields, **spec.fields}), cfg, run_dir, data=data,
                      print_fn=lambda text: log("   " + text)).metrics
    except TrainingDiverged as err:  # a result of the comparison, not a crash of it
        diverged = str(err).split(";")[0]
        final = {"val_loss": float("nan"), "val_ppl": float("nan")}
    by_position: dict[str, Any] = {"loss_by_position": None, "loss_inside_field": float("nan"),
                                   "loss_beyond_field": float("nan")}
    if not diverged:
        model = load_checkpoint(run_dir).build_model(cfg.device)
        losses = loss_by_position(model, data.valid, fields["block_size"], cfg.eval_batch_size, cfg.device,
                                  cfg.precision)
        inside, beyond = split_at(losses, field_tokens)
        by_position = {"loss_by_position": losses, "loss_inside_field": inside,
                       "loss_beyond_field": float("nan") if beyond is None else beyond}
    return {"precision": cfg.precision, "diverged": diverged, "receptive_field": field_tokens, **by_position,
            **summarize_run(_read_metrics(run_dir), final, steps_per_epoch, cfg.batch_size, fields["block_size"])}


def measured_receptive_field(model_fields: dict[str, Any]) -> int:
    """Tokens the paper GAM with these model fields sees, measured with autograd (``gam
    receptive-field``, :func:`gam.analysis.receptive_field`) on a model of that configuration
    at its last position, and checked against ``GAMConfig.receptive_field``: the window every
    loss-by-position split of the bench uses."""
    import torch

    from gam.analysis import receptive_field
    from gam.config import GAMConfig
    from gam.models.lm import DecoderLM

    fields = {k: v for k, v in model_fields.items() if k in GAMConfig.__dataclass_fields__}
    config = GAMConfig(**{**fields, "model": "gam", "memory": "static", "variant": "full", "dropout": 0.0})
    torch.manual_seed(0)
    T = config.block_size
    first, _ = receptive_field(DecoderLM(config), T, T - 1)
    measured = T - first
    if measured != min(config.receptive_field(), T):
        raise AssertionError(f"measured receptive field {measured} != GAMConfig.receptive_field() "
                             f"{config.receptive_field()} at {fields}")
    return measured


def train_grid(datasets: Sequence[str], specs: Sequence[ModelSpec], seeds: Sequence[int],
               model_fields: dict[str, Any], train_fields: dict[str, Any], *, device: str,
               valid_tokens: int | None, data_source: str = "auto", cache_dir: str | Path | None = None,
               runs_dir: str | Path | None = None, field_tokens: int,
               log: Callable[[str], None] = print) -> tuple[list, dict, dict | None]:
    """Train every (dataset, model, seed); return (run records, per-dataset data info,
    the projected time of the grid or None).

    Every dataset is prepared first, so the projected time of the whole grid is
    printed before the first run starts. The loss of every run is split at
    ``field_tokens``, the paper GAM's receptive field measured on this
    configuration (:func:`measured_receptive_field`), whatever the model.
    """
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
    projection = None
    if device == "cpu":
        calibration = load_calibration()
        if calibration is None:
            log("no projected time: the committed speed results (gam.bench.projection) are not here")
        else:
            projection = project_grid(calibration, datasets, specs, len(seeds), model_fields, train_fields,
                                      data_info, EVALS_PER_RUN)
    if projection is not None:
        log(projection["text"])

    keep = runs_dir is not None
    root = Path(runs_dir) if keep else Path(tempfile.mkdtemp(prefix="gam-bench-"))
    runs: list[dict[str, Any]] = []
    try:
        for dataset in datasets:
            data = prepared[dataset]
            fields = {**model_fields, "vocab_size": data.vocab_size}
            steps_per_epoch = data_info[dataset]["steps_per_epoch"]
            run_fields = {**train_fields, "data": dataset, "device": device}
            run_fields.setdefault("eval_every", None)
            if run_fields["eval_every"] is None:
                run_fields["eval_every"] = max(1, total_steps(train_fields, steps_per_epoch) // EVALS_PER_RUN)
            for spec in specs:
                counts = parameter_counts(spec.model, {**fields, **spec.fields})
                for seed in seeds:
                    log(f"-- {DATASET_LABELS.get(dataset, dataset)} / {spec.label} / seed {seed}")
                    w0 = time.perf_counter()
                    outcome = train_one(spec, fields, run_fields, seed, data, steps_per_epoch,
                                        root / _slug(dataset) / spec.key / f"seed{seed}", field_tokens, log)
                    wall = time.perf_counter() - w0
                    record = {"dataset": dataset, "model": spec.key, "label": spec.label, "seed": seed,
                              "params": counts["total"], "non_embedding_params": counts["non_embedding"],
                              "precision": outcome["precision"], "wall_s": wall, **outcome}
                    runs.append(record)
                    if record["diverged"]:
                        log(f"   -> diverged: {record['diverged']} (recorded; the other runs go on); {wall:.0f} s wall")
                    else:
                        log(f"   -> val loss {record['val_loss']:.4f}, ppl {record['val_ppl']:.2f} (best "
                            f"{record['best_val_ppl']:.2f}); loss at positions 0-{field_tokens - 1} "
                            f"{record['loss_inside_field']:.4f}, {field_tokens}+ {record['loss_beyond_field']:.4f}; "
                            f"{record['tokens_per_s']:,.0f} tokens/s; {wall:.0f} s wall")
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return runs, data_info, projection


def train_models(cfg: TrainedConfig, bench: str, datasets: Sequence[str], specs: dict[str, ModelSpec],
                 *, fair: bool = False, mode: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
    """What ``gam bench paper`` and ``ablation`` share: resolve the preset, train the grid
    (:func:`train_grid`), and return the settings, the runs and how they were made."""
    provenance = start_provenance()
    model_fields, train_fields, valid_tokens = resolve(cfg, bench, fair)
    seeds = list(range(cfg.seed, cfg.seed + (cfg.seeds if cfg.seeds is not None else default_seeds(cfg.preset))))
    start = time.perf_counter()
    import torch

    if train_fields.get("threads"):
        torch.set_num_threads(train_fields["threads"])
    env = environment(cfg.device)
    field_tokens = measured_receptive_field(model_fields)
    log(f"{bench}: {', '.join(specs)} on {', '.join(datasets)}; preset {cfg.preset}{mode}, "
        f"{train_fields['precision']} on {cfg.device}, seeds {seeds}")
    runs, data_info, projection = train_grid(datasets, list(specs.values()), seeds, model_fields, train_fields,
                                             device=cfg.device, valid_tokens=valid_tokens,
                                             data_source=cfg.data_source, cache_dir=cfg.cache_dir,
                                             runs_dir=cfg.runs_dir, field_tokens=field_tokens, log=log)
    env["load_average_end"] = load_average()
    for dataset in data_info:
        uni = [r["unigram_ppl"] for r in runs if r["dataset"] == dataset and r.get("unigram_ppl")]
        data_info[dataset]["unigram_ppl"] = uni[0] if uni else None
    return {"model_fields": model_fields, "train_fields": train_fields, "valid_tokens": valid_tokens,
            "seeds": seeds, "environment": env, "wall_s": time.perf_counter() - start, "projection": projection,
            "receptive_field": field_tokens,
            "data": data_info, "runs": runs, "provenance": provenance}
