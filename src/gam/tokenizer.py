"""The tokenizers a model is trained with: a round-trip byte-level BPE, and the paper's recipe.

Two kinds, trained with the ``tokenizers`` library on the training corpus:

* ``bytelevel`` (the default): byte-level BPE as GPT-2's (ByteLevel pre-tokenizer and decoder,
  no normalizer, all 256 bytes in the base alphabet), so ``decode(encode(text)) == text`` for any
  UTF-8 text: words keep their spaces, punctuation stays attached, accents, CJK and emoji come
  back as typed. WikiText's ``<unk>`` (and `` <unk>`` with its leading space, how it appears in
  WikiText) is kept whole as one token that decodes to itself. Specials: ``<|endoftext|>``
  (bos/eos) and ``<|pad|>``; they are never produced from ordinary text and decode to nothing.
* ``paper``: exactly the paper's recipe (BPE(unk_token="[UNK]"), Whitespace pre-tokenizer, no
  decoder, specials ["[UNK]", "[PAD]", "[SOS]", "[EOS]"]). It does not round-trip: the
  Whitespace pre-tokenizer forgets where words begin, so a decode puts a space between every
  two tokens ("Hel lo world ,") and text outside the training alphabet becomes [UNK].

Per-token perplexities of the two kinds are not comparable (they split the same text into a
different number of tokens).

Tokenizers are cached as JSON under ``<cache_dir>/tokenizers/``, keyed by the kind, the corpus
(name, source, row limits, a fingerprint of the rows), the vocabulary size and the training
splits; :mod:`gam.data` keys its token cache on the same path. The kinds are listed in
:data:`gam.config.TOKENIZER_KINDS` (which ``gam train --help`` reads without this module).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from gam.config import TOKENIZER_KINDS
from gam.corpus import Corpus, DataError, DataWarning, default_cache_dir
from gam.fileio import atomic_write

__all__ = [
    "PAPER_SPECIAL_TOKENS",
    "BYTELEVEL_SPECIAL_TOKENS",
    "TEXT_TOKENS",
    "train_tokenizer",
    "tokenizer_kind",
    "row_texts",
    "tokenizer_hash",
    "tokenizer_path",
    "get_tokenizer",
    "special_token_roles",
    "StreamDecoder",
]

log = logging.getLogger(__name__)

PAPER_SPECIAL_TOKENS = ["[UNK]", "[PAD]", "[SOS]", "[EOS]"]
BYTELEVEL_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
# Kept whole and decoded as text (not special): WikiText marks rare words with <unk>.
TEXT_TOKENS = ["<unk>", " <unk>"]
_CACHE_FORMAT = 2  # bump to invalidate every cached tokenizer
_RECIPES = {
    "bytelevel": "BPE + ByteLevel(add_prefix_space=False) pre-tokenizer and decoder, 256-byte alphabet; "
                 "specials <|endoftext|>,<|pad|>; <unk> and ' <unk>' kept whole as text",
    "paper": "BPE(unk=[UNK]) + Whitespace + BpeTrainer(specials=[UNK],[PAD],[SOS],[EOS])",
}
# Which special token plays which role in transformers (bos/eos/pad/unk).
_ROLES = {
    "bytelevel": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
    "paper": {"unk_token": "[UNK]", "pad_token": "[PAD]", "bos_token": "[SOS]", "eos_token": "[EOS]"},
}


def _check_kind(kind: str) -> None:
    if kind not in TOKENIZER_KINDS:
        raise DataError(f"unknown tokenizer {kind!r} (choose from {', '.join(TOKENIZER_KINDS)})")


def _min_vocab(kind: str) -> int:
    if kind == "paper":
        return len(PAPER_SPECIAL_TOKENS) + 1
    return 256 + len(BYTELEVEL_SPECIAL_TOKENS) + len(TEXT_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 10000, kind: str = "bytelevel", *,
                    show_progress: bool = False):
    """Train a ``tokenizers.Tokenizer`` of ``kind`` on ``texts`` (see the module docstring).

    ``get_vocab_size()`` can come out below ``vocab_size`` on a small corpus; the model must use
    the tokenizer's value. Deterministic: the same texts give the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    _check_kind(kind)
    if vocab_size < _min_vocab(kind):
        raise DataError(f"vocab_size must be >= {_min_vocab(kind)} for the {kind} tokenizer, got {vocab_size}")
    texts = texts if isinstance(texts, list) else list(texts)
    if kind == "paper":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = BpeTrainer(special_tokens=list(PAPER_SPECIAL_TOKENS), vocab_size=vocab_size,
                             show_progress=show_progress)
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return tok
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The trainer gives its special tokens the first ids and never merges them; the text tokens
    # ride along so they get stable low ids too, then lose the special flag below, so decoding
    # (which skips specials) keeps them.
    trainer = BpeTrainer(special_tokens=BYTELEVEL_SPECIAL_TOKENS + TEXT_TOKENS, vocab_size=vocab_size,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in TEXT_TOKENS:
            added["special"] = False
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_kind(tokenizer) -> str:
    """``"bytelevel"`` or ``"paper"``, read from the tokenizer itself (so the paper tokenizers
    of old checkpoints, saved before the kind was recorded, are recognized), or ``"custom"``
    for a tokenizer gam did not train (one passed to ``prepare_data(tokenizer=...)``): its rows
    are encoded as the paper's and its text is whatever its ``decode`` gives."""
    spec = json.loads(tokenizer.to_str())
    pre, decoder = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    if pre.get("type") == "ByteLevel" and decoder.get("type") == "ByteLevel":
        return "bytelevel"
    if pre.get("type") == "Whitespace" and not decoder:
        return "paper"
    return "custom"


def row_texts(kind: str, rows: Sequence[str]) -> list[str]:
    """The text each corpus row contributes, for training and encoding.

    ``paper``: the row as is (the paper encodes rows separately and concatenates the ids, so row
    boundaries leave no trace), as for a custom tokenizer. ``bytelevel``: the row as a line of a text file, ending in one
    newline (rows read from the hub already end in one; rows from line-per-row files get it back),
    so the model learns where lines end and decoded text keeps them. Empty rows contribute nothing.
    """
    if kind != "bytelevel":
        return list(rows)
    return [r if (not r or r.endswith("\n")) else r + "\n" for r in rows]


def tokenizer_hash(tokenizer) -> str:
    """Short content hash of a tokenizer (its JSON serialisation)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def _cache_key(corpus: Corpus, vocab_size: int, splits: Sequence[str], kind: str) -> tuple[str, dict]:
    meta = {
        "format": _CACHE_FORMAT,
        "kind": kind,
        "recipe": _RECIPES[kind],
        "corpus": corpus.name,
        "source": corpus.source,
        "split_rows": list(corpus.split_rows),
        "vocab_size": int(vocab_size),
        "tokenizer_splits": list(splits),
        "fingerprint": corpus.fingerprint(splits),
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20], meta


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40] or "corpus"


def tokenizer_path(corpus: Corpus, vocab_size: int, cache_dir, splits: Sequence[str],
                   kind: str) -> tuple[Path, dict]:
    """Where :func:`get_tokenizer` caches this tokenizer, and the metadata its key hashes."""
    _check_kind(kind)
    key, meta = _cache_key(corpus, vocab_size, splits, kind)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "tokenizers" / f"{slug(corpus.name)}-{kind}-v{vocab_size}-{key}.json", meta


def _write(path: Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def get_tokenizer(corpus: Corpus, vocab_size: int = 10000, cache_dir: str | os.PathLike | None = None,
                  *, splits: Sequence[str] = ("train",), kind: str = "bytelevel"):
    """Trained tokenizer of ``kind`` for ``corpus``, cached as JSON under ``cache_dir/tokenizers/``.

    ``splits`` defaults to the train split; ``("train", "valid", "test")`` mimics the paper's
    released script, which trains the tokenizer on every (trimmed) split. A cached tokenizer
    is used only if its hash is the one its ``.meta.json`` recorded; one that is unreadable or
    edited is retrained, with a warning, never trusted.
    """
    from tokenizers import Tokenizer

    path, meta = tokenizer_path(corpus, vocab_size, cache_dir, splits, kind)
    meta_path = path.with_suffix(".meta.json")
    if path.exists():
        try:
            tok = Tokenizer.from_file(str(path))
            recorded = json.loads(meta_path.read_text())["tokenizer_hash"]
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        else:
            if tokenizer_hash(tok) == recorded:
                log.info("tokenizer cache hit: %s", path)
                return tok
            problem = f"does not match its {meta_path.name} (hash {tokenizer_hash(tok)}, recorded {recorded})"
        warnings.warn(f"cached tokenizer {path}: {problem}; retraining", DataWarning, stacklevel=3)
    texts: list[str] = []
    for s in splits:
        if s == "test" and corpus.test is None:
            continue
        texts.extend(corpus.split(s))
    if not any(t.strip() for t in texts):
        raise DataError(f"{corpus.name}: empty corpus (no text to train the tokenizer on)")
    from gam.progress import heartbeat

    t0 = time.perf_counter()
    with heartbeat(f"training the {kind} tokenizer on {len(texts):,} rows"):  # minutes on a large corpus
        tok = train_tokenizer(row_texts(kind, texts), vocab_size, kind)
    log.info("trained %s tokenizer (vocab %d) on %d rows in %.1fs", kind, tok.get_vocab_size(), len(texts),
             time.perf_counter() - t0)
    _write(path, tok.to_str().encode("utf-8"))
    meta = dict(meta, tokenizer_hash=tokenizer_hash(tok), actual_vocab_size=tok.get_vocab_size())
    _write(meta_path, json.dumps(meta, indent=1).encode())
    return tok


def special_token_roles(tokenizer) -> dict[str, str]:
    """transformers roles (bos_token, eos_token, pad_token, unk_token) of the tokenizer's specials."""
    kind = tokenizer_kind(tokenizer)
    # a custom tokenizer gets whichever of gam's special tokens it has, the paper's first
    candidates = [_ROLES[kind]] if kind in _ROLES else [_ROLES["paper"], _ROLES["bytelevel"]]
    roles: dict[str, str] = {}
    for table in candidates:
        for role, tok in table.items():
            if role not in roles and tokenizer.token_to_id(tok) is not None:
                roles[role] = tok
    return roles


def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable characters byte-level tokens are spelled with to bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class StreamDecoder:
    """Text of a token stream, one token at a time, for printing as it is generated.

    Byte-level tokens can end inside a multi-byte UTF-8 character (an emoji spans several
    tokens): their bytes go through an incremental UTF-8 decoder, which holds an incomplete
    character back until its last byte arrives (invalid bytes become U+FFFD, as ``decode``
    does). The concatenated pieces equal ``tokenizer.decode`` of the whole stream. Special
    tokens print nothing, as ``decode`` skips them. For the paper's tokenizer (no decoder),
    each piece is the growth of ``decode`` over the ids so far.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.kind = tokenizer_kind(tokenizer)
        self.ids = list(context_ids)
        if self.kind == "bytelevel":
            spec = json.loads(tokenizer.to_str())
            self._added = {a["id"]: (a["content"], a["special"]) for a in spec["added_tokens"]}
            self._bytes = _byte_decoder()
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._printed = tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        """The text token ``token_id`` adds (possibly "" while a character is incomplete)."""
        token_id = int(token_id)
        self.ids.append(token_id)
        if self.kind != "bytelevel":
            text = self.tokenizer.decode(self.ids)
            common = len(os.path.commonprefix([self._printed, text]))
            new, self._printed = text[common:], text
            return new
        if token_id in self._added:
            content, special = self._added[token_id]
            if special:
                return ""
            return self._utf8.decode(content.encode("utf-8"))
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the tokenizer's vocabulary")
        return self._utf8.decode(bytes(self._bytes[c] for c in token))

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (an incomplete character: U+FFFD)."""
        return self._utf8.decode(b"", final=True) if self.kind == "bytelevel" else ""
