"""Training and evaluation: one flat loop for GAM, Transformer and Mamba.

    data -> tokenizer -> token blocks -> AdamW (warm-up + cosine) -> checkpoints

Runs on CPU or GPU, in fp32, bf16 or fp16 autocast, on one process or many
(``torchrun``: DistributedDataParallel, gloo on CPU, NCCL on GPU). A run
interrupted at any point (Ctrl-C, SIGTERM, SIGHUP, a crash) resumes from its last
checkpoint and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gam.checkpoint import CheckpointError, RunLock, load_checkpoint, remove_stale_temporaries, save_checkpoint
from gam.config import (
    ALLOW_DATA_CHANGE,
    RESUME_NOT_COMPARED,
    RESUME_NOTICED,  # noqa: F401 - gam.train's API, as TrainConfig and preset
    RESUME_ON_REQUEST,
    RESUME_REFUSED,
    RESUME_SILENT,
    ConfigError,
    GAMConfig,
    TrainConfig,
    preset,  # noqa: F401
)
from gam.fileio import atomic_write
from gam.models.lm import DecoderLM
from gam.resources import check_fits_in_memory


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up for ``warmup_steps``, then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- setup

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but CUDA is not available")
        if name == "cuda":  # torch.cuda.set_device needs an index
            name = f"cuda:{d.local_rank if d.world > 1 else torch.cuda.current_device()}"
        torch.cuda.set_device(torch.device(name))
    elif name != "cpu":
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name; None for fp32 (no autocast)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs CUDA (it uses a GradScaler); use bf16 on CPU")
    return torch.autocast(device.type, dtype=precision_dtype(precision))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW; the project's one weight-decay rule: every matrix decays (dim >= 2: linear
    and convolution weights, embeddings, GAM's memory bank), nothing else does (biases,
    norm weights, other 1-D parameters). ``fused``: one kernel over all parameters
    (on CPU ~4x faster than PyTorch's default foreach implementation)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if fused else {}))


class TrainingStep:
    """One optimizer step as ``gam train`` takes it, for the trainer and every benchmark.

    ``backward(inputs, targets)``: the loss under the run's autocast, its gradient
    (scaled for fp16); ``update(step)``: the learning rate of ``step`` (``lr_at``:
    warm-up, cosine to ``min_lr``; ``min_lr == lr`` keeps it constant), gradient
    clipping at ``grad_clip``, AdamW (:func:`make_optimizer`), gradients cleared.
    ``__call__`` does both. What a caller may vary is a parameter, never a copy:

    - ``forward``: the module that computes the loss (a ``torch.compile`` or DDP
      wrapper of ``model``; default ``model``);
    - ``fused_optimizer``: default fused AdamW on CPU and CUDA, as the trainer;
    - ``full_logits``: compute the logits and then the loss (the paper's code)
      instead of the head fused into the loss. Targets of -100 count in neither.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, total_steps: int, *,
                 forward: torch.nn.Module | None = None, fused_optimizer: bool | None = None,
                 full_logits: bool = False) -> None:
        self.model, self.cfg, self.device, self.total_steps = model, cfg, torch.device(device), total_steps
        self.forward = forward if forward is not None else model
        if fused_optimizer is None:
            fused_optimizer = self.device.type in ("cpu", "cuda")
        self.optimizer = make_optimizer(model, cfg, fused=fused_optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.full_logits = full_logits

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.cfg.precision, self.device):
            return self.forward(inputs, targets, return_logits=self.full_logits)[1]

    def backward(self, inputs: torch.Tensor, targets: torch.Tensor, accumulation: int = 1) -> torch.Tensor:
        """Accumulate the gradient of the loss / ``accumulation`` (one of that many micro-batches
        of a step); returns the loss, detached."""
        loss = self.loss(inputs, targets)
        self.scaler.scale(loss / accumulation).backward()
        return loss.detach()

    def update(self, step: int) -> float:
        """Clip, AdamW step at the learning rate of ``step``, clear gradients; returns that rate."""
        lr = lr_at(step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def __call__(self, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.backward(inputs, targets)
        self.update(step)
        return loss


# ----------------------------------------------------------------------------- data

def batches(tokens: np.ndarray, block_size: int, order: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows ``order[start:start+count]`` as a (count, block_size+1) int64 tensor.

    Blocks are non-overlapping slices of block_size+1 tokens, as the paper cut
    them: inputs are ``[:, :-1]`` and targets ``[:, 1:]``.
    """
    n = block_size + 1
    rows = order[start:start + count].tolist()
    return torch.from_numpy(np.stack([np.asarray(tokens[i * n:(i + 1) * n], dtype=np.int64) for i in rows]))


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int,
             device: torch.device, precision: str, d: Dist | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Mean cross-entropy over every validation block, in order (deterministic).

    It takes tens of seconds to minutes on a CPU: a progress bar on a terminal, a line every
    GAM_PROGRESS_SECONDS in a log (gam.progress). ``should_stop``, asked before each batch:
    when it answers True the pass is abandoned (:class:`Interrupted`), so a stop asked for
    during a long evaluation is not held up by it."""
    from gam.progress import progress

    d = d or Dist()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluation batch size must be an integer >= 1, got {batch_size!r}")
    n_blocks = len(tokens) // (block_size + 1)
    if n_blocks == 0:
        raise ValueError(f"validation data has {len(tokens)} tokens, fewer than one block of {block_size + 1}")
    was_training = model.training
    model.eval()
    order = torch.arange(n_blocks)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = torch.zeros((), dtype=torch.float64, device=device)
    for start in progress(range(d.rank * batch_size, n_blocks, batch_size * d.world), "evaluating", rank=d.rank):
        if should_stop is not None and should_stop():
            model.train(was_training)
            raise Interrupted()
        xy = batches(tokens, block_size, order, start, batch_size).to(device)
        with autocast_context(precision, device):
            logits, _ = model(xy[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten(), reduction="sum")
        total_loss += loss.double()
        total_tokens += xy[:, 1:].numel()
    if d.world > 1:
        dist.all_reduce(total_loss)
        dist.all_reduce(total_tokens)
    model.train(was_training)
    val_loss = (total_loss / total_tokens).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "tokens": int(total_tokens.item())}


def unigram_perplexity(train_tokens: np.ndarray, valid_tokens: np.ndarray, vocab_size: int,
                       block_size: int) -> float:
    """Perplexity of a unigram model (add-one smoothing) fitted on the training
    tokens, scored on exactly the targets ``evaluate`` scores. A trained model
    must beat it to have learned anything beyond token frequencies."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    n = block_size + 1
    n_blocks = len(valid_tokens) // n
    targets = np.asarray(valid_tokens[: n_blocks * n], dtype=np.int64).reshape(n_blocks, n)[:, 1:]
    return float(np.exp(-log_probs[targets].mean()))


# ----------------------------------------------------------------------------- logging

class MetricsLog:
    """metrics.jsonl on rank 0, plus W&B or TensorBoard when asked for."""

    def __init__(self, run_dir: Path, logger: str, enabled: bool, run_config: dict[str, Any]):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.backend: Any = None
        if not enabled or logger == "none":
            return
        if logger == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("--logger wandb asked for, but wandb is not installed (pip install wandb)") from None
            self.backend = wandb.init(project="gam", config=run_config, dir=str(run_dir))
        else:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "--logger tensorboard asked for, but tensorboard is not installed (pip install tensorboard)"
                ) from None
            self.backend = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.backend is None:
            return
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if hasattr(self.backend, "log"):
            self.backend.log(numbers, step=record.get("step"))
        else:
            for key, value in numbers.items():
                self.backend.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        if self.backend is not None:
            (self.backend.finish if hasattr(self.backend, "finish") else self.backend.close)()


# ----------------------------------------------------------------------------- the run

class Interrupted(Exception):
    """A stop was asked for (a signal, or ``stop_after``): save at the step boundary and return."""


# What ends runs in practice: Ctrl-C, a scheduler's or the system's SIGTERM, a closed terminal's SIGHUP.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    stop_signal: int | None = None  # the signal that stopped an interrupted run (None: stop_after)
    already_finished: bool = False  # a resume of a run that had reached its end: nothing was done
    resume_command: str | None = None  # printed when interrupted


def resume_settings(ckpt, model_config: GAMConfig, cfg: TrainConfig, explicit: Mapping[str, str] | set[str] | None,
                    say: Callable[[str], None], allow_change: Iterable[str] = ()) -> tuple[GAMConfig, TrainConfig]:
    """The run's saved configuration, with the explicitly given fields applied or refused.

    ``explicit`` names the fields the caller gave on purpose (the command line's
    flags, and the fields of a --preset given again); a mapping says where each
    came from (``{"lr": "--preset cpu"}``), for the messages. None means every
    field of ``model_config`` and ``cfg``. A field whose value equals the run's
    passes; a change is applied or refused by the ``RESUME_*`` sets, and the
    refusal names every changed field with the run's value and the new one.
    """
    saved_model = ckpt.model_config
    try:
        saved_cfg = TrainConfig(**ckpt.info["train_config"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{ckpt.path}: bad train config ({err})") from None
    model_names = {f.name for f in dataclasses.fields(GAMConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    if explicit is None:
        explicit = model_names | train_names
    origin = dict(explicit) if isinstance(explicit, Mapping) else {name: "" for name in explicit}
    allow_change = set(allow_change)

    def change(name: str, old: Any, new: Any) -> str:
        return f"{name} {old!r} -> {new!r}" + (f" ({origin[name]})" if origin.get(name) else "")

    refused, on_request, changes, notices = [], [], {}, []
    for name in sorted((origin.keys() & model_names) - RESUME_NOT_COMPARED):
        if getattr(model_config, name) != getattr(saved_model, name):
            refused.append(change(name, getattr(saved_model, name), getattr(model_config, name)))
    for name in sorted(origin.keys() & train_names):
        new, old = getattr(cfg, name), getattr(saved_cfg, name)
        if new == old:
            continue
        if name in RESUME_REFUSED:
            refused.append(change(name, old, new))
        elif name in RESUME_ON_REQUEST and name not in allow_change:
            refused.append(change(name, old, new))
            on_request.append(name)
        else:
            changes[name] = new
            if name not in RESUME_SILENT:
                notices.append(f"resume: {change(name, old, new)}, as given")
    if refused:
        how = f"; to apply {', '.join(on_request)} on purpose add --allow-change {','.join(on_request)}" \
            if on_request else ""
        raise ConfigError(f"--resume continues the run in {ckpt.path.parent} and cannot change "
                          f"{'; '.join(refused)}: give the run's values or drop those options, or start a new "
                          f"run with another --out{how}")
    for notice in notices:
        say(notice)
    cfg = dataclasses.replace(saved_cfg, **changes)
    cfg.validate()
    return saved_model, cfg


@dataclass
class Trainer:
    """What the phases of one run share: set-up fills it, the loop advances it."""

    run_dir: Path
    cfg: TrainConfig
    model_config: GAMConfig
    d: Dist
    device: torch.device
    data: Any
    say: Callable[[str], None]
    model: DecoderLM | None = None
    train_model: torch.nn.Module | None = None
    stepper: TrainingStep | None = None
    log: MetricsLog | None = None
    step: int = 0
    last_good: Path | None = None  # newest checkpoint whose weights gave a finite loss
    # {"epoch", "train_loss"} of the evaluation a stop abandoned just before the checkpoint resumed from
    evaluation_owed: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        return self.model_config.block_size

    @property
    def n_blocks(self) -> int:
        return len(self.data.train) // (self.block_size + 1)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_blocks // self.cfg.batch_size

    @property
    def total_steps(self) -> int:
        return self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch

    @property
    def micro(self) -> int:
        return self.cfg.batch_size // (self.d.world * self.cfg.grad_accum)

    def resume_command(self) -> str:
        import shlex

        return f"gam train --out {shlex.quote(str(self.run_dir))} --resume"


def train(model_config: GAMConfig, cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
          data=None, stop_after: int | None = None, print_fn: Callable[[str], None] = print,
          explicit: Mapping[str, str] | set[str] | None = None, allow_change: Iterable[str] = ()) -> RunResult:
    """Train ``model_config`` with ``cfg``; checkpoints go to ``run_dir``.

    ``data`` is a prepared dataset (``gam.data.prepare_data``); None prepares
    ``cfg.data``. ``resume`` continues the run in ``run_dir`` with its saved
    configuration; ``explicit`` names the fields of ``model_config``/``cfg``
    given on purpose, which are applied or refused (see :func:`resume_settings`);
    ``allow_change`` names fields of ``RESUME_ON_REQUEST`` a resume may change.
    ``stop_after`` ends the run after that many optimizer steps as if
    interrupted (for tests of exact resume).
    """
    cfg.validate()
    run_dir = Path(run_dir)
    allow_change = set(allow_change)
    device_type = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    d = setup_distributed(device_type)
    device = pick_device(cfg.device, d)
    say = print_fn if d.main else (lambda *_: None)
    if resume and not run_dir.is_dir():  # checked before the lock, which would create the folder
        raise CheckpointError(f"{run_dir}: no such run folder to resume")
    lock = RunLock(run_dir).acquire() if d.main else None  # one writer per run folder, for the whole run
    try:
        if d.main:
            removed = remove_stale_temporaries(run_dir)
            if removed:
                say(f"removed what interrupted saves left in {run_dir}: {', '.join(removed)}")
        ckpt = None
        if resume:
            ckpt = load_checkpoint(run_dir)
            model_config, cfg = resume_settings(ckpt, model_config, cfg, explicit, say, allow_change)
        elif (run_dir / "latest").exists():
            raise ConfigError(f"{run_dir} already holds a run (latest: "
                              f"{(run_dir / 'latest').read_text(errors='replace').strip()}); continue it with "
                              "--resume, or choose another --out")
        if cfg.threads and device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        data, model_config, cfg = prepare(model_config, cfg, data, ckpt, say)
        data_changes = check_data_unchanged(ckpt, data, allow_change, say) if ckpt is not None else []
        t = Trainer(run_dir, cfg, model_config, d, device, data, say)
        if ckpt is not None and ckpt.step >= t.total_steps and "evaluation_owed" not in ckpt.info:
            say(f"{run_dir} is finished: step {ckpt.step} of {t.total_steps}; nothing to do "
                f"(to train further: {t.resume_command()} --max-steps N, N > {ckpt.step})")
            return RunResult(run_dir, ckpt.step, dict(ckpt.info.get("final_metrics") or {}), already_finished=True)
        build(t, fresh=ckpt is None)
        if ckpt is not None:
            restore(t, ckpt)
            accepted = ckpt.info.get("data_changes", []) + ([{"step": ckpt.step, "changes": data_changes}]
                                                             if data_changes else [])
            if accepted:  # every change continued on purpose, kept in each later checkpoint
                t.info["data_changes"] = accepted
            say(f"resuming from {ckpt.path} (step {ckpt.step})")
        else:
            torch.manual_seed(cfg.seed + d.rank)  # dropout masks differ across processes; the data order does not
        return run_loop(t, stop_after)
    finally:
        if lock is not None:
            lock.release()


def check_data_unchanged(ckpt, data, allow_change: set[str], say: Callable[[str], None]) -> list[str]:
    """What changed in the data since the run read it (:func:`gam.data.fingerprint_changes`):
    refused, unless ``allow_change`` names ``corpus``; then each change is said and returned."""
    from gam.data import fingerprint_changes

    changes = fingerprint_changes(ckpt.info.get("data_fingerprint"), data.fingerprint())
    if changes and ALLOW_DATA_CHANGE not in allow_change:
        raise ConfigError(f"--resume: the data changed since the run read it: {'; '.join(changes)}; resume on "
                          f"the data the run read, or continue on this data on purpose with --allow-change "
                          f"{ALLOW_DATA_CHANGE}")
    for change in changes:
        say(f"resume: continuing on changed data, as allowed: {change}")
    return changes


def copy_trained_on(info: dict[str, Any], source: str) -> str:
    """The ``data_source`` that reads a named corpus from the copy a run trained on, as its checkpoint
    records it: "shipped" or "hub" for "auto". A resume then continues on the same text (the hub and
    shipped copies differ), and a run trained on the shipped copy neither probes the hub nor warns."""
    used = str(info.get("data_source") or "")
    if source != "auto":
        return source
    return "shipped" if used.startswith("shipped:") else "hub" if used.startswith("hub:") else source


def prepare(model_config: GAMConfig, cfg: TrainConfig, data, ckpt,
            say: Callable[[str], None]) -> tuple[Any, GAMConfig, TrainConfig]:
    """The data (tokenized with the run's own tokenizer on resume), the model
    config with the tokenizer's vocabulary size, and the training config with
    the tokenizer kind the tokens come from."""
    if data is None:
        from gam.data import prepare_data

        extra = {"tokenizer": ckpt.tokenizer()} if ckpt is not None else {}
        source = cfg.data_source if ckpt is None else copy_trained_on(ckpt.info, cfg.data_source)
        data = prepare_data(cfg.data, block_size=model_config.block_size, vocab_size=model_config.vocab_size,
                            source=source, train_rows=cfg.train_rows, valid_rows=cfg.valid_rows,
                            tokenizer_kind=cfg.tokenizer, **extra)
    if data.tokenizer_kind != cfg.tokenizer:
        # Prepared data given by the caller, or a run saved before the field existed: record the
        # kind the tokens really come from.
        cfg = dataclasses.replace(cfg, tokenizer=data.tokenizer_kind)
    say(f"data: {data.source}; train {len(data.train):,} tokens, valid {len(data.valid):,} tokens")
    n_blocks = len(data.train) // (model_config.block_size + 1)
    if n_blocks < cfg.batch_size:
        raise ValueError(
            f"training data has {n_blocks} blocks of {model_config.block_size + 1} tokens, fewer than one batch "
            f"({cfg.batch_size}); use a smaller batch_size or block_size, or more data")
    vocab = data.tokenizer.get_vocab_size()
    if vocab != model_config.vocab_size:
        if ckpt is not None:
            raise CheckpointError(f"checkpoint vocab {model_config.vocab_size} != tokenizer vocab {vocab}")
        say(f"vocab_size follows the tokenizer: {vocab}")
        model_config = model_config.replace(vocab_size=vocab)
    return data, model_config, cfg


def build(t: Trainer, fresh: bool) -> None:
    """Model, optimizer, wrappers and the metrics log of a run (fresh weights); ``fresh``: a new run,
    not a resume."""
    cfg, d = t.cfg, t.d
    if cfg.batch_size % (d.world * cfg.grad_accum):
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                          f"({d.world} x {cfg.grad_accum})")
    check_fits_in_memory(t.model_config, t.device)
    torch.manual_seed(cfg.seed)
    t.model = DecoderLM(t.model_config).to(t.device)
    parameters = sum(p.numel() for p in {id(p): p for p in t.model.parameters()}.values())
    t.say(f"model {t.model_config.model}: {parameters:,} parameters; {t.total_steps} steps of "
          f"{cfg.batch_size} x {t.block_size} tokens ({t.steps_per_epoch} steps per epoch), "
          f"{cfg.precision} on {t.device}" + (f", {d.world} processes" if d.world > 1 else ""))
    t.train_model = t.model
    if cfg.compile:
        t.train_model = torch.compile(t.model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        t.train_model = DDP(t.train_model, device_ids=[t.device.index] if t.device.type == "cuda" else None)
    t.stepper = TrainingStep(t.model, cfg, t.device, t.total_steps, forward=t.train_model)
    t.info = {"train_config": dataclasses.asdict(cfg), "data_source": t.data.source,
              "data_fingerprint": t.data.fingerprint(), "unigram_ppl": None, "parameters": parameters}
    run_config = {"model": t.model_config.to_dict(), "train": dataclasses.asdict(cfg)}
    t.log = MetricsLog(t.run_dir, cfg.logger, d.main, run_config)  # may refuse (a logger not installed)
    if fresh and d.main and t.log.path.exists():
        t.log.path.unlink()  # what a run killed before its first checkpoint logged; resume: restore() replaces it


def restore(t: Trainer, ckpt) -> None:
    """Weights, optimizer, RNG, step and metrics log of the checkpoint a run resumes."""
    state = ckpt.trainer_state()
    ckpt.load_weights(t.model)
    try:
        t.stepper.optimizer.load_state_dict(state["optimizer"])
        t.step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{ckpt.path}/trainer_state.pt does not fit this run "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    for group in t.stepper.optimizer.param_groups:  # load_state_dict brought back the saved values; a resume may change them
        group["betas"] = (t.cfg.beta1, t.cfg.beta2)
        if group["weight_decay"]:
            group["weight_decay"] = t.cfg.weight_decay
    if "scaler" in state and t.cfg.precision == "fp16":
        t.stepper.scaler.load_state_dict(state["scaler"])
    if t.device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], t.device)
    if t.d.main and (ckpt.path / "metrics.jsonl").is_file():
        # The log as of the checkpoint: records a killed run wrote after it would repeat.
        with atomic_write(t.log.path, "wb") as f:
            f.write((ckpt.path / "metrics.jsonl").read_bytes())
    t.last_good = ckpt.path
    t.evaluation_owed = ckpt.info.get("evaluation_owed")


# ----------------------------------------------------------------------------- saving

def save(t: Trainer, step: int, rng_cpu: torch.Tensor, rng_cuda: torch.Tensor | None) -> None:
    """Write the checkpoint of ``step`` (the model and optimizer as they are now).

    Called only once the weights are known to give a finite loss (see
    :class:`PendingSave`); the RNG states are those captured at ``step``.
    """
    if t.d.main:
        trainer_state = {"optimizer": t.stepper.optimizer.state_dict(), "step": step, "rng_cpu": rng_cpu}
        if rng_cuda is not None:
            trainer_state["rng_cuda"] = rng_cuda
        if t.cfg.precision == "fp16":
            trainer_state["scaler"] = t.stepper.scaler.state_dict()
        t.last_good = save_checkpoint(t.run_dir, step, t.model, t.info, t.data.tokenizer.to_str(),
                                      trainer_state, t.log.path)
    if t.d.world > 1:
        dist.barrier()


class PendingSave:
    """A checkpoint is good when its weights gave a finite loss. A save due after
    step N is therefore held until the loss of step N+1, computed on exactly those
    weights, is known: finite, it is written (before the optimizer changes them);
    not finite, it is dropped and the previous checkpoint stays the last good one."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.rng: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def hold(self, t: Trainer) -> None:
        self.step = t.step
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(t.device) if t.device.type == "cuda" else None)

    def confirm(self, t: Trainer) -> None:
        """The weights of the held step just gave a finite loss: write it."""
        if self.step is not None:
            save(t, self.step, *self.rng)
            self.step = self.rng = None


def diverged(t: Trainer, what: str) -> TrainingDiverged:
    if t.last_good is None:
        kept = f"no checkpoint had been saved in {t.run_dir}"
    else:
        kept = (f"the last good checkpoint, {t.last_good} (its weights gave a finite loss), is kept; resume "
                f"from it with a lower learning rate: {t.resume_command()} --lr {t.cfg.lr / 10:g} --allow-change lr")
    return TrainingDiverged(f"{what}; stopped without saving: {kept}")


def next_batch_loss(t: Trainer, order: torch.Tensor) -> float:
    """Training loss of the current weights on the batch the next step would use,
    without a gradient and leaving the RNG as it was (so resume stays exact)."""
    first = (t.step % t.steps_per_epoch) * t.cfg.batch_size
    total = torch.zeros((), device=t.device)
    devices = [t.device] if t.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for i in range(t.cfg.grad_accum):
            start = first + (i * t.d.world + t.d.rank) * t.micro
            xy = batches(t.data.train, t.block_size, order, start, t.micro).to(t.device)
            with autocast_context(t.cfg.precision, t.device):
                _, loss = t.model(xy[:, :-1], xy[:, 1:], return_logits=False)
            total += loss.float() / t.cfg.grad_accum
    if t.d.world > 1:
        dist.all_reduce(total)
        total /= t.d.world
    return total.item()


# ----------------------------------------------------------------------------- the loop

def run_loop(t: Trainer, stop_after: int | None) -> RunResult:
    """Train from ``t.step`` to the end; save on schedule, at the end, and when stopped."""
    from gam.data import epoch_order

    cfg, d, device = t.cfg, t.d, t.device
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    def asked_to_stop() -> bool:
        return stop["signal"] is not None

    # An evaluation abandons its pass when asked to stop, on one process only: processes
    # evaluating different blocks could not agree on where to stop without a sync per batch.
    evaluation_stop = asked_to_stop if d.world == 1 else None
    handlers = {}
    for sig in STOP_SIGNALS:
        try:
            handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass

    result = RunResult(t.run_dir, t.step)
    pending = PendingSave()
    epoch_stats = {"train_s": 0.0, "data_s": 0.0, "tokens": 0}
    interval = {"train_s": 0.0, "tokens": 0}  # since the last metrics.jsonl record
    epoch = t.step // t.steps_per_epoch
    order = epoch_order(t.n_blocks, cfg.seed, epoch)
    t.train_model.train()
    from tqdm import tqdm

    from gam.progress import disabled_by_env

    # The training bar also goes to logs (a run's only progress there); TQDM_DISABLE hides it.
    bar = tqdm(total=t.total_steps, initial=t.step, disable=not d.main or disabled_by_env(), dynamic_ncols=True,
               mininterval=1.0, file=sys.stderr)
    owed = t.evaluation_owed
    try:
        if owed is not None:
            result.metrics = evaluate_and_log(t, owed["epoch"], owed["train_loss"], None, bar, evaluation_stop)
            owed = None
        while t.step < t.total_steps:
            if t.step // t.steps_per_epoch != epoch:
                epoch = t.step // t.steps_per_epoch
                order = epoch_order(t.n_blocks, cfg.seed, epoch)
            t0 = time.perf_counter()
            loss, data_s = forward_backward(t, order)
            if not math.isfinite(loss):
                raise diverged(t, f"loss became {loss} at step {t.step}")
            ts = time.perf_counter()
            pending.confirm(t)
            save_s = time.perf_counter() - ts
            lr = optimizer_step(t)
            elapsed = time.perf_counter() - t0 - save_s
            epoch_stats["train_s"] += elapsed
            epoch_stats["data_s"] += data_s
            epoch_stats["tokens"] += cfg.batch_size * t.block_size
            interval["train_s"] += elapsed
            interval["tokens"] += cfg.batch_size * t.block_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
            if t.step % cfg.log_every == 0:
                t.log.write({"step": t.step, "epoch": epoch, "loss": loss, "lr": lr,
                             "tokens_per_s": interval["tokens"] / max(interval["train_s"], 1e-9)})
                interval = {"train_s": 0.0, "tokens": 0}
            end_of_epoch = t.step % t.steps_per_epoch == 0 or t.step == t.total_steps
            if (cfg.eval_every and t.step % cfg.eval_every == 0) or end_of_epoch:
                owed = {"epoch": epoch, "train_loss": loss}
                result.metrics = evaluate_and_log(t, epoch, loss, epoch_stats if end_of_epoch else None, bar,
                                                  evaluation_stop)
                owed = None
                if end_of_epoch:
                    epoch_stats = {"train_s": 0.0, "data_s": 0.0, "tokens": 0}
            if t.step == t.total_steps:
                break  # the end: saved below after the final evaluation, even if a signal came
            if cfg.save_every and t.step % cfg.save_every == 0:
                pending.hold(t)
            stopping = asked_to_stop()
            if d.world > 1:  # every process must agree to stop at the same step
                flag = torch.tensor(float(stopping), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            if stopping or (stop_after is not None and t.step >= stop_after):
                raise Interrupted()
        bar.close()
        finish(t, result)
    except Interrupted:
        bar.close()
        if pending.step is None:
            pending.hold(t)
        loss = next_batch_loss(t, order)
        if not math.isfinite(loss):
            raise diverged(t, f"stopped at step {t.step}, whose weights give a loss of {loss}") from None
        if owed is not None:  # abandoned: the resumed run evaluates first, as this one would have
            t.info["evaluation_owed"] = owed
        pending.confirm(t)
        result.interrupted = True
        result.stop_signal = stop["signal"]
        result.resume_command = t.resume_command()
        name = signal.Signals(stop["signal"]).name if stop["signal"] else "stop_after"
        t.say(f"\n{name}: saved a checkpoint at step {t.step} in {t.run_dir}. "
              f"Resume with: {result.resume_command}")
    finally:
        bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        t.log.close()
    result.step = t.step
    return result


def forward_backward(t: Trainer, order: torch.Tensor) -> tuple[float, float]:
    """Gradients of one optimizer step's batch (all accumulation steps); (loss, data seconds)."""
    cfg, d = t.cfg, t.d
    first = (t.step % t.steps_per_epoch) * cfg.batch_size
    loss_sum = torch.zeros((), device=t.device)
    data_s = 0.0
    for i in range(cfg.grad_accum):
        td = time.perf_counter()
        start = first + (i * d.world + d.rank) * t.micro
        xy = batches(t.data.train, t.block_size, order, start, t.micro).to(t.device, non_blocking=True)
        data_s += time.perf_counter() - td
        sync = nullcontext()
        if d.world > 1 and i < cfg.grad_accum - 1:
            sync = t.train_model.no_sync()
        with sync:
            loss = t.stepper.backward(xy[:, :-1], xy[:, 1:], accumulation=cfg.grad_accum)
        loss_sum += loss / cfg.grad_accum
    if d.world > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= d.world
    return loss_sum.item(), data_s


def optimizer_step(t: Trainer) -> float:
    """Clip, step, advance ``t.step``; returns the learning rate used."""
    lr = t.stepper.update(t.step)
    t.step += 1
    return lr


def evaluate_and_log(t: Trainer, epoch: int, train_loss: float, epoch_stats: dict[str, Any] | None,
                     bar, should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    te = time.perf_counter()
    metrics = evaluate(t.model, t.data.valid, t.block_size, t.cfg.eval_batch_size, t.device, t.cfg.precision, t.d,
                       should_stop)
    metrics["eval_s"] = time.perf_counter() - te
    record = {"step": t.step, "epoch": epoch, "train_loss": train_loss, **metrics}
    timed = ""
    if epoch_stats is not None:
        # The steps timed: the epoch's, or fewer (a run that ends mid-epoch, or resumed in one)
        steps = round(epoch_stats["tokens"] / (t.cfg.batch_size * t.block_size))
        record.update({"epoch_train_s": epoch_stats["train_s"], "epoch_data_s": epoch_stats["data_s"],
                       "epoch_steps": steps, "tokens_per_s": epoch_stats["tokens"] / max(epoch_stats["train_s"], 1e-9)})
        what = f"epoch {epoch}" if steps == t.steps_per_epoch else \
            f"{steps:,} of epoch {epoch}'s {t.steps_per_epoch:,} steps"
        timed = (f"; train time {epoch_stats['train_s']:.1f}s ({what}; data {epoch_stats['data_s']:.1f}s), "
                 f"eval {metrics['eval_s']:.1f}s, {record['tokens_per_s']:.0f} tokens/s")
    t.log.write(record)
    if t.d.main:
        bar.write(f"step {t.step}: val loss {metrics['val_loss']:.4f}, ppl {metrics['val_ppl']:.2f}{timed}")
    return record


def finish(t: Trainer, result: RunResult) -> None:
    """The final evaluation and checkpoint (only of weights with a finite validation loss)."""
    if not result.metrics or result.metrics.get("step") != t.step:
        result.metrics = {"step": t.step, **evaluate(t.model, t.data.valid, t.block_size, t.cfg.eval_batch_size,
                                                     t.device, t.cfg.precision, t.d)}
    if not math.isfinite(result.metrics["val_loss"]):
        raise diverged(t, f"validation loss became {result.metrics['val_loss']} at step {t.step}")
    vocab = t.model_config.vocab_size
    result.metrics["unigram_ppl"] = unigram_perplexity(t.data.train, t.data.valid, vocab, t.block_size)
    t.info["unigram_ppl"] = result.metrics["unigram_ppl"]
    t.info["final_metrics"] = result.metrics
    save(t, t.step, torch.get_rng_state(),
         torch.cuda.get_rng_state(t.device) if t.device.type == "cuda" else None)
