"""The Gaussian → uniform-discrete duality T(γ) of DUO (arXiv 2506.10892 §3, eqs. 10–11).

A Gaussian latent on the one-hot of x ∈ [K], w = α̃·e_x + σ̃·ε with ε ~ N(0, I_K), α̃ = sqrt(sigmoid(−γ)),
σ̃ = sqrt(sigmoid(γ)) (γ = negative log-SNR), projected by argmax, is exactly a uniform-state discrete diffusion
latent: P(argmax w = x) = p(μ) with μ = α̃/σ̃ = e^{−γ/2} and

    p(μ) = ∫ φ(z − μ) Φ(z)^{K−1} dz,        α = T(γ) = (K·p − 1)/(K − 1),

    dα/dγ = K/(K−1) · dp/dμ · dμ/dγ = −(μ/2)·K/(K−1) · ∫ (z − μ) φ(z − μ) Φ(z)^{K−1} dz

(differentiating under the integral). Both integrals are evaluated for a whole γ grid at once with composite
Gauss–Legendre quadrature on a shared z grid over [μ_min − 10, μ_max + 10] (φ(z − μ) < 1e-21 outside), with
Φ^{K−1} = exp((K−1)·log Φ) from `scipy.special.log_ndtr`. The table (α, dα/dγ on an equispaced γ grid) is cached on
disk as npz, keyed by K, the γ range and the number of points. `DualityTable.alpha` interpolates with cubic Hermite
(using the derivative table; error O(h⁴)) and back-propagates the linearly interpolated dα/dγ.

Sampling the latent without its K coordinates (`sample_top_noise`). argmax w and the tempered softmax of w only need
the clean coordinate ε_x and the largest few of the K − 1 other, i.i.d. N(0, 1) coordinates. Their k largest values
g_1 > … > g_k are Φ⁻¹ of the top uniform order statistics of n = K − 1 draws, generated from the top down
(Rényi):  U_(n) = V_1^{1/n},  U_(n−j) = U_(n−j+1)·V_{j+1}^{1/(n−j)},  V_i i.i.d. U(0, 1),  computed in log space
(log U_(n−j+1) = Σ_{i≤j} log V_i/(n − i + 1)) and g = −Φ⁻¹(−expm1(log U)) in float64, so the upper tail keeps its
digits. Their ids are a uniformly random ordered k-subset of the K − 1 ids ≠ x (exchangeability), drawn as k uniform
ids with the whole tuple redrawn where two collide (rejection: exact, and rare for k² ≤ K; for k² > K the first k
of a uniformly random permutation), then shifted past x.
k = 1 gives (M, j*) = (max_{v≠x} ε_v, its id), M ~ Φ⁻¹(U^{1/(K−1)}), all DCD's trajectories need (duo.md §4).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

__all__ = ["duality_alpha", "gaussian_scales", "DualityTable", "duality_table", "default_cache_dir", "TopNoise",
           "sample_top_noise", "sample_top_noise_rows"]

# Bump when the quadrature changes so stale cache files are not reused.
_CACHE_VERSION = 1
_PANEL_WIDTH = 0.125
_NODES_PER_PANEL = 16


def default_cache_dir() -> Path:
    root = os.environ.get("DDISTILL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "ddistill"
    return base / "duality"


def gaussian_scales(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α̃, σ̃) = (sqrt(sigmoid(−γ)), sqrt(sigmoid(γ))) of the Gaussian latent w = α̃·e_x + σ̃·ε."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def duality_alpha(gammas: np.ndarray, vocab_size: int, *, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """T(γ) and dT/dγ (float64 arrays) for K = vocab_size by direct quadrature at the given γ values."""
    from scipy.special import log_ndtr  # only needed to build a table, not to read a cached one

    K = int(vocab_size)
    if K < 2:
        raise ValueError(f"vocab_size={vocab_size} must be at least 2")
    gammas = np.asarray(gammas, dtype=np.float64)
    mu = np.exp(-0.5 * gammas)
    lo, hi = float(mu.min()) - 10.0, float(mu.max()) + 10.0
    num_panels = max(1, math.ceil((hi - lo) / _PANEL_WIDTH))
    x, w = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    edges = np.linspace(lo, hi, num_panels + 1)
    half = 0.5 * (edges[1:] - edges[:-1])
    z = ((edges[:-1] + edges[1:])[:, None] * 0.5 + half[:, None] * x[None, :]).ravel()
    wz = (half[:, None] * w[None, :]).ravel()
    log_g = (K - 1) * log_ndtr(z)  # log Φ(z)^{K−1}
    keep = log_g > -745.0  # exp underflows to 0 below this
    z, wz, log_g = z[keep], wz[keep], log_g[keep]
    p = np.empty_like(mu)
    dp_dmu = np.empty_like(mu)
    for start in range(0, mu.size, chunk):
        m = mu[start : start + chunk, None]
        d = z[None, :] - m
        f = np.exp(log_g[None, :] - 0.5 * d * d) * (wz / math.sqrt(2.0 * math.pi))[None, :]
        p[start : start + chunk] = f.sum(axis=1)
        dp_dmu[start : start + chunk] = (f * d).sum(axis=1)
    alpha = (K * p - 1.0) / (K - 1.0)
    dalpha = K / (K - 1.0) * dp_dmu * (-0.5 * mu)
    return alpha, dalpha


class _Interp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gamma, g0, h, alpha_tab, dalpha_tab):
        ctx.save_for_backward(gamma)
        ctx.table = (g0, h, dalpha_tab)
        return _hermite(gamma, g0, h, alpha_tab, dalpha_tab)

    @staticmethod
    def backward(ctx, grad_out):
        (gamma,) = ctx.saved_tensors
        g0, h, dalpha_tab = ctx.table
        return grad_out * _linear(gamma, g0, h, dalpha_tab), None, None, None, None


def _locate(gamma: torch.Tensor, g0: float, h: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = (gamma.double() - g0) / h
    idx = pos.floor().clamp(0, n - 2)
    return idx.long(), pos - idx


def _linear(gamma: torch.Tensor, g0: float, h: float, tab: torch.Tensor) -> torch.Tensor:
    idx, u = _locate(gamma, g0, h, tab.numel())
    return (tab[idx] * (1.0 - u) + tab[idx + 1] * u).to(gamma.dtype)


def _hermite(gamma: torch.Tensor, g0: float, h: float, ytab: torch.Tensor, dtab: torch.Tensor) -> torch.Tensor:
    idx, u = _locate(gamma, g0, h, ytab.numel())
    u2, u3 = u * u, u * u * u
    h00, h10 = 2 * u3 - 3 * u2 + 1, u3 - 2 * u2 + u
    h01, h11 = -2 * u3 + 3 * u2, u3 - u2
    out = h00 * ytab[idx] + h10 * h * dtab[idx] + h01 * ytab[idx + 1] + h11 * h * dtab[idx + 1]
    return out.to(gamma.dtype)


class DualityTable:
    """Tabulated α = T(γ) and dα/dγ for K ids on [gamma_min, gamma_max], cached on disk (npz)."""

    def __init__(
        self,
        vocab_size: int,
        *,
        gamma_min: float = -5.0,
        gamma_max: float = -1.0,
        num_points: int = 20001,
        cache_dir: str | os.PathLike | None = None,
    ):
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min={gamma_min} must be < gamma_max={gamma_max}")
        if num_points < 2:
            raise ValueError(f"num_points={num_points} must be at least 2")
        self.vocab_size = int(vocab_size)
        self.gamma_min, self.gamma_max, self.num_points = float(gamma_min), float(gamma_max), int(num_points)
        self.cache_path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path = self.cache_path / (
            f"duality_v{_CACHE_VERSION}_K{self.vocab_size}_g{self.gamma_min!r}_{self.gamma_max!r}_n{self.num_points}.npz"
        )
        self.loaded_from_cache = self.cache_path.exists()
        if self.loaded_from_cache:
            with np.load(self.cache_path) as data:
                gammas, alpha, dalpha = data["gamma"], data["alpha"], data["dalpha"]
        else:
            gammas = np.linspace(self.gamma_min, self.gamma_max, self.num_points)
            alpha, dalpha = duality_alpha(gammas, self.vocab_size)
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, gamma=gammas, alpha=alpha, dalpha=dalpha)
            os.replace(tmp, self.cache_path)  # atomic: concurrent ranks never read a partial file
        self.gammas = torch.from_numpy(np.ascontiguousarray(gammas))
        self.alphas = torch.from_numpy(np.ascontiguousarray(alpha))
        self.dalphas = torch.from_numpy(np.ascontiguousarray(dalpha))
        self._h = (self.gamma_max - self.gamma_min) / (self.num_points - 1)
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _check_range(self, gamma: torch.Tensor) -> None:
        tol = 1e-9 * (self.gamma_max - self.gamma_min)
        if bool((gamma < self.gamma_min - tol).any()) or bool((gamma > self.gamma_max + tol).any()):
            raise ValueError(
                f"gamma in [{gamma.min().item()}, {gamma.max().item()}] is outside the table range "
                f"[{self.gamma_min}, {self.gamma_max}]"
            )

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_tables:
            self._device_tables[device] = (self.alphas.to(device), self.dalphas.to(device))
        return self._device_tables[device]

    def alpha(self, gamma: torch.Tensor) -> torch.Tensor:
        """α = T(γ) (differentiable; the gradient is the tabulated dα/dγ)."""
        self._check_range(gamma)
        return _Interp.apply(gamma, self.gamma_min, self._h, *self._tables(gamma.device))

    def alpha_prime(self, gamma: torch.Tensor) -> torch.Tensor:
        """dα/dγ (linear interpolation of the derivative table; not differentiable)."""
        self._check_range(gamma)
        return _linear(gamma.detach(), self.gamma_min, self._h, self._tables(gamma.device)[1])


@functools.lru_cache(maxsize=None)
def duality_table(vocab_size: int, gamma_min: float, gamma_max: float, num_points: int) -> DualityTable:
    """The process-wide DualityTable for these arguments (built or read from the disk cache on first use)."""
    return DualityTable(vocab_size, gamma_min=gamma_min, gamma_max=gamma_max, num_points=num_points)


class TopNoise(NamedTuple):
    """The clean coordinate and the k largest other coordinates of a standard Gaussian ε ∈ R^K per token."""

    clean: torch.Tensor  # (…) float64: ε_x
    values: torch.Tensor  # (…, k) float64, descending: the k largest of ε_v, v ≠ x
    indices: torch.Tensor  # (…, k) int64: their ids (distinct, never x)


def sample_top_noise(x: torch.Tensor, vocab_size: int, k: int, generator: torch.Generator | None) -> TopNoise:
    """Draw (ε_x, top-k of the other K − 1 coordinates, their ids) per token of x (module docstring): the exact law
    of those parts of ε ~ N(0, I_K), without a (…, K) tensor. Draw order: ε_x, the k order-statistic uniforms, ids."""
    noise = sample_top_noise_rows(x.unsqueeze(0), vocab_size, k, [generator])
    return TopNoise(*(part.squeeze(0) for part in noise))


def sample_top_noise_rows(x: torch.Tensor, vocab_size: int, k: int,
                          generators: Sequence[torch.Generator | None]) -> TopNoise:
    """`sample_top_noise` for each row x[r] with its own generator, batched: row r gets exactly the draws that
    `sample_top_noise(x[r], …, generators[r])` makes (the same calls on its generator, in the same order), while
    the arithmetic and the search for repeated ids run once over all rows (one host sync per redraw round)."""
    n = int(vocab_size) - 1
    if not 1 <= k <= n:
        raise ValueError(f"top-k of the K − 1 = {n} noise coordinates needs 1 <= k <= {n}, got k={k}")
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for {x.shape[0]} rows")
    device, shape = x.device, x.shape[1:]
    clean, v, ids = [], [], []
    for g in generators:
        clean.append(torch.randn(shape, generator=g, device=device, dtype=torch.float64))
        v.append(torch.rand((*shape, k), generator=g, device=device, dtype=torch.float64))
        if k * k > n:  # many collisions: the first k of a uniform random permutation (O(K) per token, small K only)
            ids.append(torch.rand((*shape, n), generator=g, device=device).argsort(dim=-1)[..., :k])
        else:
            ids.append(torch.randint(n, (*shape, k), generator=g, device=device))
    clean, v, ids = torch.stack(clean), torch.stack(v), torch.stack(ids)
    remaining = n - torch.arange(k, device=device, dtype=torch.float64)  # n, n − 1, …, n − k + 1
    log_u = torch.cumsum(torch.log(v) / remaining, dim=-1)  # log U_(n), log U_(n−1), … (descending)
    values = -torch.special.ndtri(-torch.expm1(log_u))
    while k > 1 and k * k <= n:  # redraw every tuple with a repeated id (exactly uniform over distinct tuples)
        ordered = ids.sort(dim=-1).values
        repeated = (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)
        counts = repeated.flatten(1).sum(dim=1).tolist()
        if not any(counts):
            break
        for r, num in enumerate(counts):
            if num:
                ids[r][repeated[r]] = torch.randint(n, (num, k), generator=generators[r], device=device)
    indices = ids + (ids >= x.unsqueeze(-1)).long()  # skip x: a uniform id of the K − 1 others
    return TopNoise(clean=clean, values=values, indices=indices)
