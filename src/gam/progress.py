"""Progress for the waits a user sits through (evaluation: tens of seconds to minutes on a CPU;
training a tokenizer; encoding a corpus).

On a terminal, a bar. Anywhere else (a log file, a pipe, ``gam eval RUN > log 2>&1``) a bar's
carriage-return updates are noise, and no output at all makes a long step look stuck, so a
plain line is written every ``GAM_PROGRESS_SECONDS`` seconds (default 5) instead, and one
when the step ends if any was written. ``TQDM_DISABLE=1`` hides both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

DEFAULT_SECONDS = 5.0  # "longer than a few seconds": a shorter step says nothing


def disabled_by_env() -> bool:
    """TQDM_DISABLE=1 (tqdm's own switch) hides every bar and progress line, the training bar too."""
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")


def shown(rank: int = 0) -> bool:
    """Bars go to stderr on process 0 when it is a terminal; elsewhere :func:`progress` writes lines."""
    return rank == 0 and sys.stderr.isatty() and not disabled_by_env()


def seconds_between_lines() -> float:
    """``GAM_PROGRESS_SECONDS``: seconds between progress lines off a terminal (0: after every item)."""
    text = os.environ.get("GAM_PROGRESS_SECONDS", "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ValueError(f"GAM_PROGRESS_SECONDS must be a number of seconds >= 0, got {text!r}")
    return seconds


def say(line: str) -> None:
    """One line on stderr; tqdm.write clears a training bar drawn there first and redraws it after."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def progress(items: Iterable[T], desc: str, unit: str = "batch", rank: int = 0) -> Iterable[T]:
    """``items`` with a bar that disappears when done (``leave=False``) on a terminal, or with a
    progress line every :func:`seconds_between_lines` elsewhere. Only process 0 reports."""
    if rank != 0 or disabled_by_env():
        return items
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return _lines(items, desc, unit, seconds_between_lines())


def _lines(items: Iterable[T], desc: str, unit: str, every: float) -> Iterator[T]:
    total = len(items) if hasattr(items, "__len__") else None
    start = last = time.monotonic()
    done, said = 0, False
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every and done != total:
            elapsed = now - start
            of = (f" of {total:,} ({100 * done / total:.0f}%, about {elapsed * (total - done) / done:.0f} s left)"
                  if total else "")
            say(f"{desc}: {unit} {done:,}{of}, {elapsed:.0f} s so far")
            last, said = now, True
    if said:
        say(f"{desc}: done, {done:,} {_plural(unit)} in {time.monotonic() - start:.0f} s")


@contextlib.contextmanager
def heartbeat(desc: str) -> Iterator[None]:
    """For a step that cannot count its progress (a tokenizer's training, in Rust): a line every
    :func:`seconds_between_lines` (at least 1 s) while it runs, on a terminal or not, and one at
    the end if any was written. A step shorter than the interval says nothing."""
    if disabled_by_env():
        yield
        return
    every = max(seconds_between_lines(), 1.0)
    start = time.monotonic()
    stop = threading.Event()
    said = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            say(f"{desc}: {time.monotonic() - start:.0f} s so far")
            said.set()

    thread = threading.Thread(target=beat, name="gam-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if said.is_set():
            say(f"{desc}: done in {time.monotonic() - start:.0f} s")
