"""The DiT block's inference kernels (ddistill.kernels.dit_block) against the eager block's own ops and float64, on
CPU through Triton's interpreter (fp32 and fp16; the GPU file checks bf16 and the dispatch on CUDA)."""

import pytest
import torch
import triton
import triton.language as tl

from ddistill.kernels.dit_block import _rounded, gated_residual, modulated_layer_norm, rotary_qk
from ddistill.models import ModelConfig, build_model
from ddistill.models.dit import LayerNorm, Rotary, apply_rotary, modulate

B, L, D, H = 2, 5, 24, 3  # odd sizes: d not a power of two, 3 heads of 8


def _inputs(mod_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g) * 3 + 1
    mod = (torch.randn(B, 6 * D, generator=g) * 0.7).to(mod_dtype)
    norm = LayerNorm(D)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
    return x, mod, norm


def _chunks(mod):
    return mod[:, None].chunk(6, dim=2)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got − want| in units of want's dtype's spacing at want."""
    spacing = torch.finfo(want.dtype).eps * want.abs().float().clamp_min(torch.finfo(want.dtype).tiny)
    return (got.float() - want.float()).abs() / spacing


@pytest.mark.parametrize("mod_dtype", [torch.float32, torch.float16])
def test_modulated_layer_norm_matches_the_eager_ops_and_float64(mod_dtype):
    x, mod, norm = _inputs(mod_dtype)
    shift, scale = _chunks(mod)[3:5]
    with torch.no_grad():
        want = modulate(norm(x), shift, scale).to(mod_dtype)  # eager, then the next linear's autocast cast
        got = modulated_layer_norm(x, norm.weight, mod, 3, out_dtype=mod_dtype)
    assert got.dtype == mod_dtype and got.shape == x.shape
    if mod_dtype == torch.float32:
        xd = x.double()
        ln = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
        exact = ln * norm.weight.double() * (1 + scale.double()) + shift.double()
        assert torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-5)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # the LN statistics' summation order may move a rounded output by one unit
        assert _ulps(got, want).max() <= 1.0
        assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize("mod_dtype", [torch.float32, torch.float16])
def test_gated_residual_is_bitwise_the_eager_sum(mod_dtype):
    x, mod, norm = _inputs(mod_dtype, seed=1)
    y = torch.randn(B, L, D, generator=torch.Generator().manual_seed(2)).to(mod_dtype)
    gate1, shift2, scale2, gate2 = (_chunks(mod)[i] for i in (2, 3, 4, 5))
    with torch.no_grad():
        want = x + gate2 * y
        assert torch.equal(gated_residual(x, y, mod, 5), want)
        x_new, h = gated_residual(x, y, mod, 2, weight=norm.weight, shift=3, out_dtype=mod_dtype)
        want = x + gate1 * y
        assert torch.equal(x_new, want) and x_new.dtype == torch.float32
        ref = modulate(norm(want), shift2, scale2).to(mod_dtype)
        assert _ulps(h, ref).max() <= (1.0 if mod_dtype == torch.float16 else 64.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_qk_is_bitwise_apply_rotary(dtype):
    dh = D // H
    qkv = torch.randn(B, L, 3, H, dh, generator=torch.Generator().manual_seed(3)).to(dtype)
    cos, sin = Rotary(dh).cos_sin(L, torch.device("cpu"))
    q, k = rotary_qk(qkv, cos, sin)
    q_ref, k_ref, _ = qkv.unbind(2)
    assert q.is_contiguous() and q.shape == (B, L, H, dh) and q.dtype == dtype
    assert torch.equal(q, apply_rotary(q_ref, cos, sin))
    assert torch.equal(k, apply_rotary(k_ref, cos, sin))


def test_block_through_the_kernels_matches_the_eager_block():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", vocab_size=37, dropout=0.0, hidden_size=D, n_heads=H))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    block = model.blocks[0].eval()
    x = torch.randn(B, L, D)
    c = torch.randn(B, model.config.cond_dim)
    cos, sin = model.rotary_emb.cos_sin(L, x.device)
    with torch.no_grad():
        assert not block._use_block_kernels(x)  # CPU: the eager ops, even with the default "auto"
        want = block(x, c, cos, sin)
        got = block.forward_block_kernels(x, block.adaLN_modulation(c), cos, sin)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_with_the_reason():
    x, mod, norm = _inputs(torch.float32)
    with pytest.raises(ValueError, match="fp32"):
        modulated_layer_norm(x.half(), norm.weight, mod, 0, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk 5 out of range"):
        modulated_layer_norm(x, norm.weight, mod[:, : 5 * D], 4, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="weight, shift and out_dtype"):
        gated_residual(x, x, mod, 2, weight=norm.weight)
    with pytest.raises(ValueError, match="bfloat16"):
        modulated_layer_norm(x, norm.weight, mod.bfloat16(), 0, out_dtype=torch.bfloat16)
    qkv = torch.randn(B, L, 3 * D).view(B, L, 3, H, D // H)
    cos, sin = Rotary(D // H).cos_sin(L, torch.device("cpu"))
    with pytest.raises(ValueError, match="packed"):
        rotary_qk(qkv.transpose(0, 1), cos, sin)
    with pytest.raises(ValueError, match="tables"):
        rotary_qk(qkv, cos[:-1], sin)
    with pytest.raises(ValueError, match="block_kernels"):
        build_model(ModelConfig(size="test", block_kernels="triton"))


@triton.jit
def _round_kernel(x_ptr, out_ptr, N, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _rounded(tl.load(x_ptr + offs, mask=offs < N), DTYPE), mask=offs < N)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_the_activation_dtype_is_torchs(dtype):
    """_rounded (fp32 in and out) against torch's own cast, over random magnitudes, exact ties, the largest finite
    values, infinities and NaN (bf16's integer rounding must leave NaN a NaN)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, generator=g) * torch.exp2(torch.randint(-20, 20, (3000,), generator=g).float())
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-11, 1 + 3 * 2**-11, 0.0, -0.0])
    edges = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, float("inf"),
                          float("-inf"), float("nan"), torch.finfo(dtype).max, torch.finfo(torch.float32).tiny])
    edges = torch.cat([edges, torch.tensor([0x7FFFFFFF, 0x7F800001], dtype=torch.int32).view(torch.float32)])  # NaNs
    x = torch.cat([x, ties, edges]).float()
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4).nan_to_num(nan=1.0)
    out = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), DTYPE=tl.bfloat16 if dtype == torch.bfloat16
                                                   else tl.float16, BLOCK=256)
    want = x.to(dtype).float()
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out[~want.isnan()], want[~want.isnan()])
