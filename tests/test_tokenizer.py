"""Tests for gam.tokenizer: the round-trip byte-level BPE, the paper's recipe, caching, streaming."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from gam import data as D
from gam import tokenizer as T
from gam.corpus import DataError

MIXED = ("Hello world, the history of Café naïve — Ελληνικά, 東京タワー and 한국어; emoji 🙂🎉👍🏽 "
         "(flag 🇫🇷). The <unk> was a<unk>b! \"Quotes\" 'single' [brackets] {braces} 3.14 -- 50% & $5?\n"
         "tabs\tand  double  spaces,\r\nline ends\n\n and trailing space ")


@pytest.fixture(scope="module")
def wikitext_tokenizer():
    corpus = D.load_corpus("wikitext2", source="shipped", split_rows=(3000, 10))
    return T.train_tokenizer(T.row_texts("bytelevel", corpus.train), 2000)


def test_bytelevel_round_trips_mixed_text(wikitext_tokenizer):
    tok = wikitext_tokenizer
    for text in (MIXED, "", " ", "\n", "Café", "🙂", " <unk> <unk>", "\x00\x7f\u200b", "x" * 500):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text, text
    assert tok.get_vocab_size() == 2000


def test_bytelevel_keeps_unk_whole_and_learns_words(wikitext_tokenizer):
    tok = wikitext_tokenizer
    unk, spaced_unk = tok.token_to_id("<unk>"), tok.token_to_id(" <unk>")
    assert tok.encode(" <unk>").ids == [spaced_unk] and tok.encode("<unk>").ids == [unk]
    assert tok.encode("a <unk> b").ids.count(spaced_unk) == 1
    assert [tok.token_to_id(t) for t in T.BYTELEVEL_SPECIAL_TOKENS + T.TEXT_TOKENS] == [0, 1, 2, 3]
    assert len(tok.encode(" the history of").ids) == 3  # frequent words are single tokens
    cfg = json.loads(tok.to_str())
    assert cfg["pre_tokenizer"]["type"] == "ByteLevel" and cfg["decoder"]["type"] == "ByteLevel"
    assert cfg["normalizer"] is None  # a normalizer would change the text (no round trip)


def test_special_tokens_decode_to_nothing_and_roles(wikitext_tokenizer):
    tok = wikitext_tokenizer
    ids = tok.encode("a b").ids
    assert tok.decode([tok.token_to_id("<|endoftext|>")] + ids + [tok.token_to_id("<|pad|>")]) == "a b"
    assert T.special_token_roles(tok) == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                          "pad_token": "<|pad|>"}


def test_paper_recipe_is_exact_and_does_not_round_trip():
    rows = [f"the quick brown fox {i} jumps over the lazy dog." for i in range(200)]
    t0 = time.perf_counter()
    tok = T.train_tokenizer(rows, vocab_size=300, kind="paper")
    assert time.perf_counter() - t0 < 2
    cfg = json.loads(tok.to_str())
    assert cfg["model"]["type"] == "BPE" and cfg["model"]["unk_token"] == "[UNK]"
    assert cfg["pre_tokenizer"]["type"] == "Whitespace" and cfg["decoder"] is None
    assert [tok.token_to_id(t) for t in T.PAPER_SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= 300
    assert T.train_tokenizer(rows, vocab_size=300, kind="paper").to_str() == tok.to_str()  # deterministic
    # Whitespace forgets where words begin: punctuation is spaced out, unknown letters become [UNK]
    assert tok.decode(tok.encode("the dog.").ids) == "the dog ."
    assert tok.decode(tok.encode("the cafÉ").ids) != "the cafÉ"
    assert T.special_token_roles(tok) == {"unk_token": "[UNK]", "pad_token": "[PAD]", "bos_token": "[SOS]",
                                          "eos_token": "[EOS]"}


def test_bytelevel_is_deterministic_and_checks_vocab():
    rows = T.row_texts("bytelevel", [f"the quick brown fox {i}." for i in range(100)])
    assert T.train_tokenizer(rows, 300).to_str() == T.train_tokenizer(rows, 300).to_str()
    with pytest.raises(DataError, match="vocab_size must be >= 260 for the bytelevel tokenizer"):
        T.train_tokenizer(rows, 100)
    with pytest.raises(DataError, match="unknown tokenizer 'wordpiece'"):
        T.train_tokenizer(rows, 300, "wordpiece")


def test_tokenizer_kind_is_read_from_the_tokenizer(wikitext_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert T.tokenizer_kind(wikitext_tokenizer) == "bytelevel"
    assert T.tokenizer_kind(T.train_tokenizer(["a b c"], 20, "paper")) == "paper"
    other = Tokenizer(models.BPE(unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Metaspace()
    other.add_special_tokens(["[UNK]", "<|endoftext|>"])
    assert T.tokenizer_kind(other) == "custom"
    assert T.special_token_roles(other) == {"unk_token": "[UNK]", "bos_token": "<|endoftext|>",
                                            "eos_token": "<|endoftext|>"}
    assert T.row_texts("custom", ["a", "b"]) == ["a", "b"]


def test_row_texts():
    assert T.row_texts("paper", ["a", "", "b\n"]) == ["a", "", "b\n"]
    assert T.row_texts("bytelevel", ["a", "", " ", "b\n"]) == ["a\n", "", " \n", "b\n"]


def test_stream_decoder_equals_decode_and_holds_back_partial_characters(wikitext_tokenizer):
    tok = wikitext_tokenizer
    ids = tok.encode(MIXED).ids
    decoder = T.StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == MIXED
    assert not any("\ufffd" in p for p in pieces)  # no half character is ever printed
    emoji = tok.encode("🙂").ids
    assert len(emoji) > 1  # one character over several byte tokens
    decoder = T.StreamDecoder(tok, tok.encode("Hi ").ids)
    assert [decoder.push(i) for i in emoji] == [""] * (len(emoji) - 1) + ["🙂"]
    # a stream cut inside a character ends with U+FFFD, as decode() gives
    decoder = T.StreamDecoder(tok)
    partial = [decoder.push(i) for i in emoji[:-1]] + [decoder.flush()]
    assert "".join(partial) == tok.decode(emoji[:-1]) == "\ufffd"
    assert T.StreamDecoder(tok).push(tok.token_to_id("<|endoftext|>")) == ""


def test_stream_decoder_paper_tokenizer_follows_decode():
    tok = T.train_tokenizer(["the cat sat on the mat", "a dog ran"] * 4, 60, "paper")
    ids = tok.encode("the cat sat").ids
    decoder = T.StreamDecoder(tok, ids[:1])
    assert "".join(decoder.push(i) for i in ids[1:]) == tok.decode(ids)[len(tok.decode(ids[:1])):]


def test_get_tokenizer_cache_hit_and_key(tmp_path, monkeypatch):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    path = tmp_path / "small.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, size=12)) + f" {i}." for i in range(400)) + "\n")
    corpus = D.load_corpus(path)
    n = {"train": 0}
    real = T.train_tokenizer

    def counting(*a, **k):
        n["train"] += 1
        return real(*a, **k)

    monkeypatch.setattr(T, "train_tokenizer", counting)
    cache = tmp_path / "cache"
    t1 = T.get_tokenizer(corpus, 300, cache)
    files = list((cache / "tokenizers").glob("*.json"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    t2 = T.get_tokenizer(D.load_corpus(path), 300, cache)
    assert n["train"] == 1 and t1.to_str() == t2.to_str()
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    T.get_tokenizer(corpus, 280, cache)  # other vocab size -> new entry
    T.get_tokenizer(D.load_corpus(path, split_rows=(100, 5000)), 300, cache)  # other rows
    paper = T.get_tokenizer(corpus, 300, cache, kind="paper")  # other kind
    assert n["train"] == 4 and T.tokenizer_kind(paper) == "paper"
    meta = json.loads(next((cache / "tokenizers").glob("small-paper-v300-*.meta.json")).read_text())
    assert meta["kind"] == "paper" and meta["tokenizer_hash"] == T.tokenizer_hash(paper)
    # default cache dir comes from GAM_CACHE_DIR
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "envcache"))
    assert D.default_cache_dir() == tmp_path / "envcache"
    T.get_tokenizer(corpus, 300)
    assert list((tmp_path / "envcache" / "tokenizers").glob("small-bytelevel-v300-*.json"))


def test_which_runs_use_which_tokenizer():
    from gam.bench.trained import bench_preset
    from gam.train import TrainConfig, preset

    assert TrainConfig().tokenizer == "bytelevel"
    assert TrainConfig(**preset("cpu")[1]).tokenizer == "bytelevel"
    assert TrainConfig(**preset("paper")[1]).tokenizer == "paper"
    for bench in ("paper", "ablation"):  # the benches take the preset's tokenizer
        assert bench_preset("paper", bench, "cpu")[1]["tokenizer"] == "paper"
        assert bench_preset("cpu", bench, "cpu")[1].get("tokenizer", "bytelevel") == "bytelevel"
