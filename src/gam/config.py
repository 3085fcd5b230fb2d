"""One configuration dataclass for every model in the project.

As in the paper's benchmark script, GAM, the Transformer and Mamba share one
config: each model reads the fields that apply to it and ignores the rest, so a
comparison changes a single field (``model``) and nothing else.

The official code's ``ModelConfig`` spells its fields in upper case
(``VOCAB_SIZE``, ``N_EMBED``, ...) and its README a second way (``n_embed``).
Both spellings are accepted as keyword arguments and as attributes, so the
paper's minimal example runs with only its import line changed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODELS = ("gam", "transformer", "mamba")
GAM_VARIANTS = ("full", "sum_fusion", "global_only", "local_only")
GAM_MEMORIES = ("static", "causal", "kv_slots")
GAM_IMPLS = ("auto", "reference", "fast")
POS_EMBEDDINGS = ("learned", "none")
ATTN_IMPLS = ("sdpa", "naive")
MAMBA_WIRINGS = ("standard", "paper")
MAMBA_BACKENDS = ("auto", "torch", "cuda")

# Other spellings of our field names: the official ModelConfig (upper case)
# and the official README's GAMConfig (``n_embed``).
ALIASES = {
    "VOCAB_SIZE": "vocab_size",
    "BLOCK_SIZE": "block_size",
    "N_EMBED": "n_embd",
    "n_embed": "n_embd",
    "N_EMBD": "n_embd",
    "N_LAYER": "n_layer",
    "N_HEAD": "n_head",
    "DROPOUT": "dropout",
    "NUM_MEMORY_SLOTS": "num_memory_slots",
    "CONV_KERNEL_SIZE": "conv_kernel_size",
}


class ConfigError(ValueError):
    """A configuration value or field name is invalid."""


@dataclass(init=False)
class GAMConfig:
    """Hyper-parameters of GAM, Transformer and Mamba language models.

    Defaults are the paper's configuration (vocab 10,000, context 256, width
    512, 6 layers, 512 memory slots, kernel 3, 8 heads, Mamba d_state 16 /
    d_conv 4 / expand 3).
    """

    model: str = "gam"  # which mixer fills the blocks: gam | transformer | mamba
    vocab_size: int = 10000
    block_size: int = 256  # longest sequence with learned positions
    n_embd: int = 512
    n_layer: int = 6
    n_head: int = 8  # Transformer only
    dropout: float = 0.1
    pos_embedding: str = "learned"  # "learned" (paper) or "none" (no length limit)
    # std of the learned positions at init. 1.0 is nn.Embedding's N(0, 1), as the
    # official code; at small width it drowns the tied token embedding (about
    # 1/sqrt(3 n_embd) per entry) for the first few hundred steps, so the cpu
    # preset uses 0.02 (GPT-2's). Scaling the N(0, 1) draw keeps the RNG stream.
    pos_init_std: float = 1.0
    # GAM
    num_memory_slots: int = 512
    conv_kernel_size: int = 3
    variant: str = "full"  # paper ablations: full | sum_fusion | global_only | local_only
    # static (paper: fixed bank) | causal (tokens write into tied slots) | kv_slots (key and
    # value slots written together: gam.layers.kv_memory)
    memory: str = "static"
    memory_heads: int = 4  # kv_slots only: heads of the key-value slot memory (n_embd / heads features)
    gam_impl: str = "auto"  # auto | reference (paper's eager code, block and loss) | fast (fused ops, same function)
    # Transformer
    attn_impl: str = "sdpa"  # sdpa (fused kernel) | naive (materialized mask, as the paper)
    # Mamba
    d_state: int = 16
    d_conv: int = 4
    expand: int = 3
    mamba_wiring: str = "standard"  # standard (pre-norm residual) | paper (bare mixers)
    mamba_backend: str = "auto"  # auto | torch | cuda (mamba-ssm kernels)

    def __init__(self, **fields: Any) -> None:
        known = {f.name: f for f in dataclasses.fields(self)}
        values = {name: f.default for name, f in known.items()}
        for key, value in fields.items():
            name = ALIASES.get(key, key)
            if name not in known:
                raise ConfigError(
                    f"unknown config field {key!r}; known fields: {', '.join(known)}"
                )
            values[name] = value
        for name, value in values.items():
            setattr(self, name, value)
        self.validate()

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: map the official spellings.
        alias = ALIASES.get(name)
        if alias is None:
            raise AttributeError(f"{type(self).__name__!s} has no field {name!r}")
        return getattr(self, alias)

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}",
            )

        def choice(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            need(value in options, f"{name} must be one of {options}, got {value!r}")

        choice("model", MODELS)
        for name in ("vocab_size", "block_size", "n_embd", "n_layer", "n_head",
                     "num_memory_slots", "memory_heads", "d_state", "d_conv", "expand"):
            positive_int(name)
        need(
            isinstance(self.conv_kernel_size, int) and self.conv_kernel_size >= 1,
            f"conv_kernel_size must be an integer >= 1, got {self.conv_kernel_size!r}",
        )
        need(
            isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
            f"dropout must be in [0, 1), got {self.dropout!r}",
        )
        choice("pos_embedding", POS_EMBEDDINGS)
        need(
            isinstance(self.pos_init_std, (int, float)) and not isinstance(self.pos_init_std, bool)
            and 0.0 < self.pos_init_std < float("inf"),
            f"pos_init_std must be a positive number, got {self.pos_init_std!r}",
        )
        choice("variant", GAM_VARIANTS)
        choice("memory", GAM_MEMORIES)
        need(not (self.memory != "static" and self.variant == "local_only"),
             f"memory={self.memory!r} needs the memory path; variant 'local_only' has none")
        if self.model == "gam" and self.memory == "kv_slots":
            need(self.n_embd % self.memory_heads == 0,
                 f"n_embd ({self.n_embd}) must be divisible by memory_heads ({self.memory_heads})")
        choice("gam_impl", GAM_IMPLS)
        choice("attn_impl", ATTN_IMPLS)
        choice("mamba_wiring", MAMBA_WIRINGS)
        choice("mamba_backend", MAMBA_BACKENDS)
        if self.model == "transformer":
            need(
                self.n_embd % self.n_head == 0,
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
            )

    @property
    def max_seq_len(self) -> int | None:
        """Longest input the model accepts, or None when unlimited."""
        return self.block_size if self.pos_embedding == "learned" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GAMConfig":
        return cls(**data)

    def replace(self, **changes: Any) -> "GAMConfig":
        return type(self)(**{**self.to_dict(), **changes})


def ModelConfig(**fields: Any) -> GAMConfig:  # noqa: N802 - the official code's name
    """The official code's config name; takes its upper-case fields."""
    return GAMConfig(**fields)
