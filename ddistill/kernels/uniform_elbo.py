"""Fused linear + uniform-state (DUO / UDLM) ELBO.

DUO (Sahoo et al., arXiv:2506.10892) closed form of the UDLM per-token NELBO (``DUO_BASE.nll_per_token``).
Per row with logits z over K = vocab_size classes, p = softmax(z), i = x_t, m = x_0, α = α_t, α' = dα/dt < 0::

    u = Kα/(1−α),   x̄θ_j = Kα p_j + (1−α) = (1−α)(1 + u p_j),   L_j = log1p(u p_j)
    x̄_i = (1−α) + Kα[m = i],   κ = (1−α)/(Kα + 1 − α),   c2 = κ[m = i] + [m ≠ i]
    S'  = Σ_j log(x̄θ_j / x̄θ_i) = Σ_j L_j − K L_i
    term1 = K (1/x̄_i − 1/x̄θ_i)
    term2 = −c2 S' − u (L_m − L_i)[m ≠ i] + ((K−1)κ[m = i] − [m ≠ i]/κ) log κ
    loss  = α'/(Kα) · (term1 − term2)

Gradient (coeff = α'/(Kα), r_j = u p_j/(1 + u p_j), R = Σ_j r_j, upstream gradient g)::

    ∂loss/∂z_k = g·coeff·c2 (r_k − p_k R) + A (δ_{k,i} − p_k) + B (δ_{k,m} − p_k)
    A = g·coeff·(K r_i/x̄θ_i − c2 K r_i − u r_i [m ≠ i]),   B = g·coeff·u r_m [m ≠ i]

Passes: (1) online LSE plus z_i, z_m; (2) Σ_j L_j and R (fp32 within a tile, fp64 across tiles and splits: the
sum of K ≈ 50k terms is later differenced against K·L_i, which is then done in fp64); (3, backward) recompute the
tiles and write dZ = c_r r − c_p p + A δ_i + B δ_m with per-row constants c_r, c_p = c_r R + A + B, A, B.
Every row contributes (no compaction); no B×L×V intermediate exists.
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
    separate_buffers,
    store_column_sums,
    vocab_splits,
    weighted_sum,
)


@triton.jit
def _log1p(x):
    # Goldberg's trick: exact-rounding-aware log1p without libdevice (also runs in the interpreter).
    y = 1.0 + x
    exact = y == 1.0
    return tl.where(exact, x, tl.log(y) * x / tl.where(exact, 1.0, y - 1.0))


@triton.autotune(configs=kernel_configs("stats"), key=["D"])
@triton.jit(do_not_specialize=STATS_ARGS)
def _elbo_stats_kernel(
    h_ptr, w_ptr, b_ptr, xt_ptr, x0_ptr, m_ptr, s_ptr, zt_ptr, z0_ptr,
    M, D, V_VALID, COLS_PER_SPLIT, NUM_SPLITS, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    xt = tl.load(xt_ptr + rows, mask=row_ok, other=-1)
    x0 = tl.load(x0_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_xt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_x0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_begin = pid_s * COLS_PER_SPLIT
    v_end = tl.minimum(v_begin + COLS_PER_SPLIT, V_VALID)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                        HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)  # fmt: skip
        zm = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((zm - m_new[:, None]) * LOG2E), axis=1)
        m = m_new
        z_xt += tl.sum(tl.where(cols[None, :] == xt[:, None], z, 0.0), axis=1)
        z_x0 += tl.sum(tl.where(cols[None, :] == x0[:, None], z, 0.0), axis=1)
    out = rows.to(tl.int64) * NUM_SPLITS + pid_s
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, z_xt, mask=row_ok)
    tl.store(z0_ptr + out, z_x0, mask=row_ok)


@triton.autotune(configs=kernel_configs("stats"), key=["D"])
@triton.jit(do_not_specialize=STATS_ARGS)
def _elbo_sums_kernel(
    h_ptr, w_ptr, b_ptr, hi_ptr, lo_ptr, u_ptr, sum_log_ptr, sum_r_ptr,
    M, D, V_VALID, COLS_PER_SPLIT, NUM_SPLITS, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0.0)
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0)
    u = tl.load(u_ptr + rows, mask=row_ok, other=0.0)
    sum_log = tl.zeros((BLOCK_M,), dtype=tl.float64)
    sum_r = tl.zeros((BLOCK_M,), dtype=tl.float64)
    v_begin = pid_s * COLS_PER_SPLIT
    v_end = tl.minimum(v_begin + COLS_PER_SPLIT, V_VALID)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                        HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)  # fmt: skip
        up = u[:, None] * tl.exp2(((z - hi[:, None]) - lo[:, None]) * LOG2E)
        ok = col_ok[None, :]
        sum_log += tl.sum(tl.where(ok, _log1p(up), 0.0), axis=1).to(tl.float64)
        sum_r += tl.sum(tl.where(ok, up / (1.0 + up), 0.0), axis=1).to(tl.float64)
    out = rows.to(tl.int64) * NUM_SPLITS + pid_s
    tl.store(sum_log_ptr + out, sum_log, mask=row_ok)
    tl.store(sum_r_ptr + out, sum_r, mask=row_ok)


@triton.autotune(configs=kernel_configs("dz"), key=["D"])
@triton.jit(do_not_specialize=DZ_ARGS)
def _elbo_dz_kernel(
    h_ptr, w_ptr, b_ptr, xt_ptr, x0_ptr, hi_ptr, lo_ptr, u_ptr, cr_ptr, cp_ptr, a_ptr, b2_ptr, dz_ptr,
    M, D, V_VALID, V_START, VC, stride_h, stride_w, stride_dz, colsum_ptr, NUM_PARTS, stride_cs,
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
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0.0)
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0)
    u = tl.load(u_ptr + rows, mask=row_ok, other=0.0)
    cr = tl.load(cr_ptr + rows, mask=row_ok, other=0.0)
    cp = tl.load(cp_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    b2 = tl.load(b2_ptr + rows, mask=row_ok, other=0.0)
    xt = tl.load(xt_ptr + rows, mask=row_ok, other=-1)
    x0 = tl.load(x0_ptr + rows, mask=row_ok, other=-1)
    ok = (col_ok & (cols < V_VALID))[None, :]
    p = tl.where(ok, tl.exp2(((z - hi[:, None]) - lo[:, None]) * LOG2E), 0.0)
    up = u[:, None] * p
    g = cr[:, None] * (up / (1.0 + up)) - cp[:, None] * p
    g += tl.where(cols[None, :] == xt[:, None], a[:, None], 0.0)
    g += tl.where(cols[None, :] == x0[:, None], b2[:, None], 0.0)
    g = tl.where(ok, g, 0.0)
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(ptrs, g.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if COLSUM:
        store_column_sums(colsum_ptr, g, pid_m, local, col_ok, NUM_PARTS, stride_cs, BLOCK_M)


def _row_terms(hi, lo, z_xt, z_x0, sum_log, sum_r, xt, x0, alpha, dalpha, num_classes):
    """Per-row loss and gradient constants (fp64) from the pass-1/pass-2 statistics."""
    alpha = alpha.double()
    dalpha = dalpha.double()
    k = float(num_classes)
    u = k * alpha / (1.0 - alpha)
    p_i = torch.exp((z_xt - hi) - lo)
    p_m = torch.exp((z_x0 - hi) - lo)
    l_i = torch.log1p(u * p_i)
    l_m = torch.log1p(u * p_m)
    same = (xt == x0).double()
    diff = 1.0 - same
    kappa = (1.0 - alpha) / (k * alpha + 1.0 - alpha)
    c2 = kappa * same + diff
    xbar_i = (1.0 - alpha) + k * alpha * same
    xbar_theta_i = (1.0 - alpha) * (1.0 + u * p_i)
    s_prime = sum_log - k * l_i
    term1 = k * (1.0 / xbar_i - 1.0 / xbar_theta_i)
    term2 = -c2 * s_prime - u * (l_m - l_i) * diff + ((k - 1.0) * kappa * same - diff / kappa) * torch.log(kappa)
    coeff = dalpha / (k * alpha)
    loss = coeff * (term1 - term2)
    r_i = u * p_i / (1.0 + u * p_i)
    r_m = u * p_m / (1.0 + u * p_m)
    consts = dict(
        u=u,
        cr=coeff * c2,
        a=coeff * (k * r_i / xbar_theta_i - c2 * k * r_i - u * r_i * diff),
        b=coeff * u * r_m * diff,
        sum_r=sum_r,
    )
    return loss, consts


class LinearUniformElboFunction(torch.autograd.Function):
    """Per-row DUO NELBO of ``z = h Wᵀ + b`` (columns < vocab_size); grads by recomputation."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, xt, x0, alpha, dalpha, vocab_size):
        num_rows, dim = hidden.shape
        splits, cols = vocab_splits(num_rows, vocab_size)
        parts = separate_buffers(4, num_rows, splits, device=hidden.device, dtype=torch.float32)
        sums = separate_buffers(2, num_rows, splits, device=hidden.device, dtype=torch.float64)
        b_arg = bias if bias is not None else hidden
        common = dict(HAS_BIAS=bias is not None, PRECISION=dot_precision(hidden.dtype))
        grid = row_blocks_grid(num_rows, splits)
        if num_rows > 0:
            _elbo_stats_kernel[grid](
                hidden, weight, b_arg, xt, x0, *parts, num_rows, dim, vocab_size, cols, splits,
                hidden.stride(0), weight.stride(0), **common,
            )  # fmt: skip
        hi, lo = combine_lse(parts[0], parts[1])
        hi32, lo32 = hi.float(), lo.float()
        u = (vocab_size * alpha.double() / (1.0 - alpha.double())).float()
        if num_rows > 0:
            _elbo_sums_kernel[grid](
                hidden, weight, b_arg, hi32, lo32, u, sums[0], sums[1], num_rows, dim, vocab_size, cols, splits,
                hidden.stride(0), weight.stride(0), **common,
            )  # fmt: skip
        loss, consts = _row_terms(
            hi, lo, parts[2].double().sum(1), parts[3].double().sum(1), sums[0].sum(1), sums[1].sum(1),
            xt, x0, alpha, dalpha, vocab_size,
        )  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, xt, x0, hi32, lo32, *(consts[k] for k in ("u", "cr", "a", "b", "sum_r")))
        ctx.vocab_size = vocab_size
        return loss.float()

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, bias, xt, x0, hi32, lo32, u, cr, a, b, sum_r = ctx.saved_tensors
        g = grad_rows.double()
        cr, a, b = cr * g, a * g, b * g
        cp = cr * sum_r + a + b
        u32, cr32, cp32, a32, b32 = (t.float().contiguous() for t in (u, cr, cp, a, b))
        num_rows, dim = hidden.shape

        def write_dz(dz: torch.Tensor, v0: int, vc: int, colsum: torch.Tensor | None) -> None:
            _elbo_dz_kernel[dz_grid(num_rows, vc)](
                hidden, weight, bias if bias is not None else hidden, xt, x0, hi32, lo32, u32, cr32, cp32, a32, b32, dz,
                num_rows, dim, ctx.vocab_size, v0, vc, hidden.stride(0), weight.stride(0), dz.stride(0),
                **column_sum_args(colsum, dz), HAS_BIAS=bias is not None, PRECISION=dot_precision(hidden.dtype),
                GROUP_M=8,
            )  # fmt: skip

        grad_hidden, grad_weight, grad_bias = chunked_linear_backward(
            write_dz, hidden, weight, bias is not None, ctx.vocab_size, *ctx.needs_input_grad[:3]
        )
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


