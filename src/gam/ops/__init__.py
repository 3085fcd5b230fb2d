"""Low-level ops (pure PyTorch, with optional CUDA-kernel dispatch).

Submodules are imported on demand; this package only re-exports the selective scan, which has
no heavy dependencies (mamba-ssm is imported lazily, only when a CUDA scan is requested).
"""

from gam.ops.selective_scan import selective_scan, selective_scan_fn, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_fn", "selective_scan_ref"]
