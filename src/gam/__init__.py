"""gam: Gated Associative Memory (Acharya, 2025) and its baselines in PyTorch."""

from gam.config import ConfigError, GAMConfig, ModelConfig
from gam.models.lm import DecoderLM, GAM_Model, GAMModel, build_model, count_parameters

__version__ = "0.1.0"

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
