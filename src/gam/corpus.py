"""Corpora: the raw text rows of a named corpus or of local files, apart from tokenization.

Follows the data of "Gated Associative Memory" (arXiv 2509.00605): WikiText-2
(``wikitext``/``wikitext-2-raw-v1``) and TinyStories (``roneneldan/TinyStories``), trimmed to
the first 50,000 train / 5,000 validation rows. A named corpus comes from the Hugging Face hub
(``datasets.load_dataset``), else from the copy shipped in ``gam/corpora``; local
``.txt``/``.txt.gz``/``.jsonl``/``.parquet`` files or folders are read as they are.
:func:`load_corpus` is the entry point; :mod:`gam.tokenizer` trains on what it returns and
:mod:`gam.data` encodes it. This module imports neither (nor torch).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import re
import threading
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from gam.fileio import atomic_write, sha256_of_file

__all__ = [
    "DataError",
    "DataWarning",
    "Corpus",
    "KNOWN_CORPORA",
    "load_corpus",
    "default_cache_dir",
]

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"


class DataError(ValueError):
    """A corpus could not be loaded or prepared. The message is one line naming the path/name."""


class DataWarning(UserWarning):
    """Recoverable data problem (undecodable bytes, hub fallback, ignored files)."""


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Raw text rows of one corpus.

    ``source`` says exactly which copy was used (hub / shipped / local path, and row counts).
    ``test`` is only set when the copy has a test split (WikiText-2, local folders with test files).
    ``files``: what was read, by name: a file's absolute path, size and sha256, or a hub
    dataset's id, config, revision and the sha256 of its rows (:meth:`fingerprint`); a run
    records it to know what it was trained on.
    """

    name: str
    source: str
    train: list[str]
    valid: list[str]
    test: list[str] | None = None
    split_rows: tuple[int | None, int | None] = (None, None)
    fallback_reason: str | None = None
    files: dict[str, dict] = field(default_factory=dict)

    def split(self, name: str) -> list[str]:
        rows = {"train": self.train, "valid": self.valid, "test": self.test}.get(name)
        if rows is None:
            raise DataError(f"corpus {self.name!r} has no split {name!r}")
        return rows

    def fingerprint(self, splits: Sequence[str] = ("train", "valid")) -> str:
        """sha256 over the rows of ``splits`` (length-prefixed, so row boundaries count)."""
        h = hashlib.sha256()
        for s in splits:
            rows = self.split(s) if (s != "test" or self.test is not None) else []
            h.update(f"<{s}:{len(rows)}>".encode())
            for r in rows:
                b = r.encode("utf-8", "surrogatepass")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
        return h.hexdigest()


# Canonical names and aliases (compared lower-cased).
KNOWN_CORPORA = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "tinystories": ("roneneldan/TinyStories", None),
}
_ALIASES = {
    "wikitext2": "wikitext2",
    "wikitext-2": "wikitext2",
    "wikitext_2": "wikitext2",
    "wikitext": "wikitext2",
    "wikitext-2-raw-v1": "wikitext2",
    "salesforce/wikitext": "wikitext2",
    "tinystories": "tinystories",
    "tiny_stories": "tinystories",
    "tiny-stories": "tinystories",
    "roneneldan/tinystories": "tinystories",
}

_EXTENSIONS = (".txt.gz", ".txt", ".jsonl", ".parquet")
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "dev": "valid",
    "test": "test",
}


def _trim(rows: list[str], limit: int | None) -> list[str]:
    if limit is None:
        return rows
    if limit < 0:
        raise DataError(f"row limit must be >= 0 or None, got {limit}")
    return rows[:limit]


def _count(kept: list[str], total: int) -> str:
    return f"{len(kept)}/{total} rows"


