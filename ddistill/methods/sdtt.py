"""SDTT: Self-Distillation Through Time (Deschenaux & Gulcehre, arXiv 2410.21035, ICLR 2025).

A student masked-diffusion LM (MDLM, SUBS parameterisation, arXiv 2406.07524) learns to reproduce in ONE ancestral
step of size Δ what its teacher produces in k = `num_teacher_steps` steps of size Δ/k (paper Algorithm 1).

Targets. Draw t (antithetic over the global batch, t ∈ [t_min, 1]) and x_t ~ q_t(·|x0) (mask w.p. 1 − α_t). The
frozen teacher runs k ancestral steps from z_0 = x_t at the input times

    t_j = max(t − j·Δ/k, 0),  j = 0…k−1,   step j: t_j → t_{j+1}     (k = 2: t, t − Δ/2, t − Δ)

(the released code builds wrong step times, `t_start·space + (1 − t_start)·t_end`; we use the paper's). Step j
computes the SUBS log-probabilities ℓ_j = log x_θ(z_j) and reveals each still-masked position with probability
(α_{t_{j+1}} − α_{t_j}) / (1 − α_{t_j}), drawing its token from x_θ(z_j) (all draws in float64). A position of x_t
revealed at step j gets the target ℓ_j at that position; positions still masked after the last step get ℓ_{k−1}.
Equivalently the target of a masked position is ℓ_{min(J, k−1)}, J = the step that revealed it.

Loss. On the positions masked in x_t only, a divergence δ(p_student ‖ p_target) per token in fp32 (or fp64),
averaged over the masked tokens of the micro-batch (the reference's `batchmean`):

    kl_rev  Σ_v p_s (log p_s − log p_T)          reverse KL, the paper's choice ("kl-bwd")
    kl_fwd  Σ_v p_T (log p_T − log p_s)          forward KL
    tvd     ½ Σ_v |p_s − p_T|                    total variation (the released "tvd" is an L1 on log-probs; not that)
    mse     (1/V) Σ_v (log p_s − log p_T)²       MSE on log-probs (paper eq. 11; [MASK] column contributes 0)

Entries where both distributions put zero mass (the [MASK] column under SUBS) contribute 0.

Rounds. The teacher of round r = 0…R−1 samples with N_0/k^r steps (N_0 = `initial_teacher_steps` = 1024); its
student is trained for N_0/k^(r+1) steps, i.e. Δ_r = (1 − t_min)·k^(r+1)/N_0 (the step of the sampler grid
linspace(1, t_min, N + 1)). With the paper's k = 2, R = 7: the students of
rounds 0…6 use 512, 256, 128, 64, 32, 16, 8 steps (m = 2^10, k_i = 2^(10−i)). Each round lasts `steps_per_round`
optimizer steps (10k); at its end the teacher becomes the student (raw weights by default as the reference, or its
EMA with `teacher_from: ema`); the student keeps training from its weights, the EMA continues, and the optimizer is
kept unless `reset_optimizer_on_round` (the shared round mechanism, `methods/rounds.py`). After the last round the schedule stays at the last round's step count
(the reference `sys.exit`s; set the run's max steps to num_rounds × steps_per_round instead).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F

from ddistill.diffusion.absorbing import subs_log_probs
from ddistill.diffusion.schedules import NoiseSchedule, build_schedule, sample_times
from ddistill.methods import register
from ddistill.methods.base import EvalStudent, Method, NetworkControl, NetworkSpec, StepContext, StepOutput
from ddistill.methods.rounds import RoundSchedule, RoundTracker

__all__ = [
    "DIVERGENCES",
    "SDTT",
    "SDTTConfig",
    "TeacherTargets",
    "divergence_per_token",
    "global_uniform64",
    "masked_row_log_probs",
    "sample_from_log_probs",
    "teacher_rollout",
    "teacher_step_times",
    "teacher_targets",
]

Divergence = Literal["kl_rev", "kl_fwd", "tvd", "mse"]
DIVERGENCES: tuple[str, ...] = ("kl_rev", "kl_fwd", "tvd", "mse")
LOSS_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Teacher targets
# ----------------------------------------------------------------------------------------------------------------


class TeacherTargets(NamedTuple):
    """What the k teacher steps produced from x_t.

    log_probs:   (B, L, V) fp32 target log-probabilities; rows of positions unmasked in x_t hold the SUBS carry-over.
    reveal_step: (B, L) int64: −1 where x_t is unmasked, j where teacher step j revealed the position, k if still
                 masked.
    tokens:      (B, L) int64: the teacher's state after its k steps (x at time t − Δ).
    """

    log_probs: torch.Tensor
    reveal_step: torch.Tensor
    tokens: torch.Tensor


def teacher_step_times(t: torch.Tensor, dt: float, num_teacher_steps: int) -> torch.Tensor:
    """(k + 1, B) float64 times t_j = max(t − j·Δ/k, 0), j = 0…k: step j goes from t_j to t_{j+1}."""
    frac = torch.arange(num_teacher_steps + 1, device=t.device, dtype=torch.float64) / num_teacher_steps
    return (t.to(torch.float64).unsqueeze(0) - frac.unsqueeze(1) * dt).clamp_min(0.0)


def reveal_probability(schedule: NoiseSchedule, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """P(a position masked at time t is unmasked at time s < t) = (α_s − α_t)/(1 − α_t) in float64 (1 where
    1 − α_t = 0, i.e. nothing is masked)."""
    alpha_t, alpha_s = schedule.alpha(t.to(torch.float64)), schedule.alpha(s.to(torch.float64))
    masked_mass = 1.0 - alpha_t
    prob = (alpha_s - alpha_t) / torch.where(masked_mass > 0, masked_mass, torch.ones_like(masked_mass))
    return torch.where(masked_mass > 0, prob.clamp(0.0, 1.0), torch.ones_like(prob))


def sample_from_log_probs(log_probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One categorical draw per row of (N, V) log-probs by inverse CDF in float64, from uniforms (N,) in [0, 1)."""
    cdf = log_probs.to(torch.float64).exp().cumsum(dim=-1)
    threshold = (uniform.to(torch.float64) * cdf[:, -1]).unsqueeze(-1)
    # The first column whose CDF exceeds the threshold; it has positive mass, so [MASK] (mass 0) is never drawn.
    index = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return index.clamp_max(log_probs.shape[-1] - 1)


