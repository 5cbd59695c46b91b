"""MDLM base training: absorbing (masked) diffusion with the SUBS parameterisation (Sahoo et al., arXiv 2406.07524).

For clean x0, time t ~ stratified U[t_min, 1] over the global batch, α_t from the noise schedule:

    x_t[l] = MASK with probability 1 − α_t, else x0[l]
    L = E_t Σ_l 1[x_t[l] = MASK] · (α'_t / (1 − α_t)) · log p_θ(x0[l] | x_t)       (α'_t < 0, so L ≥ 0)

normalised by the number of tokens of the micro-batch (the token-level mean of the reference). The network is
not time-conditioned by default (MDLM), its σ input is −log α_t. `loss_impl="triton"` routes the output linear and
the loss through the fused kernel of `ddistill.kernels` (same math, logits never materialised); `"chunked"` through
its row-chunked cuBLAS path (logits one chunk at a time, gradient formed in the forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Mapping

import torch

from ddistill.diffusion.absorbing import masked_target_log_prob
from ddistill.diffusion.schedules import build_schedule, sample_times
from ddistill.methods import register
from ddistill.methods.base import Method, NetworkSpec, StepContext, StepOutput, fused_kernel, global_uniform


@dataclass(kw_only=True)
class MDLMConfig:
    schedule: str = "loglinear"
    schedule_eps: float = 1e-3
    t_min: float = 1e-3
    antithetic: bool = True
    time_conditioning: bool = False
    loss_impl: Literal["torch", "triton", "chunked"] = "torch"



@register
class MDLM(Method):
    name: ClassVar[str] = "mdlm"
    Config: ClassVar[type] = MDLMConfig

    def __init__(self, cfg: MDLMConfig, *, vocab_size: int, mask_id: int):
        super().__init__(cfg, vocab_size=vocab_size, mask_id=mask_id)
        self.schedule = build_schedule(cfg.schedule, eps=cfg.schedule_eps)
        self._fused = fused_kernel("masked_diffusion_loss", cfg.loss_impl) if cfg.loss_impl != "torch" else None

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
        masked = global_uniform(ctx, num_rows, (length,)) < (1.0 - alpha)[:, None]
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        student = nets["student"]
        if self._fused is None:
            # Only masked positions contribute (SUBS carry-over), so the output layer runs on those rows alone.
            logits = student(xt, sigma, rows=masked)
            row_weight = (alpha_prime / (1.0 - alpha))[:, None].expand(num_rows, length)[masked].float()
            log_p = masked_target_log_prob(logits, x0[masked], self.mask_id)
            loss = (row_weight * log_p).sum() / x0.numel()
        else:
            hidden = student.hidden_states(xt, sigma)
            row_weight = (-alpha_prime / (1.0 - alpha))[:, None].expand(num_rows, length)
            loss = self._fused(
                hidden.reshape(-1, hidden.shape[-1]).to(student.head_dtype(hidden.device)),
                student.output_weight,
                student.output_bias,
                x0.reshape(-1),
                row_weight.reshape(-1).float(),
                self.vocab_size,
                self.mask_id,
                is_masked=masked.reshape(-1),
                normalizer=float(x0.numel()),
                impl=self.cfg.loss_impl,
            )
        return StepOutput(
            losses={"student": loss},
            metrics={"nll": loss.detach(), "mask_rate": masked.float().mean()},
            num_tokens=x0.numel(),
        )

    def sampler_spec(self) -> dict:
        return {"process": "absorbing", "schedule": self.cfg.schedule}