def load_corpus(
    name_or_path: str | os.PathLike,
    split_rows: tuple[int | None, int | None] | None = (50000, 5000),
    source: str = "auto",
    *,
    hub_timeout: float = 3.0,
    valid_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
) -> Corpus:
    """Load a named corpus ("wikitext2", "tinystories") or a local file/folder.

    ``split_rows``: (train_rows, valid_rows) kept from the start of each split, as the paper
    (50,000 / 5,000); ``None`` (or a ``None`` entry) keeps everything. The test split is never
    trimmed. ``source``: "auto" (hub, else the shipped copy), "hub", "shipped"; for a local path
    "auto" or "local". ``hub_timeout``: seconds allowed for the hub reachability probe. The warning
    that "auto" fell back to the shipped copy is given once per cache (``cache_dir``, default
    :func:`default_cache_dir`), until the hub answers again: the source line says the rest.

    Known names win over same-named folders in the working directory; write ``./name`` for
    the folder. Local files: ``.txt``/``.txt.gz`` (one row per line), ``.jsonl`` (field
    ``text``), ``.parquet`` (column ``text``), or a folder of them (recursive, sorted). A folder
    with train/valid(ation)/test files uses them as splits; otherwise, and for a single file,
    the last ``valid_fraction`` of the rows is held out as validation.
    """
    if split_rows is None:
        split_rows = (None, None)
    split_rows = (split_rows[0], split_rows[1])
    if source not in ("auto", "hub", "shipped", "local"):
        raise DataError(f"unknown source {source!r} (use 'auto', 'hub', 'shipped' or 'local')")

    raw = os.fspath(name_or_path)
    key = _ALIASES.get(raw.strip().lower())
    looks_like_path = (
        os.sep in raw or "/" in raw or raw.startswith((".", "~")) or raw.lower().endswith(_EXTENSIONS)
        or Path(raw).suffix != ""
    )
    if key is not None and not raw.startswith((".", "/", "~")):
        if source == "local":
            raise DataError(f"{raw!r}: source='local' needs a path, not a corpus name")
        return _load_named(key, split_rows, source, hub_timeout, cache_dir)

    path = Path(raw).expanduser()
    if path.exists():
        if source in ("hub", "shipped"):
            raise DataError(f"{path}: source={source!r} only applies to named corpora {sorted(KNOWN_CORPORA)}")
        return _load_local(path, split_rows, valid_fraction)
    if looks_like_path:
        raise DataError(f"{path}: no such file or directory")
    raise DataError(
        f"{raw!r}: unknown corpus name (known: {', '.join(sorted(KNOWN_CORPORA))}) and no such path"
    )


# ---- named corpora: hub ---------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_offline_env() -> bool:
    return _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")


