"""``gam train`` and ``gam eval``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gam import cli_args
from gam.cli_args import Parser, UsageError, add_field_arguments, given_fields
from gam.config import ALLOW_DATA_CHANGE, PRESETS, RESUME_ON_REQUEST, ConfigError, GAMConfig, TrainConfig, preset

TRAIN_HELP = """\
Train GAM, the Transformer or Mamba on WikiText-2, TinyStories or your own text.

With no arguments: the `cpu` preset GAM on the shipped WikiText-2 (a few
minutes on 2 CPU cores), ending with the validation perplexity next to a
unigram model's on the same tokens.

Every model field (GAMConfig) and training field (TrainConfig) below can be
set: --n-layer 4 --lr 1e-3 --precision bf16 --variant sum_fusion --compile.
A preset (--preset cpu, the default, or paper) sets some fields first; what
you give on the command line wins. Values: numbers, text, true/false, none.
Ctrl-C, SIGTERM and SIGHUP save a checkpoint; the same command with --resume added continues
exactly where it stopped.
Multi-process: torchrun --nproc-per-node N -m gam.cli train ... (also --nnodes for
several machines).
"""

# (argument group title, dataclass, preset name -> that preset's values for the dataclass)
FIELD_GROUPS = (
    ("model fields (GAMConfig)", GAMConfig, {name: fields for name, (fields, _) in PRESETS.items()}),
    ("training fields (TrainConfig)", TrainConfig, {name: fields for name, (_, fields) in PRESETS.items()}),
)

TRAIN_USAGE = "gam train [--preset NAME] [--out DIR] [--resume [--allow-change FIELDS]] [--FIELD VALUE ...]"


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: the cpu preset GAM on WikiText-2)", allow_abbrev=False,
                       description=TRAIN_HELP, usage=TRAIN_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    # default None, not "cpu": on --resume only a preset given on purpose is compared with the run
    run.add_argument("--preset", default=None, metavar="NAME",
                     help=f"starting values for the fields: {' | '.join(PRESETS)} (default: cpu)")
    run.add_argument("--out", default=None, metavar="DIR", help="run folder (default: runs/MODEL-PRESET-DATA)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint: the same command with --resume "
                          "added continues it; a changed field is applied with a notice or refused "
                          "(docs/reliability.md)")
    run.add_argument("--allow-change", default="", metavar="FIELDS",
                     help=f"with --resume: apply these changed fields, which are otherwise refused "
                          f"(comma-separated: {', '.join(sorted(RESUME_ON_REQUEST))}), or "
                          f"{ALLOW_DATA_CHANGE}: continue on data whose content changed since the run read it")
    for title, config_class, presets in FIELD_GROUPS:
        add_field_arguments(p, title, config_class, presets)
    p.set_defaults(func=cmd_train)


def fields_markdown() -> str:
    """The field tables of docs/cli.md, from the same source as ``gam train --help``."""
    return "\n\n".join(f"### {title}\n\n{cli_args.fields_markdown(config_class, presets)}"
                       for title, config_class, presets in FIELD_GROUPS)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint",
                       description="Validation loss and perplexity of a checkpoint, on the data it was trained "
                                   "on (or --data), next to a unigram model's perplexity on the same tokens. "
                                   "Progress: a bar on a terminal, a line every GAM_PROGRESS_SECONDS (default 5) "
                                   "in a log or pipe; TQDM_DISABLE=1 hides both.")
    p.add_argument("dir", help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--data", default=None, help="wikitext2 | tinystories | a path (default: the data the model "
                                                 "was trained on)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="sequences per batch (default: 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--by-position", nargs="?", const="", default=None, metavar="PLOT.png",
                   help="also the mean loss at each block position, and its plot "
                        "(default DIR/loss_by_position.png; see docs/loss-by-position.md)")
    p.set_defaults(func=cmd_eval)


def parse_overrides(tokens: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--n-layer 4 --lr=1e-3`` -> (model fields, train fields), for commands that pass
    field overrides through (``gam bench paper``); bad names and values raise ConfigError."""
    parser = Parser(prog="gam", add_help=False, allow_abbrev=False)
    add_field_arguments(parser, "model fields", GAMConfig)
    add_field_arguments(parser, "training fields", TrainConfig)
    try:
        args = parser.parse_args(tokens)
    except UsageError as err:
        raise ConfigError(str(err)) from None
    model_over = given_fields(args, GAMConfig)
    if "model" in model_over:
        raise ConfigError("--model: a benchmark trains its own set of models (see its --models)")
    return model_over, given_fields(args, TrainConfig)


