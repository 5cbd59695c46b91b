"""impl="chunked" (cuBLAS logits per row chunk, loss and gradient formed in the forward) vs float64 references.

Each of the three losses, its value and the gradients of hidden, weight and bias, under the rule of
tests/kernel_rule.py, at chunk sizes that do and do not divide the row count (N = 37 and the masked subsets), with
masked / unmasked rows, the mask column, temperatures, β, row weights and tensor normalisers; grad_output ≠ 1 and
a second backward; the no-grad forward; the errors of bad arguments.
"""

import functools

import kernel_rule
import pytest
import torch
from kernel_rule import DEVICE, DTYPES, HAS_CUDA
from test_kernels_distill import make_problem as distill_problem
from test_kernels_mdlm import make_problem as mdlm_problem
from test_kernels_uniform import make_problem as elbo_problem

from ddistill.kernels import dimo_generator_loss, distill_loss, masked_diffusion_loss, uniform_elbo_loss
from ddistill.kernels.chunked import CHUNK_ENV, ROW_BLOCK_ENV, chunk_rows_for
from ddistill.kernels.reference import masked_diffusion_loss_oracle, uniform_elbo_loss_oracle

N, V = 37, 1001
check = functools.partial(kernel_rule.check, ours="chunked")


def _impl_args(impl, chunk_rows):
    return dict(impl=impl, chunk_rows=chunk_rows) if impl == "chunked" else dict(impl=impl)


def mdlm(chunk_rows, mask_id=V - 1, normalizer=float(N), every_row=False):
    def fn(impl, hidden, weight, bias, targets, is_masked, row_weight):
        args = (hidden, weight, bias, targets, row_weight, V, mask_id)
        masked = None if every_row else is_masked
        if impl == "oracle":
            return masked_diffusion_loss_oracle(*args, is_masked=masked, normalizer=normalizer)
        return masked_diffusion_loss(*args, is_masked=masked, normalizer=normalizer, **_impl_args(impl, chunk_rows))

    return fn


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 64])
def test_mdlm_values_and_grads(chunk_rows):
    h, w, b, y, m, rw = mdlm_problem()
    check(mdlm(chunk_rows), [h, w, b], [y, m, rw], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_mdlm_half_precision(dtype):
    h, w, b, y, m, rw = mdlm_problem(seed=5)
    check(mdlm(7), [h, w, b], [y, m, rw], dtype)


def test_mdlm_every_row_no_mask_column_no_bias_grad_output():
    """is_masked=None (every row is a target), mask_id=None (plain weighted CE), no bias, tensor normaliser,
    grad_output = −2.5 applied by the backward."""
    h, w, _, y, m, rw = mdlm_problem(seed=6, bias=False)
    fn = mdlm(10, mask_id=None, normalizer=torch.tensor(11.0), every_row=True)

    def no_bias(impl, hidden, weight, targets, is_masked, row_weight):
        return fn(impl, hidden, weight, None, targets, is_masked, row_weight)

    check(no_bias, [h, w], [y, m, rw], torch.float32, grad_output=-2.5)


def mdlm_smoothed(chunk_rows, eps, mask_id=V - 1, normalizer=float(N)):
    """Label-smoothed SUBS CE; the float64 oracle is the torch reference (F.cross_entropy on the kept columns)."""

    def fn(impl, hidden, weight, bias, targets, is_masked, row_weight):
        return masked_diffusion_loss(hidden, weight, bias, targets, row_weight, V, mask_id, is_masked=is_masked,
                                     normalizer=normalizer, label_smoothing=eps,
                                     **_impl_args(impl, chunk_rows))  # fmt: skip

    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("eps", "mask_id", "chunk_rows"), [(0.1, V - 1, 5), (0.35, 17, 64), (0.2, None, 7)])
def test_mdlm_label_smoothing_values_and_grads(eps, mask_id, chunk_rows, dtype):
    """The smoothed row loss lse' − (1 − ε)z_y − ε·mean_kept z and its dZ, with the mask column last, inside the
    vocabulary (targets beside it) and absent, against F.cross_entropy(label_smoothing=ε) in float64."""
    h, w, b, y, m, rw = mdlm_problem(seed=11)
    if mask_id is not None:
        y = torch.where(y == mask_id, (y + 1) % (V - 1), y)  # a target is never the mask token
    check(mdlm_smoothed(chunk_rows, eps, mask_id), [h, w, b], [y, m, rw], dtype, oracle="torch")


