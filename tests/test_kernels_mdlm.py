"""Fused MDLM (SUBS) loss vs float64 references: values and gradients of hidden, weight and bias.

Tolerance rule (CCE-style): |ours − gt64| ≤ |torch_same_dtype − gt64| + tol·max|gt64|, elementwise,
tol = 5e-4 (fp32), 1e-3 (fp16), 1e-2 (bf16). On CPU the kernels run in Triton's interpreter (fp32/fp16 only);
with CUDA the bf16 cases run too.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # one block configuration instead of autotuning every (kernel, dtype, D) variant of the suite
    os.environ.setdefault("DDISTILL_KERNEL_BLOCKS", "64,128,64,4,3")

from ddistill.kernels import masked_diffusion_loss  # noqa: E402
from ddistill.kernels.reference import masked_diffusion_loss_oracle, mdlm_nll_rows  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
N, D, V, VP = 37, 48, 1001, 1024


def _skip_bf16_on_cpu(dtype):
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 is unsupported by the Triton interpreter (gpu only)")


def _run(fn, grad_args, const_args, dtype, grad_output):
    leaves = [None if t is None else t.detach().to(DEVICE, dtype, copy=True).requires_grad_(True) for t in grad_args]
    consts = [c.to(DEVICE, dtype) if torch.is_tensor(c) and c.is_floating_point() else c for c in const_args]
    consts = [c.to(DEVICE) if torch.is_tensor(c) else c for c in consts]
    loss = fn(*leaves, *consts)
    loss.backward(torch.tensor(grad_output, device=loss.device, dtype=loss.dtype))
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def check(fn, grad_args, const_args, dtype, grad_output=1.0):
    """fn(impl, *grad_args, *const_args) -> scalar; asserts the tolerance rule for the value and every gradient.

    impl: "triton" (ours), "torch" (reference in the same dtype), "oracle" (float64 ground truth).
    """
    _skip_bf16_on_cpu(dtype)
    gt = _run(lambda *a: fn("oracle", *a), grad_args, const_args, torch.float64, grad_output)
    ref = _run(lambda *a: fn("torch", *a), grad_args, const_args, dtype, grad_output)
    ours = _run(lambda *a: fn("triton", *a), grad_args, const_args, dtype, grad_output)
    for name, o, r, g in zip(["loss", "d_hidden", "d_weight", "d_bias"], ours, ref, gt):
        g = g.double()
        excess = (o.double() - g).abs() - (r.double() - g).abs() - TOL[dtype] * g.abs().max().item()
        assert torch.isfinite(o).all(), name
        assert excess.max().item() <= 0, f"{name}: exceeds the rule by {excess.max().item():.3e}"
    return ours, gt


def make_problem(seed=0, n=N, d=D, scale=0.3, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(VP, d, generator=g) * scale
    weight[V:] = 0.0  # padding rows, as the DiT pads them
    b = torch.randn(VP, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, V - 1, (n,), generator=g)
    is_masked = torch.rand(n, generator=g) < 0.5
    row_weight = torch.rand(n, generator=g) * 3 + 0.5
    return hidden, weight, b, targets, is_masked, row_weight


def mdlm(mask_id=V - 1, normalizer=float(N)):
    def fn(impl, hidden, weight, bias, targets, is_masked, row_weight):
        args = (hidden, weight, bias, targets, row_weight, V, mask_id)
        if impl == "oracle":
            return masked_diffusion_loss_oracle(*args, is_masked=is_masked, normalizer=normalizer)
        return masked_diffusion_loss(*args, is_masked=is_masked, normalizer=normalizer, impl=impl)

    return fn


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_and_grads(dtype):
    h, w, b, y, m, rw = make_problem()
    check(mdlm(), [h, w, b], [y, m, rw], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_output_no_bias(dtype):
    h, w, _, y, m, rw = make_problem(seed=1, bias=False)
    _skip_bf16_on_cpu(dtype)
    gt = _run(lambda *a: mdlm()("oracle", *a), [h, w], [None, y, m, rw], torch.float64, 2.5)
    ref = _run(lambda *a: mdlm()("torch", *a), [h, w], [None, y, m, rw], dtype, 2.5)
    ours = _run(lambda *a: mdlm()("triton", *a), [h, w], [None, y, m, rw], dtype, 2.5)
    for o, r, g in zip(ours, ref, gt):
        g = g.double()
        assert ((o.double() - g).abs() <= (r.double() - g).abs() + TOL[dtype] * g.abs().max().item()).all()


def test_confident_targets():
    """p_y → 1 (target logit ≈ +40): catches a (p_y − 1) formed after a downcast."""
    h, w, b, y, m, rw = make_problem(seed=2)
    w[:V] = w[:V] / w[:V].norm(dim=1, keepdim=True)
    h = 40.0 * w[y] + 0.1 * h
    ours, gt = check(mdlm(), [h, w, b], [y, m, rw], torch.float32)
    assert gt[0].item() < 1e-3  # really confident


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_near_uniform(dtype):
    """Zero-initialised head (p = 1/V): every non-target column carries gradient."""
    h, w, b, y, m, rw = make_problem(seed=3, scale=1e-4)
    ours, gt = check(mdlm(), [h, w, torch.zeros(VP)], [y, m, rw], dtype)
    d_bias = ours[3].double()
    assert (d_bias[: V - 1].abs() > 0).all()


def test_zero_masked_rows_gives_exact_zeros():
    h, w, b, y, _, rw = make_problem(seed=4)
    none = torch.zeros(N, dtype=torch.bool)
    ours, gt = check(mdlm(), [h, w, b], [y, none, rw], torch.float32)
    assert all((t == 0).all() for t in ours)


def test_large_row_weights_tensor_normalizer():
    h, w, b, y, m, _ = make_problem(seed=5)
    rw = torch.logspace(0, 3, N)
    check(mdlm(normalizer=torch.tensor(11.0)), [h, w, b], [y, m, rw], torch.float32)


def test_single_row_mask_in_middle_and_last_tile_target():
    """mask id inside the vocabulary (not last), target in the last partial tile, one row, all masked."""
    h, w, b, _, _, rw = make_problem(seed=6, n=1)
    y = torch.tensor([V - 2])
    check(mdlm(mask_id=500, normalizer=1.0), [h, w, b], [y, torch.ones(1, dtype=torch.bool), rw], torch.float32)


def test_padding_and_mask_column_get_no_gradient():
    h, w, b, y, m, rw = make_problem(seed=7)
    ours, _ = check(mdlm(), [h, w, b], [y, m, rw], torch.float32)
    d_weight, d_bias = ours[2], ours[3]
    assert (d_weight[V - 1 :] == 0).all() and (d_bias[V - 1 :] == 0).all()


def test_reference_matches_diffusion_module():
    """The kernel reference and ddistill.diffusion must define the same per-token loss."""
    from ddistill.diffusion import absorbing
    g = torch.Generator().manual_seed(8)
    batch, length, vocab, mask_id = 3, 5, 37, 36
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, vocab - 1, (batch, length), generator=g)
    xt = torch.where(torch.rand(batch, length, generator=g) < 0.5, torch.full_like(x0, mask_id), x0)
    alpha = torch.rand(batch, generator=g, dtype=torch.float64) * 0.8 + 0.1
    dalpha = -torch.ones(batch, dtype=torch.float64)
    theirs = absorbing.mdlm_loss_per_token(logits, x0, xt, alpha, dalpha, mask_id)
    w = (-dalpha / (1 - alpha))[:, None].expand(batch, length)
    ours = mdlm_nll_rows(logits.reshape(-1, vocab), x0.reshape(-1), (xt == mask_id).reshape(-1), mask_id) * w.reshape(-1)
    torch.testing.assert_close(theirs.double().reshape(-1), ours, rtol=1e-6, atol=1e-6)  # theirs is fp32


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_bf16_production_vocab_deterministic():
    """bf16 at the production vocabulary (50258 → 50304 padded), run twice: bitwise-identical results."""
    g = torch.Generator().manual_seed(9)
    n, d, vocab, vpad = 512, 256, 50258, 50304
    h = torch.randn(n, d, generator=g)
    w = torch.randn(vpad, d, generator=g) * 0.05
    b = torch.randn(vpad, generator=g) * 0.1
    y = torch.randint(0, vocab - 1, (n,), generator=g)
    m = torch.rand(n, generator=g) < 0.5
    rw = torch.rand(n, generator=g) + 0.5

    def fn(impl, hidden, weight, bias, targets, is_masked, row_weight):
        args = (hidden, weight, bias, targets, row_weight, vocab, vocab - 1)
        if impl == "oracle":
            return masked_diffusion_loss_oracle(*args, is_masked=is_masked, normalizer=float(n))
        return masked_diffusion_loss(*args, is_masked=is_masked, normalizer=float(n), impl=impl)

    first = _run(lambda *a: fn("triton", *a), [h, w, b], [y, m, rw], torch.bfloat16, 1.0)
    second = _run(lambda *a: fn("triton", *a), [h, w, b], [y, m, rw], torch.bfloat16, 1.0)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    gt = _run(lambda *a: fn("oracle", *a), [h, w, b], [y, m, rw], torch.float64, 1.0)
    ref = _run(lambda *a: fn("torch", *a), [h, w, b], [y, m, rw], torch.bfloat16, 1.0)
    for o, r, t in zip(first, ref, gt):
        t = t.double()
        assert ((o.double() - t).abs() <= (r.double() - t).abs() + 1e-2 * max(1.0, t.abs().max().item())).all()
        assert (o.double() - t).norm() <= (r.double() - t).norm() + 2e-3 * t.norm()