def _probe_hub(dataset_id: str, timeout: float) -> tuple[bool, str | None]:
    """Can the hub be reached within ``timeout`` s? (HEAD request; honours proxy env vars).

    Runs in a daemon thread joined with a hard deadline so that a hanging DNS lookup cannot
    block. Any HTTP answer (even 4xx/5xx) counts as reachable. Without this probe,
    ``datasets.load_dataset`` retries for ~25 s before giving up on a machine without network.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/datasets/{dataset_id}"
    result: dict = {}

    def target() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout):
                pass
            result["ok"] = True
        except urllib.error.HTTPError:
            result["ok"] = True
        except Exception as e:  # URLError, socket errors, timeouts, ...
            # URLError's reason ("[Errno -2] Name or service not known") reads better than its repr
            result["err"] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"

    th = threading.Thread(target=target, name="gam-hub-probe", daemon=True)
    th.start()
    th.join(timeout + 0.5)
    if result.get("ok"):
        return True, None
    return False, result.get("err") or f"no answer from {endpoint} within {timeout:g}s"


def _load_hub(key: str, split_rows: tuple[int | None, int | None]) -> Corpus:
    import datasets  # imported lazily: ~1 s

    path, config = KNOWN_CORPORA[key]
    # Never trust_remote_code: both datasets are plain parquet on the hub.
    ds = datasets.load_dataset(path, config)
    if "train" not in ds or "validation" not in ds:
        raise DataError(f"hub {path}: expected 'train' and 'validation' splits, got {list(ds)}")

    def rows(split: str, limit: int | None) -> tuple[list[str], int]:
        d = ds[split]
        total = len(d)
        n = total if limit is None else min(limit, total)
        return [t if t is not None else "" for t in d.select(range(n))["text"]], total

    train, n_tr = rows("train", split_rows[0])
    valid, n_va = rows("validation", split_rows[1])
    test = rows("test", None)[0] if "test" in ds else None
    cfg = f"/{config}" if config else ""
    src = f"hub: {path}{cfg} (train {_count(train, n_tr)}, validation {_count(valid, n_va)}"
    src += f", test {len(test)} rows)" if test is not None else ")"
    corpus = Corpus(key, src, train, valid, test, split_rows)
    cached = ds["train"].cache_files
    # datasets caches a hub copy under .../<config>/<version>/<revision>/: the repository's commit
    revision = Path(cached[0]["filename"]).parent.name if cached else None
    corpus.files = {f"hub:{path}{cfg}": {"dataset": path, "config": config, "revision": revision,
                                         "sha256": corpus.fingerprint(("train", "valid", "test"))}}
    return corpus


def _fallback_marker(dataset_id: str, cache_dir: str | os.PathLike | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "hub-fallback-warned" / re.sub(r"[^\w.-]", "_", dataset_id)


def _first_fallback(dataset_id: str, cache_dir: str | os.PathLike | None, reason: str) -> bool:
    """Whether this is the cache's first fallback to the shipped copy of ``dataset_id`` (it is
    then remembered): on a machine without the hub every command would repeat the warning."""
    marker = _fallback_marker(dataset_id, cache_dir)
    if marker.exists():
        return False
    try:
        with atomic_write(marker, "w") as f:
            f.write(reason + "\n")
    except OSError:  # a read-only cache: warn every time rather than never
        pass
    return True


def _load_named(key: str, split_rows, source: str, hub_timeout: float,
                cache_dir: str | os.PathLike | None = None) -> Corpus:
    if source == "shipped":
        return _load_shipped(key, split_rows)
    dataset_id = KNOWN_CORPORA[key][0]
    offline = _hub_offline_env()
    reason = None
    if offline and source == "auto":
        # Offline mode: load_dataset answers from the local HF cache (or fails) immediately.
        pass
    elif not offline:
        ok, reason = _probe_hub(dataset_id, hub_timeout)
        if not ok:
            reason = f"hub unreachable ({reason})"
            if source == "hub":
                raise DataError(f"{dataset_id}: {reason}")
    if reason is None:
        try:
            corpus = _load_hub(key, split_rows)
            with contextlib.suppress(OSError):  # the hub answers again: the next fallback is news, and warns
                _fallback_marker(dataset_id, cache_dir).unlink(missing_ok=True)
            return corpus
        except DataError:
            if source == "hub":
                raise
            reason = "hub copy has unexpected layout"
        except Exception as e:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, ...
            if source == "hub":
                raise DataError(f"{dataset_id}: hub load failed: {type(e).__name__}: {e}") from e
            reason = f"hub load failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if offline and "offline" not in reason.lower():
            reason += " [HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set]"
    corpus = _load_shipped(key, split_rows)
    corpus.fallback_reason = reason
    # Offline, the shipped copy is what the user asked for: no message. Otherwise once per cache.
    if not offline and _first_fallback(dataset_id, cache_dir, reason):
        # One line (the CLI prints it as "gam CMD: warning: ..."); the corpus source says the rest.
        warnings.warn(f"{dataset_id}: {reason}; using the shipped copy "
                      f"(--data-source shipped or HF_HUB_OFFLINE=1 skips this check)", DataWarning, stacklevel=3)
    return corpus


# ---- named corpora: shipped copies ----------------------------------------------------------


def _read_lines(text: str) -> list[str]:
    """Split text into lines like a line-per-row text file (``\\n``, optional ``\\r``)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _shipped_text(rel: str, read: dict[str, dict]) -> str:
    """The text of a shipped corpus file; records it in ``read``."""
    p = CORPORA_DIR / rel
    try:
        data = gzip.decompress(p.read_bytes())
        read[rel] = _file_record(p)
    except FileNotFoundError:
        raise DataError(f"{p}: shipped corpus file missing (broken installation?)") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{p}: unreadable shipped corpus file ({type(e).__name__}: {e})") from None
    return _decode(data, p)


def _file_record(path: Path) -> dict:
    """What a run records of a corpus file it read: where, how large, its sha256."""
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_of_file(path)}


_STORY_START = re.compile(r"^(Once upon a time|Once there\b|Once, there\b)")


def _tinystories_train_rows(text: str) -> list[str]:
    # Rows were written as text + "\n"; paragraphs inside a story are separated by "\n\n".
    pieces = re.split(r"(?<!\n)\n(?!\n)", text)
    return [p for p in pieces if p.strip()]


def _tinystories_valid_rows(text: str) -> list[str]:
    # Rows and paragraphs are both separated by "\n\n": regroup paragraphs into stories,
    # starting a new story at each "Once upon a time" / "Once there" paragraph (approximate).
    stories: list[list[str]] = []
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        if not stories or _STORY_START.match(para.lstrip()):
            stories.append([para])
        else:
            stories[-1].append(para)
    return ["\n\n".join(s) for s in stories]