def test_mdlm_label_smoothing_zero_is_the_unsmoothed_loss_bit_for_bit():
    h, w, b, y, m, rw = (t.to(DEVICE) for t in mdlm_problem(seed=12))
    args = (h, w, b, y, rw, V, V - 1)
    plain = masked_diffusion_loss(*args, is_masked=m, impl="chunked", chunk_rows=9)
    zero = masked_diffusion_loss(*args, is_masked=m, impl="chunked", chunk_rows=9, label_smoothing=0.0)
    assert torch.equal(plain, zero)


def test_mdlm_confident_targets_and_zero_masked_rows():
    """p_y → 1 (catches (p_y − 1) formed after a downcast); no masked row gives exact zeros."""
    h, w, b, y, m, rw = mdlm_problem(seed=2)
    w[:V] = w[:V] / w[:V].norm(dim=1, keepdim=True)
    h = 40.0 * w[y] + 0.1 * h
    _, gt = check(mdlm(8), [h, w, b], [y, m, rw], torch.float32)
    assert gt[0].item() < 1e-3
    got, _ = check(mdlm(8), [h, w, b], [y, torch.zeros(N, dtype=torch.bool), rw], torch.float32)
    assert all((t == 0).all() for t in got)


def _spiky_bias(b, spike_col, low_cols):
    """Logits whose row maximum jumps by ~100 in one column block while others sit ~50 below the rest: the per-lane
    online statistics (``chunked._lane_update``) must rescale, underflow and combine lanes exactly as one pass would."""
    b = b.clone()
    b[low_cols] -= 50.0
    b[spike_col] += 50.0
    return b


def test_mdlm_row_maximum_in_the_last_block_wide_range():
    h, w, b, y, m, rw = mdlm_problem(seed=8)
    b = _spiky_bias(b, V - 7, slice(0, 300))  # the interpreter walks 256-column blocks: the spike is in the last one
    y[::3] = V - 7
    check(mdlm(11), [h, w, b], [y, m, rw], torch.float32)


def divergence(kind, chunk_rows, beta=0.5, temperature=1.0, mask_id=V - 1, normalizer=float(N)):
    def fn(impl, hs, ws, bs, ht, wt, bt, row_mask, row_weight):
        return distill_loss(hs, ws, bs, ht, wt, bt, row_weight, V, kind=kind, beta=beta, temperature=temperature,
                            mask_id=mask_id, row_mask=row_mask, normalizer=normalizer,
                            **_impl_args("torch" if impl == "oracle" else impl, chunk_rows))  # fmt: skip

    return fn


@pytest.mark.parametrize(("kind", "chunk_rows"), [("kl_fwd", 5), ("kl_rev", 9), ("jsd", 64), ("tvd", 3)])
def test_divergences(kind, chunk_rows):
    student, teacher, m, rw = distill_problem(seed=20 + chunk_rows)
    check(divergence(kind, chunk_rows), list(student), [*teacher, m, rw], torch.float32,
          oracle_on_rounded_inputs=kind == "tvd")  # fmt: skip


@pytest.mark.parametrize("kind", ["kl_rev", "kl_fwd", "jsd"])
def test_divergences_with_maxima_in_different_blocks(kind):
    (hs, ws, bs), (ht, wt, bt), m, rw = distill_problem(seed=23)
    bs = _spiky_bias(bs, V - 9, slice(0, 300))  # the student's maximum arrives in the last block
    bt = _spiky_bias(bt, 3, slice(500, 1000))  # the teacher's in the first
    check(divergence(kind, 7), [hs, ws, bs], [ht, wt, bt, m, rw], torch.float32)


def test_divergences_half_precision():
    student, teacher, m, rw = distill_problem(seed=21)
    check(divergence("kl_rev", 6), list(student), [*teacher, m, rw], torch.float16)


