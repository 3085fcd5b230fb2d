"""The opt-in causal memory (memory="causal"): chunked == recurrent, no writes ==
the paper's read, causality, a global receptive field, decoding with constant state."""

import pytest
import torch
import torch.nn.functional as F

from gam import ConfigError, GAMConfig, build_model, count_parameters
from gam.analysis import influence
from gam.layers.gam import GAMBlock
from gam.ops.causal_memory import (auto_chunk_size, causal_memory_chunked, causal_memory_final_state,
                                   causal_memory_recurrent)


def inputs(B=2, T=21, C=8, S=6, seed=0, gate_scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, C, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, T, C, generator=g, dtype=dtype).requires_grad_()
    z = (gate_scale * torch.randn(B, T, S, generator=g, dtype=dtype) + 1.0).requires_grad_()
    M0 = torch.randn(S, C, generator=g, dtype=dtype).requires_grad_()
    return h, v, z, M0


def outputs_and_grads(fn, h, v, z, M0, **kw):
    out, final = fn(h, v, F.logsigmoid(z), M0, **kw)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_fin = torch.randn(final.shape, generator=g, dtype=out.dtype)
    loss = (out * w_out).sum() + (final * w_fin).sum()
    grads = torch.autograd.grad(loss, (h, v, z, M0))
    return out, final, grads


@pytest.mark.parametrize("T,chunk", [(16, 4), (21, 4), (21, 8), (5, 8), (32, 32), (33, 16), (1, 4), (40, 1)])
def test_chunked_matches_recurrent_outputs_and_gradients(T, chunk):
    h, v, z, M0 = inputs(T=T)
    ref = outputs_and_grads(causal_memory_recurrent, h, v, z, M0)
    got = outputs_and_grads(causal_memory_chunked, h, v, z, M0, chunk_size=chunk)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=0)
    for a, b, name in zip(got[2], ref[2], ("h", "v", "gate", "memory_bank")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"gradient of {name}")


def test_chunked_matches_recurrent_from_a_given_state_and_with_extreme_gates():
    h, v, z, M0 = inputs(T=19, gate_scale=30.0)  # alphas from ~1 to ~e^-60: saturated both ways
    state = torch.randn(2, 6, 8)
    ref_out, ref_fin = causal_memory_recurrent(h, v, F.logsigmoid(z), M0, state)
    out, fin = causal_memory_chunked(h, v, F.logsigmoid(z), M0, state, chunk_size=8)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(fin, ref_fin, atol=1e-5, rtol=0)
    ref = torch.autograd.grad(ref_out.sum(), (h, v, z))
    got = torch.autograd.grad(out.sum(), (h, v, z))
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_chunked_gradcheck_float64():
    h, v, z, M0 = inputs(B=1, T=7, C=3, S=2, dtype=torch.float64)
    fn = lambda h, v, z, M0: causal_memory_chunked(h, v, F.logsigmoid(z), M0, chunk_size=3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, v, z, M0))


def test_no_writes_equals_the_papers_read_exactly():
    h, v, _, M0 = inputs(T=13)
    no_write = torch.zeros(2, 13, 6)  # log alpha = 0: alpha = 1, write weight 1 - alpha = 0
    paper = F.softmax(h @ M0.T, dim=-1) @ M0
    for fn in (causal_memory_recurrent, causal_memory_chunked):
        out, final = fn(h, v, no_write, M0)
        torch.testing.assert_close(out, paper, atol=1e-6, rtol=0)
        assert torch.equal(final, M0.expand_as(final))


def test_state_stays_a_convex_combination():
    h, v, z, M0 = inputs(T=50)
    with torch.no_grad():
        M = M0.expand(2, *M0.shape)
        bound = torch.maximum(M0.abs().amax(), v.abs().amax())
        for t in range(1, 51):
            M = causal_memory_final_state(v[:, :t], F.logsigmoid(z[:, :t]), M0)
            assert M.abs().amax() <= bound + 1e-6


def test_final_state_matches_recurrent():
    h, v, z, M0 = inputs(T=23)
    _, ref = causal_memory_recurrent(h, v, F.logsigmoid(z), M0)
    torch.testing.assert_close(causal_memory_final_state(v, F.logsigmoid(z), M0), ref, atol=1e-5, rtol=0)


