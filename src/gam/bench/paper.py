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

Presets: ``paper`` (the paper's model and schedule: 5 epochs, batch 32,
first 50,000/5,000 rows; for a GPU) and ``cpu`` (the project's small CPU model,
a fixed small number of steps and a capped validation set, so the whole
command fits in 30 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
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
    ModelSpec, describe_environment, environment, fmt_mean_spread, load_average, markdown_table, mean_spread, parse_name_list,
    write_results,
)

NAME = "paper"
DATASETS = ("wikitext2", "tinystories")
DATASET_LABELS = {"wikitext2": "WikiText-2", "tinystories": "TinyStories"}


def _table1_specs(fair: bool) -> dict[str, ModelSpec]:
    return {
        "gam": ModelSpec("gam", "GAM", "gam", {}, "the paper's model"),
        "transformer": ModelSpec(
            "transformer", "Transformer (SDPA)" if fair else "Transformer (naive attn.)", "transformer",
            {"attn_impl": "sdpa" if fair else "naive"},
            "F.scaled_dot_product_attention" if fair else "materialized scores + mask, as the paper's code"),
        "mamba": ModelSpec(
            "mamba", "Mamba (standard)" if fair else "Mamba (paper wiring)", "mamba",
            {"mamba_wiring": "standard" if fair else "paper"},
            "pre-norm residual blocks, as mamba-ssm's LM" if fair
            else "bare mixers, no norm, no residual, as the paper's code"),
    }


# Models this benchmark can train: key -> spec for (fair). Add an entry to
# benchmark another model (e.g. a GAM variant) beside the paper's three.
MODEL_SPECS: dict[str, Callable[[bool], ModelSpec]] = {
    key: (lambda fair, key=key: _table1_specs(fair)[key]) for key in ("gam", "transformer", "mamba")
}
# Not the paper: GAM with the opt-in causal memory (memory="causal"); --models ...,gam_causal
MODEL_SPECS["gam_causal"] = lambda fair: ModelSpec("gam_causal", "GAM (causal memory)", "gam", {"memory": "causal"},
                                                   "opt-in memory='causal': tokens write into the slots")
DEFAULT_MODELS = ("gam", "transformer", "mamba")

# The paper's Table 1 (T4 GPU, fp32, 5 epochs, batch 32, vocab 10k, context 256).
PAPER_TABLE1: dict[tuple[str, str], dict[str, Any]] = {
    ("wikitext2", "transformer"): {"params": "24.2 M", "epoch_s": 131.9, "val_loss": 6.8233, "val_ppl": 918.99},
    ("wikitext2", "mamba"): {"params": "20.5 M", "epoch_s": 127.1, "val_loss": 6.9251, "val_ppl": 1017.54},
    ("wikitext2", "gam"): {"params": "22.6 M", "epoch_s": 117.2, "val_loss": 6.7828, "val_ppl": 882.57},
    ("tinystories", "transformer"): {"params": "24.2 M", "epoch_s": 671.6, "val_loss": 3.1591, "val_ppl": 23.55},
    ("tinystories", "gam"): {"params": "22.6 M", "epoch_s": 601.4, "val_loss": 3.1418, "val_ppl": 23.15},
}


# ----------------------------------------------------------------------------- presets

# Steps per run of the cpu preset, chosen so the whole command fits in 30
# minutes on 2 shared cores with 1 thread (measured: GAM ~1.5 s, naive
# Transformer ~1.9 s, paper-wiring Mamba ~4.4 s per fp32 step of 16 x 128 tokens).
CPU_STEPS = {"paper": 64, "ablation": 200}
CPU_VALID_TOKENS = 32 * 1024


