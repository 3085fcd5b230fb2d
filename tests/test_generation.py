"""Generation: per-layer inference caches, sampling, checkpoints, `gam generate`, decode bench."""

import json
import warnings

import pytest
import torch

from conftest import TINY, tiny
from gam.checkpoint import load_checkpoint
from gam.cli import main
from gam.generation import encode_prompt, generate, sample_next

MODELS = [
    ("gam", {"variant": "full"}),
    ("gam", {"variant": "sum_fusion"}),
    ("gam", {"variant": "global_only"}),
    ("gam", {"variant": "local_only"}),
    ("gam", {"conv_kernel_size": 5, "n_layer": 3}),
    ("gam", {"conv_kernel_size": 1}),
    ("gam", {"pos_embedding": "none"}),
    ("transformer", {"attn_impl": "sdpa"}),
    ("transformer", {"attn_impl": "naive"}),
    ("transformer", {"pos_embedding": "none"}),
    ("transformer", {"attn_short_conv": 3, "pos_embedding": "none"}),
    ("gam", {"memory": "kv_slots", "memory_heads": 2}),
    ("gam", {"memory": "kv_slots", "memory_heads": 2, "variant": "global_only"}),
    ("mamba", {"mamba_wiring": "standard", "mamba_backend": "torch"}),
    ("mamba", {"mamba_wiring": "paper", "mamba_backend": "torch"}),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_greedy(model, idx, n):
    """Greedy decoding with the full forward pass, the input cropped to block_size."""
    limit = model.config.max_seq_len
    for _ in range(n):
        cond = idx if limit is None else idx[:, -limit:]
        logits, _ = model(cond)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


# ---------------------------------------------------------------- cached = full forward

@pytest.mark.parametrize("name,fields", MODELS)
@pytest.mark.parametrize("prompt_len", [1, 5, 7])
def test_cached_steps_equal_full_forward(name, fields, prompt_len):
    model = tiny(name, **fields)
    idx = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.allocate_inference_cache(2, 16)
        logits = [model.forward_cached(idx[:, :prompt_len], cache)]  # prefill (odd lengths)
        logits += [model.forward_cached(idx[:, t:t + 1], cache) for t in range(prompt_len, 12)]  # steps
        logits.append(model.forward_cached(idx[:, 12:], cache))  # several tokens at once on a warm cache
    assert cache.position == cache.seen_tokens == 16
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,fields", MODELS)
def test_greedy_generate_equals_full_forward_decoding_past_block_size(name, fields):
    model = tiny(name, **fields)
    idx = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(idx, 20, temperature=0)  # 25 > block_size 16: the window slides
    assert out.shape == (2, 25)
    assert torch.equal(out, reference_greedy(model, idx, 20))


def test_gam_state_is_constant_size_and_kv_cache_grows():
    gam = tiny("gam", pos_embedding="none")
    cache = gam.allocate_inference_cache(1, 4)
    size = cache.nbytes()
    assert size == TINY["n_layer"] * TINY["n_embd"] * (TINY["conv_kernel_size"] - 1) * 4
    with torch.no_grad():
        gam.forward_cached(torch.zeros(1, 40, dtype=torch.long), cache)
        for _ in range(5):
            gam.forward_cached(torch.ones(1, 1, dtype=torch.long), cache)
    assert cache.nbytes() == size and cache.position == 45
    tr = tiny("transformer", pos_embedding="none")
    cache = tr.allocate_inference_cache(1, 4)  # too small: the KV buffers double as needed
    idx = torch.randint(0, TINY["vocab_size"], (1, 30))
    with torch.no_grad():
        got = torch.cat([tr.forward_cached(idx[:, :3], cache)]
                        + [tr.forward_cached(idx[:, t:t + 1], cache) for t in range(3, 30)], dim=1)
        torch.testing.assert_close(got, tr(idx)[0], atol=1e-5, rtol=0)
    assert cache.layers[0]["length"] == 30 and cache.layers[0]["k"].shape[2] >= 30


@pytest.mark.parametrize("token", [TINY["vocab_size"], -1])
def test_an_out_of_range_id_in_a_decode_step_is_a_clear_error_and_leaves_the_cache(token):
    """One token per step takes the id check's single-read path: the same one-line error,
    raised before the cache moves."""
    model = tiny("gam", pos_embedding="none")
    cache = model.allocate_inference_cache(1, 8)
    with torch.no_grad():
        model.forward_cached(torch.zeros(1, 3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match=f"token id {token} outside"):
            model.forward_cached(torch.tensor([[token]]), cache)
    assert cache.position == 3


def test_cache_past_block_size_and_batch_mismatch_are_clear_errors():
    model = tiny("gam")
    cache = model.allocate_inference_cache(1)
    with pytest.raises(ValueError, match="block_size 16"):
        model.forward_cached(torch.zeros(1, 17, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="batch size 2"):
        model.forward_cached(torch.zeros(2, 3, dtype=torch.long), cache)


def test_reorder_cache_selects_rows():
    model = tiny("transformer")
    cache = model.allocate_inference_cache(3, 8)
    with torch.no_grad():
        model.forward_cached(torch.randint(0, 61, (3, 4)), cache)
    k = cache.layers[0]["k"].clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.layers[0]["k"], k[[2, 2, 0]]) and cache.batch_size == 3


# ---------------------------------------------------------------- sampling

def test_sampling_is_reproducible_and_filters_work():
    model = tiny("gam")
    idx = torch.randint(0, TINY["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(3))
    a = model.generate(idx, 10, temperature=1.0, seed=7)
    b = model.generate(idx, 10, temperature=1.0, seed=7)
    assert torch.equal(a, b)
    greedy = model.generate(idx, 10, temperature=0)
    assert torch.equal(model.generate(idx, 10, temperature=0.8, top_k=1, seed=1), greedy)
    assert torch.equal(model.generate(idx, 10, temperature=0.8, top_p=1e-6, seed=1), greedy)
    assert torch.equal(model.generate(idx, 0), idx)
    assert model.generate(idx[0], 3, temperature=0).shape == (7,)  # 1-D prompt, 1-D result


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, top_p=0.8, generator=g)) for _ in range(300)}
    assert seen == {0, 1}
    seen = {int(sample_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert seen == {0, 1, 2}


def test_greedy_pick_of_bf16_logits_is_the_argmax_first_index_on_ties():
    """Greedy converts to fp32 before the argmax (exact): the same index as bf16's own
    argmax, the first of tied maxima, one per row."""
    torch.manual_seed(0)
    logits = torch.randn(3, 1000).to(torch.bfloat16)
    logits[1, 7] = logits[1, 900] = logits[1].max() + 1  # a tie: the first wins
    picked = sample_next(logits, temperature=0)
    assert picked.dtype == torch.long and torch.equal(picked, logits.argmax(dim=-1))
    assert int(picked[1]) == 7


@pytest.mark.parametrize("kwargs,message", [
    ({"idx": torch.zeros(1, 0, dtype=torch.long)}, "empty prompt"),
    ({"idx": torch.zeros(0, dtype=torch.long)}, "empty prompt"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ({"temperature": -0.5}, "temperature must be a number >= 0"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"idx": torch.tensor([[1, 99]])}, "token id 99 outside"),
])
def test_bad_generation_arguments(kwargs, message):
    model = tiny("gam")
    args = {"idx": torch.zeros(1, 3, dtype=torch.long), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, **args)


def test_generate_restores_training_mode():
    model = tiny("gam").train()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert model.training


# ---------------------------------------------------------------- checkpoints, text, CLI

def make_tokenizer(kind="bytelevel"):
    """A tokenizer as the trainer makes: byte-level (the default), or the paper's (older runs)."""
    from gam.tokenizer import row_texts, train_tokenizer

    text = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song"] * 4
    return train_tokenizer(row_texts(kind, text), 300 if kind == "bytelevel" else 80, kind)


def make_checkpoint(path, name="gam", tokenizer=True, kind="bytelevel", **fields):
    """A folder as the trainer writes it: model.safetensors, config.json, tokenizer.json."""
    from safetensors.torch import save_model

    tok = make_tokenizer(kind)
    model = tiny(name, **{"vocab_size": tok.get_vocab_size(), **fields})
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"step": 1, "model_config": model.config.to_dict()}))
    if tokenizer:
        tok.save(str(path / "tokenizer.json"))
    return model, tok


