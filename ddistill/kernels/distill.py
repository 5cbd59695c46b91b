"""Fused two-linear distillation divergences and the DiMO generator surrogate.

Student logits s = (h_s W_sᵀ + b_s)/τ (with grad), teacher logits t = (h_t W_tᵀ + b_t)/τ (constant), both restricted
to the real vocabulary (columns < V) minus an optional excluded column (the mask id under SUBS); q = softmax(s),
p = softmax(t), lse_s/lse_t their log-sum-exps. Per row (SDTT arXiv:2410.21035 / DUO arXiv:2506.10892 distillation):

* ``kl_fwd``  KL(p‖q) = Σ p(t − s) + lse_s − lse_t                 ∂/∂s = q − p
* ``kl_rev``  KL(q‖p) = Σ q(s − t) − lse_s + lse_t                 ∂/∂s = q ⊙ (a − Σ q a),  a = log q − log p
* ``jsd``     JSD_β = β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q     ∂/∂s = (1−β) q ⊙ (a − Σ q a),  a = log q − log m
* ``tvd``     ½ Σ |q − p|                                           ∂/∂s = ½ q ⊙ (u − Σ q u),  u = sign(q − p)

(each ∂/∂s is then divided by τ for the logits before the temperature). β ∈ (0, 1) is continuous — there is no
special-cased β = 0/1 with a different scale; use ``kl_fwd``/``kl_rev`` for the end points.
loss = Σ_{rows in mask} w_r D_r / normalizer. Logits of neither side reach HBM and stay fp32 until the difference
is taken. Forward and reverse KL need one stats pass (both LSEs plus a rescaled Σ e^{t−m}(t−s) accumulator); JSD
and TVD need a second pass for the loss and the row constant Σ q a (Σ q u). The backward recomputes both tiles and
writes the student dZ chunk by chunk (``_common``).

**DiMO** (arXiv:2503.15457): the generator G receives, at the rows masked in x̃_t, the gradient
g = (1 − β)(q − p) + β q ⊙ (log q − log p − KL(q‖p)), q = p_aux, p = p_teacher (the generalized Jeffreys
divergence's logit gradient; β = 0 is DiMO's released forward KL, g = q − p) directly on its logits z_G. DiMO
injects it through the surrogate ½‖z_G − sg(z_G − g)‖², whose value is ½‖g‖² (the logged ``loss_dm``) and whose
gradient w.r.t. z_G is exactly g. :func:`dimo_generator_loss` implements that surrogate: its value
Σ_r w_r ½‖g_r‖²/normalizer is computed from the aux and teacher linears only (two passes; the row constant
KL(q‖p) comes from the first), and its backward recomputes g tile by tile and pushes w_r g_r/normalizer through the
generator's linear, so ∂loss/∂θ_G = Σ_r w_r/normalizer Σ_v g_rv ∂z_rv/∂θ_G. Aux and teacher inputs are constants.
"""

from __future__ import annotations

import math

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
    separate_buffers,
    store_column_sums,
    valid_columns,
    vocab_splits,
    weighted_sum,
)

KINDS = {"kl_fwd": 0, "kl_rev": 1, "jsd": 2, "tvd": 3}
_DIMO = 4  # row-sum kind of the DiMO value ½‖g‖²
_DIMO_GRAD = 5  # dz kind of the DiMO gradient g with β ≠ 0


