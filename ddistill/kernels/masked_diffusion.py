"""Fused linear + masked-diffusion (MDLM, SUBS parameterisation) loss.

MDLM (Sahoo et al. 2024, arXiv:2406.07524) with the SUBS parameterisation: the mask logit is removed from the
softmax and unmasked positions carry over the observed token, so unmasked rows have exactly zero loss and
gradient. For a masked row r with clean token y_r = x0_r and row logits z_r = h_r W[:V]ᵀ + b[:V]::

    lse'_r = log Σ_{j < V, j ≠ mask_id} exp(z_rj)
    loss   = Σ_{r masked} w_r · (lse'_r − z_{r,y_r}) / normalizer            w_r = −α'(t_r)/(1−α(t_r)) > 0
    ∂loss/∂z_rj = g_r · w_r / normalizer · (p'_rj − [j = y_r]),   p'_rj = exp(z_rj − lse'_r) (0 on the mask column)

where ``normalizer`` is the number of valid tokens (MDLM/DUO divide by it, not by the masked count) and g_r the
upstream gradient. Implementation (see ``_common``): masked rows are compacted first (``nonzero`` + gather), a
split-vocabulary online-LSE Triton kernel produces lse' and z_y per row without writing logits, and the backward
recomputes the logits tiles chunk by chunk (dZ kernel + two cuBLAS GEMMs); the ``(p − 1)`` at the target is
formed in fp32 before any downcast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ddistill.kernels import reference
from ddistill.kernels._common import (
    DZ_ARGS,
    LOG2E,
    STATS_ARGS,
    as_row_tensor,
    check_device,
    check_impl,
    chunked_linear_backward,
    column_sum_args,
    combine_lse,
    dot_precision,
    dz_grid,
    grouped_tile,
    kernel_configs,
    logits_tile,
    prepare_linear,
    row_blocks_grid,
    select_rows,
    store_column_sums,
    valid_columns,
    vocab_splits,
    weighted_sum,
)


@triton.autotune(configs=kernel_configs("stats"), key=["D"])
@triton.jit(do_not_specialize=STATS_ARGS)
def _ce_stats_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, s_ptr, zy_ptr,
    M, D, V_VALID, MASK_COL, COLS_PER_SPLIT, NUM_SPLITS, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_begin = pid_s * COLS_PER_SPLIT
    v_end = tl.minimum(v_begin + COLS_PER_SPLIT, V_VALID)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                        HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)  # fmt: skip
        ok = col_ok & valid_columns(cols, V_VALID, MASK_COL)
        zm = tl.where(ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((zm - m_new[:, None]) * LOG2E), axis=1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    out = rows.to(tl.int64) * NUM_SPLITS + pid_s
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)


@triton.autotune(configs=kernel_configs("dz"), key=["D"])
@triton.jit(do_not_specialize=DZ_ARGS)
def _ce_dz_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, hi_ptr, lo_ptr, scale_ptr, dz_ptr,
    M, D, V_VALID, MASK_COL, V_START, VC, stride_h, stride_w, stride_dz, colsum_ptr, NUM_PARTS, stride_cs,
    HAS_BIAS: tl.constexpr, COLSUM: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_v = grouped_tile(tl.program_id(0), M, VC, BLOCK_M, BLOCK_V, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < VC
    cols = V_START + local
    z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                    HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)  # fmt: skip
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0.0)
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    ok = col_ok & valid_columns(cols, V_VALID, MASK_COL)
    p = tl.where(ok[None, :], tl.exp2(((z - hi[:, None]) - lo[:, None]) * LOG2E), 0.0)
    g = (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)) * scale[:, None]
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(ptrs, g.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if COLSUM:
        store_column_sums(colsum_ptr, g, pid_m, local, col_ok, NUM_PARTS, stride_cs, BLOCK_M)


def _mask_col(mask_id: int | None, vocab_size: int) -> int:
    return -1 if mask_id is None or mask_id >= vocab_size else int(mask_id)


def linear_cross_entropy_rows(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, vocab_size: int, mask_col: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Forward stats: per-row ``lse' − z_y`` (fp32) and lse' = hi + lo as two fp32 vectors, for compacted rows.

    hi and lo are separate allocations, never two rows of one (2, M) tensor: a row view at offset 4·M bytes is
    16-byte aligned only when 4 | M, and Triton compiles one kernel variant per argument alignment, so a new
    masked-row count could trigger a JIT compile in the middle of training.
    """
    num_rows, dim = hidden.shape
    splits, cols = vocab_splits(num_rows, vocab_size)
    m = torch.empty(num_rows, splits, device=hidden.device, dtype=torch.float32)
    s = torch.empty_like(m)
    zy = torch.empty_like(m)
    if num_rows > 0:
        _ce_stats_kernel[row_blocks_grid(num_rows, splits)](
            hidden, weight, bias if bias is not None else hidden, targets, m, s, zy,
            num_rows, dim, vocab_size, mask_col, cols, splits, hidden.stride(0), weight.stride(0),
            HAS_BIAS=bias is not None, PRECISION=dot_precision(hidden.dtype),
        )  # fmt: skip
    hi, lo = combine_lse(m, s)
    loss = ((hi - zy.double().sum(dim=1)) + lo).float()
    return loss, (hi.float(), lo.float())


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-row ``lse' − z_y`` of ``z = h Wᵀ + b`` (columns < vocab_size, mask column excluded); grads by recomputation."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, vocab_size, mask_col):
        loss, (hi, lo) = linear_cross_entropy_rows(hidden, weight, bias, targets, vocab_size, mask_col)
        ctx.save_for_backward(hidden, weight, bias, targets, hi, lo)
        ctx.vocab_size = vocab_size
        ctx.mask_col = mask_col
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, bias, targets, hi, lo = ctx.saved_tensors
        scale = grad_rows.float().contiguous()
        num_rows, dim = hidden.shape

        def write_dz(dz: torch.Tensor, v0: int, vc: int, colsum: torch.Tensor | None) -> None:
            _ce_dz_kernel[dz_grid(num_rows, vc)](
                hidden, weight, bias if bias is not None else hidden, targets, hi, lo, scale, dz,
                num_rows, dim, ctx.vocab_size, ctx.mask_col, v0, vc, hidden.stride(0), weight.stride(0), dz.stride(0),
                **column_sum_args(colsum, dz), HAS_BIAS=bias is not None, PRECISION=dot_precision(hidden.dtype),
                GROUP_M=8,
            )  # fmt: skip

        grad_hidden, grad_weight, grad_bias = chunked_linear_backward(
            write_dz, hidden, weight, bias is not None, ctx.vocab_size, *ctx.needs_input_grad[:3]
        )
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


