"""gam bench scaling / paper / ablation / report on tiny configurations.

Benchmarks are not tests: these only check that each command runs end to end
(seconds each) and writes a well-formed table and files.
"""

import csv
import json
import math
import re

import pytest
import torch

from gam.bench import common
from gam.cli import main

PHRASES = ["the cat sat on a mat", "while dogs ran far away", "and birds sang in trees", "by the river"]
TINY_MODEL = ["--n-embd", "16", "--n-layer", "2", "--n-head", "2", "--num-memory-slots", "8",
              "--vocab-size", "300", "--block-size", "16", "--d-state", "4", "--expand", "2"]
TINY_TRAIN = ["--max-steps", "4", "--batch-size", "4", "--valid-tokens", "200", "--warmup-steps", "2",
              "--eval-batch-size", "8", "--log-every", "1", "--train-rows", "None", "--valid-rows", "None",
              "--threads", "1"]
MEAN_SD = r"\d+\.\d{4} ± \d+\.\d{4}"  # a loss over two seeds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    rows = [" ".join(PHRASES[int(i)] for i in torch.randint(0, len(PHRASES), (3,), generator=g)) for _ in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(rows) + "\n")
    return path


def table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    """Body rows of the markdown table whose header starts with ``first_cell``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    assert set(lines[start + 1].replace("|", "").replace("-", "").replace(":", "")) <= {" ", ""}
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    width = lines[start].count("|")
    assert all(line.count("|") == width for line in lines[start:start + 2 + len(rows)])
    return rows


def check_raw(raw: dict, bench: str) -> None:
    assert raw["bench"] == bench
    env = raw["environment"]
    assert env["packages"]["torch"] and env["device"] == "cpu" and env["device_name"]
    assert "commit" in env["git"] and env["python"]
    assert isinstance(raw["config"], dict) and raw["rows"]


# ----------------------------------------------------------------------------- common helpers

def test_fit_exponent_and_formatting():
    xs = [256, 512, 1024, 2048]
    assert common.fit_exponent(xs, [3 * x ** 2 for x in xs]) == pytest.approx(2.0)
    assert common.fit_exponent(xs, [5 * x for x in xs]) == pytest.approx(1.0)
    assert common.fit_exponent([256], [1.0]) is None
    assert common.fmt_mean_spread([1.0, 3.0]) == "2.00 ± 1.41"
    assert common.fmt_mean_spread([2.5]) == "2.50"
    assert common.fmt_mean_spread([]) == "—"
    table = common.markdown_table(["a", "b"], [[1, 2], ["x", None]])
    assert table.splitlines() == ["| a | b |", "|---|---:|", "| 1 | 2 |", "| x |  |"]


def test_write_results_and_peak_memory(tmp_path):
    raw = {"bench": "demo", "config": {"x": 1}, "environment": common.environment("cpu"),
           "rows": [{"a": 1, "b": float("inf")}]}
    with pytest.raises(ValueError, match="provenance"):
        common.write_results(tmp_path / "r", "demo", "# Demo\n", raw)
    raw["provenance"] = common.start_provenance()
    paths = common.write_results(tmp_path / "r", "demo", "# Demo\n", raw, raw["rows"])
    assert [p.name for p in paths] == ["demo.md", "demo.json", "demo.csv"]
    back = json.loads((tmp_path / "r" / "demo.json").read_text())
    assert back["rows"][0]["b"] is None  # non-finite floats become null, the JSON stays valid
    check_raw(back, "demo")
    assert set(back["provenance"]) == set(common.PROVENANCE_FIELDS)
    assert back["provenance"]["end_utc"] >= back["provenance"]["start_utc"]
    before = common.rss_bytes()
    assert before and common.peak_rss_bytes() >= before
    timing = common.time_runs(lambda: sum(range(1000)), "cpu", warmup=1, repeats=3)
    assert len(timing["times_s"]) == 3 and len(timing["warmup_s"]) == 1 and timing["median_s"] > 0


# ----------------------------------------------------------------------------- scaling

@pytest.fixture(scope="module")
def scaling_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    assert main(["bench", "scaling", "--device", "cpu", "--out", str(out), "--lengths", "16,32",
                 "--models", "gam,transformer_naive,transformer_sdpa,mamba", "--n-embd", "32", "--n-head", "2",
                 "--batch-size", "2", "--warmup", "1", "--repeats", "2"]) == 0
    return out


def test_scaling_writes_table_and_files(scaling_dir):
    for name in ("scaling.md", "scaling.json", "scaling.csv", "compute_time.png", "peak_memory.png"):
        assert (scaling_dir / name).stat().st_size > 0, name
    md = (scaling_dir / "scaling.md").read_text()
    rows = table_rows(md, "T")
    assert [r[0] for r in rows] == ["16", "32", "**exponent**"]
    raw = json.loads((scaling_dir / "scaling.json").read_text())
    check_raw(raw, "scaling")
    assert raw["config"]["batch_size"] == 2 and raw["config"]["precision"] == "fp32"
    by = {(r["model"], r["T"]): r for r in raw["rows"]}
    for model in ("gam", "transformer_naive", "transformer_sdpa"):
        for T in (16, 32):
            r = by[(model, T)]
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["peak_mib"] > 0 and len(r["times_ms"]) >= 1
        assert raw["exponents"][model]["time"] is not None
    assert by[("mamba", 16)]["status"] in ("ok", "unavailable")  # Mamba may not be installed
    with open(scaling_dir / "scaling.csv") as f:
        assert len(list(csv.DictReader(f))) == 8


def test_every_scaling_block_can_be_built_here():
    """Each block of the bench builds with tiny fields; a spec's own fields (the kv-slot
    row's num_memory_slots) override them instead of colliding."""
    from gam.bench.scaling import block_specs
    from gam.config import GAMConfig
    from gam.models.lm import make_block

    tiny = dict(n_embd=16, n_head=2, num_memory_slots=4, d_state=2, expand=1, block_size=8)
    for spec in block_specs().values():
        block = make_block(GAMConfig(model=spec.model, **{**tiny, **spec.fields}))
        assert block(torch.randn(1, 8, 16)).shape == (1, 8, 16), spec.key


