"""Shared machinery of the fused linear + vocabulary-loss kernels.

Every loss in this package follows the same plan (see the module docstrings of the individual losses for the math):

* **stats pass(es)** — a Triton kernel over a 2-D grid (row block × vocabulary split). Each program recomputes
  logits tiles ``z = h @ W[v0:v0+BV].T + b`` in registers (``tl.dot`` on the input dtype, fp32 accumulator), masks
  the padded / excluded columns to ``-inf`` and folds the tile into per-row fp32 accumulators (online log-sum-exp
  and loss-specific sums). Each (row, split) pair writes its own partial; the partials are merged in fp64 in torch,
  which is deterministic and needs no atomics or locks. Logits never reach HBM.
* **backward** (gradients by recomputation, never in the forward): the vocabulary is walked in chunks of ``Vc``
  columns. For each chunk a "dZ" Triton kernel recomputes the tiles and writes the loss-specific
  ``dL/dz`` (already multiplied by the per-row upstream gradient) into a reusable ``M × Vc`` workspace in the input
  dtype; then cuBLAS computes ``dW[chunk] = dZᵀ H`` (written once, K = M, fp32 accumulation inside the GEMM)
  and ``dH += dZ W[chunk]`` into an fp32 ``dH`` accumulator. dW is therefore never accumulated across chunks in a
  low-precision buffer, and the only cross-chunk accumulator (``dH``, M × d fp32) is small. ``db[chunk]`` is not
  summed from the rounded workspace: the dZ kernel also writes fp32 column sums of its tile's unrounded dZ
  (:func:`store_column_sums`), which torch adds up in a fixed order. A bf16 workspace rounds each entry by up to
  2⁻⁹ relative, and a sum of M rounded entries carries those errors into db; the fp32 partials do not.

Interpreter notes (``TRITON_INTERPRET=1``): bf16 is unsupported there and ``tl.dot`` on bf16 multiplies raw bit
patterns (triton#11584), so CPU tests use fp32/fp16 (bf16 CPU tensors are refused). Without CUDA,
``import ddistill.kernels`` turns the interpreter on unless the variable is set or triton was imported before.

Block sizes come from :func:`kernel_configs` (``@triton.autotune``, keyed by the hidden size only, so a new number
of compacted rows never re-tunes); ``DDISTILL_KERNEL_BLOCKS="BM,BV,BK[,warps,stages]"`` forces one configuration
(the interpreter defaults to a tiny one). ``DDISTILL_KERNEL_WORKSPACE_MB`` sets the dZ workspace budget (32 MiB).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr so @triton.jit code may read it

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Whether triton.language itself was imported in interpreter mode (its @jit helpers, e.g. tl.sum, are decorated then).
_LANGUAGE_INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"
IMPLS = ("triton", "torch", "chunked")  # chunked: cuBLAS row chunks, gradient in the forward (chunked.py)

# Integer kernel arguments that change from call to call (compacted row count, vocabulary splits, chunk offset and
# width). Triton specialises integer arguments on divisibility by 16, so without this a training step whose masked-row
# count hits a new pattern would stall on a JIT compile of every kernel (seconds each, in the middle of training).
STATS_ARGS = ["M", "NUM_SPLITS"]
DZ_ARGS = ["M", "V_START", "VC", "NUM_PARTS"]
# Row granularity of the dZ kernels' fp32 column-sum partials (the smallest BLOCK_M that tl.dot allows).
COLSUM_ROWS = 16


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")


def check_device(tensor: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors in the interpreter (TRITON_INTERPRET=1 set before triton
    is first imported; ``import ddistill.kernels`` sets it on machines without a GPU when it comes first)."""
    if tensor.is_cuda:
        return
    if not (INTERPRET and _LANGUAGE_INTERPRETED):
        raise RuntimeError(
            "impl='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before torch/triton are "
            "imported (tests/conftest.py does), or pass impl='torch'"
        )
    if tensor.dtype == torch.bfloat16:  # the interpreter stores bf16 as raw uint16 bits: results would be garbage
        raise ValueError("impl='triton' on CPU (Triton interpreter) does not support bfloat16; use fp32/fp16 or a GPU")


