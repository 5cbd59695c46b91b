"""Fused "probabilities + categorical draw" for the ancestral samplers: one Triton program per row of logits.

The torch samplers (`ddistill.diffusion.samplers`) convert the denoiser's logits to float64, take the softmax, form
the posterior and its cumulative sum: several (rows × V) float64 tensors per step (16·1024·50258·8 B = 6.6 GB each
at the `small` benchmark shape). These kernels read the logits (any float dtype, row stride free) row by row and
return the drawn token; every quantity is float64 in registers and nothing of size V is written.

Per row z (V columns; the excluded column, if any, has weight 0), with m = max_j z_j and w_j = exp(z_j − m) in
float64, S = Σ_j w_j, p = w / S (the float64 softmax):

* ``draw_categorical`` (MDLM's x_θ draw, arXiv 2406.07524): token ~ p, i.e. the inverse CDF
  token = #{j : C_j ≤ u·S} with C_j = Σ_{i ≤ j} w_i (the normalisation by S is folded into the target).
* ``draw_uniform_posterior`` (DUO eq. 4, arXiv 2506.10892, with x̂ = p, z = z_t, α_{t|s} = α_t/α_s):
  q_j ∝ (α_s − α_t)·p_j + (1 − α_{t|s})(1 − α_s)/V + [j = z]·(V·α_t·p_z + α_{t|s} − α_t); the normaliser
  V·α_t·p_z + 1 − α_t is not applied (an inverse-CDF draw is scale-free), and the target is u times the closed-form
  total (α_s − α_t) + (1 − α_{t|s})(1 − α_s) + V·α_t·p_z + α_{t|s} − α_t.
* ``masked_argmax``: the first index of the largest logit (the excluded column skipped): the greedy tail. argmax
  of the float64 softmax is argmax of the logits, since exp is monotone.

Pass 1 reads the row once: per block of BLOCK_V columns its max M_b and its sum S_b = Σ_{j∈b} exp(z_j − M_b)
(one float64 exp per element, no rescaling), kept in registers; then m = max_b M_b and the block totals
T_b = S_b·exp(M_b − m) (for the posterior: coef·T_b + floor·(columns of b) + the spike if z ∈ b). Their cumulative sum
locates the first block b* whose cumulative total exceeds the target, so pass 2 recomputes w and takes the prefix sum
only from block b* on: almost always that one block (a further block only where the cumulative totals and the
in-block prefix sum round differently at a boundary), so a row costs ~V + BLOCK_V exps and one block scan instead of
2V exps and V/BLOCK_V scans. The token is the first column whose CDF exceeds the target, so it always has positive
mass; if none does (the target rounds up to the total), the last column with positive mass (for the posterior: the
last column when the uniform floor is positive). The uniforms u are the caller's, so these draws agree token for
token with the torch reference (`sample_categorical` on the float64 softmax / `uniform_posterior`) except where
u·total falls within float64 rounding of a CDF boundary (the sums are taken in another order), or where the target
rounds to the total and the last columns' weights underflow float64 (logits more than ~745 below the maximum).

``softmax_stats`` reads a row once more for two summaries of p (DiMO's generator metrics): the largest probability
max_j p_j = 1/S and the entropy H = m + log S − Σ_j w_j z_j / S, in float32 per lane (each lane keeps its running
maximum and rescales its two sums when it grows; the lanes are combined once at the row's end); nothing of size V is
written.

The samplers pass only the rows that take a token (a gathered copy, or the denoiser's row-selected logits).
Inputs on CPU run in Triton's interpreter (TRITON_INTERPRET=1; fp32/fp16 only, see ``_common``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ddistill.kernels._common import INTERPRET, check_device

__all__ = ["draw_categorical", "draw_uniform_posterior", "masked_argmax", "softmax_stats"]

MODE_CATEGORICAL = 0
MODE_UNIFORM_POSTERIOR = 1
MODE_ARGMAX = 2


@triton.jit(do_not_specialize=["MASK_COL"])
def _draw_kernel(
    logits_ptr, stride_row, u_ptr, zt_ptr, alpha_ptr, out_ptr, V, MASK_COL,
    MODE: tl.constexpr, BLOCK_V: tl.constexpr, NUM_BLOCKS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    cols0 = tl.arange(0, BLOCK_V)
    blocks = tl.arange(0, NUM_BLOCKS)
    # pass 1: per block its max and Σ exp(z − max) in float64 (argmax: the running max and its first index)
    block_max = tl.full((NUM_BLOCKS,), float("-inf"), dtype=tl.float64)
    block_sum = tl.zeros((NUM_BLOCKS,), dtype=tl.float64)
    last_finite = tl.zeros((BLOCK_V,), dtype=tl.int32)  # per lane: its last column with a finite logit
    m = tl.full((), float("-inf"), dtype=tl.float64)
    best = tl.zeros((), dtype=tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        ok = (cols < V) & (cols != MASK_COL)
        z = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float64)
        bmax = tl.max(z, axis=0)
        if MODE == 2:
            block_best = tl.argmax(z, axis=0, tie_break_left=True).to(tl.int64) + v0
            best = tl.where(bmax > m, block_best, best)
        else:
            finite = z > float("-inf")
            # an all -inf block has sum 0; no (-inf) − (-inf) is ever formed
            bsum = tl.sum(tl.where(finite, tl.exp(z - tl.where(bmax == float("-inf"), 0.0, bmax)), 0.0), axis=0)
            this = blocks == v0 // BLOCK_V
            block_max = tl.where(this, bmax, block_max)
            block_sum = tl.where(this, bsum, block_sum)
            last_finite = tl.maximum(last_finite, tl.where(finite, cols, 0))
        m = tl.maximum(m, bmax)
    if MODE == 2:
        tl.store(out_ptr + row, best)
    else:
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        totals = block_sum * tl.exp(block_max - m_ref)  # Σ_{j∈b} exp(z_j − m)
        s = tl.sum(totals, axis=0)
        last = tl.max(last_finite, axis=0).to(tl.int64)
        u = tl.load(u_ptr + row).to(tl.float64)
        num_blocks = tl.cdiv(V, BLOCK_V)
        if MODE == 1:
            zt = tl.load(zt_ptr + row).to(tl.int64)
            a_t = tl.load(alpha_ptr).to(tl.float64)
            a_s = tl.load(alpha_ptr + 1).to(tl.float64)
            a_ts = a_t / a_s
            p_z = tl.exp(tl.load(base + zt).to(tl.float64) - m) / s
            coef = (a_s - a_t) / s  # multiplies w_j
            floor = (1.0 - a_ts) * (1.0 - a_s) / V
            spike = V * a_t * p_z + a_ts - a_t  # extra mass at column z_t
            target = u * ((a_s - a_t) + (1.0 - a_ts) * (1.0 - a_s) + spike)
            block_cols = tl.minimum(tl.maximum(V - blocks * BLOCK_V, 0), BLOCK_V).to(tl.float64)
            totals = coef * totals + floor * block_cols + tl.where(blocks == zt // BLOCK_V, spike, 0.0)
            last = tl.where(floor > 0.0, V - 1, tl.maximum(last, tl.where(spike > 0.0, zt, 0)))
        else:
            target = u * s
        # the first block whose cumulative total exceeds the target, and the mass before it
        cum = tl.cumsum(totals, axis=0)
        first = tl.sum(((cum <= target) & (blocks < num_blocks)).to(tl.int32), axis=0)
        running = tl.max(tl.where(blocks < first, cum, 0.0), axis=0)
        # pass 2, from that block on: count the CDF entries ≤ target until one exceeds it
        count = first.to(tl.int64) * BLOCK_V
        v0 = first * BLOCK_V
        scanning = v0 < V
        while scanning:
            cols = v0 + cols0
            in_row = cols < V
            ok = in_row & (cols != MASK_COL)
            z = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float64)
            w = tl.where(z == float("-inf"), 0.0, tl.exp(z - m))
            if MODE == 1:
                w = coef * w + floor + tl.where(cols == zt, spike, 0.0)
                w = tl.where(in_row, w, 0.0)
            cdf = running + tl.cumsum(w, axis=0)
            below = tl.sum(((cdf <= target) & in_row).to(tl.int32), axis=0)
            count += below
            running = tl.max(cdf, axis=0)
            scanning = (v0 + BLOCK_V < V) & (below == tl.minimum(V - v0, BLOCK_V))
            v0 += BLOCK_V
        tl.store(out_ptr + row, tl.minimum(count, last))


@triton.jit(do_not_specialize=["MASK_COL"])
def _stats_kernel(logits_ptr, stride_row, max_prob_ptr, entropy_ptr, V, MASK_COL, BLOCK_V: tl.constexpr):
    """Per row (column MASK_COL excluded): max_j p_j and −Σ_j p_j log p_j of p = softmax(z), by a per-lane walk."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    m = tl.full((BLOCK_V,), -1.0e30, dtype=tl.float32)  # lane i: columns i, i + BLOCK_V, …
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)  # Σ e^{z − m}
    t = tl.zeros((BLOCK_V,), dtype=tl.float32)  # Σ e^{z − m}·(z − m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = (cols < V) & (cols != MASK_COL)
        z = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        f = tl.exp(m - m_new)  # rescales the lane's old sums; 1 unless z is a new maximum
        finite = z > float("-inf")  # excluded columns and −inf logits have p = 0 (and no 0·(−inf) is formed)
        e = tl.where(finite, tl.exp(z - m_new), 0.0)
        shift = tl.where(finite, z - m_new, 0.0)
        t = f * (t + (m - m_new) * s) + e * shift
        s = f * s + e
        m = m_new
    big = tl.max(m, axis=0)
    g = tl.exp(m - big)
    total = tl.sum(s * g, axis=0)  # S = Σ_j e^{z_j − M}
    weighted = tl.sum(g * (t + (m - big) * s), axis=0)  # Σ_j e^{z_j − M}·(z_j − M)
    tl.store(max_prob_ptr + row, 1.0 / total)
    tl.store(entropy_ptr + row, tl.log(total) - weighted / total)