def test_scaling_failures_are_results_not_crashes(tmp_path):
    from gam.bench.scaling import ScalingConfig, run

    # A memory budget too small for the block: OOM, and larger T are not attempted.
    oom = run(ScalingConfig(models=("gam",), lengths=(512, 1024), n_embd=32, n_head=2, batch_size=2,
                            warmup=0, repeats=1, memory_budget_gib=0.001), log=lambda s: None)
    assert [r["status"] for r in oom["rows"]] == ["oom", "oom"]
    assert "OOM" in oom["table"]
    # A time budget that the first point passes: recorded as over budget.
    slow = run(ScalingConfig(models=("transformer_naive",), lengths=(64, 128), n_embd=32, n_head=2, batch_size=2,
                             warmup=0, repeats=1, time_budget_s=1e-6), log=lambda s: None)
    assert [r["status"] for r in slow["rows"]] == ["time", "time"]
    assert "> budget" in slow["table"]


# ----------------------------------------------------------------------------- paper / ablation

@pytest.fixture(scope="module")
def paper_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    cache = tmp_path_factory.mktemp("cache")
    assert main(["bench", "paper", "--device", "cpu", "--out", str(out), "--datasets", str(corpus),
                 "--seeds", "2", "--cache-dir", str(cache), *TINY_TRAIN, *TINY_MODEL]) == 0
    return out


