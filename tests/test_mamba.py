"""Tests for the selective scan ops and the Mamba (v1) mixer. Tiny shapes, CPU, seconds."""

import math

import pytest
import torch

from gam.layers.mamba import Mamba
from gam.ops.selective_scan import (
    clear_workspace,
    has_mamba_ssm,
    selective_scan,
    selective_scan_fn,
    selective_scan_ref,
)

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: threads only add synchronisation cost (and stalls on a loaded machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(batch, dim, n, L, seed=0, delta_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    t = dict(
        u=torch.randn(batch, dim, L, generator=g),
        delta=delta_scale * torch.randn(batch, dim, L, generator=g),
        A=-(0.1 + 3 * torch.rand(dim, n, generator=g)),
        B=torch.randn(batch, n, L, generator=g),
        C=torch.randn(batch, n, L, generator=g),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, L, generator=g),
        delta_bias=0.3 * torch.randn(dim, generator=g),
    )
    for v in t.values():
        v.requires_grad_(True)
    return t


def _run(fn, ins, with_optional=True, **kw):
    for v in ins.values():
        v.grad = None
    args = dict(ins)
    if not with_optional:
        for k in ("D", "z", "delta_bias"):
            args[k] = None
    y, last = fn(**args, delta_softplus=True, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(123)
    gy = torch.randn(y.shape, generator=g).to(y.device)
    gl = torch.randn(last.shape, generator=g).to(last.device)
    ((y * gy).sum() + (last * gl).sum()).backward()
    grads = {k: (v.grad.clone() if v.grad is not None else None) for k, v in ins.items()}
    return y.detach(), last.detach(), grads


# L, chunk_size, block_size: multiples and non-multiples of the chunk, several blocks, L=1
SCAN_CASES = [
    (1, None, None),
    (2, 4, None),
    (7, 4, None),        # shorter than two chunks: plain loop path
    (32, 4, 16),         # whole chunks, two blocks
    (37, 4, 16),         # ragged tail in the last block
    (41, 8, None),       # one block, ragged tail
    (64, 8, 64),
    (50, 4, 9),          # block not a multiple of the chunk
    (100, None, None),   # automatic sizes
]


@pytest.mark.parametrize("L,chunk,block", SCAN_CASES)
def test_fast_scan_matches_reference(L, chunk, block):
    ins = _inputs(2, 6, 3, L, seed=L)
    y_ref, last_ref, g_ref = _run(selective_scan_ref, ins)
    y, last, g = _run(selective_scan_fn, ins, chunk_size=chunk, block_size=block)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_ref, atol=1e-5, rtol=1e-5)
    for k in NAMES:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"grad {k}: {m}")


def test_fast_scan_without_optional_args():
    ins = _inputs(2, 5, 4, 23, seed=1)
    y_ref, last_ref, g_ref = _run(selective_scan_ref, ins, with_optional=False)
    y, last, g = _run(selective_scan_fn, ins, with_optional=False, chunk_size=4)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_ref, atol=1e-5, rtol=1e-5)
    for k in ("u", "delta", "A", "B", "C"):
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-5, rtol=1e-4)
    # plain call (no last state) returns just y
    out = selective_scan_fn(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"])
    assert out.shape == ins["u"].shape


def test_stacked_scans_share_workspace_correctly():
    # two scans in a row (as in a 2-layer model): both backwards run after both forwards, and
    # the second call needs a larger work buffer than the first
    ins = _inputs(2, 4, 3, 19, seed=3)
    ins2 = _inputs(2, 4, 3, 19, seed=4)

    def two(fn, **kw):
        for v in list(ins.values()) + list(ins2.values()):
            v.grad = None
        y1 = fn(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], ins["D"], delta_softplus=True, **kw)
        y2 = fn(y1.repeat(1, 2, 1)[:, :4], ins2["delta"], ins2["A"], ins2["B"], ins2["C"], ins2["D"],
                z=ins2["z"], delta_bias=ins2["delta_bias"], delta_softplus=True, **kw)
        y2.pow(2).sum().backward()
        return y2.detach(), ins["u"].grad.clone(), ins["A"].grad.clone(), ins2["B"].grad.clone()

    ref = two(selective_scan_ref)
    clear_workspace()
    out = two(selective_scan_fn, chunk_size=4)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fast_scan_strong_decay_is_finite():
    # exp(delta*A) underflows to 0 for many steps: no NaN/inf (no division by decay products)
    ins = _inputs(1, 4, 3, 64, seed=2, delta_scale=20.0)
    with torch.no_grad():
        ins["A"].mul_(30.0)
    y_ref, last_ref, g_ref = _run(selective_scan_ref, ins)
    y, last, g = _run(selective_scan_fn, ins, chunk_size=4, block_size=32)
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in g.values())
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for k in NAMES:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-4, rtol=1e-4)


