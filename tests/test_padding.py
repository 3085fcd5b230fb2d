"""Left-padded batches: every real token gets what it gets unpadded, in the full
forward, the cached prefill/step path, generate() and transformers' pipeline."""

import pytest
import torch

from conftest import TINY, tiny
from gam.generation import forward_cached, generate

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [
    ("gam", {}),
    ("gam", {"gam_impl": "reference"}),
    ("gam", {"memory": "kv_slots", "memory_heads": 2}),
    ("gam", {"variant": "sum_fusion", "pos_embedding": "none"}),
    ("transformer", {}),
    ("transformer", {"attn_impl": "naive"}),
    ("transformer", {"attn_short_conv": 3}),
    ("mamba", {"mamba_backend": "torch"}),
    ("mamba", {"mamba_backend": "torch", "mamba_wiring": "paper"}),
]
IDS = [name + "".join(f"-{v}" for v in fields.values()) for name, fields in MODELS]
PAD_ID = 1


def prompts(lengths=(7, 4, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, TINY["vocab_size"], (n,), generator=g) for n in lengths]


def left_pad(rows):
    """(ids, attention_mask) of the rows, left-padded to the longest."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("name,fields", MODELS, ids=IDS)
def test_padded_forward_gives_real_tokens_their_unpadded_logits(name, fields):
    model = tiny(name, **fields)
    rows = prompts()
    ids, mask = left_pad(rows)
    with torch.no_grad():
        padded, _ = model(ids, attention_mask=mask)
        for b, row in enumerate(rows):
            alone, _ = model(row[None])
            torch.testing.assert_close(padded[b, ids.shape[1] - len(row):], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,fields", MODELS, ids=IDS)
def test_padded_prefill_and_steps_give_the_unpadded_logits(name, fields):
    model = tiny(name, **fields)
    rows = prompts()
    ids, mask = left_pad(rows)
    more = torch.randint(2, TINY["vocab_size"], (len(rows), 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model.allocate_inference_cache(len(rows), 16)
        first = forward_cached(model, ids, cache, attention_mask=mask)
        steps = forward_cached(model, more, cache)
        for b, row in enumerate(rows):
            solo = model.allocate_inference_cache(1, 16)
            torch.testing.assert_close(first[b, ids.shape[1] - len(row):],
                                       forward_cached(model, row[None], solo)[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(steps[b], forward_cached(model, more[b:b + 1], solo)[0],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,fields", MODELS, ids=IDS)
def test_padded_batch_generates_what_each_prompt_generates_alone(name, fields):
    model = tiny(name, **fields)
    rows = prompts()
    ids, mask = left_pad(rows)
    batch = generate(model, ids, 12, temperature=0, attention_mask=mask)  # 7 + 12 > block_size 16: slides
    for b, row in enumerate(rows):
        alone = generate(model, row[None], 12, temperature=0)
        assert torch.equal(batch[b, ids.shape[1] - len(row):], alone[0])


@pytest.mark.parametrize("name,fields", [MODELS[0], MODELS[4], MODELS[6]], ids=["gam", "transformer", "mamba"])
def test_padding_on_both_sides_gives_the_unpadded_logits(name, fields):
    """Right padding (a Trainer batch) cannot reach a real token: it takes the unpadded path."""
    model = tiny(name, **fields)
    ids = torch.randint(2, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        padded, _ = model(ids, attention_mask=mask)
        torch.testing.assert_close(padded[0, :5], model(ids[:1, :5])[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[1, 2:6], model(ids[1:, 2:6])[0][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(model(ids[:1], attention_mask=mask[:1])[0], model(ids[:1])[0])


def test_padding_errors_are_one_line():
    model = tiny("gam")
    ids = torch.randint(2, TINY["vocab_size"], (2, 4))
    cases = [
        (torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), "must be one run"),
        (torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), "no real token"),
        (torch.tensor([[2, 1, 1, 1], [1, 1, 1, 1]]), "0 .padding. and 1"),
        (torch.ones(2, 3, dtype=torch.long), "shape of the input ids"),
    ]
    for mask, message in cases:
        with pytest.raises(ValueError, match=message):
            model(ids, attention_mask=mask)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(model, ids, 2, temperature=0, attention_mask=right)
    cache = model.allocate_inference_cache(2, 16)
    with pytest.raises(ValueError, match="pad prompts on the left"):
        forward_cached(model, ids, cache, attention_mask=right)
    forward_cached(model, ids, cache)
    with pytest.raises(ValueError, match="only allowed in the prompt"):
        forward_cached(model, ids[:, :2], cache, attention_mask=torch.tensor([[0, 1], [1, 1]]))


def test_unpadded_mask_takes_the_unpadded_path():
    model = tiny("transformer")
    ids = torch.randint(2, TINY["vocab_size"], (2, 5))
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids))[0], model(ids)[0])
    cache = model.allocate_inference_cache(2, 16)
    forward_cached(model, ids, cache, attention_mask=torch.ones_like(ids))
    assert cache.pad_lengths is None and "key_mask" not in cache.layers[0]


# ---------------------------------------------------------------- transformers

@pytest.mark.parametrize("name,fields", MODELS, ids=IDS)
def test_hf_generate_on_a_padded_batch_equals_one_at_a_time(name, fields):
    pytest.importorskip("transformers")
    from gam.hf import GAMForCausalLM

    hf = GAMForCausalLM.from_gam(tiny(name, **fields))
    rows = prompts()
    ids, mask = left_pad(rows)
    for use_cache in (True, False):
        batch = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            pad_token_id=PAD_ID, use_cache=use_cache)
        for b, row in enumerate(rows):
            alone = hf.generate(row[None], max_new_tokens=12, do_sample=False, pad_token_id=PAD_ID)
            assert torch.equal(batch[b, ids.shape[1] - len(row):], alone[0])


@pytest.mark.parametrize("name,fields", [MODELS[0], MODELS[4], MODELS[6]], ids=["gam", "transformer", "mamba"])
def test_pipeline_batch_size_2_equals_one_at_a_time(name, fields):
    pytest.importorskip("transformers")
    from transformers import pipeline

    from gam.hf import GAMForCausalLM, hf_tokenizer
    from test_generation import make_tokenizer

    tok = hf_tokenizer(make_tokenizer())
    tok.padding_side = "left"
    hf = GAMForCausalLM.from_gam(tiny(name, **{**fields, "vocab_size": len(tok)}))
    hf.generation_config.pad_token_id = tok.pad_token_id
    generator = pipeline("text-generation", model=hf, tokenizer=tok, device="cpu")
    texts = ["the cat sat on the mat and", "a dog", "the bird sang a song in the park"]
    settings = dict(max_new_tokens=8, do_sample=False)
    batched = generator(texts, batch_size=2, **settings)
    alone = [generator(text, **settings) for text in texts]
    assert [out[0]["generated_text"] for out in batched] == [out[0]["generated_text"] for out in alone]
    assert all(len(out[0]["generated_text"]) > len(text) for out, text in zip(alone, texts))


@pytest.mark.parametrize("name,fields", [MODELS[0], MODELS[4], MODELS[6]], ids=["gam", "transformer", "mamba"])
def test_hf_beam_search_on_a_padded_batch_equals_one_at_a_time(name, fields):
    """Beam search expands the padded prompt and reorders the cache rows (states, KV key mask)."""
    pytest.importorskip("transformers")
    from gam.hf import GAMForCausalLM

    hf = GAMForCausalLM.from_gam(tiny(name, **fields))
    rows = prompts()
    ids, mask = left_pad(rows)
    settings = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD_ID)
    batch = hf.generate(ids, attention_mask=mask, **settings)
    for b, row in enumerate(rows):
        assert torch.equal(batch[b, ids.shape[1] - len(row):], hf.generate(row[None], **settings)[0])
