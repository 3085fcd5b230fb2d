"""Loss by position (gam.evaluation, gam eval --by-position) against a direct computation."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny
from gam import evaluation
from gam.cli import main
from gam.train import evaluate

BLOCK = 16  # conftest.TINY's block_size


def direct_loss_by_position(model, tokens, block_size):
    """Every block in one forward pass; per-position cross-entropy averaged over blocks."""
    n = block_size + 1
    blocks = torch.as_tensor(np.asarray(tokens[: len(tokens) // n * n], dtype=np.int64)).view(-1, n)
    with torch.no_grad():
        logits, _ = model(blocks[:, :-1])
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), blocks[:, 1:].reshape(-1), reduction="none")
    return per_token.view(len(blocks), block_size).mean(dim=0)


@pytest.mark.parametrize("name", ["gam", "transformer"])
def test_loss_by_position_matches_direct_computation(name, one_thread):
    model = tiny(name)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=23 * (BLOCK + 1) + 5)
    # batch 5 leaves a ragged last batch (23 blocks): every block must count once
    losses = evaluation.loss_by_position(model, tokens, BLOCK, batch_size=5, device="cpu")
    assert len(losses) == BLOCK
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float32),
                               direct_loss_by_position(model, tokens, BLOCK), rtol=1e-5, atol=1e-5)
    # every position has the same number of targets: the mean is evaluate()'s loss
    assert np.mean(losses) == pytest.approx(evaluate(model, tokens, BLOCK, 7, torch.device("cpu"), "fp32")["val_loss"],
                                            rel=1e-6)


def test_loss_by_position_rejects_short_data():
    with pytest.raises(ValueError, match="fewer than one block"):
        evaluation.loss_by_position(tiny("gam"), np.arange(10), BLOCK, 4, "cpu")


def test_report_for_a_model_without_a_bounded_context(tmp_path, one_thread):
    model = tiny("transformer")
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, size=6 * (BLOCK + 1))
    result = evaluation.report(model, tokens, 4, "cpu", "fp32", tmp_path / "t.png", title="transformer")
    assert result["receptive_field"] is None and "loss_inside_field" not in result
    assert [b["first"] for b in result["buckets"]] == [0, 1, 2, 4, 8]
    text = "\n".join(evaluation.format_report(result))
    assert "receptive field" not in text and (tmp_path / "t.png").stat().st_size > 0
    # GAM with the opt-in kv-slot memory sees every earlier token: no bounded field either
    assert tiny("gam", memory="kv_slots", memory_heads=2).config.receptive_field() is None
    assert tiny("gam").config.receptive_field() == 5


def test_buckets_and_split():
    assert evaluation.position_buckets(128) == [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63),
                                                (64, 127)]
    assert evaluation.position_buckets(10)[-1] == (8, 9)
    assert [evaluation.bucket_label(*b) for b in evaluation.position_buckets(4)] == ["0", "1", "2-3"]
    losses = [5.0, 4.0, 3.0, 3.0, 2.0, 2.0]
    assert [b["loss"] for b in evaluation.bucket_means(losses)] == [5.0, 4.0, 3.0, 2.0]
    assert evaluation.split_at(losses, 2) == (4.5, 2.5)
    assert evaluation.split_at(losses, 6) == (pytest.approx(19 / 6), None)


def test_the_benches_split_at_the_measured_receptive_field():
    """The window of the loss-by-position split is measured with autograd on the trained
    configuration (1 + n_layer (k - 1) tokens: 13 at the paper's 6 layers, 9 at the cpu preset's 4)."""
    from gam.bench.trained import bench_preset, measured_receptive_field

    small = {"n_embd": 32, "n_head": 2, "vocab_size": 64, "block_size": 32}
    assert measured_receptive_field({**small, "n_layer": 6, "conv_kernel_size": 3}) == 13
    assert measured_receptive_field({**small, "n_layer": 4, "conv_kernel_size": 3}) == 9
    assert measured_receptive_field({**small, "n_layer": 2, "conv_kernel_size": 5}) == 9
    assert measured_receptive_field({**small, "block_size": 8, "n_layer": 6}) == 8  # the whole block
    model_fields = {**bench_preset("cpu", "paper", "cpu")[0], "vocab_size": 64}
    assert measured_receptive_field(model_fields) == 9


def test_eval_cli_by_position(tmp_path, monkeypatch, capsys):
    from gam.checkpoint import load_checkpoint
    from gam.data import prepare_data

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    words = ["the cat sat", "on a mat", "dogs ran far", "birds sang"]
    rng = np.random.default_rng(0)
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n".join(" ".join(words[i] for i in rng.integers(0, 4, 3)) for _ in range(300)) + "\n")
    run = tmp_path / "run"
    tiny_args = ["--n-embd", "16", "--n-layer", "2", "--n-head", "2", "--num-memory-slots", "8",
                 "--vocab-size", "300", "--block-size", str(BLOCK), "--batch-size", "4", "--warmup-steps", "1",
                 "--train-rows", "None", "--valid-rows", "None", "--precision", "fp32"]
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "3", *tiny_args]) == 0
    capsys.readouterr()

    assert main(["eval", str(run), "--json", "--by-position"]) == 0
    result = json.loads(capsys.readouterr().out)
    by_position = result["by_position"]
    ckpt = load_checkpoint(run)
    model = ckpt.build_model("cpu")
    data = prepare_data(str(corpus), block_size=BLOCK, vocab_size=300, train_rows=None, valid_rows=None,
                        tokenizer=ckpt.tokenizer())
    torch.testing.assert_close(torch.tensor(by_position["loss_by_position"], dtype=torch.float32),
                               direct_loss_by_position(model, data.valid, BLOCK), rtol=1e-5, atol=1e-5)
    assert np.mean(by_position["loss_by_position"]) == pytest.approx(result["val_loss"], rel=1e-6)
    assert by_position["receptive_field"] == 5  # 1 + 2 layers * (kernel 3 - 1)
    assert by_position["loss_inside_field"] == pytest.approx(np.mean(by_position["loss_by_position"][:5]))
    assert (run / "loss_by_position.png").stat().st_size > 0 and by_position["plot"] == str(run / "loss_by_position.png")

    plot = tmp_path / "plots" / "lbp.png"
    assert main(["eval", str(run), "--by-position", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "loss by position" in text
    assert [line.split()[0] for line in text.splitlines() if re.fullmatch(r"\s+[\d-]+\s+\d+\.\d{4}", line)] == \
        ["0", "1", "2-3", "4-7", "8-15"]
    assert "receptive field 5 tokens" in text and str(plot) in text and plot.stat().st_size > 0

    # a folder or a name that is not a .png: one line, no traceback
    for bad in (tmp_path / "plots", tmp_path / "lbp.txt"):
        assert main(["eval", str(run), "--by-position", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "must be a file name ending in .png" in err and "Traceback" not in err