@torch.compiler.disable
def _masked_diffusion_loss_triton(hidden, weight, bias, targets, row_weight, vocab_size, mask_id, is_masked, normalizer):
    check_device(hidden)
    hidden, weight, bias = prepare_linear(hidden, weight, bias, vocab_size, "masked_diffusion_loss")
    num_rows = hidden.shape[0]
    row_weight = as_row_tensor(row_weight, num_rows, hidden.device, "row_weight")
    if targets.shape != (num_rows,):
        raise ValueError(f"targets: expected shape ({num_rows},), got {tuple(targets.shape)}")
    hidden, targets, row_weight = select_rows(is_masked, num_rows, hidden, targets, row_weight, name="is_masked")
    rows = LinearCrossEntropyFunction.apply(
        hidden, weight, bias, targets.to(torch.int32).contiguous(), vocab_size, _mask_col(mask_id, vocab_size)
    )
    return weighted_sum(rows, row_weight, normalizer)


def masked_diffusion_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    row_weight: torch.Tensor | float,
    vocab_size: int,
    mask_id: int | None,
    *,
    is_masked: torch.Tensor | None = None,
    normalizer: torch.Tensor | float = 1.0,
    impl: str = "triton",
    chunk_rows: int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """MDLM SUBS loss ``Σ_{masked r} w_r (lse'_r − z_{r,x0_r}) / normalizer`` without materialising logits.

    With ``label_smoothing`` ε > 0 each row's cross-entropy is smoothed uniformly over the K kept columns (real tokens
    but the mask): ``lse'_r − (1 − ε)·z_{r,y} − ε·Σ_j z_rj / K``, the loss of DiMO's auxiliary model (and of
    ``F.cross_entropy(label_smoothing=ε)`` on those columns); ``impl="triton"`` supports only ε = 0.

    Args:
        hidden: (N, d) final hidden states (input of the output linear).
        weight: (V_pad, d) output weight (may be a ZeRO-3 gathered parameter); rows ≥ ``vocab_size`` are padding.
        bias: (V_pad,) or None.
        targets: (N,) clean tokens x0.
        row_weight: (N,) or scalar positive weights ``−α'/(1−α)``.
        vocab_size: number of real columns; ``mask_id`` (< vocab_size, or None) is excluded from the softmax.
        is_masked: (N,) bool, rows where x_t == MASK (None: every row).
        normalizer: divisor (number of valid tokens), float or 0-d tensor.
        impl: ``"triton"`` (fused kernel), ``"chunked"`` (cuBLAS row chunks with the gradient formed in the forward,
            ``ddistill.kernels.chunked``) or ``"torch"`` (reference: logits + SUBS log-softmax).
        chunk_rows: rows per chunk of ``impl="chunked"`` (None: from the ``DDISTILL_CHUNK_MB`` workspace budget).
    """
    check_impl(impl)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must lie in [0, 1)")
    if label_smoothing > 0.0 and impl == "triton":
        raise ValueError("label_smoothing > 0 needs impl='chunked' or impl='torch' (the Triton kernel has none)")
    if impl == "chunked":
        from ddistill.kernels.chunked import masked_diffusion_loss_chunked

        return masked_diffusion_loss_chunked(hidden, weight, bias, targets, row_weight, vocab_size, mask_id, is_masked,
                                             normalizer, chunk_rows, label_smoothing)  # fmt: skip
    if impl == "torch":
        return reference.masked_diffusion_loss_reference(hidden, weight, bias, targets, row_weight, vocab_size, mask_id,
                                                         is_masked=is_masked, normalizer=normalizer,
                                                         label_smoothing=label_smoothing)  # fmt: skip
    return _masked_diffusion_loss_triton(
        hidden, weight, bias, targets, row_weight, vocab_size, mask_id, is_masked, normalizer
    )
