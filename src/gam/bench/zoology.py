"""Zoology's MQAR suite: train on a mixture of lengths, test on longer ones, accuracy against state size.

The "original MQAR" configuration of Zoology (Arora et al. 2023,
``HazyResearch/zoology``, ``mqar_example_configs/original_mqar_configs.py``):

- data: the generator of :mod:`gam.bench.mqar` with Zoology's choices: keys and
  values from disjoint halves of a vocabulary of 8,192, queries at power-law
  distances, fillers from the whole vocabulary, loss on the answers only;
- training mixture (sequence length / key-value pairs): 64/4, 128/8, 256/16,
  256/32, 256/64; Zoology draws 100,000 / 20,000 / 20,000 / 20,000 / 20,000
  examples and trains 32 epochs at batch 256;
- test slices, longer and with more pairs than any training sequence: 64/4,
  64/8, 64/16, 128/32, 256/64, 512/128, 1,024/256 (the last needs a vocabulary
  of at least :data:`MIN_VOCAB`);
- 2 layers, each with a short convolution: Zoology's attention is a hybrid
  (a short convolution, then attention), here the registry's ``transformer_conv``
  (a causal depthwise convolution of kernel 3 added to the attention input);
  Mamba, the paper GAM and the kv-slot GAM have their own;
- no position embeddings (Zoology's are off for these configurations): only the
  convolutions and the mixers order the tokens, so no model meets an untrained
  position at the long test slices;
- learning rates 10^-3 .. 10^-1.5 (four, log-spaced), the same grid for every model.

The cpu preset keeps the mixture's proportions and the test slices at a
fraction of Zoology's examples and epochs (see :data:`PRESETS`); the lr of
each (model, width) is chosen on a validation draw of the test slices and its
test accuracy reported. The state size is counted from each block's own
decoding cache (``allocate_inference_cache`` at the test length): the
Transformer's keys and values grow with the length, the recurrent models'
state does not (their short-convolution state included).

Departures from Zoology, stated in the results: the blocks keep their FFN (Zoology
has no MLP), the budget is a fraction of Zoology's (the cpu preset).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from gam.bench.common import end_provenance, environment, markdown_table, start_provenance, write_results
from gam.bench.recall import KV_VARIANTS, model_fields
from gam.config import check_threads, described
from gam.models import registry

NAME = "zoology"
HELP = "Zoology's MQAR suite: a mixture of lengths in training, longer tests, accuracy vs state size"
DEFAULT_OUT = "results/zoology"

# The suite's model names -> registry keys: the Transformer with Zoology's short convolution.
SUITE_KEYS = {"transformer": "transformer_conv", "mamba": "mamba_standard", "gam": "gam", "kv_slots": "gam_kv_slots"}
MODELS = tuple(SUITE_KEYS)
# The kv-slot memory's design variants run too, by their registry keys (as in `gam bench recall`)
MODEL_KEYS = {**SUITE_KEYS, **{key: key for key in KV_VARIANTS}}
CHOICES = tuple(MODEL_KEYS)
# Zoology's grid: np.logspace(-3, -1.5, 4)
LRS = tuple(10 ** (-3 + 0.5 * i) for i in range(4))
# (sequence length, pairs, examples in Zoology's training set)
ZOOLOGY_TRAIN = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
ZOOLOGY_TEST = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))
ZOOLOGY_EPOCHS, ZOOLOGY_BATCH = 32, 256

# Read by eye from the plot in Zoology's README (mean accuracy over the test slices against
# state elements per layer): references, never mixed with our measurements.
PUBLISHED = (("Gated DeltaNet", 6.5e4, 0.99), ("DeltaNet", 1.3e5, 0.99), ("DeltaNet", 3.5e4, 0.96),
             ("GLA", 7e4, 0.95), ("Based", 2e5, 1.0), ("Mamba / Mamba-2", 1e5, 0.85),
             ("Sliding window", 5e5, 0.94))


@dataclass(frozen=True)
class Preset:
    train: tuple[tuple[int, int, int], ...]  # (length, pairs, examples)
    test: tuple[tuple[int, int], ...]  # (length, pairs)
    epochs: int
    batch_size: int
    test_examples: int  # per slice; the validation draw has a quarter of it
    vocab_size: int = 8192


# The smallest vocabulary the test slices allow: 1,024/256 needs 256 distinct keys in the lower half.
MIN_VOCAB = 2 * (max(P for _, P in ZOOLOGY_TEST) + 1)

PRESETS = {
    # A twentieth of Zoology's examples (the mixture's proportions kept), 4 epochs at batch 64
    # (564 steps per run), vocabulary 1,024 (the smallest power of two the 1,024/256 slice
    # allows: 8,192 costs 2-3x more per step on this CPU, measured in docs/results.md).
    "cpu": Preset(train=tuple((T, P, n // 20) for T, P, n in ZOOLOGY_TRAIN), test=ZOOLOGY_TEST,
                  epochs=4, batch_size=64, test_examples=200, vocab_size=1024),
    # The tests' preset: seconds.
    "tiny": Preset(train=((16, 2, 64), (32, 4, 64)), test=((16, 2), (64, 8)), epochs=1, batch_size=16,
                   test_examples=16, vocab_size=64),
}


@dataclass
class ZoologyConfig:
    """Zoology's MQAR suite (the original configuration): train on a mixture of lengths
    (64/4 .. 256/64), test on 64/4 .. 1,024/256, vocabulary 8,192, one learning-rate grid for
    every model, the best rate chosen on a validation draw; accuracy and state size per model
    and width. Writes zoology.md, zoology.json, zoology.png (accuracy against state size, with
    Zoology's published points as labelled references)."""

    preset: str = described("cpu", "cpu: a twentieth of Zoology's examples, 4 epochs, vocabulary 1,024; "
                                   "tiny: seconds (tests)", choices=tuple(PRESETS))
    models: tuple[str, ...] = described(MODELS, "models to train (the kv-slot design variants by their registry keys too)",
                                         choices=CHOICES)
    widths: tuple[int, ...] = described((64, 128), "model widths (d_model)")
    lrs: tuple[float, ...] = described(LRS, "the learning-rate grid, the same for every model")
    epochs: int | None = described(None, "epochs over the training mixture (default: the preset's)")
    vocab_size: int | None = described(None, "vocabulary (default: the preset's; Zoology's is 8,192)")
    jobs: int | None = described(None, "training processes in parallel (default: 2 on CPU)")
    threads: int = described(1, "torch threads per process")
    seed: int = described(0, "seed of the data, the initialization and the batch order")

    def resolved_preset(self) -> Preset:
        check_threads(self.threads)
        p = PRESETS[self.preset]
        if self.epochs is not None:
            if self.epochs < 1:
                raise ValueError(f"epochs must be >= 1, got {self.epochs}")
            p = replace(p, epochs=self.epochs)
        if self.vocab_size is not None:
            needed = 2 * (max(P for _, P in p.test) + 1)
            if self.vocab_size < needed:
                raise ValueError(f"vocab_size must be >= {needed} for {max(P for _, P in p.test)} distinct keys "
                                 f"and values, got {self.vocab_size}")
            p = replace(p, vocab_size=self.vocab_size)
        return p


Config = ZoologyConfig


def data(preset: Preset, seed: int):
    """(training sets, validation and test slices), each an MQARBatch; every set from its own seed."""
    from gam.bench.mqar import mqar

    def draw(n: int, T: int, P: int, salt: int):
        return mqar(n, T, P, preset.vocab_size, seed=seed * 1_000_003 + salt * 10_007 + 31 * T + P,
                    fillers="vocabulary")

    train = [draw(n, T, P, 1) for T, P, n in preset.train]
    valid = [draw(max(1, preset.test_examples // 4), T, P, 2) for T, P in preset.test]
    test = [draw(preset.test_examples, T, P, 3) for T, P in preset.test]
    return train, valid, test


def batch_order(train, batch_size: int, epochs: int, seed: int) -> list[tuple[int, Any]]:
    """(training set, example indices) of every step: each batch from one set (one length),
    the batches of all sets shuffled together, every epoch anew."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = []
    for _ in range(epochs):
        epoch = []
        for i, batch in enumerate(train):
            perm = torch.randperm(batch.inputs.shape[0], generator=gen)
            epoch += [(i, perm[s:s + batch_size]) for s in range(0, len(perm), batch_size)]
        order += [epoch[j] for j in torch.randperm(len(epoch), generator=gen).tolist()]
    return order


def fields(key: str, seq_len: int, width: int, vocab_size: int) -> dict[str, Any]:
    """GAMConfig fields of a suite model: the recall bench's sizing (16-dim heads, the paper's
    slots = width), 2 layers, no position embeddings."""
    return {**model_fields(MODEL_KEYS[key], seq_len, width, vocab_size), "pos_embedding": "none"}


def state_elements(model, seq_len: int) -> int:
    """Elements one layer carries while decoding at ``seq_len`` tokens (Zoology's "state size"):
    the numel of its block's inference cache at batch 1."""
    import torch

    cache = model.blocks[0].allocate_inference_cache(1, seq_len, dtype=torch.float32, device="cpu")
    return sum(v.numel() for v in cache.values() if isinstance(v, torch.Tensor))


def mean_accuracy(model, slices, device) -> list[float]:
    from gam.bench.mqar import evaluate

    return [evaluate(model, s, device, rf=0, batch_size=50)["accuracy"] for s in slices]


def train_run(key: str, width: int, lr: float, preset: Preset, seed: int, device) -> dict[str, Any]:
    """Train one model at one width and learning rate on the mixture; its validation and test
    accuracy per slice and its state size."""
    import torch

    from gam.bench.recall import Preset as RecallPreset
    from gam.bench.recall import train_config
    from gam.config import GAMConfig
    from gam.models.lm import DecoderLM
    from gam.train import TrainingStep

    train, valid, test = data(preset, seed)
    longest = max(T for T, _ in preset.test)
    torch.manual_seed(seed)
    model = DecoderLM(GAMConfig(**fields(key, longest, width, preset.vocab_size))).to(device)
    order = batch_order(train, preset.batch_size, preset.epochs, seed)
    schedule = RecallPreset(settings=(), lrs=(lr,), steps=len(order))  # recall's warm-up, cosine, AdamW
    step_fn = TrainingStep(model, train_config(lr, schedule), device, len(order), fused_optimizer=False,
                           full_logits=True)
    start = time.perf_counter()
    loss = float("nan")
    for step, (i, idx) in enumerate(order):
        loss = step_fn(step, train[i].inputs[idx].to(device), train[i].targets[idx].to(device)).item()
        if not math.isfinite(loss):
            break
    wall = time.perf_counter() - start
    return {"model": key, "label": registry.get(MODEL_KEYS[key]).label, "width": width, "lr": lr, "steps": len(order),
            "train_loss": loss, "wall_s": round(wall, 1),
            "valid": mean_accuracy(model, valid, device), "test": mean_accuracy(model, test, device),
            "state_elements": [state_elements(model, T) for T, _ in preset.test],
            "non_embedding_params": sum(p.numel() for n, p in model.named_parameters()
                                        if "embedding" not in n)}


def _task(arg) -> dict[str, Any]:
    import torch

    (key, width, lr), preset, seed, threads = arg
    torch.set_num_threads(threads)
    return train_run(key, width, lr, preset, seed, torch.device("cpu"))


def best_runs(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (model, width): the run of the learning rate with the best mean validation accuracy."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in runs:
        k = (r["model"], r["width"])
        if k not in best or sum(r["valid"]) > sum(best[k]["valid"]):
            best[k] = r
    return best


def run(config: ZoologyConfig, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train every (model, width, learning rate) on the mixture; test on every slice."""
    provenance = start_provenance()
    preset = config.resolved_preset()
    if not config.widths or any(w < 16 or w % 16 for w in config.widths):
        raise ValueError(f"widths must be multiples of 16 (16-dim heads), got {list(config.widths)}")
    if not config.lrs or any(not 0 < lr < 1 for lr in config.lrs):
        raise ValueError(f"learning rates must be in (0, 1), got {list(config.lrs)}")
    tasks = [(m, w, lr) for m in config.models for w in config.widths for lr in config.lrs]
    cost = {"mamba": 4.0, "kv_slots": 2.0, **dict.fromkeys(KV_VARIANTS, 2.0)}  # rough step cost: longest first
    tasks.sort(key=lambda t: -cost.get(t[0], 1.0) * t[1])
    jobs = max(1, min(config.jobs or min(2, os.cpu_count() or 1), len(tasks)))
    args = [(t, preset, config.seed, config.threads) for t in tasks]
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()

    def report(r: dict[str, Any]) -> None:
        runs.append(r)
        if log:
            log(f"{r['label']:28s} d={r['width']:4d} lr={r['lr']:.1e}: valid {sum(r['valid']) / len(r['valid']):.3f}, "
                f"test {sum(r['test']) / len(r['test']):.3f} after {r['steps']} steps, {r['wall_s']:.0f} s "
                f"[{time.perf_counter() - start:.0f} s total]")

    if jobs == 1:
        for a in args:
            report(_task(a))
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(jobs) as pool:
            for r in pool.imap_unordered(_task, args):
                report(r)
    runs.sort(key=lambda r: (config.models.index(r["model"]), r["width"], r["lr"]))
    examples = sum(n for _, _, n in preset.train)
    return {"bench": NAME, "config": config, "preset": asdict(preset), "runs": runs,
            "wall_s": round(time.perf_counter() - start, 1), "jobs": jobs, "examples": examples,
            "zoology": {"train": ZOOLOGY_TRAIN, "test": ZOOLOGY_TEST, "epochs": ZOOLOGY_EPOCHS,
                        "batch_size": ZOOLOGY_BATCH, "lrs": LRS, "published_points": PUBLISHED},
            "environment": environment("cpu"), "provenance": end_provenance(provenance)}


def _state(n: int) -> str:
    return f"{n:,}" if n < 1e4 else f"{n / 1e3:.1f}k" if n < 1e6 else f"{n / 1e6:.2f}M"


def table(result: dict[str, Any]) -> str:
    test = [tuple(t) for t in result["preset"]["test"]]
    best = best_runs(result["runs"])
    headers = ["model", "d", "lr (best on valid)", "non-emb. params", *[f"{T}/{P}" for T, P in test], "mean",
               f"state at {test[0][0]}", f"state at {test[-1][0]}", "train s"]
    rows = []
    for r in best.values():
        rows.append([r["label"], r["width"], f"{r['lr']:.1e}", f"{r['non_embedding_params']:,}",
                     *[f"{a:.3f}" for a in r["test"]], f"{sum(r['test']) / len(r['test']):.3f}",
                     _state(r["state_elements"][0]), _state(r["state_elements"][-1]), f"{r['wall_s']:.0f}"])
    return markdown_table(headers, rows, "lll" + "r" * (len(headers) - 3))


def render(result: dict[str, Any]) -> str:
    p, z = result["preset"], result["zoology"]
    prov = result["provenance"]
    train = ", ".join(f"{T}/{P} x {n:,}" for T, P, n in p["train"])
    steps = result["runs"][0]["steps"] if result["runs"] else 0
    return "\n".join([
        f"# Zoology's MQAR suite ({result['config'].preset} preset)", "",
        f"Training mixture (length/pairs x examples): {train}; {result['examples']:,} examples, "
        f"{p['epochs']} epoch(s) at batch {p['batch_size']} ({steps:,} steps per run). Zoology: "
        f"{sum(n for _, _, n in z['train']):,} examples, {z['epochs']} epochs at batch {z['batch_size']}. "
        f"Vocabulary {p['vocab_size']:,}; {p['test_examples']} test and {max(1, p['test_examples'] // 4)} "
        f"validation examples per slice. The same learning-rate grid for every model: "
        f"{', '.join(f'{lr:.2e}' for lr in result['config'].lrs)}; each row is the rate with the best mean "
        "validation accuracy, scored on the test draw.", "",
        table(result), "",
        "Columns `T/P`: test accuracy on sequences of T tokens with P key-value pairs (training saw at most "
        "256 tokens and 64 pairs). State: elements one layer carries while decoding at that length (its "
        "inference cache: the Transformer's keys and values grow with T; the recurrent models' state, "
        "short-convolution state included, does not). No position embeddings (as Zoology): the "
        "convolutions and the mixers order the tokens. The Transformer is Zoology's hybrid: a short "
        "convolution (kernel 3) added to its attention input.", "",
        f"Wall time {result['wall_s'] / 60:.1f} min ({result['jobs']} process(es) x "
        f"{result['config'].threads} thread(s)); load average {prov['load_average_start']} at start, "
        f"{prov['load_average_end']} at end; git {str(prov['git_commit'])[:10]}"
        f"{' (uncommitted changes)' if prov['git_dirty'] is True else ''}.", ""])


def plot(result: dict[str, Any], path: Path) -> Path:
    """Mean test accuracy against state size at the longest test length: ours as filled markers,
    Zoology's published points as open labelled ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, state, acc) in enumerate(PUBLISHED):
        ax.scatter(state, acc, marker="s", facecolors="none", edgecolors="grey")
        ax.annotate(f"{label} (published)", (state, acc), fontsize=6, color="grey", rotation=0,
                    xytext=(-40, -10 - 8 * (i % 3)), textcoords="offset points")
    markers = dict(zip(MODELS, "o^Dv"))
    for (m, w), r in best_runs(result["runs"]).items():
        acc = sum(r["test"]) / len(r["test"])
        ax.scatter(r["state_elements"][-1], acc, marker=markers.get(m, "o"), s=20 + w / 2,
                   label=f"{r['label']}, d={w}")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"state elements per layer at {result['preset']['test'][-1][0]} tokens")
    ax.set_ylabel("mean test accuracy over the slices")
    ax.set_title("MQAR, Zoology's original suite. Filled: measured here (this budget).\n"
                 "Open squares: published (Zoology's README plot, read by eye; other hardware and budget)",
                 fontsize=8)
    ax.legend(fontsize=7, loc="center left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(result: dict[str, Any], out: str | Path) -> list[Path]:
    paths = write_results(out, NAME, render(result), {**result, "config": asdict(result["config"])})
    return [*paths, plot(result, Path(out) / "zoology.png")]


def summary(result: dict[str, Any]) -> str:
    return f"{table(result)}\n{result['wall_s'] / 60:.1f} min"

