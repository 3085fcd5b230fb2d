"""Faults and bad input (issue 14): nothing lost, no traceback.

Each test asserts what happens to the files, not only the exit status.
"""

import dataclasses
import errno
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gam.checkpoint import CheckpointError, load_checkpoint, verify_folder
from gam.cli import main
from gam.train import (
    RESUME_NOTICED,
    RESUME_ON_REQUEST,
    RESUME_REFUSED,
    RESUME_SILENT,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    train,
)
from test_train import REPO, TINY_ARGS, corpus, data, quiet, tiny_model, tiny_train, weights  # noqa: F401

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def error_line(capsys, argv, expected_code=2):
    """Run ``gam ARGV``: it must fail with ``expected_code`` and one error line (a
    progress bar drawn before the error aside), no traceback. Returns the line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "it/s" not in l and "s/it" not in l]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (except the lock) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------- 1. a good checkpoint is good

def test_nan_stop_keeps_the_checkpoint_whose_weights_gave_a_finite_loss(tmp_path, data, monkeypatch):
    """The save due after step 4 waits for the loss on step 4's weights; it is NaN,
    so that save is dropped and step 2's checkpoint stays the last good one."""
    import gam.train as train_module

    calls = {"n": 0}
    real = train_module.DecoderLM

    class Poisoned(real):
        def forward(self, idx, targets=None, **kwargs):
            logits, loss = super().forward(idx, targets, **kwargs)
            if self.training and torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == 5:  # the loss of step index 4, i.e. on the weights after 4 steps
                    loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(train_module, "DecoderLM", Poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4;.*ckpt-000002 \(its weights gave"):
        train(tiny_model(data.vocab_size), tiny_train(save_every=2), run, data=data, print_fn=quiet)
    assert load_checkpoint(run).step == 2
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-000002"]


def test_divergence_then_resume_with_a_lower_lr(tmp_path, data):
    """The issue's case: a huge lr, no clipping, a save every step. The kept
    checkpoint (the one before the step whose weights gave NaN) evaluates to a
    finite loss, and resuming it with a lower lr finishes."""
    run = tmp_path / "run"
    cfg = tiny_train(lr=1e3, grad_clip=0.0, warmup_steps=0, save_every=1, max_steps=10)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4") as caught:
        train(tiny_model(data.vocab_size), cfg, run, data=data, print_fn=quiet)
    kept = load_checkpoint(run)
    assert kept.step == 3 and str(kept.path) in str(caught.value)
    assert "--resume --lr 100 --allow-change lr" in str(caught.value)
    val = evaluate(kept.build_model(), data.valid, 16, 8, torch.device("cpu"), "fp32")["val_loss"]
    assert math.isfinite(val)
    done = train(tiny_model(data.vocab_size), dataclasses.replace(cfg, lr=1e-3), run, data=data, resume=True,
                 explicit={"lr"}, allow_change={"lr"}, print_fn=quiet)
    assert done.step == 10 and math.isfinite(done.metrics["val_loss"])
    assert load_checkpoint(run).info["train_config"]["lr"] == 1e-3


# ---------------------------------------------------------------- 2. one writer per run folder

def test_second_process_on_a_run_folder_fails_and_a_killed_holder_does_not_block(tmp_path, corpus, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gam.checkpoint import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
         str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = error_line(capsys, ["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *TINY_ARGS])
        assert f"in use by another gam process (PID {holder.pid})" in err
        assert not (run / "latest").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert (run / ".lock").read_text().strip() == str(holder.pid)  # left behind by the killed holder ...
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *TINY_ARGS]) == 0
    assert load_checkpoint(run).step == 2  # ... and it did not block the next run


def test_a_fresh_run_does_not_overwrite_an_existing_run(tmp_path, data):
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=2), run, data=data, print_fn=quiet)
    before = snapshot(run)
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(tiny_model(data.vocab_size), tiny_train(max_steps=2), run, data=data, print_fn=quiet)
    assert snapshot(run) == before


# ---------------------------------------------------------------- 3. resume means continue this run

def test_resume_rules_cover_every_training_field():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    groups = [RESUME_REFUSED, RESUME_ON_REQUEST, RESUME_NOTICED, RESUME_SILENT]
    assert set().union(*groups) == names
    assert sum(len(g) for g in groups) == len(names)  # each field has exactly one rule


def test_resume_refuses_changed_data_shape_and_lr_and_applies_lr_on_request(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "3", "--lr", "2e-3",
                 *TINY_ARGS]) == 0
    capsys.readouterr()
    before = snapshot(run)
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text())
    for args, field in ((["--batch-size", "8"], "batch_size 4 -> 8"), (["--data", str(other)], "data"),
                        (["--n-embd", "32"], "n_embd 16 -> 32"), (["--seed", "3"], "seed 0 -> 3"),
                        (["--lr", "1e-3"], "lr 0.002 -> 0.001")):
        err = error_line(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "5", *args])
        assert "cannot change" in err and field in err
    assert err.endswith("to apply lr on purpose add --allow-change lr")
    assert snapshot(run) == before  # nothing written by a refused resume
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--lr", "1e-3",
                 "--allow-change", "lr"]) == 0
    out = capsys.readouterr().out
    assert "resume: lr 0.002 -> 0.001, as given" in out and "resume: max_steps 3 -> 5, as given" in out
    ckpt = load_checkpoint(run)
    assert ckpt.step == 5 and ckpt.info["train_config"]["lr"] == 1e-3
    assert ckpt.info["train_config"]["batch_size"] == 4  # kept from the run, not the cpu preset's 16
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert records[-1]["step"] == 5 and "val_loss" in records[-1]