def _parse_blocks(spec: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in spec.split(","))
    if len(parts) not in (3, 5):
        raise ValueError(f"DDISTILL_KERNEL_BLOCKS={spec!r}: expected 'BM,BV,BK' or 'BM,BV,BK,warps,stages'")
    return parts


def kernel_configs(kind: str) -> list[triton.Config]:
    """Autotuning candidates of a kernel family (``"stats"``, ``"dz"`` or ``"pair"``); few, as tuning is per D."""
    spec = os.environ.get("DDISTILL_KERNEL_BLOCKS")
    if spec is None and INTERPRET:
        spec = "32,64,32"
    if spec is not None:
        p = _parse_blocks(spec)
        warps, stages = (p[3], p[4]) if len(p) == 5 else (4, 2)
        return [triton.Config({"BLOCK_M": p[0], "BLOCK_V": p[1], "BLOCK_K": p[2]}, num_warps=warps, num_stages=stages)]
    if kind == "stats":
        shapes = [(256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4)]
    elif kind == "dz":
        shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4)]
    elif kind == "pair":  # two logits tiles live at once (student and teacher): smaller tiles avoid spills
        shapes = [(128, 64, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
    else:
        raise AssertionError(kind)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bv, bk, w, s in shapes
    ]


# Vocabulary splits of the stats kernels are aligned to this many columns so every BLOCK_V candidate divides them.
SPLIT_ALIGN = 256


def _num_sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count if torch.cuda.is_available() else 132


def vocab_splits(num_rows: int, vocab_size: int) -> tuple[int, int]:
    """(num_splits, columns per split): row blocks × splits ≈ 4 waves of the GPU's SMs, so the last wave's tail is
    small (at M = 8192 compacted rows and BLOCK_M = 128 there are only 64 row blocks for 132 SMs)."""
    if INTERPRET:
        cols = triton.cdiv(vocab_size, 2)
        cols = triton.cdiv(cols, 64) * 64
        return triton.cdiv(vocab_size, cols), cols
    row_blocks = max(1, triton.cdiv(num_rows, 128))
    splits = max(1, min(32, triton.cdiv(4 * _num_sms(), row_blocks)))
    cols = triton.cdiv(triton.cdiv(vocab_size, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(vocab_size, cols), cols


def workspace_columns(num_rows: int, vocab_size: int) -> int:
    """Columns of the backward dZ workspace (a multiple of 256, so every BLOCK_V candidate divides it)."""
    budget = float(os.environ.get("DDISTILL_KERNEL_WORKSPACE_MB", "32")) * 2**20
    cols = int(budget // (2 * max(num_rows, 1)))
    cols = max(256, (cols // 256) * 256)
    if INTERPRET:
        cols = 256  # several chunks even on tiny test shapes
    return min(cols, triton.cdiv(vocab_size, 256) * 256)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are tests/references: keep them exact instead of tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    D,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 tile ``h[rows] @ W[cols].T (+ b[cols])`` of shape (BLOCK_M, BLOCK_V); out-of-range entries are 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    h_base = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_base = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        h = tl.load(h_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += b[None, :]
    return acc


@triton.jit
def valid_columns(cols, V_VALID, MASK_COL):
    """Columns that take part in the softmax: below the real vocabulary size and not the excluded (mask) column."""
    return (cols < V_VALID) & (cols != MASK_COL)


def combine_lse(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split online-softmax partials (row max ``m``, natural units; ``s = Σ exp(z − m)``) -> (hi, lo), fp64.

    lse = hi + lo with hi the exact row max of the fp32 logits and lo = log Σ exp(z − hi) ∈ [0, log V]. Kernels
    evaluate ``(z − hi) − lo``, which keeps full fp32 precision for confident rows (lse ≈ z_y ≫ 1), where a rounded
    fp32 lse would leave an error of |lse|·6e-8 in lse − z_y.
    """
    m = m.double()
    s = s.double()
    hi = m.max(dim=1, keepdim=True).values
    lo = torch.log((s * torch.exp(m - hi)).sum(dim=1))
    return hi.squeeze(1), lo


_FUSED_ADDMM_OK = True


def _mm_accumulate(acc32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc32 += a @ b with fp32 accumulation and no (M × d) low-precision temporary where the backend allows it."""
    global _FUSED_ADDMM_OK
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        if _FUSED_ADDMM_OK:
            try:
                torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
                return
            except (RuntimeError, TypeError):  # torch without addmm(out_dtype=) on this backend
                _FUSED_ADDMM_OK = False
        acc32 += torch.mm(a, b).float()
    else:
        acc32.addmm_(a.float(), b.float())


@triton.jit
def store_column_sums(colsum_ptr, g, pid_m, local, col_ok, NUM_PARTS, stride_cs, BLOCK_M: tl.constexpr):
    """Write Σ_rows g (fp32, the tile's unrounded dZ) to partial row pid_m·BLOCK_M/16 and 0 to the tile's other
    BLOCK_M/16 − 1 partial rows (rows ≥ M must hold g = 0). Every partial row below NUM_PARTS = ⌈M/16⌉ is then
    written exactly once per launch whatever BLOCK_M the autotuner runs, so no zeroing and no atomics are needed and
    the sum over partial rows is deterministic."""
    tl.static_assert(BLOCK_M % 16 == 0)
    SUB: tl.constexpr = BLOCK_M // 16
    sub = tl.arange(0, SUB)
    sums = tl.sum(g, axis=0)
    values = tl.where(sub[:, None] == 0, sums[None, :], 0.0)
    part = pid_m * SUB + sub
    ptrs = colsum_ptr + part.to(tl.int64)[:, None] * stride_cs + local[None, :]
    tl.store(ptrs, values, mask=(part < NUM_PARTS)[:, None] & col_ok[None, :])


def column_sum_args(colsum: torch.Tensor | None, dz: torch.Tensor) -> dict:
    """Keyword arguments of a dZ kernel for its column-sum partials (``colsum`` None: the kernel writes none)."""
    if colsum is None:
        return dict(colsum_ptr=dz, NUM_PARTS=0, stride_cs=0, COLSUM=False)
    return dict(colsum_ptr=colsum, NUM_PARTS=colsum.shape[0], stride_cs=colsum.stride(0), COLSUM=True)


def chunked_linear_backward(
    write_dz: Callable[[torch.Tensor, int, int, torch.Tensor | None], None],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    vocab_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``z = hidden @ weight.T + bias`` given a dZ producer, walking the vocabulary in chunks.

    ``write_dz(dz, v0, vc, colsum)`` must fill ``dz`` (M × vc view of the workspace, row stride = workspace width)
    with ``dL/dz[:, v0:v0+vc]`` and, when ``colsum`` (⌈M/16⌉ × vc fp32 view) is not None, call
    :func:`store_column_sums` with the fp32 tile. Columns ≥ ``vocab_size`` have zero gradient and are never visited.
    """
    num_rows, dim = hidden.shape
    grad_hidden32 = torch.zeros(num_rows, dim, device=hidden.device, dtype=torch.float32) if need_hidden else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_bias and has_bias else None
    if num_rows > 0 and (need_hidden or need_weight or grad_bias is not None):
        cols = workspace_columns(num_rows, vocab_size)
        workspace = torch.empty(num_rows, cols, device=hidden.device, dtype=hidden.dtype)
        partials = None
        if grad_bias is not None:
            partials = torch.empty(triton.cdiv(num_rows, COLSUM_ROWS), cols, device=hidden.device, dtype=torch.float32)
        for v0 in range(0, vocab_size, cols):
            vc = min(cols, vocab_size - v0)
            dz = workspace[:, :vc]
            colsum = partials[:, :vc] if partials is not None else None
            write_dz(dz, v0, vc, colsum)
            if grad_weight is not None:
                if hidden.is_cuda:  # cuBLAS accumulates bf16/fp16 products in fp32; K = M rows, written once
                    torch.mm(dz.t(), hidden, out=grad_weight[v0 : v0 + vc])
                else:
                    grad_weight[v0 : v0 + vc] = dz.t().float() @ hidden.float()
            if colsum is not None:
                torch.sum(colsum, dim=0, out=grad_bias[v0 : v0 + vc])
            if grad_hidden32 is not None:
                _mm_accumulate(grad_hidden32, dz, weight[v0 : v0 + vc])
    grad_hidden = grad_hidden32.to(hidden.dtype) if grad_hidden32 is not None else None
    return grad_hidden, grad_weight, grad_bias


def row_blocks_grid(num_rows: int, num_splits: int) -> Callable[[dict], tuple[int, int]]:
    return lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), num_splits)


def dz_grid(num_rows: int, vc: int) -> Callable[[dict], tuple[int]]:
    return lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(vc, meta["BLOCK_V"]),)


@triton.jit
def grouped_tile(pid, num_rows, vc, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_M: tl.constexpr):
    """Swizzled (row block, vocab tile) of a 1-D dZ grid: GROUP_M row blocks share each W tile while it is in L2."""
    num_m = tl.cdiv(num_rows, BLOCK_M)
    num_v = tl.cdiv(vc, BLOCK_V)
    per_group = GROUP_M * num_v
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_v = (pid % per_group) // size_m
    return pid_m, pid_v


def prepare_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int, name: str,
                   *, cast_weight: bool = True):  # fmt: skip
    """Validate one fused linear's operands; cast the weight to the hidden dtype (a no-op for matching dtypes) unless
    ``cast_weight`` is False (the caller casts it where autograd does not see it)."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{name}: hidden must be (N, d) and weight (V_pad, d); got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]}")
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"{name}: vocab_size={vocab_size} must be in (0, {weight.shape[0]}]")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")
    if cast_weight and weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    return hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()


def separate_buffers(count: int, *shape: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """``count`` separately allocated kernel buffers, never rows of one block: a view at an offset that is not a
    multiple of 16 bytes is another Triton specialisation (a JIT compile in the middle of training, see STATS_ARGS)."""
    return [torch.empty(*shape, device=device, dtype=dtype) for _ in range(count)]


def select_rows(mask: torch.Tensor | None, num_rows: int, *tensors: torch.Tensor, name: str = "row_mask"):
    """The rows of each tensor where the bool ``mask`` of shape (num_rows,) is set (all of them when it is None)."""
    if mask is None:
        return tensors
    if mask.shape != (num_rows,) or mask.dtype != torch.bool:
        raise ValueError(f"{name}: expected a bool tensor of shape ({num_rows},)")
    idx = mask.nonzero().squeeze(1)
    # index_select: its backward is a scatter (index_add), not the sort-based index_put of advanced indexing
    return tuple(t.index_select(0, idx) for t in tensors)


def as_row_tensor(value: torch.Tensor | float, num_rows: int, device: torch.device, name: str) -> torch.Tensor:
    """(num_rows,) fp32 on ``device`` from a scalar or a (num_rows,) tensor; a Python scalar is filled in on the device
    (``torch.as_tensor`` of a number would copy it from the host, a host sync on CUDA)."""
    if not isinstance(value, torch.Tensor):
        return torch.full((num_rows,), float(value), dtype=torch.float32, device=device)
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(num_rows)
    if t.shape != (num_rows,):
        raise ValueError(f"{name}: expected shape ({num_rows},) or a scalar, got {tuple(t.shape)}")
    return t


def weighted_sum(rows: torch.Tensor, row_weight: torch.Tensor, normalizer: torch.Tensor | float) -> torch.Tensor:
    """Σ_r w_r·rows_r / normalizer in fp32 (normalizer may be a tensor: no host sync)."""
    total = (rows * row_weight.float()).sum()
    if isinstance(normalizer, torch.Tensor):
        return total / normalizer.to(device=total.device, dtype=torch.float32)
    if not math.isfinite(normalizer) or normalizer <= 0:
        raise ValueError(f"normalizer={normalizer!r} must be a positive finite number")
    return total / normalizer