def cmd_train(args: argparse.Namespace) -> None:
    from gam.resources import tune_cpu_allocator
    from gam.train import train

    tune_cpu_allocator()  # freed activations stay in the heap (see there): 10-20% faster CPU steps

    allow_change = _allow_change(args.allow_change)
    if allow_change and not args.resume:
        raise ConfigError("--allow-change applies only with --resume (a new run takes every field as given)")
    preset_name = args.preset or "cpu"
    model_fields, train_fields = preset(preset_name)
    given_model, given_train = given_fields(args, GAMConfig), given_fields(args, TrainConfig)
    # On --resume, what the command says on purpose is compared with the run's saved settings: each
    # flag given, and each field of a --preset given (the command that started the run, re-run with
    # --resume, matches it). The value: where the field came from, for the messages.
    origin = {name: f"--preset {args.preset}" for name in (*model_fields, *train_fields)} if args.preset else {}
    origin.update({name: "" for name in (*given_model, *given_train)})
    model_fields.update(given_model)
    if "epochs" in given_train and "max_steps" not in given_train:
        train_fields["max_steps"] = None  # --epochs alone means: train for that many epochs
        origin["max_steps"] = "--epochs"
    train_fields.update(given_train)
    model_config = GAMConfig(**model_fields)
    cfg = TrainConfig(**train_fields)
    out = args.out or f"runs/{model_config.model}-{preset_name}-{_slug(cfg.data)}"
    result = train(model_config, cfg, out, resume=args.resume, explicit=origin if args.resume else None,
                   allow_change=allow_change)
    if result.interrupted:  # saved; the shell's convention for the signal: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
        sys.exit(128 + result.stop_signal if result.stop_signal else 130)  # no signal: stop_after, as Ctrl-C
    m = result.metrics
    if "val_loss" in m:
        print(f"\nvalidation: loss {m['val_loss']:.4f}, perplexity {m['val_ppl']:.2f} "
              f"(a unigram model on the same {m['tokens']:,} tokens: {m['unigram_ppl']:.2f})")
    print(f"checkpoint: {out}  (gam eval {out}; gam generate {out} --prompt ...)")


def _allow_change(text: str) -> set[str]:
    """``--allow-change lr,warmup-steps`` -> {"lr", "warmup_steps"}; only fields a resume may change on
    request, and ``corpus`` (the data's content)."""
    names = {word.strip().removeprefix("--").replace("-", "_") for word in text.split(",") if word.strip()}
    other = sorted(names - RESUME_ON_REQUEST - {ALLOW_DATA_CHANGE})
    if other:
        raise ConfigError(f"--allow-change: {', '.join(other)} cannot be changed on resume; it takes "
                          f"{', '.join(sorted(RESUME_ON_REQUEST))} and {ALLOW_DATA_CHANGE} (docs/reliability.md)")
    return names


def _slug(text: str) -> str:
    from pathlib import Path

    return "".join(c if c.isalnum() else "-" for c in Path(text).name.removesuffix(".gz")).strip("-") or "data"


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from gam.checkpoint import load_checkpoint
    from gam.data import fingerprint_changes, prepare_data
    from gam.train import Dist, copy_trained_on, evaluate, pick_device, unigram_perplexity

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    ckpt = load_checkpoint(args.dir)
    train_cfg = ckpt.info.get("train_config", {})
    data_name = args.data or train_cfg.get("data", "wikitext2")
    precision = train_cfg.get("precision", "fp32")
    device = pick_device(args.device, Dist())
    model = ckpt.build_model(device)
    config = model.config
    source = train_cfg.get("data_source", "auto")
    if data_name == train_cfg.get("data") and copy_trained_on(ckpt.info, source) == "shipped":
        # Its own copy, without probing the hub and warning. A run trained on the hub copy keeps
        # "auto": evaluated on the shipped copy when the hub is away, with a warning that matters.
        source = "shipped"
    data = prepare_data(data_name, block_size=config.block_size, vocab_size=config.vocab_size,
                        source=source,
                        train_rows=train_cfg.get("train_rows"), valid_rows=train_cfg.get("valid_rows"),
                        tokenizer=ckpt.tokenizer())
    changes = [] if args.data else fingerprint_changes(ckpt.info.get("data_fingerprint"), data.fingerprint())
    if changes:  # --data names the data on purpose: then it is evaluated as it is
        raise ConfigError(f"the data changed since the run read it: {'; '.join(changes)}; to evaluate on it "
                          f"as it is now, name it: --data {data_name}")
    with torch.no_grad():
        metrics = evaluate(model, data.valid, config.block_size, args.batch_size, device, precision)
    metrics["unigram_ppl"] = unigram_perplexity(data.train, data.valid, config.vocab_size, config.block_size)
    result = {"checkpoint": str(ckpt.path), "step": ckpt.step, "data": data.source, **metrics}
    if args.by_position is not None:
        from pathlib import Path

        from gam import evaluation

        result["by_position"] = evaluation.report(
            model, data.valid, args.batch_size, device, precision,
            args.by_position or Path(args.dir) / "loss_by_position.png", title=f"{ckpt.path} (step {ckpt.step})")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ckpt.path} (step {ckpt.step}) on {data.source}:")
        print(f"  val loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.2f} over "
              f"{metrics['tokens']:,} tokens; unigram model perplexity {metrics['unigram_ppl']:.2f}")
        if "by_position" in result:
            from gam.evaluation import format_report

            print("\n".join(format_report(result["by_position"])))
