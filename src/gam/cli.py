"""The ``gam`` command line.

Each sub-command is one ``add_*_parser`` function, listed in SUBCOMMANDS in the
order ``gam --help`` shows them. Heavy imports (torch, the models) happen inside
the ``cmd_*`` functions, so building the parser, ``gam --help`` and
``gam --version`` never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
import warnings

from gam import __version__, train_cli
from gam.cli_args import Parser, UsageError, add_field_arguments, given_fields
from gam.fileio import describe_os_error

DESCRIPTION = """\
Gated Associative Memory (GAM) language models and their Transformer and Mamba
baselines: train, evaluate, generate text, export to Hugging Face, benchmark.

Start with `gam train` (a small GAM on WikiText-2, a few minutes on a CPU), then
`gam eval runs/gam-cpu-wikitext2` and
`gam generate runs/gam-cpu-wikitext2 --prompt "The"`.
`gam COMMAND --help` describes each command; docs/cli.md has examples.
"""

# `gam params`: the paper's models and ablations, and both wirings of the baselines
PARAMETER_TABLE_MODELS = ("gam", "gam_sum_fusion", "gam_global_only", "gam_local_only", "gam_kv_slots",
                          "transformer_sdpa", "mamba_paper", "mamba_standard")


def parameter_table() -> str:
    from gam.models.lm import count_parameters
    from gam.models.registry import select

    rows = ["| model | parameters | without embeddings |", "|---|---:|---:|"]
    for spec in select(PARAMETER_TABLE_MODELS):
        counts = count_parameters(spec.build())
        rows.append(f"| {spec.label} | {counts['total']:,} | {counts['non_embedding']:,} |")
    return "\n".join(rows)


def cmd_params(args: argparse.Namespace) -> None:
    print("Paper configuration: vocab 10,000, context 256, width 512, 6 layers, "
          "512 memory slots, kernel 3, 8 heads, Mamba d_state 16 / d_conv 4 / expand 3")
    print(parameter_table())


def cmd_demo(args: argparse.Namespace) -> None:
    """One training step of the paper-size model on random tokens (the trainer's step)."""
    import torch

    from gam.config import TrainConfig
    from gam.models.lm import build_model, count_parameters
    from gam.train import Dist, TrainingStep, pick_device

    device = pick_device(args.device, Dist())  # one-line error for cuda on a CPU build
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(device)
    cfg = model.config
    counts = count_parameters(model)
    print(f"{args.model}: {counts['total']:,} parameters "
          f"({counts['non_embedding']:,} without embeddings), device {device}")
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device=device)
    targets = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device=device)
    step = TrainingStep(model, TrainConfig(warmup_steps=0), device, total_steps=1)
    start = time.perf_counter()
    loss = step(0, idx, targets)
    elapsed = time.perf_counter() - start
    print(f"loss {loss.item():.4f} (uniform guess: ln {cfg.vocab_size} = "
          f"{torch.log(torch.tensor(float(cfg.vocab_size))):.4f}), one training step "
          f"(forward, backward, clip, AdamW) {elapsed * 1000:.0f} ms")
    print()
    print(parameter_table())


def cmd_receptive_field(args: argparse.Namespace) -> None:
    from gam import build_model
    from gam.analysis import influence

    fields = {"n_layer": args.n_layer, "conv_kernel_size": args.kernel, "dropout": 0.0,
              "block_size": max(args.seq_len, 8)}
    if args.model == "gam":
        fields["variant"] = args.variant
        fields["memory"] = args.memory
    model = build_model(args.model, **fields)
    position = args.seq_len - 1 if args.position is None else args.position
    weights = influence(model, args.seq_len, position)
    nonzero = weights.nonzero().flatten().tolist()
    writable = args.model == "gam" and args.memory != "static"
    print(f"model {args.model}" + (f" ({args.variant}{f', {args.memory} memory' if writable else ''})"
                                   if args.model == "gam" else "")
          + f", n_layer {args.n_layer}, kernel {args.kernel}, output position {position}")
    print(f"input positions that influence it: {nonzero[0]} .. {nonzero[-1]} "
          f"({len(nonzero)} of {position + 1} possible)")
    if writable:
        print("design says: every earlier token (the memory slots carry the whole prefix, with decay)")
    elif args.model == "gam":
        expected = model.config.receptive_field()
        print(f"design says: {expected} tokens (1 + n_layer*(k-1) for the paper GAM)")
    if args.plot:
        from gam.analysis import plot_influence

        plot_influence(weights, position, args.plot,
                       title=f"{args.model}{' ' + args.variant if args.model == 'gam' else ''}"
                             f"{f' {args.memory} memory' if writable else ''}, n_layer {args.n_layer}, "
                             f"kernel {args.kernel}: influence on position {position}")
        print(f"wrote {args.plot}")


