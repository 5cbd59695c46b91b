"""DUO: uniform-state diffusion trained with the Gaussian-duality curriculum (Sahoo et al., "The Diffusion Duality",
arXiv 2506.10892 §4.1; semantics of the reference's `ch-1` branch, duo.md §3.4–3.5).

Curriculum step (optimizer steps < `curriculum_end`). For clean x0 and t ~ stratified U[t_min, 1] over the global batch:

    γ_t = γ_min + t·(γ_max − γ_min)                      (OWT: γ ∈ [−3.55, −1.85], α_t ∈ ≈[0.05, 0.95])
    w   = α̃·e_x0 + σ̃·ε,  ε ~ N(0, I_K),  α̃ = √sigmoid(−γ_t), σ̃ = √sigmoid(γ_t)
    network input: the tempered softmax softmax(w/τ) (its embedding Σ_v softmax(w/τ)_v E_v), σ = −log α_t
    L = Σ_l f_Duo(x_θ, z_t = argmax w, x0; α_t = T(γ_t), α'_t = dT/dγ·(γ_max − γ_min))      (usdm's ELBO)

with α_t = T(γ) the duality (diffusion/duality.py): argmax w is exactly a USDM latent with that α. τ = 10^{log10 τ},
log10 τ = `tau_log10_start` before `curriculum_start`, linear to `tau_log10_end` at `curriculum_end`. From step
`curriculum_end` on, the same run continues with the plain discrete ELBO of `usdm` (log-linear α_t); the method
has no state besides the step, so a run resumes at any step.

Two exact samplers of the network input (`latent`):

* "full": the reference — ε as a (B, L, K) fp32 tensor, the DiT's soft path softmax(w/τ) @ E.
* "topk": never a (B, L, K) tensor. Per token only ε_x and the k largest other coordinates g_1 > … > g_k with their
  ids are drawn, with their exact joint law (`diffusion.duality.sample_top_noise`); z_t = x0 if α̃ + σ̃ε_x > σ̃g_1 else
  the id of g_1 (exactly argmax w). The input is the softmax restricted to the kept set S = {x0, ids} and
  renormalised, fed as (index, weight) pairs through `embedding_bag` (DiT `soft_inputs`).

  Error of the dropped tail. The n = K − 1 − k other coordinates are all < g_k, so with ℓ_v = w_v/τ and
  Z_S = Σ_{v∈S} e^{ℓ_v}, the true softmax mass outside S is P ≤ n·e^{σ̃ g_k/τ}/Z_S =: β (the logged metric
  `tail_bound` is its largest value over the tokens of the micro-batch). Renormalising over S moves total mass 2P,
  so the input embedding h of every token satisfies ‖h_topk − h_full‖₂ ≤ 2β·max_v ‖E_v‖₂. At the recipe's
  τ = 10⁻³ (σ̃/τ ≥ 690) and k = 16, β is below 1e-100 in practice; at large τ use a larger k or `latent: full`.

Randomness: the per-token draws of a sequence come from a generator seeded from (one draw of the step generator,
the sequence's index in the global batch), so a step does not depend on how the global batch is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Mapping

import torch

from ddistill.diffusion.duality import DualityTable, TopNoise, duality_table, gaussian_scales, sample_top_noise_rows
from ddistill.diffusion.schedules import sample_times
from ddistill.methods import register
from ddistill.methods.base import StepContext, StepOutput, row_generators
from ddistill.methods.usdm import USDM, USDMConfig

__all__ = ["DUO", "DUOConfig", "tempered_topk_inputs"]

Latent = Literal["full", "topk"]


@dataclass(kw_only=True)
class DUOConfig(USDMConfig):
    """The curriculum of DUO (YAML section `method:`); defaults are the OWT recipe (duo.md §1, scripts/train_owt_duo)."""

    gamma_min: float = -3.55
    gamma_max: float = -1.85
    tau_log10_start: float = -3.0
    tau_log10_end: float = -3.0
    curriculum_start: int = 0
    curriculum_end: int = 500_000  # first optimizer step of the plain discrete ELBO
    latent: Latent = "topk"
    top_k: int = 16  # kept noise coordinates per token for latent=topk
    table_points: int = 20_001  # grid of the cached duality table over [gamma_min, gamma_max]

    def __post_init__(self) -> None:
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"method.gamma_min={self.gamma_min} must be < method.gamma_max={self.gamma_max}")
        if not 0 <= self.curriculum_start <= self.curriculum_end:
            raise ValueError(
                f"method.curriculum_start={self.curriculum_start} and curriculum_end={self.curriculum_end} must "
                "satisfy 0 <= start <= end"
            )
        if self.top_k < 1:
            raise ValueError(f"method.top_k={self.top_k} must be >= 1")
        if self.loss_impl != "torch" and self.latent == "full":
            raise ValueError(f"method.loss_impl={self.loss_impl!r} needs method.latent='topk' (the fused ELBO reads hidden states; "
                             "latent=full feeds the DiT a (B, L, V) soft input)")

    def tau(self, step: int) -> float:
        """τ at optimizer step `step`: 10^{log10 τ}, log10 τ linear between curriculum_start and curriculum_end."""
        span = max(self.curriculum_end - self.curriculum_start, 1)
        frac = min(max((step - self.curriculum_start) / span, 0.0), 1.0)
        return 10.0 ** (self.tau_log10_start + frac * (self.tau_log10_end - self.tau_log10_start))


def tempered_topk_inputs(
    x0: torch.Tensor, noise: TopNoise, alpha_tilde: torch.Tensor, sigma_tilde: torch.Tensor, tau: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_t, indices (…, k+1), weights (…, k+1), tail bound β (…)) of the low-memory curriculum (module docstring).

    x0 (B, L); noise: per-token `TopNoise`; α̃, σ̃: (B,). Index 0 of the kept set is x0, then the noise ids in
    descending order of their values. Weights are the softmax of w/τ over the kept set (float64)."""
    a = alpha_tilde.to(torch.float64)[:, None]
    s = sigma_tilde.to(torch.float64)[:, None]
    w_clean = a + s * noise.clean
    z_t = torch.where(w_clean > s * noise.values[..., 0], x0, noise.indices[..., 0])
    logits = torch.cat([w_clean.unsqueeze(-1), s.unsqueeze(-1) * noise.values], dim=-1) / tau
    log_z = torch.logsumexp(logits, dim=-1)
    num_tail = vocab_size - 1 - noise.values.shape[-1]
    log_bound = math.log(num_tail) + logits[..., -1] - log_z if num_tail > 0 else torch.full_like(log_z, -math.inf)
    indices = torch.cat([x0.unsqueeze(-1), noise.indices], dim=-1)
    return z_t, indices, torch.exp(logits - log_z.unsqueeze(-1)), torch.exp(log_bound)


