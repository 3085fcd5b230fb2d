"""Hugging Face transformers integration: config, generate(), save/load, export."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gam.cli import main  # noqa: E402
from gam.generation import InferenceCache, encode_prompt  # noqa: E402
from gam.hf import GAMForCausalLM, GAMHFConfig  # noqa: E402

from conftest import TINY, tiny  # noqa: E402

MODELS = [
    ("gam", {}),
    ("gam", {"variant": "global_only"}),
    ("gam", {"pos_embedding": "none"}),
    ("transformer", {}),
    ("mamba", {"mamba_backend": "torch"}),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,fields", MODELS)
def test_hf_greedy_generate_equals_ours(name, fields):
    model = tiny(name, **fields)
    hf = GAMForCausalLM.from_gam(model)
    idx = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(0))
    ours = model.generate(idx, 20, temperature=0)  # 25 tokens > block_size 16: the window slides
    theirs = hf.generate(idx, max_new_tokens=20, do_sample=False)
    assert torch.equal(theirs, ours)
    # without a cache generate() re-runs the full forward each step: same tokens
    assert torch.equal(hf.generate(idx, max_new_tokens=20, do_sample=False, use_cache=False), ours)


def test_beam_search_and_sampling_run_on_the_cache():
    hf = GAMForCausalLM.from_gam(tiny("transformer"))
    idx = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    beams = hf.generate(idx, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(beams, hf.generate(idx, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False))
    sampled = hf.generate(idx, max_new_tokens=8, do_sample=True, top_k=5, top_p=0.9, num_return_sequences=2)
    assert sampled.shape == (4, 13)


def test_generate_uses_our_cache():
    hf = GAMForCausalLM.from_gam(tiny("gam"))
    out = hf.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4, do_sample=False,
                      return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, InferenceCache) and cache.nbytes() == 2 * 16 * 2 * 4  # k-1 vectors per layer


@pytest.mark.parametrize("name,fields", MODELS)
def test_save_and_reload_gives_identical_logits(tmp_path, name, fields):
    hf = GAMForCausalLM.from_gam(tiny(name, **fields))
    hf.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("model.head.weight" in keys) != ("model.token_embedding.weight" in keys)  # tied: stored once
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gam"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), GAMHFConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, GAMForCausalLM) and not loaded.training
    assert loaded.model.head.weight is loaded.model.token_embedding.weight
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, hf(idx).logits)


def test_labels_give_the_shifted_cross_entropy():
    model = tiny("gam")
    hf = GAMForCausalLM.from_gam(model)
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        out = hf(idx, labels=idx)
        _, ours = model(idx[:, :-1], targets=idx[:, 1:])
    torch.testing.assert_close(out.loss, ours)


def test_config_validates_fields():
    cfg = GAMHFConfig(**TINY, variant="sum_fusion")
    assert cfg.to_gam_config().variant == "sum_fusion" and cfg.hidden_size == 16
    with pytest.raises(ValueError, match="variant must be one of"):
        GAMHFConfig(variant="nope")


def test_padding_is_refused():
    hf = GAMForCausalLM.from_gam(tiny("gam"))
    with pytest.raises(ValueError, match="padding is not supported"):
        hf(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1]]))


def test_export_checkpoint_to_transformers(tmp_path, capsys):
    from test_generation import make_checkpoint

    model, tok = make_checkpoint(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == model.config.block_size == 16  # what lm-eval reads
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.model_max_length == 16
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.unk_token) == ("<|endoftext|>", "<|pad|>", None)
    assert hf.config.pad_token_id == hf_tok.pad_token_id
    text = "the cat said «Café 東京 🙂» <unk>, then sat."
    ids = hf_tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(text).ids and hf_tok.decode(ids[0]) == text
    assert torch.equal(hf.generate(ids, max_new_tokens=12, do_sample=False),
                       model.generate(ids, 12, temperature=0))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


def test_pipeline_text_reads_as_typed(tmp_path):
    from transformers import pipeline

    from test_generation import make_checkpoint

    model, tok = make_checkpoint(tmp_path / "ckpt")
    main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    generator = pipeline("text-generation", model=str(tmp_path / "hf"))
    prompt = "the cat sat on"
    out = generator(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    ids = tok.encode(prompt).ids
    new = model.generate(torch.tensor([ids]), 6, temperature=0)[0, len(ids):].tolist()
    assert out == prompt + tok.decode(new)
    # a continuation that starts a new word: the pipeline keeps its space
    no_space = [i for t, i in tok.get_vocab().items() if not t.startswith("\u0120")]
    out = generator(prompt, max_new_tokens=6, do_sample=False, begin_suppress_tokens=no_space)
    assert out[0]["generated_text"].startswith(prompt + " ")


def test_export_of_an_old_paper_tokenizer_checkpoint(tmp_path):
    from test_generation import make_checkpoint

    model, tok = make_checkpoint(tmp_path / "ckpt", kind="paper")
    main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tok("the cat sat", return_tensors="pt").input_ids
    assert ids[0].tolist() == encode_prompt(tok, "the cat sat")
    assert hf_tok.unk_token == "[UNK]" and hf_tok.pad_token == "[PAD]" and hf_tok.eos_token == "[EOS]"
    assert torch.equal(hf.generate(ids, max_new_tokens=12, do_sample=False),
                       model.generate(ids, 12, temperature=0))