def bench_preset(preset: str, bench: str, device: str) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """(model fields, TrainConfig fields, validation token cap) of a bench preset."""
    from gam.train import preset as train_preset

    model_fields, train_fields = train_preset(preset)
    # The paper's tables are measured with the paper's tokenizer, in every preset, so the
    # perplexities stay comparable with the paper's and with results/ (per-token perplexity
    # depends on the tokenizer).
    train_fields["tokenizer"] = "paper"
    valid_tokens = None
    if preset == "cpu":
        train_fields.update(max_steps=CPU_STEPS[bench], epochs=1, warmup_steps=10, log_every=4,
                            eval_batch_size=64)
        valid_tokens = CPU_VALID_TOKENS
        if device == "cpu":
            train_fields["threads"] = 1  # steadiest (and fastest) on a shared 2-core machine
    else:
        train_fields.setdefault("precision", "fp32")
    return model_fields, train_fields, valid_tokens


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
    return {
        "steps": steps, "tokens": steps * batch_size * block_size, "train_s": train_s,
        "steps_per_epoch": steps_per_epoch, "epochs_completed": len(full),
        "epoch_s": per_epoch, "epoch_s_extrapolated": extrapolated,
        "tokens_per_s": steps * batch_size * block_size / train_s if train_s else float("nan"),
        "val_loss": final["val_loss"], "val_ppl": final["val_ppl"],
        "best_val_loss": best["val_loss"], "best_val_ppl": best["val_ppl"], "best_step": best.get("step"),
        "unigram_ppl": final.get("unigram_ppl"),
        "evals": [{"step": r["step"], "val_loss": r["val_loss"], "val_ppl": r["val_ppl"]} for r in evals],
        "train_loss": [[r["step"], r["loss"]] for r in records if "loss" in r],
    }


def train_grid(datasets: Sequence[str], specs: Sequence[ModelSpec], seeds: Sequence[int],
               model_fields: dict[str, Any], train_fields: dict[str, Any], *, device: str,
               valid_tokens: int | None, data_source: str = "auto", cache_dir: str | Path | None = None,
               runs_dir: str | Path | None = None, log: Callable[[str], None] = print) -> tuple[list, dict]:
    """Train every (dataset, model, seed); return (run records, per-dataset data info)."""
    from gam.config import GAMConfig
    from gam.train import TrainConfig, TrainingDiverged, train

    keep = runs_dir is not None
    root = Path(runs_dir) if keep else Path(tempfile.mkdtemp(prefix="gam-bench-"))
    runs: list[dict[str, Any]] = []
    data_info: dict[str, Any] = {}
    try:
        for dataset in datasets:
            t0 = time.perf_counter()
            data, full_valid = prepare(dataset, model_fields, train_fields, data_source, cache_dir, valid_tokens)
            fields = {**model_fields, "vocab_size": data.vocab_size}
            block = fields["block_size"]
            n_blocks = len(data.train) // (block + 1)
            steps_per_epoch = n_blocks // train_fields["batch_size"]
            data_info[dataset] = {
                "source": data.source, "vocab_size": data.vocab_size, "tokenizer_hash": data.tokenizer_hash,
                "train_tokens": len(data.train), "valid_tokens_used": len(data.valid),
                "valid_tokens_available": full_valid, "steps_per_epoch": steps_per_epoch,
                "prepare_s": time.perf_counter() - t0,
            }
            log(f"{DATASET_LABELS.get(dataset, dataset)}: {data.source}; train {len(data.train):,} tokens "
                f"({steps_per_epoch} steps/epoch), validation {len(data.valid):,} of {full_valid:,} tokens, "
                f"vocab {data.vocab_size}")
            for spec in specs:
                counts = parameter_counts(spec.model, {**fields, **spec.fields})
                for seed in seeds:
                    run_dir = root / _slug(dataset) / spec.key / f"seed{seed}"
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    model_config = GAMConfig(model=spec.model, **{**fields, **spec.fields})
                    cfg = TrainConfig(**{**train_fields, "data": dataset, "seed": seed, "device": device})
                    log(f"-- {DATASET_LABELS.get(dataset, dataset)} / {spec.label} / seed {seed}")
                    w0 = time.perf_counter()
                    diverged = None
                    try:
                        final = train(model_config, cfg, run_dir, data=data,
                                      print_fn=lambda text: log("   " + text)).metrics
                    except TrainingDiverged as err:  # a result of the comparison, not a crash of it
                        diverged = str(err).split(";")[0]
                        final = {"val_loss": float("nan"), "val_ppl": float("nan")}
                    wall = time.perf_counter() - w0
                    record = {"dataset": dataset, "model": spec.key, "label": spec.label, "seed": seed,
                              "params": counts["total"], "non_embedding_params": counts["non_embedding"],
                              "precision": cfg.precision, "wall_s": wall, "diverged": diverged,
                              **summarize_run(_read_metrics(run_dir), final, steps_per_epoch,
                                              cfg.batch_size, block)}
                    runs.append(record)
                    if diverged:
                        log(f"   -> diverged: {diverged} (recorded; the other runs go on); {wall:.0f} s wall")
                    else:
                        log(f"   -> val loss {record['val_loss']:.4f}, ppl {record['val_ppl']:.2f} (best "
                            f"{record['best_val_ppl']:.2f}); {record['tokens_per_s']:,.0f} tokens/s; "
                            f"{wall:.0f} s wall")
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return runs, data_info


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in Path(str(text)).name).strip("-") or "data"