GENERATE_HELP = """\
Generate text from a training checkpoint folder (model.safetensors, config.json,
tokenizer.json; a run folder resolves to its latest checkpoint). The prompt is
prefilled in one parallel pass, then each token costs one cached step and is
printed as it is decoded.

Context: a model with learned positions (the paper's) sees at most block_size
tokens. Past that the window slides: each new token is predicted from the last
block_size tokens, re-prefilled into a fresh cache (what cropping the input
gives). With pos_embedding="none" there is no limit, and GAM keeps a
constant-size state (k-1 vectors per layer) however long the text.
"""


def cmd_generate(args: argparse.Namespace) -> None:
    import warnings

    import torch

    from gam.checkpoint import load_checkpoint
    from gam.generation import TextStreamer, check_sampling, encode_prompt, stream
    from gam.train import Dist, pick_device

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if not args.prompt:
        raise ValueError("empty prompt: give some text with --prompt")
    device = pick_device(args.device, Dist())  # one-line error for cuda on a CPU build, or a bad name
    ckpt = load_checkpoint(args.dir)
    tokenizer = ckpt.tokenizer()
    model = ckpt.build_model(device)
    if args.precision == "bf16":  # the cache is allocated in the weights' dtype; sampling is in fp32
        model = model.to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = encode_prompt(tokenizer, args.prompt)
    for w in caught:
        print(f"gam generate: warning: {w.message}", file=sys.stderr)
    if not ids:
        raise ValueError(f"empty prompt: the tokenizer gives no tokens for {args.prompt!r}")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    streamer = TextStreamer(tokenizer, ids, args.prompt)
    print(streamer.printed, end="", flush=True)
    tokens = stream(model, idx, args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, compiled=args.compile)
    try:
        for token in tokens:
            print(streamer.push(int(token[0])), end="", flush=True)
    except torch._dynamo.exc.BackendCompilerFailed as err:  # no C++ compiler (CPU) or Triton (CUDA)
        print(file=sys.stderr)
        reason = str(err.inner_exception).strip().splitlines()[0][:200] if str(err.inner_exception).strip() else ""
        raise ValueError(f"--compile: torch.compile failed ({type(err.inner_exception).__name__}: {reason}); "
                         "run without --compile") from None
    except KeyboardInterrupt:
        print(flush=True)  # end the streamed text's line: "interrupted" goes on its own
        raise
    print(streamer.finish())


def cmd_export(args: argparse.Namespace) -> None:
    try:
        from gam.hf import export
    except ImportError as err:
        raise ValueError(f"gam export needs transformers: pip install 'gam[hf]' ({err})") from None
    from gam.checkpoint import how_to_load_an_export

    out = export(args.dir, args.out)
    print(f"wrote {out} ({how_to_load_an_export(out)}; see its README.md)")


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint folder (streams as it decodes)",
                       description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="checkpoint folder (or run folder with a 'latest' file)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (default: 100)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output (default: unseeded)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="weights and decoding state: bf16 halves the bytes each token reads (default: fp32)")
    p.add_argument("--compile", action="store_true",
                   help="decode through one torch.compile'd step (compiles first, then about 2x faster at batch 1 "
                        "on CPU; with --precision bf16 on a CPU with AMX the weights are frozen into it and its "
                        "matmuls tuned: 10-20 s to compile, then about 3.5x; needs a C++ compiler)")
    p.set_defaults(func=cmd_generate)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="convert a checkpoint folder to a Hugging Face transformers folder")
    p.add_argument("dir", help="checkpoint folder (or run folder with a 'latest' file)")
    p.add_argument("out", help="output folder (save_pretrained layout: safetensors, config, tokenizer)")
    p.set_defaults(func=cmd_export)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """The ``gam bench`` group: one sub-command per benchmark."""
    bench = sub.add_parser("bench", help="benchmarks: speed, decode, recall, zoology, scaling, paper, ablation, report")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    from gam.bench import ablation, decode, paper, recall, scaling, speed, zoology

    # each a Config dataclass + run + write + summary; a new benchmark is one more module here
    for bench in (decode, speed, recall, zoology, scaling, paper, ablation):
        add_bench_command(bench_sub, bench)
    add_report_parser(bench_sub)


