"""Tests for gam.corpus (corpora loading) and gam.data (token files, block datasets); the tokenizer: test_tokenizer.py."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import pickle
import time
import warnings

import numpy as np
import pytest
import torch

from gam import corpus as C
from gam import data as D
from gam import tokenizer as T
from gam.corpus import DataError, DataWarning
from gam.data import BlockDataset

LINES = [f"line {i}: the quick brown fox number {i} jumps over the lazy dog." for i in range(40)]


def _write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def _jsonl(rows):
    return "".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows))


def _parquet(path, rows, column="text"):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: rows}), path)
    return path


# ------------------------------------------------------------------------------ file formats


def test_txt_file_holds_out_last_10_percent(tmp_path):
    p = _write(tmp_path / "corpus.txt", "\n".join(LINES) + "\n")
    c = C.load_corpus(p, split_rows=None)
    assert c.train == LINES[:36] and c.valid == LINES[36:]
    assert c.test is None and c.name == "corpus"
    assert c.source.startswith(f"local: {p.resolve()}") and "held out" in c.source


def test_txt_crlf_and_row_trimming(tmp_path):
    p = _write(tmp_path / "c.txt", "\r\n".join(LINES))
    c = C.load_corpus(p, split_rows=(5, 2))
    assert c.train == LINES[:5] and c.valid == LINES[36:38]
    assert "train 5/36 rows" in c.source and "valid 2/4 rows" in c.source
    c2 = C.load_corpus(p, split_rows=(None, 1))
    assert len(c2.train) == 36 and c2.valid == [LINES[36]]


def test_txt_gz_file(tmp_path):
    p = _write(tmp_path / "c.txt.gz", gzip.compress("\n".join(LINES).encode()))
    c = C.load_corpus(p, split_rows=None)
    assert c.train + c.valid == LINES and c.name == "c"


def test_jsonl_file(tmp_path):
    p = _write(tmp_path / "c.jsonl", _jsonl(LINES[:20]) + "\n\n" + _jsonl(LINES[20:]))
    c = C.load_corpus(p, split_rows=None)
    assert c.train + c.valid == LINES and len(c.valid) == 4


def test_parquet_file(tmp_path):
    p = _parquet(tmp_path / "c.parquet", LINES[:30] + [None] + LINES[30:])
    c = C.load_corpus(p, split_rows=None)
    assert c.train + c.valid == LINES[:30] + [""] + LINES[30:]


def test_folder_without_splits_concatenates_sorted(tmp_path):
    d = tmp_path / "corpus"
    _write(d / "b.txt", "\n".join(LINES[20:]))
    _write(d / "a.jsonl", _jsonl(LINES[:20]))
    _write(d / "README.md", "# not data")
    _write(d / ".hidden.txt", "hidden")
    c = C.load_corpus(d, split_rows=None)
    assert c.train == LINES[:36] and c.valid == LINES[36:]
    assert "2 file(s)" in c.source


def test_folder_with_split_files(tmp_path):
    d = tmp_path / "corpus"
    _write(d / "wiki.train.txt", "\n".join(LINES[:30]))
    _write(d / "validation.jsonl", _jsonl(LINES[30:35]))
    _write(d / "test.txt.gz", gzip.compress("\n".join(LINES[35:]).encode()))
    c = C.load_corpus(d, split_rows=None)
    assert c.train == LINES[:30] and c.valid == LINES[30:35] and c.test == LINES[35:]
    assert "folder splits" in c.source


def test_folder_hf_layout_parquet_shards_and_valid_holdout(tmp_path):
    d = tmp_path / "hf"
    _parquet(d / "data" / "train-00000-of-00002.parquet", LINES[:10])
    _parquet(d / "data" / "train-00001-of-00002.parquet", LINES[10:30])
    _parquet(d / "data" / "validation-00000-of-00001.parquet", LINES[30:])
    c = C.load_corpus(d, split_rows=(25, None))
    assert c.train == LINES[:25] and c.valid == LINES[30:]
    # train files only: the last 10% of the train rows become valid
    e = tmp_path / "only_train"
    _write(e / "train" / "part0.txt", "\n".join(LINES))
    c2 = C.load_corpus(e, split_rows=None)
    assert c2.train == LINES[:36] and c2.valid == LINES[36:]


def test_folder_split_files_ignores_others_with_warning(tmp_path):
    d = tmp_path / "corpus"
    _write(d / "train.txt", "\n".join(LINES))
    _write(d / "valid.txt", "\n".join(LINES[:3]))
    _write(d / "notes.txt", "stray")
    with pytest.warns(DataWarning, match="notes.txt"):
        c = C.load_corpus(d, split_rows=None)
    assert c.train == LINES and c.valid == LINES[:3]


def test_undecodable_bytes_replaced_with_one_warning(tmp_path):
    p = _write(tmp_path / "bad.txt", b"hello \xff\xfe world\n" + b"ok \xc3 line\n" * 20)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        c = C.load_corpus(p, split_rows=None)
    ours = [w for w in rec if issubclass(w.category, DataWarning)]
    assert len(ours) == 1 and "bad.txt" in str(ours[0].message)
    assert "\ufffd" in c.train[0] and c.train[0].startswith("hello ")


# ------------------------------------------------------------------------------ errors


def _err(path_or_name, match, **kw):
    with pytest.raises(DataError, match=match) as ei:
        C.load_corpus(path_or_name, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    assert isinstance(ei.value, ValueError)
    return msg


def test_error_missing_path(tmp_path):
    msg = _err(tmp_path / "nope.txt", "no such file")
    assert "nope.txt" in msg
    _err(str(tmp_path / "nope_dir"), "no such file")


def test_error_unknown_corpus_name():
    msg = _err("wikitext103", "unknown corpus name")
    assert "wikitext2" in msg and "tinystories" in msg


def test_error_unknown_extension(tmp_path):
    p = _write(tmp_path / "c.csv", "text\nhello\n")
    assert "c.csv" in _err(p, "unknown extension")


def test_error_unreadable_files(tmp_path):
    p = _write(tmp_path / "c.txt.gz", b"this is not gzip data")
    assert "c.txt.gz" in _err(p, "unreadable")
    q = _write(tmp_path / "c.parquet", b"PAR1 garbage")
    _err(q, "unreadable")
    if os.geteuid() != 0:  # root can read anything
        r = _write(tmp_path / "locked.txt", "x\ny\n")
        r.chmod(0)
        try:
            _err(r, "unreadable")
        finally:
            r.chmod(0o644)


def test_error_empty_corpus(tmp_path):
    _err(_write(tmp_path / "empty.txt", b""), "empty corpus")
    _err(_write(tmp_path / "blank.txt", "\n  \n\n"), "empty corpus")
    (tmp_path / "emptydir").mkdir()
    _err(tmp_path / "emptydir", "empty corpus")
    d = tmp_path / "splits"
    _write(d / "train.txt", "a\nb\n")
    _write(d / "valid.txt", "\n")
    _err(d, "empty corpus")


def test_error_missing_text_field(tmp_path):
    p = _write(tmp_path / "c.jsonl", json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    assert "line 2" in _err(p, "no 'text' field")
    q = _parquet(tmp_path / "c.parquet", LINES, column="content")
    assert "content" in _err(q, "no 'text' column")
    _err(_write(tmp_path / "bad.jsonl", "{not json\n"), "invalid JSON")


def test_error_misc_arguments(tmp_path):
    p = _write(tmp_path / "c.txt", "\n".join(LINES))
    _err(p, "only applies to named corpora", source="hub")
    _err("wikitext2", "unknown source", source="internet")
    _err(_write(tmp_path / "one.txt", "single row\n"), "need >= 2")
    d = tmp_path / "noTrain"
    _write(d / "valid.txt", "a\nb\n")
    _err(d, "no train file")


# ------------------------------------------------------------------------------ shipped corpora


def test_shipped_files_match_sources_checksums():
    want = {
        "wikitext-2/train.txt.gz": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "wikitext-2/valid.txt.gz": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "wikitext-2/test.txt.gz": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        "tinystories/TinyStories-train_first1000rows.txt.gz":
            "c56cfd24fb1c542b141a396184b822a4db3672abdb4c49c6aa843171c5e822a5",
        "tinystories/TinyStories-valid_head.txt.gz":
            "5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6",
    }
    for rel, sha in want.items():
        f = C.CORPORA_DIR / rel
        assert f.stat().st_size < 5 * 2**20, rel
        assert hashlib.sha256(gzip.decompress(f.read_bytes())).hexdigest() == sha, rel
        assert rel in (C.CORPORA_DIR / "SOURCES.md").read_text()
    assert "CC BY-SA 3.0" in (C.CORPORA_DIR / "LICENSES.md").read_text()
    assert "CDLA-Sharing-1.0" in (C.CORPORA_DIR / "LICENSES.md").read_text()


def test_shipped_wikitext2():
    c = C.load_corpus("wikitext2", split_rows=None, source="shipped")
    assert (len(c.train), len(c.valid), len(c.test)) == (36718, 3760, 4358)
    assert c.train[1] == " = Valkyria Chronicles III = "
    assert c.valid[1] == " = Homarus gammarus = " and c.test[1] == " = Robert <unk> = "
    assert c.source.startswith("shipped: WikiText-2 tokenized release")
    # the paper's 50,000 / 5,000 trimming keeps all of WikiText-2
    c2 = C.load_corpus("WikiText-2", source="shipped")
    assert (len(c2.train), len(c2.valid)) == (36718, 3760)
    c3 = C.load_corpus("wikitext2", split_rows=(100, 10), source="shipped")
    assert c3.train == c.train[:100] and c3.valid == c.valid[:10] and len(c3.test) == 4358
    assert "train 100/36718 rows" in c3.source


def test_shipped_tinystories():
    c = C.load_corpus("tinystories", split_rows=None, source="shipped")
    assert len(c.train) == 1097 and len(c.valid) == 789 and c.test is None
    assert c.train[0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert c.train[1].startswith("Once upon a time, there was a little car named Beep.")
    assert "\n\n" in c.train[0]  # paragraphs stay inside their story
    assert c.valid[0].startswith("Spot. Spot saw the shiny car") and "\n\nAfter playing" in c.valid[0]
    assert c.valid[1].startswith("Once upon a time, in a big forest, there lived a rhinoceros")
    assert c.source.startswith("shipped: TinyStories partial sample")


# ------------------------------------------------------------------------------ hub / fallback


def _no_load(*a, **k):  # pragma: no cover - must not be called
    raise AssertionError("load_dataset must not be called")


def test_hub_fallback_on_connection_error(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path))  # a fresh cache: its first fallback warns
    calls = []

    def fail(*a, **k):
        calls.append((a, k))
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(C, "_probe_hub", lambda *a: (True, None))
    monkeypatch.setattr(datasets, "load_dataset", fail)
    t0 = time.perf_counter()
    with pytest.warns(DataWarning, match="hub load failed"):
        c = C.load_corpus("wikitext2")
    assert time.perf_counter() - t0 < 5
    assert calls and calls[0][0] == ("wikitext", "wikitext-2-raw-v1")
    assert "trust_remote_code" not in calls[0][1]
    assert c.source.startswith("shipped: WikiText-2 tokenized release")
    assert "ConnectionError" in c.fallback_reason
    with pytest.raises(DataError, match="hub load failed"):
        C.load_corpus("wikitext2", source="hub")


def test_hub_unreachable_probe_is_fast(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path))  # a fresh cache: its first fallback warns
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1:9")  # TEST-NET-1: never answers
    monkeypatch.setattr(datasets, "load_dataset", _no_load)
    t0 = time.perf_counter()
    with pytest.warns(DataWarning, match="hub unreachable"):
        c = C.load_corpus("tinystories", hub_timeout=1.0)
    assert time.perf_counter() - t0 < 4
    assert c.source.startswith("shipped: TinyStories") and "unreachable" in c.fallback_reason
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="hub unreachable"):
        C.load_corpus("tinystories", source="hub", hub_timeout=0.5)
    assert time.perf_counter() - t0 < 3


def test_hub_offline_env_skips_probe(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "_probe_hub", lambda *a: pytest.fail("probe must be skipped offline"))

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # offline, falling back to the shipped copy is silent
        c = C.load_corpus("wikitext2")
    assert c.source.startswith("shipped:") and "OfflineModeIsEnabled" in c.fallback_reason


def test_the_fallback_warning_comes_once_per_cache_until_the_hub_answers(monkeypatch, tmp_path):
    """Without the hub every command warned again, a resume of a run trained on the shipped copy
    too; the corpus source (printed on every run) still says which copy was used."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(C, "_probe_hub", lambda *a: (False, "no network here"))
    with pytest.warns(DataWarning, match=r"hub unreachable \(no network here\); using the shipped copy"):
        C.load_corpus("tinystories", cache_dir=tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        again = C.load_corpus("tinystories", cache_dir=tmp_path / "a")
    assert again.source.startswith("shipped: TinyStories") and again.fallback_reason.startswith("hub unreachable")
    with pytest.warns(DataWarning, match="hub unreachable"):
        C.load_corpus("tinystories", cache_dir=tmp_path / "b")  # another cache: news to its user
    fake = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a story"] * 3}),
                                 "validation": datasets.Dataset.from_dict({"text": ["another"] * 2})})
    monkeypatch.setattr(C, "_probe_hub", lambda *a: (True, None))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    assert C.load_corpus("tinystories", cache_dir=tmp_path / "a").source.startswith("hub:")
    monkeypatch.setattr(C, "_probe_hub", lambda *a: (False, "gone again"))
    with pytest.warns(DataWarning, match="gone again"):  # the hub answered in between: a new outage is news
        C.load_corpus("tinystories", cache_dir=tmp_path / "a")


