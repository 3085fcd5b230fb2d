"""The kv-slot memory's fused CPU kernel (gam/ops/csrc/kv_memory_cpu.c): outputs and
gradients equal the recurrence's (fp64 reference, fp32 tight, bf16 by relative RMS), over
span boundaries, slot counts and strided inputs; the gate's clamp passes no gradient; the
layer takes it where it applies and the chunked form elsewhere; a missing or failing
compiler leaves the kernel unavailable with its reason, never a traceback."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import gam.ops.fused_block as fused_block
import gam.ops.kv_memory as kv_ops
import gam.ops.native as native
from conftest import rel_rms
from gam import GAMConfig
from gam.layers.gam import GAMBlock
from gam.ops.kv_memory import FUSED_SPAN, fused_applies, fused_kernel, kv_memory, kv_memory_fused, kv_memory_recurrent

needs_kernel = pytest.mark.skipif(fused_kernel() is None, reason=f"no fused kernel: "
                                  f"{native.unavailable_reason('kv_memory_cpu')}")
needs_tiles = pytest.mark.skipif(not kv_ops.tiles_available(), reason="the kernel's tiles form needs a CPU with AMX-BF16")


def inputs(B=3, T=37, d=5, S=16, seed=0, dtype=torch.float32, gate_low=-5.0):
    """Gates from ``gate_low`` to 0.5: some below the bound and some above 0 (clamped)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, d, generator=g, dtype=dtype) for _ in range(3))
    log_alpha = torch.rand(B, T, S, generator=g, dtype=dtype) * (0.5 - gate_low) + gate_low
    K0, V0 = (torch.randn(B, S, d, generator=g, dtype=dtype) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v, log_alpha, K0, V0)]


def run(fn, leaves, seed=1):
    q, k, v, log_alpha, K0, V0 = leaves
    out, (K, V) = fn(q, k, v, log_alpha, (K0, V0))
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, K, V)]
    loss = sum((t.double() * w).sum() for t, w in zip((out, K, V), weights))
    return [out, K, V], list(torch.autograd.grad(loss, leaves))


def reference(leaves):
    """The recurrence in fp64 on the same (rounded) inputs."""
    return run(kv_memory_recurrent, [x.detach().double().requires_grad_() for x in leaves])


@needs_kernel
@pytest.mark.parametrize("T", [1, 5, FUSED_SPAN - 1, FUSED_SPAN, FUSED_SPAN + 1, 2 * FUSED_SPAN + 7])
@pytest.mark.parametrize("S,d", [(16, 5), (64, 24), (48, 3), (128, 8)])  # 128: one token a sweep
def test_fused_matches_the_recurrence_in_fp32(T, S, d):
    leaves = inputs(T=T, S=S, d=d)
    (outs, grads), (ref_outs, ref_grads) = run(kv_memory_fused, leaves), reference(leaves)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=0)


@needs_kernel
def test_fused_bf16_is_close_to_the_fp64_reference_of_its_inputs():
    leaves = inputs(T=45, S=32, d=16)
    leaves = [x.detach().to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(leaves)]
    (outs, grads), (ref_outs, ref_grads) = run(kv_memory_fused, leaves), reference(leaves)
    assert outs[0].dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        assert rel_rms(got.double(), want) < 1e-2


def read_with_options(fn, q_scale, norm_eps=1e-5):
    """The layer's read as ``fn`` (q, k, v, z, K0, V0, norm weight) -> (reads, K, V): forget logits z,
    the query scaled, each read RMS-normalized (weight None: no norm)."""
    def read(q, k, v, z, K0, V0, weight):
        if fn is kv_memory_fused:
            return kv_memory_fused(q, k, v, z, (K0, V0), gate_logits=True, q_scale=q_scale, norm_weight=weight,
                                   norm_eps=norm_eps)
        out, state = fn(q * q_scale, k, v, F.logsigmoid(z), (K0, V0))
        return (out if weight is None else F.rms_norm(out, (out.shape[-1],), weight, norm_eps)), state
    return read


def run_options(fn, leaves, seed=1):
    """Outputs and gradients (of a random projection of them) of ``fn`` from :func:`read_with_options`."""
    out, (K, V) = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, K, V)]
    loss = sum((t.double() * w).sum() for t, w in zip((out, K, V), weights))
    wanted = [x for x in leaves if x is not None]
    return [out, K, V], list(torch.autograd.grad(loss, wanted))