def add_bench_command(bench_sub: argparse._SubParsersAction, bench) -> None:
    """``gam bench NAME``: the options are the fields of the benchmark's config dataclass
    (``bench.Config``, described as ``gam train``'s), plus ``--out``. The command runs
    ``bench.run(config)``, writes the results folder (``bench.write``) and prints the
    benchmark's ``summary`` of the result. A benchmark that trains models
    (``ACCEPTS_OVERRIDES``) also takes any model or training field, as ``gam train``."""
    doc = " ".join((bench.Config.__doc__ or "").split())
    p = bench_sub.add_parser(bench.NAME, help=bench.HELP, description=doc)
    p.add_argument("--out", default=bench.DEFAULT_OUT, metavar="DIR",
                   help=f"results folder (default {bench.DEFAULT_OUT})")
    add_field_arguments(p, "settings", bench.Config)
    p.set_defaults(func=lambda args: cmd_bench(bench, args),
                   accepts_overrides=getattr(bench, "ACCEPTS_OVERRIDES", False))


def cmd_bench(bench, args: argparse.Namespace) -> None:
    fields = given_fields(args, bench.Config)
    if getattr(bench, "ACCEPTS_OVERRIDES", False):
        fields["model_overrides"], fields["train_overrides"] = train_cli.parse_overrides(
            list(getattr(args, "overrides", None) or []))
    config = bench.Config(**fields)
    if not getattr(config, "no_tune_malloc", False):  # `gam bench speed --no-tune-malloc` measures without
        from gam.resources import tune_cpu_allocator

        tune_cpu_allocator()
    result = bench.run(config)
    paths = bench.write(result, args.out)
    print(bench.summary(result))
    print("wrote " + ", ".join(str(p) for p in paths))


def add_report_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("report", help="collect results folders into one markdown report",
                             description="Read the NAME.md / NAME.json files of each results folder and "
                                         "write one markdown report (stdout, or --out FILE).")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="results folders written by gam bench ...")
    p.add_argument("--out", default=None, help="write the report here (plots linked relative to it)")
    p.add_argument("--title", default="Benchmark report")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> None:
    from gam.bench import report

    text = report.render(args.dirs, args.out, args.title)
    if args.out:
        print(f"wrote {args.out} ({len(args.dirs)} folder(s))")
    else:
        print(text, end="")


def add_params_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="parameter counts of every model at the paper configuration")
    p.set_defaults(func=cmd_params)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="forward+backward of the paper-size model and its parameter table")
    p.add_argument("--model", default="gam", choices=["gam", "transformer", "mamba"], help="(default: gam)")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="sequences of 256 random tokens (default: 8)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.set_defaults(func=cmd_demo)


def add_receptive_field_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("receptive-field",
                       help="which input positions influence an output position (autograd)")
    p.add_argument("--model", default="gam", choices=["gam", "transformer", "mamba"], help="(default: gam)")
    p.add_argument("--variant", default="full", help="GAM: full | sum_fusion | global_only | local_only "
                                                     "(default: full)")
    p.add_argument("--memory", default="static", choices=["static", "kv_slots"],
                   help="GAM memory: static (paper) or kv_slots (key and value slots that tokens write)")
    p.add_argument("--plot", default=None, metavar="PATH", help="also save the influence per position as a plot")
    p.add_argument("--n-layer", type=int, default=6, metavar="N", help="blocks (default: 6)")
    p.add_argument("--kernel", type=int, default=3, metavar="K", help="GAM convolution width (default: 3)")
    p.add_argument("--seq-len", type=int, default=64, metavar="T", help="input length (default: 64)")
    p.add_argument("--position", type=int, default=None, help="output position (default: the last)")
    p.set_defaults(func=cmd_receptive_field)