def _rows(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(logits viewed as (N, V) without a copy where the strides allow it, row stride)."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits of shape {tuple(logits.shape)}: expected (…, V) with V >= 1")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    check_device(logits)
    flat = logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return flat, flat.stride(0)


def _row_tensor(t: torch.Tensor | None, num_rows: int, device: torch.device, name: str) -> torch.Tensor | None:
    if t is None:
        return None
    if t.numel() != num_rows or t.device != device:
        raise ValueError(f"{name} of shape {tuple(t.shape)} on {t.device}: expected {num_rows} entries on {device}")
    return t.reshape(-1).contiguous()


# (BLOCK_V, warps) of `_draw_kernel` on the GPU per mode. On one H200 at V = 50258, bf16 logits (do_bench): categorical
# 16384 rows 2.626 ms at (2048, 8) -> 2.226 at (1024, 4), 32768 rows 5.21 -> 4.40 (two calls); the DUO posterior 2.645
# -> 2.426, argmax 1.415 -> 0.960 at (2048, 4) (one call); the same tokens. Fewer warps a row wait less at the
# per-block reductions (perf_notes.md, stop 30).
_GPU_LAUNCH = {MODE_CATEGORICAL: (1024, 4), MODE_UNIFORM_POSTERIOR: (1024, 4), MODE_ARGMAX: (2048, 4)}