@torch.compiler.disable
def _uniform_elbo_triton(hidden, weight, bias, xt, x0, alpha_t, alpha_prime_t, vocab_size, row_weight, normalizer):
    check_device(hidden)
    hidden, weight, bias = prepare_linear(hidden, weight, bias, vocab_size, "uniform_elbo_loss")
    num_rows = hidden.shape[0]
    for name, t in (("xt", xt), ("x0", x0)):
        if t.shape != (num_rows,):
            raise ValueError(f"{name}: expected shape ({num_rows},), got {tuple(t.shape)}")
    alpha = as_row_tensor(alpha_t, num_rows, hidden.device, "alpha_t")
    dalpha = as_row_tensor(alpha_prime_t, num_rows, hidden.device, "alpha_prime_t")
    w = as_row_tensor(row_weight, num_rows, hidden.device, "row_weight")
    rows = LinearUniformElboFunction.apply(
        hidden, weight, bias, xt.to(torch.int32).contiguous(), x0.to(torch.int32).contiguous(), alpha, dalpha, vocab_size
    )
    return weighted_sum(rows, w, normalizer)


def uniform_elbo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    xt: torch.Tensor,
    x0: torch.Tensor,
    alpha_t: torch.Tensor | float,
    alpha_prime_t: torch.Tensor | float,
    vocab_size: int,
    *,
    row_weight: torch.Tensor | float = 1.0,
    normalizer: torch.Tensor | float = 1.0,
    impl: str = "triton",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Σ_r w_r NELBO_DUO(z_r; x_t, x_0, α_r, α'_r) / normalizer with K = vocab_size, logits never materialised.

    ``alpha_t``/``alpha_prime_t`` are per row (N,) (expand per-sequence values with ``repeat_interleave``);
    0 < α < 1 and α' < 0 (the loss is then ≥ 0). ``impl``: "triton" (fused kernels), "chunked" (cuBLAS row chunks,
    gradient in the forward, ``chunk_rows`` rows a chunk: ``ddistill.kernels.chunked``) or "torch" (reference).
    """
    check_impl(impl)
    if impl == "chunked":
        from ddistill.kernels.chunked import uniform_elbo_loss_chunked

        return uniform_elbo_loss_chunked(
            hidden, weight, bias, xt, x0, alpha_t, alpha_prime_t, vocab_size, row_weight, normalizer, chunk_rows
        )
    if impl == "torch":
        return reference.uniform_elbo_loss_reference(
            hidden, weight, bias, xt, x0, alpha_t, alpha_prime_t, vocab_size, row_weight=row_weight, normalizer=normalizer
        )
    return _uniform_elbo_triton(hidden, weight, bias, xt, x0, alpha_t, alpha_prime_t, vocab_size, row_weight, normalizer)
