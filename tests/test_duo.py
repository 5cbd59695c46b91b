"""DUO curriculum (methods/duo.py) and the low-memory Gaussian-latent sampler (diffusion.duality.sample_top_noise):
laws against brute-force Gaussians on small K, the network input against the full tempered softmax within the
docstring's bound, loss and gradients of the two paths on shared noise, τ → 0, the switch to the plain ELBO."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import ddistill.methods.duo as duo_module
from ddistill.config import ConfigError, from_dict
from ddistill.diffusion.duality import DualityTable, TopNoise, gaussian_scales, sample_top_noise, sample_top_noise_rows
from ddistill.methods import get_method
from ddistill.methods.base import StepContext
from ddistill.methods.duo import DUO, DUOConfig, tempered_topk_inputs
from ddistill.models.dit import ModelConfig, build_model


def _ctx(step=0, offset=0, gbs=4, seed=7):
    return StepContext(step=step, micro_step=0, global_offset=offset, global_batch_size=gbs,
                       generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"), rank=0, world_size=1)


def _dit(vocab, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(size="test", vocab_size=vocab, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _top_from_full(eps: torch.Tensor, x: torch.Tensor, k: int) -> TopNoise:
    """The parts of a full ε (…, K) that sample_top_noise draws: ε_x and the sorted top-k of the others."""
    others = eps.double().scatter(-1, x.unsqueeze(-1), float("-inf"))
    values, indices = others.topk(k, dim=-1)
    return TopNoise(clean=eps.double().gather(-1, x.unsqueeze(-1)).squeeze(-1), values=values, indices=indices)


@pytest.mark.parametrize("k", [3, 5])  # 3: the rejection draw of ids (k² <= K − 1); 5: the permutation draw
def test_top_noise_has_the_law_of_the_largest_gaussian_coordinates(k):
    vocab, n = 12, 4000
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n,), generator=gen)
    cheap = sample_top_noise(x, vocab, k, gen)
    exact = _top_from_full(torch.randn(n, vocab, generator=gen, dtype=torch.float64), x, k)
    assert bool((cheap.values[:, :-1] >= cheap.values[:, 1:]).all())
    for name in ("clean", "values"):
        a, b = getattr(cheap, name).reshape(n, -1), getattr(exact, name).reshape(n, -1)
        for col in range(a.shape[1]):
            assert stats.ks_2samp(a[:, col].numpy(), b[:, col].numpy()).pvalue > 1e-3, (name, col)
    ids = cheap.indices
    assert bool((ids != x[:, None]).all())
    assert bool((ids.sort(-1).values[:, 1:] != ids.sort(-1).values[:, :-1]).all())  # distinct
    # Every id ≠ x is equally likely in every slot: offsets (id − x) mod K over 1..K−1.
    for col in range(k):
        counts = torch.bincount((ids[:, col] - x) % vocab, minlength=vocab)[1:].numpy()
        assert stats.chisquare(counts).pvalue > 1e-3, col


@pytest.mark.parametrize("gamma", [-3.0, -1.0])
def test_curriculum_argmax_has_the_usdm_marginal_of_the_duality(gamma):
    """P(argmax w = x) = α + (1 − α)/K and the other ids uniform, α = T(γ), for both samplers (binomial / χ²)."""
    vocab, n = 6, 40_000
    alpha = float(DualityTable(vocab, num_points=2001).alpha(torch.tensor([gamma], dtype=torch.float64)))
    p_clean = alpha + (1 - alpha) / vocab
    a_t, s_t = gaussian_scales(torch.full((n,), gamma, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (n,), generator=gen)
    eps = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    full = (a_t[:, None] * torch.nn.functional.one_hot(x, vocab) + s_t[:, None] * eps).argmax(-1)
    noise = TopNoise(*(t.unsqueeze(0) for t in sample_top_noise(x, vocab, 2, gen)))
    cheap = tempered_topk_inputs(x[None], noise, a_t[:1], s_t[:1], 1e-3, vocab)[0][0]
    for z in (full, cheap):
        hits = int((z == x).sum())
        assert abs(hits - n * p_clean) < 5 * math.sqrt(n * p_clean * (1 - p_clean)), (hits, n * p_clean)
        counts = torch.bincount((z - x)[z != x] % vocab, minlength=vocab)[1:].numpy()
        assert stats.chisquare(counts).pvalue > 1e-3


def test_topk_input_equals_the_full_tempered_softmax_within_the_bound():
    vocab, length, k, tau = 40, 64, 4, 0.3  # a large τ so that the dropped tail is visible
    model = _dit(vocab)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, vocab, (2, length), generator=gen)
    gamma = torch.tensor([-3.0, -1.5], dtype=torch.float64)
    a_t, s_t = gaussian_scales(gamma)
    eps = torch.randn(2, length, vocab, generator=gen, dtype=torch.float64)
    w = a_t[:, None, None] * torch.nn.functional.one_hot(x, vocab) + s_t[:, None, None] * eps
    full = torch.softmax(w / tau, -1) @ model.vocab_embed.embedding.detach().double()
    max_norm = float(model.vocab_embed.embedding.detach().norm(dim=-1).max())
    for kk in (k, vocab - 1):
        z_t, idx, wts, bound = tempered_topk_inputs(x, _top_from_full(eps, x, kk), a_t, s_t, tau, vocab)
        assert torch.equal(z_t, w.argmax(-1))
        low = model.vocab_embed.bag(idx, wts).detach().double()
        err = (low - full).norm(dim=-1)
        if kk == vocab - 1:
            assert float(bound.max()) == 0.0 and float(err.max()) < 1e-5
        else:
            assert float(err.max()) > 1e-4 and float(bound.min()) < 1.0  # the tail matters and the bound is not vacuous
            assert bool((err <= 2 * bound * max_norm + 1e-5).all())


def _shared_noise(monkeypatch):
    """Make the top-k path draw its TopNoise from the same per-row ε (L, K) the full path draws."""

    def from_full(x, vocab_size, k, generators):
        rows = [_top_from_full(torch.randn(x.shape[1], vocab_size, generator=g), x[r], k) for r, g in enumerate(generators)]
        return TopNoise(*(torch.stack(parts) for parts in zip(*rows)))

    monkeypatch.setattr(duo_module, "sample_top_noise_rows", from_full)


@pytest.mark.parametrize("tau", [1e-3, 0.5])
def test_topk_loss_and_gradients_match_the_full_latent_path(monkeypatch, tau):
    vocab = 23
    model = _dit(vocab)
    _shared_noise(monkeypatch)
    x0 = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(3))
    results = {}
    for latent in ("full", "topk"):
        cfg = DUOConfig(latent=latent, top_k=vocab - 1, tau_log10_start=math.log10(tau),
                        tau_log10_end=math.log10(tau), curriculum_end=10)
        method = DUO(cfg, vocab_size=vocab, mask_id=vocab - 1)
        model.zero_grad()
        out = method.step({"student": model}, x0, _ctx())
        out.losses["student"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[latent] = out.losses["student"].detach(), grads, out.metrics["corrupt_rate"]
    assert results["full"][2] > 0  # some tokens were corrupted
    torch.testing.assert_close(results["topk"][0], results["full"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["topk"][1], results["full"][1], rtol=1e-4, atol=1e-6)


def test_soft_embedding_path_equals_the_hard_path_as_tau_goes_to_zero():
    vocab = 29
    model = _dit(vocab)
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, vocab, (2, 10), generator=gen)
    sigma = torch.tensor([0.3, 1.2])
    hard = model(x, sigma)
    one_hot = model(x, sigma, soft_inputs=(x.unsqueeze(-1), torch.ones(2, 10, 1)))
    torch.testing.assert_close(one_hot, hard, rtol=0, atol=1e-6)
    gamma = torch.tensor([-3.0, -2.0], dtype=torch.float64)
    a_t, s_t = gaussian_scales(gamma)
    noise = TopNoise(*(torch.stack(p) for p in zip(*(sample_top_noise(x[r], vocab, 8, gen) for r in range(2)))))
    gaps = []
    for tau in (1.0, 1e-1, 1e-4):
        z_t, idx, wts, _ = tempered_topk_inputs(x, noise, a_t, s_t, tau, vocab)
        gaps.append(float((model(z_t, sigma, soft_inputs=(idx, wts.float())) - model(z_t, sigma)).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5, gaps
    full_soft = model(torch.full((2, 10, vocab), -1e4).scatter(-1, z_t.unsqueeze(-1), 0.0), sigma)
    torch.testing.assert_close(full_soft, model(z_t, sigma), rtol=0, atol=1e-5)  # the (B, L, V) soft path too


def test_after_the_curriculum_the_step_is_exactly_usdm():
    vocab = 19
    model = _dit(vocab)
    x0 = torch.randint(0, vocab, (4, 8), generator=torch.Generator().manual_seed(5))
    duo = DUO(DUOConfig(curriculum_end=3), vocab_size=vocab, mask_id=vocab - 1)
    usdm = get_method("usdm")(get_method("usdm").Config(), vocab_size=vocab, mask_id=vocab - 1)
    during = duo.step({"student": model}, x0, _ctx(step=2))
    after, plain = (m.step({"student": model}, x0, _ctx(step=3)) for m in (duo, usdm))
    assert during.metrics["curriculum"] == 1.0 and after.metrics["curriculum"] == 0.0
    assert torch.equal(after.losses["student"], plain.losses["student"])
    assert not torch.equal(during.losses["student"], plain.losses["student"])


@pytest.mark.parametrize("latent", ["full", "topk"])
def test_curriculum_step_does_not_depend_on_the_split_of_the_global_batch(latent):
    vocab = 17
    model = _dit(vocab)
    method = DUO(DUOConfig(latent=latent, top_k=4), vocab_size=vocab, mask_id=vocab - 1)
    x0 = torch.randint(0, vocab, (4, 8), generator=torch.Generator().manual_seed(6))
    whole = method.step({"student": model}, x0, _ctx(gbs=4))
    halves = [method.step({"student": model}, x0[o:o + 2], _ctx(offset=o, gbs=4)) for o in (0, 2)]
    torch.testing.assert_close(whole.losses["student"], sum(h.losses["student"] for h in halves) / 2,
                               rtol=1e-6, atol=1e-7)


def test_tau_schedule_and_config_errors():
    cfg = DUOConfig(tau_log10_start=-1.0, tau_log10_end=-3.0, curriculum_start=10, curriculum_end=30)
    assert [cfg.tau(s) for s in (0, 10, 20, 30, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])
    assert DUOConfig().gamma_min == -3.55 and DUOConfig().gamma_max == -1.85 and DUOConfig().tau(0) == 1e-3
    with pytest.raises(ConfigError, match="gamma_min"):
        from_dict(DUOConfig, {"gamma_min": -1.0, "gamma_max": -2.0})
    with pytest.raises(ConfigError, match="curriculum_start"):
        from_dict(DUOConfig, {"curriculum_start": 5, "curriculum_end": 2})
    with pytest.raises(ConfigError, match="latent"):
        from_dict(DUOConfig, {"latent": "sparse"})
    with pytest.raises(ValueError, match="top_k"):
        DUO(DUOConfig(top_k=20), vocab_size=11, mask_id=10)


def test_fused_elbo_of_the_topk_curriculum_matches_the_torch_loss():
    vocab = 23
    model = _dit(vocab)
    x0 = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(8))
    results = []
    for impl in ("torch", "triton", "chunked"):
        model.zero_grad()
        method = DUO(DUOConfig(loss_impl=impl, top_k=4, tau_log10_start=-1.0, tau_log10_end=-1.0), vocab_size=vocab,
                     mask_id=vocab - 1)
        loss = method.step({"student": model}, x0, _ctx()).losses["student"]
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert results[0][0] > 0
    for fused in results[1:]:
        torch.testing.assert_close(fused[0], results[0][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fused[1], results[0][1], rtol=1e-3, atol=1e-5)
    for impl in ("triton", "chunked"):
        with pytest.raises(ConfigError, match="latent='topk'"):
            from_dict(DUOConfig, {"loss_impl": impl, "latent": "full"})


@pytest.mark.parametrize("vocab, k", [(20, 4), (10, 4), (50, 1)])  # collisions redrawn; permutation branch; k = 1
def test_batched_rows_draw_exactly_what_each_row_draws_alone(vocab, k):
    x = torch.randint(vocab, (5, 7), generator=torch.Generator().manual_seed(3))
    gens = [torch.Generator().manual_seed(100 + r) for r in range(5)]
    batched = sample_top_noise_rows(x, vocab, k, gens)
    for r in range(5):
        alone = sample_top_noise(x[r], vocab, k, torch.Generator().manual_seed(100 + r))
        for a, b in zip(alone, batched):
            assert torch.equal(a, b[r])
    distinct = batched.indices.sort(-1).values
    assert (distinct[..., 1:] != distinct[..., :-1]).all() and (batched.indices != x.unsqueeze(-1)).all()
    with pytest.raises(ValueError, match="generators"):
        sample_top_noise_rows(x, vocab, k, gens[:2])