def test_replot_by_position_joins_folders_and_refuses_other_settings(paper_dir, tmp_path, monkeypatch):
    """A model benchmarked later joins an earlier table's plot; a run in both folders counts once."""
    import gam.evaluation
    from gam.bench.tables import replot_by_position

    raw = json.loads((paper_dir / "paper.json").read_text())
    later = tmp_path / "later"
    later.mkdir()
    extra = dict(raw, rows=[dict(r, model="late") for r in raw["rows"] if r["model"] == "gam"] + raw["rows"],
                 models={**raw["models"], "late": dict(raw["models"]["gam"], key="late", label="Late GAM")})
    (later / "paper.json").write_text(json.dumps(extra))
    drawn = []
    monkeypatch.setattr(gam.evaluation, "draw_loss_by_position",
                        lambda ax, curves, field=None: drawn.append(dict(curves)) or False)
    png = replot_by_position([paper_dir, later], tmp_path / "both.png", models=["late", "gam"])
    assert png.stat().st_size > 0
    labels = list(drawn[0])
    assert labels == ["Late GAM (2 seeds)", "GAM (2 seeds)"]  # the order asked for; gam's runs once (2 seeds)
    with pytest.raises(ValueError, match="no runs of nope"):
        replot_by_position([paper_dir], tmp_path / "x.png", models=["nope"])
    with pytest.raises(FileNotFoundError, match="no paper.json"):
        replot_by_position([tmp_path / "empty"], tmp_path / "x.png")
    other = tmp_path / "other"
    other.mkdir()
    (other / "paper.json").write_text(json.dumps(dict(raw, model_fields={**raw["model_fields"], "n_embd": 8})))
    with pytest.raises(ValueError, match="other model or training settings"):
        replot_by_position([paper_dir, other], tmp_path / "x.png")


def test_paper_writes_table_and_files(paper_dir):
    from gam.bench.paper import CPU_DEFAULT_MODELS
    from gam.bench.tables import rank_cells

    for name in ("paper.md", "paper.json", "paper.csv", "curves.png", "loss_by_position.png"):
        assert (paper_dir / name).stat().st_size > 0, name
    md = (paper_dir / "paper.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| dataset |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    # 2 layers, kernel 3: the paper GAM's receptive field is 1 + 2 * 2 = 5 tokens, from the config
    assert columns[:11] == ["dataset", "model", "rank", "params", "w/o emb.", "s / epoch", "tokens/s", "val loss",
                            "val PPL", "loss 0-4", "loss 5+"]
    rows = table_rows(md, "dataset")
    assert rows[-1][1] == "*unigram model (token frequencies)*" and float(rows[-1][8]) > 1  # the baseline row
    rows = rows[:-1]
    raw = json.loads((paper_dir / "paper.json").read_text())
    check_raw(raw, "paper")
    # the cpu preset: the paper's wiring and the fair baselines in one table, one precision for all
    trained = list(CPU_DEFAULT_MODELS)  # every model builds in plain PyTorch: none is skipped
    assert [r[1] for r in rows] == [raw["models"][m]["label"] for m in trained]
    assert raw["models"]["transformer_naive"]["fields"] == {"attn_impl": "naive"}
    assert raw["models"]["transformer_sdpa"]["fields"] == {"attn_impl": "sdpa"}
    assert raw["models"]["mamba_paper"]["fields"] == {"mamba_wiring": "paper"}
    assert raw["models"]["mamba_standard"]["fields"] == {"mamba_wiring": "standard"}
    assert raw["train_fields"]["precision"] == "bf16" and {r["precision"] for r in raw["rows"]} == {"bf16"}
    assert len(raw["rows"]) == 2 * len(trained)  # two seeds each
    for r in raw["rows"]:
        assert r["steps"] == 4 and r["tokens"] == 4 * 4 * 16 and r["epoch_s_extrapolated"]
        assert math.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-6)
        assert r["params"] > r["non_embedding_params"] > 0 and r["tokens_per_s"] > 0
        # loss by position of the final weights: its mean is the final validation loss
        assert len(r["loss_by_position"]) == 16 and r["receptive_field"] == 5
        assert sum(r["loss_by_position"]) / 16 == pytest.approx(r["val_loss"], rel=1e-4)
        assert r["loss_inside_field"] == pytest.approx(sum(r["loss_by_position"][:5]) / 5)
        assert r["loss_beyond_field"] == pytest.approx(sum(r["loss_by_position"][5:]) / 11)
    gam = next(s for s in raw["summary"] if s["model"] == "gam")
    assert gam["val_loss"]["sd"] is not None and len(gam["val_loss"]["values"]) == 2
    assert len(gam["loss_by_position"]["mean"]) == 16 and len(gam["loss_by_position"]["sd"]) == 16
    for row in rows:  # every loss: mean ± sd over the two seeds
        assert all(re.fullmatch(MEAN_SD, cell) for cell in (row[7], row[9], row[10])), row
    # the rank column follows the tie rule on the seeds' final losses
    expected = rank_cells({m: [r["val_loss"] for r in raw["rows"] if r["model"] == m] for m in trained})
    assert [r[2] for r in rows] == [expected[m] for m in trained]
    assert "Every measured number is the mean ± sample standard deviation" in md and "`loss 5+`" in md
    # the projected time for the budget machine, printed before the start, is kept beside the measured one
    assert raw["projection"]["total_s"] > 0 and set(raw["projection"]["per_model_s"]) == {r[1] for r in rows}
    assert "projected before the start for the 2-core budget machine" in md


