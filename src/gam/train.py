"""Training and evaluation: one flat loop for GAM, Transformer and Mamba.

    data -> tokenizer -> token blocks -> AdamW (warm-up + cosine) -> checkpoints

Runs on CPU or GPU, in fp32, bf16 or fp16 autocast, on one process or many
(``torchrun``: DistributedDataParallel, gloo on CPU, NCCL on GPU). A run
interrupted at any point (Ctrl-C, SIGTERM, a crash) resumes from its last
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
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gam.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap
from gam.config import ConfigError, GAMConfig, TrainConfig, preset  # noqa: F401 - TrainConfig, preset: gam.train's API
from gam.models.lm import DecoderLM


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


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs CUDA (it uses a GradScaler); use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms, or 1-D params)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if fused else {}))


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
             device: torch.device, precision: str, d: Dist = Dist()) -> dict[str, float]:
    """Mean cross-entropy over every validation block, in order (deterministic).

    Shows a progress bar on a terminal (gam.progress): it takes tens of seconds on a CPU."""
    from gam.progress import progress

    n_blocks = len(tokens) // (block_size + 1)
    if n_blocks == 0:
        raise ValueError(f"validation data has {len(tokens)} tokens, fewer than one block of {block_size + 1}")
    was_training = model.training
    model.eval()
    order = torch.arange(n_blocks)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = torch.zeros((), dtype=torch.float64, device=device)
    for start in progress(range(d.rank * batch_size, n_blocks, batch_size * d.world), "evaluating", rank=d.rank):
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


# ----------------------------------------------------------------------------- the loop

class Interrupted(Exception):
    pass


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


def train(model_config: GAMConfig, cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
          data=None, stop_after: int | None = None, print_fn: Callable[[str], None] = print) -> RunResult:
    """Train ``model_config`` with ``cfg``; checkpoints go to ``run_dir``.

    ``data`` is a prepared dataset (``gam.data.prepare_data``); None prepares
    ``cfg.data``. ``stop_after`` ends the run after that many optimizer steps
    as if interrupted (for tests of exact resume).
    """
    cfg.validate()
    run_dir = Path(run_dir)
    device_type = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    d = setup_distributed(device_type)
    device = pick_device(cfg.device, d)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    say = print_fn if d.main else (lambda *_: None)

    state = None
    if resume:
        ckpt = load_checkpoint(run_dir)
        state = ckpt.trainer_state()
        saved_model = ckpt.model_config
        if saved_model != model_config:
            say(f"resuming with the checkpoint's model config ({ckpt.path.name})")
        model_config = saved_model
        saved_cfg = TrainConfig(**ckpt.info["train_config"])
        # Only the stopping point may change on resume; everything else must match for exactness.
        cfg = dataclasses.replace(saved_cfg, max_steps=cfg.max_steps, epochs=cfg.epochs,
                                  save_every=cfg.save_every, eval_every=cfg.eval_every,
                                  logger=cfg.logger, threads=cfg.threads, device=cfg.device)
        say(f"resuming from {ckpt.path} (step {ckpt.step})")

    if data is None:
        from gam.data import prepare_data

        extra = {"tokenizer": ckpt.tokenizer()} if resume else {}
        data = prepare_data(cfg.data, block_size=model_config.block_size, vocab_size=model_config.vocab_size,
                            source=cfg.data_source, train_rows=cfg.train_rows, valid_rows=cfg.valid_rows,
                            tokenizer_kind=cfg.tokenizer, **extra)
    if data.tokenizer_kind != cfg.tokenizer:
        # Prepared data given by the caller, or a run saved before the field existed: record the
        # kind the tokens really come from.
        cfg = dataclasses.replace(cfg, tokenizer=data.tokenizer_kind)
    vocab = data.tokenizer.get_vocab_size()
    if vocab != model_config.vocab_size:
        if resume:
            raise CheckpointError(f"checkpoint vocab {model_config.vocab_size} != tokenizer vocab {vocab}")
        say(f"vocab_size follows the tokenizer: {vocab}")
        model_config = model_config.replace(vocab_size=vocab)
    say(f"data: {data.source}; train {len(data.train):,} tokens, valid {len(data.valid):,} tokens")

    block_size = model_config.block_size
    n_blocks = len(data.train) // (block_size + 1)
    if n_blocks < cfg.batch_size:
        raise ValueError(
            f"training data has {n_blocks} blocks of {block_size + 1} tokens, fewer than one batch "
            f"({cfg.batch_size}); use a smaller batch_size or block_size, or more data")
    if cfg.batch_size % (d.world * cfg.grad_accum):
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                          f"({d.world} x {cfg.grad_accum})")
    micro = cfg.batch_size // (d.world * cfg.grad_accum)
    steps_per_epoch = n_blocks // cfg.batch_size
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    from gam.data import epoch_order

    torch.manual_seed(cfg.seed)
    model = DecoderLM(model_config).to(device)
    # fused AdamW: one kernel over all parameters (on CPU ~4x faster than foreach)
    optimizer = make_optimizer(model, cfg, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    step = 0
    if state is not None:
        ckpt.load_weights(model)
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and cfg.precision == "fp16":
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    else:
        # Dropout masks differ across processes; the data order does not.
        torch.manual_seed(cfg.seed + d.rank)

    counts = {"total": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
    say(f"model {model_config.model}: {counts['total']:,} parameters; {total_steps} steps of "
        f"{cfg.batch_size} x {block_size} tokens ({steps_per_epoch} steps per epoch), "
        f"{cfg.precision} on {device}" + (f", {d.world} processes" if d.world > 1 else ""))

    train_model: torch.nn.Module = model
    if cfg.compile:
        train_model = torch.compile(model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    tokenizer_json = data.tokenizer.to_str()
    info = {"train_config": dataclasses.asdict(cfg), "data_source": data.source,
            "unigram_ppl": None, "parameters": counts["total"]}
    run_config = {"model": model_config.to_dict(), "train": dataclasses.asdict(cfg)}
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
    log = MetricsLog(run_dir, cfg.logger, d.main, run_config)

    def checkpoint() -> None:
        if d.main:
            trainer_state = {"optimizer": optimizer.state_dict(), "step": step,
                             "rng_cpu": torch.get_rng_state()}
            if device.type == "cuda":
                trainer_state["rng_cuda"] = torch.cuda.get_rng_state(device)
            if cfg.precision == "fp16":
                trainer_state["scaler"] = scaler.state_dict()
            save_checkpoint(run_dir, step, model, info, tokenizer_json, trainer_state, log.path)
        if d.world > 1:
            dist.barrier()

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    handlers = {}
    if d.main or d.world > 1:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, on_signal)
            except ValueError:  # not the main thread
                pass

    result = RunResult(run_dir, step)
    epoch_stats = {"train_s": 0.0, "data_s": 0.0, "tokens": 0}
    epoch = step // steps_per_epoch
    order = epoch_order(n_blocks, cfg.seed, epoch)
    last_loss = float("nan")
    train_model.train()
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, disable=not d.main, dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)
        while step < total_steps:
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                order = epoch_order(n_blocks, cfg.seed, epoch)
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            first = (step % steps_per_epoch) * cfg.batch_size
            loss_sum = torch.zeros((), device=device)
            data_s = 0.0
            for i in range(cfg.grad_accum):
                td = time.perf_counter()
                start = first + (i * d.world + d.rank) * micro
                xy = batches(data.train, block_size, order, start, micro).to(device, non_blocking=True)
                data_s += time.perf_counter() - td
                sync = nullcontext()
                if d.world > 1 and i < cfg.grad_accum - 1:
                    sync = train_model.no_sync()
                with sync:
                    with autocast_context(cfg.precision, device):
                        _, loss = train_model(xy[:, :-1], xy[:, 1:], return_logits=False)
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
            if d.world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= d.world
            last_loss = loss_sum.item()
            if not math.isfinite(last_loss):
                raise TrainingDiverged(f"loss became {last_loss} at step {step}; stopped without saving, "
                                       f"the last good checkpoint in {run_dir} is kept")
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            epoch_stats["train_s"] += elapsed
            epoch_stats["data_s"] += data_s
            epoch_stats["tokens"] += cfg.batch_size * block_size
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
            if step % cfg.log_every == 0:
                log.write({"step": step, "epoch": epoch, "loss": last_loss, "lr": lr,
                           "tokens_per_s": cfg.batch_size * block_size / elapsed})
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if (cfg.eval_every and step % cfg.eval_every == 0) or end_of_epoch:
                te = time.perf_counter()
                metrics = evaluate(model, data.valid, block_size, cfg.eval_batch_size, device, cfg.precision, d)
                metrics["eval_s"] = time.perf_counter() - te
                record = {"step": step, "epoch": epoch, "train_loss": last_loss, **metrics}
                if end_of_epoch:
                    record.update({
                        "epoch_train_s": epoch_stats["train_s"],
                        "epoch_data_s": epoch_stats["data_s"],
                        "tokens_per_s": epoch_stats["tokens"] / max(epoch_stats["train_s"], 1e-9)})
                    epoch_stats = {"train_s": 0.0, "data_s": 0.0, "tokens": 0}
                log.write(record)
                result.metrics = record
                if d.main:
                    bar.write(f"step {step}: val loss {metrics['val_loss']:.4f}, ppl {metrics['val_ppl']:.2f}"
                              + (f"; epoch train time {record['epoch_train_s']:.1f}s (data "
                                 f"{record['epoch_data_s']:.1f}s), eval {metrics['eval_s']:.1f}s, "
                                 f"{record['tokens_per_s']:.0f} tokens/s" if end_of_epoch else ""))
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint()
            stopping = stop["signal"] is not None
            if d.world > 1:  # every process must agree to stop at the same step
                flag = torch.tensor(float(stopping), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            if stopping or (stop_after is not None and step >= stop_after):
                raise Interrupted()
        bar.close()
        if not result.metrics or result.metrics.get("step") != step:
            result.metrics = {"step": step, **evaluate(model, data.valid, block_size, cfg.eval_batch_size,
                                                      device, cfg.precision, d)}
        result.metrics["unigram_ppl"] = unigram_perplexity(data.train, data.valid, vocab, block_size)
        info["unigram_ppl"] = result.metrics["unigram_ppl"]
        info["final_metrics"] = result.metrics
        checkpoint()
    except Interrupted:
        bar.close()
        checkpoint()
        result.interrupted = True
        name = signal.Signals(stop["signal"]).name if stop["signal"] else "stop_after"
        say(f"\n{name}: saved a checkpoint at step {step} in {run_dir}. "
            f"Resume with: gam train --out {run_dir} --resume")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        log.close()
    result.step = step
    return result
