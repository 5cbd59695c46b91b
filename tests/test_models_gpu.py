"""DiT on CUDA: bf16 autocast path vs the fp32 path and float64 references; flash-attn vs sdpa when installed; the
block's inference kernels against the eager bf16 ops."""

import math

import pytest
import torch

from ddistill.kernels.dit_block import gated_residual, modulated_layer_norm, rotary_qk
from ddistill.models import ModelConfig, build_model
from ddistill.models.dit import (DiTBlock, LayerNorm, Rotary, apply_rotary, attention, flash_attn_func,
                                 modulate)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

V = 101


def _random_model(**kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", vocab_size=V, dropout=0.0, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        model.output_weight[V:].zero_()
        model.output_bias[V:].zero_()
    return model.cuda().eval()


def test_bf16_autocast_matches_fp32_path():
    model = _random_model()
    x = torch.randint(0, V, (4, 64), device="cuda")
    sigma = torch.rand(4, device="cuda")
    bf16 = model(x, sigma)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (4, 64, V)
    assert model.hidden_states(x, sigma).dtype == torch.float32  # fp32 LN output feeds the output linear
    model.config.autocast_dtype = "float32"
    fp32 = model(x, sigma)
    assert fp32.dtype == torch.float32
    scale = fp32.abs().max()
    assert (bf16.float() - fp32).abs().max() < 0.05 * scale


def test_padded_rows_zero_grad_under_autocast():
    model = _random_model()
    model.train()
    x = torch.randint(0, V, (2, 32), device="cuda")
    model(x, torch.rand(2, device="cuda")).float().logsumexp(-1).sum().backward()
    assert model.output_weight.grad[:V].abs().sum() > 0
    assert torch.count_nonzero(model.output_weight.grad[V:]) == 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_cuda_attention_matches_float64(causal, backend):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 128, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = attention(q, k, v, causal=causal, backend=backend).double()
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(64)
    if causal:
        s = s.masked_fill(torch.ones(128, 128, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    ref = (torch.softmax(s, -1) @ vd).transpose(1, 2).reshape(2, 128, 256)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_cuda_attention_gradients_match_float64():
    """The default SDPA (cuDNN's fused attention on an H200 with torch 2.11) trains the DiT: its backward too."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 256, 256, device="cuda", dtype=torch.float64)
    (attention(q, k, v, causal=False, backend="auto").double() * w).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = qd.transpose(1, 2) @ kd.transpose(1, 2).transpose(-1, -2) / math.sqrt(64)
    ref = (torch.softmax(s, -1) @ vd.transpose(1, 2)).transpose(1, 2).reshape(2, 256, 256)
    (ref * w).sum().backward()
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.skipif(flash_attn_func is None, reason="flash_attn not installed")
def test_flash_and_sdpa_models_agree():
    sdpa = _random_model(attn_backend="sdpa")
    flash = _random_model(attn_backend="flash")
    x = torch.randint(0, V, (2, 64), device="cuda")
    sigma = torch.rand(2, device="cuda")
    torch.testing.assert_close(flash(x, sigma).float(), sdpa(x, sigma).float(), rtol=3e-2, atol=3e-2)


def test_block_kernels_on_cuda_match_the_eager_block_and_are_taken(monkeypatch):
    model = _random_model()
    x = torch.randint(0, V, (3, 96), device="cuda")
    sigma = torch.rand(3, device="cuda")
    calls = []
    kernels = DiTBlock.forward_block_kernels
    monkeypatch.setattr(DiTBlock, "forward_block_kernels", lambda self, *a: calls.append(1) or kernels(self, *a))
    with torch.no_grad():
        fused = model(x, sigma)
        assert len(calls) == model.config.n_blocks
        model.set_block_kernels("torch")
        eager = model(x, sigma)
    assert len(calls) == model.config.n_blocks and fused.dtype == eager.dtype == torch.bfloat16
    assert (fused.float() - eager.float()).abs().max() < 0.02 * eager.float().abs().max()
    model.set_block_kernels("auto")
    assert torch.equal(model(x, sigma).detach(), eager)  # gradients on: the eager ops
    assert len(calls) == model.config.n_blocks


def test_block_kernels_round_as_the_bf16_eager_ops():
    torch.manual_seed(4)
    b, l, d, h = 3, 77, 768, 12
    x = torch.randn(b, l, d, device="cuda") * 3
    mod = torch.randn(b, 6 * d, device="cuda").bfloat16()
    y = torch.randn(b, l, d, device="cuda").bfloat16()
    norm = LayerNorm(d).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        shift, scale, gate = mod[:, None].chunk(6, dim=2)[:3]
        assert torch.equal(gated_residual(x, y, mod, 2), x + gate * y)
        got = modulated_layer_norm(x, norm.weight, mod, 0, out_dtype=torch.bfloat16)
        want = modulate(norm(x), shift, scale).bfloat16()
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()
        assert ((got.float() - want.float()).abs() <= ulp + 1e-30).all()
        assert (got == want).float().mean() > 0.95
        qkv = torch.randn(b, l, 3 * d, device="cuda").bfloat16().view(b, l, 3, h, d // h)
        cos, sin = Rotary(d // h).cos_sin(l, x.device)
        q, k = rotary_qk(qkv, cos, sin)
        assert torch.equal(q, apply_rotary(qkv[:, :, 0], cos, sin))
        assert torch.equal(k, apply_rotary(qkv[:, :, 1], cos, sin))