def _load_shipped(key: str, split_rows) -> Corpus:
    read: dict[str, dict] = {}
    if key == "wikitext2":
        train_all = _read_lines(_shipped_text("wikitext-2/train.txt.gz", read))
        valid_all = _read_lines(_shipped_text("wikitext-2/valid.txt.gz", read))
        test = _read_lines(_shipped_text("wikitext-2/test.txt.gz", read))
        train, valid = _trim(train_all, split_rows[0]), _trim(valid_all, split_rows[1])
        src = (
            "shipped: WikiText-2 tokenized release (wikitext-2-v1, rare words as <unk>; not the "
            f"paper's raw release), train {_count(train, len(train_all))}, "
            f"valid {_count(valid, len(valid_all))}, test {len(test)} rows"
        )
        return Corpus(key, src, train, valid, test, split_rows, files=read)
    if key == "tinystories":
        train_all = _tinystories_train_rows(
            _shipped_text("tinystories/TinyStories-train_first1000rows.txt.gz", read))
        valid_all = _tinystories_valid_rows(
            _shipped_text("tinystories/TinyStories-valid_head.txt.gz", read))
        train, valid = _trim(train_all, split_rows[0]), _trim(valid_all, split_rows[1])
        src = (
            "shipped: TinyStories partial sample (roneneldan/TinyStories train rows 0-999 split "
            "on single newlines; validation head regrouped into ~stories; paper uses 50000/5000 "
            f"rows), train {_count(train, len(train_all))}, valid {_count(valid, len(valid_all))}"
        )
        return Corpus(key, src, train, valid, None, split_rows, files=read)
    raise DataError(f"{key!r}: no shipped copy")  # pragma: no cover


# ---- local files ----------------------------------------------------------------------------


def _decode(data: bytes, path: Path) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        n = text.count("\ufffd")
        warnings.warn(
            f"{path}: not valid UTF-8; {n} undecodable byte sequence(s) replaced with U+FFFD",
            DataWarning,
            stacklevel=4,
        )
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def _ext(path: Path) -> str | None:
    name = path.name.lower()
    for e in _EXTENSIONS:
        if name.endswith(e):
            return e
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (PermissionError, IsADirectoryError, OSError) as e:
        raise DataError(f"{path}: unreadable file ({type(e).__name__}: {e.strerror or e})") from None


def _read_file_rows(path: Path) -> list[str]:
    ext = _ext(path)
    if ext is None:
        raise DataError(
            f"{path}: unknown extension {''.join(path.suffixes) or '(none)'!r} "
            f"(supported: {', '.join(_EXTENSIONS)})"
        )
    if ext == ".txt":
        return _read_lines(_decode(_read_bytes(path), path))
    if ext == ".txt.gz":
        raw = _read_bytes(path)
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, ValueError, zlib.error) as e:  # zlib.error: corrupt compressed data
            raise DataError(f"{path}: unreadable gzip file ({type(e).__name__}: {e})") from None
        return _read_lines(_decode(data, path))
    if ext == ".jsonl":
        text = _decode(_read_bytes(path), path)
        rows = []
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "text" not in rec:
                raise DataError(f"{path}: line {i}: record has no 'text' field")
            t = rec["text"]
            if t is None:
                t = ""
            if not isinstance(t, str):
                raise DataError(f"{path}: line {i}: 'text' is {type(t).__name__}, not a string")
            rows.append(t)
        return rows
    if ext == ".parquet":
        return _read_parquet(path)
    raise AssertionError(ext)  # pragma: no cover


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except PermissionError as e:
        raise DataError(f"{path}: unreadable file ({e.strerror or e})") from None
    except Exception as e:  # ArrowInvalid for corrupt files
        raise DataError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f"{path}: parquet has no 'text' column (columns: {', '.join(names) or 'none'})")
    try:
        col = pf.read(columns=["text"]).column("text")
    except Exception as e:
        raise DataError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None
    typ = col.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        try:
            return [t if t is not None else "" for t in col.to_pylist()]
        except UnicodeDecodeError:
            col = col.cast(pa.large_binary())
            typ = col.type
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        vals = [b if b is not None else b"" for b in col.to_pylist()]
        joined = b"\n".join(vals)
        try:
            joined.decode("utf-8")
            bad = False
        except UnicodeDecodeError:
            bad = True
        if bad:
            warnings.warn(
                f"{path}: not valid UTF-8; undecodable byte sequences replaced with U+FFFD",
                DataWarning,
                stacklevel=4,
            )
        return [b.decode("utf-8", errors="replace") for b in vals]
    raise DataError(f"{path}: parquet 'text' column has type {typ}, not string")


