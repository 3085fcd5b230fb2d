"""``gam bench paper | ablation | scaling | report``: their options and commands.

The library modules (gam.bench.paper, ...) hold the benchmarks; this module, part of
the command line, turns options into their configs, as ``gam.cli`` does for the
benchmarks whose options come straight from a config dataclass (decode, speed, recall).
"""

from __future__ import annotations

import argparse
from typing import Any

from gam.bench import ablation, paper, report, scaling
from gam.bench.ablation import DEFAULT_VARIANTS, VARIANTS
from gam.bench.common import parse_int_list, parse_name_list
from gam.bench.paper import CPU_BUDGET, CPU_DEFAULT_MODELS, CPU_VALID_TOKENS, DEFAULT_MODELS, MODEL_NAMES, PaperConfig
from gam.bench.scaling import DEFAULT_LENGTHS, ScalingConfig, block_specs
from gam.bench.scaling import DEFAULT_MODELS as SCALING_DEFAULT_MODELS
from gam.train_cli import parse_overrides


def cpu_schedule_help(bench: str) -> str:
    epochs = CPU_BUDGET["epochs"][bench]
    return (f"width {CPU_BUDGET['model']['n_embd']}, {epochs} epoch{'s' if epochs != 1 else ''} of WikiText-2, "
            f"{CPU_BUDGET['seeds']} seeds, bf16 on {CPU_BUDGET['threads']} threads: projected to fit "
            f"{CPU_BUDGET['minutes']} minutes on 2 cores (the projection is printed at the start)")


def add_common_training_args(p: argparse.ArgumentParser, default_steps: str) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="cpu", choices=["cpu", "paper"],
                   help=f"cpu: small model, {default_steps}; paper: the paper's model and 5-epoch schedule (GPU)")
    p.add_argument("--seeds", type=int, default=None,
                   help="runs per model (seeds SEED .. SEED+N-1); mean ± sd (default: cpu preset 3, paper preset 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (overrides the preset)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (without --max-steps)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--valid-tokens", type=int, default=None,
                   help=f"validation tokens used (default: cpu preset {CPU_VALID_TOKENS:,}; paper preset all 5,000 rows)")
    p.add_argument("--data-source", default="auto", choices=["auto", "hub", "shipped"])
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default $GAM_CACHE_DIR or ~/.cache/gam)")
    p.add_argument("--runs-dir", default=None, help="keep checkpoints and metrics here (default: a temporary folder)")
    p.epilog = ("Any model or training field can be overridden as in gam train: --n-layer 2, --lr 1e-3, "
                "--d-state 8, --eval-every 50, ...")


def add_paper_parser(bench_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = bench_sub.add_parser(
        "paper", help="Table 1: GAM vs Transformer vs Mamba trained on WikiText-2 and TinyStories",
        description="Train GAM, the Transformer and Mamba on WikiText-2 and TinyStories (cpu preset: "
                    "WikiText-2 only; same tokenizer, data, steps and seeds for every model) and tabulate parameters, time per epoch, "
                    "tokens/s, validation loss and perplexity, and the loss inside and beyond the paper "
                    "GAM's receptive field, beside the paper's Table 1 (mean ± sd over seeds, ties marked). "
                    "cpu preset: the baselines as the paper ran them (naive attention, bare Mamba mixers) "
                    "and the fair ones (SDPA, standard Mamba wiring) side by side, bf16 for all; paper "
                    "preset: the paper's wiring in fp32, or with --fair the fair baselines in one mixed "
                    "precision. Writes paper.md/.json/.csv, curves.png and loss_by_position.png into --out.")
    add_common_training_args(p, cpu_schedule_help(paper.NAME))
    p.add_argument("--fair", action="store_true",
                   help="only the fair baselines: SDPA attention, standard Mamba wiring, same mixed precision")
    p.add_argument("--datasets", default=None,
                   help="comma-separated: wikitext2, tinystories or paths (default: cpu preset wikitext2, paper "
                        "preset both)")
    p.add_argument("--models", default=None,
                   help=f"comma-separated, from: {', '.join(MODEL_NAMES)} (default: cpu preset "
                        f"{','.join(CPU_DEFAULT_MODELS)}; paper preset or --fair {','.join(DEFAULT_MODELS)})")
    p.add_argument("--out", default="results/paper", help="results folder (default results/paper)")
    p.set_defaults(func=cmd_paper, accepts_overrides=True)
    return p


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    model_over, train_over = parse_overrides(list(getattr(args, "overrides", None) or []))
    return dict(model_overrides=model_over, train_overrides=train_over,device=args.device, preset=args.preset, seeds=args.seeds, seed=args.seed, precision=args.precision,
                max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
                valid_tokens=args.valid_tokens, data_source=args.data_source, cache_dir=args.cache_dir,
                runs_dir=args.runs_dir)


def cmd_paper(args: argparse.Namespace) -> None:
    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip()) if args.datasets else None
    models = tuple(parse_name_list(args.models, MODEL_NAMES, "model")) if args.models else None
    cfg = PaperConfig(fair=args.fair, datasets=datasets, models=models, **config_kwargs(args))
    result = paper.run(cfg, args.out)
    print()
    print(result["table"])
    print(f"wrote {', '.join(str(p) for p in result['paths'])} in {result['wall_s'] / 60:.1f} min")


