"""The compiled decode step (``generate(..., compiled=True)``, ``gam generate --compile``, the
decode bench's compiled rows) against the eager step it compiles, and its ops
(:mod:`gam.ops.decode`) against the matmuls they replace."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, rel_rms
from gam.generation import compiled_step
from gam.models.lm import build_model
from gam.ops import decode

pytestmark = pytest.mark.slow
pytest.importorskip("torch._inductor")


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


@pytest.fixture
def streamed(monkeypatch):
    """The streamed products' form, whatever the host's default."""
    monkeypatch.setattr(decode, "TUNED_MATMULS", False)


@pytest.fixture
def frozen(monkeypatch):
    """bf16 weights frozen into the step with tuned matmuls (an AMX host's form) on any host."""
    monkeypatch.setattr(decode, "TUNED_MATMULS", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_products_match_matmul(dtype, streamed):
    """One row under compile takes the reduction form; its values are the matmul's (fp32 to
    rounding, bf16 to its precision); several rows, or no compile, are the matmul itself."""
    torch.manual_seed(0)
    W, b = torch.randn(48, 40, dtype=dtype), torch.randn(48, dtype=dtype)
    x = torch.randn(1, 1, 40, dtype=dtype)
    lin = _compiled(decode.linear)
    ref = F.linear(x.double(), W.double(), b.double())
    if dtype == torch.float32:
        torch.testing.assert_close(lin(x, W, b).double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lin(x, W).double(), ref - b.double(), atol=1e-5, rtol=1e-5)
    else:
        assert rel_rms(lin(x, W, b), ref) < 1e-2
    assert torch.equal(decode.linear(x, W, b), F.linear(x, W, b))  # eager: the matmul
    x3 = torch.randn(3, 1, 40, dtype=dtype)
    torch.testing.assert_close(lin(x3, W, b), F.linear(x3, W, b))


def test_bf16_weight_streamed_in_fp32(streamed):
    """A bf16 weight's streamed product is summed in fp32 (Inductor widens as it reads):
    within bf16's rounding of the fp64 product, any width (odd too) and a transposed weight."""
    torch.manual_seed(0)
    lin = _compiled(decode.linear)
    for W in (torch.randn(64, 96, dtype=torch.bfloat16), torch.randn(64, 95, dtype=torch.bfloat16),
              torch.randn(96, 64, dtype=torch.bfloat16).T):
        x = torch.randn(1, 1, W.shape[1], dtype=torch.bfloat16)
        ref = x.double() @ W.double().T
        assert lin(x, W).dtype == torch.bfloat16
        torch.testing.assert_close(lin(x, W).float(), ref.to(torch.bfloat16).float(), atol=0, rtol=8e-3)


def _logits_per_step(model, prompt, steps, compiled, attention_mask=None, tokens=None):
    """Each step's logits, fed the greedy pick, or ``tokens`` (B, steps) where given (bf16
    logits of two forms may pick different tokens at a near-tie)."""
    cache = model.allocate_inference_cache(prompt.shape[0], prompt.shape[1] + steps, compiled=compiled)
    with torch.no_grad():
        logits = model.forward_cached(prompt, cache, last_only=True, attention_mask=attention_mask)
        out = []
        for i in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True) if tokens is None else tokens[:, i:i + 1]
            logits = model.forward_cached(token, cache, last_only=True)
            out.append(logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("fields", [
    {},  # the paper's GAM, learned positions
    {"memory": "kv_slots", "memory_heads": 2, "pos_embedding": "none"},
    {"memory": "kv_slots", "memory_heads": 2, "memory_write": "delta"},
], ids=["paper", "kv_slots", "kv_delta"])
def test_compiled_steps_equal_eager_steps(fields, streamed, one_thread):
    """Greedy decoding, batch 1 (the streamed products) and a left-padded batch of 2 (the
    matmuls, per-row positions): every step's logits equal the eager step's."""
    torch.manual_seed(0)
    model = build_model("gam", **{**TINY, **fields}).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 5))
    eager = _logits_per_step(model, prompt, 6, compiled=False)
    torch.testing.assert_close(_logits_per_step(model, prompt, 6, compiled=True), eager, atol=1e-5, rtol=1e-5)
    batch = torch.randint(0, TINY["vocab_size"], (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    eager = _logits_per_step(model, batch, 4, compiled=False, attention_mask=mask)
    compiled = _logits_per_step(model, batch, 4, compiled=True, attention_mask=mask)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compiled_generation_compiles_once_and_keeps_models_apart(streamed, one_thread):
    """Steps at new positions reuse the graph (positions are a tensor, not a constant), the
    window slide of learned positions included; two models decoded in turn each get their own
    graph even with the guards that cannot differ between steps skipped."""
    import torch._dynamo

    torch.manual_seed(0)
    a = build_model("gam", **TINY).eval()
    b = build_model("gam", **{**TINY, "conv_kernel_size": 4}).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 4))
    expected = [m.generate(prompt, 20, temperature=0) for m in (a, b)]  # 24 > block_size 16: slides
    torch._dynamo.reset()
    first = [m.generate(prompt, 2, temperature=0, compiled=True) for m in (a, b)]  # compiles both
    assert all(torch.equal(f, e[:, :6]) for f, e in zip(first, expected))
    compiled = [compiled_step(m) for m in (a, b)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        caches = [m.allocate_inference_cache(1, 16, compiled=True) for m in (a, b)]
        tokens = [prompt, prompt]
        with torch.no_grad():
            for _ in range(8):  # in turn: a, b, a, b, ...
                for i, m in enumerate((a, b)):
                    logits = m.forward_cached(tokens[i][:, -1:] if caches[i].position else tokens[i], caches[i],
                                              last_only=True)
                    tokens[i] = torch.cat([tokens[i], logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for got, want in zip(tokens, expected):
        assert torch.equal(got, want[:, :got.shape[1]])
    assert all(step is compiled_step(m) for step, m in zip(compiled, (a, b)))
    for m, want in zip((a, b), expected):  # the full generation, sliding the window, compiled
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(m.generate(prompt, 20, temperature=0, compiled=True), want)


@pytest.mark.parametrize("kind, fields", [("gam", {}),
                                          ("gam", {"memory": "kv_slots", "memory_heads": 2, "pos_embedding": "none"}),
                                          ("mamba", {})], ids=["paper", "kv_slots", "mamba"])
def test_frozen_bf16_steps_match_eager_steps(kind, fields, frozen, one_thread):
    """bf16 weights frozen into the step, its products tuned matmuls: each step's logits are
    the eager bf16 step's to bf16 precision (the same tokens fed to both), batch 1 (and, for
    the paper GAM, a left-padded batch of 2: each batch size compiles and tunes anew, tens of
    seconds); fp32 weights keep the streamed form (nothing frozen)."""
    import gam.generation

    torch.manual_seed(0)
    model = build_model(kind, **{**TINY, **fields}).eval()
    assert not decode.tuned_matmul(model.head.weight)  # fp32: streamed
    model = model.to(torch.bfloat16)
    assert decode.tuned_matmul(model.head.weight)
    batches = [(torch.randint(0, TINY["vocab_size"], (1, 5)), None)]
    if kind == "gam" and not fields:
        batches.append((torch.randint(0, TINY["vocab_size"], (2, 5)), torch.tensor([[0, 0, 1, 1, 1], [1] * 5])))
    for prompt, mask in batches:
        tokens = torch.randint(0, TINY["vocab_size"], (prompt.shape[0], 6))
        eager = _logits_per_step(model, prompt, 6, False, mask, tokens)
        compiled = _logits_per_step(model, prompt, 6, True, mask, tokens)
        assert compiled.dtype == torch.bfloat16 and rel_rms(compiled, eager.float()) < 2e-2
    assert model in gam.generation._FROZEN_STEPS


def test_frozen_step_sees_every_change_of_the_weights(frozen, one_thread):
    """The frozen step holds the weights as constants: changed in place (an optimizer step,
    load_state_dict), replaced by another tensor, or a block replaced, the next step is compiled
    anew and equals the eager step; an unchanged model keeps its step, and a model's step goes
    with it."""
    import gc

    import gam.generation

    torch.manual_seed(0)
    model = build_model("gam", **{**TINY, "n_layer": 2}).to(torch.bfloat16).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 5))
    tokens = torch.randint(0, TINY["vocab_size"], (1, 3))

    def check():
        compiled = _logits_per_step(model, prompt, 3, True, tokens=tokens)
        assert rel_rms(compiled, _logits_per_step(model, prompt, 3, False, tokens=tokens).float()) < 2e-2

    check()
    step = compiled_step(model)
    assert compiled_step(model) is step  # nothing changed: the same step
    with torch.no_grad():
        model.blocks[0].ffn[0].weight.mul_(1.5)  # in place
    check()
    assert compiled_step(model) is not step
    model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()})
    check()
    model.blocks[1].gate.weight = torch.nn.Parameter(torch.randn_like(model.blocks[1].gate.weight))
    check()
    model.blocks[0] = build_model("gam", **{**TINY, "n_layer": 2}).blocks[0].to(torch.bfloat16)
    check()
    other = build_model("gam", **{**TINY, "n_layer": 2}).to(torch.bfloat16).eval()
    compiled_step(other)
    assert other in gam.generation._FROZEN_STEPS
    del other
    gc.collect()
    assert len([m for m in gam.generation._FROZEN_STEPS if m is not model]) == 0