def _nonempty(rows: Iterable[str]) -> bool:
    return any(r.strip() for r in rows)


def _holdout(rows: list[str], fraction: float, where: Path) -> tuple[list[str], list[str]]:
    if len(rows) < 2:
        raise DataError(f"{where}: only {len(rows)} row(s); need >= 2 to hold out a validation split")
    n_valid = min(len(rows) - 1, max(1, int(math.floor(len(rows) * fraction))))
    return rows[: len(rows) - n_valid], rows[len(rows) - n_valid:]


def _split_of(rel: Path) -> str | None:
    """train/valid/test from a file's name (tokens split on . _ - space) or its folders."""
    name = rel.name
    ext = _ext(rel)
    stem = name[: len(name) - len(ext)] if ext else name
    for part in [stem, *reversed(rel.parts[:-1])]:
        for tok in re.split(r"[._\-\s]+", part.lower()):
            if tok in _SPLIT_WORDS:
                return _SPLIT_WORDS[tok]
    return None


def _load_local(path: Path, split_rows, valid_fraction: float) -> Corpus:
    path = path.resolve()
    name = path.name
    for e in _EXTENSIONS:
        if name.lower().endswith(e):
            name = name[: -len(e)]
    held = f"last {valid_fraction:.0%} of rows held out as valid"
    test = None
    read: list[Path] = []  # the files whose rows are used, recorded below
    if path.is_file():
        read.append(path)
        rows = _read_file_rows(path)
        if not _nonempty(rows):
            raise DataError(f"{path}: empty corpus (no text)")
        train_all, valid_all = _holdout(rows, valid_fraction, path)
        how = f"{_ext(path)}; {held}"
    elif path.is_dir():
        files = sorted(
            (p for p in path.rglob("*")
             if p.is_file() and _ext(p) and not any(s.startswith(".") for s in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(f"{path}: empty corpus (no {'/'.join(_EXTENSIONS)} files in folder)")
        by_split: dict[str | None, list[Path]] = {}
        for f in files:
            by_split.setdefault(_split_of(f.relative_to(path)), []).append(f)
        named = {k: v for k, v in by_split.items() if k is not None}
        if named:
            if "train" not in named:
                raise DataError(f"{path}: folder has {'/'.join(sorted(named))} files but no train file")
            for f in by_split.get(None, []):
                warnings.warn(f"{f}: not a train/valid/test file; ignored", DataWarning, stacklevel=3)

            def rows_of(split: str) -> list[str]:
                out: list[str] = []
                for f in named.get(split, []):
                    read.append(f)
                    out.extend(_read_file_rows(f))
                return out

            train_all = rows_of("train")
            if not _nonempty(train_all):
                raise DataError(f"{path}: empty corpus (train files have no text)")
            if "valid" in named:
                valid_all = rows_of("valid")
                if not _nonempty(valid_all):
                    raise DataError(f"{path}: empty corpus (valid files have no text)")
                how = "folder splits"
            else:
                train_all, valid_all = _holdout(train_all, valid_fraction, path)
                how = f"folder splits; no valid files, {held} from train"
            if "test" in named:
                test = rows_of("test")
        else:
            rows = []
            for f in files:
                read.append(f)
                rows.extend(_read_file_rows(f))
            if not _nonempty(rows):
                raise DataError(f"{path}: empty corpus (no text in {len(files)} file(s))")
            train_all, valid_all = _holdout(rows, valid_fraction, path)
            how = f"{len(files)} file(s) concatenated in sorted order; {held}"
    else:
        raise DataError(f"{path}: not a regular file or folder")
    train, valid = _trim(train_all, split_rows[0]), _trim(valid_all, split_rows[1])
    if not _nonempty(train):
        raise DataError(f"{path}: empty corpus (train rows kept after trimming have no text)")
    src = f"local: {path} ({how}; train {_count(train, len(train_all))}, valid {_count(valid, len(valid_all))}"
    src += f", test {len(test)} rows)" if test is not None else ")"
    files = {(f.name if f == path else f.relative_to(path).as_posix()): _file_record(f) for f in read}
    return Corpus(name, src, train, valid, test, split_rows, files=files)

# --------------------------------------------------------------------------------------------
# Cache folder
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where tokenizers and token files derived from corpora are cached:
    ``$GAM_CACHE_DIR`` or ``~/.cache/gam``."""
    env = os.environ.get("GAM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gam"
