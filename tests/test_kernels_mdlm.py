"""Fused MDLM (SUBS) loss vs float64 references: values and gradients of hidden, weight and bias.

The tolerance rule and the CPU/GPU set-up are in tests/kernel_rule.py.
"""

import pytest
import torch
from kernel_rule import DTYPES, HAS_CUDA, TOL, check, check_bias_gradient, run, skip_bf16_on_cpu

from ddistill.kernels import masked_diffusion_loss
from ddistill.kernels.reference import masked_diffusion_loss_oracle, mdlm_nll_rows

N, D, V, VP = 37, 48, 1001, 1024


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
    skip_bf16_on_cpu(dtype)
    gt = run(lambda *a: mdlm()("oracle", *a), [h, w], [None, y, m, rw], torch.float64, 2.5)
    ref = run(lambda *a: mdlm()("torch", *a), [h, w], [None, y, m, rw], dtype, 2.5)
    ours = run(lambda *a: mdlm()("triton", *a), [h, w], [None, y, m, rw], dtype, 2.5)
    for o, r, g in zip(ours, ref, gt):
        g = g.double()
        assert ((o.double() - g).abs() <= (r.double() - g).abs() + TOL[dtype] * g.abs().max().item()).all()


def test_bias_gradient_is_summed_in_fp32():
    h, w, b, y, m, rw = make_problem(seed=3)
    check_bias_gradient(mdlm(), [h, w, b], [y, m, rw])


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

    first = run(lambda *a: fn("triton", *a), [h, w, b], [y, m, rw], torch.bfloat16, 1.0)
    second = run(lambda *a: fn("triton", *a), [h, w, b], [y, m, rw], torch.bfloat16, 1.0)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    gt = run(lambda *a: fn("oracle", *a), [h, w, b], [y, m, rw], torch.float64, 1.0)
    ref = run(lambda *a: fn("torch", *a), [h, w, b], [y, m, rw], torch.bfloat16, 1.0)
    for o, r, t in zip(first, ref, gt):
        t = t.double()
        assert ((o.double() - t).abs() <= (r.double() - t).abs() + 1e-2 * max(1.0, t.abs().max().item())).all()
        assert (o.double() - t).norm() <= (r.double() - t).norm() + 2e-3 * t.norm()
