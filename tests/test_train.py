"""Trainer: exact resume, signals, NaN, corrupted checkpoints, torchrun, CLI."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gam import GAMConfig
from gam.checkpoint import CheckpointError, load_checkpoint
from gam.cli import main
from gam.train import TrainConfig, TrainingDiverged, lr_at, train, unigram_perplexity

REPO = Path(__file__).resolve().parents[1]
PHRASES = ["the cat sat on a mat", "while dogs ran far away from home", "and birds sang in tall green trees",
           "by the quiet river", "under bright blue skies", "a small boy ate red apples"]


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    """Random sequences of fixed phrases: within a phrase the next word is certain,
    so a model that learns beats a unigram model by far."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(lines):
        n = int(torch.randint(1, 4, (1,), generator=g))
        rows.append(" ".join(PHRASES[int(i)] for i in torch.randint(0, len(PHRASES), (n,), generator=g)))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny.txt")


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    from gam.data import prepare_data

    # 512: enough merges that the byte-level tokenizer has the corpus's words as tokens
    return prepare_data(str(corpus), block_size=16, vocab_size=512,
                        cache_dir=tmp_path_factory.mktemp("cache"), train_rows=None, valid_rows=None)


def tiny_model(vocab=300, **fields):
    return GAMConfig(**{"vocab_size": vocab, "block_size": 16, "n_embd": 16, "n_layer": 2, "n_head": 2,
                        "num_memory_slots": 8, "dropout": 0.1, "d_state": 4, "expand": 2, **fields})


def tiny_train(**fields):
    return TrainConfig(**{"batch_size": 4, "max_steps": 12, "warmup_steps": 3, "lr": 3e-3,
                          "eval_batch_size": 8, "log_every": 1, "device": "cpu", **fields})


def weights(run_dir):
    model = load_checkpoint(run_dir).build_model()
    return {k: v.clone() for k, v in model.state_dict().items()}


def quiet(*_):
    pass


# ---------------------------------------------------------------- exact resume

@pytest.mark.parametrize("model", ["gam", "transformer"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, data, model):
    config = tiny_model(data.vocab_size, model=model)
    full = train(config, tiny_train(), tmp_path / "full", data=data, print_fn=quiet)
    assert full.step == 12 and not full.interrupted
    part = train(config, tiny_train(), tmp_path / "part", data=data, stop_after=5, print_fn=quiet)
    assert part.interrupted and part.step == 5
    assert load_checkpoint(tmp_path / "part").step == 5
    resumed = train(config, tiny_train(), tmp_path / "part", data=data, resume=True, print_fn=quiet)
    assert resumed.step == 12
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in l]
    resumed_losses = [json.loads(l)["loss"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in l]
    assert losses == resumed_losses


def test_training_learns_and_beats_unigram(tmp_path, data):
    # small learned positions (as the cpu preset): N(0, 1) ones drown the tied embedding and
    # stall this tiny model on a plateau for most of its 120 steps
    result = train(tiny_model(data.vocab_size, dropout=0.0, n_embd=32, pos_init_std=0.02),
                   tiny_train(max_steps=120, lr=1e-2, batch_size=8), tmp_path / "run", data=data, print_fn=quiet)
    m = result.metrics
    assert m["val_ppl"] < 0.3 * m["unigram_ppl"]
    assert math.isclose(m["val_ppl"], math.exp(m["val_loss"]), rel_tol=1e-9)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr=0.0)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.5)
    assert lr_at(100, 100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(s, 100, cfg) >= lr_at(s + 1, 100, cfg) for s in range(10, 99))


def test_unigram_perplexity_by_hand():
    import numpy as np

    train_tokens = np.array([0, 0, 1, 2])  # counts + 1: [3, 2, 2] of 7
    valid = np.array([0, 1, 0])  # block_size 2 -> one block, targets [1, 0]
    expected = math.exp(-(math.log(2 / 7) + math.log(3 / 7)) / 2)
    assert unigram_perplexity(train_tokens, valid, 3, 2) == pytest.approx(expected)


# ---------------------------------------------------------------- nothing lost

def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data, monkeypatch):
    import gam.train as train_module

    calls = {"n": 0}
    real = train_module.DecoderLM

    class Poisoned(real):
        def forward(self, idx, targets=None, **kwargs):
            logits, loss = super().forward(idx, targets, **kwargs)
            if self.training:
                calls["n"] += 1
                if calls["n"] > 6:
                    loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(train_module, "DecoderLM", Poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 6"):
        train(tiny_model(data.vocab_size), tiny_train(save_every=4), tmp_path / "run", data=data, print_fn=quiet)
    assert load_checkpoint(tmp_path / "run").step == 4


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, data, monkeypatch):
    import gam.checkpoint as ckpt_module

    train(tiny_model(data.vocab_size), tiny_train(max_steps=3), tmp_path / "run", data=data, print_fn=quiet)
    before = weights(tmp_path / "run")

    def dies_halfway(model, filename, **_):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt  # like a kill in the middle of writing

    monkeypatch.setattr(ckpt_module, "save_model", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(data.vocab_size), tiny_train(max_steps=5), tmp_path / "run", data=data,
              resume=True, print_fn=quiet)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run").step == 3
    after = weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_checkpoint_is_detected_not_loaded_not_overwritten(tmp_path, data, damage):
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=2), run, data=data, print_fn=quiet)
    ckpt = load_checkpoint(run).path
    target = ckpt / "model.safetensors"
    raw = bytearray(target.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-10] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="truncated|corrupted"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError):
        train(tiny_model(data.vocab_size), tiny_train(max_steps=4), run, data=data, resume=True, print_fn=quiet)
    assert target.read_bytes() == bytes(raw)  # left as it was for inspection


