"""The opt-in key-value slot memory (memory="kv_slots"): chunked == recurrent
(outputs and gradients; the hand-written backward also against fp64 finite
differences and the autograd form, over tiles and through the gate's clamp),
causality, padding writes nothing, cached decoding == the full forward, HF
export, torch.compile without graph breaks, and the binding itself on a
hand-built recall."""

import math

import pytest
import torch
import torch.nn.functional as F

import gam.ops.kv_memory as kv_ops
from conftest import rel_rms
from gam import ConfigError, GAMConfig, build_model
from gam.layers.gam import GAMBlock
from gam.ops.kv_memory import (
    LOG_ALPHA_MIN,
    MAX_CHUNK,
    KVMemoryChunked,
    kv_memory_chunked,
    kv_memory_chunked_autograd,
    kv_memory_final_state,
    kv_memory_recurrent,
)


def inputs(B=2, T=21, d=8, S=6, seed=0, gate_scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, shift=0.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype) + shift).requires_grad_()

    q, k, v = leaf(B, T, d), leaf(B, T, d), leaf(B, T, d)
    z = leaf(B, T, S, scale=gate_scale, shift=1.0)
    K0, V0 = leaf(B, S, d), leaf(B, S, d)
    return q, k, v, z, K0, V0


def outputs_and_grads(fn, q, k, v, z, K0, V0, **kw):
    out, (K, V) = fn(q, k, v, F.logsigmoid(z), (K0, V0), **kw)
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (out, K, V))
    return (out, K, V), torch.autograd.grad(loss, (q, k, v, z, K0, V0))


@pytest.mark.parametrize("T,chunk", [(16, 4), (21, 4), (21, 8), (5, 8), (32, 16), (33, 16), (1, 4), (40, 1),
                                     (64, 32), (45, 32), (20, 32)])
def test_chunked_matches_recurrent_outputs_and_gradients(T, chunk):
    args = inputs(T=T)
    ref_out, ref_grads = outputs_and_grads(kv_memory_recurrent, *args)
    got_out, got_grads = outputs_and_grads(kv_memory_chunked, *args, chunk_size=chunk)
    for a, b, name in zip(got_out, ref_out, ("reads", "key slots", "value slots")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"{name} differ")
    for a, b, name in zip(got_grads, ref_grads, ("q", "k", "v", "gate", "K0", "V0")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"gradient of {name}")


