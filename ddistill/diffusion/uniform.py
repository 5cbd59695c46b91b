"""Uniform-state discrete diffusion (USDM / UDLM / DUO, arXiv 2506.10892 §3; UDLM arXiv 2412.10193).

Forward process over K ids: with probability 1 − α_t a token is replaced by an id drawn uniformly from [0, K)
(possibly itself), i.e. q(z_t | x) = α_t·e_x + (1 − α_t)/K·1.

Per-token NELBO (DUO eq. 17, "Rao-Blackwellised" form; notation per token: p = softmax(logits) ∈ Δ^K, i = z_t,
m = x0, α = α_t, α' = dα_t/dt < 0):

    x̄_θ = Kα·p + (1−α)·1,   x̄_i = (1−α) + Kα·1[m = i],   κ = (1−α)/(Kα + 1 − α)
    term1 = K·(1/x̄_i − 1/(x̄_θ)_i)
    term2 = −(κ·1[m=i] + 1[m≠i])·(Σ_j log(x̄_θ)_j − K·log(x̄_θ)_i)
            − (Kα/(1−α))·(log(x̄_θ)_m − log(x̄_θ)_i)·1[m≠i]
            + ((K−1)·κ·1[m=i] − (1/κ)·1[m≠i])·log κ
    ℓ = (α'/(Kα))·(term1 − term2)                       (≥ 0; = 0 for a perfect denoiser)

`duo_elbo_per_token` evaluates this from one fp32 copy of the logits with a per-row logsumexp, two gathers and
Σ_j log(x̄_θ)_j — no B×L×V one-hot. For stability log(x̄_θ)_j = log(1−α) + softplus(log(Kα/(1−α)) + log p_j), so the
O(K·log(1−α)) parts cancel analytically and the row-level algebra is done in float64.

`udlm_loss_per_token` is the UDLM reference form (materialises x̄ and x̄_θ in float64):
    ℓ = (α'/(Kα))·(term1 − Σ_j (x̄_j/x̄_i)·log((x̄_θ)_i·x̄_j / ((x̄_θ)_j·x̄_i))).

Posterior used by the ancestral sampler (DUO eq. 4), with α_{t|s} = α_t/α_s and x̂ the denoiser probabilities:
    q(z_s | z_t, x̂) = [Kα_t·x̂⊙e_{z_t} + (α_{t|s} − α_t)·e_{z_t} + (α_s − α_t)·x̂ + (1 − α_{t|s})(1 − α_s)/K]
                      / [Kα_t·x̂[z_t] + 1 − α_t].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddistill.diffusion.absorbing import ROW_CHUNK, per_token

__all__ = ["corrupt_uniform", "duo_elbo_per_token", "udlm_loss_per_token", "uniform_posterior"]


def corrupt_uniform(
    x0: torch.Tensor, alpha_t: torch.Tensor, vocab_size: int, generator: torch.Generator | None
) -> torch.Tensor:
    """z_t: with probability 1 − α_t replace each token by a uniform id in [0, vocab_size) (may equal itself)."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
    noise = torch.randint(0, vocab_size, x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return torch.where(u < (1.0 - per_token(alpha_t, x0).to(torch.float64)), noise, x0)


def _row_stats(lf: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of lf (…, V): logsumexp (fp32) and Σ_j softplus(c + log p_j) (float64), ROW_CHUNK rows at a time."""
    flat, c_flat = lf.reshape(-1, lf.shape[-1]), c.reshape(-1, 1)
    lses, sums = [], []
    for rows, c_rows in zip(flat.split(ROW_CHUNK), c_flat.split(ROW_CHUNK)):
        lse = torch.logsumexp(rows, dim=-1, keepdim=True)
        sums.append(F.softplus(rows - lse + c_rows).sum(dim=-1, dtype=torch.float64))
        lses.append(lse.squeeze(-1))
    return torch.cat(lses).reshape(c.shape), torch.cat(sums).reshape(c.shape)


def duo_elbo_per_token(
    logits: torch.Tensor,
    xt: torch.Tensor,
    x0: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prime_t: torch.Tensor,
) -> torch.Tensor:
    """DUO per-token NELBO (closed form, module docstring), fp32 of shape xt.shape. K = logits.shape[-1].

    α_t ∈ (0, 1), α'_t: shape (B,) or xt.shape.
    """
    K = logits.shape[-1]
    lf = logits.float()
    alpha = per_token(alpha_t, xt).to(torch.float64)
    alpha_prime = per_token(alpha_prime_t, xt).to(torch.float64)
    # c = log(Kα/(1−α)) per token; softplus(c + log p_j) = log(x̄_θ)_j − log(1−α).
    c64 = (torch.log(K * alpha) - torch.log1p(-alpha)).expand(xt.shape)
    lse, sum_sp = _row_stats(lf, c64.float())
    log_p_i = (lf.gather(-1, xt.unsqueeze(-1)).squeeze(-1) - lse).double()
    log_p_m = (lf.gather(-1, x0.unsqueeze(-1)).squeeze(-1) - lse).double()
    sp_i = F.softplus(c64 + log_p_i)
    sp_m = F.softplus(c64 + log_p_m)

    same = (xt == x0).to(torch.float64)
    diff = 1.0 - same
    one_m_alpha = 1.0 - alpha
    xbar_i = one_m_alpha + K * alpha * same
    xbar_theta_i = one_m_alpha * torch.exp(sp_i)
    kappa = one_m_alpha / (K * alpha + one_m_alpha)
    term1 = K * (1.0 / xbar_i - 1.0 / xbar_theta_i)
    term2 = (
        -(kappa * same + diff) * (sum_sp - K * sp_i)
        - (K * alpha / one_m_alpha) * (sp_m - sp_i) * diff
        + ((K - 1) * kappa * same - diff / kappa) * torch.log(kappa)
    )
    return (alpha_prime / (K * alpha) * (term1 - term2)).float()


def udlm_loss_per_token(
    logits: torch.Tensor,
    xt: torch.Tensor,
    x0: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prime_t: torch.Tensor,
) -> torch.Tensor:
    """UDLM-form per-token NELBO in float64 (materialises x̄ and x̄_θ): the independent reference for the DUO form."""
    K = logits.shape[-1]
    alpha = per_token(alpha_t, xt).to(torch.float64).unsqueeze(-1)
    alpha_prime = per_token(alpha_prime_t, xt).to(torch.float64)
    p = torch.softmax(logits.double(), dim=-1)
    xbar_theta = K * alpha * p + (1.0 - alpha)
    xbar = K * alpha * F.one_hot(x0, K).double() + (1.0 - alpha)
    xbar_i = xbar.gather(-1, xt.unsqueeze(-1))
    xbar_theta_i = xbar_theta.gather(-1, xt.unsqueeze(-1))
    term1 = (K * (1.0 / xbar_i - 1.0 / xbar_theta_i)).squeeze(-1)
    summand = (xbar / xbar_i) * torch.log(xbar_theta_i * xbar / (xbar_theta * xbar_i))
    coeff = alpha_prime / (K * alpha.squeeze(-1))
    return coeff * (term1 - summand.sum(-1))


def uniform_posterior(
    x_hat_probs: torch.Tensor, zt: torch.Tensor, alpha_t: torch.Tensor | float, alpha_s: torch.Tensor | float
) -> torch.Tensor:
    """q(z_s | z_t, x̂) over K ids (DUO eq. 4) in float64; x̂ (…, K) probabilities, zt (…), α's scalar or (B,)/zt.shape."""
    K = x_hat_probs.shape[-1]
    x_hat = x_hat_probs.to(torch.float64)
    a_t = per_token(torch.as_tensor(alpha_t, dtype=torch.float64), zt).to(torch.float64).unsqueeze(-1)
    a_s = per_token(torch.as_tensor(alpha_s, dtype=torch.float64), zt).to(torch.float64).unsqueeze(-1)
    a_ts = a_t / a_s
    x_hat_z = x_hat.gather(-1, zt.unsqueeze(-1))
    numer = (a_s - a_t) * x_hat + (1.0 - a_ts) * (1.0 - a_s) / K
    # the e_{z_t} terms are added at column z_t only (no one-hot)
    numer = numer.scatter_add(-1, zt.unsqueeze(-1), (K * a_t * x_hat_z + (a_ts - a_t)).expand_as(x_hat_z))
    return numer / (K * a_t * x_hat_z + 1.0 - a_t)