def add_ablation_parser(bench_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = bench_sub.add_parser(
        "ablation", help="Table 3: the four GAM variants trained on WikiText-2",
        description="Train the full GAM and its three ablations (Global Only, Sum Fusion, Local Only) on "
                    "WikiText-2 with the same data, steps and seeds, and tabulate parameters, time per epoch, "
                    "tokens/s, the best and final validation perplexity and the loss inside and beyond the "
                    "paper GAM's receptive field beside the paper's Table 3 (mean ± sd over seeds, ties "
                    "marked). Writes ablation.md/.json/.csv, curves.png and loss_by_position.png into --out.")
    add_common_training_args(p, cpu_schedule_help(ablation.NAME))
    p.add_argument("--dataset", default="wikitext2", help="wikitext2 (the paper's), tinystories or a path")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--out", default="results/ablation", help="results folder (default results/ablation)")
    p.set_defaults(func=cmd_ablation, accepts_overrides=True)
    return p


def cmd_ablation(args: argparse.Namespace) -> None:
    cfg = PaperConfig(datasets=(args.dataset,), **config_kwargs(args))
    result = ablation.run(cfg, parse_name_list(args.variants, VARIANTS, "variant"), args.out)
    print()
    print(result["table"])
    print(f"wrote {', '.join(str(p) for p in result['paths'])} in {result['wall_s'] / 60:.1f} min")


def add_scaling_parser(bench_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = bench_sub.add_parser(
        "scaling", help="Table 2: one block's forward+backward time and peak memory vs sequence length",
        description="One block each of GAM, the Transformer (naive attention as the paper, and SDPA) and "
                    "Mamba; forward+backward time (median, warm-up excluded) and peak memory for each T, "
                    "every point in a fresh subprocess. CUDA defaults follow the paper's scale.py (batch 16, "
                    "fp16 autocast, 5 warm-up + 20 timed runs); CPU defaults fit a shared 2-core machine in "
                    "under 10 minutes (batch 1, fp32, 1 thread, 1 warm-up + 3 timed runs, 60 s and "
                    "min(6 GiB, 40%% of available memory) per point). Writes scaling.md/.json/.csv, "
                    "compute_time.png and peak_memory.png into --out.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="results/scaling", help="results folder (default results/scaling)")
    p.add_argument("--models", default=",".join(SCALING_DEFAULT_MODELS),
                   help=f"comma-separated, from: {', '.join(block_specs())}")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated T values")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 on CUDA (paper), 1 on CPU")
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default fp16 autocast on CUDA (paper), fp32 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per point (default 5 CUDA, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (default 20 CUDA, 3 CPU)")
    p.add_argument("--min-time", type=float, default=None,
                   help="add timed runs (up to --max-repeats) until they add up to this many seconds "
                        "(default 3 on CPU, 0 on CUDA)")
    p.add_argument("--max-repeats", type=int, default=None, help="default 15 on CPU")
    p.add_argument("--rounds", type=int, default=None,
                   help="measure the cheap points again in this many rounds in all (default 2 CPU, 1 CUDA)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in the blocks (paper: 0.1, training mode)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds per point (default 300 CUDA, 60 CPU)")
    p.add_argument("--memory-budget-gib", type=float, default=None,
                   help="per point (default: all GPU memory; CPU min(6, 40%% of available))")
    p.add_argument("--threads", type=int, default=None, help="CPU torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_scaling)
    return p


def config_from_args(args: argparse.Namespace) -> ScalingConfig:
    return ScalingConfig(
        device=args.device, models=tuple(parse_name_list(args.models, block_specs(), "model")),
        lengths=tuple(parse_int_list(args.lengths, "--lengths")), batch_size=args.batch_size,
        n_embd=args.n_embd, n_head=args.n_head, dropout=args.dropout, precision=args.precision,
        warmup=args.warmup, repeats=args.repeats, min_time_s=args.min_time, rounds=args.rounds, max_repeats=args.max_repeats, time_budget_s=args.time_budget, memory_budget_gib=args.memory_budget_gib,
        threads=args.threads, seed=args.seed)


def cmd_scaling(args: argparse.Namespace) -> None:
    result = scaling.run(config_from_args(args), args.out)
    print()
    print(result["table"])
    fits = result["exponents"]
    specs = block_specs()
    print("fitted exponents (time, memory): " + "; ".join(
        f"{specs[m].label} {scaling._fmt_exp(f['time'])}, {scaling._fmt_exp(f['memory'])}" for m, f in fits.items()))
    print(f"wrote {', '.join(str(p) for p in result['paths'])} in {result['wall_s'] / 60:.1f} min")


def add_report_parser(bench_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = bench_sub.add_parser("report", help="collect results folders into one markdown report",
                             description="Read the NAME.md / NAME.json files of each results folder and "
                                         "write one markdown report (stdout, or --out FILE).")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="results folders written by gam bench ...")
    p.add_argument("--out", default=None, help="write the report here (plots linked relative to it)")
    p.add_argument("--title", default="Benchmark report")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> None:
    text = report.render(args.dirs, args.out, args.title)
    if args.out:
        print(f"wrote {args.out} ({len(args.dirs)} folder(s))")
    else:
        print(text, end="")
