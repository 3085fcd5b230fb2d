"""``gam train`` and ``gam eval``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any

from gam.config import ConfigError, GAMConfig

TRAIN_HELP = """\
Train GAM, the Transformer or Mamba on WikiText-2, TinyStories or your own text.

With no arguments: the `cpu` preset GAM on the shipped WikiText-2 (a few
minutes on 2 CPU cores), ending with the validation perplexity next to a
unigram model's on the same tokens.

Any model or training field can be overridden: --n-layer 4, --num-memory-slots 256,
--lr 1e-3, --precision bf16, --variant sum_fusion, --attn-impl naive, ...
Ctrl-C saves a checkpoint; --resume continues exactly where it stopped.
Multi-process: torchrun --nproc-per-node N -m gam.cli train ... (also --nnodes for
several machines).
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: the cpu preset GAM on WikiText-2)", allow_abbrev=False,
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model, data and preset default to None so that --resume can tell what was given
    p.add_argument("--model", default=None, choices=["gam", "transformer", "mamba"], help="default gam")
    p.add_argument("--data", default=None,
                   help="wikitext2 (default) | tinystories | a .txt/.txt.gz/.jsonl/.parquet file or folder")
    p.add_argument("--preset", default=None, help="paper | cpu (default cpu)")
    p.add_argument("--out", default=None, help="run folder (default runs/MODEL-PRESET-DATA)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="optimizer steps between checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its saved settings "
                        "(options given again are applied with a notice, or refused: docs/reliability.md)")
    p.set_defaults(func=cmd_train, accepts_overrides=True)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("dir", help="a run folder or checkpoint folder")
    p.add_argument("--data", default=None, help="default: the data the model was trained on")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--by-position", nargs="?", const="", default=None, metavar="PLOT.png",
                   help="also the mean loss at each block position, and its plot "
                        "(default DIR/loss_by_position.png; see docs/loss-by-position.md)")
    p.set_defaults(func=cmd_eval)


def _coerce(text: str, annotation: Any) -> Any:
    """Turn a command-line string into the type a dataclass field declares."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"int": int, "float": float, "str": str, "bool": bool, "None": None})  # noqa: S307 - our own annotations
    args = typing.get_args(annotation) or (annotation,)
    if text.lower() == "none" and type(None) in args:
        return None
    for kind in args:
        if kind is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
        elif kind in (int, float, str):
            try:
                return kind(text)
            except ValueError:
                continue
    raise ConfigError(f"cannot read {text!r} as {annotation}")


def parse_overrides(tokens: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--n-layer 4 --lr=1e-3`` -> (model fields, train fields); unknown names raise."""
    from gam.train import TrainConfig

    model_fields = {f.name: f.type for f in dataclasses.fields(GAMConfig)}
    train_fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    model_over: dict[str, Any] = {}
    train_over: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, i = tokens[i + 1], i + 1
            else:
                value = "true"  # a bare flag: --compile
        name = key.replace("-", "_")
        if name in model_fields and name != "model":
            model_over[name] = _coerce(value, model_fields[name])
        elif name in train_fields:
            train_over[name] = _coerce(value, train_fields[name])
        else:
            raise ConfigError(f"unknown option or field --{key}")
        i += 1
    return model_over, train_over


def cmd_train(args: argparse.Namespace) -> None:
    from gam.train import TrainConfig, preset, train

    if args.resume and args.preset is not None:
        raise ConfigError("--preset does not apply with --resume (the run's saved settings are used); "
                          "give the single fields to change instead")
    # What was given on purpose: on --resume only these may differ from the run's settings.
    explicit = set() if args.model is None else {"model"}
    explicit |= set() if args.data is None else {"data"}
    args.model = args.model or "gam"
    args.preset = args.preset or "cpu"
    model_fields, train_fields = preset(args.preset)
    model_over, train_over = parse_overrides(args.overrides)
    train_fields.update(train_over)
    explicit |= set(model_over) | set(train_over)
    for name in ("max_steps", "epochs", "seed", "save_every"):
        if getattr(args, name) is not None:
            train_fields[name] = getattr(args, name)
            explicit.add(name)
    if args.epochs is not None and args.max_steps is None:
        train_fields["max_steps"] = None  # --epochs alone means: train for that many epochs
        explicit.add("max_steps")
    args.data = args.data or "wikitext2"
    train_fields["data"] = args.data
    model_config = GAMConfig(model=args.model, **{**model_fields, **model_over})
    cfg = TrainConfig(**train_fields)
    out = args.out or f"runs/{args.model}-{args.preset}-{_slug(args.data)}"
    result = train(model_config, cfg, out, resume=args.resume, explicit=explicit if args.resume else None)
    if result.interrupted:
        sys.exit(130)
    m = result.metrics
    if "val_loss" in m:
        print(f"\nvalidation: loss {m['val_loss']:.4f}, perplexity {m['val_ppl']:.2f} "
              f"(a unigram model on the same {m['tokens']:,} tokens: {m['unigram_ppl']:.2f})")
    print(f"checkpoint: {out}  (gam eval {out}; gam generate {out} --prompt ...)")


def _slug(text: str) -> str:
    from pathlib import Path

    return "".join(c if c.isalnum() else "-" for c in Path(text).name.removesuffix(".gz")).strip("-") or "data"


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from gam.checkpoint import load_checkpoint
    from gam.data import prepare_data
    from gam.train import evaluate, pick_device, Dist, unigram_perplexity

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    ckpt = load_checkpoint(args.dir)
    train_cfg = ckpt.info.get("train_config", {})
    data_name = args.data or train_cfg.get("data", "wikitext2")
    precision = train_cfg.get("precision", "fp32")
    device = pick_device(args.device, Dist())
    model = ckpt.build_model(device)
    config = model.config
    data = prepare_data(data_name, block_size=config.block_size, vocab_size=config.vocab_size,
                        source=train_cfg.get("data_source", "auto"),
                        train_rows=train_cfg.get("train_rows"), valid_rows=train_cfg.get("valid_rows"),
                        tokenizer=ckpt.tokenizer())
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