def test_the_starting_command_with_resume_added_ends_where_the_uninterrupted_run_ends(tmp_path, corpus, capsys,
                                                                                      monkeypatch):
    """The README's `gam train --model transformer --data tinystories --preset cpu --max-steps 300`, in small:
    the same command line, stopped midway, then re-run with --resume appended, ends with the weights
    and validation loss of the run that was never stopped. --preset cpu again matches field by field."""
    import gam.train

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    command = ["train", "--model", "transformer", "--data", str(corpus), "--preset", "cpu", "--max-steps", "6",
               *TINY_ARGS, "--dropout", "0.1"]  # dropout: the RNG state must come back too
    assert main([*command, "--out", str(tmp_path / "whole")]) == 0
    real_train = gam.train.train
    monkeypatch.setattr(gam.train, "train", lambda *a, **kw: real_train(*a, **kw, stop_after=3))
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--out", str(tmp_path / "part")])
    assert stopped.value.code == 130  # stopped after step 3, saved
    monkeypatch.setattr(gam.train, "train", real_train)
    capsys.readouterr()
    assert main([*command, "--out", str(tmp_path / "part"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume:" not in out  # nothing differed from the run's settings
    whole, part = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "part")
    assert part.step == whole.step == 6
    assert part.info["final_metrics"]["val_loss"] == whole.info["final_metrics"]["val_loss"]
    assert weights(tmp_path / "part").keys() == weights(tmp_path / "whole").keys()
    assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "part").values(),
                                                   weights(tmp_path / "whole").values()))
    # Another preset is another run: each of its fields that differs is named, with where it came from.
    err = error_line(capsys, ["train", "--model", "transformer", "--data", str(corpus), "--preset", "paper",
                              *TINY_ARGS, "--out", str(tmp_path / "part"), "--resume"])
    assert "dropout 0.1 -> 0.0" not in err  # given on the command line (0.1), as the run's
    assert "tokenizer 'bytelevel' -> 'paper' (--preset paper)" in err and "lr 0.002 -> 0.0003 (--preset paper)" in err


def test_printed_resume_command_continues_to_the_original_end(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    cfg = tiny_train(data=str(corpus), train_rows=None, valid_rows=None, max_steps=9, save_every=4)
    said = []
    part = train(tiny_model(), cfg, run, stop_after=5, print_fn=said.append)
    assert part.interrupted and f"Resume with: {part.resume_command}" in said[-1]
    argv = shlex.split(part.resume_command)
    assert argv[0] == "gam" and "--max-steps" not in argv  # the cpu preset's max_steps (600) must not apply
    assert main(argv[1:]) == 0
    assert load_checkpoint(run).step == 9
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert [r["step"] for r in records] == list(range(1, 10))


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, data):
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=3, save_every=1), run, data=data, print_fn=quiet)
    before = snapshot(run)
    said = []
    result = train(tiny_model(data.vocab_size), tiny_train(max_steps=3, save_every=1), run, data=data,
                   resume=True, print_fn=said.append)
    assert result.already_finished and result.step == 3 and "val_loss" in result.metrics
    assert any("is finished: step 3 of 3; nothing to do" in s for s in said)
    assert snapshot(run) == before


# ---------------------------------------------------------------- 4. containment

@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_latest_must_name_a_checkpoint_inside_its_run(tmp_path, data, where, capsys):
    other, run = tmp_path / "other", tmp_path / "run"
    for folder in (other, run):
        train(tiny_model(data.vocab_size), tiny_train(max_steps=2), folder, data=data, print_fn=quiet)
    target = load_checkpoint(other).path
    if where == "relative":
        (run / "latest").write_text(f"../other/{target.name}\n")
    elif where == "absolute":
        (run / "latest").write_text(f"{target}\n")
    else:
        (run / "ckpt-999999").symlink_to(target)
        (run / "latest").write_text("ckpt-999999\n")
    with pytest.raises(CheckpointError, match="not a checkpoint folder inside"):
        load_checkpoint(run)
    assert error_line(capsys, ["train", "--out", str(run), "--resume"])
    assert error_line(capsys, ["generate", str(run), "--prompt", "the cat"])


