"""Set-up and tolerance rule shared by the fused-kernel tests; import it before ``ddistill.kernels``.

On CPU the kernels run in Triton's interpreter (fp32/fp16 only: it mishandles bf16); with CUDA the bf16 cases run
too, under one fixed block configuration instead of autotuning every (kernel, dtype, D) variant of the suite.

Tolerance rule (CCE-style), elementwise for the value and every gradient:
|ours − gt64| ≤ |torch_same_dtype − gt64| + tol·max|gt64|, tol = 5e-4 (fp32), 1e-3 (fp16), 1e-2 (bf16).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("DDISTILL_KERNEL_BLOCKS", "64,128,64,4,3")

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
GRAD_NAMES = ["loss", "d_hidden", "d_weight", "d_bias"]


def skip_bf16_on_cpu(dtype):
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 is unsupported by the Triton interpreter (gpu only)")


def run(fn, grad_args, const_args, dtype, grad_output, cast_consts=True):
    """[value, grads of the non-None grad_args] of ``fn(*grad_args, *const_args)`` in ``dtype`` on DEVICE;
    ``cast_consts``: floating constants follow ``dtype`` too (else they keep theirs, e.g. float64 schedules)."""
    leaves = [None if t is None else t.detach().to(DEVICE, dtype, copy=True).requires_grad_(True) for t in grad_args]
    if cast_consts:
        const_args = [c.to(dtype) if torch.is_tensor(c) and c.is_floating_point() else c for c in const_args]
    consts = [c.to(DEVICE) if torch.is_tensor(c) else c for c in const_args]
    loss = fn(*leaves, *consts)
    loss.backward(torch.tensor(grad_output, device=loss.device, dtype=loss.dtype))
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def _rounded(tensors, dtype):
    return [t.to(dtype).double() if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors]


def check(fn, grad_args, const_args, dtype, grad_output=1.0, *, oracle="oracle", cast_consts=True,
          oracle_on_rounded_inputs=False, ours="triton"):  # fmt: skip
    """Assert the rule for ``fn(impl, *grad_args, *const_args)``: impl ``ours`` ("triton" or "chunked"), "torch"
    (reference in the same dtype) and ``oracle`` (evaluated in float64: "oracle", or "torch" where the reference is
    exact in float64).

    oracle_on_rounded_inputs: the float64 oracle sees the inputs rounded to ``dtype`` (for TVD, whose gradient jumps
    where q = p: rounding the inputs moves those jumps, which no kernel can undo). Returns (ours, gt).
    """
    skip_bf16_on_cpu(dtype)
    gt_args = (_rounded(grad_args, dtype), _rounded(const_args, dtype)) if oracle_on_rounded_inputs else (
        grad_args, const_args)
    gt = run(lambda *a: fn(oracle, *a), *gt_args, torch.float64, grad_output, cast_consts)
    ref = run(lambda *a: fn("torch", *a), grad_args, const_args, dtype, grad_output, cast_consts)
    got = run(lambda *a: fn(ours, *a), grad_args, const_args, dtype, grad_output, cast_consts)
    for name, o, r, g in zip(GRAD_NAMES, got, ref, gt):
        g = g.double()
        excess = (o.double() - g).abs() - (r.double() - g).abs() - TOL[dtype] * g.abs().max().item()
        assert torch.isfinite(o).all(), name
        assert excess.max().item() <= 0, f"{name}: exceeds the rule by {excess.max().item():.3e}"
    return got, gt


def check_bias_gradient(fn, grad_args, const_args, *, oracle="oracle", cast_consts=True, ours="triton",
                        dtype=torch.float16, rel=1e-6):  # fmt: skip
    """The bias gradient (the last of ``grad_args``) of ``ours`` in a half dtype is fp32-accurate: against the
    float64 oracle on the same rounded inputs, its error past the rounding of the result itself (½ ulp,
    2⁻¹¹·|gt| in fp16) stays below ``rel``·max|gt|. A bias gradient summed from the half-precision dZ workspace
    misses this by orders of magnitude: each of the summed entries carries its own rounding."""
    consts = _rounded(const_args, dtype) if cast_consts else const_args
    gt = run(lambda *a: fn(oracle, *a), _rounded(grad_args, dtype), consts, torch.float64, 1.0, cast_consts)[-1]
    got = run(lambda *a: fn(ours, *a), grad_args, const_args, dtype, 1.0, cast_consts)[-1].double()
    half_ulp = torch.finfo(dtype).eps / 2
    excess = ((got - gt).abs() - half_ulp * gt.abs()).max().item() / gt.abs().max().item()
    assert excess <= rel, f"d_bias: {excess:.3e} of max|gt| past the result's rounding"
