"""Schedules, time sampling, forward processes and per-token losses vs float64 transcriptions / brute force."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddistill.diffusion import (
    CosineSchedule,
    LogLinearSchedule,
    build_schedule,
    corrupt_uniform,
    duo_elbo_per_token,
    mask_tokens,
    mdlm_loss,
    mdlm_loss_per_token,
    sample_times,
    subs_log_probs,
    udlm_loss_per_token,
    uniform_posterior,
)

# ---------------------------------------------------------------------------------------------------------------
# schedules and time sampling


@pytest.mark.parametrize("schedule", [LogLinearSchedule(), CosineSchedule(), LogLinearSchedule(eps=0.1)])
def test_alpha_prime_is_derivative_of_alpha(schedule):
    t = torch.linspace(0.01, 0.99, 97, dtype=torch.float64)
    h = 1e-6
    fd = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.alpha_prime(t), fd, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(schedule.sigma(t), -torch.log(schedule.alpha(t)), rtol=1e-12, atol=1e-12)
    assert (schedule.alpha_prime(t) < 0).all()


def test_loglinear_values_and_builder():
    s = build_schedule("loglinear", eps=1e-3)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t), torch.tensor([1.0, 1 - 0.999 / 2, 1e-3], dtype=torch.float64))
    # MDLM weight α'/(1−α) = −1/t for log-linear
    tt = torch.tensor([0.1, 0.7], dtype=torch.float64)
    torch.testing.assert_close(s.alpha_prime(tt) / (1 - s.alpha(tt)), -1 / tt)
    assert isinstance(build_schedule("cosine"), CosineSchedule)
    with pytest.raises(ValueError, match="geometric"):
        build_schedule("geometric")


@pytest.mark.parametrize("antithetic", [True, False])
def test_sample_times_ranks_union_equals_global(antithetic):
    N, world, t_min = 24, 4, 1e-3
    full = sample_times(
        N, global_batch=N, offset=0, generator=torch.Generator().manual_seed(3), device="cpu",
        t_min=t_min, antithetic=antithetic, dtype=torch.float64,
    )
    parts = [
        sample_times(
            N // world, global_batch=N, offset=r * (N // world), generator=torch.Generator().manual_seed(3),
            device="cpu", t_min=t_min, antithetic=antithetic, dtype=torch.float64,
        )
        for r in range(world)
    ]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=0)
    assert (full >= t_min).all() and (full <= 1).all()
    if antithetic:
        u = (full - t_min) / (1 - t_min)
        strata = torch.floor(u * N).long()
        assert sorted(strata.tolist()) == list(range(N))  # exactly one point per stratum
        gaps = torch.diff(torch.sort(u).values)
        torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / N), rtol=0, atol=1e-9)  # u_i = (U + i)/N


def test_sample_times_rejects_bad_slice():
    with pytest.raises(ValueError, match="offset"):
        sample_times(4, global_batch=6, offset=4, generator=torch.Generator(), device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# forward processes


def test_mask_tokens_rate():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 10, (3, 20000), generator=g)
    alpha = torch.tensor([1.0, 0.3, 0.0])
    xt = mask_tokens(x0, alpha, 10, g)
    frac = (xt == 10).double().mean(1)
    assert frac[0] == 0 and frac[2] == 1
    assert abs(frac[1].item() - 0.7) < 0.015
    assert torch.equal(xt[xt != 10], x0[xt != 10])


def test_corrupt_uniform_rate_and_uniformity():
    g = torch.Generator().manual_seed(0)
    K = 8
    x0 = torch.zeros(2, 40000, dtype=torch.long)
    zt = corrupt_uniform(x0, torch.tensor([1.0, 0.25]), K, g)
    assert (zt[0] == 0).all()
    counts = torch.bincount(zt[1], minlength=K).double() / zt.shape[1]
    expected = torch.full((K,), 0.75 / K, dtype=torch.float64)
    expected[0] += 0.25
    assert (counts - expected).abs().max() < 0.01


# ---------------------------------------------------------------------------------------------------------------
# MDLM (SUBS) loss


def _mdlm_reference(logits, x0, xt, alpha, alpha_prime, mask_id):
    lp = logits.double().clone()
    lp[..., mask_id] = -math.inf
    lp = torch.log_softmax(lp, -1).gather(-1, x0[..., None]).squeeze(-1)
    w = (alpha_prime.double() / (1 - alpha.double()))[:, None]
    return torch.where(xt == mask_id, w * lp, torch.zeros_like(lp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_id", [36, 5])
def test_mdlm_loss_matches_float64_reference(dtype, mask_id):
    g = torch.Generator().manual_seed(1)
    B, L, V = 4, 9, 37
    logits = (torch.randn(B, L, V, generator=g) * 4).to(dtype)
    x0 = torch.randint(0, V - 1, (B, L), generator=g)
    x0[x0 >= mask_id] += 1  # data never contains the mask id
    sched = LogLinearSchedule()
    t = torch.tensor([0.05, 0.4, 0.8, 1.0])
    alpha, alpha_p = sched.alpha(t), sched.alpha_prime(t)
    xt = mask_tokens(x0, alpha, mask_id, g)
    out = mdlm_loss_per_token(logits, x0, xt, alpha, alpha_p, mask_id)
    ref = _mdlm_reference(logits, x0, xt, alpha, alpha_p, mask_id)
    assert out.dtype == torch.float32 and out.shape == (B, L)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-5)
    assert (out >= 0).all() and (out[xt != mask_id] == 0).all() and (out[xt == mask_id] > 0).all()
    # reduction: all tokens, and a validity mask
    torch.testing.assert_close(mdlm_loss(logits, x0, xt, alpha, alpha_p, mask_id).double(), ref.mean(), rtol=2e-6, atol=0)
    valid = torch.rand(B, L, generator=g) < 0.6
    torch.testing.assert_close(
        mdlm_loss(logits, x0, xt, alpha, alpha_p, mask_id, valid=valid).double(),
        ref[valid].sum() / valid.sum(), rtol=2e-6, atol=0,
    )


def test_mdlm_loss_gradient_matches_reference():
    g = torch.Generator().manual_seed(2)
    B, L, V, mask_id = 2, 5, 11, 10
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, V - 1, (B, L), generator=g)
    xt = mask_tokens(x0, torch.tensor([0.3, 0.6]), mask_id, g)
    alpha, alpha_p = torch.tensor([0.3, 0.6]), torch.tensor([-0.999, -0.999])
    a = logits.clone().requires_grad_()
    mdlm_loss_per_token(a, x0, xt, alpha, alpha_p, mask_id).sum().backward()
    b = logits.clone().requires_grad_()
    _mdlm_reference(b, x0, xt, alpha, alpha_p, mask_id).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert a.grad[..., mask_id].abs().max() == 0


def test_mdlm_loss_zero_for_perfect_denoiser():
    B, L, V, mask_id = 2, 6, 9, 8
    x0 = torch.randint(0, V - 1, (B, L), generator=torch.Generator().manual_seed(0))
    xt = torch.full_like(x0, mask_id)
    logits = torch.full((B, L, V), -50.0).scatter(-1, x0[..., None], 50.0)
    logits[..., mask_id] = 1e4  # SUBS must ignore the mask logit
    out = mdlm_loss_per_token(logits, x0, xt, torch.tensor([0.5, 0.9]), torch.tensor([-1.0, -1.0]), mask_id)
    assert out.abs().max() < 1e-6


def test_subs_log_probs():
    g = torch.Generator().manual_seed(0)
    V, mask_id = 7, 6
    logits = torch.randn(2, 5, V, generator=g)
    xt = torch.tensor([[6, 1, 6, 3, 0], [6, 6, 6, 6, 2]])
    lp = subs_log_probs(logits, xt, mask_id)
    assert torch.isneginf(lp[..., mask_id]).all()
    masked = xt == mask_id
    torch.testing.assert_close(lp[masked].exp().sum(-1), torch.ones(int(masked.sum())))
    ref = torch.log_softmax(logits[..., :mask_id], -1)
    torch.testing.assert_close(lp[..., :mask_id][masked], ref[masked])
    carried = lp[~masked]
    torch.testing.assert_close(carried.exp(), F.one_hot(xt[~masked], V).float())


# ---------------------------------------------------------------------------------------------------------------
# DUO / UDLM loss and the uniform posterior


def _duo_reference(logits, xt, x0, alpha, alpha_prime):
    """Literal float64 transcription of the DUO closed form (duo.md §3.3), materialising x̄_θ."""
    K = logits.shape[-1]
    a = alpha.double()[:, None]
    ap = alpha_prime.double()[:, None]
    p = torch.softmax(logits.double(), -1)
    xbar_theta = K * a[..., None] * p + (1 - a[..., None])
    log_xt = torch.log(xbar_theta)
    log_i = log_xt.gather(-1, xt[..., None]).squeeze(-1)
    log_m = log_xt.gather(-1, x0[..., None]).squeeze(-1)
    same = (xt == x0).double()
    diff = 1 - same
    xbar_i = (1 - a) + K * a * same
    kappa = (1 - a) / (K * a + 1 - a)
    term1 = K * (1 / xbar_i - 1 / torch.exp(log_i))
    term2 = (
        -(kappa * same + diff) * (log_xt.sum(-1) - K * log_i)
        - (K * a / (1 - a)) * (log_m - log_i) * diff
        + ((K - 1) * kappa * same - (1 / kappa) * diff) * torch.log(kappa)
    )
    return ap / (K * a) * (term1 - term2)


def _duo_problem(K, dtype, seed=0, B=4, L=16, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, K, generator=g) * scale).to(dtype)
    x0 = torch.randint(0, K, (B, L), generator=g)
    alpha = torch.tensor([0.002, 0.3, 0.7, 0.995][:B], dtype=torch.float64)
    alpha_p = torch.tensor([-0.999, -0.5, -1.3, -0.2][:B], dtype=torch.float64)
    xt = corrupt_uniform(x0, alpha, K, g)
    xt[:, :3] = x0[:, :3]  # make sure both the x = z and x ≠ z branches occur
    xt[:, 3:6] = (x0[:, 3:6] + 1) % K
    return logits, xt, x0, alpha, alpha_p


@pytest.mark.parametrize("K", [2, 13, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_duo_elbo_matches_float64_formula_and_udlm(K, dtype):
    logits, xt, x0, alpha, alpha_p = _duo_problem(K, dtype)
    out = duo_elbo_per_token(logits, xt, x0, alpha, alpha_p)
    ref = _duo_reference(logits, xt, x0, alpha, alpha_p)
    udlm = udlm_loss_per_token(logits, xt, x0, alpha, alpha_p)
    assert out.dtype == torch.float32 and out.shape == xt.shape
    torch.testing.assert_close(udlm, ref, rtol=1e-9, atol=1e-9)  # two independent float64 forms agree
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    assert (ref >= -1e-9).all()
    assert (out >= -1e-5).all()


def test_duo_elbo_gpt2_vocab_precision():
    logits, xt, x0, alpha, alpha_p = _duo_problem(50258, torch.float32, B=4, L=3, scale=5.0)
    out = duo_elbo_per_token(logits, xt, x0, alpha, alpha_p)
    ref = udlm_loss_per_token(logits, xt, x0, alpha, alpha_p)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_duo_elbo_gradient_matches_udlm():
    logits, xt, x0, alpha, alpha_p = _duo_problem(17, torch.float64, B=3, L=6)
    a = logits.clone().requires_grad_()
    duo_elbo_per_token(a, xt, x0, alpha[:3], alpha_p[:3]).sum().backward()
    b = logits.clone().requires_grad_()
    udlm_loss_per_token(b, xt, x0, alpha[:3], alpha_p[:3]).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_duo_elbo_zero_for_perfect_denoiser():
    _, xt, x0, alpha, alpha_p = _duo_problem(11, torch.float32)
    perfect = torch.full((*x0.shape, 11), -60.0).scatter(-1, x0[..., None], 60.0)
    out = duo_elbo_per_token(perfect, xt, x0, alpha, alpha_p)
    assert out.abs().max() < 1e-5
    wrong = torch.full((*x0.shape, 11), -60.0).scatter(-1, ((x0 + 1) % 11)[..., None], 60.0)
    assert (duo_elbo_per_token(wrong, xt, x0, alpha, alpha_p) > 1e-3).all()


def test_uniform_posterior_matches_bayes():
    g = torch.Generator().manual_seed(0)
    K, n = 6, 10
    x_hat = torch.softmax(torch.randn(n, K, generator=g, dtype=torch.float64), -1)
    zt = torch.randint(0, K, (n,), generator=g)
    for a_t, a_s in [(0.2, 0.7), (0.01, 0.02), (0.5, 1.0)]:
        q = uniform_posterior(x_hat, zt, a_t, a_s)
        a_ts = a_t / a_s
        Q_ts = a_ts * torch.eye(K, dtype=torch.float64) + (1 - a_ts) / K  # q(z_t | z_s), row z_s
        Q_s = a_s * torch.eye(K, dtype=torch.float64) + (1 - a_s) / K  # q(z_s | x), row x
        # Σ_x x̂_x q(z_t|z_s) q(z_s|x), normalised over z_s
        joint = (x_hat @ Q_s) * Q_ts[:, zt].T
        ref = joint / joint.sum(-1, keepdim=True)
        assert q.dtype == torch.float64
        torch.testing.assert_close(q, ref, rtol=1e-12, atol=1e-14)


def test_row_chunking_matches_unchunked(monkeypatch):
    import ddistill.diffusion.absorbing as absorbing
    import ddistill.diffusion.uniform as uniform

    logits, xt, x0, alpha, alpha_p = _duo_problem(29, torch.float32, B=4, L=10)
    mask_id = 28
    mt = mask_tokens(x0.clamp_max(27), alpha, mask_id, torch.Generator().manual_seed(0))
    full_duo = duo_elbo_per_token(logits, xt, x0, alpha, alpha_p)
    full_mdlm = mdlm_loss_per_token(logits, x0.clamp_max(27), mt, alpha, alpha_p, mask_id)
    monkeypatch.setattr(absorbing, "ROW_CHUNK", 7)  # 40 rows → 6 chunks, the last one partial
    monkeypatch.setattr(uniform, "ROW_CHUNK", 7)
    torch.testing.assert_close(duo_elbo_per_token(logits, xt, x0, alpha, alpha_p), full_duo)
    torch.testing.assert_close(mdlm_loss_per_token(logits, x0.clamp_max(27), mt, alpha, alpha_p, mask_id), full_mdlm)
    assert (mt == mask_id).any() and full_mdlm.abs().sum() > 0