# ---------------------------------------------------------------- 5. integrity

def test_manifest_must_list_every_file(tmp_path, data, capsys):
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=2), run, data=data, print_fn=quiet)
    ckpt = load_checkpoint(run).path
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["model.safetensors"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    raw[-10] ^= 0xFF  # corrupted, and no longer covered by the manifest
    (ckpt / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: not listed in the manifest"):
        load_checkpoint(run)
    assert main(["verify", str(run)]) == 1
    assert "not listed in the manifest" in capsys.readouterr().out


def test_files_no_load_reads_may_be_added_after_the_manifest(tmp_path, data):
    """A plot (gam eval --by-position writes one into DIR) or a model card must not
    make a checkpoint unloadable; a data file must."""
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=1), run, data=data, print_fn=quiet)
    ckpt = load_checkpoint(run).path
    for name in ("loss_by_position.png", "README.md", ".gitattributes"):
        (ckpt / name).write_bytes(b"not read by any load")
    assert load_checkpoint(run).path == ckpt and verify_folder(run)[1] == []
    (ckpt / "extra.json").write_text("{}")
    with pytest.raises(CheckpointError, match="extra.json: not listed in the manifest"):
        load_checkpoint(run)


def test_corrupt_trainer_state_is_one_line_without_unsafe_advice(tmp_path, data):
    from gam.checkpoint import write_manifest

    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=2), run, data=data, print_fn=quiet)
    ckpt = load_checkpoint(run).path
    (ckpt / "trainer_state.pt").write_bytes(b"\x80\x04not a checkpoint at all")
    write_manifest(ckpt)  # consistent with the manifest: only torch.load can tell
    with pytest.raises(CheckpointError, match="unreadable trainer state") as caught:
        train(tiny_model(data.vocab_size), tiny_train(max_steps=4), run, data=data, resume=True, print_fn=quiet)
    assert "weights_only" not in str(caught.value)


def test_weights_that_do_not_fit_are_one_line(tmp_path, data):
    from gam.models.lm import DecoderLM

    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=1), run, data=data, print_fn=quiet)
    with pytest.raises(CheckpointError, match=r"do not fit this model \(missing \['blocks.2"):
        load_checkpoint(run).load_weights(DecoderLM(tiny_model(data.vocab_size, n_layer=3)))


def test_export_has_a_manifest_and_flipped_bytes_are_refused(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from test_generation import make_checkpoint

    make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    listed = set(json.loads((out / "manifest.json").read_text())["files"])
    assert listed == {p.name for p in out.iterdir()} - {"manifest.json", "README.md"}  # the card: never loaded
    AutoModelForCausalLM.from_pretrained(out)
    raw = bytearray((out / "model.safetensors").read_bytes())
    raw[-3] ^= 0x01
    (out / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted"):
        AutoModelForCausalLM.from_pretrained(out)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert "model.safetensors: corrupted" in capsys.readouterr().out
    file_out = tmp_path / "a-file"
    file_out.write_text("keep me")
    assert "exists and is not a folder" in error_line(capsys, ["export", str(tmp_path / "ckpt"),
                                                                        str(file_out)])
    assert file_out.read_text() == "keep me"


# ---------------------------------------------------------------- 6. operating-system errors

def _safetensors_disk_full() -> Exception:  # what safetensors really raises on a full disk
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("disk_full", [lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                       _safetensors_disk_full], ids=["OSError", "SafetensorError"])
def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, corpus, capsys,
                                                                           monkeypatch, disk_full):
    import gam.checkpoint as ckpt_module

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "3", *TINY_ARGS]) == 0
    before = weights(run)
    real = ckpt_module.save_model

    def disk_fills_up(model, filename, **kwargs):
        real(model, filename, **kwargs)
        Path(filename).with_name("config.json").write_text("{")
        raise disk_full()

    monkeypatch.setattr(ckpt_module, "save_model", disk_fills_up)
    capsys.readouterr()
    err = error_line(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "5"], 1)
    assert "No space left on device" in err and str(run) in err
    monkeypatch.undo()
    assert load_checkpoint(run).step == 3
    assert all(torch.equal(before[k], v) for k, v in weights(run).items())
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]