def test_rank_cells_tie_rule():
    from gam.bench.tables import rank_cells

    # a and b differ by less than sd_a + sd_b; c is far from both
    cells = rank_cells({"c": [3.0, 3.1], "a": [1.0, 1.1], "b": [1.1, 1.2]})
    assert cells == {"a": "1 (≈ 2)", "b": "2 (≈ 1)", "c": "3"}
    # a chain: a ≈ b and b ≈ c, but a and c are told apart
    cells = rank_cells({"a": [1.0, 1.2], "b": [1.25, 1.45], "c": [1.5, 1.7]})
    assert cells == {"a": "1 (≈ 2)", "b": "2 (≈ 1, 3)", "c": "3 (≈ 2)"}
    # a difference just above the summed spread is a ranking
    assert rank_cells({"a": [1.0, 1.2], "b": [1.3, 1.5]}) == {"a": "1", "b": "2"}
    # one seed: no spread, nothing marked; every run diverged: no rank
    assert rank_cells({"a": [2.0], "b": [1.9999], "d": []}) == {"a": "2", "b": "1", "d": "—"}


def test_cpu_budget_projection(tmp_path):
    """The projection reads the committed results, reproduces its calibration point, stays near
    the runs it was not fitted to, and puts the cpu preset under 90 minutes."""
    from gam.bench.ablation import AblationConfig, variant_specs
    from gam.bench.paper import CPU_DEFAULT_MODELS, PaperConfig, model_specs
    from gam.bench.projection import RESULTS_DIR, load_calibration, project_grid, projected_tokens_per_s
    from gam.bench.trained import CPU_BUDGET, EVALS_PER_RUN, resolve

    cal = load_calibration()
    assert cal is not None and load_calibration(tmp_path) is None  # no results there: no projection
    for folder, name in (("paper-cpu", "paper"), ("ablation-cpu", "ablation")):
        measured = json.loads((RESULTS_DIR / folder / f"{name}.json").read_text())
        for row in measured["summary"]:
            spec = measured["models"][row["model"]]
            if row["tokens_per_s"]["mean"] is None:  # every run diverged
                continue
            projected = projected_tokens_per_s(cal, spec["model"], {**measured["model_fields"], **spec["fields"]},
                                               measured["train_fields"]["precision"], 2)
            ratio = projected / row["tokens_per_s"]["mean"]
            if (folder, row["model"]) == ("paper-cpu", "gam"):
                assert ratio == pytest.approx(1.0, rel=1e-9)  # the calibration point
            else:  # the same GAM measured 6% apart in the two folders: a band, not a point
                assert 0.75 < ratio < 1.15, (folder, row["model"], ratio)
    wikitext2 = {"wikitext2": {"vocab_size": 8192, "steps_per_epoch": 1257, "valid_tokens_used": 65536}}
    for bench, config, specs in (
            ("paper", PaperConfig(), list(model_specs(CPU_DEFAULT_MODELS, fair=False).values())),
            ("ablation", AblationConfig(), list(variant_specs(("full", "global_only", "sum_fusion", "local_only")).values()))):
        model_fields, train_fields, _ = resolve(config, bench)
        assert train_fields["precision"] == "bf16" and train_fields["threads"] == 2
        assert train_fields["epochs"] >= 1 and train_fields["max_steps"] is None  # whole epochs
        projection = project_grid(cal, ["wikitext2"], specs, CPU_BUDGET["seeds"], model_fields, train_fields,
                                  wikitext2, EVALS_PER_RUN)
        assert 10 * 60 < projection["total_s"] < CPU_BUDGET["minutes"] * 60, (bench, projection["text"])
        assert set(projection["per_model_s"]) == {s.label for s in specs}


