"""Token files and block datasets for GAM experiments, from a corpus and its tokenizer.

Follows the data pipeline of "Gated Associative Memory" (arXiv 2509.00605):

* the corpus (:mod:`gam.corpus`: WikiText-2 or TinyStories trimmed to the first 50,000 train /
  5,000 validation rows, or local files);
* a BPE tokenizer trained on the corpus (:mod:`gam.tokenizer`: byte-level BPE that round-trips
  any text by default, or the paper's exact recipe);
* every row encoded separately and the ids concatenated in row order (no separator tokens);
* non-overlapping blocks of ``block_size + 1`` tokens, ``x = block[:-1]``, ``y = block[1:]``.

The one call a trainer needs is :func:`prepare_data`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from gam.corpus import DataError, DataWarning, default_cache_dir, load_corpus
from gam.fileio import atomic_write, is_atomic_write_temporary, remove_orphaned_temporaries, sha256_of_file
from gam.tokenizer import get_tokenizer, row_texts, slug, tokenizer_hash, tokenizer_path
from gam.tokenizer import tokenizer_kind as kind_of  # prepare_data has a tokenizer_kind argument

__all__ = [
    "encode_to_file",
    "load_tokens",
    "BlockDataset",
    "epoch_order",
    "PreparedData",
    "prepare_data",
    "fingerprint_changes",
]

log = logging.getLogger(__name__)

_FORMAT_VERSION = 2  # bump to invalidate every cached token file (2: the sidecar holds the sha256)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


# --------------------------------------------------------------------------------------------
# Token files
# --------------------------------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return Path(str(path) + ".json")


def encode_to_file(tokenizer, texts: Sequence[str], path: str | os.PathLike, *,
                   batch_size: int = 4096) -> np.ndarray:
    """Encode ``texts`` once and store the ids as a flat ``.bin`` (+ ``<path>.json`` sidecar).

    As the paper: each row is encoded separately (batch encode) and the ids are concatenated in
    row order with no separator; empty rows contribute nothing. dtype is uint16 when the vocab
    has <= 65535 entries, else uint32. Both files are written atomically (temp + os.replace);
    the sidecar (dtype, count, sha256 of the file, tokenizer hash) is written last. Returns the
    tokens as :func:`load_tokens` does.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    count = 0
    digest = hashlib.sha256()
    with atomic_write(path) as f:
        for i in range(0, len(texts), batch_size):
            batch = [t for t in texts[i:i + batch_size] if t]
            if not batch:
                continue
            ids = [e.ids for e in encode(batch)]
            n = sum(len(x) for x in ids)
            if n == 0:
                continue
            arr = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=n)
            arr.tofile(f)
            digest.update(arr)
            count += n
    meta = {"format": _FORMAT_VERSION, "dtype": dtype.name, "count": count, "sha256": digest.hexdigest(),
            "tokenizer_hash": tokenizer_hash(tokenizer), "vocab_size": vocab, "rows": len(texts)}
    _atomic_write_bytes(_sidecar(path), json.dumps(meta, indent=1).encode())
    return _token_array(path, dtype, count)


def _read_sidecar(path: Path) -> dict:
    sc = _sidecar(path)
    try:
        meta = json.loads(sc.read_text())
        np.dtype(meta["dtype"])
        int(meta["count"])
    except FileNotFoundError:
        raise DataError(f"{path}: missing token sidecar {sc.name}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{sc}: unreadable token sidecar ({type(e).__name__}: {e})") from None
    return meta


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """Read-only ``np.memmap`` of a token file written by :func:`encode_to_file`
    (a plain empty array when the file holds no tokens), checked against its sidecar:
    the size, then the content (sha256), so same-size garbage is refused, not trained on."""
    path = Path(path)
    meta = _read_sidecar(path)
    dtype, count = np.dtype(meta["dtype"]), int(meta["count"])
    try:
        size = path.stat().st_size
        actual = sha256_of_file(path) if size == count * dtype.itemsize else None
    except OSError as e:
        raise DataError(f"{path}: unreadable token file ({e.strerror or e})") from None
    if actual is None:
        raise DataError(f"{path}: token file has {size} bytes, sidecar says {count} x {dtype.name}")
    if actual != meta.get("sha256"):
        recorded = str(meta["sha256"])[:16] if meta.get("sha256") else "none (an older cache format)"
        raise DataError(f"{path}: content does not match its sidecar (sha256 {actual[:16]}, recorded {recorded})")
    return _token_array(path, dtype, count)


