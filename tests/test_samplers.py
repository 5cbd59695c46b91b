"""Samplers vs exact marginals with closed-form denoisers on tiny vocabularies; caching, nucleus, greedy tail, NFE."""

import math

import pytest
import torch
from scipy.stats import chisquare

from ddistill.diffusion import LogLinearSchedule, sample_duo, sample_mdlm
from ddistill.diffusion.samplers import nucleus_filter, sample_categorical

# Independent positions: data marginals π_l over K ids (L = 3).
PI = torch.tensor(
    [[0.40, 0.30, 0.20, 0.10], [0.10, 0.15, 0.25, 0.50], [0.25, 0.25, 0.05, 0.45]], dtype=torch.float64
)
L, K = PI.shape
MASK_ID = K  # MDLM vocabulary = K data ids + [MASK]
P_MIN = 1e-4  # chi-square p-value threshold (a correct sampler fails with probability ~1e-4 per check)


def mdlm_exact_denoiser(x, sigma):
    """E[x0 | z_t] for independent positions: π_l at masked positions (carry-over handled by SUBS). Time-free."""
    logits = torch.zeros(*x.shape, K + 1, dtype=torch.float32)
    logits[..., :K] = PI.log().float()
    logits[..., MASK_ID] = 3.0  # must be ignored by SUBS
    return logits


def duo_exact_denoiser(x, sigma):
    """x̂ = π_l for every z_t and t: the plug-in that makes DUO's ancestral step exact for any step size.

    The true reverse kernel is q(z_t|z_s)·m_s(z_s)/m_t(z_t) with m_s = α_s·π + (1−α_s)/K; the plug-in posterior
    Σ_x x̂_x q(z_t|z_s) q(z_s|x) / Σ_x x̂_x q(z_t|x) equals it for all s < t iff x̂·Q_s ∝ m_s, i.e. x̂ = π
    (for uniform noise E[x0 | z_t] is *not* that plug-in: q(z_t|x) depends on x).
    """
    return PI.log().float().expand(*x.shape, K)


def assert_matches_data(tokens, prefix_len=0):
    n = tokens.shape[0]
    for pos in range(prefix_len, L):
        counts = torch.bincount(tokens[:, pos], minlength=K)
        assert counts.numel() == K, "sampled an id outside the data vocabulary"
        assert chisquare(counts.numpy(), (PI[pos] * n).numpy()).pvalue > P_MIN, (pos, counts)
    # joint over the free positions (independent ⇒ product of marginals)
    free = list(range(prefix_len, L))
    idx = torch.zeros(n, dtype=torch.long)
    joint = torch.ones(1, dtype=torch.float64)
    for pos in free:
        idx = idx * K + tokens[:, pos]
        joint = (joint[:, None] * PI[pos][None, :]).reshape(-1)
    counts = torch.bincount(idx, minlength=K ** len(free))
    assert chisquare(counts.numpy(), (joint * n).numpy()).pvalue > P_MIN


@pytest.mark.parametrize(("num_steps", "cached"), [(1, True), (4, True), (4, False), (64, True)])
def test_mdlm_matches_data_distribution(num_steps, cached):
    res = sample_mdlm(
        mdlm_exact_denoiser, batch_size=4000, length=L, num_steps=num_steps, mask_id=MASK_ID, vocab_size=K + 1,
        schedule=LogLinearSchedule(), cached=cached, generator=torch.Generator().manual_seed(num_steps), device="cpu",
    )
    assert res.tokens.dtype == torch.long and res.tokens.shape == (4000, L)
    assert (res.tokens != MASK_ID).all()
    assert_matches_data(res.tokens)
    assert 1 <= res.nfe <= num_steps + 1


def test_mdlm_unmasking_schedule():
    # Fraction of masks seen by the denoiser at step k must be (1 − α_{t_k})/(1 − α_1) on t_k = linspace(1, t_end, T+1).
    seen = []

    def denoiser(x, sigma):
        seen.append(((x == MASK_ID).double().mean().item(), sigma[0].item()))
        return mdlm_exact_denoiser(x, sigma)

    sched = LogLinearSchedule()
    T, t_end = 4, 0.2
    sample_mdlm(denoiser, batch_size=20000, length=L, num_steps=T, mask_id=MASK_ID, vocab_size=K + 1, schedule=sched,
                cached=False, generator=torch.Generator().manual_seed(3), device="cpu", t_end=t_end)
    ts = torch.linspace(1, t_end, T + 1, dtype=torch.float64)
    alphas = sched.alpha(ts)
    expected = ((1 - alphas) / (1 - alphas[0])).tolist()
    assert len(seen) == T + 1  # masks remain at t_end = 0.2, so the final fill calls the denoiser
    for (frac, sigma), exp_frac, t in zip(seen, expected, ts):
        assert abs(frac - exp_frac) < 0.01
        assert math.isclose(sigma, sched.sigma(t).item(), rel_tol=1e-6)