def test_hub_success_uses_hub_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"train row {i}\n" for i in range(30)]}),
        "validation": datasets.Dataset.from_dict({"text": [f"valid row {i}\n" for i in range(8)]}),
        "test": datasets.Dataset.from_dict({"text": ["test row\n"] * 3}),
    })
    monkeypatch.setattr(C, "_probe_hub", lambda *a: (True, None))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    c = C.load_corpus("wikitext2", split_rows=(20, 5), source="hub")
    assert c.train == [f"train row {i}\n" for i in range(20)] and len(c.valid) == 5 and len(c.test) == 3
    assert c.source.startswith("hub: wikitext/wikitext-2-raw-v1") and "train 20/30 rows" in c.source
    assert c.fallback_reason is None


def test_a_hub_corpus_records_its_dataset_and_the_hash_of_its_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def hub(rows):
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows}),
                                     "validation": datasets.Dataset.from_dict({"text": ["valid row\n"] * 4})})

    monkeypatch.setattr(C, "_probe_hub", lambda *a: (True, None))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub([f"row {i}\n" for i in range(10)]))
    record = C.load_corpus("wikitext2", source="hub").files["hub:wikitext/wikitext-2-raw-v1"]
    assert record["dataset"] == "wikitext" and record["config"] == "wikitext-2-raw-v1"
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub([f"row {i}\n" for i in range(11)]))
    assert C.load_corpus("wikitext2", source="hub").files["hub:wikitext/wikitext-2-raw-v1"]["sha256"] \
        != record["sha256"]  # the hub copy changed: so does its fingerprint