@pytest.mark.parametrize("kind", ["kl_rev", "jsd"])
def test_teacher_close_to_student(kind):
    """p ≈ q: the gradient is a small difference of nearly equal softmaxes."""
    student, teacher, m, rw = distill_problem(seed=10, teacher_noise=1e-3)
    got, gt = check(divergence(kind, 11), list(student), [*teacher, m, rw], torch.float32)
    assert ((got[2].double() - gt[2]).norm() / gt[2].norm()).item() < 1e-3


def test_divergence_temperature_beta_every_row_grad_output():
    student, teacher, _, rw = distill_problem(seed=11)
    check(divergence("jsd", 16, beta=0.2, temperature=2.0, mask_id=None, normalizer=torch.tensor(3.0)), list(student),
          [*teacher, None, rw], torch.float32, grad_output=-1.7)  # fmt: skip


def dimo(chunk_rows, beta):
    def fn(impl, hg, wg, bg, ha, wa, ba, ht, wt, bt, row_mask, row_weight):
        return dimo_generator_loss(hg, wg, bg, ha, wa, ba, ht, wt, bt, row_weight, V, beta=beta, mask_id=V - 1,
                                   row_mask=row_mask, normalizer=3.0,
                                   **_impl_args("torch" if impl == "oracle" else impl, chunk_rows))  # fmt: skip

    return fn


@pytest.mark.parametrize(("beta", "chunk_rows"), [(0.0, 4), (0.5, 64), (-0.2, 13)])
def test_dimo_generator_surrogate(beta, chunk_rows):
    """DiMO: the value ½‖g‖² and the generator's gradient g from the aux and teacher linears (constants)."""
    gen, teacher, m, rw = distill_problem(seed=20)
    aux, _, _, _ = distill_problem(seed=21)
    aux = (aux[0][:, : gen[0].shape[1]], aux[1], aux[2])
    check(dimo(chunk_rows, beta), list(gen), [*aux, *teacher, m, rw], torch.float32)


def elbo(chunk_rows, normalizer=float(N)):
    def fn(impl, hidden, weight, bias, xt, x0, alpha, dalpha, row_weight):
        args = (hidden, weight, bias, xt, x0, alpha, dalpha, V)
        if impl == "oracle":
            return uniform_elbo_loss_oracle(*args, row_weight=row_weight, normalizer=normalizer)
        return uniform_elbo_loss(*args, row_weight=row_weight, normalizer=normalizer, **_impl_args(impl, chunk_rows))

    return fn


@pytest.mark.parametrize("chunk_rows", [7, 64])
def test_uniform_elbo_values_and_grads(chunk_rows):
    problem = elbo_problem(seed=chunk_rows)
    check(elbo(chunk_rows), list(problem[:3]), list(problem[3:]), torch.float32, cast_consts=False)


def test_uniform_elbo_extreme_alpha_half_precision_no_bias_grad_output():
    h, w, _, xt, x0, a, da, rw = elbo_problem(seed=30, scale=1e-3)
    a[:5] = 1e-4
    a[5:10] = 1.0 - 1e-4
    fn = elbo(12, normalizer=torch.tensor(9.0))

    def no_bias(impl, hidden, weight, *rest):
        return fn(impl, hidden, weight, None, *rest)

    check(no_bias, [h, w], [xt, x0, a, da, rw], torch.float32, grad_output=3.0, cast_consts=False)
    check(no_bias, [h, w], [xt, x0, a, da, rw], torch.float16, cast_consts=False)


