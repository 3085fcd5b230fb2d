"""Atomic file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temp file beside it (``.NAME.*.tmp``): on success the data is
    fsynced and renamed over ``path`` (atomic on POSIX); on any error, or an interrupt, the temp
    file is removed and ``path`` is left as it was. The writer holds a lock on its temp file
    until the rename, so :func:`remove_orphaned_temporaries` only removes a killed writer's.
    An error that names no file (numpy's ``tofile`` on a full disk: "N requested and 0
    written", no errno) becomes an OSError naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file is closed, or its writer dies
        os.fchmod(fd, FILE_MODE & ~umask())  # mkstemp's 0600, renamed into place, would make the file private
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # while still locked: a temp file is never unlocked before its rename
    except OSError as err:
        # judged before the temp file goes: removing it frees the space a full disk lacked
        code = err.errno or (errno.ENOSPC if _nearly_full(path.parent) else errno.EIO)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if err.filename is not None:
            raise
        raise OSError(code, err.strerror or os.strerror(code), str(path)) from err
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_atomic_write_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


# A temporary younger than this is never removed: its writer may not have locked it yet.
ORPHAN_MIN_AGE_S = 60.0


def remove_orphaned_temporaries(folder: str | os.PathLike, is_temporary: Callable[[str], bool]) -> list[str]:
    """Delete the temporaries (files or folders) in ``folder`` that writers killed outright
    (``kill -9``, power loss) left behind: a live writer holds a lock on its temporary, so one
    whose lock can be taken, and older than :data:`ORPHAN_MIN_AGE_S`, has no writer left.
    Returns the names removed."""
    removed = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:  # no such folder yet, or unreadable: nothing of ours there
        return removed
    for p in entries:
        if not is_temporary(p.name) or p.is_symlink():
            continue
        try:
            if time.time() - p.stat().st_mtime < ORPHAN_MIN_AGE_S:
                continue
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        except OSError:  # locked by a live writer, or already gone
            pass
        finally:
            os.close(fd)
    return removed


def lock_temp_dir(path: str | os.PathLike) -> int:
    """Lock a temporary folder for as long as the returned descriptor is open (close it after
    the rename into place), so :func:`remove_orphaned_temporaries` leaves it alone."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def sha256_of_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# What open() and mkdir() ask for; the umask then takes away what the user wants kept private.
FILE_MODE, DIR_MODE = 0o666, 0o777


def umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (Linux):
    setting it to read it back would briefly change the mode of files other threads create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """``tempfile.mkdtemp`` with the mode an ordinary mkdir gives: mkdtemp makes 0700, which a
    folder renamed into place (a checkpoint, an export) would keep, unreadable to other users."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    path.chmod(DIR_MODE & ~umask())
    return path


def apply_umask(folder: str | os.PathLike) -> None:
    """Give the files in ``folder`` the mode an ordinary write gives: some writers make their
    files private whatever the umask (safetensors writes 0600)."""
    mode = FILE_MODE & ~umask()
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            p.chmod(mode)


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