def test_load_checkpoint_round_trip(tmp_path):
    model, _ = make_checkpoint(tmp_path / "ckpt-000001")
    (tmp_path / "latest").write_text("ckpt-000001\n")  # a run folder resolves to its latest checkpoint
    ckpt = load_checkpoint(tmp_path)
    loaded, tok = ckpt.build_model(), ckpt.tokenizer()
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert loaded.head.weight is loaded.token_embedding.weight
    assert tok.get_vocab_size() == model.config.vocab_size


def test_load_checkpoint_reads_and_verifies_trainer_checkpoints(tmp_path):
    from gam.checkpoint import save_checkpoint

    tok = make_tokenizer()
    model = tiny("gam", vocab_size=tok.get_vocab_size())
    save_checkpoint(tmp_path, 3, model, {}, tok.to_str())
    loaded = load_checkpoint(tmp_path).build_model()
    idx = torch.randint(0, model.config.vocab_size, (1, 7))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    weights = tmp_path / "ckpt-000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_checkpoint(tmp_path)


def test_load_checkpoint_one_tied_head_rule(tmp_path):
    """The head is the embedding: stored under either name (or both, equal), wrapper prefixes removed."""
    from safetensors.torch import save_file

    model, _ = make_checkpoint(tmp_path)
    idx = torch.randint(0, model.config.vocab_size, (1, 7))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for stored in ({k: v for k, v in state.items() if k != "head.weight"},
                   {k: v for k, v in state.items() if k != "token_embedding.weight"},
                   {f"_orig_mod.{k}": v for k, v in state.items()}):  # saved from a torch.compile'd model
        save_file(stored, str(tmp_path / "model.safetensors"))
        loaded = load_checkpoint(tmp_path).build_model()
        assert loaded.head.weight is loaded.token_embedding.weight
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    untied = dict(state, **{"head.weight": state["head.weight"] + 1})
    save_file(untied, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="head.weight differs from token_embedding.weight"):
        load_checkpoint(tmp_path).build_model()