def global_uniform64(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    global_batch: int | None,
    offset: int,
) -> torch.Tensor:
    """float64 U[0,1) of `shape` = (B, ...): rows [offset, offset + B) of a draw for the global batch, so the result
    does not depend on how the global batch is split over ranks and micro-batches (see methods.base)."""
    rows = shape[0] if global_batch is None else global_batch
    u = torch.rand((rows, *shape[1:]), generator=generator, device=device, dtype=torch.float64)
    return u[offset : offset + shape[0]]


def _check_rollout_args(num_teacher_steps: int, dt: float) -> None:
    if num_teacher_steps < 1:
        raise ValueError(f"num_teacher_steps={num_teacher_steps} must be >= 1")
    if not dt > 0:
        raise ValueError(f"dt={dt} must be > 0")


@torch.no_grad()
def teacher_rollout(
    features_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rows_log_probs_fn: Callable[[torch.Tensor], torch.Tensor],
    xt: torch.Tensor,
    t: torch.Tensor,
    dt: float,
    num_teacher_steps: int,
    schedule: NoiseSchedule,
    mask_id: int,
    generator: torch.Generator | None,
    *,
    global_batch: int | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k teacher steps of SDTT on per-position features (module docstring); returns (target features (B, L, F),
    reveal_step, tokens).

    features_fn(z, sigma) -> (B, L, F) per-position teacher features of state z: SUBS log-probs (F = V) for
    `teacher_targets`, or the output layer's input hidden states (F = d) for the fused loss, where the logits of
    the few rows revealed at a step are the only ones computed. rows_log_probs_fn maps the features of rows whose
    input is [MASK] to their (N, V) log-probabilities. The reveal decision does not depend on the teacher's output,
    so only revealed rows need log-probs. Draws: float64 uniforms, global-batch rows as `global_uniform64`.
    """
    _check_rollout_args(num_teacher_steps, dt)
    times = teacher_step_times(t, dt, num_teacher_steps)
    masked_in_xt = xt == mask_id
    z = xt
    reveal_step = torch.where(masked_in_xt, num_teacher_steps, -1)
    target: torch.Tensor | None = None
    for j in range(num_teacher_steps):
        features = features_fn(z, schedule.sigma(times[j]).to(torch.float32))
        still_masked = z == mask_id
        if target is not None:
            # Positions revealed at an earlier step keep that step's features; every other row is either still
            # masked (its target becomes step j's) or unmasked in x_t (carry-over, the same at every step).
            earlier = masked_in_xt & ~still_masked
            features[earlier] = target[earlier]
        target = features
        prob = reveal_probability(schedule, times[j], times[j + 1])
        u_reveal = global_uniform64(z.shape, generator, z.device, global_batch, offset)
        u_token = global_uniform64(z.shape, generator, z.device, global_batch, offset)
        revealed = still_masked & (u_reveal < prob.unsqueeze(-1))
        new_tokens = sample_from_log_probs(rows_log_probs_fn(features[revealed]), u_token[revealed])
        z = z.masked_scatter(revealed, new_tokens)
        reveal_step = torch.where(revealed, j, reveal_step)
    assert target is not None
    return target, reveal_step, z


def teacher_targets(
    teacher_fn: Denoiser,
    xt: torch.Tensor,
    t: torch.Tensor,
    dt: float,
    num_teacher_steps: int,
    schedule: NoiseSchedule,
    mask_id: int,
    generator: torch.Generator | None,
    *,
    global_batch: int | None = None,
    offset: int = 0,
) -> TeacherTargets:
    """SDTT targets: run `num_teacher_steps` ancestral teacher steps over [t − dt, t] from x_t (module docstring).

    teacher_fn(x, sigma) -> logits (B, L, V); x_t: (B, L) ids; t: (B,) times; dt: the student's step size Δ.
    The float64 uniforms of the reveal and token draws are rows [offset, offset + B) of global-batch draws when
    `global_batch` is given (split-invariant, like `methods.base.global_uniform`).
    """
    log_probs, reveal_step, tokens = teacher_rollout(
        lambda z, sigma: subs_log_probs(teacher_fn(z, sigma), z, mask_id),
        lambda rows: rows,
        xt, t, dt, num_teacher_steps, schedule, mask_id, generator, global_batch=global_batch, offset=offset,
    )  # fmt: skip
    return TeacherTargets(log_probs=log_probs, reveal_step=reveal_step, tokens=tokens)


# ----------------------------------------------------------------------------------------------------------------
# Divergences
# ----------------------------------------------------------------------------------------------------------------


def masked_row_log_probs(logits: torch.Tensor, mask_id: int, dtype: torch.dtype) -> torch.Tensor:
    """SUBS log-probabilities of rows whose input is [MASK]: log-softmax with the [MASK] column at −∞, in `dtype`."""
    rows = logits.to(dtype).index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    return torch.log_softmax(rows, dim=-1)


def divergence_per_token(student_lp: torch.Tensor, target_lp: torch.Tensor, kind: str) -> torch.Tensor:
    """δ(p_student ‖ p_target) per row of (N, V) log-probabilities -> (N,), in their dtype (module docstring).

    Entries where both log-probs are −∞ contribute 0 and no NaN gradient.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {list(DIVERGENCES)}")
    if student_lp.shape != target_lp.shape:
        raise ValueError(f"student {tuple(student_lp.shape)} and target {tuple(target_lp.shape)} shapes differ")
    target_lp = target_lp.to(student_lp.dtype)
    if kind == "tvd":
        return 0.5 * (student_lp.exp() - target_lp.exp()).abs().sum(-1)
    both_zero = torch.isneginf(student_lp) & torch.isneginf(target_lp)
    zero = torch.zeros((), dtype=student_lp.dtype, device=student_lp.device)
    diff = torch.where(both_zero, zero, student_lp) - torch.where(both_zero, zero, target_lp)  # log p_s − log p_T
    if kind == "kl_rev":
        return (student_lp.exp() * diff).sum(-1)
    if kind == "kl_fwd":
        return (target_lp.exp() * -diff).sum(-1)
    return diff.square().mean(-1)  # mse


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SDTTConfig:
    """SDTT hyper-parameters (YAML section `method:`); defaults are the paper's (arXiv 2410.21035 §3-4)."""

    divergence: Divergence = "kl_rev"
    num_teacher_steps: int = 2  # k: teacher steps matched by one student step
    initial_teacher_steps: int = 1024  # N_0: sampling steps of the round-0 teacher
    num_rounds: int = 7
    steps_per_round: int = 10_000  # optimizer steps per round (the reference's grow_dt_every)
    teacher_from: Literal["raw", "ema"] = "raw"  # what becomes the next round's teacher
    reset_optimizer_on_round: bool = False
    schedule: str = "loglinear"
    schedule_eps: float = 1e-3  # α_t = 1 − (1 − eps)·t
    t_min: float = 1e-5  # t ~ U[t_min, 1] (the reference's sampling_eps)
    antithetic: bool = True
    loss_precision: Literal["fp32", "fp64"] = "fp32"
    # "triton": fused output-linear + divergence (ddistill.kernels.distill_loss): no (B, L, V) tensor is built,
    # the teacher's logits are computed only for the rows it reveals. kl_rev / kl_fwd / tvd, fp32. "chunked": the
    # same from hidden states through the row-chunked cuBLAS path (gradient formed in the forward).
    loss_impl: Literal["torch", "triton", "chunked"] = "torch"

    def __post_init__(self) -> None:
        if self.loss_impl != "torch" and (self.divergence == "mse" or self.loss_precision != "fp32"):
            raise ValueError(
                f"method.loss_impl={self.loss_impl!r} supports divergence kl_rev/kl_fwd/tvd in fp32, not "
                f"divergence={self.divergence!r} with loss_precision={self.loss_precision!r}; use loss_impl=torch"
            )
        if self.num_teacher_steps < 2:
            raise ValueError(f"method.num_teacher_steps={self.num_teacher_steps} must be >= 2")
        self.round_schedule()  # raises ValueError naming a bad num_rounds / steps_per_round / teacher_from
        if self.initial_teacher_steps % self.num_teacher_steps**self.num_rounds:
            raise ValueError(
                f"method.initial_teacher_steps={self.initial_teacher_steps} must be divisible by "
                f"num_teacher_steps**num_rounds = {self.num_teacher_steps}**{self.num_rounds} so that every round's "
                f"student has a whole number of steps"
            )
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"method.t_min={self.t_min} must lie in [0, 1)")
        build_schedule(self.schedule, eps=self.schedule_eps)  # raises ValueError naming the allowed schedules

    def student_steps(self, round_index: int) -> int:
        """Sampling steps of the student trained in round `round_index` (0-based): N_0 / k^(r+1)."""
        return self.initial_teacher_steps // self.num_teacher_steps ** (round_index + 1)

    def round_schedule(self) -> RoundSchedule:
        return RoundSchedule(num_rounds=self.num_rounds, steps_per_round=self.steps_per_round,
                             teacher_from=self.teacher_from, reset_optimizer=self.reset_optimizer_on_round)