@register
class DUO(USDM):
    """USDM with the Gaussian-duality curriculum for its first `curriculum_end` steps, the plain ELBO after."""

    name: ClassVar[str] = "duo"
    Config: ClassVar[type] = DUOConfig

    def __init__(self, cfg: DUOConfig, *, vocab_size: int, mask_id: int):
        super().__init__(cfg, vocab_size=vocab_size, mask_id=mask_id)
        if cfg.latent == "topk" and not cfg.top_k <= vocab_size - 1:
            raise ValueError(f"method.top_k={cfg.top_k} must be <= vocab_size - 1 = {vocab_size - 1}")

    @property
    def table(self) -> DualityTable:
        """α = T(γ) over [gamma_min, gamma_max] for this vocabulary (built on first use, cached on disk)."""
        return duality_table(self.vocab_size, self.cfg.gamma_min, self.cfg.gamma_max, self.cfg.table_points)

    def in_curriculum(self, step: int) -> bool:
        return step < self.cfg.curriculum_end

    def step(self, nets: Mapping[str, Callable], batch: torch.Tensor, ctx: StepContext) -> StepOutput:
        if not self.in_curriculum(ctx.step):
            out = super().step(nets, batch, ctx)
            out.metrics["curriculum"] = 0.0
            return out
        cfg = self.cfg
        x0 = batch
        num_rows = x0.shape[0]
        t = sample_times(num_rows, global_batch=ctx.global_batch_size, offset=ctx.global_offset,
                         generator=ctx.generator, device=ctx.device, t_min=cfg.t_min, antithetic=cfg.antithetic,
                         dtype=torch.float64)  # fmt: skip
        gamma = cfg.gamma_min + t * (cfg.gamma_max - cfg.gamma_min)
        alpha = self.table.alpha(gamma)
        alpha_prime = self.table.alpha_prime(gamma) * (cfg.gamma_max - cfg.gamma_min)  # dα/dt
        sigma = (-torch.log(alpha)).float()
        alpha_tilde, sigma_tilde = gaussian_scales(gamma)
        tau = cfg.tau(ctx.step)
        gens = row_generators(ctx, num_rows)
        student = nets["student"]
        metrics: dict[str, float | torch.Tensor] = {"curriculum": 1.0, "tau": tau}
        if cfg.latent == "full":
            eps = torch.stack([torch.randn(x0.shape[1], self.vocab_size, generator=g, device=ctx.device) for g in gens])
            w = sigma_tilde.float()[:, None, None] * eps
            w.scatter_add_(-1, x0.unsqueeze(-1), alpha_tilde.float()[:, None, None].expand(*x0.shape, 1))
            z_t = w.argmax(dim=-1)
            # the DiT's (B, L, V) soft path: softmax(w/τ) @ E
            loss = self.elbo(student, z_t, x0, alpha, alpha_prime, sigma, net_input=w / tau)
        else:
            noise = sample_top_noise_rows(x0, self.vocab_size, cfg.top_k, gens)
            z_t, indices, weights, bound = tempered_topk_inputs(x0, noise, alpha_tilde, sigma_tilde, tau,
                                                                self.vocab_size)
            loss = self.elbo(student, z_t, x0, alpha, alpha_prime, sigma, soft_inputs=(indices, weights.float()))
            metrics["tail_bound"] = bound.max()
        metrics.update(nll=loss.detach(), corrupt_rate=(z_t != x0).float().mean())
        return StepOutput(losses={"student": loss}, metrics=metrics, num_tokens=x0.numel())