def test_read_only_run_folder_is_one_line_before_any_work(tmp_path, data, corpus, capsys, monkeypatch):
    import gam.checkpoint as ckpt_module

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=2), run, data=data, print_fn=quiet)
    before = snapshot(run)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # as on a read-only mount (chmod does not stop root)
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.os, "open", read_only)
    err = error_line(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "4"], 1)
    assert f"{run}/.lock: Read-only file system" in err
    monkeypatch.undo()
    assert snapshot(run) == before


def test_out_is_a_file_is_one_line(tmp_path, corpus, capsys):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    err = error_line(capsys, ["train", "--data", str(corpus), "--out", str(out / "run"), *TINY_ARGS], 1)
    assert "Not a directory" in err and out.read_text() == "keep me"


def test_a_killed_save_leaves_a_temp_folder_that_the_next_run_removes(tmp_path, data):
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=2), run, data=data, print_fn=quiet)
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, sys, torch\n"
         "import gam.checkpoint as c\n"
         "def dies(model, filename, **_):\n"
         "    open(filename, 'wb').write(b'partial')\n"
         "    os.kill(os.getpid(), signal.SIGKILL)\n"
         "c.save_model = dies\n"
         "ck = c.load_checkpoint(sys.argv[1])\n"
         "c.save_checkpoint(sys.argv[1], 3, ck.build_model(), {}, None)\n", str(run)],
        env=ENV, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [p.name for p in run.iterdir() if p.name.startswith(".tmp-ckpt-000003")]
    assert len(left) == 1 and load_checkpoint(run).step == 2
    said = []
    train(tiny_model(data.vocab_size), tiny_train(max_steps=3), run, data=data, resume=True, print_fn=said.append)
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]
    assert any(left[0] in s for s in said) and load_checkpoint(run).step == 3


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_checkpoints_and_exports_follow_the_users_umask(tmp_path, data, mask):
    """safetensors writes 0600 and mkdtemp/mkstemp make 0700/0600, whatever the umask: a serving
    process under another user could not read an export. Every file and folder gets the mode an
    ordinary write gives: with umask 022, readable by all (644/755); with 077, private."""
    pytest.importorskip("transformers")
    from gam.hf import export

    run = tmp_path / "run"
    old = os.umask(mask)
    try:
        train(tiny_model(data.vocab_size), tiny_train(max_steps=2), run, data=data, print_fn=quiet)
        export(run, tmp_path / "hf")
    finally:
        os.umask(old)
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    for folder in (load_checkpoint(run).path, tmp_path / "hf"):
        assert oct(folder.stat().st_mode & 0o777) == oct(dir_mode), folder
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == \
            {p.name: oct(file_mode) for p in folder.iterdir()}
    for name in ("latest", "metrics.jsonl"):
        assert oct((run / name).stat().st_mode & 0o777) == oct(file_mode), name


# ---------------------------------------------------------------- 7. bad input: one line each

def test_eval_batch_size_must_be_positive(tmp_path, data, capsys):
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=1), run, data=data, print_fn=quiet)
    for size in ("0", "-4"):
        assert "--batch-size must be an integer >= 1" in error_line(capsys, ["eval", str(run), "--batch-size", size])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a build without CUDA")
def test_generate_on_cuda_without_cuda_is_one_line(tmp_path, capsys):
    from test_generation import make_checkpoint

    make_checkpoint(tmp_path / "ckpt")
    err = error_line(capsys, ["generate", str(tmp_path / "ckpt"), "--prompt", "the", "--device", "cuda"])
    assert "CUDA is not available" in err
    assert "device must be" in error_line(capsys, ["generate", str(tmp_path / "ckpt"), "--prompt", "the",
                                                   "--device", "tpu"])


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path, corpus, capsys, monkeypatch):
    import gam.resources as resources

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    args = ["train", "--data", str(corpus), "--out", str(tmp_path / "run"), *TINY_ARGS]
    err = error_line(capsys, [*args, "--n-embd", "1000000000000"])
    assert "model too large" in err
    # 16 x 2**20 wide: ~10^13 parameters on the meta device, more than any machine here
    err = error_line(capsys, [*args, "--n-embd", str(2**24), "--n-head", "1"])
    assert "model too large" in err and "GiB" in err
    monkeypatch.setattr(resources, "available_memory", lambda device: 1000)
    with pytest.raises(ValueError, match="model too large: its 7,792 parameters need 0.0 GiB"):
        resources.check_fits_in_memory(tiny_model(103), torch.device("cpu"))


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    import gam.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    err = error_line(capsys, ["train"], 130)
    assert "interrupted" in err


def test_tokens_per_s_is_averaged_over_the_logged_interval(tmp_path, data):
    """Logging once per epoch-long interval: the log record's rate must equal the
    epoch record's (same tokens, same time), not the last step's."""
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=6, log_every=6), run, data=data, print_fn=quiet)
    log, epoch = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert log["step"] == epoch["step"] == 6 and "epoch_train_s" in epoch
    assert log["tokens_per_s"] == pytest.approx(epoch["tokens_per_s"], rel=1e-12)
    assert epoch["tokens_per_s"] == pytest.approx(6 * 4 * 16 / epoch["epoch_train_s"])