def test_scan_dtypes_and_dispatch():
    ins = {k: v.detach() for k, v in _inputs(2, 4, 3, 9).items()}
    bf = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in ins.items()}
    y = selective_scan_fn(**bf, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2, last = selective_scan(**ins, delta_softplus=True, return_last_state=True, backend="auto")
    assert y2.dtype == torch.float32 and last.dtype == torch.float32
    torch.testing.assert_close(y2, selective_scan_ref(**ins, delta_softplus=True), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        selective_scan(**ins, backend="nope")
    if not has_mamba_ssm():
        with pytest.raises(RuntimeError, match="mamba-ssm"):
            selective_scan(**ins, backend="cuda")


# ------------------------------------------------------------------------------------------------
# Mixer
# ------------------------------------------------------------------------------------------------
def _mixer(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_model": 16, "d_state": 4, "d_conv": 4, "expand": 2, "backend": "torch", **kw}
    return Mamba(**kw).eval()


def test_param_count_reference_config():
    m = Mamba(512, d_state=16, d_conv=4, expand=3)
    assert m.d_inner == 1536 and m.dt_rank == 32
    assert sum(p.numel() for p in m.parameters()) == 2_542_080


def test_state_dict_names_and_shapes_match_mamba_ssm():
    m = Mamba(64, d_state=8, d_conv=4, expand=2)
    d_inner, R, N = 128, 4, 8
    expected = {
        "A_log": (d_inner, N),
        "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, 64),
        "conv1d.weight": (d_inner, 1, 4),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (R + 2 * N, d_inner),
        "dt_proj.weight": (d_inner, R),
        "dt_proj.bias": (d_inner,),
        "out_proj.weight": (64, d_inner),
    }
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # a state dict with exactly these keys (as saved by mamba-ssm) loads strictly
    m2 = Mamba(64, d_state=8, d_conv=4, expand=2)
    m2.load_state_dict({k: torch.randn(s) for k, s in expected.items()}, strict=True)


def test_init_like_mamba_ssm():
    m = Mamba(32, d_state=6, expand=2, dt_min=0.001, dt_max=0.1)
    torch.testing.assert_close(torch.exp(m.A_log), torch.arange(1, 7.0).repeat(64, 1))
    assert torch.equal(m.D.data, torch.ones(64))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.conv1d.padding == (3,) and m.conv1d.groups == 64


def test_mixer_forward_matches_manual_mamba1():
    m = _mixer()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        y = m(x)
        xz = m.in_proj(x).transpose(1, 2)
        xs, z = xz.chunk(2, dim=1)
        xs = torch.nn.functional.silu(m.conv1d(xs)[..., :11])
        dt, Bm, Cm = m.x_proj(xs.transpose(1, 2)).split([m.dt_rank, 4, 4], dim=-1)
        dt = m.dt_proj(dt)  # bias included here, then softplus
        yr = selective_scan_ref(xs, dt.transpose(1, 2), -torch.exp(m.A_log), Bm.transpose(1, 2),
                                Cm.transpose(1, 2), m.D, z=z, delta_softplus=True)
        yr = m.out_proj(yr.transpose(1, 2))
    assert y.shape == x.shape
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)


def test_mixer_is_causal():
    m = _mixer(seed=1)
    x = torch.randn(2, 19, 16)
    t = 9
    x2 = x.clone()
    x2[:, t:] += torch.randn_like(x2[:, t:])
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, :t], y2[:, :t], atol=0, rtol=0)
    assert not torch.allclose(y[:, t], y2[:, t])
    # gradient view: output at position t depends on no input after t
    xg = x.clone().requires_grad_(True)
    m(xg)[:, t].sum().backward()
    assert xg.grad[:, t + 1:].abs().max() == 0
    assert xg.grad[:, : t + 1].abs().max() > 0


