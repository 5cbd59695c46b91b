"""DCD: Discrete Consistency Distillation of a uniform-state (DUO) teacher (Sahoo et al., arXiv 2506.10892 §4.2,
Alg. 1; semantics of the reference's `ch-1` branch, duo.md §4).

Deterministic discrete trajectories. With one Gaussian ε ~ N(0, I_K) per token shared by all times, the Gaussian
probability-flow ODE of the optimal denoiser is w_t = α̃_t·e_x + σ̃_t·ε and its discrete image z_t = argmax w_t. Per
step, for clean x and t ~ stratified U[t_min, 1] over the global batch, round r = 0…R−1:

    δ = 2^r / T₀,  t ← min(t + δ, 1),  s = t − δ,  γ_u = γ_min + u·(γ_max − γ_min) for u ∈ {t, s}
    z_t = argmax(α̃_t e_x + σ̃_t ε),  z_s = argmax(α̃_s e_x + σ̃_s ε)          (the same ε)
    L = mean over tokens of  D(p_student(· | z_t, σ_t) ‖ p_teacher(· | z_s, σ_s)),   σ_u = −log T(γ_u)

with D the reverse KL Σ_v p_S (log p_S − log p_T) ("kl_rev", the paper's) or the forward KL ("kl_fwd"), on the
clean-token distributions (log-softmax of the logits, fp32 or fp64). No ODE step of the teacher is needed: z_s is
the exact point of the same trajectory. `loss_impl: triton` computes the same loss from the two networks' hidden
states with the fused output-linear + divergence kernel (`kernels.distill_loss`): no (B, L, V) logits are built;
`loss_impl: chunked` with that kernel's row-chunked cuBLAS path (gradient formed in the forward).

Exact trajectory sampling without the (B, L, K) tensor. With μ_u = α̃_u/σ̃_u, argmax w_u = x iff μ_u + ε_x > M where
M = max_{v≠x} ε_v, and otherwise the id j* of that maximum; (ε_x, M, j*) have the law of the k = 1 case of
`diffusion.duality.sample_top_noise` (M = Φ⁻¹(U^{1/(K−1)}), j* uniform over the K − 1 ids ≠ x, independent). So per
token three numbers give (z_t, z_s) for any pair of times; each token flips at most once along a trajectory.

Rounds (the shared mechanism, `methods/rounds.py`): R = `num_rounds` rounds of `steps_per_round` steps; δ doubles at
each boundary, where the frozen teacher becomes the raw student (`teacher_from: ema` takes its EMA, the paper's
Alg. 2). The output model is the student's EMA; its decay is the run's `train.ema_decay` and is never replaced by a
loaded checkpoint's (engine/ema.py). Recipe (paper / scripts/distil_owt.sh): T₀ = 512, 5 × 10k steps, γ ∈ [−4, −1],
batch 128, lr 6e-5, warm-up 500, EMA 0.999, clip 1.0, bf16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch

from ddistill.diffusion.duality import DualityTable, duality_table, gaussian_scales, sample_top_noise_rows
from ddistill.diffusion.schedules import sample_times
from ddistill.methods import register
from ddistill.methods.base import (
    EvalStudent,
    Method,
    NetworkControl,
    NetworkSpec,
    StepContext,
    StepOutput,
    row_generators,
)
from ddistill.methods.rounds import RoundSchedule, RoundTracker

__all__ = ["DCD", "DCDConfig", "trajectory_tokens", "consistency_divergence"]

LOSS_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(kw_only=True)
class DCDConfig:
    """DCD hyper-parameters (YAML section `method:`); defaults are the paper's recipe (module docstring)."""

    divergence: Literal["kl_rev", "kl_fwd"] = "kl_rev"
    base_num_steps: int = 512  # T₀: δ = 2^r / T₀ in round r
    num_rounds: int = 5
    steps_per_round: int = 10_000
    teacher_from: Literal["raw", "ema"] = "raw"
    reset_optimizer_on_round: bool = False
    gamma_min: float = -4.0
    gamma_max: float = -1.0
    t_min: float = 1e-3
    antithetic: bool = True
    loss_precision: Literal["fp32", "fp64"] = "fp32"
    loss_impl: Literal["torch", "triton", "chunked"] = "torch"  # triton / chunked: the fused distillation kernel
    table_points: int = 20_001

    def __post_init__(self) -> None:
        self.round_schedule()  # raises ValueError naming a bad num_rounds / steps_per_round / teacher_from
        if self.base_num_steps < 1:
            raise ValueError(f"method.base_num_steps={self.base_num_steps} must be >= 1")
        if 2 ** (self.num_rounds - 1) > self.base_num_steps:
            raise ValueError(
                f"method.num_rounds={self.num_rounds}: δ = 2^r/{self.base_num_steps} would exceed 1 in the last round"
            )
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"method.gamma_min={self.gamma_min} must be < method.gamma_max={self.gamma_max}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"method.t_min={self.t_min} must lie in [0, 1)")
        if self.loss_impl != "torch" and self.loss_precision != "fp32":
            raise ValueError(f"method.loss_impl={self.loss_impl!r} computes the divergence in fp32, not "
                             f"loss_precision={self.loss_precision!r}; use loss_impl=torch for fp64")

    def round_schedule(self) -> RoundSchedule:
        return RoundSchedule(num_rounds=self.num_rounds, steps_per_round=self.steps_per_round,
                             teacher_from=self.teacher_from, reset_optimizer=self.reset_optimizer_on_round)

    def delta(self, round_index: int) -> float:
        """δ = 2^r / T₀ of round r (0-based)."""
        return 2.0**round_index / self.base_num_steps


