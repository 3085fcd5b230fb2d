"""The command line describes itself: help generated from the config dataclasses,
--version, errors that name the flag, suggestions, no torch for --help, progress
bars for evaluation, one clean line when the hub is unreachable."""

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import gam
from gam import build_model
from gam.cli import build_parser, main
from gam.config import PRESETS, GAMConfig, TrainConfig, field_meaning
from gam.train_cli import parse_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
ALL_FIELDS = [*dataclasses.fields(GAMConfig), *dataclasses.fields(TrainConfig)]


def run_cli(*args, env=ENV):
    return subprocess.run([sys.executable, "-m", "gam.cli", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def help_text(*command):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0


def test_every_field_has_a_one_line_meaning():
    for field in ALL_FIELDS:
        meaning = field_meaning(field)
        assert meaning and "\n" not in meaning, field.name


def test_train_help_lists_every_field_with_default_and_meaning(capsys):
    help_text("train")
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # argparse wraps long help lines
    for field in ALL_FIELDS:
        flag = "--" + field.name.replace("_", "-")
        assert f"\n  {flag} " in out, flag
        assert " ".join(field_meaning(field).split()) in flat, flag
    assert "--lr FLOAT peak learning rate (AdamW) (default: 0.0003; cpu preset: 0.002)" in flat
    assert "--max-steps INT stop after this many optimizer steps (overrides epochs) (default: none; " \
           "cpu preset: 600)" in flat
    assert "--compile [BOOL] torch.compile the model (default: false)" in flat
    # the flags as `gam train --help | grep -c -- '--'` counts them: one line per field at least
    assert sum("--" in line for line in out.splitlines()) >= len(ALL_FIELDS)


def test_help_shows_preset_values_that_differ():
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["train"]
    help_of = {action.dest: action.help for action in train._actions}
    for name, (model_fields, train_fields) in PRESETS.items():
        for field in ALL_FIELDS:
            value = {**model_fields, **train_fields}.get(field.name, field.default)
            assert (value != field.default) == (f"{name} preset" in help_of[field.name]), (name, field.name)


def test_version_prints_the_package_version():
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"gam {gam.__version__}"
    assert 'dynamic = ["version"]' in (REPO / "pyproject.toml").read_text()  # pyproject reads gam.__version__


def test_top_level_help_lists_commands_in_the_order_users_need_them():
    done = run_cli("--help")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert "Gated Associative Memory" in done.stdout and "cut" not in lines[2]
    listed = [line.split()[0] for line in lines if line.startswith("    ") and not line.startswith("     ")]
    assert listed[:5] == ["train", "eval", "generate", "export", "bench"]


def test_help_and_version_do_not_import_torch():
    probe = ("import sys; from gam.cli import main\n"
             "for argv in (['--help'], ['--version'], ['train', '--help'], ['bench', '--help']):\n"
             "    try: main(argv)\n"
             "    except SystemExit: pass\n"
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("args,message", [
    (["--lr", "abc"], "gam train: error: --lr: cannot read 'abc' as a float"),
    (["--n-layer=4.5"], "gam train: error: --n-layer: cannot read '4.5' as an integer"),
    (["--max-steps", "ten"], "gam train: error: --max-steps: cannot read 'ten' as an integer or none"),
    (["--compile", "maybe"], "gam train: error: --compile: cannot read 'maybe' as true or false"),
])
def test_value_errors_name_the_flag(args, message, capsys):
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err.strip() == message


@pytest.mark.parametrize("args,suggestion", [
    (["--n-layers", "4"], "--n-layers (did you mean --n-layer?)"),
    (["--learning-rate=1e-3"], "--learning-rate"),
    (["--num-memory-slot", "8"], "did you mean --num-memory-slots?"),
    (["--warmup", "10"], "did you mean --warmup-steps?"),
])
def test_unknown_field_suggests_the_closest(args, suggestion, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gam train: error: unknown option") and suggestion in err
    assert len(err.splitlines()) == 1


def test_unknown_option_of_other_commands_suggests_too(capsys):
    assert main(["generate", "ckpt", "--prompt", "hi", "--max-new-tokns", "3"]) == 2
    assert "did you mean --max-new-tokens?" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["trian"], "gam: error: COMMAND: invalid choice: 'trian' (did you mean train?); see gam --help"),
    (["xyz"], "gam: error: COMMAND: invalid choice: 'xyz' (choose from 'train', 'eval', "),
    ([], "gam: error: the following arguments are required: COMMAND; see gam --help"),
    (["bench", "decod"], "did you mean decode?"),
])
def test_mistyped_or_missing_command(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_overrides_for_bench_share_the_field_parser():
    model, training = parse_overrides(["--n-layer", "3", "--lr=1e-3", "--compile", "--max-steps", "none"])
    assert model == {"n_layer": 3} and training == {"lr": 1e-3, "compile": True, "max_steps": None}
    with pytest.raises(ValueError, match="--lr: cannot read 'x' as a float"):
        parse_overrides(["--lr", "x"])
    with pytest.raises(ValueError, match="did you mean --n-layer"):
        parse_overrides(["--n-layers", "3"])
    with pytest.raises(ValueError, match="--model: a benchmark trains its own set of models"):
        parse_overrides(["--model", "mamba"])


def bench_config(argv: list[str], monkeypatch):
    """The config ``gam bench ...`` would run, without running it."""
    import gam.cli

    seen = {}

    def capture(bench, args):
        fields = gam.cli.given_fields(args, bench.Config)
        if getattr(bench, "ACCEPTS_OVERRIDES", False):
            fields["model_overrides"], fields["train_overrides"] = parse_overrides(list(args.overrides or []))
        seen["config"] = bench.Config(**fields)

    monkeypatch.setattr(gam.cli, "cmd_bench", capture)
    assert main(argv) == 0
    return seen["config"]


def test_every_bench_takes_its_options_from_its_config(monkeypatch):
    """One parser per benchmark, generated from its Config: every described field is an
    option and every option (but --out) a field; the flags of the hand-written parsers
    they replaced still read the same."""
    import argparse
    import dataclasses

    from gam.bench import ablation, decode, paper, recall, scaling, speed, zoology
    from gam.cli import build_parser
    from gam.cli_args import field_flag

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench_sub = next(a for a in sub.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    for bench in (decode, speed, recall, zoology, scaling, paper, ablation):
        options = {s for a in bench_sub.choices[bench.NAME]._actions for s in a.option_strings if s.startswith("--")}
        fields = {field_flag(f) for f in dataclasses.fields(bench.Config) if "help" in f.metadata}
        assert options - {"--help", "--out"} == fields, bench.NAME
    cfg = bench_config(["bench", "scaling", "--min-time", "0", "--time-budget", "5", "--lengths", "64,128",
                        "--models", "gam,mamba"], monkeypatch)
    assert (cfg.min_time_s, cfg.time_budget_s, cfg.lengths, cfg.models) == (0.0, 5.0, (64, 128), ("gam", "mamba"))
    cfg = bench_config(["bench", "paper", "--fair", "--models", "transformer", "--datasets", "wikitext2",
                        "--n-layer", "2", "--lr", "1e-3"], monkeypatch)
    assert cfg.fair is True and cfg.models == ("transformer",) and cfg.datasets == ("wikitext2",)
    assert cfg.model_overrides == {"n_layer": 2} and cfg.train_overrides == {"lr": 1e-3}
    cfg = bench_config(["bench", "ablation", "--dataset", "tinystories", "--variants", "full,kv_slots"], monkeypatch)
    assert cfg.dataset == "tinystories" and cfg.variants == ("full", "kv_slots")
    assert main(["bench", "ablation", "--variants", "full,nope"]) == 2  # a one-line error, not a traceback
    assert main(["bench", "scaling", "--n-layer", "2"]) == 2  # no overrides where the bench trains nothing


def test_train_applies_fields_over_the_preset(monkeypatch, tmp_path):
    import gam.train

    seen = {}

    def fake_train(model_config, cfg, out, resume=False, explicit=None, allow_change=()):
        seen.update(model=model_config, cfg=cfg, out=out, resume=resume, explicit=explicit, allow_change=allow_change)
        raise ValueError("stop here")

    monkeypatch.setattr(gam.train, "train", fake_train)
    assert main(["train", "--n-layer", "3", "--epochs", "2", "--lr", "1e-3", "--model", "mamba",
                 "--data", "tinystories", "--compile"]) == 2
    assert seen["model"].n_layer == 3 and seen["model"].n_embd == PRESETS["cpu"][0]["n_embd"]
    assert seen["model"].model == "mamba"
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.max_steps, cfg.lr, cfg.compile) == (2, None, 1e-3, True)  # --epochs alone: no step cap
    assert cfg.precision == PRESETS["cpu"][1]["precision"]
    assert seen["out"] == "runs/mamba-cpu-tinystories"
    assert seen["explicit"] is None  # a new run: every field counts

    # --resume: the fields given on purpose are the ones the run may change (or refuse)
    assert main(["train", "--resume", "--out", str(tmp_path), "--lr", "1e-3", "--epochs", "2"]) == 2
    assert seen["resume"] and seen["explicit"] == {"lr": "", "epochs": "", "max_steps": "--epochs"}
    # ... and every field of a preset given again, marked as the preset's for the messages
    assert main(["train", "--resume", "--out", str(tmp_path), "--preset", "cpu", "--lr", "1e-3",
                 "--allow-change", "lr,--warmup-steps"]) == 2
    assert seen["explicit"]["lr"] == "" and seen["explicit"]["n_embd"] == "--preset cpu"
    assert set(seen["explicit"]) == {"lr", *PRESETS["cpu"][0], *PRESETS["cpu"][1]}
    assert seen["allow_change"] == {"lr", "warmup_steps"}


@pytest.mark.parametrize("argv,message", [
    (["--allow-change", "lr"], "--allow-change applies only with --resume"),
    (["--resume", "--allow-change", "seed,lr"], "--allow-change: seed cannot be changed on resume; it takes beta1"),
])
def test_allow_change_is_checked_before_training(tmp_path, capsys, argv, message):
    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ evaluation progress

class Terminal(io.StringIO):
    def isatty(self):
        return True


def tiny_eval_inputs():
    torch.manual_seed(0)
    model = build_model("gam", vocab_size=32, block_size=8, n_embd=16, n_layer=1, num_memory_slots=4)
    return model, np.random.default_rng(0).integers(0, 32, 9 * 6).astype(np.int64)  # 6 blocks: 3 batches of 2


@pytest.mark.parametrize("stderr,env,expected", [
    (Terminal, {}, "bar"),
    (io.StringIO, {"GAM_PROGRESS_SECONDS": "0"}, "lines"),  # a log: a line after every batch, then "done"
    (io.StringIO, {}, ""),  # a log, a step shorter than the 5 s between lines: nothing to say
    (Terminal, {"TQDM_DISABLE": "1"}, ""),
    (io.StringIO, {"TQDM_DISABLE": "1", "GAM_PROGRESS_SECONDS": "0"}, ""),
])
def test_evaluation_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(monkeypatch, stderr, env, expected):
    from gam.evaluation import loss_by_position
    from gam.train import Dist, evaluate

    for key in ("TQDM_DISABLE", "GAM_PROGRESS_SECONDS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model, tokens = tiny_eval_inputs()
    for run, label in ((lambda: evaluate(model, tokens, 8, 2, torch.device("cpu"), "fp32"), "evaluating"),
                       (lambda: loss_by_position(model, tokens, 8, 2, "cpu"), "loss by position")):
        fake_stderr = stderr()
        monkeypatch.setattr(sys, "stderr", fake_stderr)
        run()
        text = fake_stderr.getvalue()
        if expected == "bar":
            assert label in text and "\r" in text
        elif expected == "lines":
            # the seconds are the machine's (a loaded machine takes longer): the lines' shape is the contract
            shape = [rf"{label}: batch 1 of 3 \(33%, about \d+ s left\), \d+ s so far",
                     rf"{label}: batch 2 of 3 \(67%, about \d+ s left\), \d+ s so far",
                     rf"{label}: done, 3 batches in \d+ s"]
            lines = text.splitlines()
            assert len(lines) == 3 and all(re.fullmatch(p, line) for p, line in zip(shape, lines)), (label, lines)
        else:
            assert text == "", label
    second_process = Terminal()
    monkeypatch.setattr(sys, "stderr", second_process)
    evaluate(model, tokens, 8, 2, torch.device("cpu"), "fp32", Dist(rank=1, world=1))
    assert second_process.getvalue() == ""  # only process 0 reports


def test_progress_lines_come_every_n_seconds(monkeypatch):
    import gam.progress

    clock = iter(range(0, 1000, 4))  # each look at the clock: 4 s later
    monkeypatch.setattr(gam.progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("GAM_PROGRESS_SECONDS", "10")
    assert list(gam.progress.progress(range(10), "evaluating")) == list(range(10))
    lines = sys.stderr.getvalue().splitlines()
    # a line once 10 s have passed since the last one: after batches 3 (12 s), 6 (24 s) and 9 (36 s)
    assert lines == ["evaluating: batch 3 of 10 (30%, about 28 s left), 12 s so far",
                     "evaluating: batch 6 of 10 (60%, about 16 s left), 24 s so far",
                     "evaluating: batch 9 of 10 (90%, about 4 s left), 36 s so far",
                     "evaluating: done, 10 batches in 44 s"]
    monkeypatch.setenv("GAM_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="GAM_PROGRESS_SECONDS must be a number of seconds >= 0, got 'soon'"):
        list(gam.progress.progress(range(2), "evaluating"))


def test_a_step_that_cannot_count_says_it_is_still_working(monkeypatch):
    import gam.progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("GAM_PROGRESS_SECONDS", "0")  # a heartbeat waits at least 1 s
    with gam.progress.heartbeat("training the tokenizer"):
        pass
    assert sys.stderr.getvalue() == ""  # shorter than the interval: nothing
    beats = []
    monkeypatch.setattr(gam.progress, "say", beats.append)
    real_wait = threading.Event.wait
    monkeypatch.setattr(threading.Event, "wait", lambda self, timeout=None: real_wait(self, 0.01))
    with gam.progress.heartbeat("training the tokenizer"):
        deadline = time.monotonic() + 5
        while len(beats) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert beats[0].startswith("training the tokenizer: ") and beats[0].endswith(" s so far")
    assert beats[-1].startswith("training the tokenizer: done in ")


def test_gam_eval_into_a_log_file_leaves_progress_lines(tmp_path):
    """The issue's case: `gam eval RUN > log 2>&1` showed nothing while it ran."""
    from gam.data import prepare_data
    from gam.train import train
    from test_train import quiet, tiny_model, tiny_train, write_corpus

    corpus = write_corpus(tmp_path / "tiny.txt")
    cache = tmp_path / "cache"
    data = prepare_data(str(corpus), block_size=16, vocab_size=512, cache_dir=cache, train_rows=None,
                        valid_rows=None)
    run = tmp_path / "run"
    train(tiny_model(data.vocab_size), tiny_train(data=str(corpus), train_rows=None, valid_rows=None, max_steps=2),
          run, data=data, print_fn=quiet)
    log = tmp_path / "log"
    env = {**ENV, "GAM_CACHE_DIR": str(cache), "GAM_PROGRESS_SECONDS": "0"}
    env.pop("TQDM_DISABLE", None)
    done = subprocess.run(f"{sys.executable} -m gam.cli eval {run} --batch-size 8 > {log} 2>&1", shell=True,
                          env=env, timeout=120)
    text = log.read_text()
    assert done.returncode == 0, text
    batches = re.search(r"^evaluating: batch 1 of (\d+) \(", text, flags=re.M)
    assert batches and f"\nevaluating: done, {batches[1]} batches in " in text
    assert "\r" not in text and "val loss" in text


# ------------------------------------------------------------------ hub unreachable: one line

@pytest.mark.parametrize("env,data_source,message", [
    ({}, "auto", True), ({"HF_HUB_OFFLINE": "1"}, "auto", False), ({}, "shipped", False)])
def test_hub_unreachable_is_one_clean_line(monkeypatch, capsys, tmp_path, env, data_source, message):
    import gam.train
    from gam.corpus import load_corpus

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path))  # a fresh cache: its first fallback warns
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1:9")  # TEST-NET-1: never answers
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def no_cached_copy(*args, **kwargs):  # what datasets says offline without a cached hub copy
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr("datasets.load_dataset", no_cached_copy)

    def load_only(model_config, cfg, out, resume=False, explicit=None, allow_change=()):  # train()'s data step, without the training
        load_corpus(cfg.data, source=cfg.data_source, hub_timeout=0.5)
        raise KeyboardInterrupt

    monkeypatch.setattr(gam.train, "train", load_only)
    assert main(["train", "--data", "tinystories", "--data-source", data_source]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "gam train: interrupted"
    if not message:
        assert lines == ["gam train: interrupted"]
        return
    assert len(lines) == 2
    assert lines[0].startswith("gam train: warning: roneneldan/TinyStories: hub unreachable (")
    assert lines[0].endswith("; using the shipped copy (--data-source shipped or HF_HUB_OFFLINE=1 skips this check)")


def test_a_run_on_the_shipped_copy_resumes_and_evaluates_without_checking_the_hub(monkeypatch, capsys, tmp_path):
    """The hub warning came again on every resume and evaluation of a run trained on the shipped
    copy, where it said nothing useful. Such a run reads its own copy: no check, no warning."""
    import gam.corpus
    from test_train import TINY_ARGS

    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path / "cache"))
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(gam.corpus, "_probe_hub", lambda *a: (False, "no network here"))
    run = tmp_path / "run"
    command = ["train", "--data", "tinystories", "--train-rows", "100", "--valid-rows", "50", "--out", str(run),
               *TINY_ARGS]
    assert main([*command, "--max-steps", "2"]) == 0
    assert capsys.readouterr().err.count("hub unreachable (no network here); using the shipped copy") == 1

    def no_hub_check(*args):
        raise AssertionError("a run trained on the shipped copy needs no hub check")

    monkeypatch.setattr(gam.corpus, "_probe_hub", no_hub_check)
    assert main([*command, "--max-steps", "3", "--resume"]) == 0
    assert main(["eval", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and json.loads(out.splitlines()[-1])["data"].startswith("shipped: TinyStories")


# ------------------------------------------------------------------ docs/cli.md stays true

DOC = (REPO / "docs" / "cli.md").read_text()


def test_docs_field_tables_match_the_dataclasses():
    from gam.train_cli import fields_markdown

    start = DOC.index("-->\n", DOC.index("<!-- fields:")) + len("-->\n")
    assert DOC[start:DOC.index("\n<!-- end of fields -->")] == fields_markdown(), \
        "regenerate the tables in docs/cli.md with gam.train_cli.fields_markdown()"


def test_docs_error_examples_are_what_the_command_prints(capsys, monkeypatch, tmp_path):
    import shlex

    monkeypatch.chdir(tmp_path)  # a run folder, should one be made, lands here
    lines = DOC.splitlines()
    examples = [(line.strip()[2:], lines[i + 1].strip()) for i, line in enumerate(lines)
                if line.strip().startswith("$ gam ")]
    assert len(examples) >= 4
    for command, printed in examples:
        assert main(shlex.split(command)[1:]) == 2, command
        assert capsys.readouterr().err.strip() == printed, command


def test_progress_reaches_a_log_file_line_by_line(tmp_path):
    """stdout redirected to a file: each progress line is written when printed, not when the
    command ends (Python's block buffering would hold a long bench's lines back)."""
    import subprocess
    import time

    log = tmp_path / "log"
    script = ("import sys, time\nfrom gam.cli import line_buffered_output\nline_buffered_output()\n"
              "print('first line')\ntime.sleep(30)\n")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out)
        try:
            deadline = time.monotonic() + 20
            while "first line" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert log.read_text() == "first line\n"
        finally:
            proc.kill()
            proc.wait()



def test_train_and_bench_tune_the_allocator_unless_told_not_to(monkeypatch):
    """`gam train` and `gam bench` keep freed memory in glibc's heap for their process
    (gam.resources.tune_cpu_allocator), `gam bench speed --no-tune-malloc` does not, and the
    benches' environment records which."""
    import gam.resources as resources
    import gam.train
    from gam.bench import speed
    from gam.bench.common import environment

    tuned = []
    monkeypatch.setattr(resources, "tune_cpu_allocator", lambda: tuned.append(True) or True)
    monkeypatch.setattr(gam.train, "train", lambda *a, **k: (_ for _ in ()).throw(ValueError("stop here")))
    assert main(["train"]) == 2 and tuned == [True]
    runs = []
    monkeypatch.setattr(speed, "run", lambda config: runs.append(config.no_tune_malloc) or (_ for _ in ()).throw(
        ValueError("stop here")))
    tuned.clear()
    assert main(["bench", "speed", "--no-tune-malloc"]) == 2 and runs == [True] and tuned == []
    assert main(["bench", "speed"]) == 2 and runs == [True, False] and tuned == [True]
    monkeypatch.undo()
    monkeypatch.setattr(resources, "_allocator_tuned", False)
    assert environment()["malloc_tuned"] is False
    if resources.tune_cpu_allocator():  # glibc: it takes effect and says so
        assert resources.cpu_allocator_tuned() and environment()["malloc_tuned"] is True