@register
class SDTT(Method):
    """Multi-round SDTT with a frozen teacher that is replaced by the student at every round boundary."""

    name: ClassVar[str] = "sdtt"
    Config: ClassVar[type] = SDTTConfig

    def __init__(self, cfg: SDTTConfig, *, vocab_size: int, mask_id: int):
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is outside the vocabulary of size {vocab_size}")
        super().__init__(cfg, vocab_size=vocab_size, mask_id=mask_id)
        self.schedule = build_schedule(cfg.schedule, eps=cfg.schedule_eps)
        self.rounds = RoundTracker(
            cfg.round_schedule(),
            extra_signature={"num_teacher_steps": cfg.num_teacher_steps,
                             "initial_teacher_steps": cfg.initial_teacher_steps},
            method="SDTT",
        )  # fmt: skip

    @property
    def round(self) -> int:
        """The current round (0-based)."""
        return self.rounds.round

    # -- networks and schedule ------------------------------------------------------------------------------------

    def networks(self) -> dict[str, NetworkSpec]:
        return {
            "student": NetworkSpec(role="trained", init="pretrained", ema=True),
            "teacher": NetworkSpec(role="frozen", init="pretrained"),
        }

    @property
    def student_steps(self) -> int:
        """Sampling steps of the student of the current round."""
        return self.cfg.student_steps(self.round)

    @property
    def student_dt(self) -> float:
        """Δ = (1 − t_min)/N: one step of the student's sampling grid linspace(1, t_min, N + 1) (samplers.sample_mdlm
        with t_end = t_min), i.e. k steps of the teacher's grid, as the reference's dt = (1 − ε)/1024 · 2^r."""
        return (1.0 - self.cfg.t_min) / self.student_steps

    def sampler_spec(self) -> dict:
        """How to sample the student being trained: its step count on the grid linspace(1, t_min, N + 1). At a
        round boundary (after `on_step_end`) this is already the next round's count; the students of finished rounds
        are the checkpoints at the boundaries (`ddistill.eval.rounds`)."""
        return {"process": "absorbing", "num_steps": self.student_steps, "schedule": self.cfg.schedule,
                "t_end": self.cfg.t_min}

    # -- one micro-batch ------------------------------------------------------------------------------------------

    def step(self, nets: Mapping[str, Callable], batch: torch.Tensor, ctx: StepContext) -> StepOutput:
        self.rounds.check_step(ctx.step)
        x0 = batch.to(ctx.device)
        rows, total = slice(ctx.global_offset, ctx.global_offset + x0.shape[0]), ctx.global_batch_size
        # The times and masks of the whole global batch (the same draws on every rank), then this micro-batch's rows.
        t_all = sample_times(
            total,
            global_batch=total,
            offset=0,
            generator=ctx.generator,
            device=ctx.device,
            t_min=self.cfg.t_min,
            antithetic=self.cfg.antithetic,
            dtype=torch.float64,
        )
        masked_all = global_uniform64((total, x0.shape[1]), ctx.generator, ctx.device, total, 0) < (
            1.0 - self.schedule.alpha(t_all)
        ).unsqueeze(-1)
        t, masked = t_all[rows], masked_all[rows]
        xt = torch.where(masked, self.mask_id, x0)
        num_masked = masked.sum()
        # Σ over this micro-batch / (the global batch's masked count · B/G): the engine's mean over the G/B
        # micro-batches of the step then gives Σ_global / masked_global, however the global batch is split.
        normalizer = masked_all.sum().clamp_min(1) * (x0.shape[0] / total)
        if self.cfg.loss_impl != "torch":
            loss, reveal_step = self._fused_loss(nets, xt, t, masked, normalizer, ctx)
        else:
            loss, reveal_step = self._torch_loss(nets, xt, t, masked, normalizer, ctx)
        revealed_first = (reveal_step == 0).sum()
        metrics: dict[str, float | torch.Tensor] = {
            f"sdtt_{self.cfg.divergence}": loss.detach(),
            "masked_tokens": num_masked.detach().float(),
            "teacher_step0_reveal_frac": revealed_first.float() / num_masked.clamp_min(1).float(),
            "round": float(self.round),
            "student_steps": float(self.student_steps),
        }
        return StepOutput(losses={"student": loss}, metrics=metrics, num_tokens=x0.numel())

    def _torch_loss(self, nets, xt, t, masked, normalizer, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        targets = teacher_targets(
            nets["teacher"],
            xt,
            t,
            self.student_dt,
            self.cfg.num_teacher_steps,
            self.schedule,
            self.mask_id,
            ctx.generator,
            global_batch=ctx.global_batch_size,
            offset=ctx.global_offset,
        )
        logits = nets["student"](xt, self.schedule.sigma(t).to(torch.float32), rows=masked)
        student_lp = masked_row_log_probs(logits, self.mask_id, LOSS_DTYPES[self.cfg.loss_precision])
        per_token = divergence_per_token(student_lp, targets.log_probs[masked], self.cfg.divergence)
        return (per_token.sum() / normalizer).to(torch.float32), targets.reveal_step

    def _fused_loss(self, nets, xt, t, masked, normalizer, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """The same loss from hidden states: the teacher's target row of a position is its hidden state at the step
        that defines the target, and `distill_loss` applies both output linears, SUBS and the divergence fused."""
        from ddistill.kernels import distill_loss

        teacher, student = nets["teacher"], nets["student"]
        vocab = self.vocab_size
        dtype_t, dtype_s = teacher.head_dtype(xt.device), student.head_dtype(xt.device)
        with teacher.gathered_output() as (weight_t, bias_t):

            def revealed_log_probs(hidden: torch.Tensor) -> torch.Tensor:  # the teacher's own head precision
                logits = F.linear(hidden.to(dtype_t), weight_t[:vocab].to(dtype_t), bias_t[:vocab].to(dtype_t))
                return masked_row_log_probs(logits, self.mask_id, torch.float32)

            hidden_t, reveal_step, _ = teacher_rollout(
                teacher.hidden_states, revealed_log_probs, xt, t, self.student_dt, self.cfg.num_teacher_steps,
                self.schedule, self.mask_id, ctx.generator, global_batch=ctx.global_batch_size,
                offset=ctx.global_offset,
            )  # fmt: skip
            hidden_s = student.hidden_states(xt, self.schedule.sigma(t).to(torch.float32))
            dim = hidden_s.shape[-1]
            loss = distill_loss(  # row_mask: the kernel gathers the masked rows itself
                hidden_s.reshape(-1, dim).to(dtype_s), student.output_weight, student.output_bias,
                hidden_t.reshape(-1, dim).to(dtype_t), weight_t, bias_t, 1.0, vocab, kind=self.cfg.divergence,
                mask_id=self.mask_id, row_mask=masked.reshape(-1), normalizer=normalizer, impl=self.cfg.loss_impl,
            )  # fmt: skip
        return loss.to(torch.float32), reveal_step

    # -- rounds ---------------------------------------------------------------------------------------------------

    def on_step_end(self, step: int, control: NetworkControl) -> dict:
        """After optimizer step `step` (0-based): at a round boundary the student becomes the teacher."""
        if not self.rounds.on_step_end(step, control):
            return {}
        return {"round": float(self.round), "student_steps": float(self.student_steps)}

    def eval_students(self) -> list[EvalStudent]:
        """Round r's student (1-based) is the checkpoint at step r·steps_per_round, distilled for N_0/k^r steps."""
        return self.rounds.eval_students("mdlm", lambda r: self.cfg.student_steps(r - 1))

    # -- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**self.rounds.state_dict(), "student_steps": self.student_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds.load_state_dict(state)
        assert self.student_steps == int(state["student_steps"]), (self.student_steps, state["student_steps"])