def add_harness_parser(sub: argparse._SubParsersAction) -> None:
    # parsed by lm-eval itself: main() hands every argument after "harness" to gam.harness
    sub.add_parser("harness", add_help=False,
                   help="lm-evaluation-harness on an export (gam harness --model hf --model_args pretrained=OUT ...)")

def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a run, checkpoint or export folder against its manifest",
                       description="Checks every file of a checkpoint or gam export folder against its "
                                   "manifest (sha256 and size; a file the manifest does not list is a "
                                   "problem too). A run folder: its 'latest' and every checkpoint in it. "
                                   "Prints each problem; exit status 1 if there is any.")
    p.add_argument("dir", help="a run folder, checkpoint folder or gam export folder")
    p.set_defaults(func=cmd_verify)


# The sub-commands, in the order a user needs them (and ``gam --help`` lists them).
# A new command is one entry: a function that adds its parser to ``sub``.
SUBCOMMANDS = (
    train_cli.add_train_parser,
    train_cli.add_eval_parser,
    add_generate_parser,
    add_export_parser,
    add_bench_parser,
    add_harness_parser,
    add_verify_parser,
    add_params_parser,
    add_demo_parser,
    add_receptive_field_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gam", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gam {__version__}", help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return parser


def one_line_warnings(command: str):
    """A ``warnings.showwarning`` that prints the package's own warnings (DataWarning, ...)
    as ``gam CMD: warning: ...``: a user needs the message, not our source line."""
    show_python_warning = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.partition(".")[0] == "gam":
            print(f"{command}: warning: {message}", file=sys.stderr)
        else:
            show_python_warning(message, category, filename, lineno, file, line)

    return show


def cmd_verify(args: argparse.Namespace) -> int:
    from gam.checkpoint import verify_folder

    folders, problems = verify_folder(args.dir)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s) in {len(folders)} folder(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"{args.dir}: ok ({len(folders)} folder(s); every file matches its manifest, none unlisted)")
    return 0


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside the training loop (which saves first): the command ends as on
    Ctrl-C, through every ``finally`` and ``except BaseException``, so temporary files go."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_end_the_command():
    """SIGTERM and SIGHUP raise :class:`Stopped` while a command runs (Python's default for both
    is to die on the spot, leaving temporary files behind); the previous handlers come back after."""
    previous = {}
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def line_buffered_output() -> None:
    """Python buffers stdout in blocks when it is a file or a pipe, so a long bench's progress
    lines (``gam bench recall ... > log``) would reach the log only at its end: one line at a
    time instead, as on a terminal."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and not sys.stdout.isatty():
        reconfigure(line_buffering=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    line_buffered_output()
    if argv[:1] == ["harness"]:
        from gam.harness import main as harness_main

        return harness_main(argv[1:])
    command = "gam"  # until the sub-command is known
    with warnings.catch_warnings(), stop_signals_end_the_command():  # restores showwarning when main returns
        try:
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            command = f"gam {args.command}"
            warnings.showwarning = one_line_warnings(command)
            args.overrides = extra  # field overrides for the commands that take them (accepts_overrides)
            return args.func(args) or 0
        except UsageError as err:  # bad command line (before ValueError: it is one)
            print(f"{err.prog}: error: {err}", file=sys.stderr)
            return 2
        except (ValueError, FileNotFoundError, PermissionError) as err:
            # Config, data, checkpoint and input errors: one line, no traceback.
            message = describe_os_error(err) if isinstance(err, OSError) else err
            print(f"{command}: error: {message}", file=sys.stderr)
            return 2
        except OSError as err:  # no space, read-only file system, not a directory, ...
            print(f"{command}: error: {describe_os_error(err)}", file=sys.stderr)
            return 1
        except RuntimeError as err:
            if type(err).__name__ != "TrainingDiverged":
                raise
            print(f"{command}: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            print(f"{command}: interrupted" + (f" ({err})" if signum != signal.SIGINT else ""), file=sys.stderr)
            return 128 + signum  # the shell's convention: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP


if __name__ == "__main__":
    sys.exit(main())