def aggregate(runs: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Mean and sample sd over seeds of each metric in ``keys``."""
    out: dict[str, Any] = {}
    for k in keys:
        mean, sd = mean_spread([r[k] for r in runs])
        out[k] = {"mean": mean, "sd": sd, "values": [r[k] for r in runs]}
    return out


METRICS = ("epoch_s", "tokens_per_s", "val_loss", "val_ppl", "best_val_loss", "best_val_ppl", "train_s")


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
    datasets: tuple[str, ...] = DATASETS
    models: tuple[str, ...] = DEFAULT_MODELS
    seeds: int = 1
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
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("precision fp16 needs CUDA (it uses a GradScaler); use bf16 on CPU")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device available")


def resolve(cfg: PaperConfig, bench: str) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """The model fields, TrainConfig fields and validation cap a bench config runs with."""
    model_fields, train_fields, valid_tokens = bench_preset(cfg.preset, bench, cfg.device)
    if cfg.precision:
        train_fields["precision"] = cfg.precision
    elif bench == "paper":
        train_fields["precision"] = mixed_precision(cfg.device) if cfg.fair else "fp32"
    elif cfg.device.startswith("cuda") and train_fields.get("precision") == "bf16":
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
    if bench == "ablation" and train_fields.get("max_steps"):
        # Table 3 reports the best validation perplexity seen during training.
        train_fields.setdefault("eval_every", max(1, train_fields["max_steps"] // 4))
    train_fields["data_source"] = cfg.data_source
    model_fields.update(cfg.model_overrides)
    train_fields.update(cfg.train_overrides)
    return model_fields, train_fields, valid_tokens


def render_table1(cfg: PaperConfig, runs: list[dict[str, Any]], specs: dict[str, ModelSpec]) -> str:
    headers = ["dataset", "model", "params", "w/o emb.", "s / epoch", "tokens/s", "val loss", "val PPL",
               "paper params", "paper s / epoch", "paper val loss", "paper val PPL"]
    body = []
    for dataset in cfg.datasets:
        for key in cfg.models:
            rs = [r for r in runs if r["dataset"] == dataset and r["model"] == key]
            if not rs:
                continue
            paper = PAPER_TABLE1.get((dataset, key), {})
            body.append([
                DATASET_LABELS.get(dataset, dataset), specs[key].label,
                fmt_params(rs[0]["params"]), fmt_params(rs[0]["non_embedding_params"]),
                _epoch_cell(rs), fmt_mean_spread([r["tokens_per_s"] for r in rs if not r.get("diverged")], "{:,.0f}"),
                metric_cell(rs, "val_loss", "{:.4f}"), metric_cell(rs, "val_ppl", "{:.2f}"),
                _paper_num(paper.get("params"), "{}"), _paper_num(paper.get("epoch_s"), "{:.1f}"),
                _paper_num(paper.get("val_loss"), "{:.4f}"), _paper_num(paper.get("val_ppl"), "{:.2f}"),
            ])
        uni = unigram_ppl(runs, dataset)
        if uni:
            body.append([DATASET_LABELS.get(dataset, dataset), UNIGRAM_LABEL, "", "", "", "",
                         f"{math.log(uni):.4f}", f"{uni:.2f}", "", "", "", ""])
    return markdown_table(headers, body, "ll" + "r" * 10)


UNIGRAM_LABEL = "*unigram model (token frequencies)*"


def unigram_ppl(runs: list[dict[str, Any]], dataset: str | None = None) -> float | None:
    """The perplexity of a unigram model fitted on the training tokens, on the same
    validation tokens (a trained model must beat it to have learned any context)."""
    values = [r["unigram_ppl"] for r in runs if r.get("unigram_ppl") and (dataset is None or r["dataset"] == dataset)]
    return values[0] if values else None


def setup_lines(cfg: PaperConfig, model_fields: dict[str, Any], train_fields: dict[str, Any],
                valid_tokens: int | None, data_info: dict[str, Any], env: dict[str, Any], wall_s: float,
                seeds: Sequence[int]) -> list[str]:
    from dataclasses import asdict

    from gam.config import GAMConfig

    steps = train_fields.get("max_steps")
    schedule = (f"{steps} optimizer steps" if steps else f"{train_fields['epochs']} epochs")
    model_fields = {**asdict(GAMConfig()), **model_fields}  # a preset names only what it changes
    lines = [
        f"Machine: {describe_environment(env)}.", "",
        f"Preset `{cfg.preset}`: width {model_fields['n_embd']}, {model_fields['n_layer']} layers, context "
        f"{model_fields['block_size']}, vocab ≤ {model_fields['vocab_size']}, {model_fields['num_memory_slots']} "
        f"memory slots, {model_fields['n_head']} heads, Mamba expand {model_fields['expand']}, dropout "
        f"{model_fields['dropout']}; {schedule} of batch {train_fields['batch_size']}, AdamW lr "
        f"{train_fields['lr']:g} (warm-up {train_fields['warmup_steps']}, cosine), {train_fields['precision']}"
        + (f", {train_fields['threads']} CPU thread" if train_fields.get("threads") else "")
        + f"; seeds {', '.join(map(str, seeds))} (mean ± sample sd over seeds). Whole command: "
        f"{wall_s / 60:.1f} min.", "",
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
    """Train the grid and write paper.md/.json/.csv and curves.png into ``out``."""
    cfg.validate()
    for d in cfg.datasets:
        if d not in DATASETS and not Path(d).exists():
            raise ValueError(f"unknown dataset {d!r}; use {', '.join(DATASETS)} or a path")
    fair_specs = {k: MODEL_SPECS[k](cfg.fair) for k in cfg.models}
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
    runs, data_info = train_grid(cfg.datasets, [s for k, s in fair_specs.items() if k not in skipped], seeds, model_fields, train_fields,
                                 device=cfg.device, valid_tokens=valid_tokens, data_source=cfg.data_source,
                                 cache_dir=cfg.cache_dir, runs_dir=cfg.runs_dir, log=log)
    wall = time.perf_counter() - start
    env["load_average_end"] = load_average()
    for dataset in data_info:
        uni = [r["unigram_ppl"] for r in runs if r["dataset"] == dataset and r.get("unigram_ppl")]
        data_info[dataset]["unigram_ppl"] = uni[0] if uni else None
    table = render_table1(cfg, runs, fair_specs)
    mode = ("fair baselines: SDPA attention, standard Mamba wiring, one mixed precision for all"
            if cfg.fair else "baselines as the paper ran them: naive attention, bare Mamba mixers, fp32")
    lines = [f"# Main results (Table 1): GAM vs Transformer vs Mamba, {mode}", "",
             *setup_lines(cfg, model_fields, train_fields, valid_tokens, data_info, env, wall, seeds),
             table, "", *diverged_lines(runs, {k: s.label for k, s in fair_specs.items()}),
             "Models:", *[f"- {s.label}: {s.note}" + (f" (skipped: {skipped[k]})" if k in skipped else "")
                          for k, s in fair_specs.items()], "",
             "The paper's columns are its Table 1 (T4 GPU, fp32, 5 epochs of batch 32 at width 512, 6 layers, "
             "context 256, vocab 10,000; final validation PPL; Mamba was not reported on TinyStories). "
             + ("They compare with ours only in direction: the `cpu` preset is a much smaller model trained "
                "for a few hundred thousand tokens." if cfg.preset == "cpu" else ""), ""]
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    summary = [{"dataset": d, "model": m, "label": fair_specs[m].label, "seeds": len(rs),
                "params": rs[0]["params"], "non_embedding_params": rs[0]["non_embedding_params"],
                "epoch_s_extrapolated": any(r["epoch_s_extrapolated"] for r in rs),
                **aggregate(rs, METRICS), "paper": PAPER_TABLE1.get((d, m))}
               for (d, m), rs in groups.items()]
    raw = {"bench": NAME, "config": cfg, "model_fields": model_fields, "train_fields": train_fields,
           "valid_tokens": valid_tokens, "seeds": seeds, "environment": env, "wall_s": wall,
           "data": data_info, "models": fair_specs, "skipped": skipped, "summary": summary, "rows": runs,
           "paper_table1": {f"{d}/{m}": v for (d, m), v in PAPER_TABLE1.items()}}
    csv_rows = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in runs]
    out = Path(out)
    paths = write_results(out, NAME, "\n".join(lines), raw, csv_rows)
    paths.append(plot_curves(runs, fair_specs, out / "curves.png",
                             f"{cfg.preset} preset, {train_fields['precision']}, {env['device_name']}"))
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


# ----------------------------------------------------------------------------- command line

def add_common_training_args(p: argparse.ArgumentParser, default_steps: str) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="cpu", choices=["cpu", "paper"],
                   help=f"cpu: small model, {default_steps}; paper: the paper's model and 5-epoch schedule (GPU)")
    p.add_argument("--seeds", type=int, default=1, help="runs per model (seeds SEED .. SEED+N-1); mean ± sd")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (overrides the preset)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (without --max-steps)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--valid-tokens", type=int, default=None,
                   help="validation tokens used (default: cpu preset 32,768; paper preset all 5,000 rows)")
    p.add_argument("--data-source", default="auto", choices=["auto", "hub", "shipped"])
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default $GAM_CACHE_DIR or ~/.cache/gam)")
    p.add_argument("--runs-dir", default=None, help="keep checkpoints and metrics here (default: a temporary folder)")
    p.epilog = ("Any model or training field can be overridden as in gam train: --n-layer 2, --lr 1e-3, "
                "--d-state 8, --eval-every 50, ...")


def add_parser(bench_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = bench_sub.add_parser(
        "paper", help="Table 1: GAM vs Transformer vs Mamba trained on WikiText-2 and TinyStories",
        description="Train GAM, the Transformer and Mamba on WikiText-2 and TinyStories (same tokenizer, "
                    "data, steps and seeds for every model) and tabulate parameters, time per epoch, "
                    "tokens/s, validation loss and perplexity beside the paper's Table 1. Default: the "
                    "baselines as the paper ran them (naive attention, bare Mamba mixers, fp32); --fair: "
                    "SDPA, standard Mamba wiring, one mixed precision for all. Writes paper.md/.json/.csv "
                    "and curves.png into --out.")
    add_common_training_args(p, f"{CPU_STEPS['paper']} steps per run, under 30 minutes on 2 cores")
    p.add_argument("--fair", action="store_true", help="SDPA attention, standard Mamba wiring, same mixed precision")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: wikitext2, tinystories or paths")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, from: {', '.join(MODEL_SPECS)}")
    p.add_argument("--out", default="results/paper", help="results folder (default results/paper)")
    p.set_defaults(func=cmd, accepts_overrides=True)
    return p


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from gam.train_cli import parse_overrides

    model_over, train_over = parse_overrides(list(getattr(args, "overrides", None) or []))
    return dict(model_overrides=model_over, train_overrides=train_over,device=args.device, preset=args.preset, seeds=args.seeds, seed=args.seed, precision=args.precision,
                max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
                valid_tokens=args.valid_tokens, data_source=args.data_source, cache_dir=args.cache_dir,
                runs_dir=args.runs_dir)


def cmd(args: argparse.Namespace) -> None:
    cfg = PaperConfig(fair=args.fair, datasets=tuple(d.strip() for d in args.datasets.split(",") if d.strip()),
                      models=tuple(parse_name_list(args.models, MODEL_SPECS, "model")), **config_kwargs(args))
    result = run(cfg, args.out)
    print()
    print(result["table"])
    print(f"wrote {', '.join(str(p) for p in result['paths'])} in {result['wall_s'] / 60:.1f} min")
