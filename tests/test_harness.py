"""lm-evaluation-harness route (gam.harness) on an export of a tiny trained model, offline, on the
local tasks shipped in gam/harness_tasks. Skipped when lm-eval is not installed."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gam.harness import TASKS_DIR, lm_eval_argv

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
BLOCK = 64


def test_arguments_pass_through_with_the_local_tasks_added():
    args = ["--model", "hf", "--tasks", "gam_wikitext2"]
    assert lm_eval_argv(args) == ["lm_eval", *args, "--include_path", str(TASKS_DIR)]
    own = [*args, "--include_path", "/my/tasks"]
    assert lm_eval_argv(own) == ["lm_eval", *own]  # lm-eval takes one folder: the caller's wins
    assert lm_eval_argv(["--include_path=/x"]) == ["lm_eval", "--include_path=/x"]
    assert lm_eval_argv(["--help"]) == ["lm_eval", "--help"]
    assert sorted(p.name for p in TASKS_DIR.glob("*.yaml")) == [
        "gam_tinystories_gen.yaml", "gam_tinystories_mc.yaml", "gam_wikitext2.yaml"]


def test_without_lm_eval_a_one_line_error(monkeypatch, capsys):
    from gam.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # import fails as if not installed
    assert main(["harness", "--model", "hf"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'gam[eval]'" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny GAM trained for a few steps on the shipped TinyStories, exported for transformers."""
    pytest.importorskip("lm_eval")
    from gam import GAMConfig
    from gam.data import prepare_data
    from gam.hf import export
    from gam.train import TrainConfig, train

    root = tmp_path_factory.mktemp("harness")
    data = prepare_data("tinystories", block_size=BLOCK, vocab_size=400, cache_dir=root / "cache",
                        source="shipped", train_rows=300, valid_rows=50)
    config = GAMConfig(vocab_size=data.vocab_size, block_size=BLOCK, n_embd=16, n_layer=1,
                       num_memory_slots=8, dropout=0.0, pos_init_std=0.02)
    train(config, TrainConfig(batch_size=8, max_steps=5, warmup_steps=1, device="cpu", eval_batch_size=8,
                              data="tinystories", data_source="shipped"),
          root / "run", data=data, print_fn=lambda *_: None)
    return export(root / "run", root / "hf")


def load_export(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gam.hf  # noqa: F401 - registers the gam model type

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def samples(out, task):
    (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def results(out):
    (path,) = glob.glob(str(out / "*" / "results_*.json"))
    return json.loads(Path(path).read_text())["results"]


@pytest.mark.slow
def test_loglikelihood_tasks_from_the_shell_batch_4(export_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gam.harness", "--model", "hf", "--model_args", f"pretrained={export_dir}",
           "--tasks", "gam_wikitext2,gam_tinystories_mc", "--limit", "4", "--batch_size", "4",
           "--output_path", str(out), "--log_samples"]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(out)
    for metric in ("byte_perplexity", "word_perplexity"):
        assert 1 < res["gam_wikitext2"][f"{metric},none"] < math.inf
    assert 0 <= res["gam_tinystories_mc"]["acc,none"] <= 1

    # lm-eval's scores are the model's: recompute each choice's log-likelihood of one question
    # (context and continuation as lm-eval splits them, cut on the left to the model's 64 tokens)
    model, tok = load_export(export_dir)
    question = samples(out, "gam_tinystories_mc")[0]
    for request, response in zip(question["arguments"].values(), question["resps"]):
        context, continuation = request["arg_0"], request["arg_1"]
        context_ids = tok(context, add_special_tokens=False).input_ids
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        continuation_ids = whole[len(context_ids):]
        full = (context_ids + continuation_ids)[-(BLOCK + 1):]
        with torch.no_grad():
            logits = model(torch.tensor([full[:-1]])).logits[0].log_softmax(-1)
        targets = torch.tensor(continuation_ids)
        ours = logits[-len(continuation_ids):].gather(-1, targets[:, None]).sum().item()
        assert float(response[0][0]) == pytest.approx(ours, abs=1e-3)


@pytest.mark.slow
def test_generate_until_batch_1_and_left_padded_batch_2(export_dir, tmp_path, monkeypatch):
    from gam.cli import main

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    responses = {}
    for batch in (1, 2):
        out = tmp_path / f"out{batch}"
        assert main(["harness", "--model", "hf", "--model_args", f"pretrained={export_dir}",
                     "--tasks", "gam_tinystories_gen", "--limit", "4", "--batch_size", str(batch),
                     "--output_path", str(out), "--log_samples"]) == 0
        assert 0 <= results(out)["gam_tinystories_gen"]["exact_match,strip"] <= 1
        responses[batch] = {s["doc_id"]: s for s in samples(out, "gam_tinystories_gen")}
    # each generation is the model's greedy continuation of the (left-cut) context, up to "." or
    # "\n", whether it ran alone or left-padded in a batch of two prompts of different lengths
    model, tok = load_export(export_dir)
    lengths = set()
    for doc_id, sample in responses[1].items():
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        ids = tok(context, add_special_tokens=False).input_ids[-(BLOCK - 24):]  # 24 = max_gen_toks
        lengths.add(len(ids))
        new = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
        expected = tok.decode(new)
        for stop in (".", "\n"):
            expected = expected.split(stop)[0]
        assert sample["resps"][0][0] == expected
        assert responses[2][doc_id]["resps"][0][0] == expected
    assert len(lengths) > 1  # the batches of two were padded


def harness_error(capsys, args) -> str:
    """``gam harness ARGS`` in this process: exit 2 and one error line, no traceback."""
    from gam.cli import main

    capsys.readouterr()
    assert main(["harness", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("gam harness: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_lm_evals_failures_are_one_line(export_dir, tmp_path, capsys, monkeypatch):
    """Missing path, unknown task, a run folder instead of an export, a tampered export: lm-eval's
    (or our manifest's) message, not its stack."""
    import shutil

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    tampered = tmp_path / "tampered"
    shutil.copytree(export_dir, tampered)
    weights = bytearray((tampered / "model.safetensors").read_bytes())
    weights[-5] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(weights))
    run = Path(export_dir).parent / "run"

    def harness(pretrained, task="gam_wikitext2"):
        return harness_error(capsys, ["--model", "hf", "--model_args", f"pretrained={pretrained}", "--tasks", task,
                                      "--limit", "1"])

    assert "/no/such/export" in harness("/no/such/export")
    assert "Tasks not found: no_such_task" in harness(export_dir, "no_such_task")
    assert f"{run}" in harness(run)
    assert "model.safetensors: corrupted (sha256 does not match the manifest)" in harness(tampered)


def test_a_bare_assert_in_lm_eval_shows_the_line_that_raised_it(monkeypatch, capsys):
    """lm-eval asserts, with no message, that a continuation fits the model's block."""
    lm_eval_main = pytest.importorskip("lm_eval.__main__")

    def continuation_longer_than_the_block():
        raise AssertionError  # as lm-eval's bare assert (pytest rewrites the asserts of this module)

    monkeypatch.setattr(lm_eval_main, "cli_evaluate", continuation_longer_than_the_block)
    line = continuation_longer_than_the_block.__code__.co_firstlineno + 1
    assert harness_error(capsys, ["--tasks", "x"]) == (
        f"gam harness: error: AssertionError in test_harness.py:{line}: raise AssertionError  # as lm-eval's "
        "bare assert (pytest rewrites the asserts of this module)")
