"""gam bench zoology: Zoology's MQAR generator choices, the mixture, the state size, the tiny preset end to end."""

import json

import pytest

from gam.bench.mqar import mqar
from gam.cli import main


@pytest.mark.parametrize("fillers", ["values", "vocabulary"])
def test_generator_answers_only_at_queries_and_every_key_is_bound_earlier(fillers):
    V, T, P = 64, 64, 8
    batch = mqar(200, T, P, V, seed=3, fillers=fillers)
    x, y = batch.inputs, batch.targets
    for n in range(x.shape[0]):
        keys, values = x[n, 0:2 * P:2], x[n, 1:2 * P:2]
        assert len(set(keys.tolist())) == P and len(set(values.tolist())) == P  # unique per sequence
        assert bool((keys >= 1).all() and (keys < V // 2).all() and (values >= V // 2).all())
        answered = (y[n] != -100).nonzero().flatten()
        assert answered.tolist() == batch.query_pos[n].tolist()  # answers only at the queries
        for q, k in zip(batch.query_pos[n].tolist(), batch.key_pos[n].tolist()):
            assert k < q and x[n, q] == x[n, k] and y[n, q] == x[n, k + 1]  # its key and value, earlier
    drawn = x[:, 2 * P:].scatter(1, batch.query_pos - 2 * P, -1)  # the fillers: all but the queries
    drawn = drawn[drawn >= 0]
    if fillers == "values":
        assert bool((drawn >= V // 2).all())
    else:  # Zoology's: the whole vocabulary, keys included
        assert bool((drawn < V // 2).any()) and int(drawn.min()) >= 0
    with pytest.raises(ValueError, match="fillers"):
        mqar(2, T, P, V, fillers="keys")


def test_batches_cover_every_example_once_per_epoch():
    from gam.bench.zoology import batch_order

    train = [mqar(10, 16, 2, 32, seed=0), mqar(7, 32, 4, 32, seed=1)]
    order = batch_order(train, 4, 2, seed=0)
    assert len(order) == 2 * (3 + 2)
    for epoch in (order[:5], order[5:]):
        seen = {(i, int(j)) for i, idx in epoch for j in idx}
        assert seen == {(0, j) for j in range(10)} | {(1, j) for j in range(7)}
    def listed(epoch):
        return [(i, idx.tolist()) for i, idx in epoch]

    assert {i for i, _ in order[:5]} == {0, 1} and listed(order[:5]) != listed(order[5:])  # mixed, reshuffled


def test_state_size_is_the_decoding_cache():
    from gam.bench.zoology import fields, state_elements
    from gam.config import GAMConfig
    from gam.models.lm import DecoderLM

    def state(key, T):
        return state_elements(DecoderLM(GAMConfig(**fields(key, 128, 32, 64))), T)

    # keys and values at every position, plus the short convolution's last k - 1 = 2 inputs
    assert state("transformer", 64) == 2 * 64 * 32 + 32 * 2 and state("transformer", 128) == 2 * 128 * 32 + 32 * 2
    assert state("gam", 64) == state("gam", 128) == 32 * 2  # the convolution's last k - 1 = 2 inputs
    # kv slots: keys and values, 2 heads x 32 slots x 16 features each, plus the convolution state
    assert state("kv_slots", 64) == state("kv_slots", 128) == 2 * 2 * 32 * 16 + 32 * 2
    assert state("mamba", 64) == state("mamba", 128) > 0


def test_suite_models_have_a_short_convolution_and_no_positions():
    from gam.bench.zoology import MODELS, fields

    for key in MODELS:
        assert fields(key, 64, 32, 64)["pos_embedding"] == "none"
    assert fields("transformer", 64, 32, 64)["attn_short_conv"] == 3


def test_tiny_preset_end_to_end(tmp_path, capsys):
    from gam.bench.zoology import LRS, MIN_VOCAB, PRESETS

    assert PRESETS["cpu"].vocab_size >= MIN_VOCAB  # the 1,024/256 slice fits
    out = tmp_path / "zoo"
    assert main(["bench", "zoology", "--preset", "tiny", "--jobs", "1", "--widths", "16",
                 "--models", "transformer,gam,kv_slots", "--out", str(out)]) == 0
    raw = json.loads((out / "zoology.json").read_text())
    assert raw["provenance"]["git_commit"] and (out / "zoology.png").stat().st_size > 0
    runs = raw["runs"]
    # the same grid for every model, every rate run
    assert {m: sorted(r["lr"] for r in runs if r["model"] == m) for m in ("transformer", "gam", "kv_slots")} == \
        {m: sorted(LRS) for m in ("transformer", "gam", "kv_slots")}
    for r in runs:
        assert len(r["valid"]) == len(r["test"]) == len(r["state_elements"]) == 2
        assert all(0.0 <= a <= 1.0 for a in r["test"]) and r["steps"] == 8
    md = (out / "zoology.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 3  # one row per (model, width): the rate best on validation
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        model_runs = [r for r in runs if r["label"] == cells[0]]
        chosen = max(model_runs, key=lambda r: sum(r["valid"]))
        assert cells[2] == f"{chosen['lr']:.1e}"
    for row in rows:  # the state columns are the runs' decoding caches at the shortest and longest test
        cells = [c.strip() for c in row.strip("|").split("|")]
        r = next(r for r in runs if r["label"] == cells[0])
        assert cells[-3:-1] == [f"{r['state_elements'][0]:,}", f"{r['state_elements'][-1]:,}"]
    assert main(["bench", "zoology", "--preset", "tiny", "--vocab-size", "8", "--out", str(out)]) == 2
    assert "vocab_size must be >=" in capsys.readouterr().err


def test_kv_design_variants_run_with_their_own_fields(tmp_path):
    """A kv-slot design variant runs under its registry key with its own fields (here the
    retention range), the suite's sizing and no positions, as the default kv row does."""
    from gam.bench.zoology import fields

    default, variant = fields("kv_slots", 64, 32, 64), fields("gam_kv_slots_retention_2_256", 64, 32, 64)
    assert (variant["memory_retention_min"], variant["memory_retention_max"]) == (2.0, 256.0)
    assert {k: v for k, v in variant.items() if not k.startswith("memory_retention")} == \
        {k: v for k, v in default.items() if not k.startswith("memory_retention")}
    out = tmp_path / "zoo"
    assert main(["bench", "zoology", "--preset", "tiny", "--jobs", "1", "--widths", "16", "--lrs", "1e-2",
                 "--models", "gam_kv_slots_retention_2_256", "--out", str(out)]) == 0
    runs = json.loads((out / "zoology.json").read_text())["runs"]
    assert [r["model"] for r in runs] == ["gam_kv_slots_retention_2_256"]
    assert main(["bench", "zoology", "--preset", "tiny", "--models", "gam_kv_slots_narrow", "--out", str(out)]) == 2