def trajectory_tokens(x: torch.Tensor, mu: torch.Tensor, clean: torch.Tensor, top: torch.Tensor,
                      top_id: torch.Tensor) -> torch.Tensor:
    """argmax(α̃ e_x + σ̃ ε) from (ε_x, M, j*) per token: x where μ + ε_x > M, else j*. μ = α̃/σ̃ of shape (B,)."""
    return torch.where(mu.to(torch.float64)[:, None] + clean > top, x, top_id)


def consistency_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                           dtype: torch.dtype) -> torch.Tensor:
    """Per-token D(p_S ‖ p_T) (kl_rev) or D(p_T ‖ p_S) (kl_fwd) of two (…, V) logits, in `dtype`."""
    log_s = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_t = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    if kind == "kl_rev":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if kind == "kl_fwd":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of ['kl_rev', 'kl_fwd']")


@register
class DCD(Method):
    """Multi-round consistency distillation of a DUO teacher along deterministic discrete trajectories."""

    name: ClassVar[str] = "dcd"
    Config: ClassVar[type] = DCDConfig

    def __init__(self, cfg: DCDConfig, *, vocab_size: int, mask_id: int):
        super().__init__(cfg, vocab_size=vocab_size, mask_id=mask_id)
        self.rounds = RoundTracker(cfg.round_schedule(), extra_signature={"base_num_steps": cfg.base_num_steps},
                                   method="DCD")

    @property
    def table(self) -> DualityTable:
        """α = T(γ) over [gamma_min, gamma_max] for this vocabulary (built on first use, cached on disk)."""
        return duality_table(self.vocab_size, self.cfg.gamma_min, self.cfg.gamma_max, self.cfg.table_points)

    @property
    def round(self) -> int:
        return self.rounds.round

    @property
    def delta(self) -> float:
        return self.cfg.delta(self.round)

    def networks(self) -> dict[str, NetworkSpec]:
        return {
            "student": NetworkSpec(role="trained", init="pretrained", ema=True,
                                   model_overrides={"time_conditioning": True}),
            "teacher": NetworkSpec(role="frozen", init="pretrained", model_overrides={"time_conditioning": True}),
        }

    def sampler_spec(self) -> dict:
        return {"process": "uniform", "schedule": "loglinear"}

    def eval_students(self) -> list[EvalStudent]:
        """Round r's student (1-based) is the EMA student of the checkpoint at step r·steps_per_round (DCD
        students are not tied to one step count)."""
        return self.rounds.eval_students("duo")

    def _sigma(self, gamma: torch.Tensor) -> torch.Tensor:
        return (-torch.log(self.table.alpha(gamma))).float()

    def step(self, nets: Mapping[str, Callable], batch: torch.Tensor, ctx: StepContext) -> StepOutput:
        self.rounds.check_step(ctx.step)
        cfg, x = self.cfg, batch
        num_rows = x.shape[0]
        t = sample_times(num_rows, global_batch=ctx.global_batch_size, offset=ctx.global_offset,
                         generator=ctx.generator, device=ctx.device, t_min=cfg.t_min, antithetic=cfg.antithetic,
                         dtype=torch.float64)  # fmt: skip
        t = (t + self.delta).clamp(max=1.0)
        s = t - self.delta
        span = cfg.gamma_max - cfg.gamma_min
        gamma_t, gamma_s = cfg.gamma_min + t * span, cfg.gamma_min + s * span
        noise = sample_top_noise_rows(x, self.vocab_size, 1, row_generators(ctx, num_rows))
        clean, top, top_id = noise.clean, noise.values[..., 0], noise.indices[..., 0]
        mu_t, mu_s = (a / b for a, b in (gaussian_scales(gamma_t), gaussian_scales(gamma_s)))
        z_t = trajectory_tokens(x, mu_t, clean, top, top_id)
        z_s = trajectory_tokens(x, mu_s, clean, top, top_id)
        if cfg.loss_impl != "torch":
            loss = self._fused_loss(nets, z_t, z_s, self._sigma(gamma_t), self._sigma(gamma_s))
        else:
            teacher_logits = nets["teacher"](z_s, self._sigma(gamma_s))
            student_logits = nets["student"](z_t, self._sigma(gamma_t))
            per_token = consistency_divergence(student_logits, teacher_logits, cfg.divergence,
                                               LOSS_DTYPES[cfg.loss_precision])
            loss = (per_token.sum() / x.numel()).to(torch.float32)
        metrics: dict[str, float | torch.Tensor] = {
            f"dcd_{cfg.divergence}": loss.detach(),
            "corrupt_rate_t": (z_t != x).float().mean(),
            "corrupt_rate_s": (z_s != x).float().mean(),
            "round": float(self.round),
            "delta": self.delta,
        }
        return StepOutput(losses={"student": loss}, metrics=metrics, num_tokens=x.numel())

    def _fused_loss(self, nets, z_t: torch.Tensor, z_s: torch.Tensor, sigma_t: torch.Tensor,
                    sigma_s: torch.Tensor) -> torch.Tensor:
        """The same mean divergence from hidden states: `distill_loss` applies both output linears (each in its
        network's head precision) and the divergence over all K columns (a uniform-state model has no mask column)."""
        from ddistill.kernels import distill_loss

        teacher, student = nets["teacher"], nets["student"]
        with teacher.gathered_output() as (weight_t, bias_t):
            hidden_t = teacher.hidden_states(z_s, sigma_s)
            hidden_s = student.hidden_states(z_t, sigma_t)
            dim = hidden_s.shape[-1]
            loss = distill_loss(
                hidden_s.reshape(-1, dim).to(student.head_dtype(z_t.device)), student.output_weight,
                student.output_bias, hidden_t.reshape(-1, dim).to(teacher.head_dtype(z_s.device)), weight_t, bias_t,
                1.0, self.vocab_size, kind=self.cfg.divergence, mask_id=None, normalizer=float(z_t.numel()),
                impl=self.cfg.loss_impl,
            )  # fmt: skip
        return loss.to(torch.float32)

    def on_step_end(self, step: int, control: NetworkControl) -> dict:
        """After optimizer step `step`: at a round boundary the teacher becomes the student and δ doubles."""
        if not self.rounds.on_step_end(step, control):
            return {}
        return {"round": float(self.round), "delta": self.delta}

    def state_dict(self) -> dict[str, Any]:
        return self.rounds.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds.load_state_dict(state)