@triton.autotune(configs=kernel_configs("pair"), key=["DS", "DT"])
@triton.jit(do_not_specialize=STATS_ARGS)
def _pair_stats_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
    ms_ptr, ss_ptr, mt_ptr, st_ptr, af_ptr, ar_ptr,
    M, DS, DT, V_VALID, MASK_COL, COLS_PER_SPLIT, NUM_SPLITS,
    stride_hs, stride_ws, stride_ht, stride_wt, INV_TAU,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    m_s = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    m_t = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    s_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_f = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ e^{t − m_t} (t − s)
    a_r = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ e^{s − m_s} (s − t)
    v_begin = pid_s * COLS_PER_SPLIT
    v_end = tl.minimum(v_begin + COLS_PER_SPLIT, V_VALID)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        zs = logits_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, row_ok, col_ok, DS, stride_hs, stride_ws,
                         HAS_BS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION) * INV_TAU  # fmt: skip
        zt = logits_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok, DT, stride_ht, stride_wt,
                         HAS_BT, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION) * INV_TAU  # fmt: skip
        ok = (col_ok & valid_columns(cols, V_VALID, MASK_COL))[None, :]
        zs_m = tl.where(ok, zs, float("-inf"))
        zt_m = tl.where(ok, zt, float("-inf"))
        diff = tl.where(ok, zt - zs, 0.0)
        ms_new = tl.maximum(m_s, tl.max(zs_m, axis=1))
        mt_new = tl.maximum(m_t, tl.max(zt_m, axis=1))
        es = tl.exp2((zs_m - ms_new[:, None]) * LOG2E)
        et = tl.exp2((zt_m - mt_new[:, None]) * LOG2E)
        rs = tl.exp2((m_s - ms_new) * LOG2E)
        rt = tl.exp2((m_t - mt_new) * LOG2E)
        s_s = s_s * rs + tl.sum(es, axis=1)
        s_t = s_t * rt + tl.sum(et, axis=1)
        a_r = a_r * rs - tl.sum(es * diff, axis=1)
        a_f = a_f * rt + tl.sum(et * diff, axis=1)
        m_s = ms_new
        m_t = mt_new
    out = rows.to(tl.int64) * NUM_SPLITS + pid_s
    tl.store(ms_ptr + out, m_s, mask=row_ok)
    tl.store(ss_ptr + out, s_s, mask=row_ok)
    tl.store(mt_ptr + out, m_t, mask=row_ok)
    tl.store(st_ptr + out, s_t, mask=row_ok)
    tl.store(af_ptr + out, a_f, mask=row_ok)
    tl.store(ar_ptr + out, a_r, mask=row_ok)


@triton.jit
def _row_stats(lse_ptr, rows, row_ok, M):
    """The per-row statistics of a row block, loaded once per program: ``lse_ptr`` holds (5, M) fp32 rows hi_s, lo_s,
    hi_t, lo_t, gap with lse = hi + lo and gap = lse_s − lse_t taken in fp64."""
    hi_s = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    lo_s = tl.load(lse_ptr + M + rows, mask=row_ok, other=0.0)
    hi_t = tl.load(lse_ptr + 2 * M + rows, mask=row_ok, other=0.0)
    lo_t = tl.load(lse_ptr + 3 * M + rows, mask=row_ok, other=0.0)
    gap = tl.load(lse_ptr + 4 * M + rows, mask=row_ok, other=0.0)
    return hi_s, lo_s, hi_t, lo_t, gap


@triton.jit
def _pair_probs(zs, zt, hi_s, lo_s, hi_t, lo_t, gap, ok):
    """Per tile: q, p (0 outside the valid columns) and a = log q − log p (finite everywhere).

    ``a = (z_s − z_t) − gap`` subtracts the nearly equal logits first, so when p ≈ q (a distilled student) it keeps
    the digits that ``log q − log p`` of two ≈ −10 numbers would lose.
    """
    q = tl.where(ok, tl.exp2(((zs - hi_s[:, None]) - lo_s[:, None]) * LOG2E), 0.0)
    p = tl.where(ok, tl.exp2(((zt - hi_t[:, None]) - lo_t[:, None]) * LOG2E), 0.0)
    a = (zs - zt) - gap[:, None]
    return q, p, a