def test_the_summary_calls_a_partial_epoch_what_it_is(tmp_path, data, capsys):
    """A run that ends mid-epoch times a part of the epoch: not an "epoch train time"."""
    blocks = len(data.train) // 17
    capsys.readouterr()
    train(tiny_model(data.vocab_size), tiny_train(max_steps=6), tmp_path / "part", data=data, print_fn=quiet)
    line = [l for l in capsys.readouterr().out.splitlines() if "val loss" in l][-1]  # tqdm.write: stdout
    assert "epoch train time" not in line and f"(6 of epoch 0's {blocks // 4} steps; data " in line
    record = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["epoch_steps"] == 6
    # a whole epoch, in a few large batches
    batch = blocks // 3
    train(tiny_model(data.vocab_size), tiny_train(max_steps=None, epochs=1, batch_size=batch, warmup_steps=1),
          tmp_path / "whole", data=data, print_fn=quiet)
    line = [l for l in capsys.readouterr().out.splitlines() if "val loss" in l][-1]
    assert line.startswith("step 3: val loss") and "s (epoch 0; data " in line


@pytest.mark.slow
def test_fault_script_two_kills(tmp_path):
    """benchmarks/faults.py end to end, kept tiny: one kill aimed at a save, one anywhere."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "faults.py"), "--kills", "2", "--steps", "30",
                           "--mid-save", "0.5", "--out", str(tmp_path / "faults")],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "faults" / "faults.json").read_text())
    assert len(summary["kills"]) == 2 and all(k["unreadable"] is None for k in summary["kills"])
    run = summary["runs"][0]
    assert run["val_loss_diff"] <= 1e-6 and run["max_weight_diff"] == 0.0 and run["losses_equal"]
    assert "2 kill -9" in done.stdout and "0 unreadable" in done.stdout


def test_torch_save_on_a_full_disk_becomes_an_os_error(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError("... unexpected pos ...") with no
    errno: with (nearly) no free space left it is ENOSPC, naming the file; any other
    RuntimeError from a writer is left as it was."""
    import shutil
    from collections import namedtuple

    from gam.fileio import writer_errors_as_os_errors

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 << 20, 10 << 20, 4096))
    target = tmp_path / "trainer_state.pt"
    with pytest.raises(OSError) as info:
        with writer_errors_as_os_errors(target):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    with pytest.raises(RuntimeError, match="something else"):
        with writer_errors_as_os_errors(target):
            raise RuntimeError("something else")


# ---------------------------------------------------------------- value checks shared by CLI, API and benches

@pytest.mark.parametrize("args, message", [
    (["--min-lr", "1e-2", "--lr", "1e-3"], "min_lr (0.01) must not exceed lr (0.001)"),
    (["--weight-decay", "-0.1"], "weight_decay must be >= 0, got -0.1"),
    (["--threads", "-1"], "threads must be an integer >= 1"),
    (["--threads", "0"], "threads must be an integer >= 1"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--beta2", "1"], "beta2 must be in [0, 1)"),
])
def test_schedule_and_optimizer_values_are_refused_before_anything_is_written(tmp_path, corpus, args, message,
                                                                             capsys, monkeypatch):
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    line = error_line(capsys, ["train", "--data", str(corpus), "--out", str(tmp_path / "run"), *TINY_ARGS,
                               "--max-steps", "2", *args])
    assert message in line
    assert not (tmp_path / "run").exists()


def test_the_api_and_the_benches_share_the_configs_checks(capsys):
    from gam.config import ConfigError

    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match="weight_decay"):
        dataclasses.replace(TrainConfig(), weight_decay=-1.0)
    for bench in ("speed", "decode", "recall", "zoology"):
        assert "threads must be an integer >= 1" in error_line(capsys, ["bench", bench, "--threads", "-1"])
    # used to divide by zero while counting steps per epoch
    assert "batch_size must be an integer >= 1, got 0" in error_line(capsys, ["bench", "paper", "--batch-size", "0"])


# ---------------------------------------------------------------- pruning: by step, and only after success

def test_pruning_past_step_999999_keeps_the_newest_checkpoints(tmp_path):
    """As text ckpt-1000000 sorts before ckpt-999990: pruning by name deleted the newest."""
    from gam.checkpoint import save_checkpoint
    from gam.models.lm import DecoderLM

    model = DecoderLM(tiny_model())
    for step in (999_980, 999_990, 1_000_000, 1_000_010):
        save_checkpoint(tmp_path, step, model, {}, None)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-1000000", "ckpt-1000010"]
    assert load_checkpoint(tmp_path).step == 1_000_010


