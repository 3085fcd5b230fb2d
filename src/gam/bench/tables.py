"""Tables and plots of trained runs (``gam bench paper`` and ``ablation``).

Every figure is the mean ± sample standard deviation over seeds; a rank tells
two models apart only when their spreads allow it (:func:`rank_cells`). The
plots: training and validation loss against steps (:func:`plot_curves`) and
the validation loss at each block position (:func:`plot_by_position`), also
joined across results folders (:func:`replot_by_position`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from gam.bench.common import describe_environment, fmt_mean_spread, mean_spread, write_results
from gam.bench.trained import DATASET_LABELS
from gam.config import GAMConfig
from gam.models.registry import ModelSpec


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


def epoch_cell(rs: list[dict[str, Any]]) -> str:
    done = [r for r in rs if not r.get("diverged")]  # a diverged run's time would mix in steps of nan
    text = fmt_mean_spread([r["epoch_s"] for r in done], "{:,.1f}")
    return text + ("*" if text != "—" and any(r["epoch_s_extrapolated"] for r in done) else "")


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def paper_cell(value: Any, fmt: str) -> str:
    return "—" if value is None else (value if isinstance(value, str) else fmt.format(value))


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


def setup_lines(preset: str, model_fields: dict[str, Any], train_fields: dict[str, Any],
                valid_tokens: int | None, data_info: dict[str, Any], env: dict[str, Any], wall_s: float,
                seeds: Sequence[int], projection: dict[str, Any] | None = None) -> list[str]:
    steps = train_fields.get("max_steps")
    epochs = train_fields["epochs"]
    schedule = f"{steps} optimizer steps" if steps else f"{epochs} epoch{'s' if epochs != 1 else ''}"
    model_fields = {**asdict(GAMConfig()), **model_fields}  # a preset names only what it changes
    lines = [
        f"Machine: {describe_environment(env)}.", "",
        f"Preset `{preset}`: width {model_fields['n_embd']}, {model_fields['n_layer']} layers, context "
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



def trained_summary(result: dict[str, Any]) -> str:
    """What ``gam bench paper|ablation`` print at the end: the table and the training time."""
    return f"\n{result['table']}\ntrained in {result['wall_s'] / 60:.1f} min"


def write_trained(out: str | Path, name: str, result: dict[str, Any], raw: dict[str, Any]) -> list[Path]:
    """``NAME.md/.json/.csv``, ``curves.png`` and ``loss_by_position.png`` of a trained bench."""
    runs, specs = result["runs"], result["specs"]
    csv_rows = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in runs]
    out = Path(out)
    paths = write_results(out, name, result["markdown"], raw, csv_rows)
    title = f"{result['config'].preset} preset, {result['train_fields']['precision']}, {result['environment']['device_name']}"
    paths.append(plot_curves(runs, specs, out / "curves.png", title))
    paths.append(plot_by_position(runs, specs, out / "loss_by_position.png", title))
    return paths