@triton.jit
def _log_q_over_m(a, BETA, LOG_BETA, LOG_1M_BETA):
    """log q − log m for m = βp + (1−β)q, from a = log q − log p: −log(1 + β·(e^{−a} − 1)).

    For |a| < 0.1 (p ≈ q, where the generic form cancels) it is evaluated by the series of expm1 (to a⁶) and of
    log1p(y) = 2·atanh(y/(2+y)) (to s⁹, |s| < 0.06) — additions and products only, so the GPU's approximate
    exp2/log2 cannot spoil it; elsewhere −logaddexp(log β − a, log(1−β)).
    """
    x = -a
    em1 = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0))))))
    y = BETA * em1
    u = y / (2.0 + y)
    u2 = u * u
    series = -2.0 * u * (1.0 + u2 * (1.0 / 3.0 + u2 * (1.0 / 5.0 + u2 * (1.0 / 7.0 + u2 * (1.0 / 9.0)))))
    b1 = LOG_BETA - a
    mx = tl.maximum(b1, LOG_1M_BETA)
    generic = -(mx + tl.log2(tl.exp2((b1 - mx) * LOG2E) + tl.exp2((LOG_1M_BETA - mx) * LOG2E)) / LOG2E)
    return tl.where(tl.abs(a) < 0.1, series, generic)


@triton.autotune(configs=kernel_configs("pair"), key=["DS", "DT"])
@triton.jit(do_not_specialize=STATS_ARGS)
def _pair_rowsum_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, lse_ptr, loss_ptr, c_ptr, crow_ptr,
    M, DS, DT, V_VALID, MASK_COL, COLS_PER_SPLIT, NUM_SPLITS,
    stride_hs, stride_ws, stride_ht, stride_wt, INV_TAU, BETA, LOG_BETA, LOG_1M_BETA,
    KIND: tl.constexpr, JEFFREYS: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    hi_s, lo_s, hi_t, lo_t, gap = _row_stats(lse_ptr, rows, row_ok, M)
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if JEFFREYS:  # DiMO with β ≠ 0: the row constant KL(q‖p) of the first pass
        kl_row = tl.load(crow_ptr + rows, mask=row_ok, other=0.0)
    v_begin = pid_s * COLS_PER_SPLIT
    v_end = tl.minimum(v_begin + COLS_PER_SPLIT, V_VALID)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        zs = logits_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, row_ok, col_ok, DS, stride_hs, stride_ws,
                         HAS_BS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION) * INV_TAU  # fmt: skip
        zt = logits_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok, DT, stride_ht, stride_wt,
                         HAS_BT, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION) * INV_TAU  # fmt: skip
        ok = (col_ok & valid_columns(cols, V_VALID, MASK_COL))[None, :]
        q, p, a = _pair_probs(zs, zt, hi_s, lo_s, hi_t, lo_t, gap, ok)
        if KIND == 2:
            q_m = _log_q_over_m(a, BETA, LOG_BETA, LOG_1M_BETA)  # log q − log m
            qa = q * q_m
            elem = BETA * p * (q_m - a) + (1.0 - BETA) * qa
            c += tl.sum(tl.where(ok, qa, 0.0), axis=1)
        elif KIND == 3:
            elem = 0.5 * tl.abs(q - p)
            c += tl.sum(q * tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0)), axis=1)
        elif JEFFREYS:
            g = (1.0 - BETA) * (q - p) + BETA * q * (a - kl_row[:, None])
            elem = 0.5 * g * g
        else:
            elem = 0.5 * (q - p) * (q - p)
        loss += tl.sum(tl.where(ok, elem, 0.0), axis=1)
    out = rows.to(tl.int64) * NUM_SPLITS + pid_s
    tl.store(loss_ptr + out, loss, mask=row_ok)
    tl.store(c_ptr + out, c, mask=row_ok)