def option_inputs(T, S, d, norm, dtype=torch.float32, seed=0):
    """q, k, v, forget logits from -6 to 6 (some below the bound), K0, V0, a norm weight or None."""
    q, k, v, _, K0, V0 = inputs(T=T, S=S, d=d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    z = (torch.rand(q.shape[0], T, S, generator=g) * 12 - 6).requires_grad_()
    weight = (torch.rand(d, generator=g) + 0.5).requires_grad_() if norm else None
    leaves = [q, k, v, z, K0, V0, weight]
    return [x if x is None else x.detach().to(dtype if i < 4 else torch.float32).requires_grad_()
            for i, x in enumerate(leaves)]


@needs_kernel
@pytest.mark.parametrize("T", [1, FUSED_SPAN + 1, 2 * FUSED_SPAN + 7])
@pytest.mark.parametrize("S,d,q_scale,norm", [(16, 5, 1.0, True), (64, 24, 24 ** -0.5, True), (48, 3, 0.5, False)])
def test_fused_options_match_logsigmoid_scale_and_rms_norm_around_the_recurrence(T, S, d, q_scale, norm):
    """Logits in, the query scaled and the reads normalized inside the kernel: the same outputs and
    gradients (the norm's weight's too) as those passes around the fp64 recurrence."""
    leaves = option_inputs(T, S, d, norm)
    outs, grads = run_options(read_with_options(kv_memory_fused, q_scale), leaves)
    reference_leaves = [x if x is None else x.detach().double().requires_grad_() for x in leaves]
    ref_outs, ref_grads = run_options(read_with_options(kv_memory_recurrent, q_scale), reference_leaves)
    assert len(grads) == (7 if norm else 6)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=0)


@needs_kernel
@pytest.mark.parametrize("d", [16, 24, 5])  # 24, 5: rows that end in a partial vector of 16 (the masked tail)
def test_fused_options_in_bf16_are_close_to_the_fp64_reference(d):
    leaves = option_inputs(T=45, S=32, d=d, norm=True, dtype=torch.bfloat16)
    outs, grads = run_options(read_with_options(kv_memory_fused, 0.25), leaves)
    reference_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_outs, ref_grads = run_options(read_with_options(kv_memory_recurrent, 0.25), reference_leaves)
    assert outs[0].dtype == grads[0].dtype == grads[3].dtype == torch.bfloat16
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        assert rel_rms(got.double(), want) < 1e-2


@needs_kernel
def test_logits_below_the_bound_get_no_gradient():
    """The bound on logits is the bound on log alpha: logsigmoid(LOGIT_MIN) = LOG_ALPHA_MIN."""
    assert abs(F.logsigmoid(torch.tensor(kv_ops.LOGIT_MIN, dtype=torch.float64)).item() - kv_ops.LOG_ALPHA_MIN) < 1e-12
    leaves = option_inputs(T=20, S=16, d=5, norm=False)
    _, grads = run_options(read_with_options(kv_memory_fused, 1.0), leaves)
    below = leaves[3] < kv_ops.LOGIT_MIN
    assert below.any() and (~below).any()
    assert (grads[3][below] == 0).all() and (grads[3][~below] != 0).all()


@needs_kernel
def test_the_clamped_gate_gets_no_gradient_and_the_bound_is_the_chunked_forms():
    leaves = inputs(T=20, S=16, gate_low=-8.0)
    log_alpha = leaves[3]
    _, grads = run(kv_memory_fused, leaves)
    outside = (log_alpha < kv_ops.LOG_ALPHA_MIN) | (log_alpha > 0)
    assert outside.any() and (~outside).any()
    assert (grads[3][outside] == 0).all() and (grads[3][~outside] != 0).all()
    _, chunked = run(kv_ops.kv_memory_chunked, leaves)
    torch.testing.assert_close(grads[3], chunked[3], atol=1e-5, rtol=0)


