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
reported, not loaded; a file the manifest does not list is refused, not trusted.

One process writes a run folder at a time: :class:`RunLock` is an advisory
``flock`` on ``RUN/.lock`` held for the whole run (the kernel drops it when the
holder dies, so a killed run never blocks the next one). ``latest`` must name a
checkpoint folder directly inside its run folder. The rules are collected in
docs/reliability.md.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_model

from gam.config import GAMConfig
from gam.fileio import apply_umask, atomic_write, make_temp_dir, sha256_of_file, writer_errors_as_os_errors
from gam.models.lm import DecoderLM
from gam.resources import check_fits_in_memory

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KEEP_LAST = 2
READS_OF_A_PRUNED_RUN = 3  # tries of a reader whose checkpoint the run prunes meanwhile
LOCK = ".lock"
TEMP_PREFIX = ".tmp-"  # folders of saves in progress; a killed save leaves one behind


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model."""


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock."""


def write_manifest(folder: Path) -> None:
    """Record the sha256 and size of every file in ``folder`` (written last, fsynced
    with the files, so a manifest only exists beside complete data)."""
    files = {p.name: {"sha256": sha256_of_file(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
    for p in folder.iterdir():  # make the data durable before the caller's rename
        with open(p, "rb") as f:
            os.fsync(f.fileno())


# Files that no load reads: documentation, plots, hidden files (.gitattributes of
# a hub repository). They may be added after the manifest was written.
NEVER_LOADED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".svg", ".pdf")


def never_loaded(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(NEVER_LOADED_SUFFIXES)


def manifest_problems(folder: Path) -> list[str]:
    """Everything wrong with ``folder`` against its manifest (empty: all verified).

    Every file a load may read must be listed: loads read files by name, so an
    unlisted one (say a model.safetensors put there later) is refused, not
    trusted. Only files no load reads (:func:`never_loaded`) may be unlisted.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return [f"{folder}: incomplete or unverifiable (no {MANIFEST})"]
    try:
        files = json.loads(manifest_path.read_text())["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        return [f"{manifest_path}: corrupted manifest ({type(err).__name__}: {err})"]
    problems = []
    for name, (size, sha256) in expected.items():
        p = folder / name
        if Path(name).name != name or name in (".", ".."):
            problems.append(f"{manifest_path}: lists {name!r}, which is not a file name in this folder")
        elif not p.is_file():
            problems.append(f"{p}: missing (listed in the manifest)")
        elif p.stat().st_size != size:
            problems.append(f"{p}: truncated or corrupted ({p.stat().st_size} bytes, expected {size})")
        elif sha256_of_file(p) != sha256:
            problems.append(f"{p}: corrupted (sha256 does not match the manifest)")
    for p in sorted(folder.iterdir()):
        if p.name != MANIFEST and p.name not in expected and not never_loaded(p.name):
            problems.append(f"{p}: not listed in the manifest (refused, not trusted)")
    return problems


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
    """Write ``run_dir/ckpt-{step}`` atomically and point ``latest`` at it.

    On any error (a full disk, a read-only folder, an interrupt) the partial
    folder is removed and ``latest`` still names the previous checkpoint.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:06d}"
    for n in range(1, 1000):  # never replace a complete checkpoint in place
        if not (run_dir / name).exists():
            break
        name = f"ckpt-{step:06d}-{n}"
    final = run_dir / name
    tmp = make_temp_dir(run_dir, f"{TEMP_PREFIX}{name}-")
    try:
        bare = unwrap(model)
        with writer_errors_as_os_errors(tmp / "model.safetensors"):
            save_model(bare, str(tmp / "model.safetensors"))
        config = {"format_version": FORMAT_VERSION, "step": step,
                  "model_config": bare.config.to_dict(), **info}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
        if trainer_state is not None:
            with writer_errors_as_os_errors(tmp / "trainer_state.pt"):
                torch.save(trainer_state, tmp / "trainer_state.pt")
        if metrics_path is not None and metrics_path.exists():
            shutil.copyfile(metrics_path, tmp / "metrics.jsonl")
        apply_umask(tmp)
        write_manifest(tmp)
        os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # Name the checkpoint, not the temporary file, and say what survived.
        raise OSError(err.errno, f"{err.strerror or err} (saving checkpoint {name}; any earlier "
                      "checkpoint is intact)", str(final)) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_write(run_dir / "latest", "w") as f:
        f.write(name + "\n")
    _prune(run_dir, keep=name)
    return final


# ckpt-STEP, or ckpt-STEP-N when a checkpoint of that step exists already (see save_checkpoint)
CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)(?:-(\d+))?")


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The checkpoint folders of a run, oldest first: ordered by step, not by name
    (as text, ckpt-1000000 sorts before ckpt-999990)."""
    found = [p for p in run_dir.glob("ckpt-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: tuple(int(n or 0) for n in CHECKPOINT_NAME.fullmatch(p.name).groups()))


def _prune(run_dir: Path, keep: str) -> None:
    for old in checkpoint_folders(run_dir)[:-KEEP_LAST]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete what killed saves left in ``run_dir`` (``.tmp-*`` folders, ``.latest.*.tmp``
    files). Only safe while holding the run's lock: then no save is in progress."""
    removed = []
    for p in sorted(run_dir.iterdir()):
        if p.is_dir() and not p.is_symlink() and p.name.startswith(TEMP_PREFIX):
            shutil.rmtree(p)
        elif p.is_file() and p.name.startswith(".latest.") and p.name.endswith(".tmp"):
            p.unlink()
        else:
            continue
        removed.append(p.name)
    return removed


class RunLock:
    """An advisory lock on a run folder: one writer at a time.

    ``flock`` on ``RUN/.lock``, which holds the holder's PID. The kernel releases
    it when the process exits in any way (kill -9 included), so a stale lock
    file never blocks the next run.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self.path.read_text().strip() or "unknown"
            raise RunFolderBusy(f"{self.run_dir} is in use by another gam process (PID {holder}); "
                                "wait for it to finish or stop it, or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (harmless, reused)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (via ``latest``) or the folder itself.

    ``latest`` must name a checkpoint folder directly inside the run folder: a
    path elsewhere (another run's checkpoint, ``..``, a symlink out) is refused.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder or run folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (give a run folder or a checkpoint folder)")
    if (path / "latest").is_file():
        name = (path / "latest").read_text(errors="replace").strip()
        target = path / name
        inside = (name and Path(name).name == name and name not in (".", "..")
                  and target.resolve().parent == path.resolve())
        if not inside:
            raise CheckpointError(f"{path}/latest names {name!r}, which is not a checkpoint folder inside "
                                  f"{path} (refused: a run only resumes its own checkpoints)")
        if not target.is_dir():
            raise CheckpointError(f"{path}/latest names {name!r}, which does not exist")
        return target
    if (path / MANIFEST).is_file() or (path / "model.safetensors").is_file():
        return path
    raise CheckpointError(f"{path}: not a checkpoint (no 'latest' file, no model.safetensors)")


def read_config(ckpt: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, which must hold a JSON object."""
    path = ckpt / "config.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: not a checkpoint folder (no config.json)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} unreadable ({err})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} unreadable (not a JSON object)")
    return info


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file against the manifest; return config.json's content."""
    problems = manifest_problems(ckpt)
    if problems:
        more = f" (and {len(problems) - 1} more problems; gam verify {ckpt} lists them)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    return read_config(ckpt)


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
            how = ("; convert again with python -m gam.models.mamba_convert SOURCE OUT --tokenizer FILE"
                   if "converted_from" in self.info else "")
            raise CheckpointError(f"{self.path}: no tokenizer.json saved with this checkpoint "
                                  f"(the tokenizer the model was trained with is needed to read text){how}")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{path}: unreadable tokenizer ({str(err).splitlines()[0]})") from None

    def load_weights(self, model: nn.Module) -> None:
        """Load ``model.safetensors`` into ``model`` (unwrapped from DDP and torch.compile), strictly.

        The head is the token embedding (tied): stored once, under either name
        (safetensors keeps one name of a shared tensor, a converted folder the
        other); both names must then hold the same tensor. Names saved from a
        wrapped model lose the wrapper's prefix.
        """
        bare = unwrap(model)
        path = self.path / "model.safetensors"
        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types on a bad file
            raise CheckpointError(f"{path}: unreadable weights ({str(err).splitlines()[0]})") from None
        state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
        tied = [name for name in ("head.weight", "token_embedding.weight") if name in state]
        if len(tied) == 2 and not torch.equal(state[tied[0]], state[tied[1]]):
            raise CheckpointError(f"{path}: head.weight differs from token_embedding.weight, "
                                  "but the model ties its head to the embedding")
        if len(tied) == 1:
            state["head.weight"] = state["token_embedding.weight"] = state[tied[0]]
        expected = bare.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            old_norm = bare.config.model == "mamba" and any(k.endswith("norm.bias") or k == "ln_f.bias"
                                                             for k in unexpected)
            hint = ("; this is a standard-wiring Mamba saved when it used LayerNorm, before it took "
                    "mamba-ssm's RMSNorm: retrain it with this version") if old_norm else ""
            raise CheckpointError(f"{self.path}: weights do not fit this model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]}){hint}")
        bare.load_state_dict(state, strict=True)

    def build_model(self, device: str | torch.device = "cpu") -> DecoderLM:
        """The model with its weights on ``device``, in eval mode; refused with one line
        when its parameters alone exceed the memory ``device`` has free."""
        check_fits_in_memory(self.model_config, torch.device(device))
        model = DecoderLM(self.model_config)
        self.load_weights(model)
        return model.to(device).eval()

    def trainer_state(self) -> dict[str, Any]:
        path = self.path / "trainer_state.pt"
        if not path.is_file():
            raise CheckpointError(f"{self.path}: no trainer_state.pt (weights-only export cannot be resumed)")
        with warnings.catch_warnings(record=True) as caught:  # about a file we may refuse: held back
            warnings.simplefilter("always")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - its text may advise weights_only=False: never repeat that
                raise CheckpointError(f"{path}: unreadable trainer state ({type(err).__name__}); "
                                      "this checkpoint cannot be resumed") from None
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return state


