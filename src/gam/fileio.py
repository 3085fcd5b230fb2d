"""Atomic file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temp file beside it: on success the data is fsynced
    and renamed over ``path`` (atomic on POSIX); on any error, or an interrupt,
    the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def describe_os_error(err: OSError) -> str:
    """One line for an operating-system error: the path(s) and the cause."""
    cause = err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause


@contextlib.contextmanager
def writer_errors_as_os_errors(path: str | os.PathLike) -> Iterator[None]:
    """Writers that do not raise OSError when the system refuses a write become ones
    that do, naming ``path``: safetensors raises ``SafetensorError("... I/O error:
    No space left on device (os error 28)")`` and ``torch.save`` a RuntimeError
    ("unexpected pos ...") with no errno at all. Without the errno, a full disk is
    recognized by the free space left; anything else stays the error it was."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - narrowed just below
        message = str(err)
        found = re.search(r"os error (\d+)", message)
        if found:
            code = int(found.group(1))
        elif type(err).__name__ == "SafetensorError" or "unexpected pos" in message \
                or "file write failed" in message:
            code = errno.ENOSPC if _nearly_full(Path(path).parent) else errno.EIO
        else:
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False