# ------------------------------------------------------------------------------ tokenizer


def _small_corpus(tmp_path, n=400):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    rows = [" ".join(rng.choice(words, size=12)) + f" {i}." for i in range(n)]
    rows[5] = ""
    return _write(tmp_path / "small.txt", "\n".join(rows) + "\n"), rows


# ------------------------------------------------------------------------------ token files


def test_encode_to_file_concatenates_rows_like_paper(tmp_path):
    _, rows = _small_corpus(tmp_path)
    tok = T.train_tokenizer(rows, 300, "paper")
    arr = D.encode_to_file(tok, rows, tmp_path / "tok" / "train.bin", batch_size=64)
    expected = [i for e in tok.encode_batch(rows) for i in e.ids]  # the paper's flattening
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
    assert arr.tolist() == expected
    meta = json.loads((tmp_path / "tok" / "train.bin.json").read_text())
    assert meta["dtype"] == "uint16" and meta["count"] == len(expected)
    assert meta["tokenizer_hash"] == T.tokenizer_hash(tok)
    assert sorted(f.name for f in (tmp_path / "tok").iterdir()) == ["train.bin", "train.bin.json"]
    again = D.load_tokens(tmp_path / "tok" / "train.bin")
    assert np.array_equal(again, arr)
    empty = D.encode_to_file(tok, ["", ""], tmp_path / "tok" / "empty.bin")
    assert len(empty) == 0


