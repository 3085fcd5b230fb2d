"""Fault injection: kill -9 a training run at random moments, check nothing is lost.

    python benchmarks/faults.py --kills 24 --out results/faults

Trains a tiny GAM (fp32, CPU, one thread, dropout on so the RNG state matters)
once without interruption, then trains the same run again in fresh folders,
killing the process with SIGKILL at random moments: during start-up, during
training, and (watching for a save's temporary folder) in the middle of a
checkpoint save. After every kill the run folder's newest checkpoint must load
and verify (manifest, weights, trainer state); the run is then resumed with the
command the trainer prints (``gam train --out RUN --resume``). Each run, once
finished, must equal the uninterrupted one: the same final validation loss (to
1e-6), the same weights and the same logged losses.

Prints the figures (quoted in docs/reliability.md) and writes faults.json into
--out. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gam.bench.common import end_provenance, start_provenance  # noqa: E402
from gam.checkpoint import TEMP_PREFIX, CheckpointError, load_checkpoint, verify_folder  # noqa: E402

TINY = ["--data", "wikitext2", "--data-source", "shipped", "--train-rows", "2000", "--valid-rows", "200",
        "--vocab-size", "512", "--block-size", "32", "--n-embd", "32", "--n-layer", "2", "--n-head", "2",
        "--num-memory-slots", "16", "--dropout", "0.1", "--batch-size", "8", "--warmup-steps", "10",
        "--lr", "3e-3", "--eval-every", "50", "--eval-batch-size", "16", "--log-every", "5",
        "--precision", "fp32", "--device", "cpu", "--threads", "1"]


def gam(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gam.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def final_state(run: Path) -> tuple[float, dict, list[float]]:
    """(final validation loss, weights, logged training losses) of a finished run."""
    ckpt = load_checkpoint(run)
    val_loss = ckpt.info["final_metrics"]["val_loss"]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return val_loss, ckpt.build_model().state_dict(), losses


def check_newest(run: Path) -> str | None:
    """None if the newest checkpoint (if any yet) loads completely, else what is wrong."""
    if not (run / "latest").exists():
        return None  # killed before its first save: nothing to lose yet
    try:
        ckpt = load_checkpoint(run)
        ckpt.build_model()
        ckpt.trainer_state()
        ckpt.tokenizer()
    except CheckpointError as err:
        return str(err)
    problems = verify_folder(run)[1]
    return "; ".join(problems) or None


def kill_at_random(proc: subprocess.Popen, run: Path, rng: random.Random, mid_save: float,
                   start_up: float) -> str | None:
    """SIGKILL ``proc`` at a random moment; returns the moment's kind, or None if it finished first."""
    roll = rng.random()
    if roll < mid_save:
        kind = "mid-save"
        deadline = time.monotonic() + 120
        delay = rng.choice([0.0, rng.uniform(0, 0.002)])  # at once, or somewhere later in the save
        stale = {name for name in os.listdir(run) if name.startswith(TEMP_PREFIX)}
        while time.monotonic() < deadline and proc.poll() is None:  # a busy wait: a tiny save takes ~ms
            if any(name.startswith(TEMP_PREFIX) and name not in stale for name in os.listdir(run)):
                if delay:
                    time.sleep(delay)
                break
    elif roll < mid_save + start_up:
        kind = "start-up"
        time.sleep(rng.uniform(0, 2.0))
    else:
        kind = "training"
        deadline = time.monotonic() + 120  # wait until it trains (logs), then a random delay
        while (time.monotonic() < deadline and proc.poll() is None
               and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size)):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.5))
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=24, help="SIGKILLs in all (default 24)")
    parser.add_argument("--kills-per-run", type=int, default=8, help="kills before a run may finish")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--mid-save", type=float, default=0.5, help="share of kills aimed at a save")
    parser.add_argument("--start-up", type=float, default=0.15, help="share of kills during start-up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--out", default="results/faults")
    args = parser.parse_args(argv)
    provenance = start_provenance()
    if args.kills < 1 or args.kills_per_run < 1 or args.steps < 2 or args.save_every < 1:
        parser.error("--kills, --kills-per-run, --save-every must be >= 1 and --steps >= 2")

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "GAM_CACHE_DIR": str(out / "cache"), "OMP_NUM_THREADS": "1"}
    command = [*TINY, "--max-steps", str(args.steps), "--save-every", str(args.save_every)]
    rng = random.Random(args.seed)
    t0 = time.monotonic()

    reference = gam(["train", "--out", str(out / "reference"), *command], env)
    err = reference.communicate()[1]
    if reference.returncode != 0:
        print(f"the uninterrupted run failed:\n{err}", file=sys.stderr)
        return 1
    ref_loss, ref_weights, ref_losses = final_state(out / "reference")

    kills: list[dict] = []
    runs: list[dict] = []
    while len(kills) < args.kills:
        run = out / f"run{len(runs)}"
        run.mkdir()
        starts, run_kills, tracebacks = 0, 0, 0
        stale: set[str] = set()  # temporary folders killed saves left in this run folder
        while True:
            resume = (run / "latest").exists()
            proc = gam(["train", "--out", str(run), "--resume"] if resume else ["train", "--out", str(run), *command],
                       env)
            starts += 1
            want_kill = run_kills < args.kills_per_run and len(kills) < args.kills
            kind = kill_at_random(proc, run, rng, args.mid_save, args.start_up) if want_kill else None
            err = proc.communicate()[1]  # drains and closes the pipe (a killed process too)
            if kind is None:
                tracebacks += "Traceback" in err
                if proc.returncode != 0:
                    print(f"{run}: gam train exited {proc.returncode}:\n{err}", file=sys.stderr)
                    return 1
                break
            problem = check_newest(run)
            temporaries = {name for name in os.listdir(run) if name.startswith(TEMP_PREFIX)}
            landed_in_save = bool(temporaries - stale)  # it left a save's temporary folder behind
            stale |= temporaries
            kills.append({"run": run.name, "kind": kind, "landed_in_save": landed_in_save, "unreadable": problem})
            run_kills += 1
            print(f"kill {len(kills):2d} ({kind:8s}{', inside a save' if landed_in_save else ''}) {run.name}: "
                  f"newest checkpoint {'UNREADABLE: ' + problem if problem else 'ok'}", flush=True)
        loss, state, losses = final_state(run)
        weight_diff = max((state[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        runs.append({"run": run.name, "starts": starts, "kills": run_kills, "val_loss": loss,
                     "val_loss_diff": abs(loss - ref_loss), "max_weight_diff": weight_diff,
                     "losses_equal": losses == ref_losses, "stale_temporaries": len(stale),
                     "stale_temporaries_left": sum(n.startswith(TEMP_PREFIX) for n in os.listdir(run)),
                     "tracebacks": tracebacks})

    by_kind = {k: sum(x["kind"] == k for x in kills) for k in ("start-up", "training", "mid-save")}
    unreadable = sum(x["unreadable"] is not None for x in kills)
    equal = sum(r["val_loss_diff"] <= 1e-6 and r["max_weight_diff"] == 0.0 and r["losses_equal"] for r in runs)
    lines = [
        f"{len(kills)} kill -9 ({by_kind['mid-save']} aimed at a checkpoint save, {by_kind['training']} at "
        f"training, {by_kind['start-up']} at start-up; {sum(k['landed_in_save'] for k in kills)} landed inside "
        f"a save) over {len(runs)} runs of {args.steps} steps (a save every {args.save_every}); "
        f"{time.monotonic() - t0:.0f} s",
        f"newest checkpoint after each kill: {len(kills)} checked, {unreadable} unreadable",
        f"temporary folders left by killed saves: {sum(r['stale_temporaries'] for r in runs)}, "
        f"{sum(r['stale_temporaries_left'] for r in runs)} left once the runs finished",
        f"resumed runs equal to the uninterrupted one: {equal} of {len(runs)} (max |val loss diff| "
        f"{max(r['val_loss_diff'] for r in runs):.1e}, limit 1e-6; max |weight diff| "
        f"{max(r['max_weight_diff'] for r in runs):.1e}; logged losses identical in "
        f"{sum(r['losses_equal'] for r in runs)}); uninterrupted val loss {ref_loss:.6f}",
        f"tracebacks from the runs that finished: {sum(r['tracebacks'] for r in runs)}",
    ]
    print("\n".join(lines))
    # the trainings ran in child processes with one thread each (TINY's --threads 1)
    provenance = {**end_provenance(provenance), "torch_threads": 1}
    (out / "faults.json").write_text(json.dumps({"provenance": provenance, "command": " ".join(sys.argv),
                                                 "kills": kills, "runs": runs, "reference_val_loss": ref_loss,
                                                 "summary": lines}, indent=2))
    ok = unreadable == 0 and equal == len(runs) and not any(r["stale_temporaries_left"] for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
