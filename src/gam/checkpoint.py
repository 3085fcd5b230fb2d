"""Checkpoints that survive crashes: safetensors weights, verified on load.

A run folder looks like::

    RUN/
      latest                  # text file naming the newest complete checkpoint
      ckpt-000500/            # one folder per save
        model.safetensors     # weights (the tied head is stored once)
        config.json           # model config, train config, step, data source
        tokenizer.json        # the tokenizer the model was trained with
        trainer_state.pt      # optimizer, RNG, data position (torch.load weights_only)
        metrics.jsonl         # the run's metrics so far
        manifest.json         # sha256 and size of every file above, written last

A checkpoint is written into a hidden temporary folder and renamed into place
only when complete, and ``latest`` is replaced atomically after that, so
killing the process at any moment leaves the previous checkpoint intact. Loading
checks every file against the manifest, so a truncated or corrupted file is
reported, not loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from gam.config import GAMConfig
from gam.fileio import atomic_write
from gam.models.lm import DecoderLM

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KEEP_LAST = 2


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unwrap(model: nn.Module) -> DecoderLM:
    """The bare model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    info: dict[str, Any],
    tokenizer_json: str | None,
    trainer_state: dict[str, Any] | None = None,
    metrics_path: Path | None = None,
) -> Path:
    """Write ``run_dir/ckpt-{step}`` atomically and point ``latest`` at it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:06d}"
    for n in range(1, 1000):  # never replace a complete checkpoint in place
        if not (run_dir / name).exists():
            break
        name = f"ckpt-{step:06d}-{n}"
    final = run_dir / name
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-{name}-"))
    try:
        bare = unwrap(model)
        save_model(bare, str(tmp / "model.safetensors"))
        config = {"format_version": FORMAT_VERSION, "step": step,
                  "model_config": bare.config.to_dict(), **info}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        if metrics_path is not None and metrics_path.exists():
            shutil.copyfile(metrics_path, tmp / "metrics.jsonl")
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
        for p in tmp.iterdir():  # make the data durable before the rename
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_write(run_dir / "latest", "w") as f:
        f.write(name + "\n")
    _prune(run_dir, keep=name)
    return final


def _prune(run_dir: Path, keep: str) -> None:
    checkpoints = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir())
    for old in checkpoints[:-KEEP_LAST]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (via ``latest``) or the folder itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if (path / "latest").is_file():
        name = (path / "latest").read_text().strip()
        target = path / name
        if not target.is_dir():
            raise CheckpointError(f"{path}/latest names {name!r}, which does not exist")
        return target
    if (path / MANIFEST).is_file() or (path / "model.safetensors").is_file():
        return path
    raise CheckpointError(f"{path}: not a checkpoint (no 'latest' file, no model.safetensors)")


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file against the manifest; return config.json's content."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {MANIFEST})")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{manifest_path}: corrupted manifest ({err})") from None
    for name, expected in files.items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: {name} is missing")
        if p.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{p}: truncated or corrupted ({p.stat().st_size} bytes, expected {expected['bytes']})")
        if _sha256(p) != expected["sha256"]:
            raise CheckpointError(f"{p}: corrupted (sha256 does not match the manifest)")
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt}/config.json unreadable ({err})") from None


@dataclass
class Checkpoint:
    path: Path
    info: dict[str, Any]  # config.json

    @property
    def model_config(self) -> GAMConfig:
        return GAMConfig.from_dict(self.info["model_config"])

    @property
    def step(self) -> int:
        return int(self.info.get("step", 0))

    def tokenizer(self):
        from tokenizers import Tokenizer

        path = self.path / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{self.path}: no tokenizer.json saved with this checkpoint")
        return Tokenizer.from_file(str(path))

    def load_weights(self, model: nn.Module) -> None:
        bare = unwrap(model)
        try:
            missing, unexpected = load_model(bare, str(self.path / "model.safetensors"), strict=False)
        except Exception as err:  # safetensors raises plain RuntimeErrors on shape mismatch
            raise CheckpointError(f"{self.path}: weights do not fit this model ({str(err).splitlines()[0]})") from None
        if missing or unexpected:
            raise CheckpointError(
                f"{self.path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def build_model(self, device: str | torch.device = "cpu") -> DecoderLM:
        model = DecoderLM(self.model_config)
        self.load_weights(model)
        return model.to(device)

    def trainer_state(self) -> dict[str, Any]:
        path = self.path / "trainer_state.pt"
        if not path.is_file():
            raise CheckpointError(f"{self.path}: no trainer_state.pt (weights-only export cannot be resumed)")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a run folder's latest checkpoint (or a checkpoint folder), verified."""
    ckpt = resolve(path)
    info = verify(ckpt)
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: unknown checkpoint format {info.get('format_version')!r}")
    try:
        GAMConfig.from_dict(info["model_config"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{ckpt}: bad model config ({err})") from None
    return Checkpoint(ckpt, info)