def test_mdlm_prefix_is_kept():
    prefix = torch.tensor([[2]]).expand(5000, 1)
    res = sample_mdlm(
        mdlm_exact_denoiser, batch_size=5000, length=L, num_steps=16, mask_id=MASK_ID, vocab_size=K + 1,
        schedule=LogLinearSchedule(), generator=torch.Generator().manual_seed(0), device="cpu", prefix=prefix,
    )
    assert (res.tokens[:, 0] == 2).all()
    assert_matches_data(res.tokens, prefix_len=1)


def _context_denoiser(calls):
    """Deterministic, x-dependent, time-free denoiser (stale caches would change the samples)."""

    def denoiser(x, sigma):
        calls.append(x.clone())
        n_unmasked = (x != MASK_ID).sum(-1, keepdim=True).float()
        logits = torch.zeros(*x.shape, K + 1)
        logits[..., :K] = PI.log().float() + torch.arange(K).float() * 0.7 * n_unmasked[..., None]
        logits[..., :K] += (x[..., :1] % K).float()[..., None] * 0.3
        return logits

    return denoiser


@pytest.mark.parametrize("nucleus_p", [1.0, 0.8])
def test_mdlm_cache_identical_samples_fewer_nfe(nucleus_p):
    kw = dict(batch_size=4, length=L, num_steps=128, mask_id=MASK_ID, vocab_size=K + 1, schedule=LogLinearSchedule(),
              device="cpu", nucleus_p=nucleus_p)
    calls_c, calls_u = [], []
    cached = sample_mdlm(_context_denoiser(calls_c), cached=True, generator=torch.Generator().manual_seed(5), **kw)
    uncached = sample_mdlm(_context_denoiser(calls_u), cached=False, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert cached.nfe == len(calls_c) and uncached.nfe == len(calls_u)
    assert uncached.nfe >= 128 and cached.nfe < uncached.nfe // 2
    # every cached call saw a different state than the previous one
    assert all(not torch.equal(a, b) for a, b in zip(calls_c, calls_c[1:]))


def _mdlm_reference(denoiser, *, batch_size, length, num_steps, generator, mask_id=MASK_ID, device="cpu",
                    t_end=1e-5):
    """Plain transcription of the MDLM ancestral step (module docstring of samplers): the float64 SUBS x_θ at
    every position of every step, unmask w.p. (α_s − α_t)/(1 − α_t), token by inverse CDF; the same random
    numbers. [MASK] is the last id (mask_id = number of data ids); also used on CUDA by tests/test_perf_gpu.py."""
    sched = LogLinearSchedule()
    x = torch.full((batch_size, length), mask_id, dtype=torch.long, device=device)
    ts = torch.linspace(1.0, t_end, num_steps + 1, dtype=torch.float64, device=device)
    for k in range(num_steps + 1):
        draw = dict(generator=generator, device=device, dtype=torch.float64)
        u_unmask = torch.rand(x.shape, **draw) if k < num_steps else None  # the last draw fills every remaining mask
        u_token = torch.rand(x.shape, **draw)
        logits = denoiser(x, sched.sigma(ts[k]).float().reshape(1).expand(batch_size)).to(torch.float64)
        logits[..., mask_id] = -math.inf
        cdf = torch.softmax(logits, dim=-1).cumsum(-1)
        token = (cdf <= (u_token * cdf[..., -1]).unsqueeze(-1)).sum(-1).clamp_max(mask_id - 1)
        masked = x == mask_id
        if k < num_steps:
            a_t, a_s = sched.alpha(ts[k]), sched.alpha(ts[k + 1])
            masked &= u_unmask < (a_s - a_t) / (1 - a_t)
        x = torch.where(masked, token, x)
    return x


@pytest.mark.parametrize("num_steps", [1, 3, 16])
def test_mdlm_samples_equal_plain_transcription(num_steps):
    """The sampler's float64 softmax only on the rows that take a token draws exactly what the plain per-position
    float64 posterior draws, with the same random numbers (context-dependent denoiser, so every row differs)."""
    kw = dict(batch_size=6, length=L, num_steps=num_steps)
    fast = sample_mdlm(_context_denoiser([]), mask_id=MASK_ID, vocab_size=K + 1, schedule=LogLinearSchedule(),
                       cached=False, device="cpu", generator=torch.Generator().manual_seed(11), **kw)
    plain = _mdlm_reference(_context_denoiser([]), generator=torch.Generator().manual_seed(11), **kw)
    assert (fast.tokens != MASK_ID).all()
    assert torch.equal(fast.tokens, plain)


def test_mdlm_cache_rejects_time_conditioning():
    with pytest.raises(ValueError, match="time_conditioning"):
        sample_mdlm(mdlm_exact_denoiser, batch_size=2, length=L, num_steps=4, mask_id=MASK_ID, vocab_size=K + 1,
                    schedule=LogLinearSchedule(), cached=True, time_conditioning=True,
                    generator=torch.Generator(), device="cpu")


def test_mdlm_nucleus_keeps_top_p_support():
    # every position: p = (0.5, 0.3, 0.15, 0.05) → top-0.7 support {0, 1} with probabilities (5/8, 3/8)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])

    def denoiser(x, sigma):
        logits = torch.zeros(*x.shape, K + 1)
        logits[..., :K] = probs.log()
        return logits

    res = sample_mdlm(denoiser, batch_size=4000, length=2, num_steps=8, mask_id=MASK_ID, vocab_size=K + 1,
                      schedule=LogLinearSchedule(), nucleus_p=0.7, generator=torch.Generator().manual_seed(1),
                      device="cpu")
    counts = torch.bincount(res.tokens.reshape(-1), minlength=K + 1)
    assert counts[2:].sum() == 0
    assert chisquare(counts[:2].numpy(), [8000 * 5 / 8, 8000 * 3 / 8]).pvalue > P_MIN


@pytest.mark.parametrize("num_steps", [1, 8, 64])
def test_duo_ancestral_matches_data_distribution(num_steps):
    res = sample_duo(duo_exact_denoiser, batch_size=4000, length=L, num_steps=num_steps, vocab_size=K,
                     schedule=LogLinearSchedule(), greedy_tail=False,
                     generator=torch.Generator().manual_seed(10 + num_steps), device="cpu")
    assert res.nfe == num_steps + 1
    assert_matches_data(res.tokens)


def test_duo_greedy_tail_returns_argmax_and_prefix():
    calls = []

    def denoiser(x, sigma):
        calls.append((x.clone(), sigma.clone()))
        return duo_exact_denoiser(x, sigma) + 0.3 * torch.arange(x.numel() * K).reshape(*x.shape, K).sin()

    prefix = torch.tensor([[1], [3], [0]])
    res = sample_duo(denoiser, batch_size=3, length=L, num_steps=5, vocab_size=K, schedule=LogLinearSchedule(),
                     greedy_tail=True, generator=torch.Generator().manual_seed(0), device="cpu", prefix=prefix)
    assert res.nfe == len(calls) == 6
    last_x, last_sigma = calls[-1]
    expected = denoiser(last_x, last_sigma).argmax(-1)
    expected[:, :1] = prefix
    assert torch.equal(res.tokens, expected)
    # σ = −log α_t on the grid linspace(1, 1e-5, T+1) of the log-linear schedule
    assert math.isclose(calls[0][1][0].item(), -math.log(1e-3), rel_tol=1e-6)
    assert math.isclose(last_sigma[0].item(), -math.log1p(-0.999 * 1e-5), rel_tol=1e-5)
    assert all((x[:, :1] == prefix).all() for x, _ in calls)


def test_sample_categorical_and_nucleus_filter():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.8, 0.0]], dtype=torch.float64).expand(3, 5)
    u = torch.tensor([0.0, 0.2 - 1e-12, 1.0 - 2.0**-53], dtype=torch.float64)
    assert sample_categorical(probs, u).tolist() == [1, 1, 3]  # zero-mass ids are never drawn
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    draws = sample_categorical(p.expand(40000, 4), torch.rand(40000, generator=g, dtype=torch.float64))
    assert chisquare(torch.bincount(draws, minlength=4).numpy(), (p * 40000).numpy()).pvalue > P_MIN
    f = nucleus_filter(p[None], 0.65)
    torch.testing.assert_close(f, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]], dtype=torch.float64))
    torch.testing.assert_close(nucleus_filter(p[None], 0.05), torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
