"""MQAR benchmark: the data generator, and a seconds-long run of the bench."""

import json

import pytest
import torch

from gam.bench.mqar import gap_probabilities, mqar
from gam.bench.recall import PRESETS, RecallConfig, run, write
from gam.cli import main


@pytest.mark.parametrize("T,P,V", [(64, 4, 256), (128, 8, 256), (32, 8, 64), (16, 2, 32)])
def test_answers_are_the_values_of_the_queried_keys(T, P, V):
    b = mqar(200, T, P, V, seed=3)
    N = 200
    assert b.inputs.shape == b.targets.shape == (N, T)
    assert b.inputs.min() >= 0 and b.inputs.max() < V
    keys, values = b.inputs[:, 0:2 * P:2], b.inputs[:, 1:2 * P:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for row in range(N):  # distinct keys, distinct values
        assert len(set(keys[row].tolist())) == P and len(set(values[row].tolist())) == P
    answer = b.targets != -100
    assert (answer.sum(1) == P).all()  # one answer per pair, loss nowhere else
    assert torch.equal(answer.nonzero()[:, 1].view(N, P), b.query_pos)
    q_tokens = b.inputs.gather(1, b.query_pos)
    q_answers = b.targets.gather(1, b.query_pos)
    assert torch.equal(q_tokens, b.inputs.gather(1, b.key_pos))  # the query repeats its key ...
    assert torch.equal(q_answers, b.inputs.gather(1, b.key_pos + 1))  # ... and the answer follows it
    for row in range(N):  # each key queried exactly once
        assert sorted(q_tokens[row].tolist()) == sorted(keys[row].tolist())
    filler = torch.ones(N, T, dtype=torch.bool)
    filler[:, :2 * P] = False
    filler.scatter_(1, b.query_pos, False)
    assert (b.inputs[filler] >= V // 2).all()  # fillers are never keys


def test_distances_and_query_positions_are_as_specified():
    T, P = 64, 4
    b = mqar(500, T, P, 256, seed=0)
    assert torch.equal(b.distance, b.query_pos - b.key_pos)
    assert (b.query_pos >= 2 * P).all() and (b.query_pos < T).all()
    assert ((b.query_pos - 2 * P) % 2 == 0).all()  # queries at 2P + 2*gap
    assert (b.query_pos.diff(dim=1) > 0).all()  # distinct, sorted
    assert (b.key_pos % 2 == 0).all() and (b.key_pos < 2 * P).all()
    assert (b.distance >= 2).all()


def test_gaps_follow_the_power_law():
    T, P, N = 64, 1, 20000
    space = (T - 2 * P) // 2
    b = mqar(N, T, P, 256, power_a=0.01, seed=1)
    gaps = (b.query_pos[:, 0] - 2 * P) // 2
    freq = torch.bincount(gaps, minlength=space).double() / N
    expected = gap_probabilities(space, 0.01)
    assert (freq - expected).abs().sum() / 2 < 0.03  # total variation
    assert freq[0] > 5 * freq[-1]  # short gaps far more common than long ones
    flat = mqar(N, T, P, 256, power_a=1.0, seed=1)  # a = 1: uniform
    freq = torch.bincount((flat.query_pos[:, 0] - 2) // 2, minlength=space).double() / N
    assert (freq - 1 / space).abs().max() < 0.01


def test_generator_is_reproducible_and_rejects_bad_settings():
    a, b = mqar(10, 32, 4, 64, seed=5), mqar(10, 32, 4, 64, seed=5)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    with pytest.raises(ValueError):
        mqar(10, 30, 8, 64)  # 4 * pairs > length
    with pytest.raises(ValueError):
        mqar(10, 64, 4, 8)  # not enough distinct keys


def test_bench_writes_a_well_formed_table_json_and_plot(tmp_path):
    out = tmp_path / "recall"
    result = run(RecallConfig(preset="smoke", models=("gam", "kv_slots", "transformer")), log=None)
    write(result, out)
    md = (out / "recall.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 8  # two tables: accuracy, share of answers that are context values
    assert rows[0].startswith("| model | T=16, P=2, d=16") and rows[0] == rows[4]
    names = {"GAM", "GAM (kv-slot memory)", "Transformer (SDPA)"}
    assert {r.split(" | ")[0][2:] for r in rows[1:4]} == names
    for r in rows[1:4] + rows[5:8]:
        cell = r.split(" | ")[1].split()[0]
        assert 0.0 <= float(cell) <= 1.0
    assert len({line.count("|") for line in md.splitlines() if line.startswith("|")}) == 1
    data = json.loads((out / "recall.json").read_text())
    assert len(data["runs"]) == 3 and data["meta"]["receptive_field_gam"] == 5
    assert data["provenance"]["argv"] and data["provenance"]["end_utc"] >= data["provenance"]["start_utc"]
    for r in data["runs"]:
        assert 0.0 <= r["best"]["accuracy"] <= 1.0
    assert (out / "recall.png").stat().st_size > 1000
    assert result["table"] in md


def test_cli_bench_recall_smoke(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["bench", "recall", "--preset", "smoke", "--out", str(out), "--models", "local_only"]) == 0
    assert "GAM (Local Only)" in capsys.readouterr().out
    assert (out / "recall.json").exists()
    assert main(["bench", "recall", "--preset", "smoke", "--models", "nonsense"]) == 2


def test_a_model_can_have_its_own_learning_rates():
    from dataclasses import replace

    preset = replace(PRESETS["smoke"], model_lrs={"kv_slots": (1e-2,)})
    result = run(RecallConfig(preset_override=preset, models=("gam", "kv_slots")), log=None)
    assert {(r["model"], r["lr"]) for r in result["runs"]} == {("gam", 3e-3), ("kv_slots", 1e-2)}


def test_lrs_override_runs_every_learning_rate(tmp_path, capsys):
    result = run(RecallConfig(preset="smoke", models=("kv_slots",), lrs=(3e-3, 1e-2)), log=None)
    assert sorted(r["lr"] for r in result["runs"]) == [3e-3, 1e-2]
    assert result["meta"]["preset"]["lrs"] == (3e-3, 1e-2)
    out = tmp_path / "r"
    assert main(["bench", "recall", "--preset", "smoke", "--out", str(out), "--models", "kv_slots",
                 "--lrs", "1e-2"]) == 0
    assert json.loads((out / "recall.json").read_text())["runs"][0]["lr"] == 1e-2
    assert main(["bench", "recall", "--preset", "smoke", "--lrs", "fast"]) == 2
    assert main(["bench", "recall", "--preset", "smoke", "--lrs", "0"]) == 2
    assert "learning rates must be positive" in capsys.readouterr().err
    assert main(["bench", "recall", "--preset", "smoke", "--models", "kv_slot"]) == 2
    assert "did you mean kv_slots" in capsys.readouterr().err


def test_equal_footing_chooses_the_rate_on_validation_and_reruns_it_with_more_seeds():
    """One grid for every model, every rate run; the rate with the best validation accuracy is
    run with the other seeds; the reported accuracy is the test draw's at the step the
    validation chose (the test draw chooses nothing); the grid is in the JSON."""
    from dataclasses import replace

    preset = replace(PRESETS["smoke"], lrs=(3e-3, 1e-2), select_on_validation=True, seeds=3,
                     skip_lrs_after=float("inf"), steps=6)
    result = run(RecallConfig(preset_override=preset, models=("gam", "transformer")), log=None)
    assert result["meta"]["grid"] == {"gam": [3e-3, 1e-2], "transformer": [3e-3, 1e-2]}
    for model in ("gam", "transformer"):
        rs = [r for r in result["runs"] if r["model"] == model]
        sweep = [r for r in rs if r["seed"] == 0]
        assert sorted(r["lr"] for r in sweep) == [3e-3, 1e-2] and len(rs) == 4
        chosen = max(sweep, key=lambda r: (r["best"]["valid_accuracy"], -r["steps"]))
        assert sorted((r["lr"], r["seed"]) for r in rs if r["lr"] == chosen["lr"]) == \
            [(chosen["lr"], 0), (chosen["lr"], 1), (chosen["lr"], 2)]
        for r in rs:
            picked = max(r["history"], key=lambda h: h["valid_accuracy"])  # the first best on validation
            assert r["best"]["accuracy"] == picked["accuracy"] and r["best"]["step"] == picked["step"]
    assert "(n=3)" in result["table"] and "@ " in result["table"]
    assert PRESETS["cpu-equal"].lrs == PRESETS["cpu-hard-equal"].lrs and not PRESETS["cpu-equal"].model_lrs


def test_presets_are_sane():
    for preset in PRESETS.values():
        assert all(T >= 4 * P and T % 2 == 0 for T, P, _ in preset.settings)
        assert all(preset.vocab_size // 2 - 1 >= P for _, P, _ in preset.settings)
    cpu = PRESETS["cpu"]
    assert len(cpu.lrs) >= 2 and len({T for T, _, _ in cpu.settings}) >= 2
    assert len({P for _, P, _ in cpu.settings}) >= 2 and len({W for _, _, W in cpu.settings}) >= 2


@pytest.mark.parametrize("width,slots", [(32, 32), (64, 64), (128, 64)])
def test_kv_slot_row_has_16_dim_heads_and_at_most_64_slots_per_head(width, slots):
    from gam.bench.recall import make_model

    cfg = make_model("kv_slots", seq_len=32, width=width, vocab_size=32).config
    assert (cfg.memory, cfg.memory_heads, cfg.num_memory_slots) == ("kv_slots", width // 16, slots)
    assert make_model("gam", seq_len=32, width=width, vocab_size=32).config.num_memory_slots == width


def test_design_variants_are_sized_as_the_kv_slot_row_and_keep_their_change(capsys):
    """The ablation's variants run on MQAR by registry key, with the kv-slot row's heads and
    slots unless the variant changes them (then its own number); the one that changes the
    width (which this bench sets) is not offered."""
    from gam.bench.recall import KV_VARIANTS, make_model

    assert {"gam_kv_slots_delta", "gam_kv_slots_normalizer_8", "gam_kv_slots_heads_2",
            "gam_kv_slots_slots_32", "gam_kv_slots_slots_128"} <= set(KV_VARIANTS)
    assert "gam_kv_slots_narrow" not in KV_VARIANTS
    delta = make_model("gam_kv_slots_delta", seq_len=32, width=64, vocab_size=32).config
    assert (delta.memory_write, delta.memory_heads) == ("delta", 4)
    slow = make_model("gam_kv_slots_normalizer_8", seq_len=32, width=64, vocab_size=32).config
    assert (slow.memory_gate_normalizer, slow.memory_heads, slow.num_memory_slots) == (8.0, 4, 64)
    heads = make_model("gam_kv_slots_heads_2", seq_len=32, width=64, vocab_size=32).config
    assert (heads.memory_heads, heads.num_memory_slots) == (2, 64)
    few = make_model("gam_kv_slots_slots_32", seq_len=32, width=64, vocab_size=32).config
    assert (few.memory_heads, few.num_memory_slots) == (4, 32)
    assert make_model("gam_kv_slots_slots_128", seq_len=32, width=128, vocab_size=32).config.num_memory_slots == 128
    assert main(["bench", "recall", "--preset", "smoke", "--models", "gam_kv_slots_narrow"]) == 2
    assert "is not one of" in capsys.readouterr().err