def test_second_backward_and_no_grad_forward():
    """The backward only scales what the forward stored: backward twice (retain_graph) with g = 1 then g = 3 gives
    the gradients and exactly 3× them; a no-grad forward returns the same value without gradient work."""
    student, teacher, m, rw = distill_problem(seed=40)
    hs, ws, bs = (t.to(DEVICE).requires_grad_(True) for t in student)
    teacher, m, rw = [t.to(DEVICE) for t in teacher], m.to(DEVICE), rw.to(DEVICE)
    loss = distill_loss(hs, ws, bs, *teacher, rw, V, kind="kl_rev", mask_id=V - 1, row_mask=m, impl="chunked",
                        chunk_rows=6)  # fmt: skip
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (hs, ws, bs)]
    for t in (hs, ws, bs):
        t.grad = None
    loss.backward(torch.tensor(3.0, device=loss.device))
    for g1, t in zip(first, (hs, ws, bs)):
        assert g1.abs().max() > 0
        assert torch.equal(t.grad, g1 * 3.0)
    with torch.no_grad():
        again = distill_loss(hs, ws, bs, *teacher, rw, V, kind="kl_rev", mask_id=V - 1, row_mask=m, impl="chunked",
                             chunk_rows=6)  # fmt: skip
    assert torch.equal(again, loss.detach())


def test_bad_arguments_are_refused(monkeypatch):
    h, w, b, y, m, rw = (t.to(DEVICE) for t in mdlm_problem())  # CPU tensors on a GPU machine need the interpreter
    args = (h, w, b, y, rw, V, V - 1)
    with pytest.raises(ValueError, match="chunk_rows"):
        masked_diffusion_loss(*args, is_masked=m, impl="chunked", chunk_rows=0)
    with pytest.raises(ValueError, match="row_weight.*constant"):
        masked_diffusion_loss(h, w, b, y, rw.clone().requires_grad_(True), V, V - 1, impl="chunked")
    with pytest.raises(ValueError, match="normalizer"):
        masked_diffusion_loss(*args, is_masked=m, impl="chunked", normalizer=0.0)
    with pytest.raises(ValueError, match="expected one of"):
        masked_diffusion_loss(*args, impl="chunky")
    for eps in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            masked_diffusion_loss(*args, is_masked=m, impl="chunked", label_smoothing=eps)
    with pytest.raises(ValueError, match="label_smoothing > 0 needs impl='chunked'"):
        masked_diffusion_loss(*args, is_masked=m, impl="triton", label_smoothing=0.1)
    monkeypatch.setenv(CHUNK_ENV, "lots")
    with pytest.raises(ValueError, match=CHUNK_ENV):
        masked_diffusion_loss(*args, is_masked=m, impl="chunked")
    monkeypatch.delenv(CHUNK_ENV)
    for spec in ("2048", "1000,8", "2048,3"):
        monkeypatch.setenv(ROW_BLOCK_ENV, spec)
        with pytest.raises(ValueError, match=ROW_BLOCK_ENV):
            masked_diffusion_loss(*args, is_masked=m, impl="chunked")


def test_default_chunk_rows_follow_the_workspace_budget(monkeypatch):
    monkeypatch.setenv(CHUNK_ENV, "512")
    assert chunk_rows_for(8192, 50304, 2, None) == 5312  # 512 MiB / (50304 · 2 B) = 5336 rows → multiple of 64
    assert chunk_rows_for(8192, 50304, 10, None) == 1024  # the distillation: two fp32 logits chunks and dZ
    assert chunk_rows_for(100, 50304, 6, None) == 100  # never more rows than there are
    monkeypatch.setenv(CHUNK_ENV, "1")
    assert chunk_rows_for(8192, 50304, 6, None) == 64  # at least one GEMM tile of rows
    assert chunk_rows_for(8192, 50304, 6, 333) == 333


