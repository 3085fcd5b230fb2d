"""The ``gam`` command line. Each sub-command lives in a small function here;
heavy imports happen inside them so ``gam --help`` stays fast."""

from __future__ import annotations

import argparse
import sys
import time

PAPER_MODELS = (
    ("GAM (full)", "gam", {}),
    ("GAM sum_fusion", "gam", {"variant": "sum_fusion"}),
    ("GAM global_only", "gam", {"variant": "global_only"}),
    ("GAM local_only", "gam", {"variant": "local_only"}),
    ("Transformer", "transformer", {}),
    ("Mamba (paper wiring)", "mamba", {"mamba_wiring": "paper"}),
    ("Mamba (standard wiring)", "mamba", {"mamba_wiring": "standard"}),
)


def parameter_table() -> str:
    from gam import build_model, count_parameters

    rows = ["| model | parameters | without embeddings |", "|---|---:|---:|"]
    for label, name, fields in PAPER_MODELS:
        counts = count_parameters(build_model(name, **fields))
        rows.append(f"| {label} | {counts['total']:,} | {counts['non_embedding']:,} |")
    return "\n".join(rows)


def cmd_params(args: argparse.Namespace) -> None:
    print("Paper configuration: vocab 10,000, context 256, width 512, 6 layers, "
          "512 memory slots, kernel 3, 8 heads, Mamba d_state 16 / d_conv 4 / expand 3")
    print(parameter_table())


def cmd_demo(args: argparse.Namespace) -> None:
    """Forward and backward of the paper-size model on random tokens."""
    import torch

    from gam import build_model, count_parameters

    torch.manual_seed(args.seed)
    model = build_model(args.model).to(args.device)
    cfg = model.config
    counts = count_parameters(model)
    print(f"{args.model}: {counts['total']:,} parameters "
          f"({counts['non_embedding']:,} without embeddings), device {args.device}")
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device=args.device)
    targets = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device=args.device)
    start = time.perf_counter()
    logits, loss = model(idx, targets)
    loss.backward()
    elapsed = time.perf_counter() - start
    grads = sum(p.grad is not None for p in model.parameters())
    print(f"logits {tuple(logits.shape)}, loss {loss.item():.4f} "
          f"(uniform guess: ln {cfg.vocab_size} = {torch.log(torch.tensor(float(cfg.vocab_size))):.4f}), "
          f"{grads} parameter tensors got gradients, forward+backward {elapsed * 1000:.0f} ms")
    print()
    print(parameter_table())


def cmd_receptive_field(args: argparse.Namespace) -> None:
    from gam import build_model
    from gam.analysis import influence, theoretical_receptive_field

    fields = {"n_layer": args.n_layer, "conv_kernel_size": args.kernel, "dropout": 0.0,
              "block_size": max(args.seq_len, 8)}
    if args.model == "gam":
        fields["variant"] = args.variant
    model = build_model(args.model, **fields)
    position = args.seq_len - 1 if args.position is None else args.position
    weights = influence(model, args.seq_len, position)
    nonzero = weights.nonzero().flatten().tolist()
    print(f"model {args.model}" + (f" ({args.variant})" if args.model == "gam" else "")
          + f", n_layer {args.n_layer}, kernel {args.kernel}, output position {position}")
    print(f"input positions that influence it: {nonzero[0]} .. {nonzero[-1]} "
          f"({len(nonzero)} of {position + 1} possible)")
    if args.model == "gam":
        expected = theoretical_receptive_field(args.n_layer, args.kernel, args.variant)
        print(f"design says: {expected} tokens (1 + n_layer*(k-1) for the paper GAM)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gam", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="forward+backward of the paper-size model and its parameter table")
    p.add_argument("--model", default="gam", choices=["gam", "transformer", "mamba"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("params", help="parameter counts of every model at the paper configuration")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("receptive-field",
                       help="which input positions influence an output position (autograd)")
    p.add_argument("--model", default="gam", choices=["gam", "transformer", "mamba"])
    p.add_argument("--variant", default="full")
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--position", type=int, default=None, help="default: the last position")
    p.set_defaults(func=cmd_receptive_field)

    from gam import train_cli

    train_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        # Config, data, checkpoint and input errors: one line, no traceback.
        print(f"gam {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if type(err).__name__ != "TrainingDiverged":
            raise
        print(f"gam {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gam {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