class _BigVocabTokenizer:
    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def get_vocab_size(self):
        return 70000

    def to_str(self):
        return "fake"

    def encode_batch(self, texts):
        return [self._Enc([len(t) * 1000, 69999]) for t in texts]


def test_encode_to_file_uint32_for_large_vocab(tmp_path):
    arr = D.encode_to_file(_BigVocabTokenizer(), ["ab", "", "abcd"], tmp_path / "big.bin")
    assert arr.dtype == np.uint32 and arr.tolist() == [2000, 69999, 4000, 69999]


def test_load_tokens_errors(tmp_path):
    p = tmp_path / "x.bin"
    np.arange(10, dtype=np.uint16).tofile(p)
    with pytest.raises(DataError, match="missing token sidecar"):
        D.load_tokens(p)
    (tmp_path / "x.bin.json").write_text(json.dumps({"dtype": "uint16", "count": 11}))
    with pytest.raises(DataError, match="sidecar says 11"):
        D.load_tokens(p)


# ------------------------------------------------------------------------------ blocks / order


def test_block_dataset_matches_paper():
    tokens = np.arange(23, dtype=np.uint16)
    ds = BlockDataset(tokens, block_size=4)
    assert len(ds) == 4  # 23 // 5
    x, y = ds[1]
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.tolist() == [5, 6, 7, 8] and y.tolist() == [6, 7, 8, 9]
    # the paper: torch.tensor(all[:n*L]).view(-1, L); x = chunk[:-1]; y = chunk[1:]
    ref = torch.tensor(tokens[: 4 * 5].astype(np.int64)).view(-1, 5)
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], ref[i][:-1]) and torch.equal(ds[i][1], ref[i][1:])
    assert torch.equal(ds[-1][0], ref[3][:-1])
    with pytest.raises(IndexError):
        ds[4]
    assert [x.tolist() for x, _ in ds] == [r[:-1].tolist() for r in ref]
    tds = BlockDataset(torch.arange(10), 4)
    assert len(tds) == 2 and tds[1][1].tolist() == [6, 7, 8, 9]