def test_load_checkpoint_refuses_a_trainer_checkpoint_without_its_manifest(tmp_path):
    from gam.checkpoint import save_checkpoint

    tok = make_tokenizer()
    ckpt = save_checkpoint(tmp_path, 3, tiny("gam", vocab_size=tok.get_vocab_size()), {}, tok.to_str())
    (ckpt / "manifest.json").unlink()  # the trainer writes it last: without it the save did not finish
    with pytest.raises(ValueError, match="incomplete or unverifiable"):
        load_checkpoint(tmp_path)


def test_unknown_characters_become_unk_with_a_warning():
    tok = make_tokenizer("paper")
    with pytest.warns(UserWarning, match="cannot encode became \\[UNK\\]: 'é'"):
        ids = encode_prompt(tok, "the cat é")
    assert ids[-1] == tok.token_to_id("[UNK]") and len(ids) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode_prompt(tok, "the dog") == tok.encode("the dog").ids


def test_cli_generate_echoes_the_prompt_and_streams_normal_text(tmp_path, capsys):
    model, tok = make_checkpoint(tmp_path)
    prompt = "Hello world, the cat said: «Café 東京 🙂» <unk>"
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "30",
                 "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    ids = tok.encode(prompt).ids
    assert tok.decode(ids) == prompt and err == ""  # byte-level: nothing is unknown
    new = model.generate(torch.tensor([ids]), 30, temperature=0)[0, len(ids):].tolist()
    assert out == prompt + tok.decode(new) + "\n"  # the prompt exactly as typed, then the text


def test_cli_generate_with_bf16_weights_decodes_as_the_bf16_model(tmp_path, capsys):
    """--precision bf16: the weights and the decoding state in bf16 (half the bytes per token);
    the text is what the bf16 model generates greedily."""
    model, tok = make_checkpoint(tmp_path)
    prompt = "the cat"
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0",
                 "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    ids = tok.encode(prompt).ids
    new = model.to(torch.bfloat16).generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
    assert out == prompt + tok.decode(new) + "\n"
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--precision", "fp16"]) == 2