def _token_array(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class BlockDataset(Dataset):
    """Non-overlapping blocks of ``block_size + 1`` tokens, as the paper's ``CustomDataset``.

    Block ``i`` is ``tokens[i*(block_size+1) : (i+1)*(block_size+1)]``; ``__getitem__`` returns
    ``(x, y) = (block[:-1], block[1:])`` as int64 tensors of length ``block_size``. The trailing
    ``len(tokens) % (block_size+1)`` tokens are dropped.
    """

    def __init__(self, tokens, block_size: int, *, name: str = "tokens"):
        if int(block_size) < 1:
            raise DataError(f"{name}: block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.tokens = tokens
        n = len(tokens)
        self.n_blocks = n // (self.block_size + 1)
        if self.n_blocks == 0:
            raise DataError(
                f"{name}: corpus has {n} tokens, shorter than one block of "
                f"block_size+1={self.block_size + 1}"
            )

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, idx):
        idx = int(idx)
        if idx < 0:
            idx += self.n_blocks
        if not 0 <= idx < self.n_blocks:
            raise IndexError(f"block index {idx} out of range [0, {self.n_blocks})")
        L = self.block_size + 1
        chunk = self.tokens[idx * L:(idx + 1) * L]
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.to(torch.int64)
        else:
            chunk = torch.from_numpy(np.asarray(chunk).astype(np.int64))
        return chunk[:-1], chunk[1:]

    # Re-open memmaps in worker processes instead of pickling the whole array (spawn start).
    def __getstate__(self):
        state = self.__dict__.copy()
        t = self.tokens
        if isinstance(t, np.memmap) and getattr(t, "filename", None):
            state["tokens"] = ("__memmap__", t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state):
        t = state.get("tokens")
        if isinstance(t, tuple) and len(t) == 5 and t[0] == "__memmap__":
            _, fn, dt, off, shape = t
            state["tokens"] = np.memmap(fn, dtype=np.dtype(dt), mode="r", offset=off, shape=shape)
        self.__dict__.update(state)


def epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """Deterministic permutation of ``range(n_blocks)`` for ``epoch`` (torch.Generator seeded
    with ``seed + epoch``), so a resumed run can rebuild the exact order and skip consumed
    batches."""
    g = torch.Generator()
    g.manual_seed(int(seed) + int(epoch))
    return torch.randperm(int(n_blocks), generator=g)


# --------------------------------------------------------------------------------------------
# One-call preparation
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """Everything a trainer needs: tokenizer, token arrays, provenance."""

    name: str
    source: str
    tokenizer: object
    vocab_size: int
    block_size: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray | None
    tokenizer_path: Path | None  # None when the caller passed its own tokenizer
    tokenizer_hash: str
    tokenizer_kind: str = "bytelevel"
    fallback_reason: str | None = None
    token_paths: dict = field(default_factory=dict)
    corpus_files: dict = field(default_factory=dict)  # gam.corpus.Corpus.files: what was read

    def fingerprint(self) -> dict:
        """What a run records to know what it was trained on: the corpus files read (path,
        size, sha256; a hub dataset's id, revision and rows' sha256) and the tokenizer's hash."""
        return {"corpus": self.corpus_files, "tokenizer": self.tokenizer_hash}

    def train_dataset(self) -> BlockDataset:
        return BlockDataset(self.train, self.block_size, name=f"{self.name} train")

    def valid_dataset(self) -> BlockDataset:
        return BlockDataset(self.valid, self.block_size, name=f"{self.name} valid")

    def test_dataset(self) -> BlockDataset | None:
        if self.test is None:
            return None
        return BlockDataset(self.test, self.block_size, name=f"{self.name} test")

    def describe(self) -> dict:
        """JSON-able summary (for logs / checkpoints)."""
        return {
            "name": self.name, "source": self.source, "vocab_size": self.vocab_size,
            "block_size": self.block_size, "tokenizer_kind": self.tokenizer_kind,
            "tokenizer_hash": self.tokenizer_hash,
            "tokenizer_path": self.tokenizer_path and str(self.tokenizer_path),
            "fallback_reason": self.fallback_reason,
            "tokens": {k: int(len(v)) for k, v in
                       (("train", self.train), ("valid", self.valid), ("test", self.test))
                       if v is not None},
        }


def _cached_tokens(tokenizer, tok_hash: str, rows: list[str], path: Path) -> np.ndarray:
    if path.exists():  # a token file without its sidecar is damaged too: re-encoded, with a note
        try:
            meta = _read_sidecar(path)
            if meta.get("tokenizer_hash") == tok_hash and meta.get("format") == _FORMAT_VERSION:
                arr = load_tokens(path)
                log.info("token cache hit: %s", path)
                return arr
        except DataError as e:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"{e}; re-encoding", DataWarning, stacklevel=3)
    from gam.progress import heartbeat

    t0 = time.perf_counter()
    with heartbeat(f"encoding {len(rows):,} rows into {path.name}"):  # minutes on a large corpus
        arr = encode_to_file(tokenizer, rows, path)
    log.info("encoded %d rows -> %d tokens in %.1fs: %s", len(rows), len(arr),
             time.perf_counter() - t0, path)
    return arr