def test_block_dataset_too_short():
    BlockDataset(np.arange(5), 4)
    with pytest.raises(DataError, match="shorter than one block"):
        BlockDataset(np.arange(4), 4)
    with pytest.raises(DataError):
        BlockDataset(np.arange(10), 0)


def test_block_dataset_pickles_memmap_by_path(tmp_path):
    tok = _BigVocabTokenizer()
    arr = D.encode_to_file(tok, ["a"] * 30, tmp_path / "t.bin")
    ds = BlockDataset(arr, 5)
    assert len(pickle.dumps(ds)) < 1000  # the memmap travels by path, not by content
    ds2 = copy.deepcopy(ds)  # the same __getstate__/__setstate__ round trip a DataLoader worker does
    assert len(ds2) == len(ds) and all(torch.equal(ds2[i][0], ds[i][0]) for i in range(len(ds)))


def test_epoch_order_seeded():
    a = D.epoch_order(100, seed=1234, epoch=0)
    assert a.dtype == torch.int64 and sorted(a.tolist()) == list(range(100))
    assert torch.equal(a, D.epoch_order(100, seed=1234, epoch=0))
    assert not torch.equal(a, D.epoch_order(100, seed=1234, epoch=1))
    assert not torch.equal(a, D.epoch_order(100, seed=99, epoch=0))
    g = torch.Generator()
    g.manual_seed(1235)
    assert torch.equal(D.epoch_order(100, 1234, 1), torch.randperm(100, generator=g))


# ------------------------------------------------------------------------------ prepare_data


