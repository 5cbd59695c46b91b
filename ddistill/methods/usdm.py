"""USDM base training: uniform-state discrete diffusion with DUO's closed-form ELBO (Sahoo et al., arXiv 2506.10892,
eq. 17; equal pointwise to UDLM's per-token loss, Schiff et al., arXiv 2412.10193), no Gaussian curriculum.

For clean x0 and t ~ stratified U[t_min, 1] over the global batch:

    z_t[l] = x0[l] with probability α_t, else a uniform id in [0, K)   (the draw may equal x0[l])
    L = E_t Σ_l f_Duo(softmax(θ(z_t, σ_t)), z_t[l], x0[l]; α_t, α'_t),    σ_t = −log α_t

normalised by the number of tokens. The network is time-conditioned (DUO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Mapping

import torch

from ddistill.diffusion.schedules import build_schedule, sample_times
from ddistill.diffusion.uniform import duo_elbo_per_token
from ddistill.methods import register
from ddistill.methods.base import (
    Method,
    NetworkSpec,
    StepContext,
    StepOutput,
    fused_kernel,
    global_randint,
    global_uniform,
)


@dataclass(kw_only=True)
class USDMConfig:
    schedule: str = "loglinear"
    schedule_eps: float = 1e-3
    t_min: float = 1e-3
    antithetic: bool = True
    time_conditioning: bool = True
    loss_impl: Literal["torch", "triton", "chunked"] = "torch"



@register
class USDM(Method):
    name: ClassVar[str] = "usdm"
    Config: ClassVar[type] = USDMConfig

    def __init__(self, cfg: USDMConfig, *, vocab_size: int, mask_id: int):
        super().__init__(cfg, vocab_size=vocab_size, mask_id=mask_id)
        self.schedule = build_schedule(cfg.schedule, eps=cfg.schedule_eps)
        self._fused = fused_kernel("uniform_elbo_loss", cfg.loss_impl) if cfg.loss_impl != "torch" else None

    def networks(self) -> dict[str, NetworkSpec]:
        return {
            "student": NetworkSpec(
                role="trained", ema=True, model_overrides={"time_conditioning": self.cfg.time_conditioning}
            )
        }

    def step(self, nets: Mapping[str, Callable], batch: torch.Tensor, ctx: StepContext) -> StepOutput:
        x0 = batch
        num_rows, length = x0.shape
        t = sample_times(
            num_rows,
            global_batch=ctx.global_batch_size,
            offset=ctx.global_offset,
            generator=ctx.generator,
            device=ctx.device,
            t_min=self.cfg.t_min,
            antithetic=self.cfg.antithetic,
        )
        alpha, alpha_prime, sigma = self.schedule.alpha(t), self.schedule.alpha_prime(t), self.schedule.sigma(t)
        replace = global_uniform(ctx, num_rows, (length,)) < (1.0 - alpha)[:, None]
        noise = global_randint(ctx, self.vocab_size, num_rows, (length,))
        xt = torch.where(replace, noise, x0)
        loss = self.elbo(nets["student"], xt, x0, alpha, alpha_prime, sigma)
        return StepOutput(
            losses={"student": loss},
            metrics={"nll": loss.detach(), "corrupt_rate": (xt != x0).float().mean()},
            num_tokens=x0.numel(),
        )

    def elbo(self, student, xt: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, alpha_prime: torch.Tensor,
             sigma: torch.Tensor, *, net_input: torch.Tensor | None = None,
             soft_inputs: tuple | None = None) -> torch.Tensor:
        """Σ_l f_Duo(x_θ, x_t, x0) / (B·L), x_θ the student at (x_t, σ) — or at `net_input` / `soft_inputs` when
        given (the DUO curriculum's soft inputs) —, from the logits (torch) or fused from the hidden states
        (`loss_impl: triton | chunked`: no (B, L, V) logits)."""
        length = x0.shape[1]
        x_in = xt if net_input is None else net_input
        extra = {} if soft_inputs is None else {"soft_inputs": soft_inputs}
        if self._fused is None:
            return duo_elbo_per_token(student(x_in, sigma, **extra), xt, x0, alpha, alpha_prime).sum() / x0.numel()
        hidden = student.hidden_states(x_in, sigma, **extra)
        return self._fused(
            hidden.reshape(-1, hidden.shape[-1]).to(student.head_dtype(hidden.device)),
            student.output_weight,
            student.output_bias,
            xt.reshape(-1),
            x0.reshape(-1),
            alpha.repeat_interleave(length).float(),
            alpha_prime.repeat_interleave(length).float(),
            self.vocab_size,
            normalizer=float(x0.numel()),
            impl=self.cfg.loss_impl,
        )

    def sampler_spec(self) -> dict:
        return {"process": "uniform", "schedule": self.cfg.schedule}
