"""Row-chunked linear + vocabulary losses with the gradient formed in the forward (``impl="chunked"``).

The fused losses of this package (MDLM SUBS cross-entropy, the distillation divergences and DiMO's generator
surrogate, the DUO uniform ELBO; their math is in the module docstrings of ``masked_diffusion``, ``distill`` and
``uniform_elbo``) have the form ``loss = Σ_r w_r ℓ(z_r) / normalizer`` with ``z = h Wᵀ + b`` and a scalar result.
Its upstream gradient is one scalar g, so every gradient is g times a tensor that the forward can already form
(Liger-Kernel's FLCE plan; reference/kernels.md §2.2 of the project's studies). For each chunk of C rows:

1. ``Z = h_c W_padᵀ`` by cuBLAS (bf16 in, fp32 accumulate). The MDLM and DUO losses take Z in the input dtype
   (bf16 out: the precision of the reference's autocast logits; their softmax and loss run in fp32, DESIGN.md's
   contract), and their row kernel writes dZ **over Z** (each block of a row is read before it is written, and a
   row is one program's). The divergences (distillation, DiMO) take **fp32** Z and a dZ buffer of their own: their
   gradient is a difference of two softmaxes, which bf16 logits blur where student and teacher agree (on an H200,
   N = 16384, d = 768, reverse KL: relative dh error 2.3e-3 with fp32 Z, 3.1e-2 with bf16 Z, the eager
   reference's). The bias is added in fp32 when the row kernel loads Z;
2. a row kernel (Triton, one program per row, walking the vocabulary in blocks; the statistics are kept per lane,
   so the walk has no cross-lane reduction until the row's end: ``_lane_update``) forms the fp32 statistics
   (log-sum-exp and the loss's row sums), the per-row loss ℓ_r, and ``dZ = (w_r/normalizer)·∂ℓ_r/∂z_r`` in fp32,
   written once in the input dtype (0 on padded and excluded columns); ``(p − 1)`` at a target is formed in fp32;
3. ``dh_c = dZ W`` (written once, fp32 out), ``dW += dZᵀ h_c`` and ``db += Σ_rows dZ`` into fp32 accumulators
   (db as one more column of the dW GEMM);
4. Z and dZ are dropped.

That is 3 GEMM units (logits, dh, dW) per trained linear instead of the 4 of a recompute in backward; the
distillation's teacher linear adds one more (its logits). The backward only multiplies the stored dh, dW, db by g
(``torch.mul`` writing the result dtype directly, so one rounding), which also makes a second backward or any
``grad_output`` exact. Row weights and the normalizer are constants of the loss (no gradient flows to them).

Cost model at C rows and V_pad columns: workspace C·V_pad·e bytes for MDLM and DUO (e = the input's element
size), C·V_pad·(4·#linears + e) for the divergences, plus the fp32 dW accumulator (V_pad·d·4 bytes, 154 MB for
GPT-2's vocabulary at d = 768) that lives from the first chunk to the backward, whose read-modify-write per chunk
favours large C. ``chunk_rows`` (argument) or ``DDISTILL_CHUNK_MB`` (workspace budget in MiB, default 512) picks C;
``DDISTILL_ROW_BLOCK`` the row kernels' block. Measured on an H200 (N = 16384, d = 768; benchmarks/results/kernels.md,
perf_notes.md): MDLM 4.6 ms (5.4 with fp32 Z), KL 14.5 ms, ELBO 10.6 ms (12.7 with fp32 Z), against 8.1, 22.0 and
23.9 ms for the Triton kernels, at 2.5–3.5× their memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ddistill.kernels._common import (INTERPRET, LOG2E, as_row_tensor, check_device, prepare_linear, select_rows,
                                     weighted_sum)
from ddistill.kernels.distill import KINDS, _log_q_over_m
from ddistill.kernels.uniform_elbo import _log1p

CHUNK_ENV = "DDISTILL_CHUNK_MB"
ROW_ALIGN = 64  # default chunk sizes are multiples of this many rows (GEMM tiles)


# ----------------------------------------------------------------------------------------------------------------
# Row kernels: one program per row of the chunk; the row's logits are read from the fp32 buffer Z.


@triton.jit
def _row_logits(z_row, b_ptr, cols, ok, HAS_BIAS: tl.constexpr):
    """fp32 logits of one row block, −inf outside ``ok``."""
    z = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return z


@triton.jit
def _lane_update(m, s, z):
    """One block of an online log-sum-exp kept **per lane** (lane i sees columns i, i + BLOCK, …):
    m ← max(m, z), s ← Σ e^{z − m}. Of the textbook update's two exponentials e^{m_old − m} and e^{z − m} one is
    e⁰ = 1, so one exp2 of −|z − m_old| per element suffices, and the vocabulary walk needs no cross-lane reduction
    (no barrier) until the row's end (``_lane_total``). Returns (m, s, up, e) with up = [z > m_old] and
    e = e^{−|z − m_old|}, which ``_lane_weighted`` reuses for weighted sums Σ e^{z − m}·x."""
    d = z - m
    e = tl.exp2(-tl.abs(d) * LOG2E)  # e^{-|z − m|}; 0 where z = −inf
    up = d > 0
    s = tl.where(up, s * e + 1.0, s + e)
    return tl.maximum(m, z), s, up, e


@triton.jit
def _lane_weighted(acc, x, up, e):
    """The weighted sum Σ e^{z − m}·x of ``_lane_update``'s walk, updated with the same (up, e)."""
    return tl.where(up, acc * e + x, acc + e * x)