PROD_V, PROD_VP = 50258, 50304


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("loss", ["mdlm", "kl_rev", "uniform_elbo"])
def test_gpu_bf16_production_vocab_as_accurate_as_the_triton_path(loss):
    """bf16 at V = 50258 (padded 50304), d = 256, 300 rows, chunks of 128: the chunked path's relative error vs
    float64 (value, dh, dW) is within 1.5× the Triton path's + 1e-3."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d = 300, 256
    h = torch.randn(n, d, device="cuda", generator=g)
    w = torch.randn(PROD_VP, d, device="cuda", generator=g) * d**-0.5
    w[PROD_V:] = 0
    b = torch.randn(PROD_VP, device="cuda", generator=g) * 0.1
    y = torch.randint(0, PROD_V - 1, (n,), device="cuda", generator=g)
    m = torch.rand(n, device="cuda", generator=g) < 0.5
    rw = torch.rand(n, device="cuda", generator=g) + 0.5
    alpha = torch.rand(n, device="cuda", generator=g) * 0.9 + 0.05
    ht = h + 0.3 * torch.randn(n, d, device="cuda", generator=g)
    wt = w + 0.01 * torch.randn(PROD_VP, d, device="cuda", generator=g)

    def value_and_grads(impl, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (h, w, b)]
        kw = _impl_args("torch" if impl == "oracle" else impl, 128)  # the distillation's reference is exact in fp64
        if loss == "mdlm":
            args = (*leaves, y, rw, PROD_V, PROD_V - 1)
            out = (masked_diffusion_loss_oracle(*args, is_masked=m, normalizer=float(n)) if impl == "oracle" else
                   masked_diffusion_loss(*args, is_masked=m, normalizer=float(n), **kw))  # fmt: skip
        elif loss == "kl_rev":
            out = distill_loss(*leaves, ht.to(dtype), wt.to(dtype), None, rw, PROD_V, kind="kl_rev", mask_id=PROD_V - 1,
                               row_mask=m, normalizer=float(n), **kw)  # fmt: skip
        else:
            args = (*leaves, torch.where(m, y, y.flip(0)), y, alpha, torch.full_like(alpha, -0.999), PROD_V)
            out = (uniform_elbo_loss_oracle(*args, row_weight=rw, normalizer=float(n)) if impl == "oracle" else
                   uniform_elbo_loss(*args, row_weight=rw, normalizer=float(n), **kw))  # fmt: skip
        out.backward()
        return [out.detach().double()] + [t.grad.double() for t in leaves[:2]]

    gt = value_and_grads("oracle", torch.float64)
    errors = {impl: [((a - r).norm() / r.norm()).item() for a, r in zip(value_and_grads(impl, torch.bfloat16), gt)]
              for impl in ("triton", "chunked")}  # fmt: skip
    for ours, theirs in zip(errors["chunked"], errors["triton"]):
        assert ours <= 1.5 * theirs + 1e-3, errors


def test_fp32_master_weight_gets_its_gradient_in_fp32():
    """Half hidden states with an fp32 weight (the engine's master weight): the weight is cast inside the loss, so
    its gradient leaves the fp32 accumulator as fp32, as accurate as the float64 oracle on the rounded operands."""
    h, w, b, y, m, rw = mdlm_problem(seed=7)
    h16 = h.to(DEVICE, torch.float16).requires_grad_(True)
    w32 = w.to(DEVICE, copy=True).requires_grad_(True)
    masked_diffusion_loss(h16, w32, b.to(DEVICE), y.to(DEVICE), rw.to(DEVICE), V, V - 1, is_masked=m.to(DEVICE),
                          impl="chunked", chunk_rows=9).backward()  # fmt: skip
    assert w32.grad.dtype == torch.float32 and h16.grad.dtype == torch.float16
    w64 = w.to(torch.float16).double().requires_grad_(True)
    masked_diffusion_loss_oracle(h16.detach().cpu().double(), w64, b.double(), y, rw.double(), V, V - 1,
                                 is_masked=m).backward()  # fmt: skip
    assert (w32.grad.cpu().double() - w64.grad).abs().max() <= 1e-3 * w64.grad.abs().max()


def test_frozen_weight_trained_bias():
    """Without dW the bias gradient is a column sum of dZ instead of a column of the dW GEMM: same values."""
    h, w, b, y, m, rw = mdlm_problem(seed=8)
    grads = {}
    for impl in ("chunked", "oracle"):
        dtype = torch.float64 if impl == "oracle" else torch.float32
        hh, bb = (t.to(DEVICE, dtype, copy=True).requires_grad_(True) for t in (h, b))
        mdlm(6)(impl, hh, w.to(DEVICE, dtype), bb, y.to(DEVICE), m.to(DEVICE), rw.to(DEVICE, dtype)).backward()
        grads[impl] = (hh.grad.double().cpu(), bb.grad.double().cpu())
    for ours, gt in zip(grads["chunked"], grads["oracle"]):
        assert (ours - gt).abs().max() <= 1e-5 * gt.abs().max()
