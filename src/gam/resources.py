"""Resource limits checked before allocating: a model that cannot fit is refused
with one line instead of dying in the allocator; and the host allocator set up for
training on a CPU (:func:`tune_cpu_allocator`)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from gam.config import ConfigError, GAMConfig
from gam.models.lm import DecoderLM


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on ``device`` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts reclaimable page cache, unlike the free page count
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def parameter_count(config: GAMConfig) -> int | None:
    """Parameters of ``DecoderLM(config)``, counted on the meta device (nothing
    allocated); None when the sizes overflow what a tensor can hold."""
    try:
        with torch.device("meta"):
            model = DecoderLM(config)
    except RuntimeError as err:
        if "overflow" in str(err):
            return None
        raise
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_fits_in_memory(config: GAMConfig, device: torch.device, bytes_per_parameter: int = 4) -> None:
    """Refuse a model whose parameters alone exceed the memory available on ``device``."""
    count = parameter_count(config)
    if count is None:
        raise ConfigError(f"model too large: its tensor sizes overflow (n_embd {config.n_embd}, "
                          f"vocab_size {config.vocab_size}, n_layer {config.n_layer})")
    need = count * bytes_per_parameter
    free = available_memory(device)
    if free is not None and need > free:
        raise ConfigError(f"model too large: its {count:,} parameters need {need / 2**30:,.1f} GiB "
                          f"(training needs about 4x that), but {device} has {free / 2**30:,.1f} GiB available")


_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    PyTorch's CPU allocator does not cache: every large activation is a fresh
    ``malloc``, which glibc serves with ``mmap`` and page-faults in on first
    touch (several ms per training step: at the cpu preset's size 1.08-1.17x the
    tokens/s with it, four models, docs/speed.md "Recommended settings"). Raising the mmap and trim
    thresholds lets the heap reuse freed blocks. Process-wide and glibc only, so
    the command line calls it (`gam train`, `gam bench`), never an import; returns
    whether it took effect."""
    global _allocator_tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    _allocator_tuned = bool(ok and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1) or _allocator_tuned
    return _allocator_tuned


def cpu_allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` took effect in this process."""
    return _allocator_tuned
