"""Progress bars for the waits a user sits through (evaluation: tens of seconds on a CPU)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def disabled_by_env() -> bool:
    """TQDM_DISABLE=1 (tqdm's own switch) hides every bar, the training bar too."""
    return os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")


def shown(rank: int = 0) -> bool:
    """Evaluation bars go to stderr on process 0 when it is a terminal: logs and pipes
    get no carriage-return updates."""
    return rank == 0 and sys.stderr.isatty() and not disabled_by_env()


def progress(items: Iterable[T], desc: str, unit: str = "batch", rank: int = 0) -> Iterable[T]:
    """``items`` with a bar that disappears when done (``leave=False``)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not shown(rank))
