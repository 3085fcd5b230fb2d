"""Hugging Face transformers integration: config, generate(), save/load, export."""

import json
import logging
import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conftest import TINY, tiny  # noqa: E402
from gam.cli import main  # noqa: E402
from gam.generation import InferenceCache, encode_prompt  # noqa: E402
from gam.hf import CACHE_NAME, GAMForCausalLM, GAMHFConfig  # noqa: E402

MODELS = [
    ("gam", {}),
    ("gam", {"variant": "global_only"}),
    ("gam", {"pos_embedding": "none"}),
    ("transformer", {}),
    ("transformer", {"attn_short_conv": 3}),
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
    cache = getattr(out, CACHE_NAME)
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


def test_right_padded_prompt_is_refused():
    hf = GAMForCausalLM.from_gam(tiny("gam"))
    with pytest.raises(ValueError, match="pad prompts on the left"):
        hf.generate(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0]]),
                    max_new_tokens=2, pad_token_id=0)


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


def test_an_export_folder_is_not_a_checkpoint(tmp_path):
    from gam.checkpoint import CheckpointError, load_checkpoint
    from test_generation import make_checkpoint

    make_checkpoint(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    with pytest.raises(CheckpointError, match="a gam export folder .* load it with transformers"):
        load_checkpoint(tmp_path / "hf")


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


@pytest.mark.parametrize("name,fields", [MODELS[0], MODELS[3], MODELS[5]])
def test_output_hidden_states_are_embeddings_block_outputs_and_final_norm(name, fields):
    model = tiny(name, **fields)
    hf = GAMForCausalLM.from_gam(model)
    idx = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf(idx, output_hidden_states=True)
        states = out.hidden_states
        assert len(states) == TINY["n_layer"] + 1
        x = model.embed(idx)
        torch.testing.assert_close(states[0], x)
        for block, state in zip(model.blocks[:-1], states[1:-1]):
            x = block(x)
            torch.testing.assert_close(state, x)
        torch.testing.assert_close(states[-1], model.ln_f(model.blocks[-1](x)))
        torch.testing.assert_close(out.logits, model.head(states[-1]))
        assert hf(idx).hidden_states is None
        # the cached path (prefill, then steps) gives the same states
        cached = hf(idx[:, :4], use_cache=True, output_hidden_states=True)
        step = hf(idx[:, 4:], **{CACHE_NAME: getattr(cached, CACHE_NAME)}, output_hidden_states=True)
        for full, first, rest in zip(states, cached.hidden_states, step.hidden_states):
            torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)
    generated = hf.generate(idx, max_new_tokens=3, do_sample=False, output_hidden_states=True,
                            return_dict_in_generate=True)
    assert len(generated.hidden_states) == 3 and len(generated.hidden_states[0]) == TINY["n_layer"] + 1


def test_loss_is_summed_over_num_items_in_batch():
    """transformers' Trainer passes num_items_in_batch (gradient accumulation) and expects sum / count."""
    hf = GAMForCausalLM.from_gam(tiny("gam"))
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        mean = hf(idx, labels=idx).loss
        torch.testing.assert_close(hf(idx, labels=idx, num_items_in_batch=32).loss, mean * 16 / 32)


def test_trainer_two_steps_then_from_pretrained_reloads_the_weights(tmp_path):
    pytest.importorskip("accelerate")
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from gam.hf import hf_tokenizer
    from test_generation import make_tokenizer

    tok = hf_tokenizer(make_tokenizer())
    hf = GAMForCausalLM.from_gam(tiny("gam", vocab_size=len(tok))).train()
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    texts = ["the cat sat on the mat", "a dog ran", "the bird sang a song in the park", "the cat"] * 2
    data = Dataset.from_dict({"text": texts}).map(lambda row: tok(row["text"]), remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, use_cpu=True, report_to="none",
                             save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)  # right padding, labels -100 there
    trainer = Trainer(model=hf, args=args, train_dataset=data, data_collator=collator)
    result = trainer.train()
    assert result.global_step == 2
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    trained = trainer.model.state_dict()
    assert set(loaded.state_dict()) == set(trained)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
    assert not torch.equal(trained["model.head.weight"], before["model.head.weight"])  # it did train


@pytest.fixture
def deprecations_are_errors():
    """DeprecationWarning and FutureWarning raise, and so does a transformers log record saying
    something is deprecated or will be removed: transformers warns through its logger, once per
    message and process, so that once-cache is emptied first (an earlier test may have drawn it)."""

    class Raise(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if re.search(r"deprecat|will be removed|no longer supported", message, flags=re.I):
                raise AssertionError(f"transformers warned: {message}")

    logger = logging.getLogger("transformers")
    handler = Raise(level=logging.WARNING)
    logger.addHandler(handler)
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            warnings.simplefilter("error", FutureWarning)
            yield
    finally:
        logger.removeHandler(handler)


def test_generate_on_an_export_warns_of_nothing_deprecated_and_reuses_its_cache(tmp_path, deprecations_are_errors):
    """transformers 5.25 renamed past_key_values to cache and warned on every generate(); before
    the rename was followed, it also dropped our cache after the first step (each new token
    re-ran the whole sequence). Greedy, sampling and beam search on the current transformers."""
    from test_generation import make_checkpoint

    model, tok = make_checkpoint(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tok("the cat sat", return_tensors="pt").input_ids
    fed = []
    hf.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                 with_kwargs=True)
    greedy = hf.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(greedy, model.generate(ids, 5, temperature=0))
    assert fed == [ids.shape[1], 1, 1, 1, 1]  # the prompt once, then one new token per step
    assert hf.generate(ids, max_new_tokens=5, do_sample=True, top_k=5).shape == (1, ids.shape[1] + 5)
    beams = hf.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False)
    assert torch.equal(beams, hf.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False, use_cache=False))
    out = hf.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert isinstance(getattr(out, CACHE_NAME), InferenceCache)


def test_an_export_says_how_to_load_it(tmp_path, capsys):
    """Without `import gam.hf`, transformers does not know the model type and suggests upgrading
    itself. Every message about an export names `import gam.hf`: gam export's, the export's
    README.md, and those of gam generate and gam eval given an export."""
    import subprocess
    import sys

    from test_generation import make_checkpoint

    make_checkpoint(tmp_path / "ckpt")
    hf = tmp_path / "hf-gam"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt"), str(hf)]) == 0
    assert f"import gam.hf; transformers.AutoModelForCausalLM.from_pretrained('{hf}')" in capsys.readouterr().out
    readme = (hf / "README.md").read_text()
    assert "import gam.hf" in readme and f'AutoModelForCausalLM.from_pretrained("{hf}")' in readme
    # the model card is not in the manifest: editing it keeps the folder verified and loadable
    (hf / "README.md").write_text(readme + "\nFine-tuned on nothing yet.\n")
    assert main(["verify", str(hf)]) == 0
    assert isinstance(AutoModelForCausalLM.from_pretrained(hf), GAMForCausalLM)
    capsys.readouterr()
    for command in (["generate", str(hf), "--prompt", "the cat"], ["eval", str(hf)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"import gam.hf; transformers.AutoModelForCausalLM.from_pretrained('{hf}')" in err, command
    # transformers alone: its own message, the one the README quotes and answers
    alone = subprocess.run([sys.executable, "-c", "import sys, transformers; "
                            "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(hf)],
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and "does not recognize this architecture" in alone.stderr
    assert "does not recognize this architecture" in readme