@needs_kernel
def test_strided_head_views_read_and_write_in_place_of_copies():
    """(B, H, T, d) views of a (B, T, H, d) layout: the same results as contiguous (B H, T, d)
    rows, and the reads come back in the views' layout."""
    B, H, T, d, S = 2, 3, 40, 8, 16
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, B, T, H, d, generator=g).requires_grad_()
    log_alpha = F.logsigmoid(torch.randn(B * H, T, S, generator=g)).requires_grad_()
    state = torch.randn(B * H, S, 2 * d, generator=g).requires_grad_()
    views = [x.transpose(1, 2) for x in qkv.unbind(0)]  # (B, H, T, d), strided
    gate_views = log_alpha.view(B, H, T, S)
    out, (K, V) = kv_memory_fused(*views, gate_views, (state[..., :d], state[..., d:]))
    final = torch.cat([K, V], dim=-1)
    rows = [x.reshape(B * H, T, d) for x in views]
    out_rows, (K, V) = kv_memory_fused(*rows, log_alpha, (state[..., :d], state[..., d:]))
    final_rows = torch.cat([K, V], dim=-1)
    assert out.shape == (B, H, T, d) and out.transpose(1, 2).is_contiguous()  # heads concatenate as a view
    torch.testing.assert_close(out.reshape(B * H, T, d), out_rows, atol=0, rtol=0)
    torch.testing.assert_close(final, final_rows, atol=0, rtol=0)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum() + final.sum(), (qkv, log_alpha, state))
    grads_rows = torch.autograd.grad((out_rows * w.reshape(B * H, T, d)).sum() + final_rows.sum(),
                                     (qkv, log_alpha, state))
    for a, b in zip(grads, grads_rows):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.fixture
def avx512(monkeypatch):
    """The kernel's CPU as far as :func:`fused_applies` can tell, on any host (the kernel runs
    anywhere; it is taken only where it is fast)."""
    monkeypatch.setattr(kv_ops, "CPU_CAPABILITY", kv_ops.FUSED_CPU_CAPABILITY)


@needs_kernel
def test_kv_memory_takes_the_kernel_where_it_applies_and_the_chunked_form_elsewhere(monkeypatch, avx512):
    calls = []
    monkeypatch.setattr(kv_ops, "kv_memory_fused", lambda *a: calls.append("fused") or kv_memory_recurrent(*a))
    monkeypatch.setattr(kv_ops, "kv_memory_chunked", lambda *a: calls.append("chunked") or kv_memory_recurrent(*a[:5]))
    for S in (16, 8):
        q, k, v, log_alpha, K0, V0 = inputs(T=4, S=S)
        kv_memory(q, k, v, log_alpha, (K0, V0))
    q16 = inputs(T=4, S=16)
    kv_memory(*[x.half() for x in q16[:4]], (q16[4].half(), q16[5].half()))
    assert calls == ["fused", "chunked", "chunked"]
    assert not fused_applies(torch.zeros(1, dtype=torch.float16), 16) and not fused_applies(torch.zeros(1), 130)
    monkeypatch.setattr(kv_ops, "CPU_CAPABILITY", "AVX2")
    assert not fused_applies(torch.zeros(1), 16)


@needs_kernel
@pytest.mark.parametrize("variant,design,fused_read", [
    ("full", {}, True), ("global_only", {}, True), ("full", {"memory_feature_map": "swish"}, True),
    ("full", {"memory_gate_normalizer": 8.0}, False)])
