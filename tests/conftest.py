"""Shared by the test modules: the tiny model settings, a one-thread fixture, the bf16 comparison."""

import pytest
import torch

from gam import build_model

# Tiny enough that a forward pass takes microseconds; every model type accepts it.
TINY = dict(vocab_size=61, block_size=16, n_embd=16, n_layer=2, n_head=4,
            num_memory_slots=8, conv_kernel_size=3, dropout=0.0, d_state=4, expand=2)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids thread-pool contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name, **fields):
    """A tiny model in eval mode, the same weights on every call."""
    torch.manual_seed(0)
    return build_model(name, **{**TINY, **fields}).eval()


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of (a - b) over RMS of b (b: the fp32/fp64 reference): how bf16 results are compared."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()
