"""Progress bars for the waits a user sits through (evaluation: tens of seconds on a CPU)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def shown(rank: int = 0) -> bool:
    """Bars go to stderr on process 0 when it is a terminal: logs and pipes get no
    carriage-return updates. TQDM_DISABLE=1 (tqdm's own switch) hides them there too."""
    return (rank == 0 and sys.stderr.isatty()
            and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false"))


def progress(items: Iterable[T], desc: str, unit: str = "batch", rank: int = 0) -> Iterable[T]:
    """``items`` with a bar that disappears when done (``leave=False``)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not shown(rank))