@triton.jit
def _lane_total(m, s):
    """(row max M, per-lane factors e^{m − M}) of a per-lane walk, and the row's Σ e^{z − M}."""
    big = tl.max(m, axis=0)
    f = tl.exp2((m - big) * LOG2E)
    return big, f, tl.sum(s * f, axis=0)


@triton.jit
def _row_lse(z_row, b_ptr, V_VALID, MASK_COL, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """(max m, Σ e^{z − m}) of one row's logits over the valid columns except MASK_COL (−1: none), by the per-lane
    walk."""
    m_lane = tl.full((BLOCK,), -1.0e30, tl.float32)
    s_lane = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V_VALID, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        z = _row_logits(z_row, b_ptr, cols, (cols < V_VALID) & (cols != MASK_COL), HAS_BIAS)
        m_lane, s_lane, _, _ = _lane_update(m_lane, s_lane, z)
    m, _, s = _lane_total(m_lane, s_lane)
    return m, s


@triton.jit
def _row_logit_at(z_row, b_ptr, col, HAS_BIAS: tl.constexpr):
    z = tl.load(z_row + col).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + col).to(tl.float32)
    return z


@triton.jit(do_not_specialize=["ROW0"])
def _ce_rows_kernel(
    z_ptr, b_ptr, y_ptr, scale_ptr, loss_ptr, dz_ptr,
    ROW0, V_VALID, V_PAD, MASK_COL, stride_z, stride_dz, EPS, INV_K,
    HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """MDLM SUBS row: ℓ = lse' − z_y, dZ = scale·(p' − [j = y]) (mask column and padding excluded, dZ = 0 there).

    SMOOTH (label smoothing ε = EPS over the K = 1/INV_K kept columns): ℓ = lse' − (1 − ε)·z_y − ε·Σ_j z_j / K and
    dZ = scale·(p' − (1 − ε)[j = y] − ε/K); pass 1 then also sums the logits per lane."""
    r = tl.program_id(0)
    row = ROW0 + r
    z_row = z_ptr + r.to(tl.int64) * stride_z
    dz_row = dz_ptr + r.to(tl.int64) * stride_dz
    y = tl.load(y_ptr + row)
    scale = tl.load(scale_ptr + row)
    if SMOOTH:
        m_lane = tl.full((BLOCK,), -1.0e30, tl.float32)
        s_lane = tl.zeros((BLOCK,), tl.float32)
        sum_lane = tl.zeros((BLOCK,), tl.float32)
        for v0 in range(0, V_VALID, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            ok = (cols < V_VALID) & (cols != MASK_COL)
            z = _row_logits(z_row, b_ptr, cols, ok, HAS_BIAS)
            m_lane, s_lane, _, _ = _lane_update(m_lane, s_lane, z)
            sum_lane += tl.where(ok, z, 0.0)
        m, _, s = _lane_total(m_lane, s_lane)
        log_s = tl.log(s)
        z_y = _row_logit_at(z_row, b_ptr, y, HAS_BIAS)
        mean_z = tl.sum(sum_lane.to(tl.float64), axis=0) * INV_K
        tl.store(loss_ptr + row, ((m + log_s) - (1.0 - EPS) * z_y - EPS * mean_z).to(tl.float32))
    else:
        m, s = _row_lse(z_row, b_ptr, V_VALID, MASK_COL, HAS_BIAS, BLOCK)
        log_s = tl.log(s)
        z_y = _row_logit_at(z_row, b_ptr, y, HAS_BIAS)
        tl.store(loss_ptr + row, (m - z_y) + log_s)
    for v0 in range(0, V_PAD, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = (cols < V_VALID) & (cols != MASK_COL)
        z = _row_logits(z_row, b_ptr, cols, ok, HAS_BIAS)
        p = tl.where(ok, tl.exp2(((z - m) - log_s) * LOG2E), 0.0)
        if SMOOTH:
            g = (p - tl.where(cols == y, 1.0 - EPS, 0.0) - tl.where(ok, EPS * INV_K, 0.0)) * scale
        else:
            g = (p - tl.where(cols == y, 1.0, 0.0)) * scale
        tl.store(dz_row + cols, g.to(dz_ptr.dtype.element_ty), mask=cols < V_PAD)


@triton.jit
def _sign(a):
    return tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0))


@triton.jit(do_not_specialize=["ROW0"])
def _pair_rows_kernel(
    s_ptr, bs_ptr, t_ptr, bt_ptr, scale_ptr, loss_ptr, dz_ptr,
    ROW0, V_VALID, V_PAD, MASK_COL, stride_s, stride_t, stride_dz, INV_TAU, BETA, LOG_BETA, LOG_1M_BETA,
    KIND: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Divergence row between q = softmax(s/τ) (student) and p = softmax(t/τ) (teacher); dZ w.r.t. s.

    Pass 1: both online LSEs and Σ e^{t−m_t}(t−s), Σ e^{s−m_s}(s−t), which give KL(p‖q) and KL(q‖p) (fp64 per
    row). JSD / TVD take a second pass for the loss and the row constant Σ q·a (Σ q·u); the last pass writes dZ.
    KIND 4 / 5 are DiMO's generator gradient g (``distill`` module docstring; q = p_aux, p = p_teacher, β = 0 / ≠ 0,
    the row constant KL(q‖p) from pass 1), written as dZ of the generator's logits, with the value ½‖g‖².
    """
    r = tl.program_id(0)
    row = ROW0 + r
    s_row = s_ptr + r.to(tl.int64) * stride_s
    t_row = t_ptr + r.to(tl.int64) * stride_t
    dz_row = dz_ptr + r.to(tl.int64) * stride_dz
    scale = tl.load(scale_ptr + row)
    ms_lane = tl.full((BLOCK,), -1.0e30, tl.float32)
    mt_lane = tl.full((BLOCK,), -1.0e30, tl.float32)
    ss_lane = tl.zeros((BLOCK,), tl.float32)
    st_lane = tl.zeros((BLOCK,), tl.float32)
    af_lane = tl.zeros((BLOCK,), tl.float32)  # Σ e^{t − m_t} (t − s), per lane
    ar_lane = tl.zeros((BLOCK,), tl.float32)  # Σ e^{s − m_s} (s − t), per lane
    for v0 in range(0, V_VALID, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = (cols < V_VALID) & (cols != MASK_COL)
        zs = _row_logits(s_row, bs_ptr, cols, ok, HAS_BS) * INV_TAU
        zt = _row_logits(t_row, bt_ptr, cols, ok, HAS_BT) * INV_TAU
        diff = tl.where(ok, zt - zs, 0.0)
        ms_lane, ss_lane, up_s, e_s = _lane_update(ms_lane, ss_lane, zs)
        mt_lane, st_lane, up_t, e_t = _lane_update(mt_lane, st_lane, zt)
        ar_lane = _lane_weighted(ar_lane, -diff, up_s, e_s)
        af_lane = _lane_weighted(af_lane, diff, up_t, e_t)
    m_s, f_s, s_s = _lane_total(ms_lane, ss_lane)
    m_t, f_t, s_t = _lane_total(mt_lane, st_lane)
    a_r = tl.sum(ar_lane * f_s, axis=0)
    a_f = tl.sum(af_lane * f_t, axis=0)
    lo_s64 = tl.log(s_s.to(tl.float64))
    lo_t64 = tl.log(s_t.to(tl.float64))
    gap64 = (m_s.to(tl.float64) - m_t.to(tl.float64)) + (lo_s64 - lo_t64)  # lse_s − lse_t
    kl_fwd = a_f.to(tl.float64) / s_t.to(tl.float64) + gap64
    kl_rev = a_r.to(tl.float64) / s_s.to(tl.float64) - gap64
    lo_s = lo_s64.to(tl.float32)
    lo_t = lo_t64.to(tl.float32)
    gap = gap64.to(tl.float32)
    loss = kl_fwd  # KIND 0; DiMO's value (KIND 4, 5) is summed by the last pass
    c = 0.0
    if KIND == 1 or KIND == 5:
        loss = kl_rev
        c = kl_rev.to(tl.float32)
    elif KIND == 2 or KIND == 3:
        loss_lane = tl.zeros((BLOCK,), tl.float32)
        c_lane = tl.zeros((BLOCK,), tl.float32)
        for v0 in range(0, V_VALID, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            ok = (cols < V_VALID) & (cols != MASK_COL)
            zs = _row_logits(s_row, bs_ptr, cols, ok, HAS_BS) * INV_TAU
            zt = _row_logits(t_row, bt_ptr, cols, ok, HAS_BT) * INV_TAU
            q = tl.where(ok, tl.exp2(((zs - m_s) - lo_s) * LOG2E), 0.0)
            p = tl.where(ok, tl.exp2(((zt - m_t) - lo_t) * LOG2E), 0.0)
            a = tl.where(ok, (zs - zt) - gap, 0.0)
            if KIND == 2:
                q_m = _log_q_over_m(a, BETA, LOG_BETA, LOG_1M_BETA)  # log q − log m
                qa = q * q_m
                elem = BETA * p * (q_m - a) + (1.0 - BETA) * qa
                c_elem = qa
            else:
                elem = 0.5 * tl.abs(q - p)
                c_elem = q * _sign(a)
            loss_lane += tl.where(ok, elem, 0.0)
            c_lane += tl.where(ok, c_elem, 0.0)
        loss = tl.sum(loss_lane.to(tl.float64), axis=0)
        c = tl.sum(c_lane.to(tl.float64), axis=0).to(tl.float32)
    value_lane = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V_PAD, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = (cols < V_VALID) & (cols != MASK_COL)
        zs = _row_logits(s_row, bs_ptr, cols, ok, HAS_BS) * INV_TAU
        zt = _row_logits(t_row, bt_ptr, cols, ok, HAS_BT) * INV_TAU
        q = tl.where(ok, tl.exp2(((zs - m_s) - lo_s) * LOG2E), 0.0)
        p = tl.where(ok, tl.exp2(((zt - m_t) - lo_t) * LOG2E), 0.0)
        a = tl.where(ok, (zs - zt) - gap, 0.0)
        if KIND == 0:
            g = q - p
        elif KIND == 1:
            g = q * (a - c)
        elif KIND == 2:
            g = (1.0 - BETA) * q * (_log_q_over_m(a, BETA, LOG_BETA, LOG_1M_BETA) - c)
        elif KIND == 3:
            g = 0.5 * q * (_sign(a) - c)
        elif KIND == 4:
            g = q - p
        else:
            g = (1.0 - BETA) * (q - p) + BETA * q * (a - c)
        g = tl.where(ok, g, 0.0)
        if KIND >= 4:
            value_lane += 0.5 * g * g
        tl.store(dz_row + cols, (g * scale).to(dz_ptr.dtype.element_ty), mask=cols < V_PAD)
    if KIND >= 4:
        loss = tl.sum(value_lane.to(tl.float64), axis=0)
    tl.store(loss_ptr + row, loss.to(tl.float32))


@triton.jit(do_not_specialize=["ROW0"])
def _elbo_rows_kernel(
    z_ptr, b_ptr, xt_ptr, x0_ptr, alpha_ptr, dalpha_ptr, scale_ptr, loss_ptr, dz_ptr,
    ROW0, V_VALID, V_PAD, stride_z, stride_dz,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """DUO NELBO row (``uniform_elbo`` module docstring): pass 1 the LSE, pass 2 Σ_j log1p(u p_j) and R = Σ_j r_j
    (fp32 per block, fp64 across blocks), the row's loss and constants in fp64, pass 3 dZ."""
    r = tl.program_id(0)
    row = ROW0 + r
    z_row = z_ptr + r.to(tl.int64) * stride_z
    dz_row = dz_ptr + r.to(tl.int64) * stride_dz
    m, s = _row_lse(z_row, b_ptr, V_VALID, -1, HAS_BIAS, BLOCK)
    lo64 = tl.log(s.to(tl.float64))
    lo = lo64.to(tl.float32)
    xt = tl.load(xt_ptr + row)
    x0 = tl.load(x0_ptr + row)
    alpha = tl.load(alpha_ptr + row).to(tl.float64)
    dalpha = tl.load(dalpha_ptr + row).to(tl.float64)
    k = V_VALID.to(tl.float64)
    u = k * alpha / (1.0 - alpha)
    u32 = u.to(tl.float32)
    log_lane = tl.zeros((BLOCK,), tl.float32)
    r_lane = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V_VALID, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = cols < V_VALID
        z = _row_logits(z_row, b_ptr, cols, ok, HAS_BIAS)
        up = u32 * tl.where(ok, tl.exp2(((z - m) - lo) * LOG2E), 0.0)
        log_lane += _log1p(up)
        r_lane += up / (1.0 + up)
    sum_log_row = tl.sum(log_lane.to(tl.float64), axis=0)
    sum_r_row = tl.sum(r_lane.to(tl.float64), axis=0)
    p_i = tl.exp((_row_logit_at(z_row, b_ptr, xt, HAS_BIAS) - m).to(tl.float64) - lo64)
    p_m = tl.exp((_row_logit_at(z_row, b_ptr, x0, HAS_BIAS) - m).to(tl.float64) - lo64)
    l_i = _log1p(u * p_i)
    l_m = _log1p(u * p_m)
    same = (xt == x0).to(tl.float64)
    diff = 1.0 - same
    kappa = (1.0 - alpha) / (k * alpha + 1.0 - alpha)
    c2 = kappa * same + diff
    xbar_i = (1.0 - alpha) + k * alpha * same
    xbar_theta_i = (1.0 - alpha) * (1.0 + u * p_i)
    s_prime = sum_log_row - k * l_i
    term1 = k * (1.0 / xbar_i - 1.0 / xbar_theta_i)
    term2 = -c2 * s_prime - u * (l_m - l_i) * diff + ((k - 1.0) * kappa * same - diff / kappa) * tl.log(kappa)
    coeff = dalpha / (k * alpha)
    tl.store(loss_ptr + row, (coeff * (term1 - term2)).to(tl.float32))
    r_i = u * p_i / (1.0 + u * p_i)
    r_m = u * p_m / (1.0 + u * p_m)
    scale = tl.load(scale_ptr + row).to(tl.float64)
    cr = scale * coeff * c2
    a_i = scale * coeff * (k * r_i / xbar_theta_i - c2 * k * r_i - u * r_i * diff)
    b_m = scale * coeff * u * r_m * diff
    cp = (cr * sum_r_row + a_i + b_m).to(tl.float32)
    cr = cr.to(tl.float32)
    a_i = a_i.to(tl.float32)
    b_m = b_m.to(tl.float32)
    for v0 in range(0, V_PAD, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = cols < V_VALID
        z = _row_logits(z_row, b_ptr, cols, ok, HAS_BIAS)
        p = tl.where(ok, tl.exp2(((z - m) - lo) * LOG2E), 0.0)
        up = u32 * p
        g = cr * (up / (1.0 + up)) - cp * p
        g += tl.where(cols == xt, a_i, 0.0)
        g += tl.where(cols == x0, b_m, 0.0)
        g = tl.where(ok, g, 0.0)
        tl.store(dz_row + cols, g.to(dz_ptr.dtype.element_ty), mask=cols < V_PAD)


ROW_BLOCK_ENV = "DDISTILL_ROW_BLOCK"


def _row_block() -> dict:
    """Block width and warps of the row kernels: ``DDISTILL_ROW_BLOCK="BLOCK,warps"``, else 2048 columns on 8 warps
    (256 columns in the interpreter, so tests walk several blocks)."""
    spec = os.environ.get(ROW_BLOCK_ENV)
    if spec is None:
        return dict(BLOCK=256) if INTERPRET else dict(BLOCK=2048, num_warps=8)
    try:
        block, warps = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"{ROW_BLOCK_ENV}={spec!r}: expected 'BLOCK,warps', e.g. 2048,8") from None
    if block < 16 or block & (block - 1) or warps < 1 or warps & (warps - 1):
        raise ValueError(f"{ROW_BLOCK_ENV}={spec!r}: BLOCK (>= 16) and warps must be powers of two")
    return dict(BLOCK=block, num_warps=warps)


# ----------------------------------------------------------------------------------------------------------------
# GEMMs with fp32 results


# Whether cuBLAS takes bf16/fp16 operands with an fp32 result (torch.mm / addmm ``out_dtype``) on this torch; the
# first failure switches a path to its fallback for the rest of the process (torch 2.11 on an H200 needs neither fallback).
_MM_OUT_DTYPE = True
_ADDMM_OUT_DTYPE = True


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation and an fp32 result (fp64 for fp64 inputs); half inputs are not upcast on
    CUDA, so the GEMM runs at the bf16/fp16 rate."""
    global _MM_OUT_DTYPE
    if a.dtype not in (torch.float16, torch.bfloat16):
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=): upcast (correct, much slower)
            _MM_OUT_DTYPE = False
    return a.float() @ b.float()


def _mm_accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into an fp32/fp64 accumulator without a rounded low-precision product."""
    global _ADDMM_OUT_DTYPE
    if a.dtype not in (torch.float16, torch.bfloat16):
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # fallback: an fp32 product, then one addition
            _ADDMM_OUT_DTYPE = False
    acc += _mm_fp32(a, b)


# ----------------------------------------------------------------------------------------------------------------
# The chunk loop and its autograd wrapper


def chunk_rows_for(num_rows: int, width: int, bytes_per_entry: int, chunk_rows: int | None) -> int:
    """Rows per chunk: ``chunk_rows`` if given, else the most multiples of ROW_ALIGN rows whose workspace
    (``width`` columns × ``bytes_per_entry``) fits ``DDISTILL_CHUNK_MB`` (default 512 MiB)."""
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows!r} must be a positive integer")
        return chunk_rows
    text = os.environ.get(CHUNK_ENV, "512")
    try:
        budget = float(text) * 2**20
    except ValueError:
        raise ValueError(f"{CHUNK_ENV}={text!r} must be a number of MiB") from None
    if not budget > 0:
        raise ValueError(f"{CHUNK_ENV}={text!r} must be positive")
    rows = int(budget // (width * bytes_per_entry)) // ROW_ALIGN * ROW_ALIGN
    return max(1, min(max(rows, ROW_ALIGN), num_rows))


# A row pass: (Z chunk or None, dZ output (Z itself when there is one), first row, end row) -> None; fills dZ and
# the per-row loss buffer.
RowPass = Callable[[torch.Tensor, torch.Tensor, int, int], None]


class _Plan:
    """What one chunked loss needs besides the trained linear: its row pass, row weights, normaliser and sizes."""

    def __init__(self, row_pass: RowPass, rows_out: torch.Tensor, row_weight: torch.Tensor, normalizer,
                 chunk: int, needs: tuple[bool, bool, bool], logits: str = "in_place"):  # fmt: skip
        self.row_pass, self.rows_out, self.row_weight, self.normalizer = row_pass, rows_out, row_weight, normalizer
        self.chunk, self.needs = chunk, needs
        # "in_place": Z in the input dtype, dZ written over it (MDLM, DUO); "fp32": fp32 Z and a dZ buffer of its
        # own (the divergences; module docstring); "none": the loss reads other linears only (DiMO), Z is not computed
        assert logits in ("in_place", "fp32", "none"), logits
        self.logits = logits


class ChunkedLinearLossFunction(torch.autograd.Function):
    """Scalar ``Σ_r w_r ℓ_r / normalizer`` of ``z = h Wᵀ + b``; dh, dW, db are formed in the forward (module
    docstring) and the backward scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        """``weight`` may be of another dtype than ``hidden`` (an fp32 master weight): it is cast here, out of
        autograd's sight, so its gradient comes out of the fp32 accumulator in its own dtype, rounded once.

        With dW and db both wanted, db rides in the dW GEMM: h gets a column of ones (padded to 16 bytes, so the
        operand stays aligned), and column ``d`` of ``dZᵀ [h, 1]`` is Σ_rows dZ, which spares a pass over dZ."""
        need_h, need_w, need_b = plan.needs
        num_rows, dim = hidden.shape
        width = weight.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        need_b = need_b and bias is not None
        fold_bias = need_w and need_b
        if fold_bias:
            operand = torch.zeros(num_rows, dim + max(1, 16 // hidden.element_size()), device=hidden.device,
                                  dtype=hidden.dtype)  # fmt: skip
            operand[:, :dim] = hidden
            operand[:, dim] = 1.0
        else:
            operand = hidden
        dh = torch.empty(num_rows, dim, device=hidden.device, dtype=acc) if need_h else None
        dw = torch.zeros(width, operand.shape[1], device=weight.device, dtype=acc) if need_w else None
        db = torch.zeros(width, device=weight.device, dtype=acc) if need_b and not fold_bias else None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        weight = weight.to(hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs pick their dtypes themselves
            for r0 in range(0, num_rows, plan.chunk):
                r1 = min(r0 + plan.chunk, num_rows)
                if plan.logits == "in_place":  # the row pass writes each dZ entry over its logit
                    z = dz = operand[r0:r1, :dim] @ weight.t()
                else:
                    z = _mm_fp32(operand[r0:r1, :dim], weight.t()) if plan.logits == "fp32" else None
                    dz = torch.empty(r1 - r0, width, device=hidden.device, dtype=hidden.dtype)
                plan.row_pass(z, dz, r0, r1)
                del z
                if dh is not None:
                    dh[r0:r1] = _mm_fp32(dz, weight)
                if dw is not None:
                    _mm_accumulate_fp32(dw, dz.t(), operand[r0:r1])
                if db is not None:
                    db += dz.sum(dim=0, dtype=acc)
                del dz
        if fold_bias:
            dw, db = dw[:, :dim], dw[:, dim]
        ctx.grads = (dh, dw, db)
        return weighted_sum(plan.rows_out, plan.row_weight, plan.normalizer)

    @staticmethod
    def backward(ctx, grad_output):
        out = []
        for grad, dtype in zip(ctx.grads, ctx.dtypes):
            out.append(None if grad is None else torch.mul(grad, grad_output, out=torch.empty_like(grad, dtype=dtype)))
        return (*out, None)


def _needs(*tensors: torch.Tensor | None) -> tuple[bool, ...]:
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t is not None and t.requires_grad for t in tensors)


def _constant_rows(name: str, value, num_rows: int, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(f"{name}: impl='chunked' treats it as a constant of the loss; pass a tensor without grad")
    return as_row_tensor(value.detach() if isinstance(value, torch.Tensor) else value, num_rows, device, name)


def _scale(row_weight: torch.Tensor, normalizer, extra: float = 1.0) -> torch.Tensor:
    """Per-row factor w_r·extra/normalizer of dZ (fp32); checks the normaliser before any work."""
    if isinstance(normalizer, torch.Tensor):
        if normalizer.requires_grad:
            raise ValueError("normalizer: impl='chunked' treats it as a constant of the loss; pass it without grad")
        return (row_weight.float() * extra / normalizer.to(device=row_weight.device, dtype=torch.float32)).contiguous()
    if not math.isfinite(normalizer) or normalizer <= 0:
        raise ValueError(f"normalizer={normalizer!r} must be a positive finite number")
    return (row_weight.float() * (extra / normalizer)).contiguous()


def _mask_col(mask_id: int | None, vocab_size: int) -> int:
    return -1 if mask_id is None or mask_id >= vocab_size else int(mask_id)


def _bias_arg(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return bias if bias is not None else like


# ----------------------------------------------------------------------------------------------------------------
# The three losses


def masked_diffusion_loss_chunked(hidden, weight, bias, targets, row_weight, vocab_size, mask_id, is_masked, normalizer,
                                  chunk_rows=None, label_smoothing=0.0) -> torch.Tensor:  # fmt: skip
    """MDLM SUBS loss (``masked_diffusion.masked_diffusion_loss``) with impl="chunked": masked rows only; with
    ``label_smoothing`` ε > 0 the row loss is (1 − ε)·CE + ε·(mean CE over the kept columns) (``_ce_rows_kernel``)."""
    check_device(hidden)
    hidden, weight, bias = prepare_linear(hidden, weight, bias, vocab_size, "masked_diffusion_loss", cast_weight=False)
    num_rows = hidden.shape[0]
    w = _constant_rows("row_weight", row_weight, num_rows, hidden.device)
    if targets.shape != (num_rows,):
        raise ValueError(f"targets: expected shape ({num_rows},), got {tuple(targets.shape)}")
    hidden, targets, w = select_rows(is_masked, num_rows, hidden, targets, w, name="is_masked")
    scale = _scale(w, normalizer)
    num_rows = hidden.shape[0]
    targets = targets.to(torch.int32).contiguous()
    rows = torch.empty(num_rows, device=hidden.device, dtype=torch.float32)
    width = weight.shape[0]
    mask_col = _mask_col(mask_id, vocab_size)

    kept = vocab_size - (mask_col >= 0)
    launch = _row_block()  # a bad DDISTILL_ROW_BLOCK fails here, before any GEMM

    def row_pass(z, dz, r0, r1):
        _ce_rows_kernel[(r1 - r0,)](
            z, _bias_arg(bias, z), targets, scale, rows, dz, r0, vocab_size, width, mask_col, z.stride(0),
            dz.stride(0), float(label_smoothing), 1.0 / kept, HAS_BIAS=bias is not None, SMOOTH=label_smoothing > 0,
            **launch,
        )  # fmt: skip

    chunk = chunk_rows_for(num_rows, width, hidden.element_size(), chunk_rows)
    plan = _Plan(row_pass, rows, w, normalizer, chunk, _needs(hidden, weight, bias))
    return ChunkedLinearLossFunction.apply(hidden, weight, bias, plan)


def distill_loss_chunked(hs, ws, bs, ht, wt, bt, row_weight, vocab_size, kind, beta, temperature, mask_id, row_mask,
                         normalizer, chunk_rows=None) -> torch.Tensor:  # fmt: skip
    """Distillation divergence (``distill.distill_loss``) with impl="chunked": the teacher's logits chunk is computed
    next to the student's (same rows), constant."""
    check_device(hs)
    hs, ws, bs = prepare_linear(hs, ws, bs, vocab_size, "student", cast_weight=False)
    ht, wt, bt = prepare_linear(ht.detach(), wt.detach(), None if bt is None else bt.detach(), vocab_size, "teacher")
    if ht.dtype != hs.dtype:
        ht, wt = ht.to(hs.dtype), wt.to(hs.dtype)
    num_rows = hs.shape[0]
    if ht.shape[0] != num_rows:
        raise ValueError(f"teacher_hidden: expected {num_rows} rows, got {ht.shape[0]}")
    w = _constant_rows("row_weight", row_weight, num_rows, hs.device)
    hs, ht, w = select_rows(row_mask, num_rows, hs, ht, w)
    ht = ht.contiguous()
    inv_tau = 1.0 / temperature
    scale = _scale(w, normalizer, inv_tau)  # ∂/∂(logits before the temperature) = ∂/∂s · 1/τ
    num_rows = hs.shape[0]
    rows = torch.empty(num_rows, device=hs.device, dtype=torch.float32)
    width = ws.shape[0]
    mask_col = _mask_col(mask_id, vocab_size)
    log_beta = float(torch.tensor(beta, dtype=torch.float64).log()) if 0.0 < beta < 1.0 else 0.0
    log_1m_beta = float(torch.tensor(1.0 - beta, dtype=torch.float64).log()) if 0.0 < beta < 1.0 else 0.0

    launch = _row_block()  # a bad DDISTILL_ROW_BLOCK fails here, before any GEMM

    def row_pass(z, dz, r0, r1):
        zt = _mm_fp32(ht[r0:r1], wt.t())
        _pair_rows_kernel[(r1 - r0,)](
            z, _bias_arg(bs, z), zt, _bias_arg(bt, zt), scale, rows, dz, r0, vocab_size, width, mask_col,
            z.stride(0), zt.stride(0), dz.stride(0), inv_tau, beta, log_beta, log_1m_beta,
            KIND=KINDS[kind], HAS_BS=bs is not None, HAS_BT=bt is not None, **launch,
        )  # fmt: skip

    chunk = chunk_rows_for(num_rows, width, 8 + hs.element_size(), chunk_rows)
    plan = _Plan(row_pass, rows, w, normalizer, chunk, _needs(hs, ws, bs), logits="fp32")
    return ChunkedLinearLossFunction.apply(hs, ws, bs, plan)


def uniform_elbo_loss_chunked(hidden, weight, bias, xt, x0, alpha_t, alpha_prime_t, vocab_size, row_weight, normalizer,
                              chunk_rows=None) -> torch.Tensor:  # fmt: skip
    """DUO uniform-state ELBO (``uniform_elbo.uniform_elbo_loss``) with impl="chunked": every row contributes."""
    check_device(hidden)
    hidden, weight, bias = prepare_linear(hidden, weight, bias, vocab_size, "uniform_elbo_loss", cast_weight=False)
    num_rows = hidden.shape[0]
    for name, t in (("xt", xt), ("x0", x0)):
        if t.shape != (num_rows,):
            raise ValueError(f"{name}: expected shape ({num_rows},), got {tuple(t.shape)}")
    alpha = _constant_rows("alpha_t", alpha_t, num_rows, hidden.device).contiguous()
    dalpha = _constant_rows("alpha_prime_t", alpha_prime_t, num_rows, hidden.device).contiguous()
    w = _constant_rows("row_weight", row_weight, num_rows, hidden.device)
    scale = _scale(w, normalizer)
    xt32, x032 = xt.to(torch.int32).contiguous(), x0.to(torch.int32).contiguous()
    rows = torch.empty(num_rows, device=hidden.device, dtype=torch.float32)
    width = weight.shape[0]

    launch = _row_block()  # a bad DDISTILL_ROW_BLOCK fails here, before any GEMM

    def row_pass(z, dz, r0, r1):
        _elbo_rows_kernel[(r1 - r0,)](
            z, _bias_arg(bias, z), xt32, x032, alpha, dalpha, scale, rows, dz, r0, vocab_size, width,
            z.stride(0), dz.stride(0), HAS_BIAS=bias is not None, **launch,
        )  # fmt: skip

    chunk = chunk_rows_for(num_rows, width, hidden.element_size(), chunk_rows)
    plan = _Plan(row_pass, rows, w, normalizer, chunk, _needs(hidden, weight, bias))
    return ChunkedLinearLossFunction.apply(hidden, weight, bias, plan)


def dimo_generator_loss_chunked(hg, wg, bg, ha, wa, ba, ht, wt, bt, row_weight, vocab_size, beta, mask_id, row_mask,
                                normalizer, chunk_rows=None) -> torch.Tensor:  # fmt: skip
    """DiMO's generator surrogate (``distill.dimo_generator_loss``) with impl="chunked": per chunk the aux and teacher
    logits (constants) give g and ½‖g‖²; g, weighted, is dZ of the generator's linear, whose own logits are never
    computed."""
    check_device(hg)
    hg, wg, bg = prepare_linear(hg, wg, bg, vocab_size, "generator", cast_weight=False)
    ha, wa, ba = prepare_linear(ha.detach(), wa.detach(), None if ba is None else ba.detach(), vocab_size, "aux")
    ht, wt, bt = prepare_linear(ht.detach(), wt.detach(), None if bt is None else bt.detach(), vocab_size, "teacher")
    ha, wa = ha.to(hg.dtype), wa.to(hg.dtype)
    ht, wt = ht.to(hg.dtype), wt.to(hg.dtype)
    num_rows = hg.shape[0]
    for name, t in (("aux_hidden", ha), ("teacher_hidden", ht)):
        if t.shape[0] != num_rows:
            raise ValueError(f"{name}: expected {num_rows} rows, got {t.shape[0]}")
    w = _constant_rows("row_weight", row_weight, num_rows, hg.device)
    hg, ha, ht, w = select_rows(row_mask, num_rows, hg, ha, ht, w)
    ha, ht = ha.contiguous(), ht.contiguous()
    scale = _scale(w, normalizer)
    num_rows = hg.shape[0]
    rows = torch.empty(num_rows, device=hg.device, dtype=torch.float32)
    width = wg.shape[0]
    mask_col = _mask_col(mask_id, vocab_size)
    kind = 4 if beta == 0.0 else 5

    launch = _row_block()  # a bad DDISTILL_ROW_BLOCK fails here, before any GEMM

    def row_pass(_, dz, r0, r1):
        za = _mm_fp32(ha[r0:r1], wa.t())
        zt = _mm_fp32(ht[r0:r1], wt.t())
        _pair_rows_kernel[(r1 - r0,)](
            za, _bias_arg(ba, za), zt, _bias_arg(bt, zt), scale, rows, dz, r0, vocab_size, width, mask_col,
            za.stride(0), zt.stride(0), dz.stride(0), 1.0, float(beta), 0.0, 0.0,
            KIND=kind, HAS_BS=ba is not None, HAS_BT=bt is not None, **launch,
        )  # fmt: skip

    chunk = chunk_rows_for(num_rows, width, 8 + hg.element_size(), chunk_rows)
    plan = _Plan(row_pass, rows, w, normalizer, chunk, _needs(hg, wg, bg), logits="none")
    return ChunkedLinearLossFunction.apply(hg, wg, bg, plan)