@pytest.mark.parametrize("prefix", [3, 7])  # shorter and longer than d_conv, both odd
def test_prefill_then_step_matches_full_forward(prefix):
    m = _mixer(seed=2)
    T = 16
    x = torch.randn(3, T, 16)
    with torch.no_grad():
        full = m(x)
        cache = m.allocate_inference_cache(3)
        assert cache["conv_state"].shape == (3, m.d_inner, m.d_conv)
        assert cache["ssm_state"].shape == (3, m.d_inner, m.d_state)
        outs = [m(x[:, :prefix], cache=cache)]
        for t in range(prefix, T):
            xt = x[:, t:t + 1] if t % 2 else x[:, t]            # (B, 1, C) and (B, C) both accepted
            yt = m.step(xt, cache)
            assert yt.shape == xt.shape
            outs.append(yt if yt.dim() == 3 else yt.unsqueeze(1))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_step_from_empty_cache_matches_forward():
    m = _mixer(seed=3)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        full = m(x)
        cache = {}
        first = m(x[:, :1], cache=cache)  # cache allocated on demand
        steps = [m.step(x[:, t:t + 1], cache) for t in range(1, 6)]
    torch.testing.assert_close(torch.cat([first] + steps, 1), full, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    m = _mixer(seed=4, d_model=32, d_state=8)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    rel = ((out.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel < 2e-2, rel
    # backward works under autocast too
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(xg).float().pow(2).mean().backward()
    assert torch.isfinite(xg.grad).all() and m.A_log.grad is not None


def test_backend_options():
    with pytest.raises(ValueError):
        Mamba(16, backend="triton")
    if not has_mamba_ssm():
        with pytest.raises(ImportError, match="mamba-ssm"):
            Mamba(16, backend="cuda")
    m = Mamba(16, d_state=4, backend="auto")  # CPU tensors -> pure-PyTorch scan
    assert m(torch.randn(1, 5, 16)).shape == (1, 5, 16)


def test_mixer_gradients_flow():
    m = _mixer(seed=5)
    x = torch.randn(2, 13, 16, requires_grad=True)
    m(x).pow(2).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert math.isfinite(x.grad.sum().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_scan_on_cuda_matches_reference():
    ins = _inputs(2, 8, 4, 45, seed=7)
    y_ref, last_ref, g_ref = _run(selective_scan_ref, ins)
    cuda = {k: v.detach().cuda().requires_grad_(True) for k, v in ins.items()}
    y, last, g = _run(selective_scan_fn, cuda, chunk_size=4, block_size=16)
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.cpu(), last_ref, atol=1e-5, rtol=1e-5)
    for k in NAMES:
        torch.testing.assert_close(g[k].cpu(), g_ref[k], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not (torch.cuda.is_available() and has_mamba_ssm()), reason="needs CUDA and mamba-ssm")
def test_matches_mamba_ssm_mixer():
    from mamba_ssm.modules.mamba_simple import Mamba as RefMamba

    torch.manual_seed(0)
    ref = RefMamba(64, d_state=16, d_conv=4, expand=2).cuda()
    ours = Mamba(64, d_state=16, d_conv=4, expand=2, backend="torch").cuda()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 33, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-3)
        ours.backend = "cuda"
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-3)
