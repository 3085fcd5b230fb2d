"""The kv-slot GAM's delta-rule write (memory_write="delta"): the chunked (WY)
form equals the recurrence (outputs and gradients, fp64 finite differences,
bf16 by relative RMS), the write replaces what a key holds, and the block has
no bank, trains every parameter, compiles whole and decodes from a constant state."""

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_rms
from gam import GAMConfig, build_model
from gam.layers.gam import GAMBlock
from gam.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent, delta_rule_step

TINY = dict(vocab_size=50, block_size=64, n_embd=16, n_layer=2, memory_heads=2, dropout=0.0,
            memory="kv_slots", memory_write="delta")


def inputs(B=2, T=21, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, shift=0.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype) + shift).requires_grad_()

    q, k, v = leaf(B, T, d), leaf(B, T, d), leaf(B, T, d)
    z, b = leaf(B, T, scale=2.0, shift=1.0), leaf(B, T)
    S0 = leaf(B, d, d, scale=0.5)
    return q, k, v, z, b, S0


def run(form, q, k, v, z, b, S0, **kw):
    """The op on unit keys, a forget gate and a write strength in (0, 1), as the layer feeds it."""
    out, S = form(q, F.normalize(k, dim=-1), v, F.logsigmoid(z) / 2, torch.sigmoid(b), S0, **kw)
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (out, S))
    return (out, S), torch.autograd.grad(loss, (q, k, v, z, b, S0))


@pytest.mark.parametrize("T,chunk", [(16, 4), (21, 4), (21, 8), (5, 8), (33, 16), (1, 4), (40, 1), (64, 32)])
def test_chunked_matches_recurrent_outputs_and_gradients(T, chunk):
    x = inputs(T=T)
    ref, ref_grads = run(delta_rule_recurrent, *x)
    got, got_grads = run(delta_rule_chunked, *x, chunk_size=chunk)
    for a, b in zip(got + got_grads, ref + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_passes_gradcheck_in_fp64():
    q, k, v, z, b, S0 = inputs(B=1, T=7, d=3, dtype=torch.float64)

    def op(q, k, v, z, b, S0):
        return delta_rule_chunked(q, F.normalize(k, dim=-1), v, F.logsigmoid(z), torch.sigmoid(b), S0, chunk_size=3)

    assert torch.autograd.gradcheck(op, (q, k, v, z, b, S0))


def test_bf16_chunked_is_close_to_the_fp32_reference():
    x = inputs(T=37)
    ref, _ = delta_rule_recurrent(x[0], F.normalize(x[1], dim=-1), x[2], F.logsigmoid(x[3]), torch.sigmoid(x[4]), x[5])
    low = [t.detach().bfloat16() for t in x]
    out, S = delta_rule_chunked(low[0], F.normalize(low[1], dim=-1), low[2], F.logsigmoid(low[3]),
                                torch.sigmoid(low[4]), low[5], chunk_size=16)
    assert out.dtype == S.dtype == torch.bfloat16
    assert rel_rms(out, ref) < 2e-2


def test_the_write_replaces_what_a_key_holds():
    """Two writes under one key with beta = 1: the key reads the second value, not a
    mix (the slot memory and linear attention add); another key's value is untouched."""
    d = 4
    k1, k2 = torch.eye(d)[0], torch.eye(d)[1]
    v1, v2, w = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 5.0, 0, 0]), torch.tensor([0, 0, 3.0, 0])
    S = torch.zeros(1, d, d)
    zero, one = torch.zeros(1), torch.ones(1)
    for key, value in ((k1, v1), (k2, w), (k1, v2)):
        read, S = delta_rule_step(key[None], key[None], value[None], zero, one, S)
    torch.testing.assert_close(read[0], v2)
    torch.testing.assert_close(delta_rule_step(k2[None], k2[None], w[None], zero, torch.zeros(1), S)[0][0], w)


def test_chunk_size_is_checked():
    x = [t.detach() for t in inputs(T=4)]
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_chunked(*x, chunk_size=0)


def test_block_has_no_bank_and_its_own_parameters():
    kv = build_model("gam", **TINY)
    names = {n for n, _ in kv.named_parameters()}
    assert not any("memory_bank" in n for n in names)
    assert {n.split("kv_memory.")[1] for n in names if "kv_memory" in n} == {
        "query.weight", "key.weight", "value.weight", "forget.weight", "forget.bias",
        "write_strength.weight", "write_strength.bias", "norm.weight", "out.weight"}
    assert kv.blocks[0].kv_memory.forget.out_features == 2  # one gate per head


def test_block_chunked_matches_reference_recurrence():
    """(Training, every parameter reached: tests/test_kv_memory.py, both write rules.)"""
    torch.manual_seed(0)
    block = GAMBlock(GAMConfig(**{k: v for k, v in TINY.items() if k not in ("vocab_size",)}))
    block.kv_memory.chunk_size = 4
    x = torch.randn(2, 19, 16)
    h = block.ln1(x)
    local = block.local_context(h)
    torch.testing.assert_close(block.kv_memory(h, local), block.kv_memory(h, local, reference=True),
                               atol=1e-5, rtol=0)


def test_block_compiles_without_graph_breaks():
    torch.manual_seed(0)
    block = GAMBlock(GAMConfig(**{k: v for k, v in TINY.items() if k != "vocab_size"}))
    x = torch.randn(2, 21, 16, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    g = torch.randn(eager.shape)
    leaves = (x, block.kv_memory.write_strength.weight, block.kv_memory.key.weight)
    for a, b in zip(torch.autograd.grad(compiled, leaves, g), torch.autograd.grad(eager, leaves, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cached_decoding_keeps_a_constant_state_and_hf_generates_the_same():
    from gam.hf import GAMForCausalLM, GAMHFConfig

    torch.manual_seed(0)
    model = build_model("gam", **TINY).eval()
    idx = torch.randint(0, 50, (3, 30))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.allocate_inference_cache(3, 64)
        size = cache.nbytes()
        steps = torch.cat([model.forward_cached(idx[:, :11], cache), model.forward_cached(idx[:, 11:], cache)], 1)
    assert cache.nbytes() == size
    assert cache.layers[0]["delta_state"].shape == (3, 2, 8, 8)  # heads x d x d
    torch.testing.assert_close(steps, full, atol=2e-5, rtol=0)
    hf_model = GAMForCausalLM(GAMHFConfig(**TINY)).eval()
    prompt = torch.randint(0, 50, (1, 8))
    assert torch.equal(hf_model.generate(prompt, max_new_tokens=5, do_sample=False),
                       hf_model.model.generate(prompt, 5, temperature=0))