def test_the_size_matched_control_has_the_kv_slot_models_size_at_the_cpu_preset():
    from gam.bench.trained import bench_preset, parameter_counts
    from gam.models.registry import get

    fields = {**bench_preset("cpu", "paper", "cpu")[0], "vocab_size": 8192}
    count = {key: parameter_counts(get(key).model, {**fields, **get(key).fields})["non_embedding"]
             for key in ("gam", "gam_kv_slots", "gam_slots_matched", "gam_kv_slots_narrow", "mamba_standard_wide",
                         "gam_wide")}
    assert abs(count["gam_slots_matched"] - count["gam_kv_slots"]) / count["gam_kv_slots"] < 1e-3
    assert abs(count["gam_kv_slots_narrow"] - count["gam"]) / count["gam"] < 1e-2
    assert abs(count["mamba_standard_wide"] - count["gam_kv_slots"]) / count["gam_kv_slots"] < 1e-3
    assert abs(count["gam_wide"] - count["gam_kv_slots"]) / count["gam_kv_slots"] < 1e-2
    assert count["gam_kv_slots"] > 1.5 * count["gam"]


def test_paper_fair_mode(corpus, tmp_path):
    assert main(["bench", "paper", "--fair", "--models", "transformer", "--seeds", "1", "--out", str(tmp_path / "fair"),
                 "--datasets", str(corpus), "--cache-dir", str(tmp_path / "cache"), *TINY_TRAIN, *TINY_MODEL]) == 0
    raw = json.loads((tmp_path / "fair" / "paper.json").read_text())
    assert raw["train_fields"]["precision"] == "bf16"
    assert raw["models"]["transformer"]["fields"] == {"attn_impl": "sdpa"}
    assert "SDPA" in (tmp_path / "fair" / "paper.md").read_text()


def test_paper_records_a_diverged_run_and_goes_on(corpus, tmp_path, monkeypatch):
    import gam.train as train_module

    real_train = train_module.train

    def train(model_config, cfg, run_dir, **kwargs):
        if model_config.model == "transformer":
            raise train_module.TrainingDiverged("loss became nan at step 3; stopped without saving")
        return real_train(model_config, cfg, run_dir, **kwargs)

    monkeypatch.setattr(train_module, "train", train)
    out = tmp_path / "diverged"
    assert main(["bench", "paper", "--models", "transformer,gam", "--out", str(out), "--datasets", str(corpus),
                 "--seeds", "1", "--cache-dir", str(tmp_path / "cache"), *TINY_TRAIN, *TINY_MODEL]) == 0
    md = (out / "paper.md").read_text()
    rows = table_rows(md, "dataset")
    assert rows[0][1].startswith("Transformer") and rows[0][2] == "—"
    assert rows[0][5:11] == ["—", "—", "diverged", "diverged", "diverged", "diverged"]
    assert rows[1][1] == "GAM" and rows[1][2] == "1" and math.isfinite(float(rows[1][8]))  # the grid went on
    assert "seed 0: loss became nan at step 3." in md
    raw = json.loads((out / "paper.json").read_text())
    assert [r["diverged"] for r in raw["rows"]] == ["loss became nan at step 3", None]


@pytest.mark.parametrize("bench", ["paper", "ablation"])
@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_setup_lines_render_for_every_preset(bench, preset):
    """The header of Tables 1 and 3 names fields a preset may leave at their defaults
    (the paper preset sets no Mamba expand): it must render for both presets."""
    from gam.bench.common import environment
    from gam.bench.paper import PaperConfig
    from gam.bench.tables import setup_lines
    from gam.bench.trained import resolve

    cfg = PaperConfig(preset=preset, device="cpu")
    model_fields, train_fields, valid_tokens = resolve(cfg, bench)
    text = "\n".join(setup_lines(preset, model_fields, train_fields, valid_tokens, {}, environment("cpu"), 60.0, [0]))
    assert f"Preset `{preset}`" in text and "Mamba expand " in text
    if preset == "paper":
        assert "width 512, 6 layers" in text and "Mamba expand 3" in text