def _block(vocab: int) -> int:
    """Columns per block in the interpreter: small blocks for small test vocabularies (several blocks per row), large
    ones for a real vocabulary (speed); 2048 on the GPU (8 float64 values per thread at 8 warps), the stats kernel's."""
    if not INTERPRET:
        return 2048
    return 64 if vocab <= 1024 else 4096


def _launch(logits, u, *, mode: int, exclude: int | None, zt=None, alphas=None) -> torch.Tensor:
    flat, stride = _rows(logits)
    n, vocab = flat.shape
    device = flat.device
    if exclude is not None and not 0 <= exclude < vocab:
        raise ValueError(f"exclude={exclude} must lie in [0, {vocab})")
    u = _row_tensor(u, n, device, "u")
    zt = _row_tensor(zt, n, device, "zt")
    out = torch.empty(logits.shape[:-1], dtype=torch.long, device=device)
    if n == 0:
        return out
    dummy = out  # stands in for the pointers a mode never reads
    block, warps = (_block(vocab), 1) if INTERPRET else _GPU_LAUNCH[mode]
    _draw_kernel[(n,)](
        flat, stride, dummy if u is None else u, dummy if zt is None else zt, dummy if alphas is None else alphas,
        out, vocab, -1 if exclude is None else exclude,
        MODE=mode, BLOCK_V=block, NUM_BLOCKS=triton.next_power_of_2(triton.cdiv(vocab, block)), num_warps=warps,
    )
    return out


