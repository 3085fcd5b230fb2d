"""CPU kernels in C, built on first use with the system's C compiler and loaded with ctypes.

The sources live in ``gam/ops/csrc``. Each is compiled once per source, compiler,
flags and CPU (``-march=native``: a library built on one CPU may not run on
another) into ``$GAM_CACHE_DIR/native`` (default ``~/.cache/gam/native``), by a
temporary file renamed into place, so that concurrent first uses cannot load a
half-written library. No compiler, a failed build or ``GAM_NATIVE=0`` leave the
kernel unavailable: :func:`library` returns None and :func:`unavailable_reason`
says why (with a ``RuntimeWarning``, once a process, unless ``GAM_NATIVE=0`` asked
for it); callers keep their PyTorch forms. Nothing here imports torch's C++
extension machinery (no ninja, no torch headers); the kv-slot kernel builds in about 10 s.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCES = Path(__file__).parent / "csrc"
# 512-bit vectors where the CPU has them (GCC prefers 256 on Intel by default: the forward kernel ran 1.1x
# slower); no errno from math functions (sqrtf is then one instruction, not a call into libm)
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno",
         "-shared", "-fPIC", "-std=c11")

_loaded: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}


def cache_dir() -> Path:
    """Where built libraries go: ``$GAM_CACHE_DIR/native``, else ``~/.cache/gam/native``."""
    root = os.environ.get("GAM_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "gam") / "native"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _cpu_identity() -> str:
    """The model name and feature flags of the first CPU (what ``-march=native`` builds for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))


def _target(name: str, compiler: str) -> Path:
    """Where ``name``'s library for this source, compiler, flags and CPU is cached."""
    text = (SOURCES / f"{name}.c").read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([text, version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    return cache_dir() / f"{name}-{key}.so"


def _build(name: str, compiler: str, target: Path) -> None:
    source = SOURCES / f"{name}.c"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}-", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(source), "-o", temporary, "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{Path(compiler).name} failed on {source.name}: {first}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _load(name: str, compiler: str) -> ctypes.CDLL:
    """The cached library, built if missing, and built again if the cached file does not load
    (truncated by a full disk or a crash: it would otherwise stay broken)."""
    target = _target(name, compiler)
    if target.exists():
        try:
            return ctypes.CDLL(str(target))
        except OSError:
            target.unlink(missing_ok=True)
    _build(name, compiler, target)
    return ctypes.CDLL(str(target))


def library(name: str) -> ctypes.CDLL | None:
    """The kernel library ``csrc/<name>.c``, built if needed; None where it cannot be had."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    if os.environ.get("GAM_NATIVE", "1") == "0":
        _reasons[name] = "GAM_NATIVE=0"
    elif (compiler := _compiler()) is None:
        _reasons[name] = f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
    else:
        try:
            lib = _load(name, compiler)
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _reasons[name] = f"could not build {name}: {err}"
    if lib is None and _reasons[name] != "GAM_NATIVE=0":  # once a process; slower, not wrong
        warnings.warn(f"gam: the C kernel {name} is unavailable ({_reasons[name]}); the PyTorch forms run instead",
                      RuntimeWarning, stacklevel=2)
    _loaded[name] = lib
    return lib


def unavailable_reason(name: str) -> str | None:
    """Why :func:`library` returned None for ``name`` (None if it loaded or was not tried)."""
    return _reasons.get(name)
