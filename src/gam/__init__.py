"""gam: Gated Associative Memory (Acharya, 2025) and its baselines in PyTorch."""

from gam.config import ConfigError, GAMConfig, ModelConfig

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

# The model classes import torch (seconds). They load on first use, so that
# ``gam`` commands start inside their own error handling: a Ctrl-C while torch
# loads is a one-line "interrupted", not a traceback from the import.
_FROM_LM = ("DecoderLM", "GAM_Model", "GAMModel", "build_model", "count_parameters")


def __getattr__(name: str):
    if name in _FROM_LM:
        from gam.models import lm

        value = getattr(lm, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gam' has no attribute {name!r}")


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


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_LM})
