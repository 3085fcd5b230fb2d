"""gam: Gated Associative Memory (Acharya, 2025) and its baselines in PyTorch."""

from gam.config import ConfigError, GAMConfig, ModelConfig

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

__all__ = [
    "ConfigError",
    "DecoderLM",
    "GAMConfig",
    "GAMModel",
    "GAM_Model",
    "ModelConfig",
    "build_model",
    "count_parameters",
]

# The models import torch (a second or two); load them on first use so that
# `import gam.config` and `gam --help` stay fast.
_MODEL_NAMES = ("DecoderLM", "GAMModel", "GAM_Model", "build_model", "count_parameters")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from gam.models import lm

        return getattr(lm, name)
    raise AttributeError(f"module 'gam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODEL_NAMES})
