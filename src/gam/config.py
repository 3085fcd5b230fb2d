"""The configuration dataclasses: GAMConfig (one for every model in the
project) and TrainConfig (how to train), with the training presets.

This module imports no torch, so the command line can describe every field
(``gam train --help``) without loading it.

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
import math
from dataclasses import dataclass
from typing import Any

MODELS = ("gam", "transformer", "mamba")
GAM_VARIANTS = ("full", "sum_fusion", "global_only", "local_only")
GAM_MEMORIES = ("static", "kv_slots")
MEMORY_WRITES = ("slots", "delta")
FEATURE_MAPS = ("none", "swish")
KEY_SOURCES = ("conv", "input", "shift")
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


def described(default: Any, meaning: str, *, choices: tuple[str, ...] | None = None,
              flag: str | None = None) -> Any:
    """A dataclass field with its one-line meaning: the single place ``gam train
    --help``, ``gam bench NAME --help`` and docs/cli.md take each field's description
    from. ``choices``: the values the command line accepts; ``flag``: its option name
    where that is not ``--field-name``."""
    metadata: dict[str, Any] = {"help": meaning}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if flag is not None:
        metadata["flag"] = flag
    return dataclasses.field(default=default, metadata=metadata)


def field_meaning(field: dataclasses.Field) -> str:
    return field.metadata["help"]


@dataclass(init=False)
class GAMConfig:
    """Hyper-parameters of GAM, Transformer and Mamba language models.

    Defaults are the paper's configuration (vocab 10,000, context 256, width
    512, 6 layers, 512 memory slots, kernel 3, 8 heads, Mamba d_state 16 /
    d_conv 4 / expand 3).
    """

    model: str = described("gam", "which mixer fills the blocks: gam | transformer | mamba")
    vocab_size: int = described(10000, "tokenizer vocabulary size (and embedding rows)")
    block_size: int = described(256, "training context length; the longest input with learned positions")
    n_embd: int = described(512, "model width (embedding size)")
    n_layer: int = described(6, "number of blocks")
    n_head: int = described(8, "attention heads (Transformer only)")
    dropout: float = described(0.1, "dropout probability, in [0, 1)")
    pos_embedding: str = described("learned", "positions: learned (paper) | none (no length limit)")
    # 1.0 is nn.Embedding's N(0, 1), as the official code; at small width it
    # drowns the tied token embedding (about 1/sqrt(3 n_embd) per entry) for the
    # first few hundred steps, so the cpu preset uses 0.02 (GPT-2's). Scaling the
    # N(0, 1) draw keeps the RNG stream.
    pos_init_std: float = described(1.0, "std of the learned position embeddings at init")
    # GAM
    num_memory_slots: int = described(512, "GAM: slots in the global memory bank (kv_slots: per head)")
    conv_kernel_size: int = described(3, "GAM: width of the causal local convolution")
    variant: str = described("full", "GAM paper ablations: full | sum_fusion | global_only | local_only")
    memory: str = described("static", "GAM memory: static (paper: fixed bank) | kv_slots (key and value "
                                      "slots written together)")
    memory_heads: int = described(4, "GAM kv_slots memory: heads (n_embd / heads features each)")
    # Design choices of the kv-slot memory, fields so that each can be ablated (docs/kv-memory.md)
    memory_key_source: str = described("conv", "GAM kv_slots: what the keys read: conv (the local path's "
                                               "output) | input (the token's own h) | shift (the previous token's h)")
    memory_gate_normalizer: float = described(1.0, "GAM kv_slots: the forget gate is sigmoid(z)^(1/this) (GSA: 8; "
                                                   "1 measured better on text)")
    memory_output_gate: bool = described(False, "GAM kv_slots: the read times swish(W_g h) before the output "
                                                "projection, as GSA")
    memory_write: str = described("slots", "GAM kv_slots: the write rule: slots (gated slot writes, GSA) | "
                                           "delta (one matrix per head, the gated delta rule; no bank)")
    memory_retention_min: float = described(4.0, "GAM kv_slots: initial retention 1 / (1 - alpha) of the "
                                                 "shortest-lived slot (or head, delta), in tokens")
    memory_retention_max: float = described(256.0, "GAM kv_slots: initial retention of the longest-lived one; "
                                                   "the others log-spaced between")
    memory_feature_map: str = described("none", "GAM kv_slots: a map on the queries and keys before the memory: "
                                                "none | swish (GSA's default)")
    gam_impl: str = described("auto", "GAM code path: auto | reference (paper's eager code) | fast (fused ops, same function)")
    # Transformer
    attn_impl: str = described("sdpa", "Transformer attention: sdpa (fused kernel) | naive (materialized mask, as the paper)")
    # Zoology's attention baseline puts a short convolution in front of attention: the previous
    # tokens' features then reach each key without an induction head learned through positions.
    attn_short_conv: int = described(0, "Transformer: kernel of a causal depthwise convolution on the "
                                        "attention input, added to it (Zoology's hybrid); 0: none")
    # Mamba
    d_state: int = described(16, "Mamba: SSM state size per channel")
    d_conv: int = described(4, "Mamba: width of the causal convolution")
    expand: int = described(3, "Mamba: inner width / n_embd")
    mamba_wiring: str = described("standard", "Mamba blocks: standard (pre-norm residual) | paper (bare mixers)")
    mamba_backend: str = described("auto", "Mamba kernels: auto | torch | cuda (mamba-ssm)")

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
        need(self.memory != "causal", "memory='causal' (tied slots) was removed: it did not recall "
             "(docs/kv-memory.md); memory='kv_slots' is the writable memory")
        choice("memory", GAM_MEMORIES)
        need(not (self.memory != "static" and self.variant == "local_only"),
             f"memory={self.memory!r} needs the memory path; variant 'local_only' has none")
        if self.model == "gam" and self.memory == "kv_slots":
            need(self.n_embd % self.memory_heads == 0,
                 f"n_embd ({self.n_embd}) must be divisible by memory_heads ({self.memory_heads})")
        choice("memory_key_source", KEY_SOURCES)
        choice("memory_write", MEMORY_WRITES)
        need(isinstance(self.memory_gate_normalizer, (int, float)) and not isinstance(self.memory_gate_normalizer, bool)
             and 0.0 < self.memory_gate_normalizer < float("inf"),
             f"memory_gate_normalizer must be a positive number, got {self.memory_gate_normalizer!r}")
        need(isinstance(self.memory_output_gate, bool),
             f"memory_output_gate must be true or false, got {self.memory_output_gate!r}")
        choice("memory_feature_map", FEATURE_MAPS)
        retention = (self.memory_retention_min, self.memory_retention_max)
        need(all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in retention)
             and 1.0 < self.memory_retention_min <= self.memory_retention_max < float("inf"),
             f"memory_retention_min and memory_retention_max must satisfy 1 < min <= max (tokens), got {retention!r}")
        choice("gam_impl", GAM_IMPLS)
        choice("attn_impl", ATTN_IMPLS)
        choice("mamba_wiring", MAMBA_WIRINGS)
        choice("mamba_backend", MAMBA_BACKENDS)
        need(isinstance(self.attn_short_conv, int) and not isinstance(self.attn_short_conv, bool)
             and self.attn_short_conv >= 0,
             f"attn_short_conv must be an integer >= 0, got {self.attn_short_conv!r}")
        need(self.model == "transformer" or self.attn_short_conv == 0,
             f"attn_short_conv is a Transformer option; model {self.model!r} has its own convolution")
        if self.model == "transformer":
            need(
                self.n_embd % self.n_head == 0,
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
            )

    @property
    def max_seq_len(self) -> int | None:
        """Longest input the model accepts, or None when unlimited."""
        return self.block_size if self.pos_embedding == "learned" else None

    def receptive_field(self) -> int | None:
        """Input positions an output position can depend on, by design: the paper's GAM
        sees 1 + n_layer (k - 1) tokens (only its convolution moves information between
        positions; Global Only, with no convolution, sees its own token); None where every
        earlier token can matter (the kv-slot memory, the Transformer, Mamba). The one
        formula the analysis, the evaluation by position and the benchmarks use."""
        if self.model != "gam" or self.memory != "static":
            return None
        if self.variant == "global_only":
            return 1
        return 1 + self.n_layer * (self.conv_kernel_size - 1)

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


PRECISIONS = ("fp32", "bf16", "fp16")
LOGGERS = ("none", "wandb", "tensorboard")
DATA_SOURCES = ("auto", "hub", "shipped")
TOKENIZER_KINDS = ("bytelevel", "paper")  # what gam.tokenizer trains


@dataclass
class TrainConfig:
    """How to train (the model's shape lives in GAMConfig)."""

    data: str = described("wikitext2", "wikitext2 | tinystories | a .txt/.txt.gz/.jsonl/.parquet file or folder")
    data_source: str = described("auto", "where named data comes from: auto (hub, else shipped copy) | hub | shipped")
    train_rows: int | None = described(50_000, "keep the first N train rows (the paper: 50,000); none = all")
    valid_rows: int | None = described(5_000, "keep the first N validation rows (the paper: 5,000); none = all")
    tokenizer: str = described("bytelevel", "bytelevel (byte-level BPE, round-trips any text) | paper (the paper's "
                                             "recipe, does not round-trip)")
    batch_size: int = described(32, "global batch in sequences (all processes, all accumulation steps)")
    grad_accum: int = described(1, "micro-batches accumulated per optimizer step")
    epochs: int = described(5, "passes over the training data (max_steps wins when set)")
    max_steps: int | None = described(None, "stop after this many optimizer steps (overrides epochs)")
    lr: float = described(3e-4, "peak learning rate (AdamW)")
    min_lr: float = described(0.0, "learning rate at the end of the cosine decay")
    beta1: float = described(0.9, "AdamW beta1")
    beta2: float = described(0.95, "AdamW beta2")
    weight_decay: float = described(0.1, "AdamW weight decay (matrices only)")
    warmup_steps: int = described(100, "linear learning-rate warm-up steps")
    grad_clip: float = described(1.0, "clip the gradient norm to this; 0 = no clipping")
    precision: str = described("fp32", "fp32 | bf16 | fp16 (fp16: CUDA with GradScaler)")
    compile: bool = described(False, "torch.compile the model")
    seed: int = described(0, "seed for initialization, data order and dropout")
    device: str = described("auto", "auto | cpu | cuda | cuda:N")
    eval_batch_size: int = described(32, "sequences per evaluation batch")
    eval_every: int | None = described(None, "optimizer steps between evaluations; none = once per epoch")
    save_every: int | None = described(None, "optimizer steps between checkpoints; none = at the end (and on Ctrl-C)")
    log_every: int = described(10, "optimizer steps between lines in metrics.jsonl")
    logger: str = described("none", "also log to: none | wandb | tensorboard")
    threads: int | None = described(None, "torch CPU threads; none = torch's choice")

    def __post_init__(self) -> None:
        # Checked where the config is made, so gam train, train() and the benches refuse the same values.
        self.validate()

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "epochs", "eval_batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        check_threads(self.threads)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not self._finite("lr") > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            if self._finite(name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= self._finite(name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr:g}) must not exceed lr ({self.lr:g}): the schedule decays "
                              "from lr to min_lr")
        if self.logger not in LOGGERS:
            raise ConfigError(f"logger must be none, wandb or tensorboard, got {self.logger!r}")
        if self.data_source not in DATA_SOURCES:
            raise ConfigError(f"data_source must be auto, hub or shipped, got {self.data_source!r}")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer must be bytelevel or paper, got {self.tokenizer!r}")

    def _finite(self, name: str) -> float:
        value = getattr(self, name)
        if not is_number(value) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_threads(threads: Any, name: str = "threads") -> None:
    """None (the library's choice) or a positive integer: the check of every command that sets CPU threads."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"{name} must be an integer >= 1 (or none: torch's choice), got {threads!r}")


# What --resume does with a training field whose value differs from the run's saved
# one (docs/reliability.md). Every model field is refused too: the weights have that
# shape. A field not given keeps the run's value; one given with the run's value is fine.
RESUME_REFUSED = frozenset({"data", "data_source", "train_rows", "valid_rows", "tokenizer", "batch_size",
                            "grad_accum", "seed"})  # the data and its order: changing them makes a different run
# What every step computes: refused, unless named in ``allow_change`` (--allow-change), as a
# lower --lr after a divergence. A re-run command that differs here by mistake must not pass.
RESUME_ON_REQUEST = frozenset({"lr", "min_lr", "beta1", "beta2", "weight_decay", "warmup_steps", "grad_clip",
                               "precision"})
RESUME_NOTICED = frozenset({"max_steps", "epochs", "eval_batch_size", "eval_every", "save_every",
                            "log_every"})  # where the run ends, how often it reports: applied, with a notice
RESUME_SILENT = frozenset({"device", "threads", "logger", "compile"})  # where it runs, not what it computes
# Never compared: the run's saved tokenizer decides the vocabulary (a request of 8192 may give fewer tokens).
RESUME_NOT_COMPARED = frozenset({"vocab_size"})
# Not a field: --allow-change corpus continues a run on data whose content changed since the run
# read it (refused otherwise); the change is recorded in the run's checkpoints.
ALLOW_DATA_CHANGE = "corpus"


# Presets: the paper's exact hyper-parameters, and a small CPU configuration
# that learns something real on 2 cores in a few minutes.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "paper": (
        dict(vocab_size=10000, block_size=256, n_embd=512, n_layer=6, n_head=8, dropout=0.1,
             num_memory_slots=512, conv_kernel_size=3),
        dict(batch_size=32, epochs=5, lr=3e-4, warmup_steps=100, tokenizer="paper"),
    ),
    "cpu": (
        dict(vocab_size=8192, block_size=128, n_embd=192, n_layer=4, n_head=6, dropout=0.0, pos_init_std=0.02,
             num_memory_slots=128, conv_kernel_size=3, expand=2),
        dict(batch_size=16, epochs=1, max_steps=600, lr=2e-3, warmup_steps=50,
             eval_batch_size=64, precision="bf16", log_every=25, train_rows=None, valid_rows=None),
    ),
}


def preset(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(GAMConfig fields, TrainConfig fields) of a named preset; copies, safe to change."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    model_fields, train_fields = PRESETS[name]
    return dict(model_fields), dict(train_fields)