@triton.autotune(configs=kernel_configs("pair"), key=["DS", "DT"])
@triton.jit(do_not_specialize=DZ_ARGS)
def _pair_dz_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, lse_ptr, c_ptr, scale_ptr, dz_ptr,
    M, DS, DT, V_VALID, MASK_COL, V_START, VC,
    stride_hs, stride_ws, stride_ht, stride_wt, stride_dz, INV_TAU, BETA, LOG_BETA, LOG_1M_BETA,
    colsum_ptr, NUM_PARTS, stride_cs,
    KIND: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, COLSUM: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_v = grouped_tile(tl.program_id(0), M, VC, BLOCK_M, BLOCK_V, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < VC
    cols = V_START + local
    zs = logits_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, row_ok, col_ok, DS, stride_hs, stride_ws,
                     HAS_BS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION) * INV_TAU  # fmt: skip
    zt = logits_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_ok, col_ok, DT, stride_ht, stride_wt,
                     HAS_BT, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION) * INV_TAU  # fmt: skip
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    ok = (col_ok & valid_columns(cols, V_VALID, MASK_COL))[None, :]
    hi_s, lo_s, hi_t, lo_t, gap = _row_stats(lse_ptr, rows, row_ok, M)
    q, p, a = _pair_probs(zs, zt, hi_s, lo_s, hi_t, lo_t, gap, ok)
    if KIND == 0:
        g = q - p
    elif KIND == 1:
        g = q * (a - c[:, None])
    elif KIND == 2:
        g = (1.0 - BETA) * q * (_log_q_over_m(a, BETA, LOG_BETA, LOG_1M_BETA) - c[:, None])
    elif KIND == 5:
        g = (1.0 - BETA) * (q - p) + BETA * q * (a - c[:, None])
    else:
        g = 0.5 * q * (tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0)) - c[:, None])
    g = tl.where(ok, g, 0.0) * scale[:, None]
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(ptrs, g.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if COLSUM:
        store_column_sums(colsum_ptr, g, pid_m, local, col_ok, NUM_PARTS, stride_cs, BLOCK_M)


def _mask_col(mask_id: int | None, vocab_size: int) -> int:
    return -1 if mask_id is None or mask_id >= vocab_size else int(mask_id)


class _Pair:
    """The two constant-shape linears (a "student" side q and a "teacher" side p) of one fused pass."""

    def __init__(self, hs, ws, bs, ht, wt, bt, vocab_size, mask_col, inv_tau, beta):
        self.hs, self.ws, self.bs, self.ht, self.wt, self.bt = hs, ws, bs, ht, wt, bt
        self.vocab_size, self.mask_col, self.inv_tau, self.beta = vocab_size, mask_col, inv_tau, beta
        self.num_rows = hs.shape[0]

    def operands(self):
        hs, ws, ht, wt = self.hs, self.ws, self.ht, self.wt
        return (hs, ws, self.bs if self.bs is not None else hs, ht, wt, self.bt if self.bt is not None else ht)

    def common(self):
        return dict(HAS_BS=self.bs is not None, HAS_BT=self.bt is not None, PRECISION=dot_precision(self.hs.dtype))

    def dims(self):
        return self.hs.shape[1], self.ht.shape[1]

    def strides(self):
        return self.hs.stride(0), self.ws.stride(0), self.ht.stride(0), self.wt.stride(0)

    def _beta_args(self):
        beta = self.beta  # the JSD's β in (0, 1), or DiMO's Jeffreys β (any real; its logs are unused then)
        return beta, float(torch.tensor(beta).log()), float(torch.tensor(1.0 - beta).log())

    def stats(self) -> dict[str, torch.Tensor]:
        """Per-row (5, M) fp32 [hi_s, lo_s, hi_t, lo_t, lse_s − lse_t] (lse = hi + lo, the gap taken in fp64) and
        the one-pass forward / reverse KL (fp64)."""
        num_rows = self.num_rows
        splits, cols = vocab_splits(num_rows, self.vocab_size)
        parts = separate_buffers(6, num_rows, splits, device=self.hs.device, dtype=torch.float32)
        if num_rows > 0:
            _pair_stats_kernel[row_blocks_grid(num_rows, splits)](
                *self.operands(), *parts, num_rows, *self.dims(), self.vocab_size, self.mask_col, cols, splits,
                *self.strides(), self.inv_tau, **self.common(),
            )  # fmt: skip
        m_s, s_s, m_t, s_t, a_f, a_r = (p.double() for p in parts)
        hi_s, lo_s = combine_lse(m_s, s_s)
        hi_t, lo_t = combine_lse(m_t, s_t)

        def mean_under(m, s, a):
            w = torch.exp(m - m.max(dim=1, keepdim=True).values)
            return (a * w).sum(1) / (s * w).sum(1)

        lse_gap = (hi_s - hi_t) + (lo_s - lo_t)  # lse_s − lse_t
        kl_fwd = mean_under(m_t, s_t, a_f) + lse_gap
        kl_rev = mean_under(m_s, s_s, a_r) - lse_gap
        lse = torch.stack([hi_s, lo_s, hi_t, lo_t, lse_gap]).float().contiguous()
        return dict(lse=lse, kl_fwd=kl_fwd, kl_rev=kl_rev)

    def rowsum(self, kind: int, lse: torch.Tensor, kl_row: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Second pass: per-row loss and gradient row constant (fp64) for JSD / TVD / the DiMO value (`kl_row`:
        the fp32 row constant KL(q‖p) when DiMO's β ≠ 0)."""
        num_rows = self.num_rows
        splits, cols = vocab_splits(num_rows, self.vocab_size)
        loss = torch.empty(num_rows, splits, device=self.hs.device, dtype=torch.float32)
        c = torch.empty_like(loss)
        if num_rows > 0:
            _pair_rowsum_kernel[row_blocks_grid(num_rows, splits)](
                *self.operands(), lse, loss, c, lse if kl_row is None else kl_row, num_rows, *self.dims(),
                self.vocab_size, self.mask_col, cols, splits, *self.strides(), self.inv_tau, *self._beta_args(),
                KIND=kind, JEFFREYS=kl_row is not None, **self.common(),
            )  # fmt: skip
        return loss.double().sum(1), c.double().sum(1)

    def write_dz(self, kind: int, lse, c, scale):
        def write(dz: torch.Tensor, v0: int, vc: int, colsum: torch.Tensor | None) -> None:
            _pair_dz_kernel[dz_grid(self.num_rows, vc)](
                *self.operands(), lse, c, scale, dz, self.num_rows, *self.dims(), self.vocab_size,
                self.mask_col, v0, vc, *self.strides(), dz.stride(0), self.inv_tau, *self._beta_args(),
                **column_sum_args(colsum, dz), KIND=kind, GROUP_M=8, **self.common(),
            )  # fmt: skip

        return write


class LinearDivergenceFunction(torch.autograd.Function):
    """Per-row divergence D(q_student, p_teacher) of two fused linears; grads for the student linear only."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, vocab_size, mask_col, kind, beta, inv_tau):
        pair = _Pair(hs, ws, bs, ht, wt, bt, vocab_size, mask_col, inv_tau, beta)
        code = KINDS[kind]
        st = pair.stats()
        if code in (0, 1):
            loss = st[kind]
            c = loss.float()
        else:
            loss, c = pair.rowsum(code, st["lse"])
            c = c.float()
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, st["lse"], c)
        ctx.args = (vocab_size, mask_col, inv_tau, beta, code)
        return loss.float()

    @staticmethod
    def backward(ctx, grad_rows):
        hs, ws, bs, ht, wt, bt, lse, c = ctx.saved_tensors
        vocab_size, mask_col, inv_tau, beta, code = ctx.args
        pair = _Pair(hs, ws, bs, ht, wt, bt, vocab_size, mask_col, inv_tau, beta)
        scale = (grad_rows.float() * inv_tau).contiguous()
        grads = chunked_linear_backward(
            pair.write_dz(code, lse, c, scale), hs, ws, bs is not None, vocab_size, *ctx.needs_input_grad[:3]
        )
        grad_bias = grads[2].to(bs.dtype) if grads[2] is not None else None
        return grads[0], grads[1], grad_bias, None, None, None, None, None, None, None, None


class DimoSurrogateFunction(torch.autograd.Function):
    """Per-row ½‖g‖², g = (1 − β)(q − p) + β q ⊙ (log q − log p − KL(q‖p)), q = p_aux, p = p_teacher; backward sends
    g·grad through the generator linear."""

    @staticmethod
    def forward(ctx, hg, wg, bg, ha, wa, ba, ht, wt, bt, vocab_size, mask_col, beta):
        pair = _Pair(ha, wa, ba, ht, wt, bt, vocab_size, mask_col, 1.0, beta)
        st = pair.stats()
        kl_row = st["kl_rev"].float().contiguous() if beta != 0.0 else None  # KL(q‖p), q on the "student" side
        value, _ = pair.rowsum(_DIMO, st["lse"], kl_row)
        ctx.save_for_backward(hg, wg, bg, ha, wa, ba, ht, wt, bt, st["lse"], kl_row)
        ctx.args = (vocab_size, mask_col, beta)
        return value.float()

    @staticmethod
    def backward(ctx, grad_rows):
        hg, wg, bg, ha, wa, ba, ht, wt, bt, lse, kl_row = ctx.saved_tensors
        vocab_size, mask_col, beta = ctx.args
        pair = _Pair(ha, wa, ba, ht, wt, bt, vocab_size, mask_col, 1.0, beta)
        scale = grad_rows.float().contiguous()
        if beta == 0.0:
            write = pair.write_dz(KINDS["kl_fwd"], lse, torch.zeros_like(scale), scale)  # q − p with q = p_aux
        else:
            write = pair.write_dz(_DIMO_GRAD, lse, kl_row, scale)
        grads = chunked_linear_backward(write, hg, wg, bg is not None, vocab_size, *ctx.needs_input_grad[:3])
        grad_bias = grads[2].to(bg.dtype) if grads[2] is not None else None
        return (grads[0], grads[1], grad_bias) + (None,) * 9


def _check_rows(name: str, hidden: torch.Tensor, num_rows: int) -> None:
    if hidden.shape[0] != num_rows:
        raise ValueError(f"{name}: expected {num_rows} rows, got {hidden.shape[0]}")


@torch.compiler.disable
def _distill_loss_triton(hs, ws, bs, ht, wt, bt, row_weight, vocab_size, kind, beta, temperature, mask_id, row_mask, normalizer):
    check_device(hs)
    hs, ws, bs = prepare_linear(hs, ws, bs, vocab_size, "student")
    ht, wt, bt = prepare_linear(ht.detach(), wt.detach(), None if bt is None else bt.detach(), vocab_size, "teacher")
    if ht.dtype != hs.dtype:
        ht, wt = ht.to(hs.dtype), wt.to(hs.dtype)
    num_rows = hs.shape[0]
    _check_rows("teacher_hidden", ht, num_rows)
    w = as_row_tensor(row_weight, num_rows, hs.device, "row_weight")
    hs, ht, w = select_rows(row_mask, num_rows, hs, ht, w)
    rows = LinearDivergenceFunction.apply(
        hs, ws, bs, ht.contiguous(), wt, bt, vocab_size, _mask_col(mask_id, vocab_size), kind, beta, 1.0 / temperature
    )
    return weighted_sum(rows, w, normalizer)


def distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    row_weight: torch.Tensor | float,
    vocab_size: int,
    *,
    kind: str = "kl_rev",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask_id: int | None = None,
    row_mask: torch.Tensor | None = None,
    normalizer: torch.Tensor | float = 1.0,
    impl: str = "triton",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Σ_{r in row_mask} w_r D_kind(softmax(s_r) ‖ softmax(t_r)) / normalizer, logits never materialised.

    ``kind`` ∈ {"kl_fwd", "kl_rev", "jsd", "tvd"} (see module docstring; kl_rev = KL(student‖teacher), SDTT/DUO's
    ``kl-bwd``). The teacher side is detached. ``mask_id`` (if < vocab_size) is excluded from both softmaxes (SUBS).
    ``impl``: "triton" (fused kernels), "chunked" (cuBLAS row chunks, gradient in the forward, ``chunk_rows`` rows a
    chunk: ``ddistill.kernels.chunked``) or "torch" (reference).
    """
    check_impl(impl)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {tuple(KINDS)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta={beta!r}: the generalized JSD needs 0 < beta < 1 (use kl_fwd / kl_rev for the ends)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    args = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, row_weight, vocab_size)
    if impl == "chunked":
        from ddistill.kernels.chunked import distill_loss_chunked

        return distill_loss_chunked(*args, kind, beta, temperature, mask_id, row_mask, normalizer, chunk_rows)
    if impl == "torch":
        return reference.distill_loss_reference(
            *args, kind=kind, beta=beta, temperature=temperature, mask_id=mask_id, row_mask=row_mask, normalizer=normalizer
        )
    return _distill_loss_triton(*args, kind, beta, temperature, mask_id, row_mask, normalizer)


@torch.compiler.disable
def _dimo_triton(hg, wg, bg, ha, wa, ba, ht, wt, bt, row_weight, vocab_size, beta, mask_id, row_mask, normalizer):
    check_device(hg)
    hg, wg, bg = prepare_linear(hg, wg, bg, vocab_size, "generator")
    ha, wa, ba = prepare_linear(ha.detach(), wa.detach(), None if ba is None else ba.detach(), vocab_size, "aux")
    ht, wt, bt = prepare_linear(ht.detach(), wt.detach(), None if bt is None else bt.detach(), vocab_size, "teacher")
    if ht.dtype != ha.dtype:
        ht, wt = ht.to(ha.dtype), wt.to(ha.dtype)
    num_rows = hg.shape[0]
    _check_rows("aux_hidden", ha, num_rows)
    _check_rows("teacher_hidden", ht, num_rows)
    w = as_row_tensor(row_weight, num_rows, hg.device, "row_weight")
    hg, ha, ht, w = select_rows(row_mask, num_rows, hg, ha, ht, w)
    rows = DimoSurrogateFunction.apply(
        hg, wg, bg, ha.contiguous(), wa, ba, ht.contiguous(), wt, bt, vocab_size, _mask_col(mask_id, vocab_size),
        float(beta),
    )
    return weighted_sum(rows, w, normalizer)


def dimo_generator_loss(
    gen_hidden: torch.Tensor,
    gen_weight: torch.Tensor,
    gen_bias: torch.Tensor | None,
    aux_hidden: torch.Tensor,
    aux_weight: torch.Tensor,
    aux_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    row_weight: torch.Tensor | float,
    vocab_size: int,
    *,
    beta: float = 0.0,
    mask_id: int | None = None,
    row_mask: torch.Tensor | None = None,
    normalizer: torch.Tensor | float = 1.0,
    impl: str = "triton",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """DiMO generator surrogate: value Σ w_r ½‖g_r‖²/normalizer, ∂/∂z_gen = w_r g_r/normalizer, with
    g = (1 − β)(q − p) + β q ⊙ (log q − log p − KL(q‖p)), q = p_aux, p = p_teacher (module docstring).

    ``row_mask`` selects the rows masked in x̃_t (others get zero gradient); ``mask_id`` is excluded from the aux
    and teacher softmaxes (SUBS), so the generator's mask column receives zero gradient. ``impl``: "triton", "chunked"
    (``chunk_rows`` rows a chunk) or "torch", as in :func:`distill_loss`.
    """
    check_impl(impl)
    if not math.isfinite(beta):
        raise ValueError(f"beta={beta!r} must be a finite number")
    args = (gen_hidden, gen_weight, gen_bias, aux_hidden, aux_weight, aux_bias, teacher_hidden, teacher_weight,
            teacher_bias, row_weight, vocab_size)  # fmt: skip
    if impl == "chunked":
        from ddistill.kernels.chunked import dimo_generator_loss_chunked

        return dimo_generator_loss_chunked(*args, beta, mask_id, row_mask, normalizer, chunk_rows)
    if impl == "torch":
        return reference.dimo_generator_loss_reference(*args, beta=beta, mask_id=mask_id, row_mask=row_mask,
                                                       normalizer=normalizer)
    return _dimo_triton(*args, beta, mask_id, row_mask, normalizer)