def test_prepare_data_local_and_cache_hit(tmp_path, monkeypatch):
    p, rows = _small_corpus(tmp_path)
    cache = tmp_path / "cache"
    pd = D.prepare_data(p, block_size=16, vocab_size=300, cache_dir=cache)
    assert pd.tokenizer_kind == "bytelevel" and T.tokenizer_kind(pd.tokenizer) == "bytelevel"
    assert pd.vocab_size == pd.tokenizer.get_vocab_size() <= 300
    assert pd.source.startswith("local:") and pd.test is None
    # each row is one line of text: the byte-level kind gives it back its newline
    ref = [i for e in pd.tokenizer.encode_batch([r + "\n" for r in rows[:360] if r]) for i in e.ids]
    assert pd.train.tolist() == ref
    assert pd.tokenizer.decode(pd.train.tolist()) == "".join(r + "\n" for r in rows[:360] if r)
    x, y = pd.train_dataset()[0]
    assert x.shape == (16,) and torch.equal(x[1:], y[:-1])
    assert len(pd.valid_dataset()) == len(pd.valid) // 17
    assert json.dumps(pd.describe())

    monkeypatch.setattr(T, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(D, "encode_to_file", lambda *a, **k: pytest.fail("re-encoded"))
    pd2 = D.prepare_data(p, block_size=16, vocab_size=300, cache_dir=cache)
    assert np.array_equal(pd2.train, pd.train) and pd2.tokenizer_hash == pd.tokenizer_hash


def test_prepare_data_paper_tokenizer_concatenates_rows_as_the_paper(tmp_path):
    p, rows = _small_corpus(tmp_path)
    pd = D.prepare_data(p, block_size=16, vocab_size=300, cache_dir=tmp_path / "c", tokenizer_kind="paper")
    assert pd.tokenizer_kind == "paper" and json.loads(pd.tokenizer.to_str())["pre_tokenizer"]["type"] == "Whitespace"
    assert pd.train.tolist() == [i for e in pd.tokenizer.encode_batch(rows[:360]) for i in e.ids]
    assert pd.describe()["tokenizer_kind"] == "paper"


def test_token_cache_is_keyed_by_tokenizer_kind(tmp_path):
    p, _ = _small_corpus(tmp_path)
    cache = tmp_path / "cache"
    byte = D.prepare_data(p, block_size=16, vocab_size=300, cache_dir=cache)
    paper = D.prepare_data(p, block_size=16, vocab_size=300, cache_dir=cache, tokenizer_kind="paper")
    assert byte.tokenizer_path != paper.tokenizer_path
    assert "-bytelevel-" in byte.tokenizer_path.name and "-paper-" in paper.tokenizer_path.name
    assert byte.token_paths["train"].parent != paper.token_paths["train"].parent
    assert not np.array_equal(byte.train, paper.train)
    again = D.prepare_data(p, block_size=16, vocab_size=300, cache_dir=cache, tokenizer_kind="paper")
    assert np.array_equal(again.train, paper.train) and again.tokenizer_hash == paper.tokenizer_hash
    with pytest.raises(DataError, match="unknown tokenizer 'gpt2'"):
        D.prepare_data(p, block_size=16, vocab_size=300, cache_dir=cache, tokenizer_kind="gpt2")


def test_prepare_data_with_given_tokenizer(tmp_path, monkeypatch):
    p, rows = _small_corpus(tmp_path)
    for kind, texts in (("paper", rows[:360]), ("bytelevel", [r + "\n" for r in rows[:360] if r])):
        tok = T.train_tokenizer(rows[:100], 280, kind)
        monkeypatch.setattr(T, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
        # the kind comes from the given tokenizer (an old checkpoint's paper tokenizer stays paper)
        pd = D.prepare_data(p, block_size=8, vocab_size=300, cache_dir=tmp_path / "c", tokenizer=tok)
        assert pd.tokenizer is tok and pd.vocab_size == tok.get_vocab_size() and pd.tokenizer_path is None
        assert pd.tokenizer_kind == kind and f"-given-{kind}-" in str(pd.token_paths["train"])
        assert pd.train.tolist() == [i for e in tok.encode_batch(texts) for i in e.ids]
        assert json.dumps(pd.describe())
        monkeypatch.undo()


def test_prepare_data_valid_too_short(tmp_path):
    p, _ = _small_corpus(tmp_path, n=60)
    with pytest.raises(DataError, match="valid: .* shorter than one block"):
        D.prepare_data(p, block_size=200, vocab_size=300, cache_dir=tmp_path / "c")


def test_prepare_data_shipped(tmp_path):
    pd = D.prepare_data("tinystories", block_size=64, vocab_size=300, cache_dir=tmp_path,
                        source="shipped")
    assert pd.source.startswith("shipped: TinyStories") and len(pd.train_dataset()) > 100
    pw = D.prepare_data("wikitext2", block_size=32, vocab_size=300, cache_dir=tmp_path,
                        source="shipped", train_rows=2000, valid_rows=300)
    assert pw.test is not None and len(pw.test_dataset()) > 0
    assert "train 2000/36718 rows" in pw.source