def test_kv_slot_block_with_the_kernel_equals_its_recurrent_reference(variant, design, fused_read, avx512):
    """A block with 16 slots per head takes the kernel (with the gate's logsigmoid, the query's
    scale and the RMSNorm inside it, unless the gate is normalized); its memory's reads and the
    gradients of the input and of every parameter of the memory equal the step-by-step
    reference's."""
    torch.manual_seed(0)
    config = GAMConfig(vocab_size=50, block_size=64, n_embd=16, n_layer=1, num_memory_slots=16, memory_heads=2,
                       dropout=0.0, memory="kv_slots", variant=variant, **design)
    block = GAMBlock(config)
    x = torch.randn(2, 37, 16, requires_grad=True)
    h = block.ln1(x)
    local = block.local_context(h) if block.has_local else h
    mem = block.kv_memory
    assert fused_applies(h, mem.num_slots) and mem.fused_read_applies(h) == fused_read
    fused = mem(h, local, block.memory_bank)
    recurrent = mem(h, local, block.memory_bank, reference=True)
    torch.testing.assert_close(fused, recurrent, atol=1e-5, rtol=0)
    params = [x, block.memory_bank, *mem.parameters()]
    g = torch.randn(fused.shape)
    for a, b in zip(torch.autograd.grad(fused, params, g, retain_graph=True),
                    torch.autograd.grad(recurrent, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    fast = block(x)  # the fused path of the whole block runs the kernel as well
    assert torch.isfinite(torch.autograd.grad(fast.sum(), x)[0]).all()


@needs_kernel
@pytest.mark.parametrize("precision,width", [("fp32", 32), ("bf16", 32), ("bf16", 96)])
def test_kv_slot_blocks_fused_mixer_matches_the_recurrent_reference(precision, width, avx512, monkeypatch):
    """The block's fast path with its mixer as one function (KVMixerResidual: bf16 logits, q, k,
    v into the kernel and bf16 normalized reads out under autocast) against the same block
    written with plain ops and the step-by-step recurrence: outputs and the gradients of the
    input and of every parameter, fp32 within 1e-5, bf16 by relative RMS (heads of 48 features:
    the tiles' form where the CPU has it)."""
    torch.manual_seed(0)
    config = GAMConfig(vocab_size=50, block_size=64, n_embd=width, n_layer=1, num_memory_slots=16, memory_heads=2,
                       dropout=0.0, memory="kv_slots")
    block = GAMBlock(config)
    x = torch.randn(2, 45, width, requires_grad=True)
    calls = []
    real = fused_block.KVMixerResidual.apply
    assert kv_ops.tiles_apply(torch.zeros(1, width // 2, dtype=torch.bfloat16)) == (width == 96 and kv_ops.tiles_available())
    monkeypatch.setattr(fused_block.KVMixerResidual, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        fast = block.forward_fast(x)
    assert calls == [1]
    h = block.ln1(x)
    local = block.local_context(h)
    g_local, g_global = block.gate(h).chunk(2, dim=-1)
    reads = block.kv_memory(h, local, block.memory_bank, reference=True)
    reference = x + torch.sigmoid(g_local) * local + torch.sigmoid(g_global) * reads
    reference = reference + block.ffn(block.ln2(reference))
    params = [x, *block.parameters()]
    w = torch.randn(fast.shape)
    grads = zip(torch.autograd.grad(fast, params, w), torch.autograd.grad(reference, params, w))
    if precision == "fp32":
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
        for a, b in grads:
            torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)
        return
    assert rel_rms((fast - x).double(), (reference - x).double()) < 1e-2  # the block's own part
    for a, b in grads:
        assert rel_rms(a.double(), b.double()) < 2e-2


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """gam.ops.native as in a new process, caching into an empty folder (returned)."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_reasons", {})
    monkeypatch.setenv("GAM_CACHE_DIR", str(tmp_path))
    return tmp_path / "native"


def test_without_a_compiler_the_kernel_is_unavailable_with_its_reason(monkeypatch, fresh_native, avx512):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="kv_memory_cpu is unavailable .no C compiler"):
        assert native.library("kv_memory_cpu") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a process: no second warning
        assert native.library("kv_memory_cpu") is None
    assert "no C compiler" in native.unavailable_reason("kv_memory_cpu")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("GAM_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        assert native.library("kv_memory_cpu") is None
    assert native.unavailable_reason("kv_memory_cpu") == "GAM_NATIVE=0"
    q = torch.zeros(1, 2, 4)
    assert not fused_applies(q, 16)  # and so kv_memory takes the chunked form


def test_a_failing_build_leaves_no_library_and_says_why(monkeypatch, fresh_native):
    if shutil.which("false") is None:
        pytest.skip("no `false` command")
    monkeypatch.setenv("CC", "false")
    with pytest.warns(RuntimeWarning, match="could not build"):
        assert native.library("kv_memory_cpu") is None
    assert native.unavailable_reason("kv_memory_cpu").startswith("could not build kv_memory_cpu: false failed")
    assert list(fresh_native.iterdir()) == []  # no half-written library left


@pytest.mark.skipif(shutil.which("cc") is None or os.environ.get("GAM_NATIVE") == "0",
                    reason="no C compiler, or GAM_NATIVE=0")
def test_the_kernel_builds_where_a_compiler_is_found():
    """With ``cc`` on PATH (as in CI), the kernel must build: a silent fallback would hide a
    broken source."""
    assert fused_kernel() is not None, native.unavailable_reason("kv_memory_cpu")


@needs_kernel
def test_without_gradients_nothing_is_kept_and_the_reads_are_the_same(monkeypatch):
    leaves = inputs(T=70, S=16)
    with torch.no_grad():
        out, (K, V) = kv_memory_fused(*leaves[:4], (leaves[4], leaves[5]))
    kept = []
    real_forward = kv_ops.fused_forward_op

    def spy(*args):
        result = real_forward(*args)
        kept.append((args[6], result[3].numel() > 0, result[4].numel() > 0))  # keep; softmax, checkpoints
        return result

    monkeypatch.setattr(kv_ops, "fused_forward_op", spy)
    with torch.no_grad():
        kv_memory_fused(*leaves[:4], (leaves[4], leaves[5]))
    grad_out, (grad_K, grad_V) = kv_memory_fused(*leaves[:4], (leaves[4], leaves[5]))
    assert kept == [(False, False, False), (True, True, True)]
    for a, b in ((out, grad_out), (K, grad_K), (V, grad_V)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)



@needs_kernel
def test_a_corrupt_cached_library_is_built_again(fresh_native):
    """A cached library that does not load (a truncated file) is replaced, not kept broken: a
    new process, as the next run would, finds garbage where the library belongs and builds it
    again. (This process never loads that file: overwriting a library a process has mapped
    crashes the process, which is why builds rename a finished file into place.)"""
    cached = native._target("kv_memory_cpu", native._compiler())
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a shared library")
    code = "import gam.ops.native as n; assert n.library('kv_memory_cpu') is not None, n.unavailable_reason('kv_memory_cpu')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GAM_CACHE_DIR": str(fresh_native.parent)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert cached.stat().st_size > 1000 and list(fresh_native.iterdir()) == [cached]


@needs_kernel
def test_an_empty_sequence_reads_nothing_and_passes_the_state_through():
    leaves = inputs(T=0, S=16)
    out, (K, V) = kv_memory_fused(*leaves[:4], (leaves[4], leaves[5]))
    assert out.shape == (3, 0, 5) and torch.equal(K, leaves[4]) and torch.equal(V, leaves[5])
    grads = torch.autograd.grad(K.sum() + 2 * V.sum(), [leaves[4], leaves[5]])
    assert (grads[0] == 1).all() and (grads[1] == 2).all()


@needs_kernel
@pytest.mark.parametrize("case", ["norm", "slots", "gate", "qkv"])
def test_mismatched_operands_are_refused_before_the_kernel_reads_them(case):
    """The kernel addresses memory by the shapes it is told: a mismatch is a one-line ValueError,
    never an out-of-bounds read."""
    q, k, v, log_alpha, K0, V0 = (x.detach() for x in inputs(T=9, S=16, d=5))
    weight = torch.ones(5)
    if case == "norm":
        weight = torch.ones(4)
    elif case == "slots":
        K0 = K0[:, :8]
    elif case == "gate":
        log_alpha = log_alpha[:, :5]
    else:
        v = v[..., :4]
    with pytest.raises(ValueError, match="gam::kv_memory_fused: .*must"):
        kv_memory_fused(q, k, v, log_alpha, (K0, V0), norm_weight=weight)


# ---------------------------------------------------------------- the chunked form on AMX tiles


def tiles_read(tiles, gate_logits, q_scale):
    """The kernel's read with the forget gate as logits (or log alpha), forced to one of its forms."""
    def read(q, k, v, z, K0, V0, weight):
        return kv_memory_fused(q, k, v, z, (K0, V0), gate_logits=gate_logits, q_scale=q_scale, norm_weight=weight,
                               tiles=tiles)
    return read


def reference_read(gate_logits, q_scale):
    """The same read around the fp64 recurrence."""
    def read(q, k, v, z, K0, V0, weight):
        log_alpha = F.logsigmoid(z) if gate_logits else z
        out, state = kv_memory_recurrent(q * q_scale, k, v, log_alpha, (K0, V0))
        return (out if weight is None else F.rms_norm(out, (out.shape[-1],), weight, 1e-5)), state
    return read


@needs_tiles
@pytest.mark.parametrize("T", [1, FUSED_SPAN - 1, FUSED_SPAN, FUSED_SPAN + 1, 2 * FUSED_SPAN + 7])
@pytest.mark.parametrize("S,d,options", [(16, 5, False), (64, 64, True), (48, 24, True), (128, 8, False),
                                         (32, 128, True)])
def test_tiles_are_close_to_the_fp64_recurrence_in_bf16(T, S, d, options):
    """The chunked form on the tiles (bf16 products with fp32 sums, bf16 pairs where the decays
    make terms cancel): outputs, final slots and every gradient within 1% relative RMS of the fp64
    recurrence on the same bf16 inputs, where the fp32 recurrence kernel is within 0.3%; lengths
    that are and are not multiples of the chunk, and one token."""
    leaves = option_inputs(T, S, d, norm=options, dtype=torch.bfloat16)
    if not options:  # log alpha from -5 to 0.5: some clamped at each end
        leaves[3] = (leaves[3].detach().float() / 12 * 5.5 - 2.25).requires_grad_()
    scale = d ** -0.5 if options else 1.0
    outs, grads = run_options(tiles_read(True, options, scale), leaves)
    reference_leaves = [x if x is None else x.detach().double().requires_grad_() for x in leaves]
    ref_outs, ref_grads = run_options(reference_read(options, scale), reference_leaves)
    assert outs[0].dtype == grads[0].dtype == torch.bfloat16 and outs[1].dtype == torch.float32
    for name, got, want in zip(["out", "K", "V", "q", "k", "v", "gate", "K0", "V0", "norm"], outs + grads,
                               ref_outs + ref_grads):
        assert rel_rms(got.double(), want) < 1e-2, name


@needs_tiles
def test_tiles_keep_the_scores_in_place_of_p_and_give_the_recurrences_gradients_of_clamped_gates():
    """The tiles' forward keeps the chunk-start states and the scores before the softmax (where
    the recurrence keeps the softmax: the backward needs both, and recomputes p from them); gates
    outside the bound get no gradient, as the recurrence's."""
    leaves = [x.detach().to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_()
              for i, x in enumerate(inputs(T=50, S=16, d=48, gate_low=-8.0))]
    q, k, v, log_alpha, K0, V0 = leaves
    scores, checkpoints, reads, rstd = kv_ops.fused_forward_op(q, k, v, log_alpha, K0, V0, True, False, 1.0, None,
                                                               1e-5, True)[3:]
    p, *_ = kv_ops.fused_forward_op(q, k, v, log_alpha, K0, V0, True, False, 1.0, None, 1e-5, False)[3:]
    assert checkpoints.shape == (3, 2, 2, 48, 16) and scores.shape == p.shape == (3, 50, 16)
    assert reads.numel() == rstd.numel() == 0  # without the norm
    assert rel_rms(scores.softmax(-1).double(), p.double()) < 1e-2 and not torch.allclose(scores, p)
    _, tiles = run(lambda *a: kv_memory_fused(*a, tiles=True), leaves)
    _, recurrence = run(lambda *a: kv_memory_fused(*a, tiles=False), leaves)
    outside = (log_alpha < kv_ops.LOG_ALPHA_MIN) | (log_alpha > 0)
    assert outside.any() and (~outside).any()
    assert (tiles[3][outside] == 0).all() and (tiles[3][~outside] != 0).all()
    for a, b in zip(tiles, recurrence):
        assert rel_rms(a.double(), b.double()) < 1e-2


def test_gam_kv_tiles_0_turns_the_tiles_off(monkeypatch):
    monkeypatch.setattr(kv_ops, "_tiles_ready", None)
    monkeypatch.setenv("GAM_KV_TILES", "0")
    assert not kv_ops.tiles_available() and not kv_ops.tiles_apply(torch.zeros(2, 3, 64, dtype=torch.bfloat16))


def test_tiles_apply_to_bf16_heads_of_48_to_128_features_where_the_cpu_has_them():
    bf16 = torch.zeros(2, 3, 64, dtype=torch.bfloat16)
    assert kv_ops.tiles_apply(bf16) == kv_ops.tiles_available()
    assert not kv_ops.tiles_apply(torch.zeros(2, 3, 64))  # fp32: the fp32 recurrence
    assert not kv_ops.tiles_apply(torch.zeros(2, 3, kv_ops.TILES_MIN_DIM - 1, dtype=torch.bfloat16))
    assert not kv_ops.tiles_apply(torch.zeros(2, 3, kv_ops.TILES_MAX_DIM + 1, dtype=torch.bfloat16))


@needs_kernel
def test_tiles_asked_for_fp32_inputs_are_refused_in_one_line():
    q, k, v, log_alpha, K0, V0 = (x.detach() for x in inputs(T=9, S=16, d=5))
    with pytest.raises(ValueError, match="gam::kv_memory_fused: tiles need bf16"):
        kv_memory_fused(q, k, v, log_alpha, (K0, V0), tiles=True)


@needs_kernel
@pytest.mark.parametrize("tiles", [False, True])
def test_a_backward_without_what_its_forward_kept_is_refused_in_one_line(tiles):
    """The backward op reads what the forward kept by the shapes it is told: empty or mismatched
    kept tensors (a forward that kept nothing) are a ValueError, never a read through a null or
    short buffer. (Both forms keep the same shapes; which one ran is the forward's ``tiles``,
    which autograd and the block's mixer hand to the backward.)"""
    if tiles and not kv_ops.tiles_available():
        pytest.skip("the kernel's tiles form needs a CPU with AMX-BF16")
    dtype = torch.bfloat16 if tiles else torch.float32
    q, k, v, log_alpha, K0, _ = (x.detach().to(dtype if i < 3 else torch.float32)
                                 for i, x in enumerate(inputs(T=9, S=16, d=48)))
    _, _, _, *kept = kv_ops.fused_forward_op(q, k, v, log_alpha, K0, K0, False, False, 1.0, None, 1e-5, tiles)
    d_final = torch.zeros(3, 16, 48)
    with pytest.raises(ValueError, match="what the forward kept does not match"):
        kv_ops.fused_backward_op(q, k, v, log_alpha, K0, *kept, torch.zeros_like(q), d_final, d_final, False, 1.0,
                                 None, 1e-5, tiles)


@needs_kernel
@pytest.mark.parametrize("tiles", [False, True])
def test_the_ops_fake_implementations_give_the_real_results_shapes(tiles):
    """torch.library.opcheck of the forward and both backward ops, both forms, with and without the
    norm: the schema holds, and the fake implementations (what torch.compile traces) give the
    real results' shapes, dtypes and strides. A change to what an op returns must pass this
    and raise OPS_REVISION (Inductor's cache keys compiled graphs on the ops' names)."""
    if tiles and not kv_ops.tiles_available():
        pytest.skip("the kernel's tiles form needs a CPU with AMX-BF16")
    dtype = torch.bfloat16 if tiles else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 37, 48, generator=g).to(dtype) for _ in range(3))
    z = torch.randn(2, 2, 37, 16, generator=g).to(dtype)
    K0 = torch.randn(2, 2, 16, 48, generator=g)
    checks = ("test_schema", "test_faketensor")
    for norm in (None, torch.rand(48, generator=g) + 0.5):
        args = (q, k, v, z, K0, K0, True, True, 0.2, norm, 1e-5, tiles)
        torch.library.opcheck(kv_ops.fused_forward_op, args, test_utils=checks)
        _, _, _, *kept = kv_ops.fused_forward_op(*args)
        d_final = torch.randn(4, 16, 48, generator=g)
        backward_args = (q, k, v, z, K0, *kept, torch.randn_like(q), d_final, d_final, True, 0.2, norm, 1e-5, tiles)
        torch.library.opcheck(kv_ops.fused_backward_op, backward_args, test_utils=checks)
        buffers = tuple(torch.empty_like(x) for x in (q, v, z))
        torch.library.opcheck(kv_ops.fused_backward_into_op, (*backward_args, *buffers), test_utils=checks)
    assert kv_ops.FORWARD_OP == f"gam::kv_memory_fused_v{kv_ops.OPS_REVISION}"
