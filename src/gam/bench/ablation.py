"""Ablation benchmark (the paper's Table 3): the four GAM variants on WikiText-2.

Full GAM (gated fusion of the local convolution and the global memory read),
Global Only (memory read, no convolution, no gate), Sum Fusion (both paths
added, no gate) and Local Only (convolution, no memory, no gate), trained the
same way (same data, steps and seeds; see :mod:`gam.bench.trained`). Table 3
reports the *best* validation perplexity seen during training, so the runs
evaluate a few times (``eval_every``) and the table shows the best and the
final perplexity. Beside ours: the paper's parameter counts and perplexities,
and our parameter count at the paper's configuration (which matches the
paper's rounded figure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from gam.bench.common import fmt_mean_spread, markdown_table
from gam.bench.tables import (
    METRICS,
    UNIGRAM_LABEL,
    aggregate,
    diverged_lines,
    epoch_cell,
    field_headers,
    fmt_params,
    metric_cell,
    position_cells,
    position_summary,
    rank_cells,
    setup_lines,
    table_notes,
    trained_summary,
    unigram_ppl,
    write_trained,
)
from gam.bench.trained import TrainedConfig, check_datasets, default_seeds, parameter_counts, train_models
from gam.config import described
from gam.models import registry
from gam.models.registry import ModelSpec

NAME = "ablation"
HELP = "Table 3: the four GAM variants trained on WikiText-2"
DEFAULT_OUT = "results/ablation"
ACCEPTS_OVERRIDES = True  # any model or training field: --n-layer 2, --lr 1e-3, ...

# ``--variants`` names -> registry keys (gam.models.registry).
VARIANTS = {"full": "gam", "global_only": "gam_global_only", "sum_fusion": "gam_sum_fusion",
            "local_only": "gam_local_only",
            "kv_slots": "gam_kv_slots"}  # not the paper: opt-in memory="kv_slots"; --variants ...,kv_slots
# What each GAM variant keeps: (gating, local path, global path)
PATHS = {"full": (True, True, True), "global_only": (False, False, True), "sum_fusion": (False, True, True),
         "local_only": (False, True, False)}


def paths_of(spec: ModelSpec) -> tuple[bool, bool, bool]:
    return PATHS[spec.fields.get("variant", "full")]


def variant_specs(variants: Sequence[str]) -> dict[str, ModelSpec]:
    """The registry's specs of ``variants``, labelled by the paper's Table 3 row where they have one."""
    specs = registry.select(variants, VARIANTS)
    return {s.key: replace(s, label=f"GAM ({s.paper_rows['Table 3']})") if "Table 3" in s.paper_rows else s
            for s in specs}


DEFAULT_VARIANTS = ("full", "global_only", "sum_fusion", "local_only")  # the paper's row order

# The paper's Table 3 (WikiText-2; best validation PPL during training).
PAPER_TABLE3 = {
    "full": {"params": "22.6 M", "val_ppl": 900.84},
    "global_only": {"params": "19.4 M", "val_ppl": 905.45},
    "sum_fusion": {"params": "19.4 M", "val_ppl": 942.59},
    "local_only": {"params": "17.9 M", "val_ppl": 944.70},
}


def _mark(flag: bool) -> str:
    return "✓" if flag else "×"


def render_table3(variants: list[str], runs: list[dict[str, Any]], paper_counts: dict[str, int],
                  receptive_field: int) -> str:
    specs = variant_specs(variants)
    inside, beyond = field_headers(runs, receptive_field)
    headers = ["configuration", "gating", "local", "global", "rank", "params", "w/o emb.", "params at paper config",
               "s / epoch", "tokens/s", "best val loss", "best val PPL", "final val PPL", inside, beyond,
               "last ¼ gain", "paper params", "paper val PPL"]
    body = []
    groups = {key: rs for key in variants if (rs := [r for r in runs if r["model"] == key])}
    # Table 3's metric: the best validation loss seen during training
    ranks = rank_cells({key: [r["best_val_loss"] for r in rs if not r.get("diverged")] for key, rs in groups.items()})
    for key, rs in groups.items():
        spec = specs[key]
        gating, local, glob = paths_of(spec)
        paper = PAPER_TABLE3.get(key, {})
        body.append([
            spec.label, _mark(gating), _mark(local), _mark(glob), ranks[key],
            fmt_params(rs[0]["params"]), fmt_params(rs[0]["non_embedding_params"]),
            f"{paper_counts[key]:,}", epoch_cell(rs),
            fmt_mean_spread([r["tokens_per_s"] for r in rs if not r.get("diverged")], "{:,.0f}"),
            metric_cell(rs, "best_val_loss", "{:.4f}"), metric_cell(rs, "best_val_ppl", "{:.2f}"),
            metric_cell(rs, "val_ppl", "{:.2f}"), *position_cells(rs), metric_cell(rs, "last_quarter_gain", "{:.4f}"),
            paper.get("params", "—"), f"{paper['val_ppl']:.2f}" if "val_ppl" in paper else "—",
        ])
    uni = unigram_ppl(runs)
    if uni:
        body.append([UNIGRAM_LABEL, "", "", "", "", "", "", "", "", "", f"{math.log(uni):.4f}", f"{uni:.2f}",
                     f"{uni:.2f}", "", "", "", "", ""])
    return markdown_table(headers, body, "lllll" + "r" * 13)


@dataclass
class AblationConfig(TrainedConfig):
    """Train the full GAM and its three ablations (Global Only, Sum Fusion, Local Only) on
    WikiText-2 with the same data, steps and seeds, and tabulate parameters, time per epoch,
    tokens/s, the best and final validation perplexity and the loss inside and beyond the paper
    GAM's receptive field beside the paper's Table 3 (mean ± sd over seeds, ties marked). Any
    model or training field can be overridden as in gam train: --n-layer 2, --lr 1e-3, ..."""

    dataset: str = described("wikitext2", "wikitext2 (the paper's), tinystories or a path")
    variants: tuple[str, ...] = described(DEFAULT_VARIANTS, "the variants, in the table's order",
                                          choices=tuple(VARIANTS))


Config = AblationConfig


def run(config: AblationConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the variants on ``config.dataset``; the result :func:`write` turns into the results folder."""
    from gam.train import preset as train_preset

    config.validate()
    check_datasets([config.dataset])
    config = replace(config, seeds=config.seeds if config.seeds is not None else default_seeds(config.preset))
    variants = list(config.variants)
    specs = variant_specs(variants)
    paper_fields = train_preset("paper")[0]
    paper_counts = {k: parameter_counts("gam", {**paper_fields, **specs[k].fields})["total"] for k in variants}
    grid = train_models(config, NAME, [config.dataset], specs, log=log)
    runs = grid["runs"]
    table = render_table3(variants, runs, paper_counts, grid["receptive_field"])
    lines = ["# Ablations (Table 3): the four GAM variants", "",
             *setup_lines(config.preset, grid["model_fields"], grid["train_fields"], grid["valid_tokens"],
                          grid["data"], grid["environment"], grid["wall_s"], grid["seeds"], grid["projection"]),
             table, "", *table_notes(runs, "best validation loss"), "",
             *diverged_lines(runs, {k: s.label for k, s in specs.items()}),
             "Best val loss / PPL: the lowest of the evaluations during training "
             f"({len(runs[0]['evals']) if runs else 0} evenly spaced, the last at the end; "
             "the paper's Table 3 metric); final val PPL: at the end of training (Table 1's metric). "
             "`params at paper config`: our count for the paper's configuration (width 512, 6 layers, "
             "vocab 10,000, 512 slots), which rounds to the paper's figure.",
             "The paper's columns are its Table 3 (WikiText-2, T4 GPU, fp32, 5 epochs)."
             + (" They compare with ours only in direction: the `cpu` preset is a much smaller model trained "
                "on far fewer tokens." if config.preset == "cpu" else ""), ""]
    summary = [{"model": k, "label": specs[k].label, **dict(zip(("gating", "local", "global"), paths_of(specs[k]))),
                "params": rs[0]["params"],
                "non_embedding_params": rs[0]["non_embedding_params"], "params_paper_config": paper_counts[k],
                **aggregate(rs, METRICS), "loss_by_position": position_summary(rs), "paper": PAPER_TABLE3.get(k)}
               for k in variants if (rs := [r for r in runs if r["model"] == k])]
    return {**grid, "bench": NAME, "config": config, "variants": variants, "specs": specs, "summary": summary,
            "table": table, "markdown": "\n".join(lines)}


def write(result: dict[str, Any], out: str | Path) -> list[Path]:
    raw = {"bench": NAME, "config": result["config"], "variants": result["variants"],
           "model_fields": result["model_fields"], "train_fields": result["train_fields"],
           "valid_tokens": result["valid_tokens"], "seeds": result["seeds"], "environment": result["environment"],
           "wall_s": result["wall_s"], "projection": result["projection"], "data": result["data"],
           "models": result["specs"], "summary": result["summary"], "rows": result["runs"],
           "paper_table3": PAPER_TABLE3, "provenance": result["provenance"]}
    return write_trained(out, NAME, result, raw)


summary = trained_summary