@pytest.mark.parametrize("T,chunk", [(21, 4), (5, 8), (33, 16), (45, 32)])
def test_autograd_chunked_form_matches_recurrent(T, chunk):
    """The plain-PyTorch chunk form, the reference of the hand-written backward."""
    args = inputs(T=T)
    ref_out, ref_grads = outputs_and_grads(kv_memory_recurrent, *args)
    got_out, got_grads = outputs_and_grads(kv_memory_chunked_autograd, *args, chunk_size=chunk)
    for a, b in zip(got_out + got_grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def clamped_gates(B, T, S, seed=0, dtype=torch.float64):
    """log alpha on both sides of the clamp's bounds, none within 1e-3 of them (so that
    finite differences do not straddle a kink): 0.3 of them below LOG_ALPHA_MIN, a few
    above 0 (clamped to 0: no gradient)."""
    g = torch.Generator().manual_seed(seed)
    log_alpha = LOG_ALPHA_MIN * 1.5 * torch.rand(B, T, S, generator=g, dtype=dtype) - 1e-2
    log_alpha = torch.where((log_alpha - LOG_ALPHA_MIN).abs() < 1e-3, log_alpha - 2e-3, log_alpha)
    log_alpha[:, ::5, 0] = 0.3
    return log_alpha.requires_grad_()


@pytest.mark.parametrize("T,chunk,tile", [(7, 3, None), (2, 4, None), (16, 16, None), (40, 32, None), (9, 4, 4 * 4),
                                          (9, 2, 64)])
def test_hand_written_backward_passes_gradcheck(T, chunk, tile, monkeypatch):
    """fp64 finite differences through every input, the initial state and into the final
    state, across the clamp; ``tile`` (elements): tiles of one row by one chunk, of two rows
    by four chunks (there the fast mode, random projections of the Jacobian: the full one
    takes seconds)."""
    if tile is not None:
        monkeypatch.setattr(kv_ops, "TILE_ELEMENTS", tile)
    B, d, S = 2, 3, 4
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    initial = torch.randn(B, S, 2 * d, generator=g, dtype=torch.float64, requires_grad=True)
    log_alpha = clamped_gates(B, T, S, seed=T)
    assert torch.autograd.gradcheck(lambda *x: KVMemoryChunked.apply(*x, chunk), (q, k, v, log_alpha, initial),
                                    fast_mode=tile is not None)


def test_hand_written_backward_equals_autograd_through_the_clamp():
    """fp64, gates on both sides of the bounds: the same gradients as autograd through the
    chunk form (zero where the clamp binds), including the final state's and over tiles."""
    B, T, d, S = 3, 19, 5, 6
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    K0, V0 = (torch.randn(B, S, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    log_alpha = clamped_gates(B, T, S)
    leaves = (q, k, v, log_alpha, K0, V0)
    results = []
    for form in (kv_memory_chunked_autograd, kv_memory_chunked):
        out, (K, V) = form(q, k, v, log_alpha, (K0, V0), chunk_size=4)
        weights = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum() for t in (out, K, V))
        results.append((out, K, V, *torch.autograd.grad(loss, leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    d_log_alpha = results[1][6]
    outside = (log_alpha < LOG_ALPHA_MIN) | (log_alpha > 0)
    assert outside.any() and (d_log_alpha[outside] == 0).all() and (d_log_alpha[~outside] != 0).all()


def test_tile_size_follows_the_l2_cache_and_never_changes_the_results(monkeypatch, tmp_path):
    """The tile holds one L2-sized fp32 tensor (a power of two of elements, from sysfs; 512 KiB
    when unreadable), and any tile size gives bitwise the same outputs and gradients: it is a
    speed knob only."""
    assert kv_ops.TILE_ELEMENTS & (kv_ops.TILE_ELEMENTS - 1) == 0 and 2**15 <= kv_ops.TILE_ELEMENTS <= 2**20
    assert kv_ops.l2_cache_bytes(default=123) > 0
    fake = tmp_path / "cache"
    for index, (level, size) in enumerate([("1", "48K"), ("2", "2048K"), ("3", "30M")]):
        (fake / f"index{index}").mkdir(parents=True)
        (fake / f"index{index}" / "level").write_text(level + "\n")
        (fake / f"index{index}" / "size").write_text(size + "\n")
    monkeypatch.setattr(kv_ops, "Path", lambda _: fake)
    assert kv_ops.l2_cache_bytes() == 2 * 1024**2
    monkeypatch.setattr(kv_ops, "Path", lambda _: tmp_path / "missing")
    assert kv_ops.l2_cache_bytes() == 512 * 1024
    monkeypatch.undo()
    torch.manual_seed(0)
    R, T, d, S = 6, 70, 8, 16
    q, k, v = (torch.randn(R, T, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    log_alpha = (torch.rand(R, T, S) * -0.5).requires_grad_()
    state = torch.randn(R, S, 2 * d, requires_grad=True)
    results = []
    for tile in (S * 32, S * 32 * 2, 2**20):  # tiles of one row by one chunk, one row by two chunks, all
        monkeypatch.setattr(kv_ops, "TILE_ELEMENTS", tile)
        out, (K, V) = kv_memory_chunked(q, k, v, log_alpha, (state[..., :d], state[..., d:]))
        loss = (out.float() ** 2).sum() + K.sum() + V.sum()
        results.append([out, K, V, *torch.autograd.grad(loss, (q, k, v, log_alpha, state))])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("tile", [6 * 4, 6 * 4 * 2, 6 * 4 * 6 * 2])
def test_tiles_give_the_recurrent_outputs_and_gradients(tile, monkeypatch):
    """Tiles of one row by one chunk, one row by two chunks, three rows by four chunks
    (S = 6, chunk 4: 5 rows of 6 chunks)."""
    monkeypatch.setattr(kv_ops, "TILE_ELEMENTS", tile)
    args = inputs(B=5, T=21)
    ref_out, ref_grads = outputs_and_grads(kv_memory_recurrent, *args)
    got_out, got_grads = outputs_and_grads(kv_memory_chunked, *args, chunk_size=4)
    for a, b in zip(got_out + got_grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", [kv_memory_chunked, kv_memory_chunked_autograd])
@pytest.mark.parametrize("T,chunk,shift", [(19, 8, 1.0), (70, MAX_CHUNK, 1.0), (70, MAX_CHUNK, -60.0)])
def test_chunked_matches_recurrent_with_saturated_gates(form, T, chunk, shift):
    """Gates from ~1 to ~e^-60, where the bound applies; with ``shift`` -60 every gate
    sits at the bound for whole chunks of MAX_CHUNK tokens, the factorization's widest
    exponents (half a chunk times the bound each way)."""
    q, k, v, z, K0, V0 = inputs(T=T, gate_scale=30.0)
    z = (z + shift).detach().requires_grad_()
    ref, (rK, rV) = kv_memory_recurrent(q, k, v, F.logsigmoid(z), (K0, V0))
    out, (K, V) = form(q, k, v, F.logsigmoid(z), (K0, V0), chunk_size=chunk)
    # fp32 on values of order 1: a chunk's sums span factors up to e^64 each way (1.3e-5 measured at 32)
    atol = 1e-5 if chunk <= 16 else 3e-5
    for a, b in ((out, ref), (K, rK), (V, rV)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    got = torch.autograd.grad(out.sum(), (q, k, v, z))
    want = torch.autograd.grad(ref.sum(), (q, k, v, z))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_chunk_size_beyond_the_factorization_range_is_refused():
    q, k, v, z, K0, V0 = inputs(T=40)
    with pytest.raises(ValueError, match="chunk_size"):
        kv_memory_chunked(q, k, v, F.logsigmoid(z), (K0, V0), chunk_size=MAX_CHUNK + 1)


@pytest.mark.parametrize("form,bound", [(kv_memory_chunked, 1e-2), (kv_memory_chunked_autograd, 3e-2)])
def test_bf16_chunked_is_close_to_the_fp32_reference(form, bound):
    """bf16 inputs and state: outputs within 2% relative RMS of the fp32 recurrence,
    gradients within ``bound`` (the autograd form's state gradient carries bf16
    rounding: 2.0%; the hand-written form's worst, the gates', 0.65%: its in-chunk
    products with the decay factors run in fp32); the gates' cumulative sums stay fp32 inside."""
    fp32 = inputs(T=45, d=16, S=12)
    low = [t.detach().bfloat16().requires_grad_() for t in fp32]
    (ref, *_), ref_grads = outputs_and_grads(kv_memory_recurrent, *fp32)
    (out, *_), grads = outputs_and_grads(form, *low)
    assert out.dtype == torch.bfloat16 and rel_rms(out, ref) < 2e-2
    for a, b, name in zip(grads, ref_grads, ("q", "k", "v", "gate", "K0", "V0")):
        assert rel_rms(a, b) < bound, name


def test_bf16_autocast_with_an_fp32_state_as_the_layer_runs_it():
    """Under bf16 autocast with fp32 q, k, v and state (the layer: the state is the fp32
    memory bank): bf16 reads, an fp32 final state, gradients of the inputs' dtypes,
    all within 2% relative RMS of the fp32 recurrence, a T that is not a multiple of the chunk."""
    args = inputs(T=37, d=16, S=12)
    (ref, *ref_state), ref_grads = outputs_and_grads(kv_memory_recurrent, *args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, *state), grads = outputs_and_grads(kv_memory_chunked, *args)
    assert out.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in state)
    assert rel_rms(out, ref) < 2e-2 and all(rel_rms(a, b) < 2e-2 for a, b in zip(state, ref_state))
    for a, b, x, name in zip(grads, ref_grads, args, ("q", "k", "v", "gate", "K0", "V0")):
        assert a.dtype == x.dtype and rel_rms(a, b) < 2e-2, name


def test_the_factors_the_backward_rebuilds_from_what_it_keeps_are_the_forwards_bit_for_bit():
    # KVMemoryChunked keeps the results of the forward's exp passes and rebuilds the other
    # decay factors by the same products: the backward must see exactly the forward's values
    gates = kv_ops.bounded_gate(F.logsigmoid(3 * torch.randn(3, 4, 32, 6) + 1)).view(3, 4, 32, 6)
    with torch.no_grad():
        f = kv_ops.chunk_decays(gates)
        rebuilt = kv_ops.Decays.from_kept(f.centered, f.u, f.decay)
    for name in kv_ops.Decays._fields:
        assert torch.equal(getattr(rebuilt, name), getattr(f, name)), name


def test_final_state_matches_recurrent():
    q, k, v, z, K0, V0 = inputs(T=23)
    _, (K, V) = kv_memory_recurrent(q, k, v, F.logsigmoid(z), (K0, V0))
    fK, fV = kv_memory_final_state(k, v, F.logsigmoid(z), (K0, V0))
    torch.testing.assert_close(fK, K, atol=1e-5, rtol=0)
    torch.testing.assert_close(fV, V, atol=1e-5, rtol=0)


def test_the_shared_write_binds_keys_to_values():
    """Two pairs written into two slots (one-hot gates): the query of either key reads
    its own value, which the tied design (one matrix for keys and values) cannot do."""
    d, S = 4, 2
    keys = torch.eye(d)[:2] * 10.0
    values = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    never, always = -1e4, 1e4  # logit of the write weight 1 - alpha
    z = torch.tensor([[always, never], [never, always]])  # token j writes slot j only
    log_alpha = F.logsigmoid(-z).unsqueeze(0)
    q = keys.unsqueeze(0)
    state = (torch.zeros(1, S, d), torch.zeros(1, S, d))
    _, slots = kv_memory_recurrent(q, keys.unsqueeze(0), values.unsqueeze(0), log_alpha, state)
    log_keep = torch.zeros(1, 2, S)  # read without writing
    reads, _ = kv_memory_chunked(q, q, q, log_keep, slots, chunk_size=2)
    written = 1 - math.exp(LOG_ALPHA_MIN)  # the bounded gate replaces at most this share of a slot
    torch.testing.assert_close(reads[0], written * values, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- in the model

TINY = dict(vocab_size=50, block_size=64, n_embd=16, n_layer=2, num_memory_slots=6, memory_heads=2,
            dropout=0.0)


def test_config_field_and_validation():
    assert GAMConfig(memory="kv_slots").memory_heads == 4
    with pytest.raises(ConfigError, match="memory_heads"):
        GAMConfig(memory="kv_slots", n_embd=30, memory_heads=4)
    with pytest.raises(ConfigError, match="memory_heads"):
        GAMConfig(memory="kv_slots", memory_heads=0)
    with pytest.raises(ConfigError, match="local_only"):
        GAMConfig(memory="kv_slots", variant="local_only")
    with pytest.raises(ConfigError, match="removed"):  # the tied-slot memory it replaced
        GAMConfig(memory="causal")
    with pytest.raises(ConfigError, match="memory_key_source must be one of"):
        GAMConfig(memory="kv_slots", memory_key_source="previous")
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ConfigError, match="memory_gate_normalizer"):
            GAMConfig(memory="kv_slots", memory_gate_normalizer=bad)
    with pytest.raises(ConfigError, match="memory_output_gate"):
        GAMConfig(memory="kv_slots", memory_output_gate="yes")
    with pytest.raises(ConfigError, match="memory_write must be one of"):
        GAMConfig(memory="kv_slots", memory_write="overwrite")
    with pytest.raises(ConfigError, match="memory_feature_map must be one of"):
        GAMConfig(memory="kv_slots", memory_feature_map="relu")
    for low, high in ((1.0, 8.0), (64.0, 8.0), (4.0, float("inf")), (True, 8.0)):
        with pytest.raises(ConfigError, match="memory_retention_min and memory_retention_max"):
            GAMConfig(memory="kv_slots", memory_retention_min=low, memory_retention_max=high)


# The design choices the ablation varies (issue 24), each a config field
DESIGNS = {"keys_input": {"memory_key_source": "input"}, "keys_shift": {"memory_key_source": "shift"},
           "normalizer_8": {"memory_gate_normalizer": 8.0}, "output_gate": {"memory_output_gate": True},
           "delta": {"memory_write": "delta"}, "delta_keys_shift": {"memory_write": "delta", "memory_key_source": "shift"},
           "swish": {"memory_feature_map": "swish"}, "delta_swish": {"memory_write": "delta", "memory_feature_map": "swish"},
           "retention_long": {"memory_retention_min": 16.0, "memory_retention_max": 2048.0}}


@pytest.mark.parametrize("design", DESIGNS)
def test_design_choices_decode_as_they_train_and_stay_causal(design):
    """Each ablated design: decoding (prefill, then steps) equals the full forward, a padded
    row equals itself alone, and no position sees a later token."""
    torch.manual_seed(0)
    model = build_model("gam", memory="kv_slots", **TINY, **DESIGNS[design]).eval()
    idx = torch.randint(1, 50, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.allocate_inference_cache(2, 32)
        steps = torch.cat([model.forward_cached(idx[:, :7], cache), model.forward_cached(idx[:, 7:], cache)], 1)
        changed = idx.clone()
        changed[:, 12:] = changed[:, 12:] % 49 + 1
        later, _ = model(changed)
        mask = torch.tensor([[0, 0, 0] + [1] * 20])
        padded = model(torch.cat([torch.ones(1, 3, dtype=torch.long), idx[:1]], 1), attention_mask=mask)[0][:, 3:]
    torch.testing.assert_close(steps, full, atol=2e-5, rtol=0)
    torch.testing.assert_close(later[:, :12], full[:, :12], atol=1e-6, rtol=0)
    torch.testing.assert_close(padded, full[:1], atol=1e-5, rtol=0)


def test_design_choices_change_what_they_say():
    """The key source is what the keys read; the normalizer divides the gate; the output
    gate adds one C x C projection per layer."""
    torch.manual_seed(0)
    h = torch.randn(1, 5, 16)
    local = torch.randn(1, 5, 16)
    blocks = {name: GAMBlock(GAMConfig(**TINY, memory="kv_slots", **fields)) for name, fields in DESIGNS.items()}
    assert torch.equal(blocks["keys_input"].keys_from(h, local), h)
    shifted = blocks["keys_shift"].keys_from(h, local)
    assert torch.equal(shifted[:, 1:], h[:, :-1]) and not shifted[:, 0].any()
    assert torch.equal(GAMBlock(GAMConfig(**TINY, memory="kv_slots")).keys_from(h, local), local)
    assert blocks["normalizer_8"].kv_memory.gate_normalizer == 8.0
    z = torch.randn(1, 5, 16)
    for block, normalizer in ((blocks["normalizer_8"], 8.0), (blocks["keys_input"], 1.0)):
        memory = block.kv_memory
        expected = F.logsigmoid(F.linear(z, memory.forget.weight, memory.forget.bias)) / normalizer
        log_alpha = memory.inputs(z, z)[3]
        torch.testing.assert_close(log_alpha, expected.view(1, 5, 2, 6).transpose(1, 2))  # (B, H, T, S) views
    # the feature map: swish on the projected queries and keys, before the heads split
    memory, plain_memory = blocks["swish"].kv_memory, blocks["keys_input"].kv_memory
    q, k = memory.inputs(z, z)[:2]
    heads = memory._head_views
    torch.testing.assert_close(q, heads(F.silu(F.linear(z, memory.query.weight))) * memory.head_dim ** -0.5)
    torch.testing.assert_close(k, heads(F.silu(F.linear(z, memory.key.weight))))
    assert plain_memory.feature_map is None
    plain = build_model("gam", memory="kv_slots", **TINY)
    gated = build_model("gam", memory="kv_slots", memory_output_gate=True, **TINY)
    extra = {n for n, _ in gated.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert extra == {f"blocks.{i}.kv_memory.out_gate.weight" for i in range(2)}


def test_static_default_unchanged_and_kv_slots_adds_its_own_parameters():
    static = build_model("gam", **TINY)
    kv = build_model("gam", memory="kv_slots", **TINY)
    extra = {n for n, _ in kv.named_parameters()} - {n for n, _ in static.named_parameters()}
    names = ("query.weight", "key.weight", "value.weight", "forget.weight", "forget.bias",
             "norm.weight", "out.weight")
    assert extra == {f"blocks.{i}.kv_memory.{p}" for i in range(2) for p in names}
    assert kv.blocks[0].kv_memory.forget.out_features == 2 * 6  # heads x slots


@pytest.mark.parametrize("variant", ["full", "sum_fusion", "global_only"])
def test_block_chunked_matches_reference_recurrence(variant):
    torch.manual_seed(0)
    block = GAMBlock(GAMConfig(**TINY, memory="kv_slots", variant=variant))
    block.kv_memory.chunk_size = 4
    x = torch.randn(2, 19, 16, requires_grad=True)
    fast = block(x)
    h = block.ln1(x)
    local = block.local_context(h) if block.has_local else h
    mem = block.kv_memory
    reads = mem(h, local, block.memory_bank, reference=True)
    chunked = mem(h, local, block.memory_bank)
    torch.testing.assert_close(chunked, reads, atol=1e-5, rtol=0)
    g_fast = torch.autograd.grad(fast.sum(), x, retain_graph=True)[0]
    assert torch.isfinite(g_fast).all()


@pytest.mark.parametrize("variant,slots", [("full", 6), ("global_only", 6), ("full", 16), ("global_only", 16)])
def test_kv_slot_block_compiles_without_graph_breaks(variant, slots, monkeypatch):
    """torch._dynamo.explain of the block's forward: one graph, no break (6 slots: the
    hand-written Function traced whole, one tile; 16: the fused kernel's custom op, where
    it is built, inside the graph: in the full mixer's function, or alone in the read of
    global_only). Compiled with fullgraph and AOT autograd on the eager
    backend (no C++ compiler needed), so that its backward is traced too: outputs and
    gradients equal the eager block's."""
    monkeypatch.setattr(kv_ops, "CPU_CAPABILITY", kv_ops.FUSED_CPU_CAPABILITY)  # the kernel on any host
    torch.manual_seed(0)
    block = GAMBlock(GAMConfig(**{**TINY, "num_memory_slots": slots}, memory="kv_slots", variant=variant))
    x = torch.randn(2, 21, 16, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    nodes = [str(node.target) for graph in explained.graphs for module in graph.modules()  # with subgraphs
             if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes]
    assert any("kv_memory_fused" in n for n in nodes) == kv_ops.fused_applies(x, slots)
    leaves = (x, block.memory_bank, block.kv_memory.forget.weight, block.kv_memory.query.weight)
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    g = torch.randn(eager.shape)
    for a, b in zip(torch.autograd.grad(compiled, leaves, g), torch.autograd.grad(eager, leaves, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_model_is_causal_and_global():
    torch.manual_seed(0)
    model = build_model("gam", memory="kv_slots", **TINY).eval()
    idx = torch.randint(0, 50, (1, 40))
    changed = idx.clone()
    changed[0, 25:] = (changed[0, 25:] + 1) % 50
    early = idx.clone()
    early[0, 2] = (early[0, 2] + 1) % 50
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
        c, _ = model(early)
    torch.testing.assert_close(a[:, :25], b[:, :25], atol=1e-6, rtol=0)
    assert (a[:, 25:] - b[:, 25:]).abs().amax() > 1e-4
    assert (a[:, 39] - c[:, 39]).abs().amax() > 1e-5  # token 2 reaches position 39 (paper GAM: 5 tokens)


def test_padding_writes_nothing():
    torch.manual_seed(0)
    model = build_model("gam", memory="kv_slots", **TINY).eval()
    idx = torch.randint(1, 50, (2, 12))
    pad = 5
    padded = torch.cat([torch.randint(1, 50, (2, pad)), idx], dim=1)
    mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, _ = model(idx)
        batched = model(padded, attention_mask=mask)[0][:, pad:]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["full", "sum_fusion", "global_only"])
def test_cached_decoding_equals_full_forward(variant):
    torch.manual_seed(0)
    model = build_model("gam", memory="kv_slots", variant=variant, **TINY).eval()
    idx = torch.randint(0, 50, (3, 30))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.allocate_inference_cache(3, 64)
        size = cache.nbytes()
        a = model.forward_cached(idx[:, :11], cache)  # prefill
        b = model.forward_cached(idx[:, 11:], cache)  # one step per token
        assert cache.nbytes() == size  # constant-size state
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=2e-5, rtol=0)
    assert cache.layers[0]["key_slots"].shape == (3, 2, 6, 8)  # heads x slots x C/heads


def test_padded_prompt_then_steps_equal_each_row_alone():
    torch.manual_seed(0)
    model = build_model("gam", memory="kv_slots", **TINY).eval()
    short = torch.randint(1, 50, (1, 7))
    long = torch.randint(1, 50, (1, 10))
    prompt = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(10) >= torch.tensor([[3], [0]])).long()
    out = model.generate(prompt, 6, temperature=0, attention_mask=mask)
    alone = model.generate(short, 6, temperature=0)
    assert torch.equal(out[0, 3:], alone[0])
    assert torch.equal(out[1], model.generate(long, 6, temperature=0)[0])


def test_hf_export_and_generate():
    from gam.hf import GAMForCausalLM, GAMHFConfig

    torch.manual_seed(0)
    config = GAMHFConfig(**TINY, memory="kv_slots")
    hf_model = GAMForCausalLM(config).eval()
    idx = torch.randint(0, 50, (1, 8))
    out = hf_model.generate(idx, max_new_tokens=5, do_sample=False)
    ours = hf_model.model.generate(idx, 5, temperature=0)
    assert torch.equal(out, ours)


@pytest.mark.parametrize("write", ["slots", "delta"])
def test_training_step_decreases_loss_and_reaches_every_parameter(write):
    """It trains, and every parameter of the memory gets a gradient (both write rules)."""
    torch.manual_seed(0)
    model = build_model("gam", memory="kv_slots", memory_write=write, **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 50, (4, 32))
    losses = []
    for _ in range(5):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "kv_memory" in n or "memory_bank" in n)


@pytest.mark.parametrize("retention", [None, (16.0, 2048.0)])
def test_forget_bias_starts_slots_at_log_spaced_retention_times(retention):
    from gam.layers.kv_memory import RETENTION_TOKENS, KVSlotMemory

    low, high = retention or RETENTION_TOKENS
    mem = KVSlotMemory(n_embd=32, num_slots=5, num_heads=2, retention=(low, high))
    alpha = torch.sigmoid(mem.forget.bias.double()) ** (1 / mem.gate_normalizer)
    measured = (1 / (1 - alpha)).view(2, 5)
    expected = torch.logspace(math.log10(low), math.log10(high), 5, dtype=torch.float64)
    assert torch.allclose(measured, expected.expand(2, 5), rtol=1e-4)
    # the model builder keeps it (nothing re-initializes the biases afterwards)
    fields = {} if retention is None else {"memory_retention_min": low, "memory_retention_max": high}
    model = build_model("gam", vocab_size=64, block_size=16, n_embd=32, n_layer=1, memory="kv_slots",
                        memory_heads=2, num_memory_slots=5, **fields)
    biases = [m.forget.bias for m in model.modules() if isinstance(m, KVSlotMemory)]
    assert biases and all(torch.equal(b, mem.forget.bias) for b in biases)


def test_bench_kv_memory_script_times_both_forms_and_checks_the_recurrence():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kv_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--batch-heads", "2", "--dim", "8", "--slots", "4",
                           "--lengths", "20,48", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = proc.stdout.split("max relative error vs the recurrence (outputs and gradients, T <= 40, fp32): ")[1]
    errors = dict(e.rsplit(" ", 1) for e in errors.splitlines()[0].split(", "))
    assert set(errors) == {"autograd", "hand-written"} and all(float(e) < 1e-5 for e in errors.values())
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "ms" not in line]
    assert [(r[0], r[1]) for r in rows] == [("20", "autograd"), ("20", "hand-written"),
                                            ("48", "autograd"), ("48", "hand-written")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[5]) > 0 and r[6].endswith("x") for r in rows)
    assert float(rows[3][5]) < float(rows[2][5])  # kept for backward: the hand-written form keeps less
    bf16 = subprocess.run([sys.executable, str(script), "--batch-heads", "2", "--dim", "8", "--slots", "4",
                           "--lengths", "20", "--repeats", "1", "--dtype", "bf16", "--forms", "hand-written"],
                          capture_output=True, text=True, timeout=300)
    assert bf16.returncode == 0 and "| 20 | hand-written |" in bf16.stdout and "bf16" in bf16.stdout, bf16.stderr
    bad = subprocess.run([sys.executable, str(script), "--lengths", "long"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lengths must be comma-separated integers" in bad.stderr
    if kv_ops.fused_kernel() is not None:  # the fused kernel's form: checked against the recurrence too
        fused = subprocess.run([sys.executable, str(script), "--batch-heads", "2", "--dim", "8", "--slots", "16",
                                "--lengths", "20", "--repeats", "1", "--forms", "hand-written,fused"],
                               capture_output=True, text=True, timeout=300)
        assert fused.returncode == 0, fused.stderr[-2000:]
        error = fused.stdout.split("fp32): ")[1].splitlines()[0].split("fused ")[1]
        assert float(error) < 1e-5 and "| 20 | fused |" in fused.stdout
    wrong = subprocess.run([sys.executable, str(script), "--slots", "4", "--forms", "fused", "--lengths", "8"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "form 'fused' cannot run" in wrong.stderr
    if kv_ops.tiles_available():  # the kernel's two forms side by side in bf16, each checked against fp64
        forms = subprocess.run([sys.executable, str(script), "--batch-heads", "2", "--dim", "48", "--slots", "16",
                                "--lengths", "40", "--repeats", "1", "--dtype", "bf16", "--forms", "recurrence,tiles"],
                               capture_output=True, text=True, timeout=300)
        assert forms.returncode == 0, forms.stderr[-2000:]
        errors = forms.stdout.split("bf16-rounded inputs): ")[1].splitlines()[0]
        errors = {name: float(e) for name, e in (x.rsplit(" ", 1) for x in errors.split(", "))}
        assert set(errors) == {"recurrence", "tiles"} and all(e < 3e-2 for e in errors.values()), errors
    fp32_tiles = subprocess.run([sys.executable, str(script), "--slots", "16", "--forms", "tiles", "--lengths", "8"],
                                capture_output=True, text=True, timeout=60)
    assert fp32_tiles.returncode == 2 and "form 'tiles' needs --dtype bf16" in fp32_tiles.stderr