def test_auto_chunk_size():
    assert auto_chunk_size(64) == 8 and auto_chunk_size(512) in (16, 32) and auto_chunk_size(4) == 8


# ---------------------------------------------------------------- in the model

TINY = dict(vocab_size=50, block_size=64, n_embd=16, n_layer=2, num_memory_slots=12, dropout=0.0)


def test_config_field_and_validation():
    assert GAMConfig().memory == "static"
    assert GAMConfig(memory="causal").memory == "causal"
    with pytest.raises(ConfigError, match="memory"):
        GAMConfig(memory="dynamic")
    with pytest.raises(ConfigError, match="local_only"):
        GAMConfig(memory="causal", variant="local_only")


def test_default_model_parameters_unchanged_and_causal_adds_only_write_projections():
    static = build_model("gam")
    assert not any("causal_memory" in n for n, _ in static.named_parameters())
    assert count_parameters(static)["total"] == 22_599_680
    causal = build_model("gam", memory="causal")
    extra = {n for n, _ in causal.named_parameters()} - {n for n, _ in static.named_parameters()}
    assert extra == {f"blocks.{i}.causal_memory.{p}" for i in range(6)
                     for p in ("value.weight", "forget.weight", "forget.bias")}
    C, S = 512, 512
    assert count_parameters(causal)["total"] - 22_599_680 == 6 * (C * C + C * S + S)


@pytest.mark.parametrize("variant", ["full", "sum_fusion", "global_only"])
def test_block_without_writes_equals_the_paper_block(variant):
    torch.manual_seed(0)
    cfg = GAMConfig(**TINY, variant=variant)
    paper = GAMBlock(cfg)
    causal = GAMBlock(cfg.replace(memory="causal"))
    missing = causal.load_state_dict(paper.state_dict(), strict=False)
    assert all(k.startswith("causal_memory.") for k in missing.missing_keys) and not missing.unexpected_keys
    with torch.no_grad():
        causal.causal_memory.forget.weight.zero_()
        causal.causal_memory.forget.bias.fill_(1e4)  # alpha = sigmoid(1e4) = 1: nothing is written
    x = torch.randn(2, 19, 16)
    torch.testing.assert_close(causal(x), paper.forward_reference(x), atol=1e-6, rtol=0)


def test_causal_model_is_causal_and_sees_the_whole_prefix():
    torch.manual_seed(0)
    model = build_model("gam", memory="causal", **TINY).eval()
    idx = torch.randint(0, 50, (1, 40))
    changed = idx.clone()
    changed[0, 25:] = (changed[0, 25:] + 1) % 50
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :25], b[:, :25], atol=1e-6, rtol=0)
    assert (a[:, 25:] - b[:, 25:]).abs().amax() > 1e-4
    weights = influence(model, 40, 39)
    assert (weights > 0).all()  # every earlier token reaches position 39 (the paper GAM: 5 of 40)
    paper = build_model("gam", **TINY)
    assert int((influence(paper, 40, 39) > 0).sum()) == 5


def test_causal_memory_is_used_under_every_gam_impl():
    torch.manual_seed(0)
    x = torch.randint(0, 50, (2, 20))
    outs = []
    for impl in ("reference", "fast", "auto"):
        torch.manual_seed(0)
        outs.append(build_model("gam", memory="causal", gam_impl=impl, **TINY)(x)[0])
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


@pytest.mark.parametrize("variant", ["full", "global_only"])
def test_decoding_with_constant_state_equals_full_forward(variant):
    torch.manual_seed(0)
    model = build_model("gam", memory="causal", variant=variant, **TINY).eval()
    idx = torch.randint(0, 50, (3, 30))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.allocate_inference_cache(3, 64)
        sizes = cache.nbytes()
        a = model.forward_cached(idx[:, :11], cache)  # prefill
        b = model.forward_cached(idx[:, 11:], cache)  # one step per token
        assert cache.nbytes() == sizes
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=2e-5, rtol=0)
    layer = cache.layers[0]
    assert layer["memory_state"].shape == (3, 12, 16)  # num_memory_slots x C per sequence
