"""lm-evaluation-harness on gam models: ``python -m gam.harness ARGS`` (or ``gam harness ARGS``).

Registers the ``gam`` model type with transformers' Auto classes (``import gam.hf``), then runs
lm-eval's own command line with ARGS unchanged, so an export (``gam export RUN OUT``) evaluates
as any Hugging Face model::

    python -m gam.harness --model hf --model_args pretrained=OUT --tasks gam_wikitext2 --batch_size 4

Without ``--include_path``, the local tasks shipped in ``gam/harness_tasks`` (built from the
shipped corpora, no download) are added: ``gam_wikitext2`` (word/byte perplexity),
``gam_tinystories_mc`` (multiple choice) and ``gam_tinystories_gen`` (generate_until). Needs the
``[eval]`` extra: ``pip install 'gam[eval]'``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's argv for ``args``: unchanged, plus ``--include_path`` to the local tasks unless
    the caller names their own folder (lm-eval takes one) or asks for a sub-command's help."""
    given = any(a == "--include_path" or a.startswith("--include_path=") for a in args)
    if given or not args or args[0] in ("-h", "--help"):
        return ["lm_eval", *args]
    return ["lm_eval", *args, "--include_path", str(TASKS_DIR)]


def one_line(err: Exception) -> str:
    """An exception from lm-eval (or transformers under it) as one line: its type and the first
    line of its message; a bare ``assert`` has none, so the line that raised it stands in."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if lines:
        return f"{type(err).__name__}: {lines[0]}"
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"{type(err).__name__} in {Path(frame.filename).name}:{frame.lineno}: {frame.line}"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        import lm_eval.__main__
    except ImportError as err:
        print(f"gam harness: error: lm-evaluation-harness is not installed: pip install 'gam[eval]' ({err})",
              file=sys.stderr)
        return 2
    import gam.hf  # noqa: F401 - registers model_type "gam" with AutoConfig / AutoModelForCausalLM

    saved = sys.argv
    sys.argv = lm_eval_argv(args)
    try:
        lm_eval.__main__.cli_evaluate()
    except SystemExit as exit_:  # argparse errors and --help end this way
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        print("gam harness: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - our boundary: lm-eval's message, not its stack
        print(f"gam harness: error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