def test_a_refused_resume_keeps_the_runs_metrics(tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=6), run, data=data, stop_after=3, print_fn=quiet)
    logged = (run / "metrics.jsonl").read_bytes()
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match="wandb is not installed"):
        train(tiny_model(data.vocab_size), tiny_train(max_steps=6, logger="wandb"), run, resume=True,
              data=data, explicit={"logger"}, print_fn=quiet)
    assert (run / "metrics.jsonl").read_bytes() == logged


def test_a_reader_retries_the_newest_when_the_checkpoint_it_reads_is_pruned(tmp_path, data, monkeypatch):
    """A run still training saves twice while `gam eval RUN` verifies the checkpoint it opened:
    that folder is pruned under the reader, which then reads the newest instead."""
    import gam.checkpoint as checkpoint

    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=2), run, data=data, print_fn=quiet)
    model = load_checkpoint(run).build_model()
    hash_file = checkpoint.sha256_of_file
    run_saved = []

    def hash_while_the_run_saves(path):
        if not run_saved:
            run_saved.append(True)  # before saving: the saves hash their own files
            for step in (3, 4):
                checkpoint.save_checkpoint(run, step, model, {}, None)
        return hash_file(path)

    monkeypatch.setattr(checkpoint, "sha256_of_file", hash_while_the_run_saves)
    assert load_checkpoint(run).step == 4
    assert not (run / "ckpt-000002").exists()


# ---------------------------------------------------------------- every signal that ends runs saves first

COMPARED = ("step", "loss", "lr", "train_loss", "val_loss")  # a metrics record without its timings