def prepare_data(
    name_or_path: str | os.PathLike,
    block_size: int,
    vocab_size: int = 10000,
    cache_dir: str | os.PathLike | None = None,
    source: str = "auto",
    train_rows: int | None = 50000,
    valid_rows: int | None = 5000,
    *,
    tokenizer_splits: Sequence[str] = ("train",),
    hub_timeout: float = 3.0,
    tokenizer=None,
    tokenizer_kind: str = "bytelevel",
) -> PreparedData:
    """Load the corpus, get (train or load) the tokenizer, encode (or load) the token files.

    ``tokenizer_kind``: ``"bytelevel"`` (round-trips any text) or ``"paper"`` (the paper's
    recipe); see :mod:`gam.tokenizer`. The token cache lives under a folder named after the
    cached tokenizer, whose key includes the kind. ``tokenizer``: use this tokenizer (e.g. the one
    saved in a checkpoint) instead of training or loading the cached one (its kind is read from
    it; ``tokenizer_kind`` is ignored); its token files are cached under its kind and content hash.

    Raises :class:`DataError` if the train or valid split is shorter than one block of
    ``block_size + 1`` tokens. ``PreparedData.vocab_size`` is the tokenizer's actual vocab size.
    """
    if int(block_size) < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    corpus = load_corpus(name_or_path, (train_rows, valid_rows), source, hub_timeout=hub_timeout,
                         cache_dir=cache_dir)
    if tokenizer is None:
        kind = tokenizer_kind
        tok = get_tokenizer(corpus, vocab_size, cache_dir, splits=tokenizer_splits, kind=kind)
        tok_path, _ = tokenizer_path(corpus, vocab_size, cache_dir, tokenizer_splits, kind)
        th = tokenizer_hash(tok)
        tok_dir = tok_path.parent.parent / "tokens" / tok_path.stem
    else:
        tok, tok_path, th, kind = tokenizer, None, tokenizer_hash(tokenizer), kind_of(tokenizer)
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        tok_dir = root / "tokens" / f"{slug(corpus.name)}-given-{kind}-{th}"
    for folder in {tok_dir, tok_dir.parent.parent / "tokenizers"}:  # what killed cache writers left
        remove_orphaned_temporaries(folder, is_atomic_write_temporary)
    arrays: dict[str, np.ndarray | None] = {}
    paths: dict[str, Path] = {}
    for split in ("train", "valid", "test"):
        if split == "test" and corpus.test is None:
            arrays[split] = None
            continue
        rows = corpus.split(split)
        fp = corpus.fingerprint((split,))[:16]
        p = tok_dir / f"{split}-{fp}.bin"
        arrays[split] = _cached_tokens(tok, th, row_texts(kind, rows), p)
        paths[split] = p
    L = int(block_size) + 1
    for split in ("train", "valid"):
        n = len(arrays[split])
        if n < L:
            raise DataError(
                f"{corpus.name} {split}: {n} tokens, shorter than one block of block_size+1={L} "
                f"({corpus.source})"
            )
    return PreparedData(
        name=corpus.name, source=corpus.source, tokenizer=tok, vocab_size=tok.get_vocab_size(),
        block_size=int(block_size), train=arrays["train"], valid=arrays["valid"],
        test=arrays["test"], tokenizer_path=tok_path, tokenizer_hash=th, tokenizer_kind=kind,
        fallback_reason=corpus.fallback_reason, token_paths=paths, corpus_files=corpus.files,
    )


def _describe(record: dict) -> str:
    parts = [f"revision {record['revision']}"] if record.get("revision") else []
    parts.append(f"sha256 {str(record.get('sha256'))[:16]}")
    if "bytes" in record:
        parts.append(f"{record['bytes']:,} bytes")
    return ", ".join(parts)


def fingerprint_changes(recorded: dict | None, now: dict) -> list[str]:
    """What differs between the data a run recorded (:meth:`PreparedData.fingerprint`) and ``now``,
    one phrase per file: its path and its old and new hash. A file read from another place with
    the same content is no change. ``recorded`` None (a run saved before fingerprints): nothing known."""
    if recorded is None:
        return []
    changes = []
    old_files, new_files = recorded.get("corpus", {}), now["corpus"]
    for name in sorted(old_files.keys() | new_files.keys()):
        old, new = old_files.get(name), new_files.get(name)
        if new is None:
            changes.append(f"{old.get('path', name)} ({_describe(old)}) is not read now")
        elif old is None:
            changes.append(f"{new.get('path', name)} ({_describe(new)}) was not read by the run")
        elif old.get("sha256") != new.get("sha256"):
            where = new.get("path", name)
            if old.get("path", name) != where:
                where = f"{name}: {old.get('path', name)} -> {where}"
            changes.append(f"{where}: {_describe(old)} -> {_describe(new)}")
    if recorded.get("tokenizer") != now["tokenizer"]:
        changes.append(f"the tokenizer: hash {recorded.get('tokenizer')} -> {now['tokenizer']}")
    return changes