def draw_categorical(logits: torch.Tensor, u: torch.Tensor, *, exclude: int | None = None) -> torch.Tensor:
    """token ~ softmax(logits) per row (column ``exclude`` never drawn) by inverse CDF at the uniforms ``u`` (…)."""
    return _launch(logits, u.to(torch.float64), mode=MODE_CATEGORICAL, exclude=exclude)


def draw_uniform_posterior(logits: torch.Tensor, zt: torch.Tensor, u: torch.Tensor, alpha_t: torch.Tensor,
                           alpha_s: torch.Tensor) -> torch.Tensor:
    """z_s ~ q(z_s | z_t, x̂ = softmax(logits)) of DUO eq. 4 (module docstring) at the uniforms ``u`` (…).

    α_t, α_s are scalars (0-d tensors on the logits' device, so no host sync; 0 < α_t < α_s ≤ 1)."""
    alphas = torch.stack([torch.as_tensor(alpha_t), torch.as_tensor(alpha_s)]).to(device=logits.device,
                                                                                 dtype=torch.float64)
    if alphas.shape != (2,):
        raise ValueError("alpha_t and alpha_s must be scalars")
    return _launch(logits, u.to(torch.float64), mode=MODE_UNIFORM_POSTERIOR, exclude=None, zt=zt, alphas=alphas)


def masked_argmax(logits: torch.Tensor, *, exclude: int | None = None) -> torch.Tensor:
    """First index of the row maximum (column ``exclude`` skipped): argmax of the float64 softmax."""
    return _launch(logits, None, mode=MODE_ARGMAX, exclude=exclude)


def softmax_stats(logits: torch.Tensor, *, exclude: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_j p_j, entropy −Σ_j p_j log p_j) of p = softmax(logits) per row (column ``exclude`` removed), fp32 (…)."""
    flat, stride = _rows(logits)
    n, vocab = flat.shape
    if exclude is not None and not 0 <= exclude < vocab:
        raise ValueError(f"exclude={exclude} must lie in [0, {vocab})")
    max_prob = torch.empty(n, dtype=torch.float32, device=flat.device)
    entropy = torch.empty_like(max_prob)
    if n > 0:
        _stats_kernel[(n,)](flat, stride, max_prob, entropy, vocab, -1 if exclude is None else exclude,
                            BLOCK_V=_block(vocab), num_warps=1 if INTERPRET else 8)  # fmt: skip
    return max_prob.reshape(logits.shape[:-1]), entropy.reshape(logits.shape[:-1])