def records(run: Path) -> list[dict]:
    return [{k: r[k] for k in COMPARED if k in r}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def signal_on_forward(monkeypatch, signum: int, when) -> dict:
    """Make the model send ``signum`` to this process on the forward pass ``when(training, calls)``
    picks (calls: forward passes in that mode so far, this one included); returns the counts."""
    import gam.train as train_module

    calls = {True: 0, False: 0}
    real = train_module.DecoderLM

    class Signalling(real):
        def forward(self, idx, targets=None, **kwargs):
            if torch.is_grad_enabled() or not self.training:  # not next_batch_loss's check before a save
                calls[self.training] += 1
                if when(self.training, calls[self.training]):
                    os.kill(os.getpid(), signum)
            return super().forward(idx, targets, **kwargs)

    monkeypatch.setattr(train_module, "DecoderLM", Signalling)
    return calls


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_sighup_and_sigterm_during_training_save_within_a_step_and_resume_exactly(tmp_path, data, monkeypatch,
                                                                                    signum):
    config, cfg = tiny_model(data.vocab_size), tiny_train(max_steps=12)
    full = train(config, cfg, tmp_path / "full", data=data, print_fn=quiet)
    signal_on_forward(monkeypatch, signum, lambda training, n: training and n == 5)  # during step index 4
    part = train(config, cfg, tmp_path / "part", data=data, print_fn=quiet)
    assert part.interrupted and part.stop_signal == signum and part.step == 5
    assert load_checkpoint(tmp_path / "part").step == 5
    monkeypatch.undo()
    resumed = train(config, cfg, tmp_path / "part", data=data, resume=True, print_fn=quiet)
    assert resumed.metrics["val_loss"] == full.metrics["val_loss"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert records(tmp_path / "part") == records(tmp_path / "full")


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_stop_during_an_evaluation_abandons_it_saves_and_the_resume_evaluates_first(tmp_path, data, monkeypatch,
                                                                                       signum):
    config, cfg = tiny_model(data.vocab_size), tiny_train(max_steps=8, eval_every=4, eval_batch_size=2)
    full = train(config, cfg, tmp_path / "full", data=data, print_fn=quiet)
    calls = signal_on_forward(monkeypatch, signum, lambda training, n: not training and n == 2)
    part = train(config, cfg, tmp_path / "part", data=data, print_fn=quiet)
    blocks = len(data.valid) // (config.block_size + 1)
    assert calls[False] == 2 < blocks // 2  # the pass stopped at its next batch, not at its end
    assert part.interrupted and part.stop_signal == signum and part.step == 4
    saved = load_checkpoint(tmp_path / "part")
    assert saved.step == 4 and saved.info["evaluation_owed"]["epoch"] == 0
    assert not any("val_loss" in r for r in records(tmp_path / "part"))
    monkeypatch.undo()
    resumed = train(config, cfg, tmp_path / "part", data=data, resume=True, print_fn=quiet)
    assert resumed.metrics["val_loss"] == full.metrics["val_loss"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert records(tmp_path / "part") == records(tmp_path / "full")  # the step-4 evaluation included


def test_a_stop_during_the_final_evaluation_is_resumed_not_called_finished(tmp_path, data, monkeypatch):
    config, cfg = tiny_model(data.vocab_size), tiny_train(max_steps=4, eval_batch_size=2)
    full = train(config, cfg, tmp_path / "full", data=data, print_fn=quiet)
    signal_on_forward(monkeypatch, signal.SIGTERM, lambda training, n: not training and n == 1)
    part = train(config, cfg, tmp_path / "part", data=data, print_fn=quiet)
    assert part.interrupted and part.step == 4 and "final_metrics" not in load_checkpoint(tmp_path / "part").info
    monkeypatch.undo()
    resumed = train(config, cfg, tmp_path / "part", data=data, resume=True, print_fn=quiet)
    assert not resumed.already_finished and resumed.metrics["val_loss"] == full.metrics["val_loss"]
    assert load_checkpoint(tmp_path / "part").info["final_metrics"]["val_loss"] == full.metrics["val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_gam_train_exits_with_the_signals_conventional_code_after_saving(tmp_path, corpus, signum, code):
    env = {**ENV, "GAM_CACHE_DIR": str(tmp_path / "cache")}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gam.cli", "train", "--data", str(corpus), "--out", str(run),
                             "--max-steps", "100000", *TINY_ARGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"{signal.Signals(signum).name}: saved a checkpoint at step" in out and "Traceback" not in err
    assert "--resume" in out
    step = load_checkpoint(run).step
    assert step > 0
    done = subprocess.run([sys.executable, "-m", "gam.cli", "train", "--data", str(corpus), "--out", str(run),
                           "--resume", "--max-steps", str(step + 3)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(run).step == step + 3


def test_sigterm_during_start_up_is_one_line_with_its_code(monkeypatch, capsys):
    import gam.cli as cli

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(cli, "build_parser", terminated)
    assert error_line(capsys, ["train"], 143) == "gam: interrupted (SIGTERM)"  # before the command is known
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back once the command ended


# ---------------------------------------------------------------- fingerprints: a run knows what it read

def sha256_hex(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_and_eval_refuse_a_corpus_that_changed_naming_the_file_and_both_hashes(tmp_path, corpus, capsys,
                                                                                       monkeypatch):
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    text = Path(tmp_path / "tiny.txt")
    text.write_bytes(corpus.read_bytes())
    run = tmp_path / "run"
    assert main(["train", "--data", "tiny.txt", "--out", str(run), *TINY_ARGS, "--max-steps", "4"]) == 0
    before = sha256_hex(text)
    with open(text, "a") as f:
        f.write("a line the run never saw\n")
    after = sha256_hex(text)
    resume = ["train", "--data", "tiny.txt", "--out", str(run), "--resume", "--max-steps", "6"]
    for line in (error_line(capsys, resume), error_line(capsys, ["eval", str(run)])):
        assert f"{text}: sha256 {before[:16]}" in line and f"-> sha256 {after[:16]}" in line
    assert load_checkpoint(run).step == 4 and "data_changes" not in load_checkpoint(run).info
    # from another working directory, tiny.txt is another file: refused too, naming both paths
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tiny.txt").write_text("other text\n" * 50)
    monkeypatch.chdir(elsewhere)
    assert f"tiny.txt: {text} -> {elsewhere / 'tiny.txt'}" in error_line(capsys, ["eval", str(run)])
    # continuing on purpose is recorded in the run; naming the data evaluates it as it is
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main([*resume, "--allow-change", "corpus"]) == 0
    assert "resume: continuing on changed data, as allowed" in capsys.readouterr().out
    saved = load_checkpoint(run)
    assert saved.step == 6 and saved.info["data_changes"][0]["step"] == 4
    assert saved.info["data_fingerprint"]["corpus"]["tiny.txt"]["sha256"] == after
    assert main(["eval", str(run)]) == 0


def test_a_cached_token_file_rewritten_with_same_size_garbage_is_re_encoded(tmp_path, corpus):
    from gam.corpus import DataWarning
    from gam.data import DataError, load_tokens, prepare_data

    def prepared():
        return prepare_data(str(corpus), block_size=16, vocab_size=300, cache_dir=tmp_path, train_rows=None,
                            valid_rows=None)

    first = prepared()
    tokens = first.token_paths["train"]
    good = tokens.read_bytes()
    tokens.write_bytes(bytes(reversed(good)))  # the same size, other tokens
    with pytest.raises(DataError, match="content does not match its sidecar"):
        load_tokens(tokens)
    with pytest.warns(DataWarning, match=r"train-.*\.bin: content does not match its sidecar.*; re-encoding"):
        again = prepared()
    assert again.train.tobytes() == good and tokens.read_bytes() == good
    Path(f"{tokens}.json").unlink()  # its sidecar lost (say a copy of the cache without it)
    with pytest.warns(DataWarning, match=r"missing token sidecar .*; re-encoding"):
        assert prepared().train.tobytes() == good


def test_an_edited_cached_tokenizer_is_retrained_not_trusted(tmp_path, corpus):
    from gam.corpus import DataWarning
    from gam.data import prepare_data

    def prepared():
        return prepare_data(str(corpus), block_size=16, vocab_size=300, cache_dir=tmp_path, train_rows=None,
                            valid_rows=None)

    first = prepared()
    spec = json.loads(first.tokenizer_path.read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[-2:]  # swap two learned tokens' ids: still a valid tokenizer, another one
    vocab[a], vocab[b] = vocab[b], vocab[a]
    first.tokenizer_path.write_text(json.dumps(spec))
    with pytest.warns(DataWarning, match=r"cached tokenizer .*: does not match its .*meta\.json.*; retraining"):
        again = prepared()
    assert again.tokenizer_hash == first.tokenizer_hash
    assert again.train.tobytes() == first.train.tobytes()


# ---------------------------------------------------------------- one line instead of a traceback

@pytest.mark.parametrize("prompt", ["a\udcff b", "\ud800"], ids=["non-UTF-8 byte", "lone surrogate"])
def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path, data, capsys, prompt):
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=1), run, data=data, print_fn=quiet)
    line = error_line(capsys, ["generate", str(run), "--prompt", prompt, "--max-new-tokens", "2"])
    assert "the prompt is not valid UTF-8 text" in line


def test_a_corrupt_gzip_corpus_is_one_line(tmp_path, capsys):
    import gzip

    packed = bytearray(gzip.compress(b"some text that compresses into more than a stored block\n" * 20))
    packed[12:16] = b"\xff\xff\xff\xff"  # a deflate stream zlib rejects (zlib.error, not OSError)
    corrupt = tmp_path / "corpus.txt.gz"
    corrupt.write_bytes(bytes(packed))
    line = error_line(capsys, ["train", "--data", str(corrupt), "--out", str(tmp_path / "run")])
    assert f"{corrupt}: unreadable gzip file (error: " in line


def test_a_full_disk_while_building_the_token_cache_names_the_file(tmp_path, corpus, capsys, monkeypatch):
    """numpy's tofile says "N requested and 0 written" (no errno, no file); fsync an errno without a file."""
    import gam.fileio

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    real_fsync = os.fsync

    def full(fd):
        written = os.readlink(f"/proc/self/fd/{fd}")
        if ".bin." in written and written.endswith(".tmp"):  # the token cache's temp file
            raise OSError("1234 requested and 0 written")
        return real_fsync(fd)

    monkeypatch.setattr(gam.fileio.os, "fsync", full)
    monkeypatch.setattr(gam.fileio, "_nearly_full", lambda folder: True)
    line = error_line(capsys, ["train", "--data", str(corpus), "--out", str(tmp_path / "run"), *TINY_ARGS], 1)
    assert line.startswith(f"gam train: error: {tmp_path / 'cache' / 'tokens'}/") and \
        line.endswith(".bin: No space left on device")
    assert not list((tmp_path / "cache" / "tokens").rglob("*.tmp"))


def test_temporaries_of_killed_writers_are_removed_by_the_next_run(tmp_path, corpus, data):
    """kill -9 leaves atomic_write's temp files (token cache) and export folders; a live writer's
    (locked) and a brand-new one are kept."""
    import fcntl

    from gam.data import prepare_data
    from gam.hf import export

    def prepared():
        return prepare_data(str(corpus), block_size=16, vocab_size=300, cache_dir=tmp_path / "cache",
                            train_rows=None, valid_rows=None)

    token_dir = prepared().token_paths["train"].parent
    an_hour_ago = time.time() - 3600
    orphan, live, new = (token_dir / f".train-x.bin.{name}.tmp" for name in ("orphan", "live", "new"))
    for p in (orphan, live, new):
        p.write_bytes(b"half a token file")
    for p in (orphan, live):
        os.utime(p, (an_hour_ago, an_hour_ago))
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a writer still running holds it
        prepared()
        assert not orphan.exists() and live.exists() and new.exists()
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(max_steps=1), run, data=data, print_fn=quiet)
    killed_export = tmp_path / ".tmp-hf-abc123"
    killed_export.mkdir()
    (killed_export / "model.safetensors").write_bytes(b"partial")
    os.utime(killed_export, (an_hour_ago, an_hour_ago))
    export(run, tmp_path / "hf")
    assert not killed_export.exists() and (tmp_path / "hf" / "model.safetensors").is_file()