def test_checkpoint_from_another_model_is_rejected(tmp_path, data):
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=1), run, data=data, print_fn=quiet)
    ckpt = load_checkpoint(run)
    from gam.models.lm import DecoderLM

    with pytest.raises(CheckpointError, match="do not fit"):
        ckpt.load_weights(DecoderLM(tiny_model(data.vocab_size, n_embd=32)))
    with pytest.raises(CheckpointError, match="do not fit"):
        ckpt.load_weights(DecoderLM(tiny_model(data.vocab_size + 5)))


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")


def cli(*args, timeout=240, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "GAM_CACHE_DIR": kwargs.pop("cache")}
    return subprocess.run([sys.executable, "-m", "gam.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=kwargs.pop("cwd", None))


TINY_ARGS = ["--n-embd", "16", "--n-layer", "2", "--n-head", "2", "--num-memory-slots", "8",
             "--block-size", "16", "--vocab-size", "300", "--batch-size", "4", "--warmup-steps", "2",
             "--eval-batch-size", "8", "--log-every", "1", "--precision", "fp32"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, corpus):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "GAM_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    common = ["train", "--data", str(corpus), "--max-steps", "6", "--dropout", "0", "--threads", "1", *TINY_ARGS]
    single = subprocess.run([sys.executable, "-m", "gam.cli", *common, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    import socket

    with socket.socket() as sock:  # a free port, so parallel test runs don't collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-addr", "127.0.0.1", "--master-port", port, "-m", "gam.cli", *common, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]

    def curve(run):
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]

    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert one[-1] < one[0]


# ---------------------------------------------------------------- CLI errors

@pytest.mark.parametrize("args,message", [
    (["--preset", "gpu"], "unknown preset"),
    (["--n-layerz", "3"], "unknown option --n-layerz (did you mean --n-layer?)"),
    (["--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--precision", "fp8"], "precision"),
])
def test_train_cli_bad_input_one_line_errors(tmp_path, args, message, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "empty" in capsys.readouterr().err


def test_eval_cli_json(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "3", *TINY_ARGS]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"val_loss", "val_ppl", "unigram_ppl", "tokens"} <= set(result)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["tokens"] > 0


def test_tokenizer_option_is_saved_with_the_run(tmp_path, corpus, capsys, monkeypatch):
    from gam.checkpoint import load_checkpoint
    from gam.tokenizer import tokenizer_kind

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", "--tokenizer", "paper",
                 *TINY_ARGS]) == 0
    ckpt = load_checkpoint(run)
    assert ckpt.info["train_config"]["tokenizer"] == "paper" and tokenizer_kind(ckpt.tokenizer()) == "paper"
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "r2"), "--tokenizer", "gpt2"]) == 2
    assert "tokenizer must be bytelevel or paper, got 'gpt2'" in capsys.readouterr().err


def test_resume_a_run_saved_before_the_tokenizer_field(tmp_path, corpus, monkeypatch):
    """Older runs used the paper's tokenizer and saved no 'tokenizer' field: they resume with it."""
    from gam.checkpoint import load_checkpoint
    from gam.data import prepare_data

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    paper = prepare_data(str(corpus), block_size=16, vocab_size=300, train_rows=None, valid_rows=None,
                         tokenizer_kind="paper")
    run = tmp_path / "run"
    cfg = tiny_train(max_steps=2, train_rows=None, valid_rows=None, data=str(corpus))
    first = train(tiny_model(paper.vocab_size), cfg, run, data=paper, print_fn=quiet)
    ckpt = load_checkpoint(run)
    config_file = ckpt.path / "config.json"
    info = json.loads(config_file.read_text())
    del info["train_config"]["tokenizer"]  # as an older version wrote it
    config_file.write_text(json.dumps(info))
    manifest_file = ckpt.path / "manifest.json"  # keep the edited file's checksum valid
    manifest = json.loads(manifest_file.read_text())
    manifest["files"]["config.json"] = {"bytes": config_file.stat().st_size,
                                        "sha256": hashlib.sha256(config_file.read_bytes()).hexdigest()}
    manifest_file.write_text(json.dumps(manifest))
    result = train(tiny_model(paper.vocab_size), tiny_train(max_steps=3), run, resume=True,
                   explicit={"max_steps"}, print_fn=quiet)  # everything else: the run's saved settings
    assert result.metrics["tokens"] == first.metrics["tokens"]  # the same paper-tokenized validation data
    assert load_checkpoint(run).info["train_config"]["tokenizer"] == "paper"


@pytest.mark.parametrize("env,bar", [({}, True), ({"TQDM_DISABLE": "1"}, False)])
def test_training_bar_follows_tqdm_disable(tmp_path, data, monkeypatch, capsys, env, bar):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    train(tiny_model(data.vocab_size), tiny_train(max_steps=2), tmp_path / "run", data=data, print_fn=quiet)
    assert ("2/2" in capsys.readouterr().err) == bar
