"""Hugging Face / mamba-ssm Mamba checkpoints load into the project's Mamba LM."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

from gam.models.mamba_convert import convert_mamba_checkpoint, load_mamba_checkpoint, main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 53


@pytest.fixture(scope="module")
def hf_mamba(tmp_path_factory):
    """A randomly initialized tiny MambaForCausalLM saved with save_pretrained; its
    norm weights are drawn too (they start at one), so a wrong norm shows."""
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=3, expand=2,
                         conv_kernel=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = MambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf-mamba")
    model.save_pretrained(folder)
    return model, folder


def test_hf_checkpoint_gives_the_same_logits_and_greedy_generation(hf_mamba):
    hf, folder = hf_mamba
    ours = load_mamba_checkpoint(folder)
    assert ours.config.pos_embedding == "none" and ours.config.d_state == 8 and ours.config.n_layer == 3
    idx = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx).logits
        mine, _ = ours(idx)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    expected = hf.generate(idx[:, :6], max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(idx[:, :6], 24, temperature=0), expected)


def test_mamba_ssm_layout_loads_the_same_model(hf_mamba, tmp_path):
    """mamba-ssm's MambaLMHeadModel names: backbone.embedding, lm_head stored, pytorch_model.bin."""
    hf, folder = hf_mamba
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    assert "lm_head.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 32, "n_layer": 3, "vocab_size": VOCAB, "ssm_cfg": {"d_state": 8, "d_conv": 4, "expand": 2},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
        "d_intermediate": 0, "attn_layer_idx": [], "tie_embeddings": True}))
    a, b = load_mamba_checkpoint(folder), load_mamba_checkpoint(tmp_path)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_converted_folder_loads_with_load_checkpoint(hf_mamba, tmp_path):
    from gam.checkpoint import load_checkpoint

    hf, folder = hf_mamba
    out = convert_mamba_checkpoint(folder, tmp_path / "gam")
    model = load_checkpoint(out).build_model()
    idx = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)
    assert main([str(folder), str(out)]) == 2  # not empty


@pytest.mark.parametrize("config,message", [
    (None, "no config.json"),
    ({"model_type": "gam"}, "not a Mamba-1 checkpoint .model_type 'gam'"),
    ({"model_type": "mamba2"}, "not a Mamba-1 checkpoint"),
    ({"architectures": ["X"]}, "not a Mamba checkpoint"),
    ({"model_type": "mamba", "use_conv_bias": False, "hidden_act": "gelu"},
     "unsupported Mamba option.s.: use_conv_bias=false, hidden_act='gelu'"),
    ({"model_type": "mamba", "hidden_size": 32, "time_step_rank": 8}, "time_step_rank=8"),
    ({"d_model": 32, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2"}}, "ssm_cfg.layer='Mamba2'"),
    ({"model_type": "mamba"}, "no weights"),
])
def test_not_a_mamba_checkpoint_or_unsupported_options_are_one_line_errors(tmp_path, capsys, config, message):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_mamba_checkpoint(tmp_path)
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_untied_head_is_refused(hf_mamba, tmp_path):
    hf, folder = hf_mamba
    state = dict(hf.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="untied lm_head"):
        load_mamba_checkpoint(tmp_path)


def test_standard_mamba_uses_rmsnorm_and_an_old_layernorm_checkpoint_says_why_it_fails(tmp_path):
    from safetensors.torch import save_file

    from conftest import tiny
    from gam.checkpoint import load_checkpoint
    from gam.layers.mamba_block import RMSNorm

    model = tiny("mamba", mamba_backend="torch")
    assert isinstance(model.blocks[0].norm, RMSNorm) and isinstance(model.ln_f, RMSNorm)
    assert isinstance(tiny("mamba", mamba_wiring="paper").ln_f, torch.nn.LayerNorm)  # the paper's code
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "head.weight"}
    state.update({"ln_f.bias": torch.zeros(16), **{f"blocks.{i}.norm.bias": torch.zeros(16) for i in range(2)}})
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_config": model.config.to_dict()}))
    with pytest.raises(ValueError, match="saved when it used LayerNorm"):
        load_checkpoint(tmp_path).build_model()


@pytest.fixture(scope="module")
def hf_mamba_and_tokenizer(tmp_path_factory):
    """A tiny MambaForCausalLM whose embedding has rows for every token of a small tokenizer (and
    3 more, as real checkpoints pad their vocabulary), the tokenizer saved apart from it."""
    from test_generation import make_tokenizer

    tok = make_tokenizer("paper")
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=tok.get_vocab_size() + 3, hidden_size=32, state_size=8, num_hidden_layers=2,
                         expand=2, conv_kernel=4)
    folder = tmp_path_factory.mktemp("hf-mamba-no-tokenizer")
    MambaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer_file = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(tokenizer_file))
    return folder, tokenizer_file


def test_converted_folder_passes_gam_verify_generate_export_and_eval(hf_mamba_and_tokenizer, tmp_path, capsys):
    """The converter's output fits the other tools: a manifest (gam verify), and a tokenizer given
    with --tokenizer when the source has none (gam generate, gam export, gam eval --data)."""
    from gam.cli import main as gam
    from test_train import write_corpus

    source, tokenizer_file = hf_mamba_and_tokenizer
    bare = tmp_path / "bare"
    assert main([str(source), str(bare)]) == 0
    assert "convert again with --tokenizer FILE" in capsys.readouterr().out
    assert gam(["verify", str(bare)]) == 0
    assert gam(["generate", str(bare), "--prompt", "the cat"]) == 2
    assert "convert again with python -m gam.models.mamba_convert SOURCE OUT --tokenizer FILE" in capsys.readouterr().err

    out = tmp_path / "converted"
    assert main([str(source), str(out), "--tokenizer", str(tokenizer_file)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert gam(["verify", str(out)]) == 0
    capsys.readouterr()
    assert gam(["generate", str(out), "--prompt", "the cat", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert gam(["export", str(out), str(tmp_path / "hf")]) == 0
    assert gam(["verify", str(tmp_path / "hf")]) == 0
    corpus = write_corpus(tmp_path / "text.txt", lines=800)
    assert gam(["eval", str(out), "--data", str(corpus), "--json", "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 0


@pytest.mark.parametrize("what,message", [
    ("missing", "no such tokenizer file"),
    ("folder", "no tokenizer.json there"),
    ("garbled", "not a tokenizers tokenizer.json"),
    ("too large", "the tokenizer has 293 tokens, more than the model's 45 embedding rows"),
])
def test_a_tokenizer_that_does_not_fit_is_one_line(hf_mamba_and_tokenizer, tmp_path, capsys, what, message):
    from test_generation import make_tokenizer

    source, _ = hf_mamba_and_tokenizer
    tokenizer = tmp_path / "tokenizer.json"
    if what == "folder":
        tokenizer = tmp_path
    elif what == "garbled":
        tokenizer.write_text("{not json")
    elif what == "too large":
        make_tokenizer("bytelevel").save(str(tokenizer))
    assert main([str(source), str(tmp_path / "out"), "--tokenizer", str(tokenizer)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