def test_cli_generate_with_an_old_paper_tokenizer_checkpoint(tmp_path, capsys):
    model, tok = make_checkpoint(tmp_path, kind="paper")
    assert main(["generate", str(tmp_path), "--prompt", "the cat ü", "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    ids = encode_prompt(tok, "the cat") + [tok.token_to_id("[UNK]")]
    expected = model.generate(torch.tensor([ids]), 20, temperature=0)[0].tolist()
    # the prompt as typed, then the paper tokenizer's decode of the continuation
    assert out == "the cat ü" + tok.decode(expected)[len(tok.decode(ids)):] + "\n"
    assert "warning" in err and "'ü'" in err


@pytest.mark.parametrize("argv,message", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "cat", "--max-new-tokens", "-1"], "max_new_tokens must be"),
    (["--prompt", "cat", "--temperature", "-1"], "temperature must be"),
    (["--prompt", "cat", "--top-k", "-2"], "top_k must be"),
    (["--prompt", "cat", "--top-p", "0"], "top_p must be in"),
])
def test_cli_generate_bad_arguments(tmp_path, capsys, argv, message):
    make_checkpoint(tmp_path)
    assert main(["generate", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_without_tokenizer_or_checkpoint(tmp_path, capsys):
    make_checkpoint(tmp_path / "ck", tokenizer=False)
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "the cat"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer.json" in err and err.count("\n") == 1
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "the cat"]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


# ---------------------------------------------------------------- decode benchmark (smoke)

def test_bench_decode_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "decode", "--out", str(out), "--contexts", "8,24", "--models", "gam,transformer",
                 "--n-embd", "16", "--n-layer", "1", "--vocab-size", "32", "--steps", "2",
                 "--warmup", "1", "--threads", "1"]) == 0
    data = json.loads((out / "decode.json").read_text())
    assert [(r["model"], r["context"]) for r in data["results"]] == [
        ("gam", 8), ("gam", 24), ("transformer", 8), ("transformer", 24)]
    assert all(r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 for r in data["results"])
    gam_state = {r["state_bytes"] for r in data["results"] if r["model"] == "gam"}
    assert len(gam_state) == 1  # constant-size state
    assert set(data["summary"]) >= {"gam_longest_over_shortest", "transformer_over_gam_at_longest"}
    table = (out / "decode.md").read_text()
    assert "| model | weights | steps | context | ms / token (median) |" in table and table.count("| GAM |") == 2
    assert (out / "decode.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "decode", "--contexts", "0"]) == 2
    assert data["provenance"]["argv"] and data["provenance"]["end_utc"]
    # the floor: measured bandwidth, each row's bytes (weights once + its state traffic), time over it
    gbs = data["stream_read_gbs"]["used"]
    assert gbs > 0.1 and gbs == max(data["stream_read_gbs"]["before"], data["stream_read_gbs"]["after"])
    for r in data["results"]:
        assert r["bytes_per_token"] > r["weight_bytes"] > 0
        assert r["floor_ms"] == pytest.approx(r["bytes_per_token"] / (gbs * 1e9) * 1e3)
        assert r["over_floor"] == pytest.approx(r["ms_per_token"] / r["floor_ms"])
        # the cached floor: the same bytes streamed again and again from a buffer of their size
        assert r["cached_gbs"] > 0.01
        assert r["cached_floor_ms"] == pytest.approx(r["bytes_per_token"] / (r["cached_gbs"] * 1e9) * 1e3)
        assert r["over_cached_floor"] == pytest.approx(r["ms_per_token"] / r["cached_floor_ms"])
    assert "| x floor | x cached floor |" in table
    gam, transformer = ([r for r in data["results"] if r["model"] == m] for m in ("gam", "transformer"))
    assert gam[0]["bytes_per_token"] == gam[1]["bytes_per_token"]  # flat in the context
    # the Transformer reads its keys and values: 2 x layers x L x C x 4 bytes more at L = 24 than at 8
    assert transformer[1]["bytes_per_token"] - transformer[0]["bytes_per_token"] == 2 * 1 * 16 * 16 * 4


def test_bench_decode_bf16_rows_halve_the_bytes(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "decode", "--out", str(out), "--contexts", "8", "--models", "gam,mamba,kv_slots",
                 "--precisions", "fp32,bf16", "--n-embd", "16", "--n-layer", "1", "--vocab-size", "32",
                 "--steps", "2", "--warmup", "1", "--threads", "1"]) == 0
    rows = {(r["model"], r["precision"]): r for r in json.loads((out / "decode.json").read_text())["results"]}
    assert set(rows) == {(m, p) for m in ("gam", "mamba", "kv_slots") for p in ("fp32", "bf16")}
    assert rows[("gam", "bf16")]["weight_bytes"] * 2 == rows[("gam", "fp32")]["weight_bytes"]
    assert rows[("gam", "bf16")]["floor_ms"] < rows[("gam", "fp32")]["floor_ms"]


def test_cli_generate_interrupted_ends_the_text_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C while tokens stream: the text so far ends its line, then one line "interrupted", exit 130."""
    import gam.generation

    def interrupted_stream(*args, **kwargs):
        yield torch.tensor([3])
        raise KeyboardInterrupt

    monkeypatch.setattr(gam.generation, "stream", interrupted_stream)
    make_checkpoint(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "4"]) == 130
    captured = capsys.readouterr()
    assert captured.out.startswith("the cat") and captured.out.endswith("\n")
    assert captured.err == "gam generate: interrupted\n"