def test_cli_generate_compiled_prints_the_eager_text(tmp_path, capsys):
    from gam.cli import main
    from test_generation import make_checkpoint

    model, tok = make_checkpoint(tmp_path)
    argv = ["generate", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert main([*argv, "--compile"]) == 0
    assert capsys.readouterr().out == eager


def test_bench_decode_compiled_rows(tmp_path):
    """Compiled rows for the constant-state models, beside their eager rows; the Transformer's
    compiled row is skipped with the reason; the speed-up over eager in the summary."""
    import json

    from gam.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "decode", "--out", str(out), "--contexts", "8,24", "--models", "gam,transformer",
                 "--modes", "eager,compiled", "--n-embd", "16", "--n-layer", "1", "--vocab-size", "32",
                 "--steps", "2", "--warmup", "1", "--threads", "1"]) == 0
    data = json.loads((out / "decode.json").read_text())
    assert [(r["model"], r["mode"], r["context"]) for r in data["results"]] == [
        ("gam", "eager", 8), ("gam", "eager", 24), ("gam", "compiled", 8), ("gam", "compiled", 24),
        ("transformer", "eager", 8), ("transformer", "eager", 24)]
    assert "grows every step" in data["skipped"]["Transformer (KV cache), fp32, compiled"]
    assert set(data["summary"]["compiled_over_eager_at_longest"]) == {"gam fp32"}
    table = (out / "decode.md").read_text()
    assert "| GAM | fp32 | compiled | 24 |" in table and "compiled step" in table


def test_cli_generate_compile_failure_is_one_line(tmp_path, capsys, monkeypatch):
    """Without a C++ compiler Inductor fails at the first step: one line, exit 2."""
    import torch._dynamo.exc

    import gam.generation
    from gam.cli import main
    from test_generation import make_checkpoint

    def no_compiler(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(no_compiler, RuntimeError("no C++ compiler found"), None)

    monkeypatch.setattr(gam.generation, "compiled_step", lambda model: no_compiler)
    make_checkpoint(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "4", "--compile"]) == 2
    err = capsys.readouterr().err
    assert "torch.compile failed (RuntimeError: no C++ compiler found); run without --compile" in err
    assert "Traceback" not in err and err.strip().count("\n") == 0