def test_paper_table_has_paper_figures():
    from gam.bench.paper import PaperConfig, render_table1

    run = {"dataset": "wikitext2", "model": "gam", "params": 22_599_680, "non_embedding_params": 17_348_608,
           "epoch_s": 100.0, "epoch_s_extrapolated": False, "tokens_per_s": 1000.0, "val_loss": 6.5,
           "val_ppl": math.exp(6.5), "receptive_field": 13, "loss_inside_field": 6.9, "loss_beyond_field": 6.4,
           "last_quarter_gain": 0.01}
    from gam.bench.paper import model_specs

    table = render_table1(PaperConfig(models=("gam",), datasets=("wikitext2",)), [run], model_specs(("gam",), fair=False), 13)
    (row,) = table_rows(table, "dataset")
    assert row[:5] == ["WikiText-2", "GAM", "1", "22.60 M", "17.35 M"]
    assert row[9:12] == ["6.9000", "6.4000", "0.0100"]  # loss 0-12, loss 13+, last ¼ gain
    assert row[12:] == ["22.6 M", "117.2", "6.7828", "882.57"]


def test_ablation_writes_table_and_files(corpus, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert main(["bench", "ablation", "--out", str(out), "--dataset", str(corpus), "--cache-dir",
                 str(tmp_path / "cache"), "--seeds", "2", "--eval-every", "2", *TINY_TRAIN, *TINY_MODEL]) == 0
    assert "projected time on the 2-core budget machine:" in capsys.readouterr().out
    for name in ("ablation.md", "ablation.json", "ablation.csv", "curves.png", "loss_by_position.png"):
        assert (out / name).stat().st_size > 0, name
    rows = table_rows((out / "ablation.md").read_text(), "configuration")
    assert rows[-1][0] == "*unigram model (token frequencies)*"
    rows = rows[:-1]
    assert [r[0] for r in rows] == ["GAM (Full)", "GAM (Global Only)", "GAM (Sum Fusion)", "GAM (Local Only)"]
    assert [r[1:4] for r in rows] == [["✓", "✓", "✓"], ["×", "×", "✓"], ["×", "✓", "✓"], ["×", "✓", "×"]]
    assert [r[7] for r in rows] == ["22,599,680", "19,435,520", "19,447,808", "17,874,944"]
    assert [r[-1] for r in rows] == ["900.84", "905.45", "942.59", "944.70"]
    raw = json.loads((out / "ablation.json").read_text())
    check_raw(raw, "ablation")
    for r in raw["rows"]:
        assert len(r["evals"]) == 2 and r["best_val_ppl"] <= r["val_ppl"] + 1e-9
        assert len(r["loss_by_position"]) == 16
    from gam.bench.tables import rank_cells

    variants = ["full", "global_only", "sum_fusion", "local_only"]
    expected = rank_cells({v: [r["best_val_loss"] for r in raw["rows"] if r["model"] == v] for v in variants})
    assert [r[4] for r in rows] == [expected[v] for v in variants]  # ranked by Table 3's metric
    assert all(re.fullmatch(MEAN_SD, cell) for r in rows for cell in (r[10], r[13], r[14]))


# ----------------------------------------------------------------------------- report

def test_report_collects_folders(scaling_dir, paper_dir, tmp_path):
    out = tmp_path / "report" / "REPORT.md"
    assert main(["bench", "report", str(scaling_dir), str(paper_dir), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmark report")
    assert "## Scaling benchmark" in text and "## Main results (Table 1)" in text
    assert "compute_time.png" in text and "curves.png" in text
    summary = table_rows(text, "results")
    assert [r[1] for r in summary] == ["scaling", "paper"]
    with pytest.raises(FileNotFoundError):
        from gam.bench.report import read_folder

        read_folder(tmp_path / "missing")
