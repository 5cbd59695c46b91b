"""Forward-only Triton kernels for the elementwise work of an adaLN DiT block (``models/dit.py``), used by no-grad
CUDA forwards of uncompiled blocks (samplers, frozen teachers; ``ModelConfig.block_kernels``).

Around its five GEMMs and its attention, an eager block makes about 28 elementwise passes over the (B·L, d)
activations: the fp32 LayerNorm and its weight, the adaLN modulation ``LN(x)·(1 + a) + s``, the autocast cast of
that to bf16, RoPE on q and k (two products, a rotate-half copy and a sum each, and the cos/sin casts), the gate
products ``g·y`` and the residual sums. Three kernels do that work, one pass over a row each:

    modulated_layer_norm(x, w, mod, j)                 h  = cast(LN(x)·w·(1 + a) + s),  (s, a) = mod chunks j, j+1
    gated_residual(x, y, mod, j, [w, k])               x' = x + g·y,  g = mod chunk j   [and h from x', chunks k, k+1]
    rotary_qk(qkv, cos, sin)                           q, k = RoPE(qkv[..., 0, :, :]), RoPE(qkv[..., 1, :, :])

``mod`` is the block's adaLN output (B, 6·d), chunked along its last dim as ``DiTBlock.forward`` chunks it. The
kernels round where the eager block rounds under autocast: ``1 + a``, ``g·y``, and RoPE's two products and their sum
in the dtype those eager ops produce; everything else in fp32. ``gated_residual`` and ``rotary_qk`` are therefore
bitwise the eager ops; ``modulated_layer_norm`` sums the LayerNorm's statistics in another order than PyTorch's
kernel (and may fuse a multiply-add), which moves the fp32 result by a few units in its last place and, rarely, the
bf16 output by one. No autograd: callers check that gradients are off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ddistill.kernels._common import check_device

LN_EPS = 1e-5  # F.layer_norm's default, which the DiT's LayerNorm uses

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE's precision (nearest, ties to even), kept in fp32. For bf16 by integer arithmetic on
    the bits (as c10::BFloat16 rounds): with a plain ``x.to(bf16).to(fp32)`` the CUDA compiler may fuse a rounded
    product and the sum after it into one bf16 FMA, which rounds once (measured on an H200: 16% of RoPE outputs one
    unit off the eager ops)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN (its bits would carry over)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _adaln_row_kernel(
    x_ptr, y_ptr, mod_ptr, w_ptr, x_out_ptr, h_ptr,
    L, D, stride_mod, GATE_OFF, SHIFT_OFF, eps,
    RESIDUAL: tl.constexpr, NORM: tl.constexpr, PRODUCT_DTYPE: tl.constexpr, MOD_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One row r = b·L + l: [x ← x + round(g_b ⊙ y_r), stored] then [h_r = LN(x)·w ⊙ round(1 + a_b) + s_b, stored]."""
    row = tl.program_id(0).to(tl.int64)
    mod_row = mod_ptr + (row // L) * stride_mod
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        g = tl.load(mod_row + GATE_OFF + cols, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
        x += _rounded(g * y, PRODUCT_DTYPE)  # eager: gate · y in the activations' dtype, then + x in fp32
        tl.store(x_out_ptr + row * D + cols, x, mask=ok)
    if NORM:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        shift = tl.load(mod_row + SHIFT_OFF + cols, mask=ok, other=0.0).to(tl.float32)
        scale = tl.load(mod_row + SHIFT_OFF + D + cols, mask=ok, other=0.0).to(tl.float32)
        one_plus = _rounded(1.0 + scale, MOD_DTYPE)  # eager: 1 + scale in the modulation's dtype
        h = (xc * rstd) * w * one_plus + shift
        tl.store(h_ptr + row * D + cols, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope(src, dst, cos1, cos2, sin1, sin2, ok, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """dst = src·cos + rotate_half(src)·sin on a (heads, HALF) tile pair, each product and the sum rounded to DTYPE."""
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    out1 = (_rounded(x1 * cos1, DTYPE) + _rounded(-x2 * sin1, DTYPE)).to(DTYPE)
    out2 = (_rounded(x2 * cos2, DTYPE) + _rounded(x1 * sin2, DTYPE)).to(DTYPE)
    tl.store(dst, out1, mask=ok)
    tl.store(dst + HALF, out2, mask=ok)


@triton.jit
def _rotary_qk_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr,
    L, H, stride_row, HALF: tl.constexpr, DTYPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """One position r = b·L + l of the packed (B, L, 3, H, Dh) projections: RoPE of its q and k heads (cos, sin:
    fp32 (L, Dh) tables, rounded to DTYPE first, as `apply_rotary` casts them)."""
    row = tl.program_id(0).to(tl.int64)
    dh = 2 * HALF
    head = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_J)[None, :]
    ok = (head < H) & (j < HALF)
    table = (row % L) * dh + j
    cos1 = _rounded(tl.load(cos_ptr + table, mask=j < HALF, other=0.0), DTYPE)
    cos2 = _rounded(tl.load(cos_ptr + table + HALF, mask=j < HALF, other=0.0), DTYPE)
    sin1 = _rounded(tl.load(sin_ptr + table, mask=j < HALF, other=0.0), DTYPE)
    sin2 = _rounded(tl.load(sin_ptr + table + HALF, mask=j < HALF, other=0.0), DTYPE)
    src = qkv_ptr + row * stride_row + head * dh + j
    dst = row * H * dh + head * dh + j
    _rope(src, q_ptr + dst, cos1, cos2, sin1, sin2, ok, HALF, DTYPE)
    _rope(src + H * dh, k_ptr + dst, cos1, cos2, sin1, sin2, ok, HALF, DTYPE)


def _check_rows(x: torch.Tensor, mod: torch.Tensor, *chunks: int) -> tuple[int, int, int]:
    check_device(x)
    check_device(mod)
    if x.dim() != 3 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous fp32 (B, L, d) residual stream, got {x.dtype} {tuple(x.shape)}")
    b, l, d = x.shape
    if mod.dim() != 2 or mod.shape[0] != b or mod.shape[1] % d or mod.stride(1) != 1:
        raise ValueError(f"mod must be (B, k·d) with unit column stride for x {tuple(x.shape)}, got {tuple(mod.shape)}")
    for chunk in chunks:
        if not 0 <= chunk < mod.shape[1] // d:
            raise ValueError(f"chunk {chunk} out of range for mod of {mod.shape[1] // d} chunks")
    return b, l, d


def _launch_rows(x, y, mod, weight, gate, shift, out_dtype):
    residual, norm = gate is not None, shift is not None
    b, l, d = _check_rows(x, mod, *([gate] if residual else []), *([shift, shift + 1] if norm else []))
    if norm and weight.shape != (d,):
        raise ValueError(f"LayerNorm weight must have shape ({d},), got {tuple(weight.shape)}")
    if residual:
        check_device(y)
        if y.shape != x.shape or not y.is_contiguous():
            raise ValueError(f"y must be contiguous with x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    x_out = torch.empty_like(x) if residual else x
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device) if norm else x
    product = torch.promote_types(mod.dtype, y.dtype) if residual else mod.dtype
    _adaln_row_kernel[(b * l,)](
        x, y if residual else x, mod, weight if norm else x, x_out, h,
        l, d, mod.stride(0), (gate or 0) * d, (shift or 0) * d, LN_EPS,
        RESIDUAL=residual, NORM=norm, PRODUCT_DTYPE=_TL_DTYPES[product], MOD_DTYPE=_TL_DTYPES[mod.dtype],
        BLOCK_D=triton.next_power_of_2(d), num_warps=4 if d <= 1024 else 8,
    )  # fmt: skip
    return x_out, h


def modulated_layer_norm(x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor, shift: int, *,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """``LN(x)·weight·(1 + a) + s`` in ``out_dtype`` (the DiT block's ``modulate(norm(x), s, a)`` followed by the
    autocast cast of the next linear), with ``s, a`` = chunks ``shift, shift + 1`` (of width d) of ``mod``'s rows."""
    return _launch_rows(x, None, mod, weight, None, shift, out_dtype)[1]


def gated_residual(x: torch.Tensor, y: torch.Tensor, mod: torch.Tensor, gate: int, *,
                   weight: torch.Tensor | None = None, shift: int | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x' = x + g·y`` (fp32; g = chunk ``gate`` of ``mod``), a new tensor. With ``weight`` and ``shift`` also
    ``modulated_layer_norm(x', weight, mod, shift)`` from the same pass: returns ``(x', h)``."""
    if (weight is None) != (shift is None) or (shift is not None and out_dtype is None):
        raise ValueError("gated_residual: weight, shift and out_dtype go together")
    x_out, h = _launch_rows(x, y, mod, weight, gate, shift, out_dtype)
    return x_out if shift is None else (x_out, h)


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half) of the q and k parts of packed projections ``qkv`` (B, L, 3, H, Dh), as
    ``models.dit.apply_rotary`` computes it in qkv's dtype; cos, sin: fp32 (L, Dh). Returns contiguous q, k
    (B, L, H, Dh); v is ``qkv[:, :, 2]``."""
    check_device(qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3 or qkv.stride(-1) != 1 or qkv.stride(-2) != qkv.shape[-1] \
            or qkv.stride(2) != qkv.shape[3] * qkv.shape[4] or qkv.stride(0) != qkv.shape[1] * qkv.stride(1):
        raise ValueError(f"qkv must be packed (B, L, 3, H, Dh) rows, got shape {tuple(qkv.shape)} "
                         f"strides {qkv.stride()}")
    b, l, _, h, dh = qkv.shape
    if dh % 2 or cos.shape != (l, dh) or sin.shape != (l, dh) or cos.dtype != torch.float32 \
            or sin.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"cos, sin must be contiguous fp32 ({l}, {dh}) tables, got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    q = torch.empty((b, l, h, dh), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty_like(q)
    _rotary_qk_kernel[(b * l,)](
        qkv, cos, sin, q, k, l, h, qkv.stride(1),
        HALF=dh // 2, DTYPE=_TL_DTYPES[qkv.dtype], BLOCK_H=triton.next_power_of_2(h),
        BLOCK_J=triton.next_power_of_2(dh // 2), num_warps=4,
    )  # fmt: skip
    return q, k