def how_to_load_an_export(folder: str | Path) -> str:
    """What every message about a ``gam export`` folder says. Without ``import gam.hf``,
    transformers does not know the "gam" model type and suggests upgrading itself, which cannot help."""
    return (f"a gam export loads with: import gam.hf; "
            f"transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint folder, or the one a run folder's ``latest`` names, checked.

    The one loader of the project: training (resume), ``gam eval``, ``gam generate``,
    ``gam export`` and the benches open checkpoints here, then take what they need
    (:meth:`Checkpoint.build_model`, :meth:`Checkpoint.tokenizer`, ...). A folder with a
    manifest is verified file by file; the trainer's checkpoints and the converter's
    (``format_version`` in config.json) must have one, since it is written last. A folder
    without one (what ``python -m gam.models.mamba_convert`` wrote before it wrote
    manifests) is read as it is. config.json
    holds the model's GAMConfig fields under ``"model_config"``. Every problem is one
    line, a :class:`CheckpointError`.
    """
    ckpt = resolve(path)
    for _ in range(READS_OF_A_PRUNED_RUN - 1):
        try:
            return _open_checked(ckpt)
        except (CheckpointError, FileNotFoundError):
            # A run still training prunes old checkpoints: if `latest` has moved on, the folder
            # was pruned while being read, so read the newest one instead.
            newest = resolve(path)
            if newest == ckpt:
                raise
            ckpt = newest
    return _open_checked(ckpt)


def _open_checked(ckpt: Path) -> Checkpoint:
    has_manifest = (ckpt / MANIFEST).is_file()
    info = verify(ckpt) if has_manifest else read_config(ckpt)
    if "format_version" in info:
        if info["format_version"] != FORMAT_VERSION:
            raise CheckpointError(f"{ckpt}: unknown checkpoint format {info['format_version']!r}")
        if not has_manifest:
            raise CheckpointError(manifest_problems(ckpt)[0])
    if "model_config" not in info:
        if info.get("model_type") == "gam":
            raise CheckpointError(f"{ckpt}: a gam export folder (Hugging Face layout), not a gam checkpoint: "
                                  f"load it with transformers ({how_to_load_an_export(ckpt)}), or give the "
                                  "run folder it came from")
        raise CheckpointError(f"{ckpt}: not a gam checkpoint (its config.json has no model_config)")
    try:
        GAMConfig.from_dict(info["model_config"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{ckpt}: bad model config ({err})") from None
    return Checkpoint(ckpt, info)


def verify_folder(path: str | Path) -> tuple[list[str], list[str]]:
    """What ``gam verify`` reports: (folders checked, problems found).

    A run folder: its ``latest`` and every checkpoint in it; a checkpoint or
    ``gam export`` folder: its files against its manifest.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder" if not path.exists() else f"{path}: not a folder")
    if (path / "latest").is_file():
        problems = []
        try:
            resolve(path)
        except CheckpointError as err:
            problems.append(str(err))
        folders = checkpoint_folders(path)
        if not folders:
            problems.append(f"{path}: a run folder with no checkpoint folder")
        for folder in folders:
            problems += manifest_problems(folder)
        return [str(p) for p in folders], problems
    return [str(path)], manifest_problems(path)
