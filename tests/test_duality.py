"""Gaussian → discrete duality T(γ): reference values, closed form for K = 2, derivatives, interpolation, cache."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import log_ndtr, ndtr

from ddistill.diffusion import DualityTable, duality_alpha, gaussian_scales

# duo.md §3.4, GPT-2 cache (K = 50257): γ → α, quoted to these digits.
REFERENCE = [
    (-4.0, "0.9987"), (-3.55, "0.9455"), (-3.5, "0.9283"), (-3.0, "0.596"), (-2.5, "0.238"),
    (-2.0, "0.072"), (-1.85, "0.0493"), (-1.75, "0.0383"), (-1.0, "0.0062"),
]


@pytest.fixture(scope="module")
def gpt2_table(tmp_path_factory):
    return DualityTable(50257, gamma_min=-5.0, gamma_max=-1.0, cache_dir=tmp_path_factory.mktemp("duality"))


def test_reference_values_gpt2(gpt2_table):
    gamma = torch.tensor([g for g, _ in REFERENCE], dtype=torch.float64)
    alpha = gpt2_table.alpha(gamma)
    for a, (g, quoted) in zip(alpha.tolist(), REFERENCE):
        decimals = len(quoted.split(".")[1])
        assert abs(a - float(quoted)) <= 0.5 * 10**-decimals, (g, a, quoted)


def test_quadrature_matches_adaptive_quad():
    K = 50257
    gammas = np.array([-4.7, -3.2, -2.1, -1.3])
    alpha, dalpha = duality_alpha(gammas, K)
    for g, a, da in zip(gammas, alpha, dalpha):
        mu = math.exp(-g / 2)
        dens = lambda z, mu=mu: math.exp(-0.5 * (z - mu) ** 2 + (K - 1) * log_ndtr(z)) / math.sqrt(2 * math.pi)
        p = quad(dens, mu - 12, mu + 12, points=[3.0, 4.0, 5.0], epsabs=1e-14, epsrel=1e-13, limit=400)[0]
        dp = quad(lambda z: (z - mu) * dens(z), mu - 12, mu + 12, points=[3.0, 4.0, 5.0], epsabs=1e-14, limit=400)[0]
        assert abs(a - (K * p - 1) / (K - 1)) < 1e-9
        assert abs(da - K / (K - 1) * dp * (-mu / 2)) < 1e-8


def test_k2_closed_form():
    # K = 2: P(μ + ε1 > ε2) = Φ(μ/√2), so α = 2Φ(μ/√2) − 1 and dα/dγ = 2φ(μ/√2)/√2 · (−μ/2).
    gammas = np.linspace(-4.0, 3.0, 15)
    mu = np.exp(-gammas / 2)
    alpha, dalpha = duality_alpha(gammas, 2)
    np.testing.assert_allclose(alpha, 2 * ndtr(mu / math.sqrt(2)) - 1, rtol=0, atol=1e-12)
    dens = np.exp(-mu**2 / 4) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(dalpha, 2 * dens / math.sqrt(2) * (-mu / 2), rtol=0, atol=1e-12)


def test_derivative_and_interpolation(gpt2_table):
    gamma = torch.linspace(-4.9, -1.1, 301, dtype=torch.float64)
    h = 1e-5
    fd = (gpt2_table.alpha(gamma + h) - gpt2_table.alpha(gamma - h)) / (2 * h)
    torch.testing.assert_close(gpt2_table.alpha_prime(gamma), fd, rtol=0, atol=2e-6)
    g = gamma.clone().requires_grad_()
    gpt2_table.alpha(g).sum().backward()
    torch.testing.assert_close(g.grad, gpt2_table.alpha_prime(gamma))
    # off-grid interpolation vs direct quadrature
    direct_a, direct_da = duality_alpha(gamma.numpy(), 50257)
    np.testing.assert_allclose(gpt2_table.alpha(gamma).numpy(), direct_a, rtol=0, atol=1e-9)
    np.testing.assert_allclose(gpt2_table.alpha_prime(gamma).numpy(), direct_da, rtol=0, atol=1e-7)
    # float32 input keeps its dtype
    assert gpt2_table.alpha(gamma.float()).dtype == torch.float32


def test_cache_hit_reproduces(tmp_path):
    a = DualityTable(1000, gamma_min=-4.0, gamma_max=-1.0, num_points=501, cache_dir=tmp_path)
    assert not a.loaded_from_cache and a.cache_path.exists()
    b = DualityTable(1000, gamma_min=-4.0, gamma_max=-1.0, num_points=501, cache_dir=tmp_path)
    assert b.loaded_from_cache and b.cache_path == a.cache_path
    assert torch.equal(a.alphas, b.alphas) and torch.equal(a.dalphas, b.dalphas)
    c = DualityTable(1001, gamma_min=-4.0, gamma_max=-1.0, num_points=501, cache_dir=tmp_path)
    assert not c.loaded_from_cache and not torch.equal(a.alphas, c.alphas)


def test_out_of_range_and_bad_args(tmp_path):
    t = DualityTable(50, gamma_min=-3.0, gamma_max=-1.0, num_points=101, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="outside"):
        t.alpha(torch.tensor([-3.5]))
    with pytest.raises(ValueError, match="gamma_min"):
        DualityTable(50, gamma_min=-1.0, gamma_max=-3.0, cache_dir=tmp_path)


def test_gaussian_scales():
    gamma = torch.tensor([-3.0, 0.0, 2.0])
    a, s = gaussian_scales(gamma)
    torch.testing.assert_close(a**2 + s**2, torch.ones(3))
    torch.testing.assert_close(a / s, torch.exp(-gamma / 2))
